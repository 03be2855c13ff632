"""Storage behaviour, run once per backend: SQLite files and the real PostgreSQL server."""

from __future__ import annotations

import logging
import multiprocessing
import os
import sqlite3
import stat
import threading
import warnings
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import peewee as pw
import pytest

from nomaflowd import db
from tests.conftest import InProcess, Tree


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request, tree: Tree):
    """Point `tree` at a fresh database of each backend (a private schema on PostgreSQL)."""
    if request.param == "sqlite":
        yield tree
        return
    tree.database = request.getfixturevalue("pg_schema")  # skips without a server
    yield tree
    if db.proxy.obj is not None:
        db.proxy.close()


def count(model) -> int:
    return model.select().count()


def test_ingest_is_idempotent_and_runs_never_go_back(backend, http):
    backend.write_config(backend.webhook("hook", http.url()))
    d = InProcess(backend)
    try:
        backend.drop({"job_id": "j", "run_id": "r", "state": "FAILED", "error": "x"})
        backend.drop({"job_id": "j", "run_id": "r", "state": "FAILED", "error": "x"})
        backend.drop({"job_id": "j", "run_id": "r", "state": "RUNNING"})
        d.pump()
        assert count(db.EventRow) == 2
        assert [r.state for r in db.RunRow.select()] == ["FAILED"]
        assert count(db.NotificationRow) == 1
        assert len(http.requests) == 1
        assert [r.state for r in db.DeliveryRow.select()] == ["done"]
    finally:
        d.close()


def test_the_first_final_state_of_a_run_wins_within_one_batch(backend, http):
    """Two final states of one run in one batch (and a RUNNING after them): the first file's
    state stays, on a run new to the database and on one already RUNNING; PostgreSQL must not
    be asked to change one row twice in a statement."""
    backend.write_config(backend.webhook("hook", http.url()))
    d = InProcess(backend)
    try:
        backend.drop({"job_id": "j", "run_id": "old", "state": "RUNNING"})
        d.pump()
        for run in ("new", "old"):
            backend.drop({"job_id": "j", "run_id": run, "state": "FAILED", "error": "x"})
            backend.drop({"job_id": "j", "run_id": run, "state": "SUCCEEDED"})
        backend.drop({"job_id": "j", "run_id": "new", "state": "RUNNING"})
        d.pump()
        assert count(db.EventRow) == 6
        runs = {r.run_id: (r.state, r.finished_at is not None, r.long_run_deadline)
                for r in db.RunRow.select()}
        assert runs == {"new": ("FAILED", True, None), "old": ("FAILED", True, None)}
        assert sorted(r.json()["run_id"] for r in http.wait_for(2)) == ["new", "old"]
    finally:
        d.close()


def test_a_run_started_and_ended_in_one_batch_is_stored_as_in_two(backend, http):
    """A backlog holds a run's RUNNING and its end in one batch: its runs row is the one that
    two batches leave (start kept, end and state set, long-run deadline gone, the RUNNING
    event's overrides kept), also when its end comes first or twice. The runs are recent,
    their long-run warning not due: a fixed past start made the poll (every 0.2 s here)
    warn of "apart" whenever the machine was slow enough to let a tick fall between its two
    batches, and the test saw four requests."""
    backend.write_config(backend.webhook("hook", http.url()))
    backend.write_jobs("[defaults.alerts]\non_failure = true\non_long_run_minutes = 30\n")
    d = InProcess(backend)
    started = datetime.now(UTC).replace(tzinfo=None, microsecond=0) - timedelta(minutes=10)
    finished = started + timedelta(minutes=10)

    def run(run_id: str) -> list[dict[str, Any]]:
        return [{"job_id": "j", "run_id": run_id, "state": "RUNNING",
                 "started_at": f"{started.isoformat()}Z", "tags": ["nightly"]},
                {"job_id": "j", "run_id": run_id, "state": "FAILED", "error": "x",
                 "finished_at": f"{finished.isoformat()}Z"}]

    def row(run_id: str) -> tuple[Any, ...]:
        r = db.RunRow.get(db.RunRow.run_id == run_id)
        return (r.state, r.started_at, r.finished_at, r.long_run_deadline, r.overrides,
                r.updated_at is not None)

    try:
        first, then = run("apart")
        backend.drop(first)
        d.pump()
        assert db.RunRow.get(db.RunRow.run_id == "apart").long_run_deadline is not None
        backend.drop(then)
        d.pump()
        for event in run("together"):
            backend.drop(event)
        start, end = run("reversed")
        backend.drop(end)
        backend.drop({**end, "state": "SUCCEEDED"})
        backend.drop(start)
        d.pump()
        expected = ("FAILED", started, finished, None, '{"tags": ["nightly"]}', True)
        assert row("apart") == expected
        assert row("together") == expected
        # the end came first: its row, with no start of its own and no overrides
        assert row("reversed") == ("FAILED", None, finished, None, None, True)
        assert sorted(r.json()["run_id"] for r in http.wait_for(3)) == [
            "apart", "reversed", "together"]
    finally:
        d.close()


