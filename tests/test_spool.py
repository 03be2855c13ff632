"""Hostile spool input through the daemon's own loop, in-process, on a real SQLite file."""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import stat
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from nomaflowd import config
from nomaflowd.daemon import Daemon
from nomaflowd.web import rejected_notes
from tests.conftest import Tree

NOW = datetime(2026, 5, 26, 2, 30, 0)
FAILED = {"job_id": "reporting-nightly-sync", "run_id": "run_a8c4d", "state": "FAILED"}
GOOD = {"job_id": "etl", "run_id": "after-the-hostile-ones", "state": "SUCCEEDED"}


@pytest.fixture
def daemon(tree: Tree) -> Iterator[Daemon]:
    tree.write_config("")
    tree.spool.mkdir(parents=True)
    (tree.spool / "tmp").mkdir()
    d = Daemon(config.load(tree.config_path))
    d.initialize()
    yield d
    d.shutdown()  # stops the watchdog observer and the scheduler's thread


def settle(d: Daemon) -> None:
    """Steps until the spool is drained, as the watchdog hint for a fresh file would cause."""
    d.hint()
    for _ in range(100):
        if not d.step(NOW):
            return
    raise AssertionError("the daemon still had work after 100 steps")


def event_ids(tree: Tree) -> list[str]:
    return [row[0] for row in tree.sql("SELECT event_id FROM events ORDER BY event_id")]


def rejected(d: Daemon) -> set[str]:
    """What rejected/ holds, less the daemon's own marker of the files in hand."""
    return set(os.listdir(d.spool.rejected)) - {d.spool.handling.name}


def error_note(tree: Tree, name: str) -> str:
    return (tree.spool / "rejected" / f"{name}.error").read_text(encoding="utf-8")


def hard_link(tree: Tree) -> str:
    other = tree.root / "writer-keeps-this.json"
    other.write_text(json.dumps(FAILED))
    os.link(other, tree.spool / "0-hard-link.json")
    return "0-hard-link.json"


def deep_nesting(tree: Tree) -> str:
    depth = 100_000
    (tree.spool / "0-deep.json").write_bytes(
        b'{"job_id": "j", "state": "NOTICE", "message": "m", "x": ' + b"[" * depth
        + b"]" * depth + b"}")
    return "0-deep.json"


def huge_number(tree: Tree) -> str:
    (tree.spool / "0-huge-number.json").write_bytes(
        b'{"job_id": "j", "state": "FAILED", "run_id": "r", "alerts": {"on_long_run_minutes": 9'
        + b"9" * 4999 + b"}}")
    return "0-huge-number.json"


def duplicate_keys(tree: Tree) -> str:
    (tree.spool / "0-duplicate.json").write_bytes(
        b'{"job_id": "j", "state": "FAILED", "run_id": "r", "run_id": "s"}')
    return "0-duplicate.json"


def undecodable_name(tree: Tree) -> str:
    path = os.path.join(os.fsencode(tree.spool), b"\xff\xfe.json")
    with open(path, "wb") as fh:
        fh.write(b"not json")
    return os.fsdecode(b"\xff\xfe.json")  # what os.scandir hands the daemon: "\udcff\udcfe.json"


HOSTILE: dict[str, tuple[Callable[[Tree], str], str]] = {
    "hard link": (hard_link, "has other hard links"),
    "deep nesting": (deep_nesting, "nested too deeply"),
    "huge number": (huge_number, "not acceptable JSON"),
    "duplicate keys": (duplicate_keys, "key 'run_id' appears twice"),
    "undecodable name": (undecodable_name, "not JSON"),
}


