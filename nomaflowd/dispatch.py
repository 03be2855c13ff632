"""Dispatcher: one small executor per transport; the one place that records an attempt."""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime

from nomaflowd import db, metrics
from nomaflowd.alerts import Alert, test_alert
from nomaflowd.config import Config
from nomaflowd.db import utcnow
from nomaflowd.pacing import Lane, Waiting, take_tokens
from nomaflowd.routing import default_recipient
from nomaflowd.transports import DeliveryError, Transport, TransportError, build
from nomaflowd.transports.base import RateLimited

logger = logging.getLogger(__name__)

SENT, FAILED_TRANSPORT, FAILED_DELIVERY = "SENT", "FAILED_TRANSPORT", "FAILED_DELIVERY"
WORKERS_PER_TRANSPORT = 4
# An upstream that answers 429 this many times in a row to the same alert is refusing it,
# not pacing us: the alert is recorded as FAILED_DELIVERY instead of waiting forever.
MAX_REFUSALS = 5


# Hand-written: the audit insert is on the hot path, where peewee's query builder cost
# more per row than SQLite.
RECORD = ("INSERT INTO notifications (created_at, event_id, job_id, run_id, alert, level,"
          " transport, transport_type, recipient, outcome, detail, duration_ms, replica)"
          " VALUES ({p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}, {p})")


