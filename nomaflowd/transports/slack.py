"""Slack incoming webhooks: one line of text, a colour per alert kind, bare-string answers."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from nomaflowd.alerts import SEVERITY, Alert, digest_by_job, digest_headline, digest_line
from nomaflowd.routing import SLACK_DEFAULT
from nomaflowd.transports.base import Rendered, retry_after
from nomaflowd.transports.chat import DIGEST_LINES, compact_lines, one_line, pack
from nomaflowd.transports.http_client import HttpTransport

# Slack cuts a message's text off past 40,000 characters
# (https://api.slack.com/changelog/2018-04-truncating-really-long-messages) and reads
# poorly long before; a digest part stays well under, headline included.
MAX_TEXT = 12_000
HEAD_ROOM = 1_000  # for a part's first line: the headline or "digest-… continued (part k of n)"


def _controls(text: str) -> str:
    """Slack's three control characters (https://api.slack.com/reference/surfaces/formatting)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def escape(text: str) -> str:
    """Event text, inert in Slack and in Mattermost (which takes the same payload and reads
    Markdown: `@channel` notifies everyone, `[label](url)` is a link). A word joiner after
    `@` and inside `](` leaves neither to parse, and shows nothing in either."""
    return _controls(text).replace("@", "@\u2060").replace("](", "]\u2060(")


# Kept as is by quote(): everything a URL needs, minus `|`, `<`, `>` and spaces.
_URL_SAFE = "/:?#[]@!$&'()*+,;=%~"


def link(url: str, label: str) -> str:
    """`<url|label>` that an event's run_id cannot break out of.

    Slack has no escape for `|` inside a link, so the URL is percent-encoded (which also
    covers `<`, `>`, spaces and quotes) before its `&` is escaped.
    """
    return f"<{_controls(quote(url, safe=_URL_SAFE))}|{escape(label)}>"




class Slack(HttpTransport):
    type = "slack"

    def endpoint(self) -> str:
        return str(self.settings["webhook_url"].reveal())

    def text(self, alert: Alert) -> str:
        icon, pieces = alert.summary_parts()
        line = " \u00b7 ".join(escape(one_line(p)) for p in pieces)
        return f"{icon} {line}" + (f" {link(alert.url, alert.link_text)}" if alert.url else "")

    def render(self, alert: Alert, recipient: str) -> Rendered:
        return self.request(self.payload(alert, recipient))

    def request(self, payload: dict[str, Any]) -> Rendered:
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        return Rendered(self.endpoint(), body)

    def payload(self, alert: Alert, recipient: str) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "text": self.text(alert),
            "username": self.settings.get("username") or "Nomaflow",
            "icon_emoji": self.settings.get("icon_emoji") or ":gear:",
        }
        # No channel key at all means "the webhook's own channel" to Slack.
        channel = recipient if recipient and recipient != SLACK_DEFAULT else None
        channel = channel or self.settings.get("default_channel")
        if channel:
            payload["channel"] = channel
        colour = alert.colour
        if colour:
            facts = [f"job {alert.job_id}"]
            if alert.run_id:
                facts.append(f"run {alert.run_id}")
            if alert.get("triggered_by"):
                facts.append(f"triggered by {alert.get('triggered_by')}")
            payload["attachments"] = [{"color": colour, "fallback": payload["text"],
                                       "text": " \u00b7 ".join(escape(one_line(f))
                                                               for f in facts)}]
        return payload

    def render_digest(self, alerts: list[Alert], recipient: str, digest_id: str
                      ) -> list[Rendered]:
        """The messages of one digest, which name every job.

        The headline, a full line for each of the first DIGEST_LINES jobs (worst first),
        then `job xN` (a times sign) for every other job. What does not fit one message
        within Slack's limits goes on in another: a name is never folded into a count.
        """
        groups = digest_by_job(alerts)
        lines = [self._digest_line(job, group) for job, group in groups[:DIGEST_LINES]]
        rest = groups[DIGEST_LINES:]
        if rest:
            lines.append(f"_{len(rest)} more jobs ({sum(len(g) for _, g in rest)} alerts):_")
            lines += compact_lines(rest, escape)
        parts = pack(lines, MAX_TEXT - HEAD_ROOM)
        headline = digest_headline(alerts)
        worst = min(alerts, key=lambda a: SEVERITY.index(a.kind) if a.kind in SEVERITY else 99)
        base = self.payload(alerts[0], recipient)
        base.pop("attachments", None)
        payloads = []
        for k, part in enumerate(parts, 1):
            of = f" (part {k} of {len(parts)})" if len(parts) > 1 else ""
            # Only the first part states the count, so the parts never add up to more.
            head = escape(headline) if k == 1 else f"{escape(digest_id)} continued"
            payload = {**base, "text": "\n".join([f":package: *{head}*{of}", *part])}
            if worst.colour:
                payload["attachments"] = [{"color": worst.colour,
                                           "fallback": headline + of,
                                           "text": escape(digest_id) + of}]
            payloads.append(self.request(payload))
        return payloads

    def _digest_line(self, job: str, group: list[Alert]) -> str:
        icon, pieces = digest_line(job, group)
        line = " \u00b7 ".join(escape(one_line(p)) for p in pieces)
        latest = group[-1]
        if latest.url:
            line += f" {link(latest.url, latest.link_text)}"
        return f"{icon} {line}"

    def describe_refusal(self, status: int, data: bytes, headers: Any) -> str:
        """Slack answers a bare token (`invalid_payload`); Mattermost, which takes Slack's
        payload, a JSON error: `{"id": "web.incoming_webhook.invalid.app_error",
        "message": "Invalid webhook.", ...}`."""
        words = mattermost_error(data)
        if words:
            return f"HTTP {status} {words}" + retry_after(status, headers)
        token = data[:100].decode("utf-8", "replace").strip().splitlines()
        return f"HTTP {status}" + (f" {token[0]}" if token else "") + retry_after(status, headers)

    def accept(self, status: int, data: bytes, headers: Any, request: Rendered) -> str:
        """Slack's incoming webhooks answer a bare `ok`, and so does Mattermost's (text/plain,
        https://developers.mattermost.com/integrate/webhooks/incoming/); anything else is a
        refusal."""
        if status == 200 and data.strip() == b"ok":
            return "HTTP 200 ok"
        raise self.refusal(status, data, headers)


def mattermost_error(data: bytes) -> str:
    """`id: message` of a Mattermost error answer, else ""."""
    try:
        doc = json.loads(data)
    except ValueError:
        return ""
    if not isinstance(doc, dict) or not doc.get("message"):
        return ""
    words = f"{doc['id']}: {doc['message']}" if doc.get("id") else str(doc["message"])
    return " ".join(words.split())[:300]