def test_hostile_files_are_rejected_with_a_reason_and_a_good_file_is_still_recorded(
        tree: Tree, daemon: Daemon):
    # One daemon for all of them: each rename out of the watched directory costs the
    # observer's shutdown half a second (watchdog pairs moves for that long).
    names = {kind: make(tree) for kind, (make, _) in HOSTILE.items()}
    tree.drop(GOOD)
    settle(daemon)
    assert rejected(daemon) == {*names.values(), *(f"{n}.error" for n in names.values())}
    for kind, (_, reason) in HOSTILE.items():
        assert reason in error_note(tree, names[kind]), kind
    assert event_ids(tree) == ["etl/after-the-hostile-ones/SUCCEEDED"]
    assert tree.spool_files() == []
    assert sorted(n for n, _ in daemon.spool.rejected_files()) == sorted(names.values())
    # the writer's own link of the hard-linked file is untouched
    assert json.loads((tree.root / "writer-keeps-this.json").read_text()) == FAILED
    # the undecodable name keeps its bytes; its note names them escaped
    raw_names = os.listdir(os.fsencode(tree.spool / "rejected"))
    assert {b"\xff\xfe.json", b"\xff\xfe.json.error"} <= set(raw_names)
    note = error_note(tree, names["undecodable name"])
    assert note.startswith("2026-05-26T02:30:00Z \\xff\\xfe.json: not JSON")


def test_undecodable_names_with_good_events_are_recorded_and_removed(tree: Tree, daemon: Daemon):
    notice = json.dumps({"job_id": "etl", "state": "NOTICE", "message": "hi"}).encode()
    for raw_name in (b"\xff.json", b"\xfe.json"):
        with open(os.path.join(os.fsencode(tree.spool), raw_name), "wb") as fh:
            fh.write(notice)
    settle(daemon)
    assert [n for n in os.listdir(os.fsencode(tree.spool)) if n.endswith(b".json")] == []
    assert len(event_ids(tree)) == 2  # two files, two notices: the names differ
    assert rejected(daemon) == set()


def test_directory_named_like_an_event_is_ignored(tree: Tree, daemon: Daemon):
    (tree.spool / "x.json").mkdir()
    tree.drop(GOOD)
    settle(daemon)
    settle(daemon)
    assert (tree.spool / "x.json").is_dir()
    assert rejected(daemon) == set()
    assert event_ids(tree) == ["etl/after-the-hostile-ones/SUCCEEDED"]


def test_symlink_to_a_directory_is_rejected_not_left_behind(tree: Tree, daemon: Daemon):
    (tree.root / "a-dir").mkdir()
    os.symlink(tree.root / "a-dir", tree.spool / "y.json")
    settle(daemon)
    assert rejected(daemon) == {"y.json", "y.json.error"}
    assert "symbolic link" in error_note(tree, "y.json")
    assert (tree.root / "a-dir").is_dir()


def test_temp_name_is_ignored_until_renamed(tree: Tree, daemon: Daemon):
    temp = tree.spool / ".evt-123.tmp"
    temp.write_text(json.dumps(FAILED))
    settle(daemon)
    assert temp.exists()
    assert event_ids(tree) == []
    os.rename(temp, tree.spool / "evt-123.json")
    settle(daemon)
    assert event_ids(tree) == ["reporting-nightly-sync/run_a8c4d/FAILED"]
    assert os.listdir(tree.spool / "tmp") == []
    assert tree.spool_files() == []


def test_file_in_spool_tmp_is_ignored(tree: Tree, daemon: Daemon):
    half_written = tree.spool / "tmp" / "half.json"
    half_written.write_text('{"job_id": "j", "sta')
    tree.drop(GOOD)
    settle(daemon)
    assert half_written.read_text() == '{"job_id": "j", "sta'
    assert rejected(daemon) == set()
    assert event_ids(tree) == ["etl/after-the-hostile-ones/SUCCEEDED"]


def test_file_is_deleted_once_its_event_is_committed(tree: Tree, daemon: Daemon):
    path = tree.drop(FAILED)
    daemon.hint()
    daemon.step(NOW)
    assert not path.exists()
    assert tree.sql("SELECT event_id, received_at, state FROM events") == [
        ("reporting-nightly-sync/run_a8c4d/FAILED", "2026-05-26 02:30:00", "FAILED")]


