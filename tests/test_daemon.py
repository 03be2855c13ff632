"""End to end: the daemon as a real process, a real HTTP receiver, a real SQLite file."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import threading
from pathlib import Path

import pytest

from nomaflowd import db, events
from nomaflowd.alerts import from_event
from tests.servers import Reply, closed_port, wait_until

FAILED = {"job_id": "reporting-nightly-sync", "run_id": "run_a8c4d", "state": "FAILED",
          "triggered_by": "cron", "started_at": "2026-05-26T02:00:00Z",
          "finished_at": "2026-05-26T02:14:22Z", "step": "copy-orders",
          "error": "OperationalError: connection refused"}


def test_failed_event_posts_default_body_and_records_sent(tree, http, daemon_factory):
    tree.write_config(tree.webhook("ops", http.url()))
    d = daemon_factory()
    tree.drop(FAILED)
    body = http.wait_for(1)[0].json()
    assert body["job_id"] == "reporting-nightly-sync"
    assert body["run_id"] == "run_a8c4d"
    assert body["state"] == "FAILED"
    assert body["triggered_by"] == "cron"
    assert body["started_at"] == "2026-05-26T02:00:00Z"
    assert body["finished_at"] == "2026-05-26T02:14:22Z"
    assert body["error"] == "OperationalError: connection refused"
    assert body["url"] == "https://nomaflow.test/runs/run_a8c4d/"
    assert body["alert"] == "failed" and body["level"] == "high"
    rows = wait_until(tree.notifications, what="audit row")
    assert [(r["outcome"], r["transport"], r["alert"], r["level"]) for r in rows] == [
        ("SENT", "ops", "failed", "high")]
    wait_until(lambda: not tree.spool_files(), what="spool empty")
    assert tree.sql("SELECT state FROM runs WHERE run_id = 'run_a8c4d'") == [("FAILED",)]
    assert "notification" in d.output() and "SENT" in d.output()
    assert d.stop() == 0


def test_an_answer_that_comes_while_the_loop_sleeps_is_recorded_at_once(tree, http,
                                                                       daemon_factory):
    """The sender wakes the main loop with its verdict. Here nothing else would for five
    minutes (no rescan, no poll), so each audit row landing soon after its answer is that
    wake: for the first result and for one after the loop has taken the first."""
    arrived, release = threading.Event(), threading.Event()

    def held(_request):
        arrived.set()
        release.wait(20)
        return Reply()

    http.replies["/"] = held
    tree.write_config(tree.webhook("ops", http.url()), daemon="poll_seconds = 300\n"
                      "rescan_seconds = 300\nsend_timeout_seconds = 30")
    daemon_factory()
    for n in (1, 2):
        arrived.clear()
        release.clear()
        tree.drop({**FAILED, "run_id": f"held-{n}"})
        wait_until(arrived.is_set, what="the POST at the receiver")
        # Its file deleted: the loop has finished that batch and has nothing left to do.
        wait_until(lambda: not tree.spool_files(), what="spool empty")
        release.set()
        wait_until(lambda want=n: len(tree.notifications()) == want, timeout=10,
                   what=f"audit row {n}")
        last = tree.notifications()[-1]
        assert (last["run_id"], last["outcome"]) == (f"held-{n}", "SENT")


def test_debug_logging_shows_the_stages_and_not_every_sql_statement(tree, http,
                                                                      daemon_factory):
    """NOMAFLOWD_DEBUG=1 adds the per-batch and per-send `stages` lines (bench/stages.py);
    the database library's own debug lines, every statement with its values, stay out."""
    tree.write_config(tree.webhook("ops", http.url()))
    d = daemon_factory({"NOMAFLOWD_DEBUG": "1"})
    tree.drop(FAILED)
    http.wait_for(1)
    wait_until(lambda: "outcome=SENT" in d.output(), what="the notification line")
    log = d.output()
    assert "stages batch=1 " in log and "stages send run=run_a8c4d " in log
    assert "INSERT INTO" not in log and "BEGIN" not in log


