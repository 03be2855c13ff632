"""peewee models for the SPEC's tables (events, runs, notifications) and the delivery claims."""

from __future__ import annotations

import copy
import fcntl
import logging
import os
import re
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


@contextmanager
def _without_psycopg2() -> Iterator[None]:
    """peewee and playhouse import every driver they find when they are themselves imported,
    and psycopg2 (libpq with its own OpenSSL) is 10 MB of a SQLite sidecar's RSS that it
    never uses. So psycopg2 is hidden from those imports and handed to peewee when a
    PostgreSQL URL is opened (postgres_driver())."""
    hide = "psycopg2" not in sys.modules
    if hide:
        sys.modules["psycopg2"] = None  # type: ignore[assignment]  # import psycopg2: ImportError
    try:
        yield
    finally:
        if hide:
            del sys.modules["psycopg2"]


with _without_psycopg2():
    import peewee as pw

from nomaflowd.errors import ConfigError, NomaflowError  # noqa: E402

logger = logging.getLogger(__name__)

proxy = pw.DatabaseProxy()
# The open SQLite database's write-ahead log, which make_durable() flushes (None: PostgreSQL,
# or an in-memory database).
_wal_path: str | None = None
_file: tuple[str, int, int] | None = None  # the SQLite file opened: path, device, inode


def file_path() -> str | None:
    return _file[0] if _file is not None else None


def file_gone() -> str | None:
    """How the SQLite file opened is no longer at its path ("removed", "replaced by another
    file"), or None: writes after that go to a file nobody will open again."""
    if _file is None:
        return None
    path, dev, ino = _file
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "removed"
    except OSError:
        return None  # cannot tell (EACCES, EIO): the next query says what is wrong
    return None if (st.st_dev, st.st_ino) == (dev, ino) else "replaced by another file"
PRUNE_BATCH = 2000
# pg_advisory_xact_lock key that serialises schema creation and migration across replicas
# ("nomaflow" in ASCII, so another application's key is unlikely to collide with it).
SCHEMA_LOCK = int.from_bytes(b"nomaflow", "big")
# The tables' version, kept in `nomaflowd_schema` (a database from before it has none: 0).
# Raise it with any change an older nomaflowd cannot run on (a column it would not fill, a
# unique key it relies on): an older one then refuses the newer tables at start.
SCHEMA_VERSION = 1


class Model(pw.Model):
    class Meta:
        database = proxy
        legacy_table_names = False


class EventRow(Model):
    # Unique per job, not overall (SPEC §15): one job reusing another's id must not
    # suppress that job's event. The plain index serves look-ups by id alone.
    event_id = pw.CharField(max_length=300, index=True)
    received_at = pw.DateTimeField(index=True)
    job_id = pw.CharField(max_length=300)
    run_id = pw.CharField(max_length=300, null=True)
    state = pw.CharField(max_length=16)
    payload = pw.TextField()

    class Meta:
        table_name = "events"
        indexes = ((("job_id", "event_id"), True),)


class RunRow(Model):
    job_id = pw.CharField(max_length=300)
    run_id = pw.CharField(max_length=300)
    state = pw.CharField(max_length=16)
    started_at = pw.DateTimeField(null=True)
    finished_at = pw.DateTimeField(null=True)
    updated_at = pw.DateTimeField()
    long_run_alerted_at = pw.DateTimeField(null=True)
    # Stored so that the long-run poll is one indexed range query, not a scan of all runs.
    long_run_deadline = pw.DateTimeField(null=True)
    # The RUNNING event's own alerts/tags overrides, needed when its warning is due.
    overrides = pw.TextField(null=True)
    # on_long_run_minutes = "auto": the job's usual duration when the run started (the
    # warning says what is normal).
    usual_minutes = pw.FloatField(null=True)

    class Meta:
        table_name = "runs"
        # (job_id, state, finished_at): a job's recent successes (learned thresholds) and the
        # runs since its last success (incidents), both read while an event is committed.
        # (state, long_run_deadline): the long-run poll is one range scan over due runs only.
        indexes = ((("job_id", "run_id"), True), (("state", "updated_at"), False),
                   (("state", "long_run_deadline"), False),
                   (("job_id", "state", "finished_at"), False),
                   # a job's runs around a scheduled time (schedules: was it missed?)
                   (("job_id", "updated_at"), False))


