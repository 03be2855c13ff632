"""The delivery lifecycle, in one place: claim -> submit -> finish, and the sweeps that redo
what a stop or a dead peer left unfinished.

A delivery is one (alert, transport, recipient). It is claimed by inserting its row in the
same transaction as the event (or long-run mark) that made it due; only the rows an insert
actually created are ours to send, which is what makes "never the same alert twice" hold
across restarts and replicas. Its audit row and its `done` mark are written together.
Used by the daemon's main thread only.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta

from nomaflowd import db
from nomaflowd.alerts import Alert
from nomaflowd.dispatch import Attempt, Dispatcher, Result, record
from nomaflowd.policy import Routed

logger = logging.getLogger(__name__)

BATCH = 1000
# How long a result may wait for its audit row. Each record is a commit on the main thread
# (with synchronous=FULL, an fsync); one per result put the next file in line behind it.
# Waiting this long records ~10 results in one commit at 200 events/s. A crash in this
# window only re-sends (the claims are still open), as a crash between send and record
# always did.
RECORD_DELAY = 0.05
RESENT = "sent again after a restart (it may have gone out before, without a verdict)"
HELD = "held in line when the daemon stopped; sent after the restart"
NO_TRANSPORT = "no transport is configured, so nobody was notified"


def claim(routed: Iterable[Routed], replica: str, now: datetime | str) -> list[Attempt]:
    """Insert one claimed delivery per target; only the rows this call inserted are ours.

    Runs inside the caller's transaction. An alert with no target at all (no transport is
    configured) still gets one claim, recorded as FAILED_TRANSPORT: "who got paged for X?"
    must be able to answer "nobody, and why".
    """
    rows, alerts_by_key = [], {}
    errors: dict[tuple[str, str, str], str] = {}
    for r in routed:
        alerts_by_key[r.alert.key] = r.alert
        alert = dict(vars(r.alert))  # flat fields (dataclasses.asdict deep-copies: 10x slower)
        targets = [(t.transport, t.recipient, t.error) for t in r.plan.targets]
        if not targets and not r.plan.skipped and not r.plan.duplicates:
            targets = [("", "-", NO_TRANSPORT)]
        for transport, recipient, error in targets:
            errors[(r.alert.key, transport, recipient)] = error
            rows.append((r.alert.key, transport, recipient, r.alert.event_id,
                         json.dumps({"alert": alert, "error": error}, separators=(",", ":")),
                         "claimed", replica, now, 1))
    inserted = db.insert_new(
        "deliveries", ("alert_key", "transport", "recipient", "event_id", "context", "state",
                       "claimed_by", "claimed_at", "attempts"), rows,
        conflict=("alert_key", "transport", "recipient"),
        returning=("id", "alert_key", "transport", "recipient"))
    return [Attempt(alerts_by_key[key], transport, recipient, delivery_id=ident,
                    error=errors[(key, transport, recipient)])
            for ident, key, transport, recipient in inserted]


class Deliveries:
    def __init__(self, dispatcher: Dispatcher, replica: str, lease_seconds: float) -> None:
        self.dispatcher = dispatcher
        self.replica = replica
        self.lease_seconds = lease_seconds
        self.unrecorded: list[Result] = []  # results whose audit rows wait for the database
        # Told of every result once recorded; returns alerts to claim in the same transaction
        # (the fallback's transport streaks, see fallback.py).
        self.on_recorded: Callable[[list[Result], datetime], list[Routed]] | None = None
        self.closing = False  # at shutdown: what on_recorded claims waits for the next start
        self.waiting_since = 0.0  # time.monotonic() when the oldest unrecorded result came
        self.unreadable: set[int] = set()  # claims another version wrote: said once, left
        self.replay = False  # `unrecorded` holds results whose recording failed once

    def claim(self, routed: Iterable[Routed], now: datetime | str) -> list[Attempt]:
        return claim(routed, self.replica, now)

    def submit(self, attempts: Iterable[Attempt]) -> None:
        for attempt in attempts:
            self.dispatcher.submit(attempt)

    def collect(self) -> int:
        """Take whatever the dispatcher handed back; record it all once the oldest result has
        waited RECORD_DELAY (or BATCH wait). Returns how many attempts came back."""
        results = self.dispatcher.take()
        if results:
            if not self.unrecorded:
                self.waiting_since = time.monotonic()
            self.unrecorded.extend(results)
        if self.record_due() == 0.0:
            self.finish([])
        return len(results)

    def record_due(self) -> float | None:
        """Seconds until the waiting results are to be recorded; None when none wait."""
        if not self.unrecorded:
            return None
        if len(self.unrecorded) >= BATCH:
            return 0.0
        return max(0.0, self.waiting_since + RECORD_DELAY - time.monotonic())

    def finish(self, results: list[Result]) -> None:
        """Audit rows, log lines and done marks for `results` (and any kept from an outage)."""
        self.unrecorded.extend(results)
        if self.unrecorded:
            done = self.unrecorded
            try:
                record(done, self.replica, replay=self.replay)
            except BaseException:  # an outage: kept for next time
                self.replay = True  # its commit may have landed, the answer lost
                raise
            self.replay = False
            self.unrecorded = []
            if self.on_recorded is not None:
                now = db.utcnow()
                with db.proxy.atomic():
                    attempts = self.claim(self.on_recorded(done, now), db.stamp(now))
                if not self.closing:  # else resume() sends them at the next start
                    self.submit(attempts)

    def in_hand(self) -> set[int]:
        """Delivery ids this process is still working on (not to be swept)."""
        ids = set(self.dispatcher.held)
        ids.update(r.attempt.delivery_id for r in self.unrecorded
                   if r.attempt.delivery_id is not None)
        return ids

    def resume(self) -> int:
        """At start: this replica's claims left unfinished by the last stop go out again."""
        d = db.DeliveryRow
        rows = list(d.select().where((d.state == "claimed") & (d.claimed_by == self.replica)))
        resent = self.reclaim(rows, self.replica, None)
        if resent:
            logger.warning("%d notification(s) left unfinished by the last stop are being"
                           " sent now", resent)
        return resent

    def sweep(self, now: datetime, grace: float = 5.0) -> int:
        """This replica's claims that nothing in this process is working on (an error between
        claim and submit, a lost hand-back) are sent again."""
        d = db.DeliveryRow
        cutoff = now - timedelta(seconds=grace)
        rows = [r for r in d.select().where((d.state == "claimed") & (d.claimed_by == self.replica)
                                            & (d.claimed_at < cutoff)).limit(BATCH)
                if r.id not in self.in_hand()]
        swept = self.reclaim(rows, self.replica, "sent by the sweep: its first send was lost")
        if swept:
            logger.warning("%d unfinished notification(s) found by the sweep; sending them",
                           swept)
        return swept

    def take_over(self, now: datetime) -> int:
        """Claims of replicas whose heartbeat is older than their lease: a peer died mid-send.

        Each peer is judged by the lease it published (its own poll_seconds): by ours, a
        peer polling less often than we do was taken for dead while it sent, and every alert
        went out twice. Only claims for transports this replica has are taken: one it does
        not have would be recorded FAILED_TRANSPORT, and lost to the peer that has it."""
        r = db.ReplicaRow
        dead = [row.replica_id for row in r.select(r.replica_id, r.seen_at, r.lease_seconds)
                .where(r.replica_id != self.replica)
                if row.seen_at < now - timedelta(seconds=row.lease_seconds or self.lease_seconds)]
        d = db.DeliveryRow
        mine = list(self.dispatcher.transports)
        taken = 0
        for replica in dead:
            rows = list(d.select().where((d.state == "claimed") & (d.claimed_by == replica)
                                         & (d.transport.in_(mine) | (d.transport == "")))
                        .limit(BATCH))  # "": recorded, never sent (routing found no one)
            taken += self.reclaim(rows, replica,
                                  f"taken over from replica {replica}, silent past its lease")
        if taken:
            logger.warning("took over %d notification(s) from silent replica(s) %s", taken,
                           ", ".join(dead))
        return taken

    def reclaim(self, rows: list[db.DeliveryRow], owner: str, note: str | None) -> int:
        """Move claims from `owner` to this replica (conditionally: one winner) and send them.
        `note` None: say whether the last stop left it mid-send or never tried."""
        d = db.DeliveryRow
        count = 0
        now = db.utcnow()
        for row in rows:
            if row.id in self.unreadable:
                continue
            won = d.update(claimed_by=self.replica, claimed_at=now,
                           attempts=d.attempts + 1).where(
                (d.id == row.id) & (d.state == "claimed") & (d.claimed_by == owner)).execute()
            if not won:
                continue
            try:
                context = json.loads(row.context)
                alert = Alert.stored(context["alert"])
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                # Written by another version of nomaflowd (a rollback, a peer not yet
                # upgraded): left claimed for one that can read it, said, never a crash.
                d.update(claimed_by=owner).where(d.id == row.id).execute()
                self.unreadable.add(row.id)
                logger.error("claim %s cannot be read by this version of nomaflowd (%s: %s);"
                             " left for the version that wrote it", row.alert_key,
                             type(exc).__name__, exc)
                continue
            why = note if note is not None else (HELD if row.attempts < 1 else RESENT)
            self.dispatcher.submit(Attempt(alert, row.transport, row.recipient,
                                           delivery_id=row.id, error=context.get("error"),
                                           note=why))
            count += 1
        return count

    def peers(self) -> bool:
        """Has another replica used this database (a heartbeat row not ours)? Only then can
        this one's claims be taken over."""
        r = db.ReplicaRow
        return bool(r.select(r.id).where(r.replica_id != self.replica).exists())

    def recheck(self) -> int:
        """After this replica's lease ran out (frozen past it): what its senders held back
        goes out if the claim is still its own; what a peer took over meanwhile is left to
        that peer. Returns how many were left."""
        withheld, self.dispatcher.withheld = self.dispatcher.withheld, []
        if not withheld:
            return 0
        d = db.DeliveryRow
        ids = [a.delivery_id for a in withheld if a.delivery_id is not None]
        ours: set[int] = set()
        for i in range(0, len(ids), BATCH):
            ours.update(row.id for row in d.select(d.id).where(
                d.id.in_(ids[i:i + BATCH]) & (d.state == "claimed")
                & (d.claimed_by == self.replica)))
        left = [a for a in withheld if a.delivery_id is not None and a.delivery_id not in ours]
        for attempt in withheld:
            if attempt.delivery_id is None or attempt.delivery_id in ours:
                self.dispatcher.submit(attempt)
        for attempt in left:
            self.dispatcher.held.discard(attempt.delivery_id)
        if left:
            logger.warning("this daemon went silent past its lease: %d notification(s) are"
                           " left to the replica that took them over", len(left))
        return len(left)

    def release(self, unsent: list[Attempt]) -> None:
        """At shutdown: claims that were never tried stay claimed, marked as not attempted,
        so the next start sends them without calling them a resend."""
        ids = [(a.delivery_id,) for a in unsent if a.delivery_id is not None]
        if ids:
            with db.proxy.atomic():
                db.executemany("UPDATE deliveries SET attempts = attempts - 1 WHERE id = "
                               f"{db.proxy.param} AND state = 'claimed'", ids)
            logger.info("%d notification(s) waiting in line are kept for the next start",
                        len(ids))
