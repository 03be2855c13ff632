"""Prometheus metrics and /healthz, served when `daemon.metrics_listen` is set."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from nomaflowd.errors import ConfigError

logger = logging.getLogger(__name__)

# The counters exist once enable() made them: prometheus_client is imported only by a daemon
# that serves metrics (daemon.metrics_listen), and counting is a no-op in one that does not.
NOTIFICATIONS: Any = None
SEND_SECONDS: Any = None
EVENTS: Any = None
REJECTED: Any = None
DIGESTS: Any = None
SCHEDULE_ALERTS: Any = None
_EVENT_CHILDREN: dict[str, Any] = {}


def enable() -> None:
    """Create the counters (once per process)."""
    global NOTIFICATIONS, SEND_SECONDS, EVENTS, REJECTED, DIGESTS, SCHEDULE_ALERTS
    if NOTIFICATIONS is not None:
        return
    from prometheus_client import Counter, Histogram

    NOTIFICATIONS = Counter("nomaflowd_notifications", "Delivery attempts by outcome",
                            ["transport", "transport_type", "alert", "outcome"])
    SEND_SECONDS = Histogram("nomaflowd_send_duration_seconds", "Time of one delivery attempt",
                             ["transport"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                                     1, 2.5, 5, 10, 30))
    EVENTS = Counter("nomaflowd_events_ingested", "Events recorded, by state", ["state"])
    REJECTED = Counter("nomaflowd_files_rejected", "Spool files moved to rejected/")
    DIGESTS = Counter("nomaflowd_digests_sent", "Digest messages sent", ["transport"])
    # One per alert raised (not per recipient, which NOTIFICATIONS counts), by this replica.
    SCHEDULE_ALERTS = Counter("nomaflowd_schedule_alerts",
                              "missed, stale and reminder alerts raised", ["alert"])


def count_schedule_alert(kind: str) -> None:
    if SCHEDULE_ALERTS is not None:
        SCHEDULE_ALERTS.labels(kind).inc()


def count_rejected() -> None:
    if REJECTED is not None:
        REJECTED.inc()


def count_digest(transport: str) -> None:
    if DIGESTS is not None:
        DIGESTS.labels(transport).inc()


def count_event(state: str) -> None:
    """EVENTS.labels(state).inc(), with the child looked up once (it is on the ingest path)."""
    if EVENTS is None:
        return
    child = _EVENT_CHILDREN.get(state)
    if child is None:
        child = _EVENT_CHILDREN[state] = EVENTS.labels(state)
    child.inc()


def observe_result(result: Any) -> None:
    if NOTIFICATIONS is None:
        return
    a = result.attempt
    NOTIFICATIONS.labels(a.transport or "-", result.transport_type or "-", a.alert.kind,
                         result.outcome).inc()
    SEND_SECONDS.labels(a.transport or "-").observe(result.duration_ms / 1000)


class Live:
    """Gauges read at scrape time from the running daemon (a prometheus_client collector)."""

    def __init__(self, source: Callable[[], dict[str, float]]) -> None:
        self.source = source

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        try:
            values = self.source()
        except Exception:  # a scrape must still answer with the counters
            logger.warning("metrics: live gauges unavailable", exc_info=True)
            return
        for name, help_text in (
            ("spool_backlog", "Spool files seen but not yet ingested"),
            ("running_runs", "Runs in state RUNNING"),
            ("alerts_waiting", "Alerts waiting for pacing"),
            ("newest_event_age_seconds", "Seconds since the newest event was received"),
        ):
            if name in values:
                yield GaugeMetricFamily(f"nomaflowd_{name}", help_text, value=values[name])


class MetricsServer:
    def __init__(self, address: tuple[str, int], gauges: Callable[[], dict[str, float]],
                 unhealthy: Callable[[], str]) -> None:
        from http.server import BaseHTTPRequestHandler

        from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

        from nomaflowd.serving import Server

        enable()
        self.registry = REGISTRY
        self.collector = Live(gauges)
        REGISTRY.register(self.collector)

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                try:
                    if path == "/metrics":
                        body, status, kind = generate_latest(REGISTRY), 200, CONTENT_TYPE_LATEST
                    elif path == "/healthz":
                        why = unhealthy()  # "" when healthy
                        body = f"{why or 'ok'}\n".encode()
                        status, kind = (503 if why else 200), "text/plain"
                    else:
                        body, status, kind = b"not found\n", 404, "text/plain"
                except Exception:  # a scraper gets an answer it can alert on, never a reset
                    logger.exception("metrics: GET %s failed", path)
                    body, status, kind = b"unavailable; see the daemon's log\n", 503, "text/plain"
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # scrapes are not news

        try:
            # A scrape takes milliseconds: 10 s for the whole connection, 16 at once.
            self.server = Server("metrics", address, Handler, max_connections=16,
                                 connection_seconds=10)
        except OSError as exc:
            self.registry.unregister(self.collector)
            raise ConfigError(f"daemon.metrics_listen {address[0]}:{address[1]}: cannot listen"
                              f" ({exc.strerror or exc}); pick another address or port"
                              ) from None
        self.thread = threading.Thread(target=self.server.serve_forever, name="metrics",
                                       daemon=True)
        self.thread.start()
        host, port = str(self.server.server_address[0]), int(self.server.server_address[1])
        self.url = f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"
        logger.info("metrics listening on %smetrics", self.url)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.registry.unregister(self.collector)