# The runs that had a long-run warning, by job (incidents.open_candidates, once a batch):
# a partial index, so it holds only those runs. It replaced an index on
# (long_run_alerted_at, job_id) that SQLite's planner passed over for (job_id, updated_at),
# reading every run of the batch's jobs: 7.4 ms a batch at 20,000 runs and growing with the
# history, against 0.18 ms; and every run insert paid for an entry in it.
RunRow.add_index(RunRow.index(RunRow.job_id, where=RunRow.long_run_alerted_at.is_null(False),
                              name="runs_warned_job_id"))
# Indexes an earlier version created that nothing reads any more: dropped at start.
RETIRED_INDEXES = {"runs": ("runs_long_run_alerted_at_job_id", "runs_long_run_deadline")}


class NotificationRow(Model):
    created_at = pw.DateTimeField(index=True)
    event_id = pw.CharField(max_length=300, null=True)
    job_id = pw.CharField(max_length=300, null=True)
    run_id = pw.CharField(max_length=300, null=True)
    alert = pw.CharField(max_length=32)
    level = pw.CharField(max_length=16)
    transport = pw.CharField(max_length=200)
    transport_type = pw.CharField(max_length=32)
    recipient = pw.CharField(max_length=400)
    outcome = pw.CharField(max_length=32)
    detail = pw.TextField(default="")
    duration_ms = pw.IntegerField(null=True)
    replica = pw.CharField(max_length=200)

    class Meta:
        table_name = "notifications"
        indexes = (
            (("job_id", "created_at"), False),
            (("job_id", "run_id"), False),  # who got a run's failure (recovery), audit --run
            (("level", "created_at"), False),
            (("transport", "created_at"), False),
            (("outcome", "created_at"), False),
            # The notifications page: newest first by id, filtered (keyset pages, no sort).
            (("job_id", "id"), False),
            (("transport", "id"), False),
            (("outcome", "id"), False),
        )


class DeliveryRow(Model):
    """One (alert, transport, recipient): inserted claimed, so it is attempted exactly once."""

    # job/run/kind or job/event/kind: 200 + 200 + the kind, with room to spare.
    alert_key = pw.CharField(max_length=512)
    transport = pw.CharField(max_length=200)
    recipient = pw.CharField(max_length=400)
    event_id = pw.CharField(max_length=300, null=True)
    context = pw.TextField()  # the alert as JSON, to send it again after a crash ('' once done)
    state = pw.CharField(max_length=16, default="claimed")  # claimed -> done
    claimed_by = pw.CharField(max_length=200)
    claimed_at = pw.DateTimeField()
    attempts = pw.IntegerField(default=1)

    class Meta:
        table_name = "deliveries"
        indexes = (
            (("alert_key", "transport", "recipient"), True),
            (("state", "claimed_at"), False),
        )


class SpoolTryRow(Model):
    """Counts how often a spool file was picked up without being finished (crash quarantine)."""

    name = pw.CharField(max_length=400, unique=True)
    tries = pw.IntegerField(default=0)
    updated_at = pw.DateTimeField()

    class Meta:
        table_name = "spool_tries"


class BucketRow(Model):
    """A transport's token bucket, shared by every replica (see pacing.take_tokens)."""

    transport = pw.CharField(max_length=200, unique=True)
    tokens = pw.FloatField()
    updated_at = pw.DateTimeField()
    paused_until = pw.DateTimeField(null=True)

    class Meta:
        table_name = "buckets"


class ReplicaRow(Model):
    """Each replica's heartbeat, stamped with the database's clock (never a replica's)."""

    replica_id = pw.CharField(max_length=200, unique=True)
    seen_at = pw.DateTimeField()
    started_at = pw.DateTimeField()
    # The process behind the heartbeat: two daemons sharing one replica_id overwrite each
    # other's, which is how they are found out (take-over needs ids to be unique).
    instance_id = pw.CharField(max_length=64, null=True)
    # Its own lease (it follows its own poll_seconds): peers judge it by this, not by theirs.
    lease_seconds = pw.FloatField(null=True)

    class Meta:
        table_name = "replicas"