def test_files_dropped_while_down_are_processed_at_start(tree, http, daemon_factory):
    tree.write_config(tree.webhook("ops", http.url()))
    for i in range(5):
        tree.drop({**FAILED, "run_id": f"r{i}"})
    daemon_factory()
    assert sorted(r.json()["run_id"] for r in http.wait_for(5)) == [f"r{i}" for i in range(5)]
    wait_until(lambda: not tree.spool_files(), what="spool empty")


def test_ready_comes_after_the_backlog_then_the_watchdog_is_fed(tree, http, daemon_factory):
    """README: files already present at start are ingested before READY=1; with
    WatchdogSec set, WATCHDOG=1 follows at half its interval."""
    import sqlite3

    tree.write_config(tree.webhook("ops", http.url()))
    for i in range(300):
        tree.drop({**FAILED, "run_id": f"r{i}"})
    d = daemon_factory({"WATCHDOG_USEC": "1000000"})
    [ready] = [m for m in d.messages if "READY=1" in m]
    assert "STATUS=watching the spool" in ready
    with sqlite3.connect(tree.db_path) as conn:
        assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 300
    assert tree.spool_files() == []
    d.wait_message("WATCHDOG=1", timeout=5)
    http.wait_for(300)
    assert d.stop() == 0


def test_files_dropped_during_startup_all_arrive(tree, http, daemon_factory):
    tree.write_config(tree.webhook("ops", http.url()))
    tree.spool.mkdir(parents=True)
    d = daemon_factory(wait=False)
    for i in range(20):
        tree.drop({**FAILED, "run_id": f"s{i}"})
    d.wait_message("READY=1")
    http.wait_for(20)
    wait_until(lambda: len(tree.notifications()) == 20, what="20 audit rows")


def test_same_event_twice_posts_once(tree, http, daemon_factory):
    tree.write_config(tree.webhook("ops", http.url()))
    d = daemon_factory()
    tree.drop(FAILED)
    tree.drop(FAILED)
    tree.drop({**FAILED, "event_id": "another-id-same-run"})
    http.wait_for(1)
    wait_until(lambda: not tree.spool_files(), what="spool empty")
    assert tree.sql("SELECT count(*) FROM events") == [(2,)]
    assert d.stop() == 0
    assert len(http.requests) == 1
    assert len(tree.notifications()) == 1


def test_http_500_is_failed_delivery_and_refused_port_is_failed_transport(tree, http,
                                                                          daemon_factory):
    http.default = Reply(500, b"boom")
    tree.write_config(tree.webhook("broken", http.url())
                      + tree.webhook("dead", f"http://127.0.0.1:{closed_port()}/x"))
    daemon_factory()
    tree.drop(FAILED)
    rows = wait_until(lambda: len(tree.notifications()) == 2 and tree.notifications())
    outcomes = {r["transport"]: (r["outcome"], r["detail"]) for r in rows}
    assert outcomes["broken"][0] == "FAILED_DELIVERY" and "500" in outcomes["broken"][1]
    assert outcomes["dead"] == ("FAILED_TRANSPORT", "connection refused")


def test_slow_receiver_times_out_without_delaying_a_healthy_one(tree, http, daemon_factory):
    from tests.servers import HttpRecorder

    slow = HttpRecorder()
    slow.default = Reply(delay=5)
    try:
        tree.write_config(tree.webhook("slow", slow.url()) + tree.webhook("fast", http.url()))
        daemon_factory()
        tree.drop(FAILED)
        fast = http.wait_for(1)[0]
        rows = wait_until(lambda: len(tree.notifications()) == 2 and tree.notifications(),
                          timeout=15)
        by = {r["transport"]: r for r in rows}
        assert by["slow"]["outcome"] == "FAILED_TRANSPORT"
        assert "timed out" in by["slow"]["detail"]
        assert by["fast"]["outcome"] == "SENT"
        assert by["fast"]["duration_ms"] < 1000
        assert fast.at is not None
    finally:
        slow.close()


