"""nomaflowd benchmark: one command, its own fixtures on 127.0.0.1, medians of N runs.

    .venv/bin/python bench/run.py                       # everything, 3 runs each (minutes)
    .venv/bin/python bench/run.py --quick               # tiny sizes, 1 run: the CI smoke
    .venv/bin/python bench/run.py --only a,d --repeat 5 --out bench/results.json

Scenarios (each run in a fresh temp tree: key, config with an encrypted webhook URL, jobs.toml,
spool, SQLite database; the daemon is a real `python -m nomaflowd run` process, READY awaited
over $NOTIFY_SOCKET; deliveries go to bench/receiver.py, a raw asyncio HTTP/1.1 server in its
own process):

  a  backlog      N event files present at start -> time until all are in `events`
  b  live burst   N files staged in spool/tmp/, then renamed into a running daemon's spool as
                  fast as one process can
  c  paced        FAILED events at R/s for S s -> rename-to-POST latency (CLOCK_MONOTONIC)
  d  throughput   N FAILED events (staged, then a rename burst) to an unlimited webhook ->
                  deliveries/s; Apprise sends the same count in the same run
  e  Alertmanager the alerts of c and d posted to a local Alertmanager, same receiver
  f  long-run poll with 100,000 RUNNING runs in the database
  g  audit        5,000,000 notifications over six months: SQL and `nomaflowd audit` for one job
  h  footprint    RSS idle, RSS peak (scenario a), CPU while idle

Exit status: 0 when every selected scenario completed and nothing was lost; 1 otherwise.
Timed targets are reported (PASS/FAIL) but do not change the exit status unless --strict.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.harness import DaemonProcess, Tree  # noqa: E402

ORDER = "abcdefgh"
FULL = {"a_files": 40_000, "b_files": 10_000, "c_rate": 200, "c_seconds": 30, "d_count": 5_000,
        "f_runs": 100_000, "g_rows": 5_000_000, "h_seconds": 60, "apprise_limit": 60.0,
        "am_batch": 64, "g_jobs": 1_000, "f_polls": 30}
QUICK = {"a_files": 2_000, "b_files": 1_000, "c_rate": 50, "c_seconds": 2, "d_count": 300,
         "f_runs": 10_000, "g_rows": 100_000, "h_seconds": 3, "apprise_limit": 10.0,
         "am_batch": 64, "g_jobs": 1_000, "f_polls": 10}
POLL = 0.02          # seconds between `SELECT count(*) FROM events` polls
HOOK = "bench-hook"  # the webhook transport's name (its own default recipient)
JOB_X = "job-0421"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(msg, flush=True)


class Skip(Exception):
    """The scenario cannot run here (a peer is not installed); says how to fix it."""


class Incomplete(Exception):
    """The scenario did not finish within its time bound."""


# --- metrics and targets --------------------------------------------------------------------

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


METRICS: dict[str, list[Metric]] = {
    "a": [
        Metric("events_per_s", "backlog ingested, events/s (from spawn)", "/s", ("ge", 10_000)),
        Metric("seconds", "time until all are in `events`", "s"),
        Metric("steady_events_per_s", "events/s after the first commit", "/s", kind="info"),
        Metric("ready_s", "READY=1 after spawn", "s", kind="info"),
        Metric("lost", "files lost", "", ("eq", 0), "loss"),
        Metric("rejected", "files rejected", "", ("eq", 0), "loss"),
    ],
    "b": [
        Metric("lost", "files lost", "", ("eq", 0), "loss"),
        Metric("ingest_s", "first rename -> all in `events`", "s"),
        Metric("events_per_s", "live ingest, events/s", "/s", kind="info"),
        Metric("writer_per_s", "writer renames/s (files staged in spool/tmp first)", "/s",
               kind="info"),
        Metric("lag_s", "last rename -> all in `events`", "s", kind="info"),
    ],
    "c": [
        Metric("p50_ms", "rename -> POST latency p50", "ms", ("le", 2.0)),
        Metric("p99_ms", "rename -> POST latency p99", "ms", ("le", 10.0)),
        Metric("max_ms", "rename -> POST latency max", "ms", kind="info"),
        Metric("achieved_rate", "writer rate achieved", "/s", kind="info"),
        Metric("lost", "deliveries missing", "", ("eq", 0), "loss"),
    ],
    "d": [
        Metric("rate", "deliveries/s (first rename -> last POST)", "/s", ("ge", 3_000)),
        Metric("send_rate", "deliveries/s (first POST -> last POST)", "/s", kind="info"),
        Metric("apprise_rate", "Apprise json:// sends/s (same run)", "/s", kind="info"),
        Metric("ratio", "nomaflowd / Apprise", "x", ("ge", 2.0)),
        Metric("recorded_s", "first rename -> all rows in `notifications`", "s", kind="info"),
        Metric("lost", "deliveries missing", "", ("eq", 0), "loss"),
        Metric("not_sent", "outcome other than SENT", "", ("eq", 0), "loss"),
    ],
    "e": [
        Metric("am_c_p50_ms", "Alertmanager paced: POST -> webhook p50", "ms", kind="info"),
        Metric("am_c_p99_ms", "Alertmanager paced: POST -> webhook p99", "ms", kind="info"),
        Metric("am_d_rate", "Alertmanager burst: alerts/s (first POST -> last webhook)", "/s",
               kind="info"),
        Metric("am_d_send_rate", "Alertmanager burst: first -> last webhook", "/s", kind="info"),
        Metric("am_lost", "Alertmanager deliveries missing", "", kind="info"),
    ],
    "f": [
        Metric("poll_ms", "poll_long_runs(), none due", "ms", ("le", 20.0)),
        Metric("poll_job_ms", "poll job incl. reconnect, none due", "ms", ("le", 20.0)),
        Metric("due_poll_ms", "poll with 10 runs due (claims + submit)", "ms", kind="info"),
    ],
    "g": [
        Metric("sql_ms", "SQL: job X, last 180 days", "ms", ("le", 50.0)),
        Metric("cli_ms", "`nomaflowd audit --job X --since 180d --format json`", "ms",
               ("le", 300.0)),
        Metric("rows", "rows returned for job X", "", kind="info"),
    ],
    "h": [
        Metric("idle_rss_mb", "RSS idle", "MB", ("le", 64.0)),
        Metric("peak_rss_mb", "RSS peak (VmHWM during scenario a)", "MB", ("le", 128.0)),
        Metric("idle_cpu_pct", "CPU while idle", "%", ("le", 1.0)),
    ],
}
RATIOS = [  # (label, numerator (scenario, key), denominator (scenario, key))
    ("c p50 nomaflowd / Alertmanager (lower is better)", ("c", "p50_ms"), ("e", "am_c_p50_ms")),
    ("c p99 nomaflowd / Alertmanager (lower is better)", ("c", "p99_ms"), ("e", "am_c_p99_ms")),
    ("d rate nomaflowd / Alertmanager (higher is better)", ("d", "rate"), ("e", "am_d_rate")),
]


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


# --- helpers: processes, trees, files ---------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Receiver:
    """bench/receiver.py in its own process; control over HTTP on the same port."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(HERE / "receiver.py")],
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

    def configure(self, hook_url: str, *, poll_seconds: float = 30) -> Path:
        """One webhook transport (URL encrypted) to `hook_url`; relaxed timeouts and polls."""
        return self.write_config(self.webhook(HOOK, hook_url), daemon=(
            'spool_dir = "../var/spool"\n'
            'base_url = "https://nomaflow.bench"\n'
            'replica_id = "bench"\n'
            f"poll_seconds = {poll_seconds}\n"
            "send_timeout_seconds = 10\n"))

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


