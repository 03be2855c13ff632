"""Slack incoming webhooks: one line of text, a colour per alert kind, bare-string answers."""

from __future__ import annotations

import json
from typing import Any

from nomaflowd.alerts import Alert
from nomaflowd.routing import SLACK_DEFAULT
from nomaflowd.transports.base import DeliveryError, HttpTransport, host_of

COLOURS = {"failed": "#d00000", "long_run": "#f2c744", "succeeded": "#2eb67d"}


def escape(text: str) -> str:
    """Slack's three control characters (https://api.slack.com/reference/surfaces/formatting)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class Slack(HttpTransport):
    type = "slack"

    def default_recipient(self) -> str:
        return str(self.settings.get("default_channel") or SLACK_DEFAULT)

    def destination(self) -> str:
        return host_of(self.settings["webhook_url"].reveal())

    def text(self, alert: Alert) -> str:
        icon, pieces = alert.summary_parts()
        line = " \u00b7 ".join(escape(p.replace("\n", " ").replace("\r", " ")) for p in pieces)
        link = f" <{alert.url}|View run>" if alert.url else ""
        return f"{icon} {line}{link}"

    def render(self, alert: Alert, recipient: str) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "text": self.text(alert),
            "username": self.settings.get("username") or "Nomaflow",
            "icon_emoji": self.settings.get("icon_emoji") or ":gear:",
        }
        if recipient and recipient != SLACK_DEFAULT:
            payload["channel"] = recipient
        colour = COLOURS.get(alert.kind)
        if colour:
            facts = [f"job {alert.job_id}"]
            if alert.run_id:
                facts.append(f"run {alert.run_id}")
            if alert.get("triggered_by"):
                facts.append(f"triggered by {alert.get('triggered_by')}")
            payload["attachments"] = [{"color": colour, "fallback": payload["text"],
                                       "text": escape(" \u00b7 ".join(facts))}]
        return payload

    def describe_refusal(self, status: int, data: bytes, headers: Any) -> str:
        token = data[:100].decode("utf-8", "replace").strip().splitlines()
        detail = f"HTTP {status}" + (f" {token[0]}" if token else "")
        if status == 429:
            detail += f" (Retry-After {headers.get('Retry-After', '?')}s)"
        return detail

    def send(self, alert: Alert, recipient: str) -> str:
        body = json.dumps(self.render(alert, recipient), ensure_ascii=False).encode("utf-8")
        status, data, headers = self.post(self.settings["webhook_url"].reveal(), body, {})
        if status == 200 and data.strip() == b"ok":
            return "HTTP 200 ok"
        raise DeliveryError(self.describe_refusal(status, data, headers))
