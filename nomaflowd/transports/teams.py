"""Microsoft Teams through a Workflows webhook ("post to a channel when a webhook request is
received"): a message whose attachment is an Adaptive Card.

https://learn.microsoft.com/en-us/microsoftteams/platform/webhooks-and-connectors/how-to/add-incoming-webhook
https://adaptivecards.io/explorer/
"""

from __future__ import annotations

import json
import re
from typing import Any

from nomaflowd.alerts import Alert
from nomaflowd.transports.chat import ChatPreset, clip, facts

CARD = "application/vnd.microsoft.card.adaptive"
SCHEMA = "http://adaptivecards.io/schemas/adaptive-card.json"
VERSION = "1.4"               # what Teams renders (1.5 on desktop only)
# Teams refuses a message over about 28 KB of UTF-8 JSON. A digest part's lines are
# counted in the bytes they take in the card (a CJK character is 3, an emoji 4: counted in
# characters, 30 jobs with Japanese errors made 30,754 bytes), and a card is shrunk to fit.
MESSAGE_MAX = 26_000
DIGEST_BUDGET = 20_000
TEXT_BLOCK = len(b'{"type": "TextBlock", "text": "", "wrap": true, "spacing": "None"}, ')
FACT_MAX = 1000
# Control characters show as nothing and cost six bytes of JSON each (\u0001).
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]+")
# Card text is Markdown (bold, italic, lists, links): event text gets the characters that
# make markup backslash-escaped, as CommonMark allows for any punctuation; `_` only at a
# word's edge (`run_a8c4d` is no emphasis, and reads the same in any renderer).
_MARKDOWN = re.compile(r"([\\*~`\[\]()<>#|]|(?<!\w)_|_(?!\w))")


def style(colour: str | None) -> str:
    """Adaptive Cards have no hex colours: the nearest of their named ones.

    Red-ish -> attention, yellow-ish -> warning, green-ish -> good, none -> default.
    """
    if not colour:
        return "default"
    try:
        value = int(colour.lstrip("#"), 16)
    except ValueError:
        return "default"
    r, g, b = value >> 16 & 255, value >> 8 & 255, value & 255
    if g > r and g > b:
        return "good"
    if r > 150 and g > 120 and b < r / 2:
        return "warning"
    if r > g and r > b:
        return "attention"
    return "default"


def card(body: list[dict[str, Any]], actions: list[dict[str, Any]]) -> dict[str, Any]:
    """The Workflows webhook's message: one Adaptive Card attachment."""
    content: dict[str, Any] = {"$schema": SCHEMA, "type": "AdaptiveCard", "version": VERSION,
                               "msteams": {"width": "Full"}, "body": body}
    if actions:
        content["actions"] = actions
    return {"type": "message",
            "attachments": [{"contentType": CARD, "contentUrl": None, "content": content}]}


def headline_block(text: str, colour: str | None) -> dict[str, Any]:
    """The summary in a container of the state's colour (a coloured band in Teams)."""
    tone = style(colour)
    block: dict[str, Any] = {"type": "TextBlock", "text": text, "wrap": True,
                             "weight": "Bolder", "size": "Medium"}
    if tone != "default":
        block["color"] = tone
    return {"type": "Container", "style": tone if tone != "default" else "emphasis",
            "bleed": True, "items": [block]}


class Teams(ChatPreset):
    """`type = "webhook"`, `preset = "teams"`: an Adaptive Card per alert."""

    preset = "teams"
    digest_budget = DIGEST_BUDGET

    def escape(self, text: str) -> str:
        return _MARKDOWN.sub(r"\\\1", _CONTROL.sub("\ufffd", text))

    @staticmethod
    def measure_line(line: str) -> int:
        return TEXT_BLOCK + len(json.dumps(line, ensure_ascii=False).encode())

    def link(self, url: str, label: str) -> str:
        return f"[{label}]({url})"

    def message(self, alert: Alert) -> dict[str, Any]:
        actions = ([{"type": "Action.OpenUrl", "title": alert.link_text, "url": alert.url}]
                   if alert.url else [])
        most = FACT_MAX
        while True:  # the facts shorter until the card fits (wide characters cost more)
            body = [headline_block(self.summary(alert), alert.colour)]
            shown = [{"title": label, "value": self.escape(clip(value, most))}
                     for label, value in facts(alert)]
            if shown:
                body.append({"type": "FactSet", "facts": shown})
            message = card(body, actions)
            if most <= 100 or len(json.dumps(message, ensure_ascii=False).encode()) \
                    <= MESSAGE_MAX:
                return message
            most //= 2

    def digest_message(self, head: str, lines: list[str], worst: Alert, digest_id: str
                       ) -> dict[str, Any]:
        body = [headline_block(f"\U0001f4e6 {head}", worst.colour)]
        body += [{"type": "TextBlock", "text": line, "wrap": True, "spacing": "None"}
                 for line in lines]
        body.append({"type": "TextBlock", "text": digest_id, "isSubtle": True, "size": "Small"})
        return card(body, [])