def test_two_replicas_ingest_the_same_event_once(backend, http, tmp_path):
    backend.write_config(backend.webhook("hook", http.url()), daemon='replica_id = "a"')
    a = InProcess(backend)
    other = Tree(tmp_path / "other")
    other.database = backend.database.replace("../var/lib", str(backend.db_path.parent))
    other.key.write_bytes(backend.key.read_bytes())
    other.keys = backend.keys
    other.write_config(other.webhook("hook", http.url()), daemon='replica_id = "b"')
    b = InProcess(other)
    try:
        for i in range(20):
            event = {"job_id": "j", "run_id": f"r{i}", "state": "FAILED"}
            backend.drop(event)
            other.drop(event)
        a.pump()
        b.pump()
        a.pump()
        assert len(http.requests) == 20
        assert count(db.NotificationRow) == 20
        assert count(db.EventRow) == 20
    finally:
        a.close()
        b.close()


def test_long_run_claim_is_won_once(backend, http):
    backend.write_config(backend.webhook("hook", http.url()))
    backend.write_jobs("[jobs.etl.alerts]\non_long_run_minutes = 10\n")
    d = InProcess(backend)
    try:
        started = (db.utcnow() - timedelta(minutes=11)).strftime("%Y-%m-%dT%H:%M:%SZ")
        backend.drop({"job_id": "etl", "run_id": "r", "state": "RUNNING", "started_at": started})
        d.pump()
        later = db.utcnow() + timedelta(seconds=1)
        total = sum(d.daemon.poll_long_runs(later) for _ in range(3))
        d.pump()
        assert total <= 1
        assert [r.json()["alert"] for r in http.requests] == ["long_run"]
    finally:
        d.close()


def test_prune_removes_only_rows_past_retention(backend, http):
    backend.write_config(backend.webhook("hook", http.url()))
    d = InProcess(backend)
    try:
        backend.drop({"job_id": "j", "run_id": "new", "state": "FAILED"})
        d.pump()
        old = db.utcnow() - timedelta(days=200)
        db.NotificationRow.insert(created_at=old, job_id="j", run_id="old", alert="failed",
                                  level="high", transport="hook", transport_type="webhook",
                                  recipient="hook", outcome="SENT", detail="",
                                  replica="x").execute()
        db.EventRow.insert(event_id="old", received_at=old, job_id="j", run_id="old",
                           state="FAILED", payload="{}").execute()
        removed = db.prune(db.utcnow(), 183)
        assert removed["notifications"] == 1 and removed["events"] == 1
        assert [r.run_id for r in db.NotificationRow.select()] == ["new"]
    finally:
        d.close()


def test_a_run_left_running_for_longer_than_the_retention_is_pruned(backend, http):
    """A runner that died mid-run never sends the final state: its row stayed RUNNING for
    good, in the page's running list and in nomaflowd_running_runs."""
    backend.write_config(backend.webhook("hook", http.url()))
    d = InProcess(backend)
    try:
        old = db.utcnow() - timedelta(days=200)
        for run_id, at in (("died", old), ("running", db.utcnow())):
            db.RunRow.insert(job_id="j", run_id=run_id, state="RUNNING", started_at=at,
                             updated_at=at).execute()
        assert db.prune(db.utcnow(), 183)["runs"] == 1
        assert [r.run_id for r in db.RunRow.select()] == ["running"]
    finally:
        d.close()