# --- scenarios ---------------------------------------------------------------------------------

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


def scenario_a(ctx: Ctx, rep: int) -> dict[str, Any]:
    assert ctx.receiver is not None
    n = ctx.sizes["a_files"]
    tree = BenchTree(ctx.base, f"a{rep}")
    tree.configure(ctx.receiver.url(f"/a{rep}/nomaflowd"))
    items = lifecycle_events(f"a{rep}", n)
    t = time.monotonic()
    write_all(tree, items)
    fixture_writer_per_s = n / (time.monotonic() - t)  # the same writer with no daemon running
    daemon = BenchDaemon(tree, "a").start(wait=False)
    counter = Counter(tree.db_path)
    first: list[float] = []
    rss_max = [0]

    def sample(count: int) -> None:
        if count and not first:
            first.append(time.monotonic())
            first.append(count)
        with contextlib.suppress(OSError):
            rss_max[0] = max(rss_max[0], daemon.status_kb("VmRSS"))

    try:
        count, done = wait_count(counter, n, max(60.0, n / 200), daemon, on_poll=sample)
        if done is None:
            raise Incomplete(f"{count}/{n} events after the time bound:\n{daemon.tail()}")
        cpu_s = daemon.cpu_ticks() / CLK_TCK
        ready_s = daemon.wait_ready(30)
        hwm = daemon.status_kb("VmHWM")
        code = daemon.stop()
        log_errors = daemon.log_problems()
        counter.close()
        final = Counter(tree.db_path)()
        lost = n - final - tree.rejected_count() - tree.spool_left()
        seconds = done - daemon.started
        steady = ((n - first[1]) / (done - first[0])) if first and done > first[0] else None
        return {"files": n, "seconds": seconds, "events_per_s": n / seconds,
                "steady_events_per_s": steady, "ready_s": ready_s, "lost": lost,
                "rejected": tree.rejected_count(), "left_in_spool": tree.spool_left(),
                "peak_rss_mb": hwm / 1024, "rss_sampled_max_mb": rss_max[0] / 1024,
                "daemon_cpu_pct": cpu_s / seconds * 100,
                "fixture_writer_per_s": fixture_writer_per_s,
                "exit_code": code, "log_errors": log_errors,
                "mix": "RUNNING+final per run, 1 run in 20 FAILED (webhook sent)"}
    finally:
        counter.close()
        daemon.close()
        finish_tree(ctx, tree)