@dataclass(frozen=True)
class Attempt:
    """One (alert, transport, recipient) to try once."""

    alert: Alert
    transport: str
    recipient: str
    delivery_id: int | None = None
    error: str = ""      # set when routing found no transport: recorded without sending
    note: str = ""       # prefixed to the detail (e.g. "sent again after a restart")
    members: tuple[Attempt, ...] = ()   # a digest: these attempts, sent as one message
    digest_id: str = ""
    refusals: int = 0                   # 429s met so far

    def with_note(self, note: str) -> Attempt:
        return replace(self, note=f"{self.note}; {note}" if self.note else note)


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
        self.lanes: dict[str, Lane] = {}
        self._lanes_lock = threading.Lock()
        self.configure(transports)

    def configure(self, transports: Mapping[str, Transport]) -> None:
        """Swap in new transports; sends already in flight finish on the old ones."""
        old = self.executors
        self.transports = dict(transports)
        self.executors = {
            name: ThreadPoolExecutor(1 if t.ordered else WORKERS_PER_TRANSPORT,
                                     thread_name_prefix=f"send-{name}")
            for name, t in self.transports.items()
        }
        for executor in old.values():
            executor.shutdown(wait=False)
        with self._lanes_lock:
            lanes = {}
            for name, t in self.transports.items():
                lane = Lane.from_settings(name, t.settings)
                if name in self.lanes:  # alerts already in line keep their place
                    lane.waiting = self.lanes[name].waiting
                lanes[name] = lane
            orphans = [w for name, lane in self.lanes.items() if name not in lanes
                       for w in lane.waiting]
            self.lanes = lanes
        for w in orphans:  # their transport is gone: recorded as such
            self._finish([self.attempt(w.attempt)])

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def waiting(self) -> int:
        """Alerts in line for pacing (a metric)."""
        return sum(len(lane.waiting) for lane in self.lanes.values())

    def submit(self, attempt: Attempt) -> None:
        """Queue one attempt on its transport's executor, or in its lane when it is paced."""
        with self._lock:
            self._inflight += 1
        executor = self.executors.get(attempt.transport)
        if executor is None or attempt.error:
            self._finish([self.attempt(attempt)])
            return
        lane = self.lanes.get(attempt.transport)
        now = time.monotonic()
        with self._lanes_lock:
            if lane is not None and lane.holds(now):
                lane.waiting.append(Waiting(attempt, now))
                held = True
            else:
                held = False
        if held:
            self.wake()
        else:
            executor.submit(self._run, attempt)

    def _run(self, attempt: Attempt) -> None:
        try:
            results = self.execute(attempt)
        except RateLimited as exc:
            self._requeue(attempt, exc)
            return
        self._finish(results)

    def _requeue(self, attempt: Attempt, exc: RateLimited) -> None:
        """A 429: pause the lane for Retry-After; the alert(s) wait for the next digest."""
        lane = self.lanes.get(attempt.transport)
        members = attempt.members or (attempt,)
        if lane is None:  # reconfigured away meanwhile
            self._finish([self._result(m, FAILED_DELIVERY, str(exc), 0) for m in members])
            return
        if max(m.refusals for m in members) + 1 >= MAX_REFUSALS:
            self._finish([self._result(m, FAILED_DELIVERY,
                                       f"refused {MAX_REFUSALS} times: {exc}", 0)
                          for m in members])
            return
        now = time.monotonic()
        note = f"refused with {exc}, then held for a digest"
        with self._lanes_lock:
            lane.pause(exc.retry_after, now)
            for m in reversed(members):
                again = replace(m, refusals=m.refusals + 1,
                                note=m.note if m.refusals else m.with_note(note).note)
                lane.waiting.appendleft(Waiting(again, now, refused=note))
        logger.warning("transport %s answered 429: pausing it for %gs", attempt.transport,
                       exc.retry_after)
        self.wake()

    def _finish(self, results: list[Result]) -> None:
        for result in results:
            self.results.put(result)
            metrics.observe_result(result)
        with self._lock:
            self._inflight -= len(results)
            if self._inflight == 0:
                self._idle.notify_all()
        self.wake()

    def pace(self) -> float | None:
        """Send what the lanes allow now (main thread); returns seconds until it is worth calling
        again, or None when nothing waits."""
        now = time.monotonic()
        next_call: float | None = None

        def soon(seconds: float | None) -> None:
            nonlocal next_call
            if seconds is not None:
                next_call = seconds if next_call is None else min(next_call, seconds)

        for lane in list(self.lanes.values()):
            if lane.paced and lane.pause_to_share:
                take_tokens(lane.transport, lane.rate_per_minute or 1, lane.burst or 1, 0,
                            lane.pause_to_share)
                lane.pause_to_share = 0.0
            with self._lanes_lock:
                if not lane.waiting:
                    continue
                if now < lane.paused_until:
                    soon(lane.paused_until - now)
                    continue
                digest = getattr(self.transports.get(lane.transport), "supports_digest", False)
                groups, singles = lane.plan(now)
                if not digest:  # each alert goes out on its own, in order, as tokens allow
                    singles = [w for g in groups for w in g] + singles
                    groups = []
            sends: list[list[Waiting]] = groups + [[w] for w in singles]
            if lane.paced:
                granted, wait = take_tokens(lane.transport, lane.rate_per_minute or 1,
                                            lane.burst or 1, len(sends))
            else:
                granted, wait = len(sends), 0.0
            chosen = sends[:granted]
            with self._lanes_lock:
                taken = {id(w) for group in chosen for w in group}
                lane.waiting = type(lane.waiting)(w for w in lane.waiting if id(w) not in taken)
            executor = self.executors[lane.transport]
            for group in chosen:
                if len(group) == 1:
                    executor.submit(self._run, group[0].attempt)
                else:
                    members = tuple(w.attempt for w in group)
                    executor.submit(self._run, replace(
                        members[0], members=members, delivery_id=None, note="",
                        digest_id=f"digest-{uuid.uuid4().hex[:8]}"))
            if len(sends) > granted:
                soon(wait)
            soon(lane.next_due(now))
        return next_call

    def execute(self, attempt: Attempt) -> list[Result]:
        """attempt() for a single alert or a digest (one result per alert in it).

        A 429 escapes as RateLimited when the transport has a lane to wait in.
        """
        if not attempt.members:
            return [self.attempt(attempt, rate_limited=True)]
        transport = self.transports[attempt.transport]
        started = time.monotonic()
        n = len(attempt.members)
        outcome, detail = self._verdict(attempt.transport, lambda: transport.send_digest(
            [m.alert for m in attempt.members], attempt.recipient, attempt.digest_id),
            reraise_429=True)
        metrics.DIGESTS.labels(attempt.transport).inc()
        elapsed = int((time.monotonic() - started) * 1000)
        return [self._result(m, outcome, f"in {attempt.digest_id} of {n} alerts: {detail}",
                             elapsed) for m in attempt.members]

    def _result(self, attempt: Attempt, outcome: str, detail: str, duration_ms: int) -> Result:
        transport = self.transports.get(attempt.transport)
        if attempt.note:
            detail = f"{attempt.note}; {detail}"
        return Result(attempt, transport.type if transport else "", outcome, detail,
                      duration_ms, utcnow())

    def attempt(self, attempt: Attempt, *, rate_limited: bool = False) -> Result:
        """Send once, now, on this thread, and turn the verdict into an outcome."""
        transport = self.transports.get(attempt.transport)
        started = time.monotonic()
        if attempt.error or transport is None:
            outcome = FAILED_TRANSPORT
            detail = attempt.error or f"no transport named {attempt.transport!r} is configured"
        else:
            outcome, detail = self._verdict(
                attempt.transport, lambda: transport.send(attempt.alert, attempt.recipient),
                reraise_429=rate_limited and attempt.transport in self.lanes)
        return self._result(attempt, outcome, detail, int((time.monotonic() - started) * 1000))

    @staticmethod
    def _verdict(name: str, send: Callable[[], str], *, reraise_429: bool) -> tuple[str, str]:
        """The one place where a send's exception becomes an outcome and a detail."""
        try:
            return SENT, send()
        except RateLimited as exc:
            if reraise_429:
                raise  # the caller holds the alert(s) for the next digest
            return FAILED_DELIVERY, str(exc)
        except DeliveryError as exc:
            return FAILED_DELIVERY, str(exc)
        except TransportError as exc:
            return FAILED_TRANSPORT, str(exc)
        except Exception as exc:  # a buggy transport must not sink the others
            logger.exception("transport %s raised unexpectedly", name)
            return FAILED_TRANSPORT, f"internal error: {type(exc).__name__}"

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
        rows = [(r.created_at, r.attempt.alert.event_id, r.attempt.alert.job_id or None,
                 r.attempt.alert.run_id, r.attempt.alert.kind, r.attempt.alert.level,
                 r.attempt.transport, r.transport_type, r.attempt.recipient, r.outcome,
                 r.detail[:1000], r.duration_ms, self.replica) for r in results]
        done = [(r.attempt.delivery_id,) for r in results if r.attempt.delivery_id is not None]
        p = db.proxy.param
        with db.proxy.atomic():
            cursor = db.proxy.cursor()
            cursor.executemany(RECORD.format(p=p), rows)
            if done:
                cursor.executemany(f"UPDATE deliveries SET state = 'done' WHERE id = {p}", done)
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


def send_test(cfg: Config, name: str, recipient: str | None = None) -> Result:
    """The Test button (`nomaflowd test`, the notifications page): one "test from Nomaflow"
    through transport `name` now, recorded like any alert (audit row with alert 'test' and
    the `notification` log line). `recipient` defaults to the transport's default."""
    tc = cfg.transports[name]
    dispatcher = Dispatcher(build({name: tc}, cfg.send_timeout_seconds), cfg.replica_id)
    try:
        result = dispatcher.attempt(Attempt(test_alert(cfg.base_url), name,
                                            recipient or default_recipient(tc)))
        dispatcher.record([result])
    finally:
        dispatcher.close()
    return result
