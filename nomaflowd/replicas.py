"""This daemon's identity among replicas: its heartbeat, and two daemons on one replica_id.

Take-over of a silent peer's claims (deliveries.py) trusts that a replica_id belongs to one
live process. Each heartbeat stamps the row with this process's instance id, so a second
live daemon on the same id gives itself away by overwriting it.
"""

from __future__ import annotations

import logging
import time
import uuid

from nomaflowd import db

logger = logging.getLogger(__name__)


class Identity:
    def __init__(self, replica_id: str, lease_seconds: float) -> None:
        self.replica_id = replica_id
        self.instance = uuid.uuid4().hex[:12]
        self.lease_seconds = lease_seconds
        self.twin: str | None = None   # another live process using our replica_id...
        self.twin_seen = 0.0            # ...last seen then (time.monotonic())
        self.beats = 0
        self.said = -60.0

    def beat(self) -> None:
        """Stamp the heartbeat; note (and say once a minute) a twin on our replica_id."""
        _, other = db.heartbeat(self.replica_id, self.instance, self.lease_seconds)
        self.beats += 1
        if other and self.beats > 1:  # at the first beat it is our own predecessor's id
            self.twin, self.twin_seen = other, time.monotonic()
        elif self.twin and time.monotonic() - self.twin_seen > self.lease_seconds:
            logger.info("replica_id %r: the other daemon using it is gone", self.replica_id)
            self.twin = None
        if self.twin and time.monotonic() - self.said >= 60:
            self.said = time.monotonic()
            logger.error("replica_id %r is also used by another live daemon (instance %s; this"
                         " is %s): take-over and claims need one id per daemon; set"
                         " daemon.replica_id", self.replica_id, self.twin, self.instance)

    @property
    def unique(self) -> bool:
        return self.twin is None
