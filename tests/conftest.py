from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Tree and DaemonProcess live in tests/harness.py (bench/ builds on them too); tests keep
# importing them from here.
from tests.harness import DaemonProcess, HttpRecorder, Tree

PG_DSN = os.environ.get("NOMAFLOWD_TEST_PG_DSN", "")
# Threads that live for the whole test process by design: the transports' one deadline
# thread, and the threads of module-scoped servers.
LONG_LIVED = ("nomaflowd-deadlines", "smtp-", "asyncio_")


def child_processes() -> set[int]:
    """Live (not zombie) child processes of this test process, from /proc."""
    me, found = os.getpid(), set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) != me or fields[0] == b"Z":
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read()
        except OSError:
            continue
        if b"resource_tracker" in cmdline or b"forkserver" in cmdline:
            continue  # multiprocessing's helpers live as long as the test process, by design
        found.add(int(entry))
    return found


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail a test that leaves a thread running or a child process behind (watchdog's rule)."""
    threads_before = set(threading.enumerate())
    children_before = child_processes()
    yield
    deadline = time.monotonic() + 5.0
    leaked: list[threading.Thread] = []
    for t in set(threading.enumerate()) - threads_before:
        if t.name.startswith(LONG_LIVED):
            continue
        t.join(max(0.0, deadline - time.monotonic()))
        if t.is_alive():
            leaked.append(t)
    assert not leaked, f"threads left running: {sorted(t.name for t in leaked)}"
    while (children := child_processes() - children_before) and time.monotonic() < deadline:
        time.sleep(0.05)  # a killed child is reaped by its Popen's wait in the fixture
    assert not children, f"child processes left running: {sorted(children)}"


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    return Tree(tmp_path)


@pytest.fixture
def http() -> Iterator[HttpRecorder]:
    recorder = HttpRecorder()
    yield recorder
    recorder.close()


@pytest.fixture
def daemon_factory(tree: Tree) -> Iterator[Any]:
    made: list[DaemonProcess] = []

    def make(env: dict[str, str] | None = None, *, wait: bool = True,
             prefix: list[str] | None = None) -> DaemonProcess:
        d = DaemonProcess(tree, env, prefix=prefix)
        made.append(d)
        return d.start(wait=wait)

    yield make
    for d in made:
        d.close()


@pytest.fixture
def pg_dsn() -> str:
    if not PG_DSN:
        pytest.skip("NOMAFLOWD_TEST_PG_DSN is not set (CI sets it)")
    return PG_DSN


class InProcess:
    """The daemon's own loop driven from the test: initialize(), step(), shutdown()."""

    def __init__(self, tree: Tree) -> None:
        from nomaflowd import config
        from nomaflowd.daemon import Daemon

        self.daemon = Daemon(config.load(tree.config_path))
        self.daemon.initialize()
        self.closed = False

    def pump(self, until: Any = None, timeout: float = 10.0, what: str = "condition") -> Any:
        """Run steps until `until()` is truthy (without one: until idle, nothing in flight)."""
        deadline = time.monotonic() + timeout
        d = self.daemon
        d.ingest.hinted = True  # files the test just dropped count, whether or not inotify did
        while True:
            more = d.step()
            if until is not None:
                value = until()
                if value:
                    return value
            elif (not more and not d.ingest.pending and not d.dispatcher.busy()
                  and not d.deliveries.unrecorded):
                d.step()
                return True
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            if not more:
                d.wakeup.wait(0.05)
                d.wakeup.clear()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.daemon.shutdown()


@pytest.fixture
def inproc(tree: Tree) -> Iterator[Any]:
    made: list[InProcess] = []

    def make() -> InProcess:
        d = InProcess(tree)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


@pytest.fixture
def pg_schema() -> Iterator[str]:
    """A fresh schema on the shared PostgreSQL server; yields a database URL that uses it."""
    import uuid

    import peewee as pw
    from playhouse.db_url import parse

    if not PG_DSN:
        pytest.skip("NOMAFLOWD_TEST_PG_DSN is not set (CI sets it)")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    from nomaflowd.db import postgres_driver

    postgres_driver()  # peewee was imported without it (nomaflowd.db keeps a SQLite process lean)
    admin = pw.PostgresqlDatabase(None)
    admin.init(**parse(PG_DSN))
    admin.execute_sql(f'CREATE SCHEMA "{schema}"')
    yield f"{PG_DSN}?options=-csearch_path%3D{schema}"
    admin.execute_sql(f'DROP SCHEMA "{schema}" CASCADE')
    admin.close()


def replica_tree(root: Path, first: Tree, database: str) -> Tree:
    """A second install sharing `first`'s key and database (another host, in effect)."""
    other = Tree(root)
    other.key.write_bytes(first.key.read_bytes())
    other.keys = first.keys
    other.database = database
    return other


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The fault suite's ledgers, in every run's output (CI's too)."""
    from tests.faults.test_kill_loop import FIGURES

    if FIGURES:
        terminalreporter.section("fault suite")
        terminalreporter.line(", ".join(f"{k} {v}" for k, v in FIGURES.items()))
