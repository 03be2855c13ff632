"""Transport classes by their `type` in nomaflowd.toml, imported when a config uses one."""

from __future__ import annotations

import importlib
from collections.abc import Mapping

from nomaflowd.config import TransportConfig
from nomaflowd.transports.base import DeliveryError, Transport, TransportError

# "module:Class" in this package. A sidecar imports only the transports its config names:
# smtplib and the presets' modules are idle RSS on every host that does not use them.
TRANSPORT_TYPES: dict[str, str] = {"slack": "slack:Slack", "email": "email:Email",
                                   "webhook": "webhook:Webhook"}
# A webhook with `preset = "..."` speaks that provider's API (config.PRESET_URLS).
PRESETS: dict[str, str] = {"pagerduty": "pagerduty:PagerDuty", "opsgenie": "opsgenie:Opsgenie",
                           "teams": "teams:Teams", "discord": "discord:Discord",
                           "google_chat": "google_chat:GoogleChat"}
SLACK_APP = "slack_app:SlackApp"  # slack with a bot_token: the Web API, not a webhook

__all__ = ["PRESETS", "TRANSPORT_TYPES", "DeliveryError", "Transport", "TransportError", "build",
           "transport_class"]


def build(configs: Mapping[str, TransportConfig], timeout: float) -> dict[str, Transport]:
    return {name: transport_class(c)(name, c.settings, timeout=timeout)
            for name, c in configs.items()}


def transport_class(c: TransportConfig) -> type[Transport]:
    """The class for one [transports.X] section, its module imported on first use."""
    if c.type == "slack" and c.settings.get("bot_token") is not None:
        where = SLACK_APP
    else:
        preset = c.settings.get("preset") if c.type == "webhook" else None
        where = PRESETS[preset] if preset else TRANSPORT_TYPES[c.type]
    module, _, name = where.partition(":")
    cls: type[Transport] = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    return cls
