"""The delivery lifecycle under operator actions: reload, stop, stranded claims, twins."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import threading
import urllib.error
import urllib.request
from datetime import datetime, timedelta
from typing import Any

import pytest

from nomaflowd import db, events
from nomaflowd.alerts import from_event
from nomaflowd.deliveries import HELD, NO_TRANSPORT
from nomaflowd.dispatch import Attempt, Result
from tests.servers import Reply, Request, wait_until
from tests.test_web import bound_port

FAILED = {"job_id": "reporting-nightly-sync", "run_id": "run_a8c4d", "state": "FAILED",
          "error": "OperationalError: connection refused"}


def test_sighup_with_a_broken_catalogue_keeps_the_daemon_and_the_old_catalogue(
        tree, http, daemon_factory):
    """README: all or nothing, "a broken file is refused with one log line and the running
    config stays": the new config beside the broken jobs.toml is not taken either."""
    tree.write_jobs('[jobs.reporting-nightly-sync.alerts]\nrecipients = ["ops"]\n')
    tree.write_config(tree.webhook("ops", http.url("/a")))
    d = daemon_factory()
    tree.write_config(tree.webhook("ops", http.url("/b")))
    tree.write_jobs("[jobs.reporting-nightly-sync\nthis is not TOML")
    d.signal(signal.SIGHUP)
    wait_until(lambda: "reload refused" in d.output(), what="the refusal in the log")
    assert d.proc.poll() is None
    tree.drop(FAILED)
    [got] = http.wait_for(1)
    assert (got.path, got.json()["job_id"]) == ("/a", "reporting-nightly-sync")
    wait_until(lambda: tree.notifications(), what="audit row")
    assert d.stop() == 0
    output = d.output()
    assert "Traceback" not in output
    assert [line for line in output.splitlines() if "not valid TOML" in line] == [
        line for line in output.splitlines() if "reload refused" in line]


def test_failed_event_without_any_transport_leaves_a_failed_transport_row(tree, inproc):
    tree.write_config("")
    d = inproc()
    tree.drop(FAILED)
    rows = d.pump(tree.notifications, what="an audit row")
    assert [(r["job_id"], r["alert"], r["outcome"], r["detail"]) for r in rows] == [
        ("reporting-nightly-sync", "failed", "FAILED_TRANSPORT", NO_TRANSPORT)]


def test_claims_never_submitted_are_swept_without_a_restart(tree, http, inproc):
    tree.write_config(tree.webhook("ops", http.url()))
    d = inproc()
    now = datetime(2026, 5, 26, 2, 30)
    event = events.parse(b'{"job_id": "j", "run_id": "r1", "state": "FAILED"}', "x.json", now)
    ingest = d.daemon.ingest
    stranded = ingest.commit([("gone.json", event)], now)  # committed, then "lost"
    assert len(stranded) == 1 and not http.requests
    d.daemon.poll_due()  # the scheduler's tick: the sweep finds the claim nobody is sending
    d.pump(lambda: len(tree.notifications()) == 1, what="the swept alert's audit row")
    assert len(http.wait_for(1)) == 1
    assert "sweep" in tree.notifications()[0]["detail"]


def test_a_claim_a_stop_left_without_a_verdict_is_sent_again_at_the_restart(tree, http,
                                                                           inproc):
    """README: a claim the last run left mid-send goes out at the next start, its audit
    row saying `sent again after a restart`."""
    tree.write_config(tree.webhook("ops", http.url()))
    first = inproc()
    now = datetime(2026, 5, 26, 2, 30)
    event = events.parse(b'{"job_id": "j", "run_id": "r1", "state": "FAILED"}', "x.json", now)
    assert len(first.daemon.ingest.commit([("gone.json", event)], now)) == 1  # claimed...
    first.close()  # ...and the process is gone before any verdict
    assert not http.requests and tree.notifications() == []
    second = inproc()
    second.pump(lambda: tree.notifications(), what="the resent alert's audit row")
    [row] = tree.notifications()
    assert (row["run_id"], row["outcome"]) == ("r1", "SENT")
    assert "sent again after a restart" in row["detail"]
    assert [r.json()["run_id"] for r in http.wait_for(1)] == ["r1"]


