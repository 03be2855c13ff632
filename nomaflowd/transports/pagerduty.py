"""PagerDuty Events API v2: a failure triggers the job's incident, its recovery resolves it.

https://developer.pagerduty.com/docs/events-api-v2/trigger-events/
"""

from __future__ import annotations

import json
from typing import Any

from nomaflowd.alerts import Alert
from nomaflowd.incidents import clip, dedup_key, headline
from nomaflowd.transports.base import Rendered, retry_after
from nomaflowd.transports.incident import IncidentTransport

SEVERITIES = {"high": "error", "medium": "warning", "low": "info"}
SUMMARY_MAX = 1024           # PagerDuty truncates the summary at 1024 characters
DETAIL_MAX = 4000            # per custom_details text; the whole event must stay < 512 KB
LABEL_MAX = 1000             # the step and who triggered it: each text is clipped
TEST_KEY = "nomaflow/test"


def details(alert: Alert) -> dict[str, Any]:
    """What the responder wants next to the summary: the run, the step, the error."""
    out: dict[str, Any] = {"job_id": alert.job_id, "alert": alert.kind}
    for name, value in (("run_id", alert.run_id), ("state", alert.state),
                        ("started_at", alert.started_at), ("finished_at", alert.finished_at),
                        ("triggered_by", clip(alert.get("triggered_by"), LABEL_MAX)),
                        ("step", clip(alert.get("step"), LABEL_MAX)),
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


class PagerDuty(IncidentTransport):
    """`type = "webhook"`, `preset = "pagerduty"`: one incident per job, keyed nomaflow/<job>."""

    preset = "pagerduty"
    closed = "resolved"

    def event(self, alert: Alert, routing_key: str) -> dict[str, Any]:
        """The Events API v2 body (pure)."""
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

    def call(self, alert: Alert) -> Rendered:
        return self._enqueue(self.event(alert, self.settings["routing_key"].reveal()))

    def close_test(self) -> Rendered:
        return self._enqueue({"routing_key": self.settings["routing_key"].reveal(),
                              "event_action": "resolve", "dedup_key": TEST_KEY})

    def _enqueue(self, event: dict[str, Any]) -> Rendered:
        body = json.dumps(event, ensure_ascii=False).encode("utf-8")
        return self.request(body, what=f"{event['event_action']} {event['dedup_key']}")

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
        # The routing key in an echoed answer is masked by refusal() (transports.http_client).
        return " ".join(detail.split())[:500] + retry_after(status, headers)
