"""Transport classes by their `type` in nomaflowd.toml."""

from __future__ import annotations

from collections.abc import Mapping

from nomaflowd.config import TransportConfig
from nomaflowd.transports.base import DeliveryError, Transport, TransportError
from nomaflowd.transports.discord import Discord
from nomaflowd.transports.email import Email
from nomaflowd.transports.google_chat import GoogleChat
from nomaflowd.transports.opsgenie import Opsgenie
from nomaflowd.transports.pagerduty import PagerDuty
from nomaflowd.transports.slack import Slack
from nomaflowd.transports.slack_app import SlackApp
from nomaflowd.transports.teams import Teams
from nomaflowd.transports.webhook import Webhook

TRANSPORT_TYPES: dict[str, type[Transport]] = {"slack": Slack, "email": Email, "webhook": Webhook}
# A webhook with `preset = "..."` speaks that provider's API (config.PRESET_URLS).
PRESETS: dict[str, type[Transport]] = {"pagerduty": PagerDuty, "opsgenie": Opsgenie,
                                       "teams": Teams, "discord": Discord,
                                       "google_chat": GoogleChat}

__all__ = ["PRESETS", "TRANSPORT_TYPES", "DeliveryError", "Transport", "TransportError", "build",
           "transport_class"]


def build(configs: Mapping[str, TransportConfig], timeout: float) -> dict[str, Transport]:
    return {name: transport_class(c)(name, c.settings, timeout=timeout)
            for name, c in configs.items()}


def transport_class(c: TransportConfig) -> type[Transport]:
    if c.type == "slack" and c.settings.get("bot_token") is not None:
        return SlackApp  # app mode: the Web API instead of an incoming webhook
    preset = c.settings.get("preset") if c.type == "webhook" else None
    return PRESETS[preset] if preset else TRANSPORT_TYPES[c.type]
