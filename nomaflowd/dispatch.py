"""Dispatcher: per-transport worker pools that send once and hand the verdict back.

One thread owns the dispatcher (the daemon's main loop): submit(), pace(), take(),
configure() and close() are called from it only. Workers only send: they never touch the
dispatcher's state, they put what they got on a queue. So a reload, a 429 and a finishing
send can never interleave on shared state, and there is nothing to lock.
"""

from __future__ import annotations

import logging
import math
import queue
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime

from nomaflowd import db, logs, metrics, threads
from nomaflowd.alerts import Alert, test_alert
from nomaflowd.config import Config
from nomaflowd.db import utcnow
from nomaflowd.pacing import MAX_REFUSALS, Pacer
from nomaflowd.routing import default_recipient
from nomaflowd.transports import DeliveryError, Transport, TransportError, build
from nomaflowd.transports.base import RateLimited, Sent

logger = logging.getLogger(__name__)

SENT, FAILED_TRANSPORT, FAILED_DELIVERY = "SENT", "FAILED_TRANSPORT", "FAILED_DELIVERY"
WORKERS_PER_TRANSPORT = 4


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
    thread: Mapping[str, str] | None = None   # a chat thread this send started (threads.py)


@dataclass(frozen=True)
class _Done:
    """What a worker hands back: the results, or the 429 that sends the attempt back in line."""

    attempt: Attempt
    transport: Transport
    results: list[Result]
    refused: RateLimited | None = None
    withheld: bool = False  # not sent: this replica's lease ran out before (see alive_until)


def verdict(name: str, send: Callable[[], str | Sent], *, reraise_429: bool
            ) -> tuple[str, str | Sent]:
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


def result(attempt: Attempt, transport: Transport | None, outcome: str, detail: str | Sent,
           duration_ms: int) -> Result:
    thread = None
    if isinstance(detail, Sent):
        thread = detail.thread
        detail = detail.detail
    if attempt.note:
        detail = f"{attempt.note}; {detail}"
    return Result(attempt, transport.type if transport else "", outcome, detail, duration_ms,
                  utcnow(), thread)


def attempt_once(transport: Transport | None, attempt: Attempt, *,
                 reraise_429: bool = False) -> Result:
    """Send once, now, on this thread, and turn the verdict into an outcome."""
    started = time.monotonic()
    detail: str | Sent
    if attempt.error or transport is None:
        outcome = FAILED_TRANSPORT
        detail = attempt.error or f"no transport named {attempt.transport!r} is configured"
    else:
        outcome, detail = verdict(attempt.transport,
                                  lambda: transport.send(attempt.alert, attempt.recipient),
                                  reraise_429=reraise_429)
    return result(attempt, transport, outcome, detail, int((time.monotonic() - started) * 1000))


def execute(transport: Transport, attempt: Attempt, *, paced: bool) -> list[Result]:
    """A single alert or a digest (one result per alert in it). With `paced`, a 429 escapes
    as RateLimited so the alert(s) can wait in line."""
    if not attempt.members:
        return [attempt_once(transport, attempt, reraise_429=paced)]
    started = time.monotonic()
    n = len(attempt.members)
    outcome, detail = verdict(attempt.transport, lambda: transport.send_digest(
        [m.alert for m in attempt.members], attempt.recipient, attempt.digest_id),
        reraise_429=True)
    metrics.count_digest(attempt.transport)
    elapsed = int((time.monotonic() - started) * 1000)
    if isinstance(detail, Sent):
        detail = detail.detail  # a digest starts no thread
    return [result(m, transport, outcome, f"in {attempt.digest_id} of {n} alerts: {detail}",
                   elapsed) for m in attempt.members]