class ScheduleRow(Model):
    """A watched job's expectations (SPEC §12): its next scheduled time, staleness, reminders.

    `next_check` is the earliest of the three deadlines, so the poll is one indexed range
    query; `version` makes each change a conditional update that one replica wins.
    """

    job_id = pw.CharField(max_length=300, unique=True)
    schedule = pw.CharField(max_length=300, null=True)   # "0 2 * * * (Europe/Paris)"
    monitored_since = pw.DateTimeField()
    expected_at = pw.DateTimeField(null=True)            # the scheduled time awaited
    missed_deadline = pw.DateTimeField(null=True)        # expected_at + on_missed_minutes
    disabled = pw.BooleanField(default=False)            # its latest toggle was DISABLED
    toggled_at = pw.DateTimeField(null=True)
    last_run_id = pw.CharField(max_length=300, null=True)
    last_run_state = pw.CharField(max_length=16, null=True)
    last_run_at = pw.DateTimeField(null=True)            # when its newest event was received
    last_success_at = pw.DateTimeField(null=True)
    stale_deadline = pw.DateTimeField(null=True)
    failing_since = pw.DateTimeField(null=True)          # the open failure episode's start
    reminders_sent = pw.IntegerField(default=0)
    remind_deadline = pw.DateTimeField(null=True)
    next_check = pw.DateTimeField(null=True, index=True)
    version = pw.IntegerField(default=0)

    class Meta:
        table_name = "schedules"


class StreakRow(Model):
    """A transport's run of consecutive failed deliveries (fallback, SPEC §12)."""

    transport = pw.CharField(max_length=200, unique=True)
    failures = pw.IntegerField(default=0)
    last_error = pw.TextField(default="")
    undelivered = pw.TextField(default="[]")  # JSON [[job, run, kind], ...] of this streak
    started_at = pw.DateTimeField(null=True)
    alerted_at = pw.DateTimeField(null=True)  # transport_failing claimed for this streak
    updated_at = pw.DateTimeField()

    class Meta:
        table_name = "transport_streaks"


class ThreadRow(Model):
    """A chat thread started by the first `failed` alert of a job's failure episode (Slack
    app mode); the episode's later alerts reply in it, its recovery closes it (threads.py)."""

    transport = pw.CharField(max_length=200)
    recipient = pw.CharField(max_length=400)
    job_id = pw.CharField(max_length=300)
    # The finished_at of the job's last success before the episode ('' when none): the same
    # for every alert of one episode, a new value once a success ends it.
    episode = pw.CharField(max_length=40)
    ts = pw.CharField(max_length=64)         # Slack's ts of the first message
    channel = pw.CharField(max_length=200)   # Slack's channel id, which chat.update needs
    text = pw.TextField()                    # the first message, kept when it is updated
    created_at = pw.DateTimeField(index=True)

    class Meta:
        table_name = "chat_threads"
        indexes = ((("transport", "recipient", "job_id", "episode"), True),)


MODELS: tuple[type[Model], ...] = (EventRow, RunRow, NotificationRow, DeliveryRow, SpoolTryRow,
                                   ReplicaRow, BucketRow, ScheduleRow, StreakRow, ThreadRow)


def insert_new(table: str, columns: tuple[str, ...], rows: list[tuple[Any, ...]],
               conflict: tuple[str, ...], returning: tuple[str, ...]) -> list[tuple[Any, ...]]:
    """INSERT rows, skipping those that clash on `conflict`; returns the rows that went in.

    Hand-built multi-row VALUES: on the ingest hot path peewee's query builder cost more
    than the database (about 150 µs a row against 10).
    """
    p = proxy.param
    head = (f'INSERT INTO "{table}" ({", ".join(columns)}) VALUES ')
    tail = (f' ON CONFLICT ({", ".join(conflict)}) DO NOTHING'
            f' RETURNING {", ".join(returning)}')
    one = "(" + ", ".join([p] * len(columns)) + ")"
    out: list[tuple[Any, ...]] = []
    # well under SQLite's variable limit; PostgreSQL takes a page per round trip
    step = (PAGE_SIZE if isinstance(proxy.obj, pw.PostgresqlDatabase)
            else max(1, MAX_PARAMS // len(columns)))
    for i in range(0, len(rows), step):
        chunk = rows[i:i + step]
        params = [value for row in chunk for value in row]
        out.extend(proxy.execute_sql(head + ", ".join([one] * len(chunk)) + tail,
                                     params).fetchall())
    return out


def utcnow() -> datetime:
    """Now, naive UTC: the database's convention for every timestamp."""
    return datetime.now(UTC).replace(tzinfo=None)


def on_sqlite() -> bool:
    return isinstance(proxy.obj, pw.SqliteDatabase)


def stamp(value: datetime) -> datetime | str:
    """A timestamp parameter for plain SQL, converted once for many rows.

    SQLite stores what its adapter makes of a datetime, `isoformat(" ")`: doing that once
    per batch instead of once per row and column is measurable at 10,000 events/s.
    """
    if on_sqlite():
        return value.isoformat(" ")
    return value


def as_datetime(value: Any) -> datetime | None:
    """A timestamp from plain SQL: SQLite hands back text, PostgreSQL a datetime."""
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value))


