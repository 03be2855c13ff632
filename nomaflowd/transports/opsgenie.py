"""Opsgenie Alert API: a failure creates the job's alert, its recovery closes it by alias.

https://docs.opsgenie.com/docs/alert-api
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from nomaflowd.alerts import Alert
from nomaflowd.incidents import clip, dedup_key, headline
from nomaflowd.transports.base import Rendered, retry_after
from nomaflowd.transports.incident import IncidentTransport

# P1 is left to outages the operator declares; a failed job pages as P2 (PagerDuty: error,
# one below critical), a long-run warning is P3, and the Test button P5.
PRIORITIES = {"high": "P2", "medium": "P3", "low": "P5"}
MESSAGE_MAX = 130            # Opsgenie's limit for `message`
DESCRIPTION_MAX = 15000
DETAIL_MAX = 1000            # `details` is limited to 8000 characters in all
NOTE_MAX = 25000
TEST_ALIAS = "nomaflow/test"


class Opsgenie(IncidentTransport):
    """`type = "webhook"`, `preset = "opsgenie"`: one alert per job, aliased nomaflow/<job>."""

    preset = "opsgenie"
    closed = "closed"

    def base(self) -> str:
        """The API root: `url` may be given as https://api.eu.opsgenie.com or …/v2/alerts."""
        url = str(self.settings["url"].reveal()).rstrip("/")
        return url[:-len("/v2/alerts")] if url.endswith("/v2/alerts") else url

    def api_call(self, alert: Alert) -> tuple[str, dict[str, Any]]:
        """(path, body) of the call this alert makes (pure)."""
        alias = TEST_ALIAS if alert.kind == "test" else dedup_key(alert.job_id)
        if alert.kind == "recovered":
            return close_path(alias), {"source": "Nomaflow", "note": headline(alert, NOTE_MAX)}
        description = [headline(alert, 2000)]
        if alert.get("traceback"):
            description.append(clip(alert.get("traceback"), DESCRIPTION_MAX - 3000, tail=True))
        if alert.url:
            description.append(f"{alert.link_text}: {alert.url}")
        detail_values = {"job_id": alert.job_id, "run_id": alert.run_id, "alert": alert.kind,
                         "state": alert.state, "step": alert.get("step"),
                         "error": alert.get("error"), "triggered_by": alert.get("triggered_by"),
                         "started_at": alert.started_at, "finished_at": alert.finished_at,
                         "url": alert.url}
        body: dict[str, Any] = {
            "message": headline(alert, MESSAGE_MAX),
            "alias": alias,
            "description": clip("\n\n".join(description), DESCRIPTION_MAX),
            "details": {k: clip(v, DETAIL_MAX) for k, v in detail_values.items() if v},
            "entity": alert.job_id or "nomaflowd",
            "source": "Nomaflow",
            "priority": PRIORITIES[alert.level],
        }
        return "/v2/alerts", body

    def call(self, alert: Alert) -> Rendered:
        path, body = self.api_call(alert)
        alias = TEST_ALIAS if alert.kind == "test" else dedup_key(alert.job_id)
        action = "close" if alert.kind == "recovered" else "create"
        return self._request(path, body, f"{action} {alias}")

    def close_test(self) -> Rendered:
        return self._request(close_path(TEST_ALIAS), {"source": "Nomaflow", "note": "test"},
                             "close")

    def _request(self, path: str, body: dict[str, Any], what: str) -> Rendered:
        raw = json.dumps(body, ensure_ascii=False).encode("utf-8")
        headers = {**self.signed_headers(raw),
                   "Authorization": f"GenieKey {self.settings['api_key'].reveal()}"}
        return Rendered(self.base() + path, raw, headers, what)

    def accept(self, status: int, data: bytes, headers: Any, request: Rendered) -> str:
        return super().accept(status, data, headers, request) + _request_id(data)

    def describe_refusal(self, status: int, data: bytes, headers: Any) -> str:
        """`HTTP 422 Request body is not processable. Please check the errors. (…)`."""
        try:
            doc = json.loads(data)
        except ValueError:
            doc = None
        if not isinstance(doc, dict) or not doc.get("message"):
            return super().describe_refusal(status, data, headers)
        detail = f"HTTP {status} {doc['message']}"
        errors = doc.get("errors")
        if isinstance(errors, dict) and errors:
            detail += ": " + "; ".join(f"{k}: {v}" for k, v in errors.items())
        return " ".join(detail.split())[:500] + _request_id(data) + retry_after(status, headers)


def close_path(alias: str) -> str:
    """Close by alias; the alias holds a `/`, so it is percent-encoded in the path."""
    return f"/v2/alerts/{quote(alias, safe='')}/close?identifierType=alias"


def _request_id(data: bytes) -> str:
    """Opsgenie's requestId, which its support asks for."""
    try:
        doc = json.loads(data)
    except ValueError:
        return ""
    rid = doc.get("requestId") if isinstance(doc, dict) else None
    return f" (requestId {str(rid)[:64]})" if rid else ""
