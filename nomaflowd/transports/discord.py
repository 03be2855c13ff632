"""Discord channel webhooks: a line of content and an embed with the state colour and run link.

https://discord.com/developers/docs/resources/webhook#execute-webhook
https://discord.com/developers/docs/resources/message#embed-object-embed-limits
https://discord.com/developers/docs/topics/rate-limits#exceeding-a-rate-limit
"""

from __future__ import annotations

import json
import re
from typing import Any

from nomaflowd.alerts import Alert
from nomaflowd.transports.base import DeliveryError, RateLimited, retry_after
from nomaflowd.transports.chat import ChatPreset, clip, colour_int, facts, json_error

CONTENT_MAX = 2000        # Discord's limits: message content,
TITLE_MAX = 256           # embed title,
FACTS_ROOM = 500  # characters the facts keep beside the run's link
DESCRIPTION_MAX = 4096    # embed description (and 6000 characters across a message's embeds)
USERNAME = "Nomaflow"
# Event text must not ping anyone: no @everyone, @here, role or user mention is parsed.
NO_MENTIONS: dict[str, Any] = {"parse": []}
_MARKDOWN = re.compile(r"([\\*_~`|\[\]>])")


class Discord(ChatPreset):
    """`type = "webhook"`, `preset = "discord"`."""

    preset = "discord"
    digest_budget = 4000

    def escape(self, text: str) -> str:
        """Discord's markdown characters, backslash-escaped."""
        return _MARKDOWN.sub(r"\\\1", text)

    def link(self, url: str, label: str) -> str:
        return f"[{label}]({url})"

    def message(self, alert: Alert) -> dict[str, Any]:
        summary = self.summary(alert)
        lines = [f"**{label}** {self.escape(value)}" for label, value in facts(alert)
                 if label != "Job"]
        # The facts are clipped, not the run's link after them (one too long to leave them
        # room is left to the title, which links the run too).
        link = "\n" + self.link(alert.url, alert.link_text) if alert.url else ""
        if DESCRIPTION_MAX - len(link) < FACTS_ROOM:
            link = ""
        embed: dict[str, Any] = {
            "title": clip(f"{alert.subject_word} {alert.job_id}".strip(), TITLE_MAX),
            "description": clip("\n".join(lines) or summary, DESCRIPTION_MAX - len(link))
                           + link,
        }
        if alert.url:
            embed["url"] = alert.url
        colour = colour_int(alert.colour)
        if colour is not None:
            embed["color"] = colour
        return {"username": USERNAME, "content": clip(summary, CONTENT_MAX), "embeds": [embed],
                "allowed_mentions": NO_MENTIONS}

    def digest_message(self, head: str, lines: list[str], worst: Alert, digest_id: str
                       ) -> dict[str, Any]:
        embed: dict[str, Any] = {"title": clip(digest_id, TITLE_MAX),
                                 "description": clip("\n".join(lines), DESCRIPTION_MAX)}
        colour = colour_int(worst.colour)
        if colour is not None:
            embed["color"] = colour
        return {"username": USERNAME, "content": clip(f"\U0001f4e6 **{head}**", CONTENT_MAX),
                "embeds": [embed], "allowed_mentions": NO_MENTIONS}

    def refusal(self, status: int, data: bytes, headers: Any) -> DeliveryError:
        """A 429 waits what the JSON body's `retry_after` says (seconds, with a fraction),
        else what the Retry-After header says."""
        exc = super().refusal(status, data, headers)
        wait = _retry_after(data)
        if isinstance(exc, RateLimited) and wait is not None:
            exc.retry_after = wait
        return exc

    def describe_refusal(self, status: int, data: bytes, headers: Any) -> str:
        """`HTTP 404 10015 Unknown Webhook`; a 429 says how long Discord wants us to wait."""
        words = json_error(data)
        if not words:
            return super().describe_refusal(status, data, headers)
        wait = _retry_after(data) if status == 429 else None
        detail = f"HTTP {status} {words}"
        if wait is not None:
            return detail + f" (retry_after {wait:g}s)"
        return detail + retry_after(status, headers)


def _retry_after(data: bytes) -> float | None:
    try:
        doc = json.loads(data)
    except ValueError:
        return None
    value = doc.get("retry_after") if isinstance(doc, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return min(max(float(value), 0.0), 3600.0)
