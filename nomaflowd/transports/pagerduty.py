"""PagerDuty Events API v2: a failure triggers the job's incident, its recovery resolves it.

https://developer.pagerduty.com/docs/events-api-v2/trigger-events/
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from nomaflowd.alerts import Alert
from nomaflowd.incidents import INCIDENT_KINDS, clip, dedup_key, headline
from nomaflowd.transports.base import MASK, TransportError, retry_after
from nomaflowd.transports.webhook import Webhook

SEVERITIES = {"high": "error", "medium": "warning", "low": "info"}
SUMMARY_MAX = 1024           # PagerDuty truncates the summary at 1024 characters
DETAIL_MAX = 4000            # per custom_details text; the whole event must stay < 512 KB
TEST_KEY = "nomaflow/test"


def details(alert: Alert) -> dict[str, Any]:
    """What the responder wants next to the summary: the run, the step, the error."""
    out: dict[str, Any] = {"job_id": alert.job_id, "alert": alert.kind}
    for name, value in (("run_id", alert.run_id), ("state", alert.state),
                        ("started_at", alert.started_at), ("finished_at", alert.finished_at),
                        ("triggered_by", alert.get("triggered_by")), ("step", alert.get("step")),
                        ("error", clip(alert.get("error"), DETAIL_MAX))):
        if value:
            out[name] = value
    if alert.get("traceback"):
        out["traceback"] = clip(alert.get("traceback"), DETAIL_MAX, tail=True)
    if alert.kind == "long_run" and alert.minutes is not None:
        out["running_minutes"] = round(alert.minutes, 1)
        if alert.usual_minutes is not None:
            out["usual_minutes"] = round(alert.usual_minutes, 1)
    return out


class PagerDuty(Webhook):
    """`type = "webhook"`, `preset = "pagerduty"`: one incident per job, keyed nomaflow/<job>."""

    preset: ClassVar[str] = "pagerduty"
    supports_digest = False  # an incident per job; a digest would merge several jobs' pages
    ordered = True  # a resolve/close never overtakes the trigger/create it ends

    def event(self, alert: Alert, routing_key: str) -> dict[str, Any]:
        """The Events API v2 body (pure)."""
        if alert.kind not in INCIDENT_KINDS and alert.kind != "test":
            raise TransportError(f"not sent: a pagerduty transport takes failed, long-run and"
                                 f" recovered alerts, not {alert.kind}")
        key = TEST_KEY if alert.kind == "test" else dedup_key(alert.job_id)
        if alert.kind == "recovered":
            return {"routing_key": routing_key, "event_action": "resolve", "dedup_key": key}
        payload: dict[str, Any] = {
            "summary": headline(alert, SUMMARY_MAX),
            "source": f"nomaflow:{alert.job_id}" if alert.job_id else "nomaflow",
            "severity": SEVERITIES[alert.level],
            "component": alert.job_id or "nomaflowd",
            "class": alert.kind,
            "custom_details": details(alert),
        }
        when = alert.finished_at or alert.started_at
        if when:
            payload["timestamp"] = when
        body: dict[str, Any] = {"routing_key": routing_key, "event_action": "trigger",
                                "dedup_key": key, "payload": payload, "client": "Nomaflow"}
        if alert.url:
            body["links"] = [{"href": alert.url, "text": alert.link_text}]
        return body

    def render(self, alert: Alert, recipient: str) -> dict[str, Any]:
        """The body as sent, routing key masked (for `explain`)."""
        return {"request": "POST (Events API v2)",
                "body": json.dumps(self.event(alert, MASK), ensure_ascii=False, indent=2)}

    def send(self, alert: Alert, recipient: str) -> str:
        routing_key = self.settings["routing_key"].reveal()
        detail = self._enqueue(self.event(alert, routing_key))
        if alert.kind == "test":  # the Test button must not leave an incident open
            self._enqueue({"routing_key": routing_key, "event_action": "resolve",
                           "dedup_key": TEST_KEY})
            detail += ", resolved at once"
        return detail

    def _enqueue(self, event: dict[str, Any]) -> str:
        body = json.dumps(event, ensure_ascii=False).encode("utf-8")
        status, data, headers = self.post(self.settings["url"].reveal(), body,
                                          self.signed_headers(body))
        if 200 <= status < 300:
            return f"HTTP {status} {event['event_action']} {event['dedup_key']}"
        raise self.refusal(status, data, headers)

    def describe_refusal(self, status: int, data: bytes, headers: Any) -> str:
        """`HTTP 400 invalid event: Event object is invalid: Length of 'routing_key' ...`."""
        try:
            doc = json.loads(data)
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            return super().describe_refusal(status, data, headers)
        errors = doc.get("errors")
        parts = [str(doc[k]) for k in ("status", "message") if doc.get(k)]
        if isinstance(errors, list) and errors:
            parts.append("; ".join(str(e) for e in errors))
        detail = f"HTTP {status}" + (f" {': '.join(parts)}" if parts else "")
        # The routing key in an echoed answer is masked by refusal() (transports.base).
        return " ".join(detail.split())[:500] + retry_after(status, headers)
