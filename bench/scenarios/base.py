"""What every bench scenario is given and builds on.

A scenario module defines `SCENARIO = Scenario(title, metrics, run)`: `run(ctx, rep)` returns
one run's figures, keyed like its metrics; it raises Skip when a peer is not installed and
Incomplete when the run did not finish in time. Trees and daemon processes are the test
harness's (tests/harness.py) with the bench's settings.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tests.harness import DaemonProcess, Tree

BENCH = Path(__file__).resolve().parent.parent  # bench/: receiver.py, apprise_peer.py
POLL = 0.02          # seconds between `SELECT count(*) FROM events` polls
HOOK = "bench-hook"  # the webhook transport's name (its own default recipient)
CLK_TCK = os.sysconf("SC_CLK_TCK")


def machine_cpu() -> tuple[float, float]:
    """(CPU seconds busy on the whole machine, time.monotonic()) now, from /proc/stat: every
    process counts (daemons, PostgreSQL, the receiver, the writer)."""
    with open("/proc/stat") as fh:
        fields = [int(v) for v in fh.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / CLK_TCK, time.monotonic()


def _ticks(path: str) -> tuple[bytes, int] | None:
    """(comm, utime + stime in clock ticks) of a /proc/.../stat, None if it is gone."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError:  # ended meanwhile
        return None
    fields = raw[raw.rindex(b")") + 2:].split()
    return raw[raw.index(b"(") + 1:raw.rindex(b")")], int(fields[11]) + int(fields[12])


def cpu_by_process(groups: dict[str, set[int]], main_threads: str = "") -> dict[str, float]:
    """CPU seconds used so far (user + system, all threads) per group of processes: each
    group's pids, "postgres" (every process named so) and "other"; with `main_threads`, that
    group's main threads also alone, as "<group> main thread". A process that ended since an
    earlier call drops out of the difference: take both samples while the ones of interest
    live."""
    out = dict.fromkeys([*groups, "postgres", "other"], 0.0)
    owner = {pid: name for name, pids in groups.items() for pid in pids}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (got := _ticks(f"/proc/{entry.name}/stat")) is not None:
            comm, ticks = got
            name = owner.get(int(entry.name)) or ("postgres" if comm == b"postgres" else "other")
            out[name] += ticks / CLK_TCK
    if main_threads:
        key = f"{main_threads} main thread"
        out[key] = 0.0
        for pid in groups[main_threads]:
            if (got := _ticks(f"/proc/{pid}/task/{pid}/stat")) is not None:
                out[key] += got[1] / CLK_TCK
    return out


def log(msg: str) -> None:
    print(msg, flush=True)


class Skip(Exception):
    """The scenario cannot run here (a peer is not installed); says how to fix it."""


class Incomplete(Exception):
    """The scenario did not finish within its time bound."""


# --- metrics -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    target: tuple[str, float] | None = None  # ("ge"|"le"|"eq", value)
    kind: str = "timed"                       # timed | loss | info

    def target_text(self) -> str:
        if self.target is None:
            return "-"
        op, value = self.target
        sym = {"ge": "≥", "le": "≤", "eq": "="}[op]
        return f"{sym} {fmt(value)}"

    def verdict(self, median: float | None, quick: bool) -> str:
        if self.target is None or median is None:
            return "n.a."
        if quick and self.kind == "timed":
            return "n.a. (quick)"
        op, value = self.target
        ok = {"ge": median >= value, "le": median <= value, "eq": median == value}[op]
        return "PASS" if ok else "FAIL"


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:
            return "nan"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.2f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def latencies(sent: dict[str, float], records: list[tuple[float, float, str | None]]
              ) -> tuple[list[float], int, int]:
    """(latencies in ms, missing, duplicates), matched on run_id."""
    arrived: dict[str, float] = {}
    dups = 0
    for mono, _wall, ident in records:
        if ident is None:
            continue
        if ident in arrived:
            dups += 1
        else:
            arrived[ident] = mono
    lat = [(arrived[r] - t) * 1000 for r, t in sent.items() if r in arrived]
    return lat, len(sent) - len(lat), dups


def slowest(sent: dict[str, float], records: list[tuple[float, float, str | None]],
            t0: float, top: int = 25) -> list[tuple[float, float]]:
    """The slowest deliveries as (seconds into the run, latency ms): are the tails periodic?"""
    arrived = {i: m for m, _w, i in reversed(records) if i is not None}
    pairs = [(round(t - t0, 3), round((arrived[r] - t) * 1000, 2))
             for r, t in sent.items() if r in arrived]
    return sorted(pairs, key=lambda p: -p[1])[:top]


def explain(conn: Any, sql: str, params: Iterable[Any] = ()) -> list[str]:
    return [str(row[-1]) for row in conn.execute("EXPLAIN QUERY PLAN " + sql, tuple(params))]