def scenario_b(ctx: Ctx, rep: int) -> dict[str, Any]:
    assert ctx.receiver is not None
    n = ctx.sizes["b_files"]
    tree = BenchTree(ctx.base, f"b{rep}")
    tree.configure(ctx.receiver.url(f"/b{rep}/nomaflowd"))
    items = lifecycle_events(f"b{rep}", n)
    daemon = BenchDaemon(tree, "b").start(wait=False)
    counter = Counter(tree.db_path)
    try:
        daemon.wait_ready()
        staged = stage(tree, items)  # written beforehand; the burst is the renames
        t0 = time.monotonic()
        times = rename_all(staged)
        count, done = wait_count(counter, n, max(60.0, n / 100), daemon)
        if done is None:
            raise Incomplete(f"{count}/{n} events after the time bound:\n{daemon.tail()}")
        code = daemon.stop()
        log_errors = daemon.log_problems()
        counter.close()
        final = Counter(tree.db_path)()
        lost = n - final - tree.rejected_count() - tree.spool_left()
        return {"files": n, "lost": lost, "ingest_s": done - times[0],
                "events_per_s": n / (done - times[0]),
                "writer_per_s": n / (times[-1] - t0), "writer_s": times[-1] - t0,
                "lag_s": done - times[-1],  # last rename -> all in `events`
                "rejected": tree.rejected_count(), "exit_code": code, "log_errors": log_errors}
    finally:
        counter.close()
        daemon.close()
        finish_tree(ctx, tree)


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


def scenario_c(ctx: Ctx, rep: int) -> dict[str, Any]:
    assert ctx.receiver is not None
    rate, seconds = ctx.sizes["c_rate"], ctx.sizes["c_seconds"]
    n = int(rate * seconds)
    path = f"/c{rep}/nomaflowd"
    tree = BenchTree(ctx.base, f"c{rep}")
    tree.configure(ctx.receiver.url(path))
    items = failure_events(f"c{rep}", n)
    daemon = BenchDaemon(tree, "c").start(wait=False)
    try:
        daemon.wait_ready()
        spool, tmpdir = str(tree.spool), str(tree.spool / "tmp")
        # A paced writer behaves like nomaflowd.client.drop(): write, fsync, rename.
        times = paced(rate, n, lambda i: write_one(spool, tmpdir, items[i], True))
        got = ctx.receiver.wait_items(path, n, 30.0)
        code = daemon.stop()
        log_errors = daemon.log_problems()
        sent = {items[i][2]: t for i, t in times.items()}
        lat, missing, dups = latencies(sent, ctx.receiver.records(path))
        if not lat:
            raise Incomplete(f"no delivery arrived ({got}/{n})")
        span = max(times.values()) - min(times.values())
        return {"events": n, "p50_ms": percentile(lat, 50), "p90_ms": percentile(lat, 90),
                "p99_ms": percentile(lat, 99), "max_ms": max(lat), "mean_ms": statistics.fmean(lat),
                "achieved_rate": (n - 1) / span if span > 0 else None, "lost": missing,
                "duplicates": dups, "exit_code": code, "log_errors": log_errors,
                "writer": "write + fsync + rename",
                "slowest": slowest(sent, ctx.receiver.records(path), min(times.values()))}
    finally:
        daemon.close()
        finish_tree(ctx, tree)


def run_apprise(ctx: Ctx, path: str, count: int, prefix: str) -> dict[str, Any]:
    assert ctx.receiver is not None
    url = f"json://127.0.0.1:{ctx.receiver.port}{path}"
    proc = subprocess.run(
        [sys.executable, str(HERE / "apprise_peer.py"), url, str(count),
         str(ctx.sizes["apprise_limit"]), prefix],
        capture_output=True, text=True, timeout=ctx.sizes["apprise_limit"] + 60)
    try:
        out = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": f"apprise peer failed: {proc.stderr.strip()[-500:]}"}
    if "error" in out:
        return out
    out["received"] = ctx.receiver.wait_items(path, out["sent"], 10.0)
    out["rate"] = out["sent"] / out["elapsed"] if out["elapsed"] > 0 else None
    return out


def scenario_d(ctx: Ctx, rep: int) -> dict[str, Any]:
    assert ctx.receiver is not None
    n = ctx.sizes["d_count"]
    path = f"/d{rep}/nomaflowd"
    tree = BenchTree(ctx.base, f"d{rep}")
    tree.configure(ctx.receiver.url(path))
    items = failure_events(f"d{rep}", n)
    daemon = BenchDaemon(tree, "d").start(wait=False)
    notifications = Counter(tree.db_path, "notifications")
    try:
        daemon.wait_ready()
        staged = stage(tree, items)  # written beforehand; the burst is the renames
        rcv0, dmn0 = ctx.receiver.cpu_seconds(), daemon.cpu_ticks()
        times = rename_all(staged)
        got = ctx.receiver.wait_items(path, n, max(60.0, n / 50))
        rcv1, dmn1 = ctx.receiver.cpu_seconds(), daemon.cpu_ticks()
        rows, recorded = wait_count(notifications, n, 30.0, daemon)
        not_sent = Counter(tree.db_path, "notifications", "WHERE outcome != 'SENT'")()
        code = daemon.stop()
        log_errors = daemon.log_problems()
        sent = {item[2]: t for item, t in zip(items, times, strict=True)}
        records = ctx.receiver.records(path)
        lat, missing, dups = latencies(sent, records)
        arrivals = sorted(m for m, _w, _i in records)
        if not arrivals:
            raise Incomplete(f"no delivery arrived ({got}/{n})")
        result: dict[str, Any] = {
            "events": n, "received": got, "lost": missing, "duplicates": dups,
            "rate": len(lat) / (arrivals[-1] - times[0]),
            "send_rate": (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])
            if len(arrivals) > 1 else None,
            "first_post_after_s": arrivals[0] - times[0],
            "writer_s": times[-1] - times[0],
            "recorded_s": (recorded - times[0]) if recorded else None,
            "notification_rows": rows, "not_sent": not_sent, "exit_code": code,
            "log_errors": log_errors,
            # CPU share over the delivery window (100 = one core): is either side saturated?
            "daemon_cpu_pct": (dmn1 - dmn0) / CLK_TCK / (arrivals[-1] - times[0]) * 100,
            "receiver_cpu_pct": (rcv1 - rcv0) / (arrivals[-1] - times[0]) * 100,
        }
    finally:
        notifications.close()
        daemon.close()
        finish_tree(ctx, tree)
    peer = run_apprise(ctx, f"/d{rep}/apprise", n, f"d{rep}ap")
    result["apprise"] = peer
    if "error" in peer:
        log(f"    apprise column skipped: {peer['error']}")
        result["apprise_rate"] = result["ratio"] = None
    else:
        result["apprise_rate"] = peer["rate"]
        result["ratio"] = result["rate"] / peer["rate"] if peer["rate"] else None
    return result


