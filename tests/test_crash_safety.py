"""Crash loops, a full disk under the database: the daemon keeps going and loses nothing."""

from __future__ import annotations

import contextlib
import os
import subprocess

import pytest

from tests.servers import wait_until

FAILED = {"job_id": "j", "state": "FAILED"}


def crash_three_times(daemon_factory):
    """Three starts that crash on the file named *poison*; returns the fourth, running."""
    env = {"NOMAFLOWD_FAULT_CRASH_ON": "poison"}
    for attempt in (1, 2, 3):
        d = daemon_factory(env, wait=False)
        assert d.proc.wait(20) == 70, f"start {attempt} should crash on the poison file"
    return daemon_factory(env)


def test_a_file_that_crashes_the_daemon_is_quarantined_after_three_tries(
        tree, http, daemon_factory):
    tree.write_config(tree.webhook("hook", http.url()))
    tree.drop({**FAILED, "run_id": "good"})
    (tree.spool / "zz-poison.json").write_text('{"job_id": "j", "run_id": "p", "state": "FAILED"}')
    d = crash_three_times(daemon_factory)
    assert http.wait_for(1)[0].json()["run_id"] == "good"
    note = (tree.spool / "rejected" / "zz-poison.json.error").read_text()
    assert "stopped 3 times" in note
    assert not tree.spool_files()
    assert d.stop() == 0
    assert {r.json()["run_id"] for r in http.requests} == {"good"}
    rows = tree.notifications()
    assert len(rows) == 1 or all("sent again" in r["detail"] for r in rows[1:])


@pytest.mark.parametrize("backend", ["sqlite",
                                     pytest.param("postgres", marks=pytest.mark.postgres)])
def test_names_that_are_not_utf8_are_counted_like_any_other(
        tree, http, daemon_factory, request, backend):
    """Files in hand at a crash are counted in the database by name; a name that is not
    UTF-8 (the crasher's or a neighbour's, up to 255 bytes) used to make the count fail, so
    that every start failed and the crasher was never quarantined."""
    if backend == "postgres":
        tree.database = request.getfixturevalue("pg_schema")
    tree.write_config(tree.webhook("hook", http.url()))
    tree.spool.mkdir(parents=True, exist_ok=True)
    spool = os.fsencode(tree.spool)
    neighbour = b"a-\xff" + b"\xfe" * 240 + b".json"
    with open(spool + b"/" + neighbour, "wb") as fh:
        fh.write(b'{"job_id": "j", "run_id": "neighbour", "state": "FAILED"}')
    with open(spool + b"/zz-poison-\xff.json", "wb") as fh:
        fh.write(b'{"job_id": "j", "run_id": "p", "state": "FAILED"}')
    d = crash_three_times(daemon_factory)
    assert http.wait_for(1)[0].json()["run_id"] == "neighbour"
    wait_until(lambda: not tree.spool_files(), what="the spool emptied")
    assert d.stop() == 0
    rejected = os.listdir(spool + b"/rejected")
    assert b"zz-poison-\xff.json" in rejected
    assert b"zz-poison-\xff.json.error" in rejected
    assert {r.json()["run_id"] for r in http.requests} == {"neighbour"}
    assert "internal error" not in d.output() and "Traceback" not in d.output()


@pytest.fixture
def small_disk(tree):
    mount = tree.root / "dbfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                          capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_disk_under_the_database_holds_files_until_space_returns(
        tree, http, daemon_factory, small_disk):
    tree.database = f"sqlite:///{small_disk}/nomaflowd.db"
    tree.db_path = small_disk / "nomaflowd.db"
    tree.write_config(tree.webhook("hook", http.url()), daemon="rescan_seconds = 0.2")
    d = daemon_factory()
    ballast = small_disk / "ballast"
    # Unbuffered, and down to the last byte: a few KiB left free would let SQLite commit.
    with ballast.open("wb", buffering=0) as fh:
        for size in (65536, 4096, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    fh.write(b"\0" * size)
    for i in range(5):
        tree.drop({**FAILED, "run_id": f"r{i}"})
    wait_until(lambda: "database unavailable" in d.output(), what="the outage logged")
    assert len(tree.spool_files()) == 5
    assert http.requests == []
    os.unlink(ballast)
    http.wait_for(5, timeout=20)
    wait_until(lambda: not tree.spool_files(), what="spool drained")
    wait_until(lambda: len(tree.notifications()) == 5, what="five audit rows")
    assert d.output().count("database unavailable, files wait") == 1  # once a minute at most
    assert d.stop() == 0


def test_a_vanished_spool_is_reported_as_such_and_recovered_from(tree, http, daemon_factory):
    import shutil

    tree.write_config(tree.webhook("hook", http.url()), daemon="rescan_seconds = 0.2")
    d = daemon_factory()
    shutil.rmtree(tree.spool)
    wait_until(lambda: "cannot be read" in d.output(), what="the spool problem logged")
    assert "database unavailable" not in d.output()
    tree.spool.mkdir()
    wait_until(lambda: "watching it again" in d.output(), what="the watch re-armed")
    assert (tree.spool / "rejected").is_dir() and (tree.spool / "tmp").is_dir()
    tree.drop({**FAILED, "run_id": "back"})
    (tree.spool / "bad.json").write_text("not json")
    assert http.wait_for(1, timeout=10)[0].json()["run_id"] == "back"
    wait_until(lambda: (tree.spool / "rejected" / "bad.json.error").exists(), what="rejected")
    assert d.stop() == 0


def test_a_database_file_removed_under_the_daemon_stops_it_saying_why(tree, http,
                                                                      daemon_factory):
    """What it recorded after the removal would vanish with the unlinked file at the next
    restart: it stops (exit 1, systemd starts it again on a new file) and says why."""
    tree.write_config(tree.webhook("ops", http.url()))
    d = daemon_factory()
    for path in tree.db_path.parent.glob(tree.db_path.name + "*"):
        path.unlink()
    assert d.proc is not None
    assert d.proc.wait(timeout=20) == 1
    assert (f"daemon.database: {tree.db_path} was removed while the daemon ran; stopping, so"
            " that nothing more is recorded into a file that is gone") in d.output()
    assert "Traceback" not in d.output()