def test_trickling_receiver_is_cut_at_the_send_timeout(tree, http, daemon_factory):
    http.default = Reply(200, b"x" * 100, trickle=0.5)
    tree.write_config(tree.webhook("trickle", http.url()))
    daemon_factory()
    tree.drop(FAILED)
    row = wait_until(tree.notifications, timeout=15)[0]
    assert row["outcome"] == "FAILED_TRANSPORT"
    assert "timed out" in row["detail"]
    assert row["duration_ms"] < 4000


def test_body_template_survives_quotes_and_newlines(tree, http, daemon_factory):
    template = '{"text": "${job_id} ${state}: ${error}", "link": "${url}"}'
    tree.write_config(tree.webhook("tpl", http.url(), f"body_template = '{template}'"))
    daemon_factory()
    tree.drop({**FAILED, "error": 'bad "quote"\nand a newline \\ backslash'})
    body = http.wait_for(1)[0].json()
    assert body["text"] == ('reporting-nightly-sync FAILED: bad "quote"\nand a newline '
                            "\\ backslash")
    assert body["link"] == "https://nomaflow.test/runs/run_a8c4d/"


def test_signature_verifies(tree, http, daemon_factory):
    tree.write_config(tree.webhook("signed", http.url(),
                                   f'signing_secret = "{tree.enc("s3cret-signing")}"\n'
                                   f'headers = {{ Authorization = "{tree.enc("Bearer tok")}" }}'))
    daemon_factory()
    tree.drop(FAILED)
    req = http.wait_for(1)[0]
    stamp = req.headers["X-Nomaflow-Timestamp"]
    expected = hmac.new(b"s3cret-signing", stamp.encode() + b"." + req.body,
                        hashlib.sha256).hexdigest()
    assert req.headers["X-Nomaflow-Signature"] == f"sha256={expected}"
    assert req.headers["Authorization"] == "Bearer tok"


BAD_FILES = {
    "not-json.json": b"this is not json",
    "binary.json": bytes(range(256)),
    "empty.json": b"",
    "array.json": b"[1, 2, 3]",
    "wrong-type.json": b'{"job_id": 5, "state": "FAILED", "run_id": "r"}',
    "no-job.json": b'{"state": "FAILED", "run_id": "r"}',
    "no-run.json": b'{"job_id": "j", "state": "FAILED"}',
    "bad-state.json": b'{"job_id": "j", "state": "EXPLODED", "run_id": "r"}',
    "huge.json": b'{"job_id": "j", "state": "FAILED", "run_id": "r", "error": "'
                 + b"x" * (1024 * 1024) + b'"}',
}


def test_bad_files_are_rejected_with_a_reason_and_good_ones_still_delivered(
        tree, http, daemon_factory):
    tree.write_config(tree.webhook("ops", http.url()))
    tree.spool.mkdir(parents=True)
    for name, data in BAD_FILES.items():
        (tree.spool / name).write_bytes(data)
    target = tree.root / "elsewhere.json"
    target.write_text('{"job_id": "j", "state": "FAILED", "run_id": "r"}')
    os.symlink(target, tree.spool / "symlink.json")
    os.mkfifo(tree.spool / "fifo.json")
    tree.drop(FAILED)
    daemon_factory()
    http.wait_for(1)
    expected = {*BAD_FILES, "symlink.json", "fifo.json"}
    wait_until(lambda: set(tree.rejected()) >= expected | {f"{n}.error" for n in expected},
               what="every bad file rejected")
    reasons = {n: (tree.spool / "rejected" / f"{n}.error").read_text() for n in expected}
    assert "not JSON" in reasons["not-json.json"]
    assert "UTF-8" in reasons["binary.json"]
    assert "empty" in reasons["empty.json"]
    assert "object" in reasons["array.json"]
    assert "job_id must be a string" in reasons["wrong-type.json"]
    assert "job_id is required" in reasons["no-job.json"]
    assert "run_id is required" in reasons["no-run.json"]
    assert "EXPLODED" in reasons["bad-state.json"]
    assert "larger than" in reasons["huge.json"]
    assert "symbolic link" in reasons["symlink.json"]
    assert "not a regular file" in reasons["fifo.json"]
    assert target.exists()
    assert not tree.spool_files()