def test_sweep_leaves_claims_in_flight_alone(tree, http, inproc):
    http.default = Reply(200, b"ok", delay=1.0)
    tree.write_config(tree.webhook("ops", http.url()))
    d = inproc()
    tree.drop(FAILED)
    d.pump(lambda: d.daemon.dispatcher.sending == 1, what="a send in flight")
    d.daemon.deliveries.sweep(datetime(2100, 1, 1))  # every claim looks old
    d.pump()
    assert len(http.requests) == 1
    assert [r["outcome"] for r in tree.notifications()] == ["SENT"]


def test_reload_while_sending_records_every_attempt_once_and_closes_old_transports(
        tree, http, inproc):
    http.default = Reply(200, b"ok", delay=0.3)
    tree.write_config(tree.webhook("ops", http.url()))
    d = inproc()
    for i in range(4):  # one per sender: none waits in the queue (those follow the reload)
        tree.drop({**FAILED, "run_id": f"r{i}"})
    d.pump(lambda: d.daemon.dispatcher.sending == 4, what="four sends in flight")
    d.daemon.reload()
    d.daemon.poll_due()  # a long-run poll and the sweeps right behind the reload
    d.pump()
    rows = tree.notifications()
    assert sorted(r["run_id"] for r in rows) == [f"r{i}" for i in range(4)]
    assert {r["outcome"] for r in rows} == {"SENT"}
    # The replaced transport's keep-alive connections are closed once its sends are done.
    wait_until(lambda: http.open_connections == 0, what="the old connections closed")


def hang_at(http: Any, path: str) -> tuple[threading.Semaphore, threading.Event]:
    """Requests to `path` hang until the event is set; the semaphore counts each arrival."""
    arrived, release = threading.Semaphore(0), threading.Event()

    def hang(req: Request) -> Reply:
        arrived.release()
        release.wait(10)
        return Reply(200, b"ok")

    http.replies[path] = hang
    return arrived, release


def hold_every_sender(d: Any, arrived: threading.Semaphore) -> None:
    """Until each of a transport's four senders is held by the hanging URL."""
    for _ in range(4):
        d.pump(lambda: arrived.acquire(blocking=False), what="a sender at the dead URL")


def test_sends_queued_when_a_reload_fixes_the_url_go_to_the_new_one(tree, http, inproc):
    """An endpoint hangs, alerts queue behind its four senders, the operator fixes the URL
    and reloads: the queued alerts kept going to the dead URL, one timeout after another
    (200 queued at 10 s: minutes), and the fixed one got nothing until a restart. Sends
    under way finish where they are; the queued ones go to the URL now configured."""
    arrived, release = hang_at(http, "/dead")
    tree.write_config(tree.webhook("ops", http.url("/dead")))
    d = inproc()
    for i in range(12):
        tree.drop({**FAILED, "run_id": f"r{i}"})
    hold_every_sender(d, arrived)
    tree.write_config(tree.webhook("ops", http.url("/fixed")))
    d.daemon.reload()
    release.set()
    d.pump(lambda: len(tree.notifications()) == 12, what="twelve rows")
    paths = sorted(r.path for r in http.requests)
    assert paths == ["/dead"] * 4 + ["/fixed"] * 8
    assert {r["outcome"] for r in tree.notifications()} == {"SENT"}


def test_sends_queued_for_a_transport_a_reload_removed_are_recorded_so(tree, http, inproc):
    arrived, release = hang_at(http, "/dead")
    tree.write_config(tree.webhook("ops", http.url("/dead")) + tree.webhook("other", http.url()))
    tree.write_jobs('[defaults.alerts]\nrecipients = ["ops"]\n')
    d = inproc()
    for i in range(6):
        tree.drop({**FAILED, "run_id": f"r{i}"})
    hold_every_sender(d, arrived)
    tree.write_config(tree.webhook("other", http.url()))
    d.daemon.reload()
    release.set()
    d.pump(lambda: len(tree.notifications()) == 6, what="six rows")
    assert len(http.requests) == 4  # the two queued ones were not sent to the removed one
    queued = [r for r in tree.notifications() if r["outcome"] != "SENT"]
    assert [(r["outcome"], r["detail"]) for r in queued] == [
        ("FAILED_TRANSPORT", "transport 'ops' was removed by a reload before this was sent")] * 2