def test_file_stays_in_the_spool_while_the_database_refuses_the_event(tree: Tree,
                                                                      daemon: Daemon):
    tree.sql("CREATE TRIGGER refuse BEFORE INSERT ON events BEGIN SELECT RAISE(ABORT, 'no'); END")
    path = tree.drop(FAILED)
    daemon.stopping.set()  # a stop is pending: the database back-off must not wait its second
    daemon.hint()
    assert daemon.step(NOW) is False
    assert path.exists()
    assert tree.sql("SELECT count(*) FROM events") == [(0,)]
    tree.sql("DROP TRIGGER refuse")
    daemon.stopping.clear()
    settle(daemon)
    assert not path.exists()
    assert event_ids(tree) == ["reporting-nightly-sync/run_a8c4d/FAILED"]


def test_a_file_renamed_over_one_already_read_is_not_deleted_unread(tree: Tree,
                                                                    daemon: Daemon):
    """A runner reusing a name (RUNNING, then FAILED, both as job42.json) while the first is
    being recorded: the daemon deletes the file it read, not what the name holds by then
    (20 of 60 such events were deleted unread, without a trace)."""
    (tree.spool / "job42.json").write_text(json.dumps(GOOD))
    first = daemon.spool.read("job42.json")
    assert first is not None
    (tree.spool / "tmp" / "next").write_text(json.dumps(FAILED))
    os.rename(tree.spool / "tmp" / "next", tree.spool / "job42.json")
    daemon.spool.remove(["job42.json"], {"job42.json": first.ident})
    assert json.loads((tree.spool / "job42.json").read_text()) == FAILED
    settle(daemon)
    assert event_ids(tree) == ["reporting-nightly-sync/run_a8c4d/FAILED"]


def test_same_event_in_two_files_is_one_row(tree: Tree, daemon: Daemon):
    first, second = tree.drop(FAILED), tree.drop({**FAILED, "error": "retried upload"})
    settle(daemon)
    assert event_ids(tree) == ["reporting-nightly-sync/run_a8c4d/FAILED"]
    assert not first.exists() and not second.exists()
    assert rejected(daemon) == set()


def test_same_event_in_two_batches_is_one_row(tree: Tree, daemon: Daemon):
    tree.drop(FAILED)
    settle(daemon)
    tree.drop(FAILED)
    settle(daemon)
    assert tree.sql("SELECT count(*) FROM events") == [(1,)]
    assert tree.spool_files() == []


@pytest.mark.parametrize("running", [
    {"started_at": "9999-12-31T23:30:00Z", "alerts": {"on_long_run_minutes": 60}},
    {"started_at": "2026-05-26T02:00:00Z", "alerts": {"on_long_run_minutes": 1e300}},
], ids=["start-near-year-9999", "minutes-1e300"])
def test_long_run_deadline_beyond_year_9999_does_not_stop_the_loop(
        tree: Tree, daemon: Daemon, running: dict[str, object]):
    tree.drop({"job_id": "etl", "run_id": "r", "state": "RUNNING", **running})
    tree.drop(GOOD)
    settle(daemon)
    assert "etl/after-the-hostile-ones/SUCCEEDED" in event_ids(tree)
    assert tree.spool_files() == []


def test_spool_root_entries_are_scanned_as_the_daemon_sees_them(tree: Tree, daemon: Daemon):
    (tree.spool / "x.json").mkdir()
    (tree.spool / ".evt.tmp").write_text("{}")
    (tree.spool / "tmp" / "t.json").write_text("{}")
    with open(os.path.join(os.fsencode(tree.spool), b"\xff.json"), "wb") as fh:
        fh.write(b"{}")
    good = tree.drop(GOOD)
    assert daemon.spool.scan() == sorted([good.name, "\udcff.json"])


# --- names and notes that runners control (SPEC section 15) -----------------------------------