def db_now() -> datetime:
    """The database server's clock, UTC: leases must not depend on any replica's clock."""
    database = proxy.obj
    if isinstance(database, pw.PostgresqlDatabase):
        value = database.execute_sql("SELECT now() AT TIME ZONE 'UTC'").fetchone()[0]
        return value  # type: ignore[no-any-return]
    text = database.execute_sql("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')").fetchone()[0]
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S.%f")


def heartbeat(replica: str, instance: str = "", lease: float | None = None
              ) -> tuple[datetime, str | None]:
    """Record that this `instance` of `replica` is alive, and the `lease` its peers give it.
    Returns the database's now and the instance id found in the row when another process
    wrote it since (None if none did)."""
    now = db_now()
    with proxy.atomic():
        row = ReplicaRow.get_or_none(ReplicaRow.replica_id == replica)
        if row is None:
            ReplicaRow.insert(replica_id=replica, seen_at=now, started_at=now,
                              instance_id=instance or None, lease_seconds=lease).on_conflict(
                conflict_target=[ReplicaRow.replica_id],
                update={ReplicaRow.seen_at: now, ReplicaRow.instance_id: instance or None,
                        ReplicaRow.lease_seconds: lease},
            ).execute()
            return now, None
        ReplicaRow.update(seen_at=now, instance_id=instance or None,
                          lease_seconds=lease).where(ReplicaRow.id == row.id).execute()
    other = row.instance_id
    return now, other if other and instance and other != instance else None


# The database failing (a lost connection, a locked or full disk, a refusal of every write):
# ingest waits and tries again, files stay in the spool. (peewee maps the drivers' errors
# onto its own; see executemany().)
OUTAGES: tuple[type[BaseException], ...] = (pw.PeeweeException, sqlite3.Error)
# A value the database cannot store (too long for a column, a NUL, a lone surrogate): the
# fault of the one event that holds it, which is quarantined; the files after it flow.
VALUE_ERRORS: tuple[type[BaseException], ...] = (pw.DataError, ValueError, OverflowError)


# Rows per round trip to PostgreSQL. psycopg2's executemany is one round trip per row, which
# was a third of a PostgreSQL replica's ingest time; SQLite's is in-process and stays as is.
PAGE_SIZE = 500
# Parameters per statement, well under SQLite's limit (32,766 since 3.32; 999 before).
MAX_PARAMS = 900
_VALUES = re.compile(r"VALUES \((?:%s, )*%s\)")


def executemany(sql: str, rows: list[tuple[Any, ...]]) -> None:
    """cursor.executemany with the driver's errors turned into peewee's, as execute_sql does.

    On PostgreSQL an `INSERT … VALUES (…)` goes as multi-row VALUES and anything else as
    statements joined per page (psycopg2.extras), PAGE_SIZE rows per round trip.
    """
    with pw.__exception_wrapper__:
        cursor = proxy.cursor()
        if not isinstance(proxy.obj, pw.PostgresqlDatabase):
            cursor.executemany(sql, rows)
            return
        from psycopg2.extras import execute_batch, execute_values

        multi, found = _VALUES.subn("VALUES %s", sql, count=1)
        if found:
            execute_values(cursor, multi, rows, page_size=PAGE_SIZE)
        else:
            execute_batch(cursor, sql, rows, page_size=PAGE_SIZE)


def execute_in(sql: str, values: list[Any]) -> None:
    """`sql` ends in `IN`: one statement per MAX_PARAMS `values`, where executemany() makes
    one per value (on PostgreSQL, a page of statements that the server parses one by one)."""
    p = proxy.param
    for i in range(0, len(values), MAX_PARAMS):
        chunk = values[i:i + MAX_PARAMS]
        proxy.execute_sql(f"{sql} ({', '.join([p] * len(chunk))})", chunk)


def postgres_driver() -> None:
    """Give peewee the psycopg2 it was not allowed to see at its import (see the top)."""
    if getattr(pw, "psycopg2", None) is not None:
        return
    import psycopg2
    from psycopg2 import errors, extensions
    from psycopg2.extras import register_uuid

    pw.psycopg2, pw.pg_extensions, pw.pg_errors = psycopg2, extensions, errors
    register_uuid()


class _SqliteDatabase(pw.SqliteDatabase):
    """Every transaction is BEGIN IMMEDIATE: it takes the write lock first, waiting for it as
    busy_timeout allows. Each of ours writes, and a deferred one that reads first fails at
    once with "database is locked" (SQLITE_BUSY_SNAPSHOT: no wait can help) when another
    connection commits between its read and its first write. The daily retention job met
    the poll's heartbeat that way at most starts of the bench's idle daemon, and was skipped."""

    def begin(self, lock_type: str | None = None) -> None:
        super().begin(lock_type or "IMMEDIATE")