def test_prune_waits_for_another_writer_instead_of_failing(tree):
    """Retention runs on the scheduler's thread while the main loop writes (the poll's
    heartbeat fires with it). A writer that commits while prune is in its transaction must
    make prune wait, not fail with "database is locked" and skip retention for a day."""
    db.open_database(f"sqlite:///{tree.db_path}")
    old = db.utcnow() - timedelta(days=200)
    db.NotificationRow.insert(created_at=old, job_id="j", run_id="old", alert="failed",
                              level="high", transport="hook", transport_type="webhook",
                              recipient="hook", outcome="SENT", detail="", replica="x").execute()
    other = sqlite3.connect(tree.db_path, isolation_level=None, timeout=10)
    other.execute("BEGIN IMMEDIATE")  # the other writer, mid-transaction
    other.execute("INSERT INTO replicas (replica_id, seen_at, started_at) VALUES"
                  " ('main', '2026-01-01', '2026-01-01')")
    in_prune = threading.Event()  # prune has read (or waits for the lock): commit now

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            sql = str(record.msg[0] if isinstance(record.msg, tuple) else record.msg)
            if threading.current_thread().name == "prune" and (
                    sql.startswith("DELETE") or sql.startswith("BEGIN IMMEDIATE")):
                in_prune.set()

    peewee_log = logging.getLogger("peewee")
    watch, level = Watch(), peewee_log.level
    peewee_log.addHandler(watch)
    peewee_log.setLevel(logging.DEBUG)
    outcome: dict[str, Any] = {}

    def prune() -> None:
        try:
            outcome["removed"] = db.prune(db.utcnow(), 183)
        except Exception as exc:  # what the daemon's prune job logs as "retention skipped"
            outcome["error"] = exc
        finally:
            db.proxy.close()

    worker = threading.Thread(target=prune, name="prune")
    try:
        worker.start()
        assert in_prune.wait(10)
        other.execute("COMMIT")
        worker.join(20)
    finally:
        peewee_log.removeHandler(watch)
        peewee_log.setLevel(level)
        other.close()
    assert "error" not in outcome, outcome.get("error")
    assert outcome["removed"]["notifications"] == 1
    db.proxy.close()


def test_missing_columns_are_added_at_start(backend):
    backend.write_config()
    database = db.open_database(_url(backend))
    database.execute_sql("DROP TABLE notifications")
    database.execute_sql("CREATE TABLE notifications (id INTEGER PRIMARY KEY, created_at"
                         " TIMESTAMP, outcome VARCHAR(32))")
    db.create_or_migrate(database)
    schema = None
    if isinstance(database, pw.PostgresqlDatabase):
        schema = database.execute_sql("SELECT current_schema()").fetchone()[0]
    columns = {c.name for c in database.get_columns("notifications", schema=schema)}
    assert {"replica", "duration_ms", "transport_type", "detail"} <= columns
    database.close()


def _url(tree: Tree) -> str:
    from nomaflowd import config

    return config.load(tree.config_path).database


FLEET = 6


def _start_replica(url: str, barrier: Any, results: Any) -> None:
    """One replica's start, in its own process: open (create or migrate) the database."""
    from nomaflowd import db as child_db

    barrier.wait(timeout=60)  # the whole fleet starts at the same moment
    try:
        child_db.open_database(url).close()
        results.put("ok")
    except Exception as exc:  # reported to the test, which names it
        results.put(f"{type(exc).__name__}: {exc}")


def test_a_fleet_starting_at_once_on_a_new_database_all_start(backend):
    backend.write_config()
    url = _url(backend)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(FLEET), ctx.Queue()
    fleet = [ctx.Process(target=_start_replica, args=(url, barrier, results))
             for _ in range(FLEET)]
    for p in fleet:
        p.start()
    outcomes = [results.get(timeout=60) for _ in fleet]
    for p in fleet:
        p.join(timeout=30)
    assert outcomes == ["ok"] * FLEET
    database = db.open_database(url)
    try:
        assert {m._meta.table_name for m in db.MODELS} <= set(database.get_tables(
            schema=_schema(database)))
    finally:
        database.close()


def _schema(database: pw.Database) -> str | None:
    if isinstance(database, pw.PostgresqlDatabase):
        return str(database.execute_sql("SELECT current_schema()").fetchone()[0])
    return None