# --- Alertmanager -----------------------------------------------------------------------------

def alertmanager_binary() -> str | None:
    return shutil.which("alertmanager") or shutil.which("prometheus-alertmanager")


class Alertmanager:
    def __init__(self, binary: str, base: Path, hook_url: str, tag: str) -> None:
        self.root = Path(tempfile.mkdtemp(prefix=f"am-{tag}-", dir=base))
        self.port = free_port()
        config = self.root / "alertmanager.yml"
        config.write_text(
            "route:\n"
            "  receiver: bench\n"
            "  group_by: ['...']\n"
            "  group_wait: 0s\n"
            "  group_interval: 1s\n"
            "  repeat_interval: 24h\n"
            "receivers:\n"
            "  - name: bench\n"
            "    webhook_configs:\n"
            f"      - url: '{hook_url}'\n"
            "        send_resolved: false\n", encoding="utf-8")
        self.logf = (self.root / "alertmanager.log").open("ab")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.path={self.root / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--cluster.listen-address=",
             "--log.level=warn"],
            stdout=self.logf, stderr=subprocess.STDOUT, cwd=self.root)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"alertmanager exited {self.proc.returncode}: "
                                   f"{(self.root / 'alertmanager.log').read_text()[-800:]}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                c.request("GET", "/-/ready")
                if c.getresponse().status == 200:
                    c.close()
                    break
                c.close()
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise Incomplete("alertmanager not ready within 30 s")
            time.sleep(0.05)
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)

    def post(self, alerts: list[dict[str, Any]]) -> None:
        body = json.dumps(alerts).encode()
        self.conn.request("POST", "/api/v2/alerts", body=body,
                          headers={"Content-Type": "application/json"})
        resp = self.conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"alertmanager refused alerts: {resp.status} {data[:200]!r}")

    def stop(self) -> None:
        self.conn.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.logf.close()


def am_alert(prefix: str, i: int) -> dict[str, Any]:
    run = f"{prefix}-{i}"
    return {"labels": {"alertname": "NomaflowRunFailed", "job_id": f"job-{i % 200:03d}",
                       "run_id": run, "severity": "high"},
            "annotations": {"summary": f"job-{i % 200:03d} run failed at step copy-orders",
                            "error": "OperationalError: connection refused"},
            "generatorURL": f"https://nomaflow.bench/runs/{run}/"}


def scenario_e(ctx: Ctx, rep: int) -> dict[str, Any]:
    assert ctx.receiver is not None
    binary = alertmanager_binary()
    if binary is None:
        raise Skip("alertmanager not installed: apt-get install prometheus-alertmanager")
    version = subprocess.run([binary, "--version"], capture_output=True, text=True)
    version_line = (version.stdout or version.stderr).splitlines()[0] if (
        version.stdout or version.stderr) else "?"
    out: dict[str, Any] = {"version": version_line}

    # c: the same paced FAILED alerts, one alert per POST (a source sends each as it happens)
    rate, seconds = ctx.sizes["c_rate"], ctx.sizes["c_seconds"]
    n = int(rate * seconds)
    path = f"/e{rep}c/alertmanager"
    am = Alertmanager(binary, ctx.base, ctx.receiver.url(path), f"c{rep}")
    prefix = f"e{rep}c"
    try:
        def send(i: int) -> float:
            t = time.monotonic()
            am.post([am_alert(prefix, i)])
            return t
        times = paced(rate, n, send)
        ctx.receiver.wait_items(path, n, 30.0)
    finally:
        am.stop()
        if not ctx.keep:
            shutil.rmtree(am.root, ignore_errors=True)
    sent = {f"{prefix}-{i}": t for i, t in times.items()}
    lat, missing_c, _ = latencies(sent, ctx.receiver.records(path))
    out["am_c_slowest"] = slowest(sent, ctx.receiver.records(path), min(times.values()))
    out.update(am_c_p50_ms=percentile(lat, 50), am_c_p99_ms=percentile(lat, 99),
               am_c_max_ms=max(lat) if lat else None, am_c_missing=missing_c)

    # d: the same burst, posted in batches of 64 (Prometheus's own batch size)
    n = ctx.sizes["d_count"]
    batch = ctx.sizes["am_batch"]
    path = f"/e{rep}d/alertmanager"
    prefix = f"e{rep}d"
    am = Alertmanager(binary, ctx.base, ctx.receiver.url(path), f"d{rep}")
    try:
        alerts = [am_alert(prefix, i) for i in range(n)]
        rcv0 = ctx.receiver.cpu_seconds()
        t0 = time.monotonic()
        for i in range(0, n, batch):
            am.post(alerts[i:i + batch])
        posted = time.monotonic()
        got = ctx.receiver.wait_items(path, n, max(60.0, n / 50))
        rcv1 = ctx.receiver.cpu_seconds()
    finally:
        am.stop()
        if not ctx.keep:
            shutil.rmtree(am.root, ignore_errors=True)
    records = ctx.receiver.records(path)
    sent = {f"{prefix}-{i}": t0 for i in range(n)}
    lat, missing_d, dups = latencies(sent, records)
    arrivals = sorted(m for m, _w, _i in records)
    out.update(am_d_rate=len(lat) / (arrivals[-1] - t0) if arrivals else None,
               am_d_send_rate=(len(arrivals) - 1) / (arrivals[-1] - arrivals[0])
               if len(arrivals) > 1 else None,
               am_d_post_s=posted - t0, am_d_received=got, am_d_webhooks=len(
                   {m for m, _w, _i in records}), am_d_duplicates=dups,
               am_lost=missing_c + missing_d,
               am_d_receiver_cpu_pct=(rcv1 - rcv0) / (arrivals[-1] - t0) * 100
               if arrivals else None)
    return out