class write:
    """`with db.write():` is proxy.atomic() for the hot path (a batch of events, a batch of
    audit rows). On SQLite, outside any other transaction, it is BEGIN IMMEDIATE and COMMIT
    (ROLLBACK on an error) sent straight to the connection, with the transaction on peewee's
    stack so that an atomic() inside it is a savepoint; elsewhere it is atomic().

    peewee's atomic() goes through five objects and three levels of calls per transaction.
    An empty one cost 98 us of CPU against 41 for the two statements alone, on a thread
    that had slept 5 ms before each (as the main loop does between paced events: its code is
    no longer in the CPU's caches); without the sleeps, 14 against 6.
    """

    __slots__ = ("_atomic", "_conn", "_db")

    def __enter__(self) -> None:
        database = proxy.obj
        if type(database) is not _SqliteDatabase or database.transaction_depth():
            self._atomic = database.atomic()
            self._atomic.__enter__()
            return
        self._atomic = None
        with pw.__exception_wrapper__:
            self._conn = database.connection()
            self._conn.execute("BEGIN IMMEDIATE")
        database.push_transaction(self)
        self._db = database

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._atomic is not None:
            self._atomic.__exit__(exc_type, exc, tb)
            return
        self._db.pop_transaction()
        conn = self._conn
        with pw.__exception_wrapper__:
            # SQLite rolls back on its own after some errors (SQLITE_FULL, SQLITE_IOERR): a
            # ROLLBACK then fails, and its "no transaction is active" hid the real cause.
            if exc_type is not None:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                return
            try:
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise


def open_database(url: str, migrate: bool = True) -> pw.Database:
    """Connect, create or migrate the tables, and bind the models.

    `migrate` False (the commands): a new database is made, an older one is refused (see
    create_or_migrate); only the daemon upgrades the tables."""
    path: Path | None = None
    try:
        if url.startswith("sqlite:///"):
            name = url[len("sqlite:///"):]
            if name != ":memory:":
                path = Path(name)
                path.parent.mkdir(parents=True, exist_ok=True)
            db: pw.Database = _SqliteDatabase(
                name,
                # NORMAL: a commit survives a crash at once and a power cut once
                # make_durable() has run; spool files are deleted only after that.
                # wal_autocheckpoint: the daemon checkpoints on its scheduler's thread
                # (checkpoint()), so its main loop's commits do not stop to copy the WAL
                # back; this larger limit is only a backstop.
                # cache_size: 16 MB of pages per connection, not SQLite's 2 MB. A backlog
                # inserts at random places in the eight indexes of events and runs; with
                # 2 MB their pages were read back ten times a file (strace: 390,000 pread
                # for 40,000 files; 35,000 now), and bench a ran at 0.37-0.47 of the floor
                # against 0.53-0.61 (peak RSS 44.6 -> 61.7 MB).
                pragmas={"journal_mode": "wal", "synchronous": "normal", "busy_timeout": 10000,
                         "wal_autocheckpoint": 10000, "cache_size": -16000,
                         "foreign_keys": 0},
                timeout=10,
            )
            db.returning_clause = True  # SQLite 3.35+: INSERT ... RETURNING for claims
        else:
            if url.startswith("postgres://"):
                url = "postgresql://" + url[len("postgres://"):]
            if url.startswith("postgresql"):
                postgres_driver()
            from playhouse.db_url import connect as url_connect
            db = url_connect(url)
            if isinstance(db, pw.PostgresqlDatabase):
                db._initialize_connection = _bounded_waits
                for name, value in link_bounds().items():
                    db.connect_params.setdefault(name, value)  # the URL's own win
                db._connect = _looked_up_first(db, db._connect)
    except ImportError:
        raise ConfigError(
            "daemon.database is PostgreSQL but no driver is installed;"
            " pip install 'nomaflowd[postgres]'"
        ) from None
    proxy.initialize(db)
    global _wal_path, _file
    _wal_path = f"{path}-wal" if path is not None else None
    _file = None
    try:
        with _startup_lock(path):
            if path is not None:
                _create_private(path)
            db.connect(reuse_if_open=True)
            create_or_migrate(db, migrate)
            if path is not None:
                st = os.stat(path)
                _file = (str(path), st.st_dev, st.st_ino)
    except (pw.PeeweeException, OSError) as exc:
        raise NomaflowError(f"daemon.database cannot be opened: {_why(exc, url)}") from None
    return db