def test_a_new_sqlite_database_is_readable_by_its_owner_only(tmp_path):
    path = tmp_path / "lib" / "nomaflowd.db"
    old = os.umask(0o022)  # a typical service umask, which would leave the file world-readable
    try:
        database = db.open_database(f"sqlite:///{path}")
    finally:
        os.umask(old)
    try:
        db.EventRow.insert(event_id="e", received_at=db.utcnow(), job_id="j", state="FAILED",
                           payload="{}").execute()
        files = [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]
        modes = {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in files}
        assert modes == {f.name: "0o600" for f in files}
    finally:
        database.close()


def test_utcnow_is_naive_utc_and_not_deprecated():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # datetime.utcnow() warns from Python 3.12 on
        now = db.utcnow()
    assert now.tzinfo is None
    assert abs(now - datetime.now(UTC).replace(tzinfo=None)) < timedelta(seconds=5)


class _OldEventRow(pw.Model):
    """The events table as versions before per-job event ids made it."""

    event_id = pw.CharField(max_length=300, unique=True)
    received_at = pw.DateTimeField(index=True)
    job_id = pw.CharField(max_length=300)
    run_id = pw.CharField(max_length=300, null=True)
    state = pw.CharField(max_length=16)
    payload = pw.TextField()

    class Meta:
        table_name = "events"
        legacy_table_names = False  # index names as db.Model makes them: events_event_id


def _insert_events(*rows: tuple[str, str]) -> list[tuple[str, str]]:
    """Events in, as ingest stores them; returns the (job_id, event_id) of those kept."""
    now = db.stamp(db.utcnow())
    return [tuple(r) for r in db.insert_new(
        "events", ("event_id", "received_at", "job_id", "run_id", "state", "payload"),
        [(event_id, now, job, None, "FAILED", "{}") for job, event_id in rows],
        conflict=("job_id", "event_id"), returning=("job_id", "event_id"))]


def test_an_event_id_is_unique_per_job_only(backend):
    backend.write_config()
    database = db.open_database(_url(backend))
    try:
        assert _insert_events(("etl", "deploy-1"), ("billing", "deploy-1")) == [
            ("etl", "deploy-1"), ("billing", "deploy-1")]
        assert _insert_events(("billing", "deploy-1")) == []  # the same event again
        assert sorted(database.execute_sql("SELECT job_id, event_id FROM events").fetchall()
                      ) == [("billing", "deploy-1"), ("etl", "deploy-1")]
    finally:
        database.close()


def test_a_write_commits_rolls_back_on_an_error_and_nests_atomic_as_a_savepoint(backend):
    """db.write(), the ingest and audit transaction: what it wrote is committed when the
    block ends, nothing of it when the block raises, and an atomic() inside it undoes only
    its own part."""
    backend.write_config()
    database = db.open_database(_url(backend))
    try:
        with db.write():
            _insert_events(("etl", "a"))
        with pytest.raises(RuntimeError), db.write():
            _insert_events(("etl", "b"))
            raise RuntimeError("boom")
        with db.write():
            _insert_events(("etl", "c"))
            with pytest.raises(RuntimeError), db.proxy.atomic():
                _insert_events(("etl", "d"))
                raise RuntimeError("inner")
            _insert_events(("etl", "e"))
        assert database.transaction_depth() == 0 and not database.in_transaction()
        assert sorted(r[0] for r in database.execute_sql("SELECT event_id FROM events")
                      ) == ["a", "c", "e"]
    finally:
        database.close()
    if backend.database.startswith("sqlite"):  # and another connection sees the commits
        with sqlite3.connect(backend.db_path) as other:
            assert sorted(r[0] for r in other.execute("SELECT event_id FROM events")
                          ) == ["a", "c", "e"]


def test_execute_in_covers_more_values_than_one_statement_takes(backend):
    """The audit's `done` marks go as `UPDATE … WHERE id IN (…)`, 900 ids a statement: a
    batch of 1,901 marks every one of them and nothing else."""
    backend.write_config()
    database = db.open_database(_url(backend))
    try:
        now = db.stamp(db.utcnow())
        ids = [r[0] for r in db.insert_new(
            "deliveries", ("alert_key", "transport", "recipient", "event_id", "context",
                           "state", "claimed_by", "claimed_at", "attempts"),
            [(f"j/r{i}/failed", "hook", "hook", f"e{i}", "{}", "claimed", "x", now, 1)
             for i in range(1905)],
            conflict=("alert_key", "transport", "recipient"), returning=("id",))]
        with db.write():
            db.execute_in("UPDATE deliveries SET state = 'done' WHERE id IN", ids[:1901])
        states = dict(database.execute_sql("SELECT state, count(*) FROM deliveries"
                                           " GROUP BY state").fetchall())
        assert states == {"done": 1901, "claimed": 4}
    finally:
        database.close()