# --- database scenarios ------------------------------------------------------------------------

def explain(conn: Any, sql: str, params: Iterable[Any] = ()) -> list[str]:
    return [str(row[-1]) for row in conn.execute("EXPLAIN QUERY PLAN " + sql, tuple(params))]


def scenario_f(ctx: Ctx, rep: int) -> dict[str, Any]:
    assert ctx.receiver is not None
    from nomaflowd import config as nconfig
    from nomaflowd import db
    from nomaflowd.daemon import Daemon
    from nomaflowd.deliveries import BATCH
    from nomaflowd.dispatch import utcnow

    n = ctx.sizes["f_runs"]
    tree = BenchTree(ctx.base, f"f{rep}")
    tree.configure(ctx.receiver.url(f"/f{rep}/nomaflowd"))
    database = db.open_database(tree.database_url)
    database.returning_clause = True
    daemon = Daemon(nconfig.load(tree.config_path))
    daemon.database = database
    try:
        now = utcnow()
        conn = database.connection()

        def rows() -> Iterable[tuple[Any, ...]]:
            for i in range(n):
                # inserted as they started (updated_at follows the row order, as in production)
                started = now - timedelta(seconds=21_600 * (n - i) / n)
                # half the runs have a long-run threshold, all in the future: none due now
                deadline = now + timedelta(seconds=60 + (i * 104_729) % 86_400) if i % 2 else None
                yield (f"job-{i % 500:03d}", f"f{rep}-{i}", "RUNNING", started, None, started,
                       None, deadline, None)

        t = time.monotonic()
        with database.atomic():
            conn.executemany(
                "INSERT INTO runs (job_id, run_id, state, started_at, finished_at, updated_at,"
                " long_run_alerted_at, long_run_deadline, overrides)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows())
        build_s = time.monotonic() - t
        r = db.RunRow
        query = r.select().where((r.long_run_deadline <= now) & (r.state == "RUNNING")
                                 & r.long_run_alerted_at.is_null()).limit(BATCH)
        sql, params = query.sql()
        plan = explain(conn, sql, params)
        polls, jobs = [], []
        daemon.poll_long_runs(utcnow())  # warm-up
        for _ in range(ctx.sizes["f_polls"]):
            t = time.perf_counter()
            due = daemon.poll_long_runs(utcnow())
            polls.append((time.perf_counter() - t) * 1000)
            assert due == 0
        for _ in range(ctx.sizes["f_polls"]):
            t = time.perf_counter()
            daemon.poll(utcnow())  # what the scheduler asks for: heartbeat, sweeps, long runs
            jobs.append((time.perf_counter() - t) * 1000)
        # 10 runs reach their threshold: the poll claims and submits their warnings
        conn = database.connection()
        with database.atomic():
            conn.execute("UPDATE runs SET long_run_deadline = ? WHERE id IN"
                         " (SELECT id FROM runs WHERE long_run_deadline IS NOT NULL LIMIT 10)",
                         (now - timedelta(minutes=1),))
        t = time.perf_counter()
        due = daemon.poll_long_runs(utcnow())
        due_ms = (time.perf_counter() - t) * 1000
        deadline = time.monotonic() + 15
        while daemon.dispatcher.busy() and time.monotonic() < deadline:
            daemon.deliveries.finish(daemon.dispatcher.take(timeout=0.5))
        return {"runs": n, "build_s": build_s, "poll_ms": statistics.median(polls),
                "poll_max_ms": max(polls), "poll_job_ms": statistics.median(jobs),
                "poll_job_max_ms": max(jobs), "due_poll_ms": due_ms, "due": due,
                "query": sql, "plan": plan}
    finally:
        daemon.dispatcher.close()
        database.close()
        finish_tree(ctx, tree)


G_INSERT = """
WITH RECURSIVE c(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM c WHERE i + 1 < :n)
INSERT INTO notifications (created_at, event_id, job_id, run_id, alert, level, transport,
                           transport_type, recipient, outcome, detail, duration_ms, replica)
SELECT strftime('%Y-%m-%d %H:%M:%S', :start + i * :step, 'unixepoch')
         || printf('.%06d', (i * 7919) % 1000000),
       job || '/r' || i || '/' || CASE WHEN k < 6 THEN 'FAILED' WHEN k < 8 THEN 'RUNNING'
                                        ELSE 'SUCCEEDED' END,
       job, 'r' || i,
       CASE WHEN k < 6 THEN 'failed' WHEN k < 8 THEN 'long_run' ELSE 'succeeded' END,
       CASE WHEN k < 6 THEN 'high' WHEN k < 8 THEN 'medium' ELSE 'low' END,
       CASE t WHEN 0 THEN 'slack' WHEN 1 THEN 'email' ELSE 'opsgenie-data' END,
       CASE t WHEN 0 THEN 'slack' WHEN 1 THEN 'email' ELSE 'webhook' END,
       CASE t WHEN 0 THEN '#data-oncall' WHEN 1 THEN 'data-team@corp.local'
              ELSE 'opsgenie-data' END,
       CASE WHEN o < 97 THEN 'SENT' WHEN o < 99 THEN 'FAILED_TRANSPORT' ELSE 'FAILED_DELIVERY' END,
       CASE WHEN o < 97 THEN 'HTTP 200' WHEN o < 99 THEN 'timed out after 10s'
            ELSE 'HTTP 429: rate limited' END,
       20 + (i * 31) % 400, 'bench'
FROM (SELECT i, printf('job-%04d', (i * 2654435761) % :jobs) AS job, (i * 7) % 10 AS k,
             i % 3 AS t, (i * 13) % 100 AS o FROM c)
"""


def build_audit_db(ctx: Ctx, tree: BenchTree) -> dict[str, Any]:
    """5M notification rows over 183 days, indexes dropped during the load and rebuilt after."""
    from nomaflowd import db

    database = db.open_database(tree.database_url)
    database.close()
    n = ctx.sizes["g_rows"]
    t = time.monotonic()
    conn = sqlite3.connect(tree.db_path)
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("PRAGMA cache_size = -262144")
    conn.execute("PRAGMA temp_store = MEMORY")
    indexes = conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index'"
                           " AND tbl_name = 'notifications' AND sql IS NOT NULL").fetchall()
    for name, _ in indexes:
        conn.execute(f'DROP INDEX "{name}"')
    end = datetime.now(UTC).replace(tzinfo=None)
    start = end - timedelta(days=183)
    with conn:
        conn.execute(G_INSERT, {"n": n, "start": start.replace(tzinfo=UTC).timestamp(),
                                "step": 183 * 86_400 / n, "jobs": ctx.sizes["g_jobs"]})
    insert_s = time.monotonic() - t
    with conn:
        for _, sql in indexes:
            conn.execute(sql)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return {"rows_total": n, "jobs": ctx.sizes["g_jobs"], "insert_s": insert_s,
            "build_s": time.monotonic() - t, "db_mb": tree.db_path.stat().st_size / 2**20}


