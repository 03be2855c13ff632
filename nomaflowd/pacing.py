"""Provider-aware pacing: a token bucket per transport, a waiting line, digests instead of drops.

A transport with `rate_per_minute` takes a token per message from a bucket kept in the
database, so every replica sharing it draws from the same bucket. Alerts that find it
empty wait; once one has waited `digest_after_seconds`, everything waiting for the same
recipient goes out as one digest. A 429 pauses the transport for its Retry-After and puts
the refused alert back in line, to be folded into the next digest: a rate limit delays
alerts, it never loses them.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

import peewee as pw

from nomaflowd import db


@dataclass
class Waiting:
    attempt: Any                  # dispatch.Attempt
    since: float                  # time.monotonic() when it joined the line
    refused: str = ""             # why it is back in line (a 429), for its audit row


@dataclass
class Lane:
    """One transport's line of alerts waiting for a token, a pause, or a digest."""

    transport: str
    rate_per_minute: float | None
    burst: int | None
    digest_after: float
    waiting: deque[Waiting] = field(default_factory=deque)
    paused_until: float = 0.0     # time.monotonic()
    pause_to_share: float = 0.0   # seconds of pause still to write to the shared bucket
    # A 429 came back: the next message waits, past the pause, for the lane's other sends
    # in flight, whose answers are most likely 429s too; then the refused alerts go out
    # together, one digest. Sent again alone at each pause's end, the first one refused
    # used its MAX_REFUSALS up while the others were still on their way back.
    settling: bool = False

    @classmethod
    def from_settings(cls, name: str, settings: Mapping[str, Any]) -> Lane:
        return cls(name, settings.get("rate_per_minute"), settings.get("burst"),
                   float(settings.get("digest_after_seconds") or 10.0))

    @property
    def paced(self) -> bool:
        return self.rate_per_minute is not None

    def holds(self, now: float) -> bool:
        """Must a new alert join the line rather than go straight out?"""
        return self.paced or bool(self.waiting) or now < self.paused_until

    def pause(self, seconds: float, now: float) -> None:
        self.paused_until = max(self.paused_until, now + seconds)
        self.pause_to_share = max(self.pause_to_share, seconds)

    def plan(self, now: float) -> tuple[list[list[Waiting]], list[Waiting]]:
        """(digest groups due now, single alerts in arrival order). A recipient's digest is
        due once one of its alerts was refused or has waited digest_after, and then takes
        everything waiting for that recipient, the alerts that came after it too."""
        due = {w.attempt.recipient for w in self.waiting
               if w.refused or now - w.since >= self.digest_after}
        groups: dict[str, list[Waiting]] = {}
        singles: list[Waiting] = []
        for w in self.waiting:
            if w.attempt.recipient in due:
                groups.setdefault(w.attempt.recipient, []).append(w)
            else:
                singles.append(w)
        return list(groups.values()), singles

    def next_due(self, now: float) -> float | None:
        """Seconds until the oldest single alert becomes part of a digest."""
        ages = [w.since for w in self.waiting if not w.refused]
        if not ages:
            return None
        return max(0.0, min(ages) + self.digest_after - now)


# An upstream that answers 429 this many times in a row to the same alert is refusing it,
# not pacing us: the alert is recorded as FAILED_DELIVERY instead of waiting forever.
MAX_REFUSALS = 5