def test_a_429_answered_after_a_reload_removed_its_transport_says_so(tree, http, inproc):
    """It said `refused 5 times` after one 429, and counted toward the transport's streak
    (paging the fallback about a transport the operator had only renamed)."""
    arrived, release = threading.Event(), threading.Event()

    def busy(req: Request) -> Reply:
        arrived.set()
        release.wait(10)
        return Reply(429, b"rate_limited", {"Retry-After": "2"})

    http.replies["/hook"] = busy
    tree.write_config(tree.webhook("ops", http.url()) + tree.webhook("other", http.url("/o")))
    tree.write_jobs('[defaults.alerts]\nrecipients = ["ops"]\n')
    d = inproc()
    tree.drop(FAILED)
    d.pump(arrived.is_set, what="the send under way")
    tree.write_config(tree.webhook("other", http.url("/o")))
    d.daemon.reload()
    release.set()
    d.pump(lambda: tree.notifications(), what="the row")
    [row] = tree.notifications()
    assert (row["outcome"], row["transport_type"]) == ("FAILED_TRANSPORT", "")
    assert row["detail"] == ("refused with HTTP 429: rate_limited (Retry-After 2s); transport"
                             " 'ops' was removed by a reload before it could go again")


@pytest.mark.postgres
def test_a_connection_lost_while_idle_is_opened_again_by_the_next_poll(tree, http, inproc,
                                                                       pg_schema):
    """PostgreSQL closed the daemon's connection (a restart, pg_terminate_backend, a healed
    partition) while no file came: every poll after said `connection already closed` and
    skipped its work (heartbeat, take-over, long-run warnings, schedules) until a file
    arrived; /healthz said 503 with the server up."""
    import psycopg2

    tree.database = pg_schema
    tree.write_config(tree.webhook("ops", http.url()), daemon="poll_seconds = 3600")
    d = inproc()
    d.pump()
    pid = db.proxy.execute_sql("SELECT pg_backend_pid()").fetchone()[0]
    with contextlib.closing(psycopg2.connect(pg_schema)) as admin:
        admin.autocommit = True
        admin.cursor().execute("SELECT pg_terminate_backend(%s)", (pid,))
    d.daemon.poll(db.utcnow())  # the first finds the connection gone
    d.daemon.poll(db.utcnow())
    assert not d.daemon.outage
    assert d.daemon.unhealthy() == ""


def test_results_recorded_again_after_a_lost_commit_answer_make_no_second_row(tree, http,
                                                                              inproc):
    """The link dropped the answer to the audit COMMIT, not the COMMIT: the results, kept as
    unrecorded, were written again once the database answered, two SENT rows for one POST.
    A claim a peer took over meanwhile still gets this attempt's row, saying so."""
    from nomaflowd.dispatch import record

    tree.write_config(tree.webhook("ops", http.url()))
    d = inproc()
    tree.drop(FAILED)
    d.pump(lambda: tree.notifications(), what="the row")
    [(claim, replica)] = tree.sql("SELECT id, claimed_by FROM deliveries")
    [row] = tree.notifications()
    alert = from_event("failed", events.parse(json.dumps(FAILED).encode(), "x.json",
                                              db.utcnow()), "")
    again = Result(Attempt(alert, "ops", "ops", delivery_id=claim), "webhook", "SENT",
                   "HTTP 200 ok", 3, db.utcnow())
    record([again], replica, replay=True)
    assert [r["id"] for r in tree.notifications()] == [row["id"]]
    tree.sql("UPDATE deliveries SET claimed_by = 'peer'")
    record([again], replica, replay=True)
    assert tree.notifications()[-1]["detail"] == (
        "HTTP 200 ok; recorded late: replica peer had taken it over")