def test_kill_9_with_events_in_flight_loses_nothing(tree, http, daemon_factory):
    http.default = Reply(delay=0.05)
    tree.write_config(tree.webhook("ops", http.url()))
    d = daemon_factory()
    for i in range(60):
        tree.drop({**FAILED, "run_id": f"k{i}"})
    http.wait_for(5)
    d.kill()
    daemon_factory()
    wanted = {f"k{i}" for i in range(60)}
    wait_until(lambda: {r.json()["run_id"] for r in http.requests} >= wanted, timeout=30,
               what="all 60 delivered")
    wait_until(lambda: not tree.spool_files(), what="spool empty")
    rows = wait_until(lambda: len({r["run_id"] for r in tree.notifications()}) == 60
                      and tree.notifications(), what="60 audit rows")
    runs = [r.json()["run_id"] for r in http.requests]
    duplicates = {r for r in runs if runs.count(r) > 1}
    resent = {r["run_id"] for r in rows if "sent again after a restart" in r["detail"]}
    assert duplicates <= resent


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_lets_a_send_in_flight_finish_and_exits_zero(tree, http, daemon_factory, sig):
    """README: SIGTERM/SIGINT finish in-flight sends and exit 0."""
    http.default = Reply(delay=1.0)
    tree.write_config(tree.webhook("ops", http.url()))
    d = daemon_factory()
    tree.drop(FAILED)
    wait_until(lambda: http.open_connections, what="the POST under way")
    d.signal(sig)
    assert d.proc.wait(15) == 0
    assert [r.json()["run_id"] for r in http.requests] == ["run_a8c4d"]
    [row] = tree.notifications()
    assert (row["run_id"], row["outcome"]) == ("run_a8c4d", "SENT")


def test_sigterm_exits_zero_and_sighup_reloads(tree, http, daemon_factory):
    tree.write_config(tree.webhook("ops", http.url()))
    d = daemon_factory()
    tree.write_config(tree.webhook("ops", http.url("/after-reload")))
    d.signal(signal.SIGHUP)
    d.wait_message("RELOADING=1")
    wait_until(lambda: "reloaded" in d.output(), what="reload logged")
    tree.drop(FAILED)
    assert http.wait_for(1)[0].path == "/after-reload"
    tree.config_path.write_text("[daemon]\nspool_dirr = 1\n")
    d.signal(signal.SIGHUP)
    wait_until(lambda: "reload refused" in d.output(), what="bad reload refused")
    tree.drop({**FAILED, "run_id": "second"})
    http.wait_for(2)
    assert d.stop() == 0


def test_renames_are_noticed_by_the_watcher_not_only_by_the_rescan(tree, http, daemon_factory):
    # With a rescan once a minute, only the inotify hint can deliver within the wait below.
    tree.write_config(tree.webhook("ops", http.url()), daemon="rescan_seconds = 60")
    daemon_factory()
    tmp = tree.spool / "tmp" / ".from-tmp"
    tmp.write_text(json.dumps({**FAILED, "run_id": "from-tmp"}))
    os.rename(tmp, tree.spool / "from-tmp.json")
    http.wait_for(1, timeout=10)
    local = tree.spool / ".evt-1.tmp"  # a temp name inside the spool itself
    local.write_text(json.dumps({**FAILED, "run_id": "in-spool"}))
    os.rename(local, tree.spool / "in-spool.json")
    http.wait_for(2, timeout=10)
    assert sorted(r.json()["run_id"] for r in http.requests) == ["from-tmp", "in-spool"]


