"""Incident APIs (PagerDuty, Opsgenie): one incident per job, opened by a failure or a
long-run warning, closed by its recovery, sent one at a time and in order."""

from __future__ import annotations

from typing import ClassVar

from nomaflowd.alerts import Alert
from nomaflowd.incidents import INCIDENT_KINDS
from nomaflowd.transports.base import Rendered, TransportError
from nomaflowd.transports.webhook import Webhook


class IncidentTransport(Webhook):
    """`type = "webhook"` with an incident `preset`."""

    preset: ClassVar[str]
    closed: ClassVar[str]      # what closing is called there: "resolved", "closed"
    supports_digest = False    # an incident per job; a digest would merge several jobs' pages
    ordered = True             # a resolve/close never overtakes the trigger/create it ends

    def render(self, alert: Alert, recipient: str) -> Rendered:
        if alert.kind not in INCIDENT_KINDS and alert.kind != "test":
            raise TransportError(f"not sent: a {self.preset} transport takes failed, long-run"
                                 f" and recovered alerts, not {alert.kind}")
        return self.call(alert)

    def call(self, alert: Alert) -> Rendered:
        """The API call this alert makes (no I/O)."""
        raise NotImplementedError

    def close_test(self) -> Rendered:
        """The call that closes the Test button's incident."""
        raise NotImplementedError

    def send(self, alert: Alert, recipient: str) -> str:
        detail = self.deliver(self.render(alert, recipient))
        if alert.kind == "test":  # the Test button must not leave an incident open
            self.deliver(self.close_test())
            detail += f", {self.closed} at once"
        return detail
