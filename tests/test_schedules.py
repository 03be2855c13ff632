"""Schedules (SPEC §12): retries, missed runs, stale jobs, reminders, a fallback when a
channel breaks. End to end against local servers; time is passed in as `now`."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from nomaflowd import events


def hook_rows(tree: Any) -> list[tuple[str, str | None, str]]:
    return [(r["alert"], r["run_id"], r["outcome"]) for r in tree.notifications()]


# --- retries -------------------------------------------------------------------------------

def test_retried_attempts_stay_quiet_until_the_last(tree, http, inproc):
    tree.write_config(tree.webhook("hook", http.url()))
    tree.write_jobs('[jobs.etl.alerts]\nrecipients = ["hook"]\non_long_run_minutes = 60\n')
    d = inproc()
    tree.drop({"job_id": "etl", "run_id": "r1", "state": "RUNNING"})
    for attempt in (1, 2):
        tree.drop({"job_id": "etl", "run_id": "r1", "state": "FAILED", "attempt": attempt,
                   "max_attempts": 3, "error": f"boom {attempt}"})
    d.pump()
    assert http.requests == []
    # still RUNNING, its long-run clock untouched
    assert tree.sql("SELECT state, long_run_deadline IS NOT NULL FROM runs") == [("RUNNING", 1)]
    assert tree.sql("SELECT event_id FROM events WHERE state = 'FAILED' ORDER BY id") == [
        ("etl/r1/FAILED/1",), ("etl/r1/FAILED/2",)]
    tree.drop({"job_id": "etl", "run_id": "r1", "state": "FAILED", "attempt": 3,
               "max_attempts": 3, "error": "boom 3"})
    d.pump()
    (req,) = http.wait_for(1)
    assert req.json()["alert"] == "failed"
    assert tree.sql("SELECT state FROM runs") == [("FAILED",)]
    assert tree.notifications()[0]["alert"] == "failed"


def test_on_retry_alerts_each_attempt_and_the_last_says_how_many(tree, http, inproc):
    tree.write_config(tree.slack("slack", http.url("/slack")))
    tree.write_jobs('[jobs.etl.alerts]\nrecipients = ["#data"]\non_retry = true\n')
    d = inproc()
    for attempt in (1, 2):
        tree.drop({"job_id": "etl", "run_id": "r1", "state": "FAILED", "attempt": attempt,
                   "max_attempts": 2, "error": "boom"})
        d.pump()
    texts = [r.json()["text"] for r in http.wait_for(2, path="/slack")]
    assert "attempt 1 of 2; it will be retried" in texts[0]
    assert "etl run failed after 2 attempts" in texts[1]
    assert [r["alert"] for r in tree.notifications()] == ["failed", "failed"]


def test_attempt_fields_are_checked():
    base = b'{"job_id": "j", "run_id": "r", "state": "%s", "attempt": %s}'
    for state, value, reason in (("FAILED", b"0", "from 1"), ("FAILED", b"true", "integer"),
                                 ("SUCCEEDED", b"1", "only for FAILED")):
        try:
            events.parse(base % (state.encode(), value), "x.json", datetime(2026, 1, 1))
        except events.Rejected as exc:
            assert reason in str(exc)
        else:
            raise AssertionError(f"{state} {value!r} accepted")