class Pacer:
    """Every paced transport's lane. Used by the dispatcher's owning thread only (no lock)."""

    def __init__(self) -> None:
        self.lanes: dict[str, Lane] = {}

    def configure(self, settings: Mapping[str, Mapping[str, Any]]) -> list[Any]:
        """New lanes for `settings` (transport name -> settings); alerts already in line keep
        their place. Returns the attempts whose transport is gone."""
        lanes = {}
        for name, s in settings.items():
            lane = Lane.from_settings(name, s)
            if name in self.lanes:
                lane.waiting = self.lanes[name].waiting
                lane.paused_until = self.lanes[name].paused_until
            lanes[name] = lane
        orphans = [w.attempt for name, lane in self.lanes.items() if name not in lanes
                   for w in lane.waiting]
        self.lanes = lanes
        return orphans

    @property
    def waiting(self) -> int:
        return sum(len(lane.waiting) for lane in self.lanes.values())

    def attempts(self) -> Iterable[Any]:
        for lane in self.lanes.values():
            for w in lane.waiting:
                yield w.attempt

    def hold(self, attempt: Any, now: float) -> bool:
        """Put the attempt in its transport's line if it must wait; False: send it now."""
        lane = self.lanes.get(attempt.transport)
        if lane is None or not lane.holds(now):
            return False
        lane.waiting.append(Waiting(attempt, now))
        return True

    def refused(self, attempt: Any, retry_after: float, detail: str, now: float) -> bool:
        """A 429 for `attempt` (one alert or a digest): pause the lane and put its alerts back
        in line for the next digest. False when they were refused too often (or the lane is
        gone): the caller records them as refused."""
        lane = self.lanes.get(attempt.transport)
        members = attempt.members or (attempt,)
        if lane is None or max(m.refusals for m in members) + 1 >= MAX_REFUSALS:
            return False
        note = f"refused with {detail}, then held for a digest"
        lane.pause(retry_after, now)
        lane.settling = True
        for m in reversed(members):
            again = replace(m, refusals=m.refusals + 1,
                            note=m.note if m.refusals else m.with_note(note).note)
            lane.waiting.appendleft(Waiting(again, now, refused=note))
        return True

    def due(self, now: float, digests: Callable[[str], bool],
            busy: Callable[[str], bool],
            ) -> tuple[list[tuple[str, list[Any]]], float | None]:
        """What may go out now: (transport, attempts) groups, one message each (several
        attempts = a digest); and seconds until it is worth asking again (None: nothing waits).
        `digests(name)` says whether a transport can send digests; `busy(name)` whether it
        has sends in flight (each one's answer makes the owner ask again)."""
        sends: list[tuple[str, list[Any]]] = []
        next_call: float | None = None

        def soon(seconds: float | None) -> None:
            nonlocal next_call
            if seconds is not None:
                next_call = seconds if next_call is None else min(next_call, seconds)

        for lane in self.lanes.values():
            if lane.paced and lane.pause_to_share:
                take_tokens(lane.transport, lane.rate_per_minute or 1, lane.burst or 1, 0,
                            lane.pause_to_share)
                lane.pause_to_share = 0.0
            if not lane.waiting:
                continue
            if now < lane.paused_until:
                soon(lane.paused_until - now)
                continue
            if lane.settling:
                if busy(lane.transport):
                    continue
                lane.settling = False
            groups, singles = lane.plan(now)
            if not digests(lane.transport):  # each alert on its own, in order, as tokens allow
                singles = [w for g in groups for w in g] + singles
                groups = []
            messages: list[list[Waiting]] = groups + [[w] for w in singles]
            if lane.paced:
                granted, wait = take_tokens(lane.transport, lane.rate_per_minute or 1,
                                            lane.burst or 1, len(messages))
            else:
                granted, wait = len(messages), 0.0
            chosen = messages[:granted]
            taken = {id(w) for group in chosen for w in group}
            lane.waiting = deque(w for w in lane.waiting if id(w) not in taken)
            sends.extend((lane.transport, [w.attempt for w in group]) for group in chosen)
            if len(messages) > granted:
                soon(wait)
            soon(lane.next_due(now))
        return sends, next_call

    def drain(self) -> list[Any]:
        """Every waiting attempt, taken out of line (at shutdown: never attempted)."""
        out = list(self.attempts())
        for lane in self.lanes.values():
            lane.waiting.clear()
        return out


def take_tokens(transport: str, rate_per_minute: float, burst: int, wanted: int,
                pause_seconds: float = 0.0) -> tuple[int, float]:
    """Take up to `wanted` tokens from the shared bucket; returns (granted, seconds to next).

    One short transaction on the database's clock, so replicas share the bucket and no
    replica's clock skew can mint tokens. `pause_seconds` records a 429's Retry-After.
    """
    per_second = rate_per_minute / 60.0
    database = db.proxy.obj
    with database.atomic():  # on SQLite, BEGIN IMMEDIATE (db._SqliteDatabase)
        now = db.db_now()

        def locked() -> db.BucketRow | None:
            query = db.BucketRow.select().where(db.BucketRow.transport == transport)
            if isinstance(database, pw.PostgresqlDatabase):
                query = query.for_update()
            row: db.BucketRow | None = query.first()
            return row

        row = locked()
        if row is None:
            db.BucketRow.insert(transport=transport, tokens=float(burst), updated_at=now,
                                paused_until=None).on_conflict_ignore().execute()
            row = locked()
        assert row is not None
        tokens = min(float(burst),
                     row.tokens + max(0.0, (now - row.updated_at).total_seconds()) * per_second)
        paused_until = row.paused_until
        if pause_seconds:
            paused_until = max(paused_until or now, now + timedelta(seconds=pause_seconds))
            tokens = 0.0
        granted = 0
        if paused_until is None or paused_until <= now:
            paused_until = None
            granted = min(wanted, math.floor(tokens))
            tokens -= granted
        db.BucketRow.update(tokens=tokens, updated_at=now, paused_until=paused_until).where(
            db.BucketRow.id == row.id).execute()
    if paused_until is not None:
        return 0, max(0.05, (paused_until - now).total_seconds())
    wait = 0.0 if granted == wanted else max(0.05, (1.0 - tokens) / per_second)
    return granted, wait