def test_names_at_the_length_limit_are_rejected_under_short_names_and_the_next_file_flows(
        tree: Tree, daemon: Daemon):
    spool = os.fsencode(tree.spool)
    long_names = [b"a" * 250 + b".json", b"\xff" * 250 + b".json",
                  "é".encode() * 125 + b".json"]
    for raw in long_names:
        assert len(raw) == 255
        with open(os.path.join(spool, raw), "wb") as fh:
            fh.write(b"not json")
    tree.drop(GOOD)
    settle(daemon)
    assert event_ids(tree) == ["etl/after-the-hostile-ones/SUCCEEDED"]
    assert [n for n in os.listdir(spool) if n.endswith(b".json")] == []
    kept = dict(daemon.spool.rejected_files())
    assert len(kept) == 3
    for name in kept:
        assert len(os.fsencode(name)) < 100
        assert (tree.spool / "rejected" / name).read_bytes() == b"not json"
    # each note names the file as it was called, escaped where it is not UTF-8
    assert sorted(note.split(" ", 1)[1].split(": ", 1)[0] for note in kept.values()) == sorted(
        ["a" * 250 + ".json", "\\xff" * 250 + ".json", "é" * 125 + ".json"])


def test_a_newline_in_a_name_cannot_forge_a_line_in_the_note_or_the_log(
        tree: Tree, daemon: Daemon, caplog: pytest.LogCaptureFixture):
    name = "x.json\n2026-01-01T00:00:00Z forged.json: accepted\r\x1b[2K"
    (tree.spool / f"{name}.json").write_bytes(b"[]")
    settle(daemon)
    note = error_note(tree, f"{name}.json")
    assert note.count("\n") == 1 and "\r" not in note and "\x1b" not in note
    assert note == ("2026-05-26T02:30:00Z x.json\\n2026-01-01T00:00:00Z forged.json:"
                    " accepted\\r\\x1b[2K.json: top level must be a JSON object, not list\n")
    lines = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert len(lines) == 1 and "\n" not in lines[0] and "\\n2026-01-01" in lines[0]


def test_a_file_that_cannot_be_moved_is_logged_and_does_not_stop_the_others(
        tree: Tree, daemon: Daemon, caplog: pytest.LogCaptureFixture):
    # A name whose note cannot be written (here: it names a subdirectory rejected/ lacks)
    # is that file's problem: reject() logs it and returns; the next file is handled.
    (tree.spool / "sub").mkdir()
    (tree.spool / "sub" / "x.json").write_text("[]")
    daemon.spool.reject("sub/x.json", "a reason\nwith a newline", NOW)
    assert (tree.spool / "sub" / "x.json").exists()
    message = next(r.getMessage() for r in caplog.records if "could not be moved" in r.getMessage())
    assert "sub/x.json" in message and "a reason\\nwith a newline" in message
    assert "\n" not in message
    tree.drop(GOOD)
    settle(daemon)
    assert event_ids(tree) == ["etl/after-the-hostile-ones/SUCCEEDED"]


def test_rejected_dir_removed_by_an_operator_comes_back(tree: Tree, daemon: Daemon):
    daemon.spool.close()
    for entry in (tree.spool / "rejected").iterdir():
        entry.unlink()
    (tree.spool / "rejected").rmdir()
    (tree.spool / "a.json").write_text("[]")
    daemon.spool.reject("a.json", "top level must be a JSON object", NOW)
    assert "top level" in error_note(tree, "a.json")


def empty_rejected(tree: Tree, daemon: Daemon) -> None:
    """rejected/ gone, as after an operator's `rm -r`: the moment a runner could take it."""
    daemon.spool.close()
    for entry in (tree.spool / "rejected").iterdir():
        entry.unlink()
    (tree.spool / "rejected").rmdir()


def set_aside(tree: Tree) -> list[str]:
    return sorted(n for n in os.listdir(tree.spool) if n.startswith("rejected.untrusted-"))


