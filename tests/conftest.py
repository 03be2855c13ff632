from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nomaflowd import crypto
from nomaflowd.client import drop
from tests.servers import HttpRecorder

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


class Tree:
    """A throwaway install: etc/ with a key, config and catalogue; var/ with spool and database."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.etc = root / "etc"
        self.etc.mkdir(parents=True)
        self.spool = root / "var" / "spool"
        self.db_path = root / "var" / "lib" / "nomaflowd.db"
        self.key = self.etc / "nomaflowd.key"
        crypto.write_key(self.key)
        self.keys = crypto.load_keys(self.key)
        self.config_path = self.etc / "nomaflowd.toml"
        self.jobs_path = self.etc / "jobs.toml"
        self.database = "sqlite:///../var/lib/nomaflowd.db"

    def enc(self, value: str) -> str:
        return crypto.encrypt(self.keys, value)

    def write_config(self, body: str = "", *, daemon: str = "") -> Path:
        """[daemon] with test-friendly settings (`daemon` lines override them) plus `body`."""
        settings = {
            "spool_dir": f'"{self.spool}"',
            "database": f'"{self.database}"',
            "jobs_file": '"jobs.toml"',
            "key_file": '"nomaflowd.key"',
            "base_url": '"https://nomaflow.test"',
            "send_timeout_seconds": "2",
            "poll_seconds": "0.2",
        }
        extra = []
        for line in daemon.splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip() in settings:
                settings[key.strip()] = value.strip()
            elif line.strip():
                extra.append(line)
        lines = [f"{k} = {v}" for k, v in settings.items()] + extra
        self.config_path.write_text("[daemon]\n" + "\n".join(lines) + f"\n\n{body}\n",
                                    encoding="utf-8")
        return self.config_path

    def webhook(self, name: str, url: str, extra: str = "") -> str:
        return f'[transports.{name}]\ntype = "webhook"\nurl = "{self.enc(url)}"\n{extra}\n'

    def slack(self, name: str, url: str, extra: str = "") -> str:
        return f'[transports.{name}]\ntype = "slack"\nwebhook_url = "{self.enc(url)}"\n{extra}\n'

    def write_jobs(self, text: str) -> None:
        tmp = self.jobs_path.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.jobs_path)

    def drop(self, event: dict[str, Any]) -> Path:
        self.spool.mkdir(parents=True, exist_ok=True)
        (self.spool / "tmp").mkdir(exist_ok=True)
        return drop(self.spool, event)

    def spool_files(self) -> list[str]:
        return sorted(p.name for p in self.spool.glob("*.json"))

    def rejected(self) -> list[str]:
        return sorted(p.name for p in (self.spool / "rejected").iterdir())

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.db_path, timeout=10) as conn:
            return conn.execute(query, params).fetchall()

    def notifications(self) -> list[dict[str, Any]]:
        with sqlite3.connect(self.db_path, timeout=10) as conn:
            conn.row_factory = sqlite3.Row
            rows = conn.execute("SELECT * FROM notifications ORDER BY id").fetchall()
            return [dict(r) for r in rows]


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    return Tree(tmp_path)


@pytest.fixture
def http() -> Iterator[HttpRecorder]:
    recorder = HttpRecorder()
    yield recorder
    recorder.close()


class DaemonProcess:
    """`python -m nomaflowd run` as a real process; READY is awaited over $NOTIFY_SOCKET."""

    def __init__(self, tree: Tree, env: dict[str, str] | None = None) -> None:
        self.tree = tree
        self.log_path = tree.root / f"daemon-{time.monotonic_ns()}.log"
        self.notify_path = tree.root / f"notify-{time.monotonic_ns()}.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.notify_path))
        self.env = {**os.environ, "NOTIFY_SOCKET": str(self.notify_path), **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.messages: list[str] = []

    def start(self, wait: bool = True) -> DaemonProcess:
        self.log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nomaflowd", "run", "--config", str(self.tree.config_path)],
            stdout=self.log, stderr=subprocess.STDOUT, env=self.env, cwd=self.tree.root)
        if wait:
            self.wait_message("READY=1")
        return self

    def wait_message(self, word: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(word in m for m in self.messages):
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.output()}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {word} from the daemon:\n{self.output()}")
            self.sock.settimeout(min(remaining, 0.2))
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self.log.close()
        return code

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self.log.close()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.sock.close()


@pytest.fixture
def daemon_factory(tree: Tree) -> Iterator[Any]:
    made: list[DaemonProcess] = []

    def make(env: dict[str, str] | None = None, *, wait: bool = True) -> DaemonProcess:
        d = DaemonProcess(tree, env)
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
            elif not more and not d.ingest.pending and not d.dispatcher.busy():
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