def test_an_old_database_is_migrated_to_per_job_event_ids(backend):
    backend.write_config()
    url = _url(backend)
    old = db.open_database(url)  # to get a connection of the right kind; tables replaced
    old.execute_sql("DROP TABLE events")
    _OldEventRow.bind(old)
    old.create_tables([_OldEventRow])
    _OldEventRow.create(event_id="deploy-1", received_at=db.utcnow(), job_id="etl",
                        state="FAILED", payload="{}")
    old.close()

    database = db.open_database(url)
    try:
        assert _insert_events(("billing", "deploy-1"), ("etl", "deploy-1")) == [
            ("billing", "deploy-1")]
        assert sorted(database.execute_sql("SELECT job_id, event_id FROM events").fetchall()
                      ) == [("billing", "deploy-1"), ("etl", "deploy-1")]
        unique = {tuple(i.columns) for i in database.get_indexes(
            "events", schema=_schema(database)) if i.unique}
        assert unique - {("id",)} == {("job_id", "event_id")}  # PostgreSQL lists the key
        db.create_or_migrate(database)  # a second start finds nothing left to do
    finally:
        database.close()


@pytest.mark.parametrize("state", ["FAILED", "NOTICE"])
def test_an_event_id_reused_by_another_job_still_alerts(backend, http, state):
    backend.write_config(backend.webhook("hook", http.url()))
    d = InProcess(backend)
    try:
        for job in ("etl", "billing"):
            backend.drop({"job_id": job, "run_id": "r1", "event_id": "deploy-1",
                          "state": state, "message": f"{job} deployed", "error": "x"})
        d.pump()
        assert sorted(r.json()["job_id"] for r in http.requests) == ["billing", "etl"]
        assert sorted(r.job_id for r in db.NotificationRow.select()) == ["billing", "etl"]
    finally:
        d.close()


@pytest.mark.postgres
def test_a_column_made_wider_is_widened_on_an_existing_postgresql_database(pg_schema):
    database = db.open_database(pg_schema)
    database.execute_sql("ALTER TABLE deliveries ALTER COLUMN alert_key TYPE varchar(400)")
    database.close()
    database = db.open_database(pg_schema)
    try:
        (length,) = database.execute_sql(
            "SELECT character_maximum_length FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND table_name = 'deliveries'"
            " AND column_name = 'alert_key'").fetchone()
        assert length == 512
    finally:
        database.close()


def test_the_wal_is_copied_back_off_the_main_loop(tree: Tree, inproc):
    """SQLite's own checkpoint runs inside a commit, holding that event for milliseconds;
    the daemon's scheduler thread copies the WAL back into the database file instead."""
    tree.write_config()
    d = inproc()
    main_file = tree.db_path.stat().st_size
    for i in range(100):  # far below the backstop of wal_autocheckpoint pages
        tree.drop({"job_id": "etl", "run_id": f"r{i}", "state": "SUCCEEDED"})
    d.pump()
    assert tree.sql("SELECT count(*) FROM events") == [(100,)]
    # The rows reach the database file itself within a turn of the checkpoint job.
    d.pump(until=lambda: tree.db_path.stat().st_size > main_file, timeout=10.0,
           what="the WAL to be checkpointed into the database file")


def test_an_idle_daemon_does_not_checkpoint_an_unchanged_wal(tree: Tree):
    """The checkpoint job runs every second; with nothing written since the last checkpoint
    it opens no connection and copies nothing."""
    tree.write_config()
    database = db.open_database(_url(tree))
    try:
        db.proxy.execute_sql("CREATE TABLE scratch (x)")
        assert db.checkpoint() is True
        assert db.checkpoint() is False
        # More pages than the WAL holds, so the file grows whatever the clock's resolution.
        db.proxy.execute_sql("INSERT INTO scratch VALUES (zeroblob(400000))")
        assert db.checkpoint() is True
        assert db.checkpoint() is False
    finally:
        database.close()


