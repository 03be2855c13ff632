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
from collections.abc import Mapping
from dataclasses import dataclass, field
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
        """(digest groups due now, single alerts in arrival order)."""
        groups: dict[str, list[Waiting]] = {}
        singles: list[Waiting] = []
        for w in self.waiting:
            if w.refused or now - w.since >= self.digest_after:
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


def take_tokens(transport: str, rate_per_minute: float, burst: int, wanted: int,
                pause_seconds: float = 0.0) -> tuple[int, float]:
    """Take up to `wanted` tokens from the shared bucket; returns (granted, seconds to next).

    One short transaction on the database's clock, so replicas share the bucket and no
    replica's clock skew can mint tokens. `pause_seconds` records a 429's Retry-After.
    """
    per_second = rate_per_minute / 60.0
    database = db.proxy.obj
    lock = {"lock_type": "IMMEDIATE"} if isinstance(database, pw.SqliteDatabase) else {}
    with database.atomic(**lock):
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