class Dispatcher:
    def __init__(self, transports: Mapping[str, Transport], replica: str,
                 wake: Callable[[], None] = lambda: None) -> None:
        self.replica = replica
        self.wake = wake
        self.transports: dict[str, Transport] = {}
        self.executors: dict[str, ThreadPoolExecutor] = {}
        self.pacer = Pacer()
        self.held: set[int] = set()          # delivery ids submitted and not yet taken back
        self.sending = 0                      # messages handed to workers, not yet handed back
        self._done: queue.SimpleQueue[_Done] = queue.SimpleQueue()
        # A worker has woken the owner since its last take(): the next ones need not, as that
        # take() gets what they queue. One wake per result cost a main-loop turn per POST.
        self._called = False
        self._ready: list[Result] = []        # results made on this thread (nothing to send)
        self._futures: dict[int, tuple[Future[None], Attempt, Transport]] = {}
        self._using: dict[int, int] = {}      # id(transport) -> messages in flight on it
        self._retired: list[Transport] = []   # replaced by a reload, closed once idle
        self._old_executors: list[ThreadPoolExecutor] = []
        # Until when this replica's claims are its own (time.monotonic(); the heartbeat moves
        # it on). A process frozen past its lease (SIGSTOP, a paused VM) may have had its
        # claims taken over by a peer: on waking, its senders hold everything back until
        # the main loop has checked what is still its own (Deliveries.recheck).
        self.alive_until = math.inf
        self.withheld: list[Attempt] = []
        self.configure(transports)

    # --- owning thread only -----------------------------------------------------------

    def configure(self, transports: Mapping[str, Transport]) -> None:
        """Swap in new transports; sends in flight finish on the old ones, which are closed
        once idle. Alerts waiting in line keep their place."""
        for name, old in self.transports.items():
            self._retired.append(old)
            new = transports.get(name)
            if new is None or new.ordered != old.ordered:
                executor = self.executors.pop(name)
                executor.shutdown(wait=False)  # queued sends still run, then its threads end
                self._old_executors.append(executor)
        self.transports = dict(transports)
        for name, t in self.transports.items():
            if name not in self.executors:
                self.executors[name] = ThreadPoolExecutor(
                    1 if t.ordered else WORKERS_PER_TRANSPORT, thread_name_prefix=f"send-{name}")
        orphans = self.pacer.configure({n: t.settings for n, t in self.transports.items()})
        self._ready.extend(attempt_once(None, a) for a in orphans)  # their transport is gone
        self._close_retired()

    @property
    def waiting(self) -> int:
        """Alerts in line for pacing (a metric)."""
        return self.pacer.waiting

    def busy(self) -> bool:
        """Anything submitted whose result has not been taken yet?"""
        return bool(self.sending or self.pacer.waiting or self._ready)

    def submit(self, attempt: Attempt) -> None:
        """Send now on its transport's workers, or put it in line when its transport is paced."""
        if attempt.delivery_id is not None:
            self.held.add(attempt.delivery_id)
        if attempt.error or attempt.transport not in self.transports:
            self._ready.append(attempt_once(None, attempt))
            self.wake()
        else:
            if self.transports[attempt.transport].threads:
                attempt = replace(attempt, alert=threads.attach(
                    attempt.alert, attempt.transport, attempt.recipient))
            if not self.pacer.hold(attempt, time.monotonic()):
                self._send(attempt)

    def _send(self, attempt: Attempt) -> None:
        transport = self.transports[attempt.transport]
        paced = attempt.transport in self.pacer.lanes
        self.sending += 1
        self._using[id(transport)] = self._using.get(id(transport), 0) + 1
        future = self.executors[attempt.transport].submit(self._work, transport, attempt, paced)
        self._futures[id(attempt)] = (future, attempt, transport)

    def _work(self, transport: Transport, attempt: Attempt, paced: bool) -> None:
        """On a worker thread: send, hand the verdict back, nothing else."""
        started = time.monotonic()
        if started > self.alive_until:
            self._done.put(_Done(attempt, transport, [], withheld=True))
            self.wake()
            return
        # The transport in force now: a reload since this was queued (a fixed URL, a removed
        # transport) applies to it. Queued alerts kept going to the old, dead URL, one
        # timeout after another, until a restart. Sends under way finish where they are.
        current = self.transports.get(attempt.transport)
        try:
            if current is None:
                done = _Done(attempt, transport, [  # no transport type: no streak moves
                    result(m, None, FAILED_TRANSPORT, f"transport {attempt.transport!r} was"
                           " removed by a reload before this was sent", 0)
                    for m in attempt.members or (attempt,)])
            else:
                done = _Done(attempt, transport, execute(current, attempt, paced=paced))
        except RateLimited as exc:
            done = _Done(attempt, transport, [], exc)
        except BaseException as exc:  # never lose the hand-back, whatever went wrong
            logger.exception("sending on %s failed unexpectedly", attempt.transport)
            members = attempt.members or (attempt,)
            done = _Done(attempt, transport, [result(m, transport, FAILED_TRANSPORT,
                                                     f"internal error: {type(exc).__name__}", 0)
                                              for m in members])
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("stages send run=%s started=%.6f sent=%.6f", attempt.alert.run_id or "-",
                         started, time.monotonic())
        self._done.put(done)
        if not self._called:
            self._called = True
            self.wake()

    def take(self, timeout: float | None = None) -> list[Result]:
        """Results handed back so far (waiting up to `timeout` for the first one); a 429 puts
        its alert(s) back in line instead."""
        self._called = False  # before draining: a result queued after it wakes the owner
        results, self._ready = self._ready, []
        while True:
            try:
                if timeout is not None and not results:
                    done = self._done.get(timeout=timeout)
                else:
                    done = self._done.get_nowait()
            except queue.Empty:
                break
            results.extend(self._handle(done))
        for r in results:
            if r.attempt.delivery_id is not None:
                self.held.discard(r.attempt.delivery_id)
            metrics.observe_result(r)
        self._close_retired()
        return results

    def _handle(self, done: _Done) -> list[Result]:
        self.sending -= 1
        self._futures.pop(id(done.attempt), None)
        self._using[id(done.transport)] -= 1
        if done.withheld:
            self.withheld.extend(done.attempt.members or (done.attempt,))
            return []
        exc = done.refused
        if exc is None:
            return done.results
        if self.pacer.refused(done.attempt, exc.retry_after, str(exc), time.monotonic()):
            logger.warning("transport %s answered 429: pausing it for %gs",
                           done.attempt.transport, exc.retry_after)
            return []
        members = done.attempt.members or (done.attempt,)
        if done.attempt.transport not in self.transports:  # its lane went with a reload
            return [result(m, None, FAILED_TRANSPORT, f"refused with {exc}; transport"
                           f" {done.attempt.transport!r} was removed by a reload before it"
                           " could go again", 0) for m in members]
        return [result(m, done.transport, FAILED_DELIVERY, f"refused {MAX_REFUSALS} times: {exc}",
                       0) for m in members]

    def pace(self) -> float | None:
        """Send what the lanes allow now; returns seconds until it is worth calling again, or
        None when nothing waits."""
        sends, next_call = self.pacer.due(
            time.monotonic(), lambda n: getattr(self.transports.get(n), "supports_digest", False),
            lambda n: n in self.transports and self._using.get(id(self.transports[n]), 0) > 0)
        for name, group in sends:
            if name not in self.transports:
                self._ready.extend(attempt_once(None, a) for a in group)
            elif len(group) == 1:
                self._send(group[0])
            else:
                self._send(replace(group[0], members=tuple(group), delivery_id=None, note="",
                                   digest_id=f"digest-{uuid.uuid4().hex[:8]}"))
        return next_call

    def _close_retired(self) -> None:
        idle = [t for t in self._retired if not self._using.get(id(t))]
        for t in idle:
            self._retired.remove(t)
            self._using.pop(id(t), None)
            t.close()

    def close(self, timeout: float = 5.0) -> tuple[list[Result], list[Attempt]]:
        """Stop: sends already running get up to `timeout` seconds to finish. Returns their
        results, and the attempts that were never tried (in line, or queued behind others)."""
        unsent = self.pacer.drain() + self.withheld
        self.withheld = []
        for future, attempt, transport in list(self._futures.values()):
            if future.cancel():  # queued behind other sends, never started
                self._futures.pop(id(attempt))
                self.sending -= 1
                self._using[id(transport)] -= 1
                unsent.extend(attempt.members or (attempt,))
        results: list[Result] = []
        deadline = time.monotonic() + timeout
        while self.sending > 0 and (left := deadline - time.monotonic()) > 0:
            results.extend(self.take(timeout=left))
        results.extend(self.take())
        unsent.extend(self.pacer.drain())  # 429s that came back meanwhile: not tried again
        if self.sending:
            logger.warning("stopped with %d send(s) still without a verdict", self.sending)
        for executor in [*self.executors.values(), *self._old_executors]:
            executor.shutdown(wait=False, cancel_futures=True)
        for transport in [*self.transports.values(), *self._retired]:
            transport.close()
        return results, unsent

    # --- any thread ------------------------------------------------------------------

    def attempt(self, attempt: Attempt) -> Result:
        """Send once, now, on the calling thread (`nomaflowd test`, the transport tests)."""
        return attempt_once(self.transports.get(attempt.transport), attempt)

    def execute(self, attempt: Attempt) -> list[Result]:
        """One alert or a digest, now, on the calling thread (the transport tests)."""
        return execute(self.transports[attempt.transport], attempt, paced=False)


