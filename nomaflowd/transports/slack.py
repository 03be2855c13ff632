"""Slack incoming webhooks: one line of text, a colour per alert kind, bare-string answers."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from nomaflowd.alerts import SEVERITY, Alert, digest_by_job, digest_headline, digest_line
from nomaflowd.routing import SLACK_DEFAULT
from nomaflowd.transports.base import HttpTransport, host_of, retry_after

DIGEST_LINES = 30  # a digest longer than this stops being read
COLOURS = {"failed": "#d00000", "long_run": "#f2c744", "succeeded": "#2eb67d",
           "recovered": "#2eb67d"}


def escape(text: str) -> str:
    """Slack's three control characters (https://api.slack.com/reference/surfaces/formatting)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# Kept as is by quote(): everything a URL needs, minus `|`, `<`, `>` and spaces.
_URL_SAFE = "/:?#[]@!$&'()*+,;=%~"
# Slack truncates or refuses very long messages; an alert must still get through.
MAX_PIECE = 1000


def link(url: str, label: str) -> str:
    """`<url|label>` that an event's run_id cannot break out of.

    Slack has no escape for `|` inside a link, so the URL is percent-encoded (which also
    covers `<`, `>`, spaces and quotes) before its `&` is escaped.
    """
    return f"<{escape(quote(url, safe=_URL_SAFE))}|{escape(label)}>"


def one_line(text: str) -> str:
    """Line breaks of any kind become spaces; over-long text is clipped (before escaping)."""
    text = " ".join(text.splitlines())
    return text if len(text) <= MAX_PIECE else text[:MAX_PIECE - 1] + "\u2026"


class Slack(HttpTransport):
    type = "slack"

    def default_recipient(self) -> str:
        return str(self.settings.get("default_channel") or SLACK_DEFAULT)

    def destination(self) -> str:
        return host_of(self.settings["webhook_url"].reveal())

    def text(self, alert: Alert) -> str:
        icon, pieces = alert.summary_parts()
        line = " \u00b7 ".join(escape(one_line(p)) for p in pieces)
        return f"{icon} {line}" + (f" {link(alert.url, alert.link_text)}" if alert.url else "")

    def render(self, alert: Alert, recipient: str) -> dict[str, Any]:
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
        colour = COLOURS.get(alert.kind)
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
                      ) -> dict[str, Any]:
        """One message: the headline, a line per job (worst first), capped for readability."""
        groups = digest_by_job(alerts)
        lines = [f":package: *{escape(digest_headline(alerts))}*"]
        for job, group in groups[:DIGEST_LINES]:
            icon, pieces = digest_line(job, group)
            line = " \u00b7 ".join(escape(one_line(p)) for p in pieces)
            latest = group[-1]
            if latest.url:
                line += f" {link(latest.url, latest.link_text)}"
            lines.append(f"{icon} {line}")
        if len(groups) > DIGEST_LINES:
            rest = groups[DIGEST_LINES:]
            lines.append(f"\u2026 and {len(rest)} more jobs"
                         f" ({sum(len(g) for _, g in rest)} alerts)")
        payload = self.render(alerts[0], recipient)
        payload["text"] = "\n".join(lines)
        worst = min(alerts, key=lambda a: SEVERITY.index(a.kind) if a.kind in SEVERITY else 99)
        payload.pop("attachments", None)
        if worst.kind in COLOURS:
            payload["attachments"] = [{"color": COLOURS[worst.kind],
                                       "fallback": digest_headline(alerts),
                                       "text": escape(digest_id)}]
        return payload

    def send_digest(self, alerts: list[Alert], recipient: str, digest_id: str) -> str:
        return self._post(self.render_digest(alerts, recipient, digest_id))

    def describe_refusal(self, status: int, data: bytes, headers: Any) -> str:
        token = data[:100].decode("utf-8", "replace").strip().splitlines()
        return f"HTTP {status}" + (f" {token[0]}" if token else "") + retry_after(status, headers)

    def send(self, alert: Alert, recipient: str) -> str:
        return self._post(self.render(alert, recipient))

    def _post(self, payload: dict[str, Any]) -> str:
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        status, data, headers = self.post(self.settings["webhook_url"].reveal(), body, {})
        if status == 200 and data.strip() == b"ok":
            return "HTTP 200 ok"
        raise self.refusal(status, data, headers)
