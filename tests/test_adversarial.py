"""Every kind of hostile spool input at once, into a running daemon: none stalls the spool.

Each file ends as a recorded event or in rejected/ with its reason, and the valid event
dropped after them all still arrives (SPEC section 15).
"""

from __future__ import annotations

import json
import os
import time

import pytest

from tests.conftest import Tree
from tests.servers import wait_until

NOBODY = 65534


def put(tree: Tree, name: str | bytes, body: bytes, owner: int | None = None) -> None:
    """Write `body` aside and rename it in, as a writer would (names as raw bytes allowed);
    `owner`: the uid and gid the file has before it lands (as another runner's would)."""
    tmp = tree.spool / "tmp" / f"t-{time.monotonic_ns()}"
    tmp.write_bytes(body)
    if owner is not None:
        os.chown(tmp, owner, owner)
    dest = os.fsencode(tree.spool) + b"/" + (name if isinstance(name, bytes) else name.encode())
    os.rename(tmp, dest)


def event(job: str = "victim", run: str = "r1", **fields: object) -> bytes:
    return json.dumps({"job_id": job, "run_id": run, "state": "FAILED", **fields}).encode()


def hostile(tree: Tree) -> list[str]:
    """Drop one file of each hostile class; returns what each is, for the messages."""
    put(tree, "x" * 250 + ".json", b"{not json")                         # name at the limit
    put(tree, b"\xff\xfe-not-utf8.json", b"{not json")                   # name not UTF-8
    put(tree, "newline\nforged line.json", b"{not json")                 # name forges a line
    put(tree, "surrogate.json", event(alerts={"recipients": ["#\ud800"]}))  # SQLite refuses
    put(tree, "nul.json", event(alerts={"recipients": ["hook:\u0000x"]}))   # PostgreSQL refuses
    put(tree, "longest-ids.json", event(job="j" * 200, run="r" * 200))   # accepted, both DBs
    put(tree, "too-long-id.json", event(job="j" * 201))
    put(tree, "content-not-utf8.json", b'{"job_id": "\xff"}')
    put(tree, "bom.json", b"\xef\xbb\xbf" + event())
    put(tree, "nan.json", b'{"job_id": "a", "run_id": "1", "state": "FAILED", "attempt": NaN}')
    put(tree, "deep.json", b"[" * 100_000 + b"]" * 100_000)
    put(tree, "array.json", b"[1, 2, 3]")
    put(tree, "huge.json", b" " * (2 << 20))
    os.symlink("/etc/passwd", tree.spool / "symlink.json")
    os.mkfifo(tree.spool / "fifo.json")
    other = tree.root / "kept-by-writer.json"
    other.write_bytes(event(run="hard"))
    os.link(other, tree.spool / "hard-link.json")
    (tree.spool / "directory.json").mkdir()
    (tree.spool / "sub").mkdir()
    (tree.spool / "sub" / "nested.json").write_bytes(event(run="nested"))
    put(tree, "guarded.json", json.dumps({"job_id": "guarded", "run_id": "x",
                                          "state": "SUCCEEDED"}).encode(), owner=NOBODY)
    tree.drop({"job_id": "victim", "run_id": "r2", "state": "FAILED",
               "alerts": {"recipients": ["ceo@elsewhere.example"]}})      # not allowed
    tree.drop({"job_id": "victim", "run_id": "r3", "state": "FAILED",
               "alerts": {"recipients": [f"hook:{i}" for i in range(20)]}})   # fan-out
    put(tree, "too-many-recipients.json",
        event(run="r4", alerts={"recipients": [f"#c{i}" for i in range(3000)]}))
    for job in ("victim", "bystander"):  # one event id, two jobs: both are recorded
        tree.drop({"job_id": job, "state": "NOTICE", "message": "m", "event_id": "same-id"})
    return []


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest, tree: Tree) -> Tree:
    if request.param == "postgres":
        tree.database = request.getfixturevalue("pg_schema")
    return tree