# Hand-written: the audit insert is on the hot path, where peewee's query builder cost
# more per row than SQLite.
RECORD = ("INSERT INTO notifications (created_at, event_id, job_id, run_id, alert, level,"
          " transport, transport_type, recipient, outcome, detail, duration_ms, replica)"
          " VALUES ({p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}, {p}, {p})")


def field(value: str | None) -> str:
    """A value of a `key=value` log field: "-" when empty; in double quotes (a quote in it
    doubled, as in CSV) when a space, `=` or `"` in it could pass for the end of the field:
    an id from an event file may hold " outcome=SENT". Control characters and backslashes
    are the line formatter's to escape."""
    if not value:
        return "-"
    if " " in value or "=" in value or '"' in value:
        return '"' + value.replace('"', '""') + '"'
    return value


def record(results: list[Result], replica: str, replay: bool = False) -> None:
    """One audit row and one `notification` log line per attempt; their claims marked done.

    The only place an outcome is written. `replay`: these results' recording failed before,
    and may have committed all the same (a link that dropped the answer to COMMIT): a claim
    this replica already marked done has its row, and gets no second one. A claim a peer
    took over meanwhile (this replica was cut off past its lease) still gets this
    attempt's row, saying so: the peer sent it again.
    """
    if not results:
        return
    done = [r.attempt.delivery_id for r in results if r.attempt.delivery_id is not None]
    new = results
    if replay and done:
        claims = {row[0]: row[1:] for row in db.proxy.execute_sql(
            "SELECT id, state, claimed_by FROM deliveries WHERE id IN"
            f" ({', '.join([db.proxy.param] * len(done))})", done).fetchall()}
        new = []
        for r in results:
            state, owner = claims.get(r.attempt.delivery_id, (None, replica))
            if state == "done" and owner == replica:
                continue  # recorded: the answer to its COMMIT was lost, not the COMMIT
            if owner != replica:
                r = replace(r, detail=f"{r.detail}; recorded late: replica {owner} had"
                                      " taken it over")
            new.append(r)
    rows = [(r.created_at, r.attempt.alert.event_id, r.attempt.alert.job_id or None,
             r.attempt.alert.run_id, r.attempt.alert.kind, r.attempt.alert.level,
             r.attempt.transport, r.transport_type, r.attempt.recipient, r.outcome,
             r.detail[:1000], r.duration_ms, replica) for r in new]
    with db.write():
        if rows:
            db.executemany(RECORD.format(p=db.proxy.param), rows)
        threads.remember(new)
        if done:
            db.execute_in("UPDATE deliveries SET state = 'done', context = '' WHERE id IN", done)
    with logs.batched():  # the batch's lines in one write
        for r in results:
            a = r.attempt
            log = logger.info if r.outcome == SENT else logger.warning
            log("notification %s job=%s run=%s transport=%s recipient=%s outcome=%s"
                " duration_ms=%d detail=%s", a.alert.kind, field(a.alert.job_id),
                field(a.alert.run_id), field(a.transport), field(a.recipient), r.outcome,
                r.duration_ms, r.detail)


def send_test(cfg: Config, name: str, recipient: str | None = None,
              sent: Callable[[Result], None] | None = None) -> Result:
    """The Test button (`nomaflowd test`, the notifications page): one "test from Nomaflow"
    through transport `name` now, recorded like any alert (audit row with alert 'test' and
    the `notification` log line). `recipient` defaults to the transport's default; `sent`
    hears the result before it is recorded (which may fail)."""
    tc = cfg.transports[name]
    transports = build({name: tc}, cfg.send_timeout_seconds)
    try:
        r = attempt_once(transports[name], Attempt(test_alert(cfg.base_url), name,
                                                   recipient or default_recipient(tc)))
        if sent is not None:
            sent(r)
        metrics.observe_result(r)  # counted like any attempt (the page's Test: a live daemon)
        record([r], cfg.replica_id)
    finally:
        transports[name].close()
    return r


