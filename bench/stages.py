"""Where scenario c's rename -> POST time goes, stage by stage.

    .venv/bin/python bench/stages.py [--rate 200] [--seconds 10]

Runs scenario c's paced writer against a daemon started with NOMAFLOWD_DEBUG=1, whose
"stages" debug lines carry time.monotonic() at each hand-off (CLOCK_MONOTONIC, the same
clock as the writer's and the receiver's), and prints the median and p99 of each stage:

  rename -> hint         the kernel's inotify event reaches the daemon's watcher thread
  hint -> loop awake     the main loop wakes up
  awake -> batch start   the loop's other work first (results to record, timers, the scan)
  read + parse           the batch's files read and parsed
  commit                 events, runs and claims in one transaction
  commit -> submitted    the attempt handed to the transport's worker (the WAL flush and the
                         unlinks come after it, while the POST is under way)
  submitted -> worker    the worker thread starts the send
  worker -> POST         the HTTP exchange as far as the receiver's arrival stamp
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.scenarios.base import (  # noqa: E402
    BenchDaemon,
    BenchTree,
    Receiver,
    failure_events,
    paced,
    percentile,
    write_one,
)

BATCH = re.compile(r"stages batch=(\d+) hinted=([\d.]+) woke=([\d.]+) started=([\d.]+)"
                   r" parsed=([\d.]+) committed=([\d.]+) submitted=([\d.]+) runs=(\S*)")
SEND = re.compile(r"stages send run=(\S+) started=([\d.]+) sent=([\d.]+)")
STAGES = ("rename -> hint", "hint -> loop awake", "awake -> batch start", "read + parse",
          "commit", "commit -> submitted", "submitted -> worker", "worker -> POST",
          "rename -> POST (total)")


def measure(rate: float, seconds: float) -> dict[str, list[float]]:
    receiver = Receiver()
    base = Path(tempfile.mkdtemp(prefix="nomaflowd-stages-"))
    tree = BenchTree(base, "stages")
    path = "/stages"
    tree.configure(receiver.url(path))
    n = int(rate * seconds)
    items = failure_events("st", n)
    daemon = BenchDaemon(tree, "stages")
    daemon.env["NOMAFLOWD_DEBUG"] = "1"
    daemon.start(wait=False)
    try:
        daemon.wait_ready()
        spool, tmpdir = str(tree.spool), str(tree.spool / "tmp")
        times = paced(rate, n, lambda i: write_one(spool, tmpdir, items[i], True))
        receiver.wait_items(path, n, 30.0)
        time.sleep(0.2)
        daemon.stop()
        arrived = {i: m for m, _w, i in receiver.records(path) if i is not None}
        log = daemon.output()
    finally:
        daemon.close()
        receiver.close()
        tree.remove()
    renamed = {items[i][2]: t for i, t in times.items()}
    batches: dict[str, tuple[float, ...]] = {}
    for m in BATCH.finditer(log):
        values = tuple(float(v) for v in m.groups()[1:7])
        for run in m.group(8).split(","):
            batches[run] = values
    sends = {m.group(1): float(m.group(2)) for m in SEND.finditer(log)}
    out: dict[str, list[float]] = {s: [] for s in STAGES}
    for run, t0 in renamed.items():
        if run not in batches or run not in sends or run not in arrived:
            continue
        marks = [t0, *batches[run], sends[run], arrived[run]]
        # A batch found by the scan of an earlier file's hint, or woken before this file's
        # hint arrived, has no such stage of its own: each mark is clamped between its
        # neighbours, so the stages are >= 0 and add up to the total.
        for i in range(len(marks) - 2, 0, -1):
            marks[i] = max(t0, min(marks[i], marks[i + 1]))
        for name, a, b in zip(STAGES, marks, marks[1:], strict=False):
            out[name].append((b - a) * 1000)
        out["rename -> POST (total)"].append((arrived[run] - t0) * 1000)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args(argv)
    stages = measure(args.rate, args.seconds)
    print(f"{'stage':24s} {'p50 ms':>8s} {'p99 ms':>8s}   (n={len(stages[STAGES[-1]])})")
    for name in STAGES:
        values = stages[name]
        print(f"{name:24s} {percentile(values, 50):8.3f} {percentile(values, 99):8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