def scenario_g(ctx: Ctx, rep: int) -> dict[str, Any]:
    """The 5M-row database is built once (first run) and shared by the runs of this scenario."""
    from nomaflowd import db
    from nomaflowd.dispatch import utcnow

    shared = ctx.results.setdefault("_g", {}) if ctx.results is not None else {}
    if "tree" not in shared:
        tree = BenchTree(ctx.base, "g")
        tree.configure("http://127.0.0.1:9/unused")
        log(f"    building {ctx.sizes['g_rows']:,} notification rows ...")
        shared["tree"] = tree
        shared["build"] = build_audit_db(ctx, tree)
        log("    built in {build_s:.1f}s ({db_mb:.0f} MB)".format(**shared["build"]))
    tree = shared["tree"]
    since = utcnow() - timedelta(days=180)
    sql = ("SELECT created_at, job_id, run_id, alert, level, transport, recipient, outcome"
           " FROM notifications WHERE job_id = ? AND created_at >= ? ORDER BY created_at")
    params = (JOB_X, str(since))
    times, rows = [], 0
    for _ in range(5):
        t = time.perf_counter()
        conn = sqlite3.connect(tree.db_path)  # what an operator's sqlite3 session does
        rows = len(conn.execute(sql, params).fetchall())
        conn.close()
        times.append((time.perf_counter() - t) * 1000)
    conn = sqlite3.connect(tree.db_path)
    plan_sql = explain(conn, sql, params)
    # the CLI's own query, as peewee builds it in nomaflowd/audit.py
    database = db.open_database(tree.database_url)
    n = db.NotificationRow
    cli_sql, cli_params = (n.select().order_by(n.created_at, n.id).where(n.job_id == JOB_X)
                           .where(n.created_at >= since)).sql()
    plan_cli = explain(conn, cli_sql, cli_params)
    database.close()
    conn.close()
    cmd = [sys.executable, "-m", "nomaflowd", "audit", "--config", str(tree.config_path),
           "--job", JOB_X, "--since", "180d", "--format", "json"]
    cli_times, cli_rows = [], None
    for _ in range(3):
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, cwd=tree.root, timeout=300)
        cli_times.append((time.perf_counter() - t) * 1000)
        if proc.returncode != 0:
            raise RuntimeError(f"nomaflowd audit exited {proc.returncode}: {proc.stderr[-400:]!r}")
        cli_rows = len(json.loads(proc.stdout))
    return {**shared["build"], "sql_ms": statistics.median(times), "sql_runs_ms": times,
            "rows": rows, "cli_ms": statistics.median(cli_times), "cli_runs_ms": cli_times,
            "cli_rows": cli_rows, "sql": sql, "plan_sql": plan_sql, "cli_sql": cli_sql,
            "plan_cli": plan_cli, "fixture": "built once, shared by the runs"}