@pytest.mark.parametrize("planted", ["symlink", "file", "runner's directory"])
def test_a_rejected_dir_a_runner_planted_is_moved_aside_not_used(tree: Tree, daemon: Daemon,
                                                                 planted: str):
    """While rejected/ is missing a runner can take the name (the spool is theirs to write
    in): a symlink to where the daemon should move files (and prune them), a file that
    stopped every rejection, a directory of their own where they read others' notes. None
    is used: it is moved aside, said in the log, and a directory of the daemon's own made."""
    empty_rejected(tree, daemon)
    victim = tree.root / "victim"
    victim.mkdir()
    (victim / "precious").write_text("kept")
    old = (datetime.now(UTC) - timedelta(days=400)).timestamp()
    os.utime(victim / "precious", (old, old))
    rejected_dir = tree.spool / "rejected"
    if planted == "symlink":
        rejected_dir.symlink_to(victim)
    elif planted == "file":
        rejected_dir.write_text("not a directory")
    else:
        rejected_dir.mkdir(mode=0o777)
        os.chmod(rejected_dir, 0o777)
        os.chown(rejected_dir, 54321, 54321)
    (tree.spool / "a.json").write_text("[]")
    assert daemon.spool.reject("a.json", "top level must be a JSON object", NOW)
    assert daemon.spool.prune_rejected(datetime.now(UTC), 183) == 0
    st = os.lstat(rejected_dir)
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()
    assert stat.S_IMODE(st.st_mode) == 0o700
    assert "top level" in error_note(tree, "a.json")
    assert os.listdir(victim) == ["precious"]
    assert len(set_aside(tree)) == 1


def test_a_runner_planted_rejected_dir_is_moved_aside_at_start(tree: Tree):
    tree.write_config("")
    (tree.spool / "tmp").mkdir(parents=True)
    (tree.spool / "rejected").mkdir(mode=0o777)
    os.chown(tree.spool / "rejected", 54321, 54321)
    (tree.spool / "rejected" / f".handling-{config.load(tree.config_path).replica_id}"
     ).write_text("planted")
    d = Daemon(config.load(tree.config_path))
    d.initialize()
    try:
        assert os.lstat(tree.spool / "rejected").st_uid == os.geteuid()
        assert len(set_aside(tree)) == 1
        tree.drop(GOOD)
        settle(d)
        assert event_ids(tree) == ["etl/after-the-hostile-ones/SUCCEEDED"]
    finally:
        d.shutdown()


def test_the_page_reads_no_note_through_a_symlink(tree: Tree, daemon: Daemon):
    """A note that is a symlink (to the key, the database) is not read for the page."""
    secret = tree.root / "secret.key"
    secret.write_text("SECRET-CANARY-key\n")
    (tree.spool / "rejected" / "x.json.error").symlink_to(secret)
    total, notes = rejected_notes(daemon.spool.rejected, 0, 10)
    assert total == 1
    assert "CANARY" not in repr(notes)
    assert "CANARY" not in repr(daemon.spool.rejected_files())


@contextlib.contextmanager
def inotify_exhausted() -> Iterator[None]:
    """Every inotify instance this user may have, held: what a host with many watchers
    meets (fs.inotify.max_user_instances, 128 by default)."""
    libc = ctypes.CDLL(None, use_errno=True)
    limit = int(Path("/proc/sys/fs/inotify/max_user_instances").read_text())
    fds: list[int] = []
    try:
        while len(fds) <= limit and (fd := libc.inotify_init1(os.O_CLOEXEC)) >= 0:
            fds.append(fd)
        yield
    finally:
        for fd in fds:
            os.close(fd)


def test_without_inotify_the_daemon_runs_on_the_rescan_and_watches_once_it_can(
        tree: Tree, caplog: pytest.LogCaptureFixture):
    """inotify's limits reached: the start used to fail (`internal error: OSError`). File
    events are only hints; the rescan finds the files, and each rescan tries the watch."""
    caplog.set_level(logging.INFO, logger="nomaflowd")
    tree.write_config("")
    (tree.spool / "tmp").mkdir(parents=True)
    d = Daemon(config.load(tree.config_path))
    try:
        with inotify_exhausted():
            d.initialize()
            tree.drop(GOOD)
            settle(d)
            assert event_ids(tree) == ["etl/after-the-hostile-ones/SUCCEEDED"]
            assert d.observer is None
            assert "cannot watch the spool" in caplog.text
            assert "fs.inotify.max_user_instances" in caplog.text
        settle(d)  # a rescan, with instances free again
        assert d.observer is not None
        assert "watching the spool" in caplog.text.split("cannot watch the spool")[-1]
    finally:
        d.shutdown()


