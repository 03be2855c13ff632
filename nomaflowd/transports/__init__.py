"""Transport classes by their `type` in nomaflowd.toml."""

from __future__ import annotations

from collections.abc import Mapping

from nomaflowd.config import TransportConfig
from nomaflowd.transports.base import DeliveryError, Transport, TransportError
from nomaflowd.transports.email import Email
from nomaflowd.transports.slack import Slack
from nomaflowd.transports.webhook import Webhook

TRANSPORT_TYPES: dict[str, type[Transport]] = {"slack": Slack, "email": Email, "webhook": Webhook}

__all__ = ["TRANSPORT_TYPES", "DeliveryError", "Transport", "TransportError", "build"]


def build(configs: Mapping[str, TransportConfig], timeout: float) -> dict[str, Transport]:
    return {name: TRANSPORT_TYPES[c.type](name, c.settings, timeout=timeout)
            for name, c in configs.items()}
