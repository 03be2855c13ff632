"""nomaflowd benchmark: one command, its own fixtures on 127.0.0.1, medians of N runs.

    .venv/bin/python bench/run.py                       # everything, 3 runs each (minutes)
    .venv/bin/python bench/run.py --quick               # tiny sizes, 1 run: the CI smoke
    .venv/bin/python bench/run.py --only a,d --repeat 5 --out bench/results.json

Scenarios (each run in a fresh temp tree: key, config with an encrypted webhook URL, jobs.toml,
spool, SQLite database; the daemon is a real `python -m nomaflowd run` process, READY awaited
over $NOTIFY_SOCKET; deliveries go to bench/receiver.py, a raw asyncio HTTP/1.1 server in its
own process):

  a  backlog      N event files present at start -> time until all are in `events`; the floor
                  (read + parse + unlink, no database) and the fraction of it
  b  live burst   N files staged in spool/tmp/, then renamed into a running daemon's spool as
                  fast as one process can
  c  paced        FAILED events at R/s for S s -> rename-to-POST latency (CLOCK_MONOTONIC)
  d  throughput   N FAILED events (staged, then a rename burst) to an unlimited webhook ->
                  deliveries/s; Apprise sends the same count in the same run
  e  Alertmanager the alerts of c and d posted to a local Alertmanager, same receiver
  f  long-run poll with 100,000 RUNNING runs in the database
  g  audit        5,000,000 notifications over six months: SQL and `nomaflowd audit` for one job
  h  footprint    RSS idle, RSS peak (scenario a), CPU while idle, start-up time
  i  schedules    the due-schedule poll over 10,000 scheduled jobs
  j  replicas     1 and 3 replicas on PostgreSQL (own spools, a shared spool): backlog and burst
  k  storm        10,000 failures over 200 jobs to a Slack-like channel (1/s, bursts of 25)

This file is the driver (flags, the repeat loop, the summary table, the JSON); each scenario is
a module of bench/scenarios/, and the trees and daemon processes are tests/harness.py's.

Exit status: 0 when every selected scenario completed, nothing was lost and no daemon logged an
ERROR line or a traceback; 1 otherwise.
Timed targets are reported (PASS/FAIL) but do not change the exit status unless --strict.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Run as `python bench/run.py`: the repository root makes `bench` and `tests` (the harness
# the bench shares with the test suite) importable.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.scenarios import SCENARIOS  # noqa: E402
from bench.scenarios.alertmanager import alertmanager_binary  # noqa: E402
from bench.scenarios.base import Ctx, Metric, Receiver, Skip, fmt, log  # noqa: E402

ORDER = "abcdefghijk"
FULL = {"a_files": 40_000, "b_files": 10_000, "c_rate": 200, "c_seconds": 30, "d_count": 5_000,
        "f_runs": 100_000, "g_rows": 5_000_000, "h_seconds": 60, "apprise_limit": 60.0,
        "am_batch": 64, "g_jobs": 1_000, "f_polls": 30, "i_jobs": 10_000, "i_polls": 30,
        "j_files": 20_000, "j_burst": 3_000, "k_count": 10_000}
QUICK = {"a_files": 2_000, "b_files": 1_000, "c_rate": 50, "c_seconds": 2, "d_count": 300,
         "f_runs": 10_000, "g_rows": 100_000, "h_seconds": 3, "apprise_limit": 10.0,
         "am_batch": 64, "g_jobs": 1_000, "f_polls": 10, "i_jobs": 10_000, "i_polls": 10,
         "j_files": 1_000, "j_burst": 200, "k_count": 1_000}
METRICS: dict[str, list[Metric]] = {name: s.metrics for name, s in SCENARIOS.items()}
RATIOS = [  # (label, numerator (scenario, key), denominator (scenario, key), target)
    ("c p50 nomaflowd / Alertmanager", ("c", "p50_ms"), ("e", "am_c_p50_ms"), ("le", 1.5)),
    ("c p99 nomaflowd / Alertmanager", ("c", "p99_ms"), ("e", "am_c_p99_ms"), ("le", 1.0)),
    ("d rate nomaflowd / Alertmanager", ("d", "rate"), ("e", "am_d_rate"), ("ge", 0.3)),
    ("j 1 PostgreSQL replica / SQLite, backlog events/s", ("j", "r1_events_per_s"),
     ("a", "events_per_s"), ("ge", 0.5)),
    ("j 1 PostgreSQL replica / SQLite, burst deliveries/s", ("j", "r1_rate"), ("d", "rate"),
     ("ge", 0.5)),
]


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


def ratio_rows(summary: list[dict[str, Any]], quick: bool) -> list[dict[str, Any]]:
    med = {(r["scenario"], r["key"]): r["median"] for r in summary}
    out = []
    for label, num, den, target in RATIOS:
        a, b = med.get(num), med.get(den)
        if a is None or b is None or not b:
            continue
        m = Metric(f"ratio_{num[1]}", label, "x", target)
        out.append({"scenario": num[0], "metric": label, "key": m.key, "unit": "x",
                    "median": a / b, "min": None, "max": None, "n": 1,
                    "target": m.target_text(), "verdict": m.verdict(a / b, quick),
                    "kind": "timed"})
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
    # The daemon as a package install leaves it: compiled. An editable install under
    # PYTHONDONTWRITEBYTECODE=1 would compile every module at every spawn (~80 ms of a
    # daemon's start here), which scenarios a and h time. The .pyc files are git-ignored.
    compileall.compile_dir(ROOT / "nomaflowd", quiet=1)
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
            title, fn = SCENARIOS[name].title, SCENARIOS[name].run
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
    summary += ratio_rows(summary, args.quick)
    doc["summary"] = summary
    doc["machine"]["loadavg_end"] = os.getloadavg()
    doc["finished"] = datetime.now(UTC).isoformat()
    lost = sum(int(r["median"] or 0) for r in summary if r["kind"] == "loss")
    incomplete = [r for r in summary if r["verdict"] == "FAIL (incomplete)"]
    doc["lost"] = sum(int(run.get(m.key) or 0) for name in only
                      for run in doc["scenarios"][name]["runs"]
                      for m in METRICS[name] if m.kind == "loss")
    doc["complete"] = not failed and not incomplete
    # ERROR lines and tracebacks in any daemon's log: 0 expected (a run that logged one is
    # not clean, whatever its figures).
    doc["log_errors"] = {name: errors for name in only if (errors := sum(
        int(v or 0) for run in doc["scenarios"][name].get("runs", [])
        for k, v in run.items() if k.endswith("log_errors")))}
    log("")
    print_table(summary)
    log("")
    for name, errors in doc["log_errors"].items():
        log(f"scenario {name}: {errors} ERROR line(s) or traceback(s) in the daemon logs"
            " (--keep keeps them)")
    log(f"load average at end: {doc['machine']['loadavg_end']} (other work on this machine"
        " skews timed figures)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1, default=str), encoding="utf-8")
    log(f"raw runs: {args.out}")
    if failed or lost or doc["lost"] or incomplete or doc["log_errors"]:
        log("RESULT: something was lost, a scenario did not complete, or a daemon logged an"
            " error")
        return 1
    if args.strict and any(r["verdict"] == "FAIL" for r in summary):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
