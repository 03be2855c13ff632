"""Chat platforms behind a webhook preset (Teams, Discord, Google Chat): each speaks its own
message shape; what they share is here: the facts of an alert, digest lines packed into as
many messages as the platform's limits need, and reading a JSON error answer."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, ClassVar

from nomaflowd.alerts import SEVERITY, Alert, digest_by_job, digest_headline, digest_line
from nomaflowd.transports.base import Rendered, retry_after
from nomaflowd.transports.webhook import Webhook

DIGEST_LINES = 30     # jobs with a full line in a digest (as Slack's); the rest: `job xN`
COMPACT_WIDTH = 400   # characters of `job xN` (a times sign) entries on one digest line
MAX_PIECE = 1000      # an event's text (an error) is clipped to this in one line
HEAD_ROOM = 200       # for a digest part's first line: the headline or "… continued"


def one_line(text: str, limit: int = MAX_PIECE) -> str:
    """Line breaks of any kind become spaces; over-long text is clipped."""
    text = " ".join(text.splitlines())
    return text if len(text) <= limit else text[:limit - 1] + "\u2026"


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "\u2026"


def facts(alert: Alert) -> list[tuple[str, str]]:
    """(label, value) pairs a chat card shows beside the summary: job, run, step, error."""
    out = [("Job", alert.job_id)] if alert.job_id else []
    for label, value in (("Run", alert.run_id or ""), ("Step", alert.get("step")),
                         ("Error", alert.get("error")),
                         ("Triggered by", alert.get("triggered_by"))):
        if value:
            out.append((label, one_line(value)))
    return out


def worst(alerts: list[Alert]) -> Alert:
    return min(alerts, key=lambda a: SEVERITY.index(a.kind) if a.kind in SEVERITY else 99)


def colour_int(colour: str | None) -> int | None:
    """`#d00000` -> 0xd00000 (Discord's embed colour is an integer)."""
    if not colour:
        return None
    try:
        return int(colour.lstrip("#"), 16)
    except ValueError:
        return None


def json_error(data: bytes) -> str:
    """The words of a JSON error answer: Google's and Teams' `{"error": {"code", "message",
    "status"}}`, Discord's `{"message", "code"}`, Mattermost's `{"id", "message"}`; else ""."""
    try:
        doc = json.loads(data)
    except ValueError:
        return ""
    if not isinstance(doc, dict):
        return ""
    inner = doc.get("error")
    if isinstance(inner, dict):
        doc = inner
    elif isinstance(inner, str) and not doc.get("message"):
        return inner
    words = [str(doc[k]) for k in ("status", "code", "id", "message") if doc.get(k)]
    return " ".join(" ".join(words).split())[:300]


def compact_lines(groups: list[tuple[str, list[Alert]]], escape: Any) -> list[str]:
    """`job-a x7 · job-b · job-c x3` (a times sign for x), wrapped at COMPACT_WIDTH."""
    lines: list[str] = []
    line = ""
    for job, group in groups:
        entry = escape(one_line(job)) + (f" \u00d7{len(group)}" if len(group) > 1 else "")
        if line and len(line) + 3 + len(entry) > COMPACT_WIDTH:
            lines.append(line)
            line = ""
        line = f"{line} \u00b7 {entry}" if line else entry
    if line:
        lines.append(line)
    return lines


def pack(lines: list[str], budget: int, measure: Callable[[str], int] = len
         ) -> list[list[str]]:
    """Whole lines into as few parts as fit `budget` each, a line costing measure(line) + 1
    (characters by default)."""
    parts: list[list[str]] = [[]]
    size = 0
    for line in lines:
        cost = 1 + measure(line)
        if parts[-1] and size + cost > budget:
            parts.append([])
            size = 0
        parts[-1].append(line)
        size += cost
    return parts


class ChatPreset(Webhook):
    """`type = "webhook"` with a chat `preset`: the platform's body instead of ours.

    body_template is not applied (check says so); headers and signing_secret still are.
    """

    preset: ClassVar[str]
    digest_budget: ClassVar[int]  # digest lines in one message, as measure_line() counts

    @staticmethod
    def measure_line(line: str) -> int:
        """What a digest line costs of digest_budget: characters (Teams: bytes)."""
        return len(line)

    def escape(self, text: str) -> str:
        """Event text made inert in the platform's markup."""
        return text

    def link(self, url: str, label: str) -> str:
        """A link in the platform's markup (digest lines)."""
        return f"{label}: {url}"

    def message(self, alert: Alert) -> dict[str, Any]:
        """The platform's body for one alert (pure)."""
        raise NotImplementedError

    def digest_message(self, head: str, lines: list[str], worst: Alert, digest_id: str
                       ) -> dict[str, Any]:
        """The platform's body for one part of a digest (pure)."""
        raise NotImplementedError

    def endpoint_url(self, threaded: bool) -> str:
        """Where it posts (the secret URL, maybe with the platform's query options)."""
        return self.endpoint()

    def post_json(self, body: dict[str, Any], threaded: bool = False, what: str = ""
                  ) -> Rendered:
        raw = json.dumps(body, ensure_ascii=False).encode("utf-8")
        return self.request(raw, self.endpoint_url(threaded), what)

    def render(self, alert: Alert, recipient: str) -> Rendered:
        return self.post_json(self.message(alert), threaded=True)

    def summary(self, alert: Alert) -> str:
        """The one-line summary, event text escaped."""
        icon, pieces = alert.summary_parts()
        return f"{icon} " + " \u00b7 ".join(self.escape(one_line(p)) for p in pieces)

    def job_line(self, job: str, group: list[Alert]) -> str:
        icon, pieces = digest_line(job, group)
        line = f"{icon} " + " \u00b7 ".join(self.escape(one_line(p)) for p in pieces)
        latest = group[-1]
        return line + (f" {self.link(latest.url, latest.link_text)}" if latest.url else "")

    def render_digest(self, alerts: list[Alert], recipient: str, digest_id: str
                      ) -> list[Rendered]:
        """Messages that name every job: a full line for the first DIGEST_LINES jobs (worst
        first), `job xN` for the rest; what does not fit one message goes on in another."""
        groups = digest_by_job(alerts)
        lines = [self.job_line(job, group) for job, group in groups[:DIGEST_LINES]]
        rest = groups[DIGEST_LINES:]
        if rest:
            lines.append(f"{len(rest)} more jobs ({sum(len(g) for _, g in rest)} alerts):")
            lines += compact_lines(rest, self.escape)
        parts = pack(lines, self.digest_budget - HEAD_ROOM, self.measure_line)
        headline = digest_headline(alerts)
        out = []
        for k, part in enumerate(parts, 1):
            of = f" (part {k} of {len(parts)})" if len(parts) > 1 else ""
            # Only the first part states the count, so the parts never add up to more.
            head = (headline if k == 1 else f"{digest_id} continued") + of
            out.append(self.post_json(self.digest_message(head, part, worst(alerts), digest_id)))
        return out

    def describe_refusal(self, status: int, data: bytes, headers: Any) -> str:
        words = json_error(data)
        if not words:
            return super().describe_refusal(status, data, headers)
        return f"HTTP {status} {words}" + retry_after(status, headers)
