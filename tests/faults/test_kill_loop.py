"""Kill -9 at random moments while events keep arriving; then reconcile three ledgers.

Ledger 1, what was dropped: every good event and every bad file the writer made.
Ledger 2, what the receivers got: POSTs by run id.
Ledger 3, what the database and rejected/ hold: events, audit rows, quarantined files.
Lost = dropped files that are neither a recorded event nor a quarantined file with a reason,
plus recorded failures whose alert was never attempted.
"""

from __future__ import annotations

import json
import random
import re
import signal
import threading
import time

from tests.conftest import DaemonProcess
from tests.servers import Reply, wait_until

KILLS = 20
FIGURES: dict[str, int] = {}


def test_random_kills_lose_nothing_and_duplicate_only_in_flight_sends(tree, http):
    http.default = Reply(delay=0.005)
    tree.write_config(tree.webhook("hook", http.url()), daemon="rescan_seconds = 0.2")
    tree.spool.mkdir(parents=True)
    (tree.spool / "tmp").mkdir()
    rng = random.Random(20261128)
    dropped_good: list[str] = []
    dropped_bad: list[str] = []
    stop_writer = threading.Event()

    def writer() -> None:
        n = 0
        while not stop_writer.is_set() and n < 2000:
            n += 1
            if n % 25 == 0:
                name = f"bad-{n:05d}.json"
                tmp = tree.spool / "tmp" / f".{name}"
                tmp.write_bytes(b"{not json")
                tmp.rename(tree.spool / name)
                dropped_bad.append(name)
            else:
                tree.drop({"job_id": "j", "run_id": f"k{n:05d}", "state": "FAILED"})
                dropped_good.append(f"k{n:05d}")
            time.sleep(0.001)  # a writer's pace, not synchronisation

    thread = threading.Thread(target=writer)
    thread.start()
    kills = 0
    try:
        while kills < KILLS:
            d = DaemonProcess(tree)
            d.start(wait=False)
            time.sleep(rng.uniform(0.05, 0.4))  # a random moment to die at
            d.proc.send_signal(signal.SIGKILL)
            d.proc.wait(10)
            d.close()
            kills += 1
    finally:
        stop_writer.set()
        thread.join()
    final = DaemonProcess(tree).start()
    try:
        wait_until(lambda: not tree.spool_files(), timeout=60, what="spool drained")
        wait_until(lambda: tree.sql("SELECT count(*) FROM deliveries WHERE state = 'claimed'")
                   == [(0,)], timeout=30, what="every claim finished")
        assert final.stop() == 0
    finally:
        final.close()

    recorded = {r[0] for r in tree.sql("SELECT run_id FROM events")}
    rejected = set(tree.rejected())
    quarantined = {n for n in rejected if n.endswith(".json") and f"{n}.error" in rejected}
    quarantined_runs = set()
    for name in quarantined - set(dropped_bad):  # good files caught in three crashes
        note = (tree.spool / "rejected" / f"{name}.error").read_text()
        assert re.search(r"stopped \d+ times while handling", note), note
        quarantined_runs.add(json.loads((tree.spool / "rejected" / name).read_text())["run_id"])
    attempted = {r["run_id"] for r in tree.notifications()}
    posts = [r.json()["run_id"] for r in http.requests]
    duplicates = {r for r in posts if posts.count(r) > 1}
    resent = {r["run_id"] for r in tree.notifications()
              if "sent again after a restart" in r["detail"]}
    lost_files = [r for r in dropped_good if r not in recorded and r not in quarantined_runs]
    lost_bad = [n for n in dropped_bad if n not in quarantined]
    unattempted = recorded - attempted
    figures = {
        "kills survived": kills,
        "files dropped": len(dropped_good) + len(dropped_bad),
        "events recorded": len(recorded),
        "quarantined (bad input)": len(set(dropped_bad) & quarantined),
        "quarantined (crash loop)": len(quarantined_runs),
        "alerts due": len(recorded),
        "delivered": len(set(posts)),
        "duplicates": len(duplicates),
        "lost": len(lost_files) + len(lost_bad) + len(unattempted),
    }
    FIGURES.update(figures)  # printed at the end of the run (tests/conftest.py)
    assert kills >= KILLS
    assert lost_files == [] and lost_bad == [] and unattempted == set()
    assert recorded <= set(posts)
    assert duplicates <= resent
    assert figures["lost"] == 0
