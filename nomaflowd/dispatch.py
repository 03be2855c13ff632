"""Dispatcher: one small executor per transport; the one place that records an attempt."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime

from nomaflowd import db
from nomaflowd.alerts import Alert
from nomaflowd.transports import DeliveryError, Transport, TransportError

logger = logging.getLogger(__name__)

SENT, FAILED_TRANSPORT, FAILED_DELIVERY = "SENT", "FAILED_TRANSPORT", "FAILED_DELIVERY"
WORKERS_PER_TRANSPORT = 4


def utcnow() -> datetime:
    return datetime.utcnow()  # noqa: DTZ003 - the database stores naive UTC


@dataclass(frozen=True)
class Attempt:
    """One (alert, transport, recipient) to try once."""

    alert: Alert
    transport: str
    recipient: str
    delivery_id: int | None = None
    error: str = ""      # set when routing found no transport: recorded without sending
    note: str = ""       # prefixed to the detail (e.g. "sent again after a restart")


@dataclass(frozen=True)
class Result:
    attempt: Attempt
    transport_type: str
    outcome: str
    detail: str
    duration_ms: int
    created_at: datetime


class Dispatcher:
    def __init__(self, transports: Mapping[str, Transport], replica: str,
                 wake: Callable[[], None] = lambda: None) -> None:
        self.replica = replica
        self.wake = wake
        self.results: queue.SimpleQueue[Result] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._inflight = 0
        self._idle = threading.Condition(self._lock)
        self.transports: dict[str, Transport] = {}
        self.executors: dict[str, ThreadPoolExecutor] = {}
        self.configure(transports)

    def configure(self, transports: Mapping[str, Transport]) -> None:
        """Swap in new transports; sends already in flight finish on the old ones."""
        old = self.executors
        self.transports = dict(transports)
        self.executors = {
            name: ThreadPoolExecutor(WORKERS_PER_TRANSPORT, thread_name_prefix=f"send-{name}")
            for name in self.transports
        }
        for executor in old.values():
            executor.shutdown(wait=False)

    @property
    def inflight(self) -> int:
        return self._inflight

    def submit(self, attempt: Attempt) -> None:
        """Queue one attempt on its transport's executor (or record it at once if it has none)."""
        with self._lock:
            self._inflight += 1
        executor = self.executors.get(attempt.transport)
        if executor is None or attempt.error:
            self._finish(self.attempt(attempt))
        else:
            executor.submit(self._run, attempt)

    def _run(self, attempt: Attempt) -> None:
        self._finish(self.attempt(attempt))

    def _finish(self, result: Result) -> None:
        self.results.put(result)
        with self._lock:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.notify_all()
        self.wake()

    def attempt(self, attempt: Attempt) -> Result:
        """Send once, now, on this thread, and turn the verdict into an outcome."""
        transport = self.transports.get(attempt.transport)
        started = time.monotonic()
        kind = transport.type if transport else ""
        if attempt.error or transport is None:
            outcome = FAILED_TRANSPORT
            detail = attempt.error or f"no transport named {attempt.transport!r} is configured"
        else:
            try:
                outcome, detail = SENT, transport.send(attempt.alert, attempt.recipient)
            except DeliveryError as exc:
                outcome, detail = FAILED_DELIVERY, str(exc)
            except TransportError as exc:
                outcome, detail = FAILED_TRANSPORT, str(exc)
            except Exception as exc:  # a buggy transport must not sink the others
                logger.exception("transport %s raised unexpectedly", attempt.transport)
                outcome, detail = FAILED_TRANSPORT, f"internal error: {type(exc).__name__}"
        if attempt.note:
            detail = f"{attempt.note}; {detail}"
        return Result(attempt, kind, outcome, detail,
                      int((time.monotonic() - started) * 1000), utcnow())

    def drain(self) -> list[Result]:
        results = []
        while True:
            try:
                results.append(self.results.get_nowait())
            except queue.Empty:
                return results

    def record(self, results: list[Result]) -> None:
        """One audit row and one `notification` log line per attempt; claims marked done."""
        if not results:
            return
        rows = []
        for r in results:
            a = r.attempt
            rows.append({
                "created_at": r.created_at, "event_id": a.alert.event_id,
                "job_id": a.alert.job_id or None, "run_id": a.alert.run_id,
                "alert": a.alert.kind, "level": a.alert.level,
                "transport": a.transport, "transport_type": r.transport_type,
                "recipient": a.recipient, "outcome": r.outcome, "detail": r.detail[:1000],
                "duration_ms": r.duration_ms, "replica": self.replica,
            })
        done = [r.attempt.delivery_id for r in results if r.attempt.delivery_id is not None]
        with db.proxy.atomic():
            for i in range(0, len(rows), 500):
                db.NotificationRow.insert_many(rows[i:i + 500]).execute()
            for i in range(0, len(done), 500):
                db.DeliveryRow.update(state="done").where(
                    db.DeliveryRow.id.in_(done[i:i + 500])).execute()
        for r in results:
            a = r.attempt
            log = logger.info if r.outcome == SENT else logger.warning
            log("notification %s job=%s run=%s transport=%s recipient=%s outcome=%s"
                " duration_ms=%d detail=%s", a.alert.kind, a.alert.job_id or "-",
                a.alert.run_id or "-", a.transport or "-", a.recipient, r.outcome,
                r.duration_ms, r.detail)

    def wait_idle(self, timeout: float | None = None) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._inflight == 0, timeout)

    def close(self, wait: bool = True) -> None:
        for executor in self.executors.values():
            executor.shutdown(wait=wait)
        for transport in self.transports.values():
            transport.close()
