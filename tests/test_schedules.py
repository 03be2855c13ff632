"""Schedules (SPEC §12): retries, missed runs, stale jobs, reminders, a fallback when a
channel breaks. End to end against local servers; time is passed in as `now`."""

from __future__ import annotations

from datetime import datetime, timedelta
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


# --- schedules in jobs.toml ------------------------------------------------------------------

def utc(*args: int) -> datetime:
    return datetime(*args)  # naive UTC, the database's convention


def expected(schedule: Any, start: datetime, n: int) -> list[datetime]:
    out, t = [], start
    for _ in range(n):
        t = schedule.next_after(t)
        out.append(t)
    return out


def test_cron_over_the_spring_dst_change_in_paris():
    from nomaflowd import timetable

    s = timetable.parse("30 2 * * *", "Europe/Paris", "jobs.etl")
    # 29 March 2026: 02:30 does not exist in Paris (02:00 -> 03:00); APScheduler expects
    # the run an hour later, at 03:30 CEST (01:30Z), then 02:30 CEST (00:30Z) from the 30th.
    assert expected(s, utc(2026, 3, 27, 12), 4) == [
        utc(2026, 3, 28, 1, 30), utc(2026, 3, 29, 1, 30), utc(2026, 3, 30, 0, 30),
        utc(2026, 3, 31, 0, 30)]
    # 25 October 2026: 02:30 happens twice (CEST, then CET); both are expected.
    assert expected(s, utc(2026, 10, 24, 12), 3) == [
        utc(2026, 10, 25, 0, 30), utc(2026, 10, 25, 1, 30), utc(2026, 10, 26, 1, 30)]


def test_schedule_forms():
    from nomaflowd import timetable

    every = timetable.parse("@every 1h30m", None, "jobs.j")
    t1, t2 = expected(every, utc(2026, 5, 1, 0, 0, 1), 2)
    assert t2 - t1 == timedelta(minutes=90)
    assert every.next_after(utc(2026, 5, 1)) == every.next_after(utc(2026, 5, 1))  # fixed origin
    assert expected(timetable.parse("@every 90s", "UTC", "jobs.j"), utc(2026, 5, 1), 2)[1] \
        - expected(timetable.parse("@every 90s", "UTC", "jobs.j"), utc(2026, 5, 1), 1)[0] \
        == timedelta(seconds=90)
    assert expected(timetable.parse("@hourly", None, "jobs.j"), utc(2026, 5, 1, 0, 10), 1) == [
        utc(2026, 5, 1, 1)]
    assert expected(timetable.parse("@daily", None, "jobs.j"), utc(2026, 5, 1, 0, 10), 1) == [
        utc(2026, 5, 2)]
    assert expected(timetable.parse("@monthly", None, "jobs.j"), utc(2026, 5, 1, 0, 10), 1) == [
        utc(2026, 6, 1)]
    # @weekly and weekday 0 are Sunday, as in crontab (APScheduler 3 alone would say Monday)
    assert expected(timetable.parse("@weekly", None, "jobs.j"), utc(2026, 5, 1), 1) == [
        utc(2026, 5, 3)]
    assert expected(timetable.parse("0 9 * * 1-5", None, "jobs.j"), utc(2026, 5, 1, 10), 2) == [
        utc(2026, 5, 4, 9), utc(2026, 5, 5, 9)]  # Friday 1 May -> Monday, Tuesday
    assert expected(timetable.parse("0 9 * * 5-7", None, "jobs.j"), utc(2026, 5, 1, 10), 2) == [
        utc(2026, 5, 2, 9), utc(2026, 5, 3, 9)]


def test_check_names_the_bad_schedule_key(tree, capsys):
    from nomaflowd.cli import main

    tree.write_config(tree.webhook("hook", "http://127.0.0.1:9/"))
    for jobs, word in (('[jobs.etl]\nschedule = "61 * * * *"\n', "jobs.etl.schedule"),
                       ('[jobs.etl]\nschedule = "0 2 * *"\n', "jobs.etl.schedule"),
                       ('[jobs.etl]\nschedule = "@every 5x"\n', "jobs.etl.schedule"),
                       ('[jobs.etl]\nschedule = "@daily"\ntimezone = "Mars/Olympus"\n',
                        "jobs.etl.timezone")):
        tree.write_jobs(jobs)
        assert main(["check", "--config", str(tree.config_path)]) == 1
        out = capsys.readouterr()
        lines = [ln for ln in (out.out + out.err).splitlines() if word in ln]
        assert len(lines) == 1, (jobs, out)