def test_stop_does_not_wait_for_alerts_held_by_pacing_and_says_they_were_never_tried(
        tree, http, daemon_factory):
    tree.write_config(tree.webhook("ops", http.url(), "rate_per_minute = 1\nburst = 1\n"
                                   "digest_after_seconds = 3600"))
    d = daemon_factory()
    for i in range(3):
        tree.drop({**FAILED, "run_id": f"r{i}"})
    http.wait_for(1)
    wait_until(lambda: len(tree.notifications()) == 1, what="the first alert's row")
    wait_until(lambda: not tree.spool_files(), what="spool empty")
    assert d.stop() == 0
    assert "2 notification(s) waiting in line are kept for the next start" in d.output()
    # At the next start (no pacing now) they go out, not labelled as resends.
    tree.write_config(tree.webhook("ops", http.url()))
    daemon_factory()
    wait_until(lambda: len(tree.notifications()) == 3, what="all three rows")
    later = [r["detail"] for r in tree.notifications()[1:]]
    assert all(HELD in detail for detail in later), later
    assert len(http.requests) == 3


def test_a_database_error_while_recording_at_shutdown_still_shuts_down_cleanly(
        tree, http, inproc, caplog):
    http.default = Reply(200, b"ok", delay=0.5)
    tree.write_config(tree.webhook("ops", http.url()))
    d = inproc()
    tree.drop(FAILED)
    d.pump(lambda: d.daemon.dispatcher.sending == 1, what="a send in flight")
    with sqlite3.connect(tree.db_path) as conn:
        conn.execute("ALTER TABLE notifications RENAME TO notifications_away")
    d.close()  # must not raise
    assert "could not record the last 1 result(s)" in caplog.text
    with sqlite3.connect(tree.db_path) as conn:
        assert conn.execute("SELECT state FROM deliveries").fetchall() == [("claimed",)]


def test_a_file_where_rejected_goes_is_moved_aside_and_nothing_is_called_an_outage(
        tree, http, inproc, caplog):
    """A file took rejected/'s name (a runner can, while it is missing): it used to stop
    every rejection until a restart, which then failed. It is moved aside, said once."""
    tree.write_config(tree.webhook("ops", http.url()))
    d = inproc()
    rejected = tree.spool / "rejected"
    shutil.rmtree(rejected)
    rejected.write_text("not a directory any more")
    (tree.spool / "0-bad.json").write_text("not json")
    tree.drop(FAILED)
    d.pump(lambda: tree.notifications(), what="the good file's audit row")
    assert "database unavailable" not in caplog.text
    [aside] = [p for p in tree.spool.iterdir() if p.name.startswith("rejected.untrusted-")]
    assert aside.read_text() == "not a directory any more"
    assert f"rejected/ was a file, not a directory of this daemon's own; moved it" \
           f" to {aside.name}" in caplog.text
    assert "not JSON" in (rejected / "0-bad.json.error").read_text()


def healthz(daemon) -> int:
    return healthz_answer(daemon)[0]


def healthz_answer(daemon) -> tuple[int, str]:
    port = bound_port(daemon, "metrics")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


def test_two_daemons_with_one_replica_id_are_told_so(tree, http, daemon_factory):
    tree.write_config(tree.webhook("ops", http.url()),
                      daemon='replica_id = "twin"\nmetrics_listen = "127.0.0.1:0"')
    first = daemon_factory()
    assert healthz(first) == 200
    second = daemon_factory()
    wait_until(lambda: "also used by another live daemon" in first.output()
               and "also used by another live daemon" in second.output(),
               what="the duplicate replica id in both logs")
    assert "'twin'" in first.output().split("also used by another live daemon")[0][-200:]
    wait_until(lambda: healthz(first) == 503 and healthz(second) == 503,
               what="/healthz failing on both")
    assert first.stop() == 0 and second.stop() == 0