def scenario_h(ctx: Ctx, rep: int) -> dict[str, Any]:
    assert ctx.receiver is not None
    window = ctx.sizes["h_seconds"]
    tree = BenchTree(ctx.base, f"h{rep}")
    tree.configure(ctx.receiver.url(f"/h{rep}/nomaflowd"))
    daemon = BenchDaemon(tree, "h").start(wait=False)
    try:
        ready_s = daemon.wait_ready()
        time.sleep(1.0)  # let the scheduler's first poll and the first rescan pass
        rss0 = daemon.status_kb("VmRSS")
        c0, t0 = daemon.cpu_ticks(), time.monotonic()
        time.sleep(window)
        c1, t1 = daemon.cpu_ticks(), time.monotonic()
        rss1 = daemon.status_kb("VmRSS")
        threads = daemon.status_kb("Threads")
        code = daemon.stop()
        log_errors = daemon.log_problems()
        result: dict[str, Any] = {
            "idle_rss_mb": max(rss0, rss1) / 1024, "idle_cpu_pct": (c1 - c0) / CLK_TCK
            / (t1 - t0) * 100, "idle_window_s": t1 - t0, "ready_s": ready_s,
            "threads": threads, "exit_code": code, "log_errors": log_errors}
    finally:
        daemon.close()
        finish_tree(ctx, tree)
    a_runs = (ctx.results or {}).get("a", {}).get("runs", [])
    peak = a_runs[rep].get("peak_rss_mb") if rep < len(a_runs) else None
    result["peak_rss_mb"] = peak  # VmHWM of scenario a's run with the same number
    if peak is None and rep == 0:
        log("    RSS peak comes from scenario a: add a to --only for it")
    return result


SCENARIOS: dict[str, tuple[str, Callable[[Ctx, int], dict[str, Any]]]] = {
    "a": ("backlog", scenario_a),
    "b": ("live burst", scenario_b),
    "c": ("paced latency", scenario_c),
    "d": ("throughput vs Apprise", scenario_d),
    "e": ("Alertmanager side by side", scenario_e),
    "f": ("long-run poll", scenario_f),
    "g": ("audit query", scenario_g),
    "h": ("footprint", scenario_h),
}