def test_rejected_files_past_retention_are_pruned_with_their_notes(tree: Tree, daemon: Daemon):
    now = datetime.utcnow()
    rejected_dir = tree.spool / "rejected"
    for name in ("old.json", "new.json", "a" * 250 + ".json"):
        (tree.spool / name).write_text("[]")
        daemon.spool.reject(name, "not an object", now)
    daemon.spool.mark_handling(["x.json"])  # the marker of files in hand is never pruned
    long_kept = next(n for n, _ in daemon.spool.rejected_files() if n.startswith("aaa"))
    old = (now - timedelta(days=200)).replace(tzinfo=UTC).timestamp()
    for path in (rejected_dir / "old.json.error", rejected_dir / f"{long_kept}.error"):
        os.utime(path, (old, old))
    (rejected_dir / ".crashed.json.error.0123abcd").write_text("a draft a crash left")
    assert daemon.spool.prune_rejected(now, 183) == 4
    assert sorted(os.listdir(rejected_dir)) == sorted(
        [".crashed.json.error.0123abcd", daemon.spool.handling.name, "new.json",
         "new.json.error"])
    # a year on, the rest is past retention too (the draft by its own change time)
    assert daemon.spool.prune_rejected(now + timedelta(days=365), 183) == 3
    assert os.listdir(rejected_dir) == [daemon.spool.handling.name]


def test_a_note_left_as_a_draft_by_a_kill_is_put_in_place_at_the_next_start(tree: Tree):
    """A file goes to rejected/ first and its note follows (a replica that lost the race
    must not touch the winner's note); a kill between the two left the file without its
    reason for good. The next start puts the draft in place, and drops an hour-old draft whose
    file never moved."""
    from nomaflowd.spool import Spool

    rejected = tree.spool / "rejected"
    rejected.mkdir(parents=True)
    (rejected / "bad.json").write_text("[]")
    (rejected / ".bad.json.error.0123abcd").write_text("2026-05-26T02:30:00Z bad.json: why\n")
    orphan = rejected / ".gone.json.error.89abcdef"
    orphan.write_text("2026-05-26T02:30:00Z gone.json: why\n")
    os.utime(orphan, (0, 0))
    Spool(tree.spool).prepare()
    assert error_note(tree, "bad.json") == "2026-05-26T02:30:00Z bad.json: why\n"
    assert sorted(os.listdir(rejected)) == ["bad.json", "bad.json.error"]


def test_the_spool_watch_outlives_an_overflowed_inotify_queue(tmp_path):
    """More arrivals than the kernel's inotify queue holds while the watcher is busy: the
    kernel drops them and sends one IN_Q_OVERFLOW event instead. The watcher wakes the loop
    (its scan finds every file) and keeps watching. watchdog 7.1.1 answers that event with a
    second callback, which a watcher without it met with an AttributeError that stopped the
    watch and printed a traceback. The event is fed to watchdog's own dispatch here: since
    7.1.1 its reader never waits for a callback, so a test cannot make the kernel overflow."""
    from watchdog.observers.inotify_c import InotifyConstants, InotifyEvent

    from nomaflowd.spool import watch
    from tests.servers import wait_until

    wakes: list[int] = []
    watcher = watch(tmp_path, lambda: wakes.append(1))
    try:
        watcher.reader.handle_event(InotifyEvent(-1, InotifyConstants.IN_Q_OVERFLOW, 0, b""))
        assert wakes, "no wake-up for the overflow: the scan would wait for the rescan"
        count = len(wakes)
        (tmp_path / "after.json").write_bytes(b"{}")
        wait_until(lambda: len(wakes) > count, what="a wake-up for a file after the overflow")
        assert watcher.reader.is_alive()
    finally:
        watcher.stop()
        watcher.join(10)