def test_healthz_says_the_poll_stalled_when_it_stops_running(tree, http, inproc):
    """README: /healthz is 200 only while the poll has run within three poll_seconds (and
    10 s). A poll that stopped (its timer held back, as a wall clock stepped back held it)
    with the main loop still turning said ok; it says `poll stalled` now."""
    tree.write_config(tree.webhook("ops", http.url()), daemon="poll_seconds = 0.1")
    d = inproc()
    d.pump(lambda: d.daemon.unhealthy() == "", what="healthy at first")
    d.daemon.scheduler.pause()  # the poll's timer stops; the loop goes on turning
    d.pump(lambda: d.daemon.unhealthy() == "poll stalled", timeout=20, what="poll stalled")
    d.daemon.scheduler.resume()
    d.pump(lambda: d.daemon.unhealthy() == "", what="healthy again")


def test_healthz_fails_while_the_database_is_away(tree, http, daemon_factory, pg_schema):
    from playhouse.db_url import connect

    tree.database = pg_schema
    tree.write_config(tree.webhook("ops", http.url()), daemon='metrics_listen = "127.0.0.1:0"')
    d = daemon_factory()
    assert healthz(d) == 200
    admin = connect(pg_schema)
    admin.execute_sql("ALTER TABLE events RENAME TO events_away")
    tree.drop(FAILED)
    wait_until(lambda: "database unavailable" in d.output(), what="the outage logged")
    assert healthz(d) == 503
    admin.execute_sql("ALTER TABLE events_away RENAME TO events")
    admin.close()
    http.wait_for(1, timeout=15)  # the file waited in the spool and goes out now
    wait_until(lambda: healthz(d) == 200, what="/healthz back to 200")
    assert d.stop() == 0


def test_healthz_says_the_database_is_away_with_nothing_in_the_spool(tree, http,
                                                                    daemon_factory, pg_schema):
    """With no file to ingest only the poll meets the database: its failure is an outage
    too, and the answer names it (it said 200, or "main loop stalled")."""
    from playhouse.db_url import connect

    tree.database = pg_schema
    tree.write_config(tree.webhook("ops", http.url()),
                      daemon='metrics_listen = "127.0.0.1:0"\npoll_seconds = 0.2')
    d = daemon_factory()
    assert healthz_answer(d) == (200, "ok\n")
    admin = connect(pg_schema)
    admin.execute_sql("ALTER TABLE replicas RENAME TO replicas_away")
    try:
        wait_until(lambda: "poll skipped, database unavailable" in d.output(),
                   what="the failed poll logged")
        assert healthz_answer(d) == (503, "database unavailable\n")
    finally:
        admin.execute_sql("ALTER TABLE replicas_away RENAME TO replicas")
        admin.close()
    wait_until(lambda: healthz(d) == 200, what="/healthz back to 200")
    assert d.stop() == 0


def test_a_restart_is_not_mistaken_for_a_twin(tree, http, daemon_factory):
    tree.write_config(tree.webhook("ops", http.url()), daemon='replica_id = "solo"')
    first = daemon_factory()
    first.kill()
    second = daemon_factory()
    tree.drop(FAILED)
    http.wait_for(1)
    wait_until(lambda: second.output().count("notification") >= 1, what="a notification")
    assert "also used by another live daemon" not in second.output()
    assert second.stop() == 0


def test_a_newline_in_a_recipient_cannot_forge_a_log_record(tree, http, daemon_factory):
    forged = "#x\n2026-05-26 02:00:00,000 INFO nomaflowd.dispatch: notification failed" \
             " job=payroll run=r1 transport=slack recipient=#ceo outcome=SENT"
    tree.write_config(tree.webhook("ops", http.url()),
                      daemon='event_recipients = ["#*"]')
    d = daemon_factory()
    tree.drop({**FAILED, "alerts": {"recipients": [forged]}})
    wait_until(lambda: len(tree.notifications()) == 1, what="the audit row")
    assert d.stop() == 0
    lines = d.output().splitlines()
    assert not any(line.startswith("2026-05-26 02:00:00,000") for line in lines)
    assert any('recipient="#x\\n2026-05-26' in line for line in lines)