def test_no_hostile_file_stalls_the_spool(backend: Tree, http, daemon_factory):
    tree = backend
    tree.write_jobs('[jobs.guarded]\nwriters = ["root"]\n')
    tree.write_config(tree.webhook("hook", http.url("/hook")), daemon="rescan_seconds = 0.5")
    d = daemon_factory()
    hostile(tree)
    tree.drop({"job_id": "canary", "run_id": "after", "state": "FAILED"})
    arrived = http.wait_for(1, path="/hook", timeout=10)
    wait_until(lambda: any(r.json().get("job_id") == "canary"
                           for r in http.requests), what="the valid event after them all")
    wait_until(lambda: tree.spool_files() == ["directory.json"], what="every file handled")

    rejected = tree.spool / "rejected"
    notes = {p.name[:-len(".error")] for p in rejected.iterdir() if p.name.endswith(".error")}
    quarantined = {p.name for p in rejected.iterdir()
                   if not p.name.endswith(".error") and not p.name.startswith(".")}
    assert quarantined == notes  # every quarantined file has its note
    for name in ("surrogate.json", "nul.json", "too-long-id.json", "content-not-utf8.json",
                 "bom.json", "nan.json", "deep.json", "array.json", "huge.json",
                 "symlink.json", "fifo.json", "hard-link.json", "too-many-recipients.json"):
        assert name in quarantined, name
    assert any(n.startswith("x" * 64 + "~") for n in quarantined)  # the long name, shortened
    assert any("\n" not in (rejected / f"{n}.error").read_text(errors="replace").rstrip("\n")
               for n in quarantined)
    for note in rejected.glob("*.error"):
        assert note.read_text(errors="replace").count("\n") == 1, note.name  # one record
    assert "guarded.json" in quarantined, "the foreign writer's file is rejected for its job"
    assert "may not write events for job guarded" in (rejected / "guarded.json.error").read_text()
    assert "names 3000 recipients; an event file may name at most 20" in (
        rejected / "too-many-recipients.json.error").read_text()

    def fan_out() -> list[object]:
        return [r for r in http.requests if r.json().get("run_id") == "r3"]

    wait_until(fan_out, what="the fan-out event's POST")
    notices = wait_until(lambda: len([r for r in http.requests
                                      if r.json().get("state") == "NOTICE"]) == 2,
                         what="both jobs' notices")
    longest = wait_until(lambda: [r for r in http.requests
                                  if r.json().get("job_id") == "j" * 200],
                         what="the event with the longest ids")
    assert d.stop() == 0
    assert len(fan_out()) == 1  # hook:0 ... hook:19 is one webhook
    assert notices and longest[0].json()["run_id"] == "r" * 200
    assert "database unavailable" not in d.output()
    assert "Traceback" not in d.output()
    for name in ("directory.json", "sub"):  # said once each, and left alone
        assert d.output().count(f"spool directory {name} is not read") == 1, name
    assert (tree.spool / "directory.json").is_dir()
    assert (tree.spool / "sub" / "nested.json").exists()
    del arrived


def test_one_jobs_ids_never_claim_another_jobs_alert(tree: Tree, http, daemon_factory):
    """`/` is allowed in ids: job "etl", run "orders/42" and job "etl/orders", run "42" are
    two runs, and each failure is sent. Written by another runner for its own job, the first
    used to take the claim of the second (a guarded job's) and silence it."""
    tree.write_jobs('[jobs."etl/orders"]\nwriters = ["root"]\n')
    tree.write_config(tree.webhook("hook", http.url("/hook")))
    d = daemon_factory()
    put(tree, "1-other.json", event(job="etl", run="orders/42"), owner=NOBODY)
    http.wait_for(1, path="/hook", timeout=10)
    put(tree, "2-guarded.json", event(job="etl/orders", run="42"))
    wait_until(lambda: len(tree.notifications()) == 2, what="both failures audited")
    assert d.stop() == 0
    assert sorted((r.json()["job_id"], r.json()["run_id"]) for r in http.requests) == [
        ("etl", "orders/42"), ("etl/orders", "42")]
    assert tree.sql("SELECT count(*) FROM deliveries")[0][0] == 2