# --- reporting ------------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    model = "?"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as fh:
            mem_kb = int(next(ln for ln in fh if ln.startswith("MemTotal")).split()[1])
    except (OSError, StopIteration):
        mem_kb = 0
    def git(*args: str) -> str:
        try:  # read-only; --no-optional-locks: do not even refresh the index
            return subprocess.run(["git", "--no-optional-locks", *args], cwd=ROOT, text=True,
                                  capture_output=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    changed = git("status", "--porcelain", "--", "nomaflowd").splitlines()
    return {"git_head": git("rev-parse", "--short", "HEAD"),
            "nomaflowd_files_changed": len(changed),
            "nproc": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
            "cpu_model": model, "mem_gb": round(mem_kb / 2**20, 1),
            "python": platform.python_version(), "sqlite": sqlite3.sqlite_version,
            "kernel": platform.release(), "loadavg_start": os.getloadavg()}


def summarize(name: str, runs: list[dict[str, Any]], quick: bool) -> list[dict[str, Any]]:
    rows = []
    good = [r for r in runs if r.get("ok")]
    for m in METRICS[name]:
        values: list[Any] = [float(r[m.key]) for r in good if r.get(m.key) is not None]
        if not m.unit and all(v.is_integer() for v in values):
            values = [int(v) for v in values]  # counts print as counts
        median = statistics.median(values) if values else None
        if isinstance(median, float) and median.is_integer() and not m.unit:
            median = int(median)
        if m.kind == "loss" and runs and len(good) < len(runs):
            verdict = "FAIL (incomplete)"
        else:
            verdict = m.verdict(median, quick)
        rows.append({"scenario": name, "metric": m.label, "key": m.key, "unit": m.unit,
                     "median": median, "min": min(values) if values else None,
                     "max": max(values) if values else None, "n": len(values),
                     "target": m.target_text(), "verdict": verdict, "kind": m.kind})
    return rows


def ratio_rows(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    med = {(r["scenario"], r["key"]): r["median"] for r in summary}
    out = []
    for label, num, den in RATIOS:
        a, b = med.get(num), med.get(den)
        if a is None or b is None or not b:
            continue
        out.append({"scenario": "e", "metric": label, "key": f"ratio_{num[1]}", "unit": "x",
                    "median": a / b, "min": None, "max": None, "n": 1, "target": "-",
                    "verdict": "n.a.", "kind": "info"})
    return out


def print_table(rows: list[dict[str, Any]]) -> None:
    head = ("scen", "metric", "median", "min–max", "target", "verdict")  # noqa: RUF001
    cells = []
    for r in rows:
        unit = r["unit"]
        med = f"{fmt(r['median'])} {unit}".strip() if r["median"] is not None else "-"
        rng = (f"{fmt(r['min'])}\N{EN DASH}{fmt(r['max'])}"
               if r["n"] > 1 and r["min"] is not None else "")
        cells.append((r["scenario"], r["metric"], med, rng, r["target"], r["verdict"]))
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h)
              for i, h in enumerate(head)]
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))
    log(line)
    log("-" * len(line))
    for c in cells:
        log("  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)).rstrip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="nomaflowd benchmark")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, 1 run each: completes in seconds (CI smoke)")
    parser.add_argument("--repeat", type=int, default=None, help="runs per scenario (default 3;"
                        " 1 with --quick)")
    parser.add_argument("--only", default=ORDER, help="scenarios to run, e.g. a,b,d (default all)")
    parser.add_argument("--out", default=str(HERE / "results.json"), help="JSON with every run")
    parser.add_argument("--workdir", default=None, help="where temp trees go (default $TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep the temp trees (daemon logs)")
    parser.add_argument("--strict", action="store_true", help="exit 1 on a FAILed timed target too")
    args = parser.parse_args(argv)

    only = [s for s in ORDER if s in set(args.only.replace(",", "").replace(" ", ""))]
    unknown = set(args.only.replace(",", "").replace(" ", "")) - set(ORDER)
    if unknown or not only:
        parser.error(f"--only takes letters from {ORDER}, comma-separated")
    repeat = args.repeat or (1 if args.quick else 3)
    sizes = QUICK if args.quick else FULL
    base = Path(tempfile.mkdtemp(prefix="nomaflowd-bench-", dir=args.workdir))
    info = machine()
    log(f"nomaflowd bench: {'quick' if args.quick else 'full'}, {repeat} run(s), scenarios "
        f"{','.join(only)}")
    log(f"code: {info['git_head'] or '?'}, {info['nomaflowd_files_changed']} uncommitted"
        " file(s) in nomaflowd/")
    log(f"machine: {info['nproc']} CPU(s) ({info['cpu_model']}), {info['mem_gb']} GB, "
        f"Python {info['python']}, SQLite {info['sqlite']}, load {info['loadavg_start']}")
    if "e" in only and alertmanager_binary() is None:
        log("alertmanager not installed: apt-get install prometheus-alertmanager"
            " (scenario e is skipped)")
    results: dict[str, Any] = {}
    ctx = Ctx(sizes=sizes, quick=args.quick, repeat=repeat, base=base, keep=args.keep,
              results=results)
    doc: dict[str, Any] = {"machine": info, "quick": args.quick, "repeat": repeat,
                           "sizes": sizes, "started": datetime.now(UTC).isoformat(),
                           "scenarios": {}}
    failed = False
    try:
        ctx.receiver = Receiver()
        for name in only:
            title, fn = SCENARIOS[name]
            entry: dict[str, Any] = {"title": title, "runs": []}
            results[name] = entry
            doc["scenarios"][name] = entry
            for rep in range(repeat):
                log(f"[{name}] {title}: run {rep + 1}/{repeat}")
                t = time.monotonic()
                try:
                    run = fn(ctx, rep)
                    run["ok"] = True
                except Skip as exc:
                    log(f"    skipped: {exc}")
                    entry["skipped"] = str(exc)
                    break
                except Exception as exc:
                    log(f"    FAILED: {type(exc).__name__}: {exc}")
                    run = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                           "traceback": traceback.format_exc()}
                    failed = True
                run["wall_s"] = time.monotonic() - t
                run["loadavg"] = os.getloadavg()
                entry["runs"].append(run)
                brief = {m.key: fmt(run.get(m.key)) for m in METRICS[name]
                         if run.get(m.key) is not None}
                if brief:
                    log("    " + ", ".join(f"{k}={v}" for k, v in brief.items()))
                for key in ("plan", "plan_sql", "plan_cli"):
                    if run.get(key) and rep == 0:
                        log(f"    EXPLAIN QUERY PLAN ({key}): " + " | ".join(run[key]))
                if any((run.get(m.key) or 0) > 0 for m in METRICS[name] if m.kind == "loss"):
                    failed = True
    finally:
        if ctx.receiver is not None:
            ctx.receiver.close()
        g_tree = results.pop("_g", {}).get("tree")
        if g_tree is not None and not args.keep:
            g_tree.remove()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        else:
            log(f"temp trees kept in {base}")

    summary: list[dict[str, Any]] = []
    for name in only:
        entry = doc["scenarios"][name]
        if entry.get("skipped"):
            summary.append({"scenario": name, "metric": entry["skipped"], "key": "skipped",
                            "unit": "", "median": None, "min": None, "max": None, "n": 0,
                            "target": "-", "verdict": "n.a.", "kind": "info"})
            continue
        summary += summarize(name, entry["runs"], args.quick)
    summary += ratio_rows(summary)
    doc["summary"] = summary
    doc["machine"]["loadavg_end"] = os.getloadavg()
    doc["finished"] = datetime.now(UTC).isoformat()
    lost = sum(int(r["median"] or 0) for r in summary if r["kind"] == "loss")
    incomplete = [r for r in summary if r["verdict"] == "FAIL (incomplete)"]
    doc["lost"] = sum(int(run.get(m.key) or 0) for name in only
                      for run in doc["scenarios"][name]["runs"]
                      for m in METRICS[name] if m.kind == "loss")
    doc["complete"] = not failed and not incomplete
    log("")
    print_table(summary)
    log("")
    log(f"load average at end: {doc['machine']['loadavg_end']} (other work on this machine"
        " skews timed figures)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1, default=str), encoding="utf-8")
    log(f"raw runs: {args.out}")
    if failed or lost or doc["lost"] or incomplete:
        log("RESULT: something was lost or a scenario did not complete")
        return 1
    if args.strict and any(r["verdict"] == "FAIL" for r in summary):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