def test_a_backlog_of_large_files_is_read_a_bounded_amount_at_a_time(tree, http,
                                                                     daemon_factory):
    """Runners are untrusted: 150 files just under the 1 MiB limit, waiting at start, must not
    be held in memory all at once (a batch is bounded in bytes, not only in files)."""
    tree.write_config(tree.webhook("ops", http.url()))
    tree.spool.mkdir(parents=True)
    big = "x" * (900 * 1024)
    for i in range(150):
        (tree.spool / f"big-{i:03d}.json").write_text(json.dumps(
            {"job_id": "bulky", "state": "SUCCEEDED", "run_id": f"b{i}", "error": big}))
    d = daemon_factory()
    wait_until(lambda: tree.sql("SELECT count(*) FROM events")[0][0] == 150, timeout=60,
               what="150 events recorded")
    wait_until(lambda: not tree.spool_files(), what="spool empty")
    peak_mb = d.status_kb("VmHWM") / 1024
    # 455 MB when a batch was bounded in files only; 84 MB with BATCH_BYTES.
    assert peak_mb < 250, f"peak RSS {peak_mb:.0f} MB for 135 MB of files"


def test_metrics_carry_every_name_and_label_readme_lists(tree, http, daemon_factory):
    from tests.test_storms import scrape

    tree.write_config(tree.webhook("ops", http.url()), daemon='metrics_listen = "127.0.0.1:0"')
    d = daemon_factory()
    tree.drop(FAILED)
    tree.drop({"job_id": "etl", "run_id": "r2", "state": "RUNNING"})
    tree.spool.joinpath("broken.json").write_text("{not json")
    wait_until(lambda: tree.notifications() and tree.rejected(), what="a row and a rejection")
    wait_until(lambda: not tree.spool_files(), what="the spool emptied")
    families = {f.name: f for f in scrape(d)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in families.values() for s in f.samples}
    assert samples[("nomaflowd_notifications_total", (
        ("alert", "failed"), ("outcome", "SENT"), ("transport", "ops"),
        ("transport_type", "webhook")))] == 1
    assert samples[("nomaflowd_events_ingested_total", (("state", "FAILED"),))] == 1
    assert samples[("nomaflowd_events_ingested_total", (("state", "RUNNING"),))] == 1
    assert samples[("nomaflowd_files_rejected_total", ())] == 1
    assert samples[("nomaflowd_send_duration_seconds_count", (("transport", "ops"),))] == 1
    assert samples[("nomaflowd_running_runs", ())] == 1
    assert samples[("nomaflowd_spool_backlog", ())] == 0
    assert samples[("nomaflowd_alerts_waiting", ())] == 0
    assert 0 <= samples[("nomaflowd_newest_event_age_seconds", ())] < 60
    assert "nomaflowd_digests_sent" in families
    assert d.stop() == 0


def test_a_reload_keeps_the_spool_and_database_until_a_restart(tree, http, daemon_factory):
    """README: a change to spool_dir or database needs a restart. A reload says so, keeps
    both, and applies the rest of the new config."""
    tree.write_config(tree.webhook("ops", http.url()))
    d = daemon_factory()
    elsewhere = tree.root / "other"
    tree.write_config(tree.webhook("ops", http.url("/after-reload")),
                      daemon=f'spool_dir = "{elsewhere / "spool"}"\n'
                             f'database = "sqlite:///{elsewhere / "other.db"}"')
    d.signal(signal.SIGHUP)
    wait_until(lambda: "reloaded" in d.output(), what="reload logged")
    for key in ("spool_dir", "database"):
        assert f"daemon.{key} changed; it takes effect at the next restart" in d.output()
    tree.drop(FAILED)  # into the running spool
    assert http.wait_for(1)[0].path == "/after-reload"  # the rest of the config applies
    wait_until(lambda: len(tree.notifications()) == 1, what="the row in the running database")
    assert not (elsewhere / "other.db").exists() and not (elsewhere / "spool").exists()
    assert d.stop() == 0


def test_a_year_before_1000_goes_out_as_rfc3339(tree, http, daemon_factory):
    tree.write_config(tree.webhook("ops", http.url()))
    daemon_factory()
    tree.drop({**FAILED, "started_at": "0001-01-01T00:00:00Z",
               "finished_at": "0999-05-26T02:14:22Z"})
    body = http.wait_for(1)[0].json()
    assert (body["started_at"], body["finished_at"]) == ("0001-01-01T00:00:00Z",
                                                         "0999-05-26T02:14:22Z")