def test_the_checkpoint_job_slows_down_while_idle_and_speeds_up_on_a_write(tree: Tree, inproc):
    """Nothing new in the WAL: the job runs every 30 s instead of every second (an idle
    daemon woke two threads a second for it). The main loop's next write brings it back."""
    from nomaflowd.daemon import CHECKPOINT_IDLE_SECONDS, CHECKPOINT_SECONDS

    tree.write_config()
    d = inproc()

    def every() -> float:
        return float(d.daemon.scheduler.get_job("checkpoint").trigger.interval.total_seconds())

    d.daemon.checkpoint_job()  # whatever start-up wrote
    d.daemon.checkpoint_job()  # nothing new
    assert every() == CHECKPOINT_IDLE_SECONDS
    tree.drop({"job_id": "etl", "run_id": "r1", "state": "SUCCEEDED"})
    d.pump()
    assert tree.sql("SELECT count(*) FROM events") == [(1,)]
    assert every() == CHECKPOINT_SECONDS


def test_sqlite_keeps_16_mb_of_pages_per_connection(tmp_path):
    """README, Design notes: a backlog's index pages stay in memory (SQLite's default is
    2 MB), on the connection the main loop opens and on any other thread's."""
    database = db.open_database(f"sqlite:///{tmp_path / 'n.db'}")
    try:
        assert database.execute_sql("PRAGMA cache_size").fetchone() == (-16000,)
        seen: list[Any] = []
        worker = threading.Thread(target=lambda: seen.append(
            database.execute_sql("PRAGMA cache_size").fetchone()))
        worker.start()
        worker.join()
        assert seen == [(-16000,)]
    finally:
        database.close()


def test_an_index_an_earlier_version_made_is_dropped_at_start(backend):
    """runs (long_run_alerted_at, job_id) is retired: a database that has it loses it, and
    gets the partial index of warned runs instead."""
    backend.write_config()
    url = _url(backend)
    old = db.open_database(url)
    old.execute_sql('DROP INDEX "runs_warned_job_id"')
    old.execute_sql('CREATE INDEX "runs_long_run_alerted_at_job_id" ON runs'
                    " (long_run_alerted_at, job_id)")
    old.execute_sql('CREATE INDEX "runs_long_run_deadline" ON runs (long_run_deadline)')
    old.close()

    database = db.open_database(url)
    try:
        names = {i.name for i in database.get_indexes("runs", schema=_schema(database))}
        assert "runs_long_run_alerted_at_job_id" not in names
        assert "runs_long_run_deadline" not in names  # the first versions' own
        assert "runs_warned_job_id" in names
        db.create_or_migrate(database)  # a second start finds nothing left to do
    finally:
        database.close()


def vm_steps(database: Any, check: Callable[[], None]) -> int:
    """SQLite virtual-machine steps (in tens) that `check` costs: work, not time."""
    count = [0]

    def tick() -> int:
        count[0] += 1
        return 0

    database.connection().set_progress_handler(tick, 10)
    try:
        check()
    finally:
        database.connection().set_progress_handler(None, 10)
    return count[0]


def test_the_recovery_check_of_a_batch_does_not_grow_with_the_jobs_history(tree: Tree):
    """Once a batch, incidents.open_candidates asks which of its jobs may have an episode to
    close. Its work must not grow with every run the jobs ever had: counted in SQLite
    virtual-machine steps, a history of 20,000 runs costs about what 200 do (it read every
    run of those jobs when SQLite's planner chose the (job_id, updated_at) index)."""
    from nomaflowd import events, incidents

    tree.write_config()
    database = db.open_database(_url(tree))
    jobs = [f"job-{i:02d}" for i in range(20)]
    now = datetime(2026, 11, 30, 12, 0)
    successes = [events.parse(
        f'{{"job_id": "{job}", "run_id": "new", "state": "SUCCEEDED"}}'.encode(), "x.json", now)
        for job in jobs]

    def history(first: int, last: int) -> None:
        when = db.stamp(now - timedelta(days=1))
        with db.proxy.atomic():
            db.executemany(
                "INSERT INTO runs (job_id, run_id, state, started_at, finished_at, updated_at)"
                " VALUES (?, ?, 'SUCCEEDED', ?, ?, ?)",
                [(job, f"r{k}", when, when, when) for k in range(first, last) for job in jobs])

    def steps() -> int:
        def check() -> None:
            assert incidents.open_candidates(successes, now) == set()
        return vm_steps(database, check)

    try:
        history(0, 10)             # 200 runs
        small = steps()
        history(10, 1000)          # 20,000 runs
        large = steps()
        assert large < 2 * small, (small, large)
    finally:
        database.close()


