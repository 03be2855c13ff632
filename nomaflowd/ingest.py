"""Ingest: spool files -> events, runs and claims, committed together; then the attempts go out.

The spool directory is the queue: a file is deleted only after its event is committed and on
disk, so neither a stop between files nor a power cut loses one. An error that belongs to one
file (it cannot be read, parsed, stored or moved) is that file's: it is quarantined with its
reason, or set aside and said once, and the files after it flow. Only the database itself
failing holds the spool.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import time
from collections import deque
from datetime import datetime, timedelta
from typing import Any

from nomaflowd import db, events, incidents, metrics, schedules, state
from nomaflowd.deliveries import Deliveries
from nomaflowd.dispatch import Attempt
from nomaflowd.errors import Rejected
from nomaflowd.policy import Policy, Routed
from nomaflowd.spool import Spool
from nomaflowd.text import escape

logger = logging.getLogger(__name__)

# A batch is one transaction. 4,000 files rather than 1,000: a backlog's inserts land in the
# same index pages more often, and bench a ingested 12 % more per second (0.47-0.48 -> 0.50-
# 0.53 of the floor); a live burst's first POST came no later (bench d). BATCH_BYTES bounds
# what a batch holds in memory: 150 files just under the 1 MiB limit took the daemon to a
# peak RSS of 455 MB when a batch was bounded in files only, 84 MB now. Events of a few
# hundred bytes never reach it.
BATCH = 4000
BATCH_BYTES = 8 * 1024 * 1024
MAX_TRIES = 3
# Fault injection for the test suite: exit abruptly while handling a file whose name
# contains this string, as a crash in a parser or driver would.
CRASH_ON = os.environ.get("NOMAFLOWD_FAULT_CRASH_ON", "")


def try_key(name: str) -> str:
    """A spool file's name as `spool_tries.name` holds it. A name that is not UTF-8 (its
    bytes as surrogates) is no text either database can store: it goes as `b64:` and its
    bytes in base64 (255 bytes make 344 characters), which no `*.json` name can be."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "b64:" + base64.b64encode(os.fsencode(name)).decode("ascii")
    return name


def from_try_key(key: str) -> str:
    if key.startswith("b64:") and not key.endswith(".json"):
        return os.fsdecode(base64.b64decode(key[4:]))
    return key


class SpoolUnreadable(Exception):
    """The spool directory itself cannot be listed (gone, permissions)."""