def test_claims_another_version_left_are_resumed_or_named_never_a_crash_loop(tree, http,
                                                                             inproc, caplog):
    """A claim left unfinished by another version of nomaflowd (a rollback, a peer not yet
    upgraded): an alert field this one does not know is ignored, and a claim it cannot read
    at all is named in the log and left for a version that can. `Alert(**context)` raised
    TypeError at every start: a crash loop under systemd."""
    tree.write_config(tree.webhook("ops", http.url()))
    first = inproc()
    tree.drop(FAILED)
    first.pump(lambda: tree.notifications(), what="the first alert")
    first.close()
    [replica] = [row[0] for row in tree.sql("SELECT claimed_by FROM deliveries")]
    alert = from_event("failed", events.parse(json.dumps(FAILED).encode(), "x.json",
                                              db.utcnow()), "")
    newer = {"alert": {**vars(alert), "run_id": "from-a-newer-version", "added_later": 1},
             "error": None}  # as deliveries.claim writes it, and one field more
    tree.sql("INSERT INTO deliveries (alert_key, transport, recipient, event_id, context, state,"
             " claimed_by, claimed_at, attempts) VALUES ('k-newer', 'ops', 'ops', NULL, ?,"
             " 'claimed', ?, '2026-12-01 00:00:00', 1), ('k-unreadable', 'ops', 'ops', NULL,"
             " '{\"alert\": {\"kind\": 3', 'claimed', ?, '2026-12-01 00:00:00', 1)",
             json.dumps(newer), replica, replica)
    again = inproc()
    again.pump(lambda: len(http.requests) == 2, what="the newer version's claim sent")
    assert http.requests[1].json()["run_id"] == "from-a-newer-version"
    assert "claim k-unreadable cannot be read by this version" in caplog.text
    assert tree.sql("SELECT state FROM deliveries WHERE alert_key = 'k-unreadable'") == [
        ("claimed",)]


def test_a_sighup_while_the_daemon_starts_does_not_kill_it(tree, http):
    """SIGHUP's default is to end the process, and the daemon set its handler only once the
    config was read: a `kill -HUP` in its first few hundred milliseconds killed it without a
    line, and systemd counts that a clean exit (no restart). Here the start is held on the
    key file (a FIFO) while the signal comes."""
    from tests.harness import DaemonProcess

    tree.write_config(tree.webhook("ops", http.url()))
    key = tree.key.read_bytes()
    tree.key.unlink()
    os.mkfifo(tree.key, 0o600)
    d = DaemonProcess(tree).start(wait=False)
    try:
        def hup_caught() -> bool:
            status = Path(f"/proc/{d.pid}/status").read_text()
            caught = int(status.split("SigCgt:")[1].split()[0], 16)
            return bool(caught & (1 << (signal.SIGHUP - 1)))

        wait_until(hup_caught, what="SIGHUP handled before the config is read")
        d.signal(signal.SIGHUP)
        with open(tree.key, "wb") as fifo:  # the start goes on...
            fifo.write(key)
        (tree.root / "key").write_bytes(key)  # ...and the reload it asked for reads a file
        os.replace(tree.root / "key", tree.key)
        d.wait_message("READY=1")
        wait_until(lambda: "reloaded" in d.output(), what="the reload it asked for")
        assert d.stop() == 0
    finally:
        d.close()


def test_a_done_claim_keeps_no_copy_of_its_alert(tree, http, inproc):
    """A claim keeps its alert as JSON to send it again after a crash; once done, nothing
    reads it again, and it was 40 % of the database (370 bytes a claim, 6.4 KB an event
    over five transports)."""
    tree.write_config(tree.webhook("ops", http.url()))
    d = inproc()
    tree.drop(FAILED)
    d.pump(lambda: tree.notifications(), what="the row")
    assert tree.sql("SELECT state, context FROM deliveries") == [("done", "")]