# --- fixtures: receiver, trees, daemons ------------------------------------------------------

class Receiver:
    """bench/receiver.py in its own process; control over HTTP on the same port."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(BENCH / "receiver.py")],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        if len(line) != 2 or line[0] != "PORT":
            raise RuntimeError(f"receiver did not start: {line}")
        self.port = int(line[1])
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _get(self, path: str, method: str = "GET") -> Any:
        for attempt in range(2):
            try:
                self.conn.request(method, path)
                return json.loads(self.conn.getresponse().read())
            except (OSError, http.client.HTTPException):
                self.conn.close()
                if attempt:
                    raise
        return None

    def items(self, path: str) -> int:
        return int(self._get("/__stats")["items"].get(path, 0))

    def requests(self, path: str) -> int:
        return int(self._get("/__stats")["requests"].get(path, 0))

    def records(self, path: str) -> list[tuple[float, float, str | None]]:
        return [(m, w, i) for m, w, p, i in self._get("/__records") if p == path]

    def reset(self) -> None:
        self._get("/__reset", "POST")

    def refused(self, path: str) -> int:
        return int(self._get("/__stats")["refused"].get(path, 0))

    def bodies(self, path: str) -> list[tuple[float, str]]:
        """The bodies a /limited/ path accepted, with their arrival times."""
        return [(m, b) for m, p, b in self._get("/__bodies") if p == path]

    def wait_items(self, path: str, count: int, timeout: float, every: float = 0.05) -> int:
        deadline = time.monotonic() + timeout
        while True:
            got = self.items(path)
            if got >= count or time.monotonic() > deadline:
                return got
            time.sleep(every)

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def close(self) -> None:
        self.conn.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class BenchTree(Tree):
    """The harness's install with the bench's catalogue (on_failure for every job) and config."""

    def __init__(self, base: Path, name: str) -> None:
        super().__init__(Path(tempfile.mkdtemp(prefix=f"{name}-", dir=base)))
        (self.spool / "tmp").mkdir(parents=True)
        self.write_jobs("# bench catalogue: built-in policy (on_failure), recipients = every"
                        " transport\n[defaults.alerts]\non_failure = true\n")

    @property
    def database_url(self) -> str:
        return f"sqlite:///{self.db_path}"

    def configure(self, hook_url: str, *, poll_seconds: float = 30, replica: str = "bench",
                  spool: Path | None = None, extra: str = "", transport: str = "") -> Path:
        """One webhook transport (URL encrypted) to `hook_url`; relaxed timeouts and polls.
        `spool`: another tree's spool (replicas sharing one); `transport`: its own body."""
        return self.write_config(transport or self.webhook(HOOK, hook_url), daemon=(
            f'spool_dir = "{spool or "../var/spool"}"\n'
            'base_url = "https://nomaflow.bench"\n'
            f'replica_id = "{replica}"\n'
            f"poll_seconds = {poll_seconds}\n"
            "send_timeout_seconds = 10\n" + extra))

    def spool_left(self) -> int:
        return sum(1 for n in os.listdir(self.spool) if n.endswith(".json"))

    def rejected_count(self) -> int:
        """Files set aside in rejected/, without their .error notes and the daemon's dot-files."""
        d = self.spool / "rejected"
        if not d.is_dir():
            return 0
        return sum(1 for n in os.listdir(d) if not n.endswith(".error") and not n.startswith("."))

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class Counter:
    """`SELECT count(*) FROM <table>` on the daemon's SQLite file, without ever creating it."""

    def __init__(self, path: Path, table: str = "events", where: str = "") -> None:
        self.path, self.sql = path, f"SELECT count(*) FROM {table} {where}"
        self.conn: sqlite3.Connection | None = None

    def __call__(self) -> int:
        if self.conn is None:
            if not self.path.exists():
                return 0
            self.conn = sqlite3.connect(f"file:{self.path}?mode=rw", uri=True, timeout=10)
        try:
            return int(self.conn.execute(self.sql).fetchone()[0])
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return 0
            raise

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class BenchDaemon(DaemonProcess):
    """The harness's daemon process as the bench runs it: abstract $NOTIFY_SOCKET, no debug
    log, no READY in time is an incomplete run, a stop that hangs ends in SIGKILL (code -9)."""

    def __init__(self, tree: BenchTree, tag: str) -> None:
        super().__init__(tree, tag=tag, abstract_socket=True)
        self.env.pop("NOMAFLOWD_DEBUG", None)

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Seconds from spawn to READY=1."""
        deadline = time.monotonic() + timeout
        while not self.poll_ready():
            self.check_alive()
            if time.monotonic() > deadline:
                raise Incomplete(f"no READY=1 within {timeout:g}s:\n{self.tail()}")
            time.sleep(0.005)
        assert self.ready_at is not None
        return self.ready_at - self.started

    def stop(self, timeout: float = 60.0) -> int:
        try:
            code = super().stop(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            code = -9
        self.close()
        return code


# --- event files -------------------------------------------------------------------------------

def iso(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


Item = tuple[str, bytes, str]  # file name, body, run_id


def lifecycle_events(prefix: str, n_files: int, fail_every: int = 20) -> list[Item]:
    """RUNNING then a final state per run (1 run in `fail_every` FAILED, the rest SUCCEEDED)."""
    now = datetime.now(UTC)
    out: list[Item] = []
    for i in range(n_files):
        r, second = divmod(i, 2)
        run = f"{prefix}-{r}"
        ev: dict[str, Any] = {"job_id": f"job-{r % 200:03d}", "run_id": run,
                              "started_at": iso(now - timedelta(minutes=5)),
                              "triggered_by": "cron"}
        if not second:
            ev["state"] = "RUNNING"
        elif r % fail_every == 0:
            ev.update(state="FAILED", finished_at=iso(now), step="copy-orders",
                      error="OperationalError: connection refused")
        else:
            ev.update(state="SUCCEEDED", finished_at=iso(now))
        out.append((f"{prefix}-{i:08d}.json", json.dumps(ev).encode(), run))
    return out


def failure_events(prefix: str, n: int) -> list[Item]:
    now = datetime.now(UTC)
    out: list[Item] = []
    for i in range(n):
        run = f"{prefix}-{i}"
        ev = {"job_id": f"job-{i % 200:03d}", "run_id": run, "state": "FAILED",
              "started_at": iso(now - timedelta(minutes=5)), "finished_at": iso(now),
              "triggered_by": "cron", "step": "copy-orders",
              "error": "OperationalError: connection refused"}
        out.append((f"{prefix}-{i:08d}.json", json.dumps(ev).encode(), run))
    return out


def write_one(spool: str, tmpdir: str, item: Item, fsync: bool) -> float:
    """The spool protocol: write under a temp name (in spool/tmp), then rename to *.json."""
    name, body, _ = item
    tmp = os.path.join(tmpdir, f".{name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
    try:
        os.write(fd, body)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, os.path.join(spool, name))
    return time.monotonic()


def write_all(tree: BenchTree, items: Iterable[Item], fsync: bool = False) -> list[float]:
    spool, tmpdir = str(tree.spool), str(tree.spool / "tmp")
    return [write_one(spool, tmpdir, item, fsync) for item in items]


def stage(tree: BenchTree, items: list[Item]) -> list[tuple[str, str]]:
    """Write every file under its temp name in spool/tmp/ (not watched, not *.json)."""
    out = []
    for name, body, _ in items:
        tmp = os.path.join(tree.spool, "tmp", f".{name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        try:
            os.write(fd, body)
        finally:
            os.close(fd)
        out.append((tmp, os.path.join(tree.spool, name)))
    return out


def rename_all(staged: list[tuple[str, str]]) -> list[float]:
    """The burst: rename the staged files into the spool as fast as one process can."""
    times = []
    rename, now = os.rename, time.monotonic
    for tmp, final in staged:
        rename(tmp, final)
        times.append(now())
    return times


def paced(rate: float, count: int, send: Callable[[int], float]) -> dict[int, float]:
    """Call send(i) at t0 + i/rate (absolute schedule, no drift); returns {i: hand-off time}."""
    out: dict[int, float] = {}
    t0 = time.monotonic() + 0.05
    for i in range(count):
        delay = t0 + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        out[i] = send(i)
    return out


def wait_count(counter: Callable[[], int], target: int, timeout: float,
               daemon: BenchDaemon | None = None, every: float = POLL,
               on_poll: Callable[[int], None] | None = None) -> tuple[int, float | None]:
    """Poll until counter() >= target; returns (last count, monotonic time it got there)."""
    deadline = time.monotonic() + timeout
    while True:
        n = counter()
        now = time.monotonic()
        if on_poll:
            on_poll(n)
        if n >= target:
            return n, now
        if now > deadline:
            return n, None
        if daemon is not None:
            daemon.poll_ready()
            daemon.check_alive()
        time.sleep(every)


# --- what a scenario gets and is ---------------------------------------------------------------

@dataclass
class Ctx:
    sizes: dict[str, Any]
    quick: bool
    repeat: int
    base: Path
    keep: bool
    receiver: Receiver | None = None
    results: dict[str, Any] | None = None


def finish_tree(ctx: Ctx, tree: BenchTree) -> None:
    if not ctx.keep:
        tree.remove()


@dataclass(frozen=True)
class Scenario:
    """One lettered scenario: its title, the figures it reports, and one run of it."""

    title: str
    metrics: list[Metric]
    run: Callable[[Ctx, int], dict[str, Any]]