class Ingest:
    def __init__(self, spool: Spool, policy: Policy, deliveries: Deliveries) -> None:
        self.spool = spool
        self.policy = policy
        self.deliveries = deliveries
        self.pending: deque[str] = deque()
        self.suspects: set[str] = set()
        self.stuck: set[str] = set()   # files that could be neither stored nor moved aside
        self.hinted = True
        self.last_scan = 0.0
        self.recorded: list[str] = []  # committed, deleted once on disk (remove())
        self.read_as: dict[str, tuple[int, int]] = {}  # name -> the file read (SpoolFile.ident)
        self.last_event_at: float | None = None
        # time.monotonic() of the latest spool hint and of the loop's wake-up after it: the
        # first stages of NOMAFLOWD_DEBUG's per-batch "stages" line (bench/stages.py).
        self.hinted_at = 0.0
        self.woke_at = 0.0

    def refill(self, rescan_seconds: float) -> bool:
        """Scan the spool when hinted or due; returns whether anything is pending."""
        if self.pending:
            return True
        due = time.monotonic() - self.last_scan >= rescan_seconds
        if not (self.hinted or due):
            return False
        self.hinted = False
        self.last_scan = time.monotonic()
        try:
            names = self.spool.scan()
        except OSError as exc:
            raise SpoolUnreadable(exc.strerror or str(exc)) from None
        if self.stuck:
            names = [n for n in names if n not in self.stuck]
        if self.suspects:  # files in hand at a crash go first, one at a time
            names.sort(key=lambda n: n not in self.suspects)
        self.pending.extend(names)
        return bool(self.pending)

    def step(self, now: datetime) -> bool:
        """Ingest at most one batch of pending files. Returns "more work right away?".

        Raises one of db.OUTAGES when the database is away; the batch goes back in line.
        """
        if not self.pending:
            return False
        if self.pending[0] in self.suspects:
            batch = [self.pending.popleft()]
        else:
            batch = [self.pending.popleft() for _ in range(min(BATCH, len(self.pending)))]
        try:
            unread = self.ingest(batch, now)
        except db.OUTAGES:
            self.pending.extendleft(reversed(batch))
            raise
        self.pending.extendleft(reversed(unread))
        return bool(self.pending)

    def ingest(self, names: list[str], now: datetime) -> list[str]:
        """Read a batch of files, commit their events and claims in one transaction, then send.

        Reading stops once BATCH_BYTES are in hand; returns the names left unread."""
        accepted: list[tuple[str, events.Event]] = []
        started = time.monotonic()
        self.spool.mark_handling(names)
        cat = self.policy.current()
        budget = BATCH_BYTES
        unread: list[str] = []
        waited = time.time() - events.WAITED.total_seconds()  # older files waited in the spool
        for i, name in enumerate(names):
            if budget <= 0:
                names, unread = names[:i], names[i:]
                self.spool.mark_handling(names)
                break
            if CRASH_ON and CRASH_ON in name:
                os._exit(70)
            try:
                raw = self.spool.read(name)
                if raw is None:
                    continue
                budget -= len(raw)
                self.read_as[name] = raw.ident
                event = events.parse(raw, name, now, events.written_at(raw.mtime)
                                     if raw.mtime < waited else None)
                refused = cat.may_write(event.job_id, raw.uid, raw.gid)
                if refused:
                    raise Rejected(refused)
                for key, written in event.ahead:
                    logger.warning("spool file %s (job %s): %s %s is ahead of this host's"
                                   " clock; the time the file was read is used instead (check"
                                   " the runner's clock)", escape(name), event.job_id, key,
                                   written)
                accepted.append((name, event))
            except Rejected as exc:
                self.reject(name, str(exc), now)
            except OSError as exc:  # the file's own trouble (EIO, EACCES...)
                self.reject(name, f"cannot be read: {exc.strerror or type(exc).__name__}", now)
            except Exception as exc:  # a parser bug must quarantine the file, not stop the loop
                logger.exception("spool file %s could not be handled", escape(name))
                self.reject(name, f"internal error: {type(exc).__name__}", now)
        parsed = time.monotonic()
        attempts = self.commit(accepted, now)
        committed = time.monotonic()
        self.deliveries.submit(attempts)  # first: the rest is bookkeeping
        submitted = time.monotonic()
        self.spool.clear_handling()
        if self.suspects.intersection(names):
            self.suspects.difference_update(names)
            db.SpoolTryRow.delete().where(db.SpoolTryRow.name.in_(
                [try_key(n) for n in names])).execute()
        # The commit did not wait for the disk (synchronous=NORMAL): the POSTs are under way
        # while this thread flushes the WAL, once for the batch, and only then deletes files.
        self.remove(self.recorded)
        self.recorded = []
        self.read_as.clear()
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("stages batch=%d hinted=%.6f woke=%.6f started=%.6f parsed=%.6f"
                         " committed=%.6f submitted=%.6f runs=%s", len(names), self.hinted_at,
                         self.woke_at, started, parsed, committed, submitted,
                         ",".join(e.run_id or "-" for _, e in accepted))
        return unread

    def commit(self, accepted: list[tuple[str, events.Event]], now: datetime) -> list[Attempt]:
        """Store the batch in one transaction; if the database refuses it for a reason that is
        not an outage (a value it cannot store), store file by file and quarantine the ones
        it refuses. Files are removed once their events are committed."""
        if not accepted:
            return []
        try:
            with db.write():
                attempts = self.commit_events([e for _, e in accepted], now)
        except db.VALUE_ERRORS as exc:
            if len(accepted) == 1:
                name = accepted[0][0]
                logger.warning("the database refused spool file %s: %s", escape(name),
                               type(exc).__name__)
                self.reject(name, f"the database cannot store this event ({type(exc).__name__}:"
                            f" {str(exc)[:200]})", now)
                return []
            attempts = []
            for one in accepted:
                attempts += self.commit([one], now)
            return attempts
        self.recorded.extend(name for name, _ in accepted)
        return attempts

    def reject(self, name: str, reason: str, now: datetime) -> None:
        try:
            if not self.spool.reject(name, reason, now):
                self.stuck.add(name)  # said once by reject(); not read again until restart
        except OSError as exc:
            self.set_aside(name, f"cannot be moved to rejected/ ({exc.strerror or exc})")

    def remove(self, names: list[str]) -> None:
        """Delete recorded files, once their events are safe from a power cut."""
        if not names:
            return
        try:
            db.make_durable()
        except OSError as exc:  # they stay: the next read finds them recorded, a duplicate
            for name in names:
                self.set_aside(name, "recorded, but the database could not be flushed to disk"
                               f" ({exc.strerror or exc})")
            return
        for name in names:
            try:
                self.spool.remove([name], self.read_as)
            except OSError as exc:  # recorded already: a second read is a harmless duplicate
                self.set_aside(name, f"recorded, but cannot be removed ({exc.strerror or exc})")

    def set_aside(self, name: str, why: str) -> None:
        """A file we can neither store nor move: skipped until the next start, said once."""
        if name not in self.stuck:
            self.stuck.add(name)
            logger.error("spool file %s %s; skipping it until the next start", escape(name),
                         why)

    def count_tries(self, now: datetime) -> None:
        """Count a try for each file in hand when the last run died; quarantine at MAX_TRIES.

        Without this, a file that crashes the daemon would crash it again at every
        restart, and every alert behind it would wait forever. The note of names in hand
        is emptied before the counts are written: a crash in between undercounts (the
        crasher is counted again next time it is in hand), and never counts one stop twice.
        """
        names = [n for n in self.spool.handled_when_stopped()
                 if os.path.lexists(self.spool.path / n)]
        self.spool.mark_handling([])
        t = db.SpoolTryRow
        tries: dict[str, int] = {}
        with db.proxy.atomic():
            for name in names:
                row, _ = t.get_or_create(name=try_key(name), defaults={"updated_at": now})
                tries[name] = row.tries + 1
                t.update(tries=tries[name], updated_at=now).where(t.id == row.id).execute()
            # Files counted before but not finished since: still suspects, handled alone.
            keys = [try_key(n) for n in names]
            for row in t.select(t.name, t.tries).where(t.name.not_in(keys)):
                name = from_try_key(row.name)
                if os.path.lexists(self.spool.path / name):
                    tries[name] = row.tries
        for name, count in tries.items():
            if count >= MAX_TRIES:
                self.reject(name, f"the daemon stopped {count} times while handling this"
                            " file; quarantined to break the crash loop", now)
                t.delete().where(t.name == try_key(name)).execute()
            else:
                if name in names:
                    logger.warning("spool file %s was in hand when the daemon stopped"
                                   " (try %d of %d)", escape(name), count, MAX_TRIES)
                self.suspects.add(name)

    def commit_events(self, batch: list[events.Event], now: datetime) -> list[Attempt]:
        """Inside the caller's transaction: events, runs rows and claims of one batch."""
        stamp = db.stamp(now)  # the batch's one timestamp, converted once
        fresh = {(row[0], row[1]) for row in db.insert_new(
            "events", ("event_id", "received_at", "job_id", "run_id", "state", "payload"),
            [(e.event_id, stamp, e.job_id, e.run_id, e.state, e.payload) for e in batch],
            conflict=("job_id", "event_id"), returning=("job_id", "event_id"))}
        cat = self.policy.catalogue.current  # ingest() refreshed it for this batch (a stat())
        routed: list[Routed] = []
        recorded: list[events.Event] = []
        accepted: list[events.Event] = []
        # One runs row per run of the batch, and the first final state each run met in it.
        # A backlog holds a run's RUNNING and its end in one batch: the row goes in already
        # final, one insert where an insert and an update were (bench a: main-thread CPU
        # -7 %). A run whose row was there before the batch gets its end by FINISH_RUN.
        rows: dict[tuple[str, str], list[Any]] = {}
        finishes: dict[tuple[str, str], tuple[Any, ...]] = {}
        for e in batch:
            if (e.job_id, e.event_id) not in fresh:
                continue  # a duplicate: recorded once already, alerts once already
            fresh.discard((e.job_id, e.event_id))
            accepted.append(e)
            metrics.count_event(e.state)
            self.last_event_at = time.monotonic()
            eff = cat.effective(e.job_id, e.alerts, e.tags)
            if e.run_id and e.state in events.RUN_STATES:
                recorded.append(e)
                key = (e.job_id, e.run_id)
                # A retried attempt's FAILED keeps the run RUNNING (its long-run clock goes on
                # from started_at; `at` is when the attempt failed, not when the run began).
                run_state = "RUNNING" if e.retrying else e.state
                started = e.started_at or (e.at if e.state == "RUNNING" else None)
                final = state.is_final(run_state)
                finished = (e.finished_at or e.at) if final else None
                if final and key not in finishes:
                    finishes[key] = (e.state, finished, stamp, started, e.job_id, e.run_id)
                    row = rows.get(key)
                    if row is not None and row[2] == "RUNNING":
                        # as FINISH_RUN would leave it
                        row[2:7] = [e.state, row[3] or started, finished, stamp, None]
                if key not in rows:
                    deadline = None
                    minutes = eff.alerts.on_long_run_minutes
                    if run_state == "RUNNING" and isinstance(minutes, float) and started:
                        try:
                            deadline = started + timedelta(minutes=minutes)
                        except OverflowError:
                            deadline = None  # past year 9999: a warning never due
                    overrides = {}
                    if e.alerts is not None:
                        overrides["alerts"] = e.fields["alerts"]
                    if e.tags is not None:
                        overrides["tags"] = list(e.tags)
                    rows[key] = [e.job_id, e.run_id, run_state, started, finished, stamp,
                                 deadline, json.dumps(overrides) if overrides else None]
            routed.extend(self.policy.for_event(e, eff))
        if rows:
            inserted = {(r[0], r[1]) for r in db.insert_new(
                "runs", state.RUN_COLUMNS, [tuple(r) for r in rows.values()],
                conflict=("job_id", "run_id"), returning=("job_id", "run_id"))}
            updates = [f for key, f in finishes.items() if key not in inserted]
            if updates:
                db.executemany(state.FINISH_RUN.format(p=db.proxy.param), updates)
            # A run whose row a retried FAILED made before its RUNNING came: the start, and
            # its long-run clock, arrive now.
            starts = [(r[3], r[6], r[0], r[1]) for key, r in rows.items()
                      if key not in inserted and r[2] == "RUNNING" and r[3] is not None]
            if starts:
                db.executemany(state.START_RUN.format(p=db.proxy.param), starts)
        # Learned deadlines and recoveries read the runs rows just written (same transaction).
        routed.extend(Routed(*due) for due in incidents.after_runs_recorded(
            self.policy.config, recorded, cat, routed, now))
        schedules.on_events(accepted, cat, now)
        return self.deliveries.claim(routed, stamp)