# How long a statement waits for a lock another session holds (LOCK TABLE, a long
# migration): then it fails, as an outage, and the main loop says so and goes on. Without
# it the loop waited as long as the lock was held, silent, and systemd's watchdog killed it.
LOCK_TIMEOUT = "5s"


# A database across a network: a link that goes silent (a partition: no reset, no refusal)
# must become an outage within seconds, said in the log while files wait in the spool. With
# libpq's defaults a query waited for the kernel's retransmissions (about 15 minutes) and a
# connect for its SYN retries (about 2), while systemd's watchdog (WatchdogSec=30, pinged
# every 15 s) killed the daemon, again and again, with nothing in its log. Each wait here
# ends within 11 s. A slow query is not cut short: the server's kernel still acknowledges.
# Each can be set in the URL's query string instead (`?connect_timeout=30`).
LINK_BOUNDS: dict[str, int] = {
    "connect_timeout": 5,         # seconds per address tried
    "tcp_user_timeout": 10_000,   # ms that sent data may go unacknowledged (libpq 12+)
    "keepalives": 1,              # a query sent and acknowledged, its answer lost:
    "keepalives_idle": 5,         # probes after 5 s of silence,
    "keepalives_interval": 2,     # every 2 s,
    "keepalives_count": 3,        # and the connection is given up after 3 unanswered
}


def link_bounds() -> dict[str, int]:
    from psycopg2.extensions import libpq_version

    if libpq_version() >= 120000:
        return LINK_BOUNDS
    return {k: v for k, v in LINK_BOUNDS.items() if k != "tcp_user_timeout"}


def _looked_up_first(database: Any, connect: Any) -> Any:
    """`connect`, after the host's name is looked up within connect_timeout: libpq's own
    lookup comes before its connect_timeout, and with a resolver that does not answer it
    waited resolv.conf's timeouts (30 s and more), past systemd's watchdog. A name that
    resolves (or fails at once) goes on to libpq, which looks it up again and says why."""
    from nomaflowd.resolve import LookupTimeout, lookup

    def looked_up() -> Any:
        params = database.connect_params
        host = str(params.get("host") or "")
        if host and not host.startswith("/") and "," not in host and "hostaddr" not in params:
            timeout = float(params.get("connect_timeout") or LINK_BOUNDS["connect_timeout"])
            try:
                lookup(host, int(params.get("port") or 5432), timeout)
            except LookupTimeout:
                raise pw.OperationalError(
                    f'could not translate host name "{host}" to address: the resolver gave'
                    f" no answer within {timeout:g}s") from None
            except (OSError, ValueError):
                pass  # libpq's own lookup says why, in its words
        return connect()

    return looked_up


def _bounded_waits(conn: Any) -> None:
    with conn.cursor() as cur:
        cur.execute(f"SET lock_timeout = '{LOCK_TIMEOUT}'")
    conn.commit()


def first_line(exc: BaseException) -> str:
    """The driver's first line, stripped (psycopg2's messages end in a newline)."""
    return (str(exc).strip().splitlines() or [""])[0][:300]


def one_line(exc: BaseException) -> str:
    """A database error as one log line: first_line(), or its class when it says nothing."""
    return first_line(exc) or type(exc).__name__


def _why(exc: BaseException, url: str) -> str:
    """The driver's first line, without the URL's password (a driver may quote the DSN)."""
    text = first_line(exc)
    password = urlsplit(url).password if "://" in url else None
    if password:
        text = text.replace(password, "***")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def make_durable() -> None:
    """Put everything committed so far on disk (safe from a power cut); any thread.

    SQLite with synchronous=NORMAL writes the WAL at commit and fsyncs it only at a
    checkpoint; one fsync of the WAL covers every commit before it. A WAL that is gone was
    checkpointed into the database file, which SQLite synced. PostgreSQL is durable at commit.
    """
    path = _wal_path
    if path is None:
        return
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# The WAL file as it was at the last checkpoint: which file, its size and modification time.
_checkpointed: tuple[int, int, int, int] | None = None