def test_who_got_a_runs_failure_is_found_without_reading_the_audit_history(tree: Tree):
    """incidents.triggered (who gets the recovery) and open_candidates (which successes may
    close something) look up a few runs in `notifications`. SQLite's planner chose the
    (outcome, id) index and walked every SENT row of the table: 147 ms a lookup at 541,000
    rows, inside the ingest transaction, and the main loop stalled 15-19 s in a recovery
    storm. Counted in virtual-machine steps, 20,000 rows must cost about what 200 do."""
    from nomaflowd import events, incidents

    tree.write_config()
    database = db.open_database(_url(tree))
    now = datetime(2026, 11, 30, 12, 0)
    jobs = [f"job-{i:02d}" for i in range(20)]
    successes = [events.parse(
        f'{{"job_id": "{job}", "run_id": "new", "state": "SUCCEEDED"}}'.encode(), "x.json", now)
        for job in jobs]

    def history(first: int, last: int) -> None:
        when = db.stamp(now - timedelta(days=1))
        with db.proxy.atomic():
            db.executemany(
                "INSERT INTO notifications (created_at, job_id, run_id, alert, level, transport,"
                " transport_type, recipient, outcome, detail, replica) VALUES (?, ?, ?,"
                " 'failed', 'high', 'hook', 'webhook', 'hook', 'SENT', '', 'x')",
                [(when, job, f"r{k}") for k in range(first, last) for job in jobs])

    def steps() -> int:
        def check() -> None:
            assert incidents.open_candidates(successes, now) == set()
            assert incidents.triggered("job-03", ["r1", "r2", "r3"]) == {
                ("hook", "hook"): {"failed"}}
        return vm_steps(database, check)

    try:
        history(0, 10)             # 200 audit rows
        small = steps()
        history(10, 1000)          # 20,000
        large = steps()
        assert large < 2 * small, (small, large)
    finally:
        database.close()


def stored_version(database: Any) -> int:
    return database.execute_sql("SELECT MAX(version) FROM nomaflowd_schema").fetchone()[0]


def test_a_schema_from_a_newer_nomaflowd_is_refused_in_one_line(backend):
    """A rollback, or a host not yet upgraded beside one that is: an older nomaflowd on a
    newer schema failed every event as "database unavailable" (a unique key it expected was
    gone). It now refuses to start on it, saying what to do."""
    backend.write_config()
    database = db.open_database(_url(backend))
    assert stored_version(database) == db.SCHEMA_VERSION
    database.execute_sql(f"UPDATE nomaflowd_schema SET version = {db.SCHEMA_VERSION + 1}")
    database.close()
    with pytest.raises(db.NomaflowError) as refused:
        db.open_database(_url(backend))
    assert str(refused.value) == (
        f"daemon.database: its tables are schema version {db.SCHEMA_VERSION + 1}, made by a"
        f" newer nomaflowd (this one knows up to version {db.SCHEMA_VERSION}); upgrade"
        " nomaflowd on this host, or point daemon.database elsewhere")


def test_a_command_does_not_migrate_an_older_schema_under_a_running_daemon(backend, capsys):
    """`nomaflowd audit` after `pip install -U`, before the restart, migrated the schema
    under the daemon still running the older version (which then held every event). Only
    the daemon migrates; the command says so and leaves the database as it was."""
    from nomaflowd.cli import main

    backend.write_config()
    database = db.open_database(_url(backend))
    database.execute_sql("DROP TABLE nomaflowd_schema")  # as every version before this one
    database.close()
    assert main(["audit", "--config", str(backend.config_path)]) == 1
    err = capsys.readouterr().err
    assert err == ("nomaflowd: daemon.database: its tables are from an older nomaflowd (schema"
                   f" version 0, this one is {db.SCHEMA_VERSION}); the daemon upgrades them when"
                   " it starts (systemctl restart nomaflowd); commands do not, so that a daemon"
                   " still running the older version is not changed under it\n")
    database = db.open_database(_url(backend))  # the daemon's start
    assert stored_version(database) == db.SCHEMA_VERSION
    database.close()
    assert main(["audit", "--config", str(backend.config_path)]) == 0