def test_spaces_in_an_id_cannot_forge_the_fields_of_a_notification_line(
        tree, http, daemon_factory):
    """A value with a space, `=` or `"` is quoted: the first `outcome=` of the line is the
    attempt's own, whatever the job id says."""
    job = 'x run=1 transport=slack recipient=#payments outcome=SENT duration_ms=3 detail="ok'
    tree.write_config(tree.webhook("ops", "http://127.0.0.1:9/refused"))
    d = daemon_factory()
    tree.drop({"job_id": job, "run_id": "r 1", "state": "FAILED"})
    wait_until(lambda: len(tree.notifications()) == 1, what="the audit row")
    assert d.stop() == 0
    (line,) = [line for line in d.output().splitlines() if "notification failed" in line]
    tail = line.split(" notification failed ", 1)[1]
    # fields as a quote-aware reader sees them, up to the real detail= (the last one here)
    fields = dict(re.findall(r'(\w+)=("(?:[^"]|"")*"|\S*)(?: |$)',
                             tail[:tail.rindex(" detail=")]))
    assert fields == {"job": '"' + job.replace('"', '""') + '"', "run": '"r 1"',
                      "transport": "ops", "recipient": "ops", "outcome": "FAILED_TRANSPORT",
                      "duration_ms": fields["duration_ms"]}