def _wal_seen() -> tuple[int, int, int, int] | None:
    """The WAL file as it is now, None when there is none (not SQLite, or none written since
    the last connection closed it)."""
    if _wal_path is None:
        return None
    try:
        st = os.stat(_wal_path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def wal_changed() -> bool:
    """Written to since the last checkpoint()? One stat, no connection."""
    seen = _wal_seen()
    return seen is not None and seen != _checkpointed


def checkpoint() -> bool:
    """Copy the SQLite WAL back into the database file without blocking writers (PASSIVE).

    Skipped (False) while the WAL is as it was at the last one: the job runs every second,
    and an idle daemon opened a connection for it each time (bench h: about 1 % of a core
    idle, most of it this job).
    """
    global _checkpointed
    seen = _wal_seen()
    if seen is None or seen == _checkpointed:
        # A commit within the same clock tick as the last look, over frames already in the
        # file (same size), goes unseen until the next write; it is durable all the same
        # (make_durable), and SQLite's own autocheckpoint remains the backstop.
        return False
    proxy.execute_sql("PRAGMA wal_checkpoint(PASSIVE)")
    _checkpointed = seen  # a commit after the stat changes it again: checkpointed next turn
    return True


@contextmanager
def _startup_lock(path: Path | None) -> Iterator[None]:
    """Serialise the processes of one host that open the same SQLite file.

    Switching a new file to WAL needs an exclusive lock, and SQLite answers "database is
    locked" at once (no busy wait) when another process is switching it too. The lock is a
    flock on the directory: a descriptor on the database file itself must not be closed
    while SQLite holds its POSIX locks in this process, since closing any descriptor of a
    file drops them all.
    """
    if path is None:
        yield
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def _create_private(path: Path) -> None:
    """A new database file is 0600: audit rows and payloads are not for every local user.

    SQLite gives the -wal and -shm files the database file's own mode, so they follow.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return  # an existing file keeps the mode its operator chose
    os.close(fd)


def create_or_migrate(db: pw.Database, migrate: bool = True) -> None:
    """Create missing tables; add the columns and indexes that a newer version introduced.

    Safe when a whole fleet starts at once: each replica does its look-and-create under one
    lock, so the second finds the tables the first made instead of racing it to the catalog.
    Tables a newer nomaflowd made are refused (SCHEMA_VERSION); with `migrate` False, so are
    older ones: a command run after an upgrade, before the restart, migrated them under the
    daemon still running the older version.
    """
    schema = None
    if isinstance(db, pw.PostgresqlDatabase):  # introspection defaults to "public"
        schema = db.execute_sql("SELECT current_schema()").fetchone()[0]
    # On SQLite, BEGIN IMMEDIATE (_SqliteDatabase): a deferred transaction would read the
    # schema, then fail with "database is locked" if another process wrote it meanwhile.
    with db.atomic():
        if isinstance(db, pw.PostgresqlDatabase):
            # DDL is transactional in PostgreSQL, so the lock held to COMMIT covers it all;
            # without it two replicas both see no table and one dies on pg_type's unique key.
            # A peer's migration may outlast LOCK_TIMEOUT: wait for it, this start only.
            db.execute_sql("SET LOCAL lock_timeout = 0")
            db.execute_sql("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
        existing = set(db.get_tables(schema=schema))
        version = _check_version(db, existing, migrate)
        for model in MODELS:
            table = model._meta.table_name
            if table not in existing:
                model.create_table(safe=True)
                continue
            have = {c.name for c in db.get_columns(table, schema=schema)}
            missing = [f for f in model._meta.sorted_fields if f.column_name not in have]
            if missing:
                _add_columns(db, table, missing)
            if schema is not None:
                _widen_columns(db, model, schema)
            _drop_changed_indexes(db, model, schema)
            model._schema.create_indexes(safe=True)
        if version != SCHEMA_VERSION:
            db.execute_sql("CREATE TABLE IF NOT EXISTS nomaflowd_schema (version INTEGER NOT NULL)")
            db.execute_sql("DELETE FROM nomaflowd_schema")
            db.execute_sql(f"INSERT INTO nomaflowd_schema (version) VALUES ({SCHEMA_VERSION})")


def _check_version(db: pw.Database, existing: set[str], migrate: bool) -> int | None:
    """The tables' version (None: no tables yet); raises for one this process must not use."""
    if "nomaflowd_schema" in existing:
        version = db.execute_sql("SELECT MAX(version) FROM nomaflowd_schema").fetchone()[0] or 0
    elif existing & {m._meta.table_name for m in MODELS}:
        version = 0
    else:
        return None
    if version > SCHEMA_VERSION:
        raise NomaflowError(
            f"daemon.database: its tables are schema version {version}, made by a newer"
            f" nomaflowd (this one knows up to version {SCHEMA_VERSION}); upgrade nomaflowd on"
            " this host, or point daemon.database elsewhere")
    if version < SCHEMA_VERSION and not migrate:
        raise NomaflowError(
            f"daemon.database: its tables are from an older nomaflowd (schema version"
            f" {version}, this one is {SCHEMA_VERSION}); the daemon upgrades them when it"
            " starts (systemctl restart nomaflowd); commands do not, so that a daemon still"
            " running the older version is not changed under it")
    return int(version)


def _add_columns(db: pw.Database, table: str, fields: list[pw.Field]) -> None:
    """Add the columns a newer version introduced; existing rows hold NULL in them."""
    # Imported only when a column is missing: playhouse.migrate and the playhouse modules it
    # pulls in were 1.3 MB of an idle daemon's RSS (bench h).
    with _without_psycopg2():
        from playhouse.migrate import SchemaMigrator, migrate
    migrator = SchemaMigrator.from_database(db)
    operations = []
    for f in fields:
        column = copy.copy(f)
        column.null = True
        operations.append(migrator.add_column(table, f.column_name, column))
    logger.info("adding %d column(s) to %s", len(operations), table)
    migrate(*operations)


def _widen_columns(db: pw.Database, model: type[Model], schema: str) -> None:
    """PostgreSQL enforces varchar lengths (SQLite does not): a column a newer version made
    wider is altered, or values within the documented limits would be refused."""
    table = model._meta.table_name
    lengths = dict(db.execute_sql(
        "SELECT column_name, character_maximum_length FROM information_schema.columns"
        " WHERE table_schema = %s AND table_name = %s", (schema, table)).fetchall())
    for f in model._meta.sorted_fields:
        have = lengths.get(f.column_name)
        if isinstance(f, pw.CharField) and have is not None and have < f.max_length:
            logger.info("widening %s.%s to %d characters", table, f.column_name, f.max_length)
            db.execute_sql(f'ALTER TABLE "{table}" ALTER COLUMN "{f.column_name}"'
                           f" TYPE varchar({f.max_length})")


def _drop_changed_indexes(db: pw.Database, model: type[Model], schema: str | None) -> None:
    """Drop our indexes whose uniqueness changed, so create_indexes() makes them anew, and
    the retired ones (RETIRED_INDEXES).

    CREATE INDEX IF NOT EXISTS goes by name alone: without this, a database from before
    event ids became per job would keep `events_event_id` unique forever.
    """
    table = model._meta.table_name
    declared = {index._name: index._unique for index in model._meta.fields_to_index()}
    retired = RETIRED_INDEXES.get(table, ())
    for index in db.get_indexes(table, schema=schema):
        if index.name in retired:
            logger.info("dropping index %s of %s (no longer used)", index.name, table)
            db.execute_sql(f'DROP INDEX "{index.name}"')
        elif index.name in declared and index.unique != declared[index.name]:
            logger.info("rebuilding index %s of %s (%s)", index.name, table,
                        "now unique" if declared[index.name] else "no longer unique")
            db.execute_sql(f'DROP INDEX "{index.name}"')


def prune(now: datetime, retention_days: int,
          stopping: threading.Event | None = None) -> dict[str, int]:
    """Delete rows older than the retention, in batches so no lock is held for long; a
    stop (`stopping` set) ends it between two batches (the next day's goes on)."""
    cutoff = now - timedelta(days=retention_days)
    removed: dict[str, int] = {}
    targets: list[tuple[type[Model], Any]] = [
        (NotificationRow, NotificationRow.created_at < cutoff),
        (EventRow, EventRow.received_at < cutoff),
        # RUNNING too: a runner that died mid-run never sends the final state.
        (RunRow, RunRow.updated_at < cutoff),
        (DeliveryRow, (DeliveryRow.claimed_at < cutoff) & (DeliveryRow.state == "done")),
        (ThreadRow, ThreadRow.created_at < cutoff),
    ]
    for model, condition in targets:
        total = 0
        while True:
            started = time.monotonic()
            ids = model.select(model.id).where(condition).limit(PRUNE_BATCH)
            with proxy.atomic():
                count = model.delete().where(model.id.in_([r.id for r in ids])).execute()
            total += count
            if count < PRUNE_BATCH:
                break
            # As long again without the write lock: batch after batch, the main loop (whose
            # wait for SQLite's lock sleeps up to 100 ms a try) lost the race for seconds,
            # and failure alerts with it. A million rows, an alert every 100 ms: worst
            # rename -> POST 6.9 s, 49 alerts over 2 s; now 332 ms, none over 500 ms.
            pause = min(time.monotonic() - started, 1.0)
            if stopping is not None and stopping.wait(pause):
                break
            if stopping is None:
                time.sleep(pause)
        removed[model._meta.table_name] = total
        if stopping is not None and stopping.is_set():
            break
    return removed