def test_a_storm_of_signals_never_hangs_the_daemon(tree, http, daemon_factory):
    tree.write_config(tree.webhook("ops", http.url()))
    d = daemon_factory()
    for i in range(200):  # reloads land at every point of the loop, waits and clears included
        d.signal(signal.SIGHUP)
        if i % 50 == 0:
            tree.drop({**FAILED, "run_id": f"s{i}"})
    wait_until(lambda: "reloaded" in d.output(), what="a reload")
    http.wait_for(4)
    assert d.stop(timeout=20) == 0
    assert "Traceback" not in d.output()


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (root only, as on the CI machine; skipped elsewhere)."""
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                          capture_output=True)
    if made.returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_spool_disk_does_not_stop_the_ingest(tree, http, inproc, small_disk, caplog):
    """Reading and unlinking files needs no space; the note of files in hand did, and a
    full disk stopped every ingest (a traceback each rescan) until someone freed space."""
    tree.spool = small_disk / "spool"
    tree.write_config(tree.webhook("ops", http.url()))
    d = inproc()
    for i in range(20):
        tree.drop({**FAILED, "run_id": f"r{i}"})
    fd = os.open(small_disk / "filler", os.O_WRONLY | os.O_CREAT)
    with contextlib.suppress(OSError):  # until the disk is full
        while True:
            os.write(fd, b"\0" * 4096)
    os.close(fd)
    d.pump(lambda: len(tree.notifications()) == 20, what="20 audit rows")
    assert tree.spool_files() == []
    assert len(http.wait_for(20)) == 20
    assert "main loop iteration failed" not in caplog.text
    assert caplog.text.count("cannot note the spool files in hand") == 1


def test_a_full_database_disk_is_said_as_such_and_the_file_waits(tree, http, inproc,
                                                                  small_disk, caplog):
    """The outage line names the cause ("database or disk is full"); a ROLLBACK after
    SQLite had rolled back on its own used to replace it with "no transaction is active".
    Nothing is lost: the file waits, and flows once there is room."""
    tree.database = f"sqlite:///{small_disk}/nomaflowd.db"
    tree.write_config(tree.webhook("ops", http.url()))
    d = inproc()
    fd = os.open(small_disk / "filler", os.O_WRONLY | os.O_CREAT)
    with contextlib.suppress(OSError):  # until the disk is full
        while True:
            os.write(fd, b"\0" * 4096)
    os.close(fd)
    tree.drop(FAILED)
    d.pump(lambda: "database unavailable" in caplog.text, what="the outage in the log")
    assert "database or disk is full" in caplog.text
    assert "no transaction is active" not in caplog.text
    assert len(tree.spool_files()) == 1
    (small_disk / "filler").unlink()
    rows = lambda: sqlite3.connect(small_disk / "nomaflowd.db").execute(  # noqa: E731
        "SELECT outcome FROM notifications").fetchall()
    d.pump(lambda: rows() == [("SENT",)], what="the audit row, once there is room")
    assert tree.spool_files() == []


def test_a_postgresql_table_lock_is_an_outage_not_a_frozen_loop(tree, http, pg_schema, inproc,
                                                                 caplog):
    """A lock someone holds on a table used to freeze the main loop without a word (no
    watchdog ping: systemd killed it). Waiting for a lock is bounded: the loop says the
    database is unavailable, keeps the file, and goes on once the lock is gone."""
    import psycopg2

    tree.database = pg_schema
    tree.write_config(tree.webhook("ops", http.url()))
    d = inproc()
    holder = psycopg2.connect(pg_schema)
    try:
        with holder.cursor() as cur:
            cur.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")  # held: no commit yet
        tree.drop(FAILED)
        d.pump(lambda: "database unavailable" in caplog.text, timeout=20,
               what="the outage in the log")
        assert "lock timeout" in caplog.text
        assert len(tree.spool_files()) == 1
    finally:
        holder.rollback()
        holder.close()
    d.pump(lambda: len(http.requests) == 1, timeout=20, what="the alert, once the lock is gone")


def test_a_stop_waits_for_the_database_to_record_what_was_sent(tree, http, daemon_factory,
                                                               pg_schema):
    """A stop while the audit table cannot be written used to drop the results: their claims
    stayed open and the next start paged everyone again, calling it a resend. The stop now
    waits for the database (a while), records, and the next start sends nothing."""
    import psycopg2

    http.default = Reply(delay=0.5)
    tree.database = pg_schema
    tree.write_config(tree.webhook("ops", http.url()))
    d = daemon_factory()
    holder = psycopg2.connect(pg_schema)
    try:
        tree.drop(FAILED)
        wait_until(lambda: http.open_connections, what="the POST under way")
        with holder.cursor() as cur:
            cur.execute("LOCK TABLE notifications IN ACCESS EXCLUSIVE MODE")
        d.signal(signal.SIGTERM)
        wait_until(lambda: "waiting for the database to record the last 1 result" in d.output(),
                   timeout=20, what="the stop waiting for the database")
    finally:
        holder.rollback()
        holder.close()
    assert d.proc.wait(30) == 0
    again = daemon_factory()
    assert again.stop() == 0
    assert [r.json()["run_id"] for r in http.requests] == ["run_a8c4d"]
    with psycopg2.connect(pg_schema) as conn, conn.cursor() as cur:
        cur.execute("SELECT outcome FROM notifications")
        assert cur.fetchall() == [("SENT",)]


def test_retention_runs_daily_on_the_scheduler(tree, inproc, caplog):
    """README: rows older than retention_days are pruned daily (the first run a minute
    after the start); brought forward here, the job itself removes the old row."""
    caplog.set_level(logging.INFO, logger="nomaflowd")
    tree.write_config("", daemon="retention_days = 30")
    d = inproc()
    job = d.daemon.scheduler.get_job("prune")
    assert job.trigger.interval == timedelta(days=1)
    assert job.next_run_time - datetime.now().astimezone() <= timedelta(minutes=1)
    for run_id, days in (("old", 31), ("recent", 29)):
        db.NotificationRow.insert(
            created_at=db.utcnow() - timedelta(days=days), job_id="j", run_id=run_id,
            alert="failed", level="high", transport="hook", transport_type="webhook",
            recipient="hook", outcome="SENT", detail="", replica="x").execute()
    job.modify(next_run_time=datetime.now().astimezone())
    d.pump(lambda: "retention: removed 1 notifications" in caplog.text,
           what="the scheduled retention run")
    assert [r["run_id"] for r in tree.notifications()] == ["recent"]
