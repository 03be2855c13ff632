"""Schedules (SPEC §12): retries, missed runs, stale jobs, reminders, a fallback when a
channel breaks. End to end against local servers; time is passed in as `now`."""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from nomaflowd import events
from nomaflowd.alerts import KINDS
from tests.servers import Reply


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


def test_a_retried_failure_before_its_running_event_keeps_the_long_run_clock(tree, http,
                                                                              inproc):
    """The RUNNING event of a run whose retried FAILED came first still starts its long-run
    clock (the row was made by the FAILED, without a start, and the RUNNING was ignored)."""
    from nomaflowd.db import utcnow

    tree.write_config(tree.webhook("hook", http.url()))
    tree.write_jobs('[jobs.lr.alerts]\nrecipients = ["hook"]\non_long_run_minutes = 10\n')
    d = inproc()
    start = utcnow()
    tree.drop({"job_id": "lr", "run_id": "a1", "state": "FAILED", "attempt": 1,
               "max_attempts": 3, "error": "retry"})
    d.pump()
    tree.drop({"job_id": "lr", "run_id": "a1", "state": "RUNNING", "started_at": stamp(start)})
    d.pump()
    assert d.daemon.poll_long_runs(start + timedelta(minutes=9)) == 0
    assert d.daemon.poll_long_runs(start + timedelta(minutes=11)) == 1
    d.pump(lambda: alerts_of(tree, "long_run"), what="the long-run warning's row")


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


def test_time_zones_work_on_a_host_without_a_zone_database(tree):
    """A sidecar runs on every runner host, minimal containers too, and some have no
    /usr/share/zoneinfo: a schedule in "Europe/Paris" must not be refused as an unknown
    zone there. zoneinfo then reads the zones of the `tzdata` package, which installs with
    nomaflowd. Here PYTHONTZPATH points at an empty directory, as such a host has."""
    import subprocess
    import sys

    tree.write_config(tree.webhook("hook", "http://127.0.0.1:9/"))
    tree.write_jobs('[jobs.etl]\nschedule = "0 2 * * *"\ntimezone = "Europe/Paris"\n')
    empty = tree.root / "no-zoneinfo"
    empty.mkdir()
    done = subprocess.run([sys.executable, "-m", "nomaflowd", "check", "--config",
                           str(tree.config_path)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONTZPATH": str(empty)})
    assert "timezone" not in done.stdout + done.stderr, done.stdout + done.stderr
    assert done.returncode == 0, done.stdout + done.stderr


def next_friday_13th(after: datetime) -> datetime:
    """Midnight (UTC) of the first Friday the 13th strictly after `after`, day by day."""
    day = datetime(after.year, after.month, after.day)
    while day <= after or day.day != 13 or day.weekday() != 4:
        day += timedelta(days=1)
    return day


def test_cron_with_day_of_month_and_day_of_week_needs_both(tree, http, inproc):
    """README: "When both day-of-month and day-of-week are restricted, both must match
    (APScheduler), where crontab takes either": `0 0 13 * 5` is Friday the 13th only."""
    from nomaflowd import timetable
    from nomaflowd.db import utcnow

    s = timetable.parse("0 0 13 * 5", None, "jobs.j")
    # not Friday 2 January 2026, nor Tuesday 13 January 2026 (crontab would take both)
    assert expected(s, utc(2026, 1, 1), 4) == [
        utc(2026, 2, 13), utc(2026, 3, 13), utc(2026, 11, 13), utc(2027, 8, 13)]
    assert expected(timetable.parse("0 0 13 * fri", None, "jobs.j"), utc(2026, 1, 1), 1) == [
        utc(2026, 2, 13)]
    # end to end: the daemon expects the job on the next Friday the 13th and on no other day
    setup_slack(tree, http, '[jobs.fri13]\nschedule = "0 0 13 * 5"\n[jobs.fri13.alerts]\n'
                'on_missed_minutes = 2\nrecipients = ["#ops"]\n')
    d = inproc()
    now0 = utcnow()
    d.daemon.poll_schedules(now0)  # monitoring starts
    f13 = next_friday_13th(now0)
    # every Friday and every 13th before it has passed: nothing was owed on any of them
    assert d.daemon.poll_schedules(f13 - timedelta(minutes=1)) == 0
    assert d.daemon.poll_schedules(f13 + timedelta(minutes=1, seconds=59)) == 0
    assert d.daemon.poll_schedules(f13 + timedelta(minutes=2)) == 1
    d.pump(lambda: alerts_of(tree, "missed"), what="the missed alert's row")
    (text,) = texts(http, "missed")
    assert f"fri13 did not run at {f13:%Y-%m-%d %H:%M:%S}Z: no run started within 2 min" in text


# --- missed, stale, reminders (in-process, `now` passed in) ---------------------------------

def stamp(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def alerts_of(tree: Any, kind: str) -> list[dict[str, Any]]:
    return [r for r in tree.notifications() if r["alert"] == kind]


def texts(http: Any, kind: str) -> list[str]:
    return [r.json()["text"] for r in http.requests
            if r.path.startswith("/slack") and KINDS[kind].icon in r.json()["text"]]


def setup_slack(tree: Any, http: Any, jobs: str) -> None:
    tree.write_config(tree.slack("slack", http.url("/slack")))
    tree.write_jobs(jobs)


def test_missed_once_per_time_and_one_alert_after_downtime(tree, http, inproc):
    from nomaflowd import timetable
    from nomaflowd.db import utcnow

    block = 'schedule = "@every 10m"\n[jobs.{0}.alerts]\non_missed_minutes = 2\n' \
            'recipients = ["#ops"]\n'
    setup_slack(tree, http, "[jobs.quiet]\n" + block.format("quiet")
                + "[jobs.busy]\n" + block.format("busy"))
    d = inproc()
    # The scene is set two hours back: its events' times must not be ahead of the clock
    # (a time more than 5 min ahead is taken as the time the file was read).
    now0 = utcnow() - timedelta(hours=2)
    d.daemon.poll_schedules(now0)  # monitoring starts at the first time after now0
    every = timetable.parse("@every 10m", None, "jobs.x")
    t1 = every.next_after(now0)
    times = expected(every, now0, 5)
    assert times[0] == t1
    tree.drop({"job_id": "busy", "run_id": "b1", "state": "RUNNING", "at": stamp(t1)})
    d.pump()
    assert d.daemon.poll_schedules(t1 + timedelta(minutes=1, seconds=59)) == 0
    assert d.daemon.poll_schedules(t1 + timedelta(minutes=2)) == 1
    assert d.daemon.poll_schedules(t1 + timedelta(minutes=3)) == 0  # once per time
    d.pump(lambda: http.requests, what="missed alert")
    (first,) = texts(http, "missed")
    assert f"quiet did not run at {t1:%Y-%m-%d %H:%M:%S}Z: no run started within 2 min" in first
    # the daemon is away for 45 min: t2..t5 pass; busy ran at each (a late event counts by
    # its `at`), quiet at none of them
    for i, t in enumerate(times[1:], 2):
        tree.drop({"job_id": "busy", "run_id": f"b{i}", "state": "SUCCEEDED",
                   "started_at": stamp(t + timedelta(seconds=30)), "at": stamp(t)})
    d.pump()
    assert d.daemon.poll_schedules(t1 + timedelta(minutes=45)) == 1
    d.pump(lambda: len(alerts_of(tree, "missed")) == 2, what="second missed alert's row")
    second = texts(http, "missed")[1]
    assert f"quiet missed 4 scheduled runs ({times[1]:%Y-%m-%d %H:%M:%S}Z to" \
           f" {times[4]:%Y-%m-%d %H:%M:%S}Z)" in second
    assert [(r["job_id"], r["level"]) for r in alerts_of(tree, "missed")] == [
        ("quiet", "high"), ("quiet", "high")]
    # a restart finds the row where it was left: nothing again for the same times
    d.close()
    d2 = inproc()
    assert d2.daemon.poll_schedules(t1 + timedelta(minutes=45, seconds=30)) == 0


def test_a_run_written_while_the_daemon_was_down_counts_when_it_was_written(tree, http,
                                                                            inproc):
    """README's runners write no `at`. A run that reported while the daemon was down counted
    at the time its file was read, after the restart, and was called missed. The file's
    modification time (when it landed in the spool) stands in for `at`."""
    from nomaflowd import timetable
    from nomaflowd.db import utcnow

    setup_slack(tree, http, '[jobs.nightly]\nschedule = "@every 1h"\n[jobs.nightly.alerts]\n'
                'on_missed_minutes = 15\nrecipients = ["#ops"]\n')
    d = inproc()
    now0 = utcnow() - timedelta(hours=2)
    d.daemon.poll_schedules(now0)
    t1 = timetable.parse("@every 1h", None, "jobs.x").next_after(now0)
    written = (t1 + timedelta(minutes=1)).replace(tzinfo=UTC).timestamp()
    for state in ("RUNNING", "SUCCEEDED"):
        path = tree.drop({"job_id": "nightly", "run_id": "n1", "state": state})
        os.utime(path, (written, written))
    d.pump()
    assert d.daemon.poll_schedules(t1 + timedelta(minutes=20)) == 0
    assert tree.sql("SELECT started_at, finished_at FROM runs") == [
        (f"{t1 + timedelta(minutes=1)}", f"{t1 + timedelta(minutes=1)}")]


def test_nothing_is_expected_while_the_job_is_disabled(tree, http, inproc):
    from nomaflowd import timetable
    from nomaflowd.db import utcnow

    setup_slack(tree, http, '[jobs.etl]\nschedule = "@every 10m"\n[jobs.etl.alerts]\n'
                'on_missed_minutes = 2\non_stale_hours = 1\nrecipients = ["#ops"]\n')
    d = inproc()
    now0 = utcnow()
    d.daemon.poll_schedules(now0)
    tree.drop({"job_id": "etl", "state": "DISABLED", "by": "alice"})
    d.pump()
    assert d.daemon.poll_schedules(now0 + timedelta(hours=5)) == 0
    # enabled again: expected from the next scheduled time after it, not for the pause
    tree.drop({"job_id": "etl", "state": "ENABLED", "at": stamp(now0 + timedelta(hours=5))})
    d.pump()
    every = timetable.parse("@every 10m", None, "jobs.x")
    t = every.next_after(utcnow())
    assert d.daemon.poll_schedules(t + timedelta(minutes=2)) == 1
    assert [r["alert"] for r in tree.notifications()] == []  # not yet recorded
    d.pump(lambda: tree.notifications(), what="missed alert")
    assert [r["alert"] for r in tree.notifications()] == ["missed"]


def test_stale_job_alerts_once_until_the_next_success(tree, http, inproc):
    from prometheus_client import REGISTRY

    from nomaflowd import metrics
    from nomaflowd.db import utcnow

    metrics.enable()  # what a daemon with metrics_listen does; this one has none

    def counted() -> float:
        return REGISTRY.get_sample_value("nomaflowd_schedule_alerts_total",
                                         {"alert": "stale"}) or 0.0

    before = counted()
    setup_slack(tree, http, '[jobs.etl.alerts]\non_stale_hours = 1\nrecipients = ["#ops"]\n')
    d = inproc()
    now0 = utcnow()
    d.daemon.poll_schedules(now0)  # monitoring starts: no success yet, counted from here
    assert d.daemon.poll_schedules(now0 + timedelta(minutes=59)) == 0
    assert d.daemon.poll_schedules(now0 + timedelta(minutes=61)) == 1
    assert d.daemon.poll_schedules(now0 + timedelta(hours=5)) == 0  # once
    d.pump(lambda: http.requests, what="stale alert")
    assert "etl has not succeeded for 61 min (no success since monitoring began)" \
        in texts(http, "stale")[0]
    tree.drop({"job_id": "etl", "run_id": "r1", "state": "SUCCEEDED"})
    d.pump()
    ok = utcnow()
    assert d.daemon.poll_schedules(ok + timedelta(minutes=30)) == 0
    assert d.daemon.poll_schedules(ok + timedelta(minutes=90)) == 1  # re-armed by the success
    # awaited as the user checks it: the audit row (the POST lands a moment before it)
    d.pump(lambda: len(tree.notifications()) == 2, what="second stale alert's row")
    assert "(last success" in texts(http, "stale")[1]
    assert counted() - before == 2
    assert [(r["alert"], r["level"]) for r in tree.notifications()] == [
        ("stale", "medium"), ("stale", "medium")]


def test_reminders_are_capped_and_stop_at_success(tree, http, inproc):
    from nomaflowd.db import utcnow

    tree.write_config(tree.slack("slack", http.url("/slack")) + tree.webhook("hook", http.url()))
    # #ops gets the failures; the hook is refused as a recipient: it never got the failure,
    # so it gets no reminder
    tree.write_jobs('[jobs.etl.alerts]\nremind_every_minutes = 10\nmax_reminders = 2\n'
                    'recipients = ["#ops", "hook"]\n')
    http.replies["/hook"] = Reply(500)
    d = inproc()
    tree.drop({"job_id": "etl", "run_id": "r1", "state": "FAILED", "error": "disk full"})
    d.pump()
    tree.drop({"job_id": "etl", "run_id": "r2", "state": "FAILED", "error": "disk still full"})
    d.pump()
    t0 = utcnow()
    assert d.daemon.poll_schedules(t0 + timedelta(minutes=11)) == 1
    assert d.daemon.poll_schedules(t0 + timedelta(minutes=15)) == 0
    assert d.daemon.poll_schedules(t0 + timedelta(minutes=22)) == 1
    assert d.daemon.poll_schedules(t0 + timedelta(minutes=33)) == 0  # max_reminders
    assert d.daemon.poll_schedules(t0 + timedelta(hours=9)) == 0
    d.pump(lambda: len(alerts_of(tree, "reminder")) == 2, what="two reminders' rows")
    one, two = sorted(texts(http, "reminder"), key=lambda t: "reminder 2" in t)
    assert "etl still failing for 11 min: 2 failed runs (reminder 1 of 2)" in one
    assert "disk still full" in one
    assert "(reminder 2 of 2)" in two
    assert {(r["recipient"], r["outcome"]) for r in alerts_of(tree, "reminder")} == {
        ("#ops", "SENT")}
    # a new episode starts its own reminders; a success ends them
    tree.drop({"job_id": "etl", "run_id": "r3", "state": "SUCCEEDED"})
    tree.drop({"job_id": "etl", "run_id": "r4", "state": "FAILED",
               "at": stamp(utcnow() + timedelta(seconds=1))})
    d.pump()
    t1 = utcnow()
    assert d.daemon.poll_schedules(t1 + timedelta(minutes=11)) == 1
    tree.drop({"job_id": "etl", "run_id": "r5", "state": "SUCCEEDED",
               "at": stamp(utcnow() + timedelta(seconds=2))})
    d.pump()
    assert d.daemon.poll_schedules(t1 + timedelta(minutes=30)) == 0
    d.pump(lambda: len(texts(http, "reminder")) == 3, what="third reminder")
    assert "1 failed run (reminder 1 of 2)" in texts(http, "reminder")[2]


def test_reminder_settings_changed_during_an_episode_apply_to_it(tree, http, inproc):
    """README: "while a failure episode is open ... every remind_every_minutes". Reminders
    turned on, or made more frequent, while a job was already failing waited for the next
    episode (the deadline was set only by the episode's first failure)."""
    from nomaflowd.db import utcnow

    setup_slack(tree, http, '[jobs.etl.alerts]\non_stale_hours = 48\nrecipients = ["#ops"]\n'
                '[jobs.sync.alerts]\nremind_every_minutes = 600\nrecipients = ["#ops"]\n')
    d = inproc()
    for job in ("etl", "sync"):
        tree.drop({"job_id": job, "run_id": "r1", "state": "FAILED", "error": "disk full"})
    d.pump(lambda: len(tree.notifications()) == 2, what="the two failures")
    t0 = utcnow()
    assert d.daemon.poll_schedules(t0 + timedelta(minutes=30)) == 0
    tree.write_jobs('[jobs.etl.alerts]\non_stale_hours = 48\nremind_every_minutes = 60\n'
                    'recipients = ["#ops"]\n'
                    '[jobs.sync.alerts]\nremind_every_minutes = 20\nrecipients = ["#ops"]\n')
    assert d.daemon.poll_schedules(t0 + timedelta(minutes=31)) == 1  # sync: 20 min, overdue
    assert d.daemon.poll_schedules(t0 + timedelta(minutes=45)) == 0
    # etl: its first, at 60 min; sync: its second, 20 min after the first
    assert d.daemon.poll_schedules(t0 + timedelta(minutes=61)) == 2
    d.pump(lambda: len(alerts_of(tree, "reminder")) == 3, what="the three reminders' rows")
    assert sorted(r["job_id"] for r in alerts_of(tree, "reminder")) == ["etl", "sync", "sync"]


def test_events_arriving_late_do_not_end_or_start_an_episode_out_of_order(tree, http, inproc):
    """Events may come in any order: an older success arriving after a newer failure must
    not stop its reminders, an older failure arriving after a newer success must not open an
    episode (the real failure after it then got no reminders), and an older success must not
    make the job look stale."""
    from nomaflowd.db import utcnow

    setup_slack(tree, http, '[jobs.late.alerts]\nremind_every_minutes = 10\n'
                'on_stale_hours = 0.5\nrecipients = ["#ops"]\n'
                '[jobs.lf.alerts]\nremind_every_minutes = 10\nrecipients = ["#ops"]\n')
    d = inproc()
    now = utcnow()
    tree.drop({"job_id": "late", "run_id": "r2", "state": "FAILED", "error": "newer"})
    d.pump()
    tree.drop({"job_id": "late", "run_id": "r1", "state": "SUCCEEDED",
               "started_at": stamp(now - timedelta(minutes=65)),
               "finished_at": stamp(now - timedelta(minutes=60))})
    tree.drop({"job_id": "lf", "run_id": "r2", "state": "SUCCEEDED",
               "finished_at": stamp(now - timedelta(minutes=1))})
    d.pump()
    tree.drop({"job_id": "lf", "run_id": "r1", "state": "FAILED",
               "finished_at": stamp(now - timedelta(minutes=60))})
    d.pump()
    tree.drop({"job_id": "lf", "run_id": "r3", "state": "FAILED", "error": "real"})
    d.pump()
    assert d.daemon.poll_schedules(now + timedelta(minutes=11)) == 2  # a reminder each
    d.pump(lambda: len(alerts_of(tree, "reminder")) == 2, what="both reminders' rows")
    assert sorted(r["job_id"] for r in alerts_of(tree, "reminder")) == ["late", "lf"]
    tree.drop({"job_id": "late", "run_id": "r3", "state": "SUCCEEDED"})
    d.pump()
    tree.drop({"job_id": "late", "run_id": "r0", "state": "SUCCEEDED",
               "finished_at": stamp(now - timedelta(minutes=90))})
    d.pump()
    assert d.daemon.poll_schedules(utcnow() + timedelta(minutes=5)) == 0  # not stale


def test_a_disabled_event_ends_the_reminders(tree, http, inproc):
    """README (reminder): "A success or a DISABLED event ends them"."""
    from nomaflowd.db import utcnow

    setup_slack(tree, http, '[jobs.etl.alerts]\nremind_every_minutes = 10\nmax_reminders = 5\n'
                'recipients = ["#ops"]\n')
    d = inproc()
    tree.drop({"job_id": "etl", "run_id": "r1", "state": "FAILED", "error": "disk full"})
    d.pump()
    t0 = utcnow()
    assert d.daemon.poll_schedules(t0 + timedelta(minutes=11)) == 1
    d.pump(lambda: alerts_of(tree, "reminder"), what="the first reminder's row")
    tree.drop({"job_id": "etl", "state": "DISABLED", "by": "alice"})
    d.pump()
    # without the DISABLED event, reminder 2 of 5 would be due at +21 min
    for later in (22, 33, 44, 60, 9 * 60):
        assert d.daemon.poll_schedules(t0 + timedelta(minutes=later)) == 0, later
    d.pump()
    assert len(alerts_of(tree, "reminder")) == 1
    assert len(texts(http, "reminder")) == 1
    assert "(reminder 1 of 5)" in texts(http, "reminder")[0]


def test_max_reminders_defaults_to_three(tree, http, inproc):
    """README: `max_reminders = 3  # ...at most 3 per failure episode (default 3)`."""
    from nomaflowd.db import utcnow

    setup_slack(tree, http, '[jobs.etl.alerts]\nremind_every_minutes = 10\n'
                'recipients = ["#ops"]\n')
    d = inproc()
    tree.drop({"job_id": "etl", "run_id": "r1", "state": "FAILED", "error": "disk full"})
    d.pump()
    t0 = utcnow()
    for later in (11, 22, 33):
        assert d.daemon.poll_schedules(t0 + timedelta(minutes=later)) == 1, later
    assert d.daemon.poll_schedules(t0 + timedelta(minutes=44)) == 0  # the default cap
    assert d.daemon.poll_schedules(t0 + timedelta(hours=9)) == 0
    d.pump(lambda: len(alerts_of(tree, "reminder")) == 3, what="three reminders' rows")
    d.pump()
    assert len(alerts_of(tree, "reminder")) == 3
    sent = sorted(texts(http, "reminder"), key=lambda t: t.split("(reminder ")[1])
    assert [f"(reminder {n} of 3)" in t for n, t in enumerate(sent, 1)] == [True] * 3


def test_missed_stale_and_reminder_never_reach_pagerduty_or_opsgenie(tree, http, inproc):
    """README: "`missed`, `stale` and `reminder` are not sent to PagerDuty or Opsgenie
    transports (they take `failed`, `long_run` and `recovered`)"."""
    import json

    from nomaflowd.db import utcnow
    from tests.test_incidents import OG_OK, opsgenie, pagerduty, pd_reply

    http.replies["/v2/enqueue"] = pd_reply
    http.replies["/v2/alerts"] = Reply(202, json.dumps(OG_OK).encode())
    tree.write_config(pagerduty(tree, http) + opsgenie(tree, http)
                      + tree.slack("slack", http.url("/slack")))
    tree.write_jobs('[jobs.etl]\nschedule = "@every 10m"\n[jobs.etl.alerts]\n'
                    'on_missed_minutes = 2\non_stale_hours = 1\nremind_every_minutes = 10\n'
                    'recipients = ["pd", "og", "#ops"]\n')
    d = inproc()
    now0 = utcnow()
    d.daemon.poll_schedules(now0)  # monitoring starts
    tree.drop({"job_id": "etl", "run_id": "r1", "state": "FAILED", "error": "disk full"})
    d.pump()
    # the failure reached all three: the incident transports are configured and answering
    assert sorted((r["alert"], r["transport"], r["outcome"]) for r in tree.notifications()) == [
        ("failed", "og", "SENT"), ("failed", "pd", "SENT"), ("failed", "slack", "SENT")]

    def incident_requests() -> list[str]:
        return sorted(r.path for r in http.requests if r.path.startswith("/v2/"))

    assert incident_requests() == ["/v2/alerts", "/v2/enqueue"]
    # an hour later, with no run: missed times, stale after 1 h, a reminder; all come due
    assert d.daemon.poll_schedules(now0 + timedelta(minutes=61)) == 3
    d.pump(lambda: len(tree.notifications()) == 6, what="the three schedule alerts' rows")
    d.pump()
    assert sorted((r["alert"], r["transport"], r["recipient"], r["outcome"])
                  for r in tree.notifications() if r["alert"] != "failed") == [
        ("missed", "slack", "#ops", "SENT"), ("reminder", "slack", "#ops", "SENT"),
        ("stale", "slack", "#ops", "SENT")]
    assert incident_requests() == ["/v2/alerts", "/v2/enqueue"]  # nothing more to either
    assert [len(texts(http, k)) for k in ("missed", "stale", "reminder")] == [1, 1, 1]


def test_a_changed_schedule_starts_monitoring_again(tree, http, inproc):
    """README (missed): "Monitoring starts at the first scheduled time after the daemon first
    sees the schedule (a changed schedule starts again); nothing is owed for the past"."""
    from nomaflowd import timetable
    from nomaflowd.db import utcnow

    alerts = '[jobs.etl.alerts]\non_missed_minutes = 2\nrecipients = ["#ops"]\n'
    setup_slack(tree, http, '[jobs.etl]\nschedule = "@every 10m"\n' + alerts)
    d = inproc()
    now0 = utcnow()
    d.daemon.poll_schedules(now0)  # monitoring of @every 10m starts
    # three hours later, 18 times of the old schedule have passed with no run, when the
    # schedule changes (to times the old one never had: :03 past each hour)
    tree.write_jobs('[jobs.etl]\nschedule = "3 * * * *"\n' + alerts)
    now1 = now0 + timedelta(hours=3)
    assert d.daemon.poll_schedules(now1) == 0  # nothing owed for the old schedule
    t = timetable.parse("3 * * * *", None, "jobs.etl").next_after(now1)
    assert d.daemon.poll_schedules(t + timedelta(minutes=1, seconds=59)) == 0
    assert d.daemon.poll_schedules(t + timedelta(minutes=2)) == 1
    d.pump(lambda: alerts_of(tree, "missed"), what="the missed alert's row")
    (text,) = texts(http, "missed")
    assert f"etl did not run at {t:%Y-%m-%d %H:%M:%S}Z: no run started within 2 min" in text


def test_real_daemon_missed_run_on_a_short_schedule(tree, http, daemon_factory):
    from nomaflowd import timetable
    from nomaflowd.db import utcnow
    from tests.servers import wait_until

    block = ('schedule = "@every 2s"\n[jobs.{0}.alerts]\non_missed_minutes = 0.02\n'
             'recipients = ["hook"]\n')
    tree.write_config(tree.webhook("hook", http.url()))
    tree.write_jobs("[jobs.quiet]\n" + block.format("quiet") + "[jobs.busy]\n"
                    + block.format("busy"))
    d = daemon_factory()
    # busy runs at each of its next 15 scheduled times (its runner says so in `at`)
    for i, t in enumerate(expected(timetable.parse("@every 2s", None, "j"), utcnow(), 15)):
        tree.drop({"job_id": "busy", "run_id": f"b{i}", "state": "RUNNING", "at": stamp(t)})
    wait_until(lambda: len(http.requests) >= 2, timeout=15, what="two missed alerts")
    assert d.stop() == 0
    bodies = [r.json() for r in http.requests]
    assert {(b["job_id"], b["alert"], b["level"]) for b in bodies} == {("quiet", "missed", "high")}
    rows = tree.sql("SELECT job_id, alert, outcome FROM notifications")
    assert set(rows) == {("quiet", "missed", "SENT")}


# --- fallback when a channel breaks ----------------------------------------------------------

def test_failing_webhook_makes_one_fallback_email_and_its_recovery_another(tree, http,
                                                                          daemon_factory):
    from tests.servers import wait_until
    from tests.smtp_server import SmtpRecorder

    smtp = SmtpRecorder()
    try:
        mail = ('[transports.mail]\ntype = "email"\nhost = "127.0.0.1"\n'
                f'port = {smtp.port}\ntls = "none"\ndefault_from = "nomaflow@corp.test"\n')
        tree.write_config(tree.webhook("hook", http.url()) + mail,
                          daemon='fallback_recipients = ["ops@corp.test", "hook"]')
        tree.write_jobs('[defaults.alerts]\nrecipients = ["hook"]\n')
        http.default = Reply(500, b"upstream exploded")
        d = daemon_factory()
        for job in ("sales-sync", "billing", "crm-export", "fourth"):
            tree.drop({"job_id": job, "run_id": f"{job}-1", "state": "FAILED"})
        wait_until(lambda: smtp.messages, what="the fallback email")
        wait_until(lambda: len(http.requests) == 4, what="four webhook attempts")
        (msg,) = smtp.messages
        assert msg.rcpt_tos == ["ops@corp.test"]
        assert msg.message["Subject"] == "[Nomaflow] TRANSPORT FAILING hook"
        text = msg.part("text/plain")
        assert "transport hook failed 3 times in a row" in text
        assert "HTTP 500" in text
        named = [job for job in ("sales-sync", "billing", "crm-export", "fourth")
                 if f"{job}/{job}-1 failed" in text]
        assert len(named) == 3  # the three of the streak when it was raised
        # the webhook is back: its next SENT tells the same people, once
        http.default = Reply(200)
        tree.drop({"job_id": "billing", "run_id": "billing-2", "state": "FAILED"})
        tree.drop({"job_id": "billing", "run_id": "billing-3", "state": "FAILED"})
        wait_until(lambda: len(smtp.messages) == 2, what="the restored email")
        wait_until(lambda: len(http.requests) == 6, what="six webhook attempts")
        restored = smtp.messages[1]
        assert restored.message["Subject"].startswith("[Nomaflow] TRANSPORT RESTORED")
        assert "transport hook delivers again after 4 failed attempts" in restored.part(
            "text/plain")
        assert d.stop() == 0
    finally:
        smtp.close()
    rows = tree.sql("SELECT alert, transport, recipient, outcome, level, job_id FROM"
                    " notifications WHERE alert LIKE 'transport%' ORDER BY id")
    assert rows == [("transport_failing", "mail", "ops@corp.test", "SENT", "high", None),
                    ("transport_restored", "mail", "ops@corp.test", "SENT", "low", None)]
    streak = "SELECT failures, alerted_at FROM transport_streaks WHERE transport = 'hook'"
    assert tree.sql(streak) == [(0, None)]
    assert len(smtp.messages) == 2


def test_a_transport_back_without_fallback_recipients_logs_no_error(tree, http, inproc,
                                                                      caplog):
    """With no daemon.fallback_recipients the failing side is one WARNING (nobody is told);
    the transport's return logged an ERROR `no fallback recipient is on a transport other
    than hook; nobody else can be told`, as if something were misconfigured."""
    caplog.set_level(logging.INFO, logger="nomaflowd")
    answers = iter([Reply(500)] * 3)
    http.replies["/hook"] = lambda req: next(answers, Reply(200, b"ok"))
    tree.write_config(tree.webhook("hook", http.url()))
    d = inproc()
    for i in range(4):
        tree.drop({"job_id": "etl", "run_id": f"r{i}", "state": "FAILED"})
        d.pump(lambda n=i + 1: len(tree.notifications()) == n, what="the row")
    assert [r["outcome"] for r in tree.notifications()] == ["FAILED_DELIVERY"] * 3 + ["SENT"]
    assert "no daemon.fallback_recipients: nobody is told that hook is failing" in caplog.text
    assert "transport hook delivers again after 3 failed attempt(s)" in caplog.text
    assert "ERROR" not in caplog.text


def test_a_job_gone_for_longer_than_the_retention_is_no_longer_watched(tree, http, inproc):
    """With [defaults.alerts] watching every job, each job id ever seen kept its schedules
    row for good, and every reload re-armed them all (4 s at 100,000 rows). The daily
    retention forgets the rows of jobs jobs.toml does not name once they have been silent
    that long; a job that comes back is watched again from then."""
    from nomaflowd.db import utcnow

    setup_slack(tree, http, '[defaults.alerts]\non_stale_hours = 24\nrecipients = ["#ops"]\n'
                '[jobs.named.alerts]\non_stale_hours = 24\n')
    d = inproc()
    for job in ("named", "gone", "recent"):
        tree.drop({"job_id": job, "run_id": "r1", "state": "SUCCEEDED"})
    d.pump()
    old = utcnow() - timedelta(days=200)
    tree.sql("UPDATE schedules SET last_run_at = ?, monitored_since = ? WHERE job_id != 'recent'",
             str(old), str(old))
    d.daemon.prune_job()
    assert sorted(r[0] for r in tree.sql("SELECT job_id FROM schedules")) == ["named", "recent"]


def test_recipients_a_runner_may_not_name_do_not_count_against_the_transport(tree, http,
                                                                            inproc):
    """A refused recipient is never sent: it says nothing of the channel. Three of them in a
    row made a runner page the fallback about a healthy transport."""
    http.default = Reply(200, b"ok")
    tree.write_config(tree.slack("slack", http.url("/slack"), 'default_channel = "#a"')
                      + tree.webhook("hook", http.url("/hook")),
                      daemon='fallback_recipients = ["hook"]\nfallback_after_failures = 2\n'
                             'event_recipients = ["#ok-*"]')
    d = inproc()
    for i in range(3):
        tree.drop({"job_id": "n", "state": "NOTICE", "message": f"m{i}",
                   "recipients": [f"#bad{i}"]})
    d.pump(lambda: len(tree.notifications()) == 3, what="three refused rows")
    tree.drop({"job_id": "n", "state": "NOTICE", "message": "fine", "recipients": ["#ok-n"]})
    d.pump(lambda: len(tree.notifications()) == 4, what="the allowed notice's row")
    assert [r.path for r in http.requests] == ["/slack"]  # no fallback page to /hook
    assert [(r["recipient"], r["outcome"]) for r in tree.notifications()] == [
        ("#bad0", "FAILED_TRANSPORT"), ("#bad1", "FAILED_TRANSPORT"),
        ("#bad2", "FAILED_TRANSPORT"), ("#ok-n", "SENT")]


# --- two replicas on PostgreSQL ----------------------------------------------------------------

@pytest.mark.postgres
def test_two_replicas_send_each_missed_and_each_reminder_once(tree, http, pg_schema, tmp_path):
    from tests.conftest import DaemonProcess, replica_tree
    from tests.servers import wait_until
    from tests.test_replicas import pg_rows

    tree.database = pg_schema
    b_tree = replica_tree(tmp_path / "b", tree, pg_schema)
    jobs = ('[jobs.quiet]\nschedule = "@every 2s"\n[jobs.quiet.alerts]\n'
            'on_missed_minutes = 0.01\nrecipients = ["hook"]\n'
            '[jobs.broken.alerts]\nremind_every_minutes = 0.02\nmax_reminders = 3\n'
            'recipients = ["hook"]\n')
    for t, name in ((tree, "a"), (b_tree, "b")):
        t.write_config(t.webhook("hook", http.url()), daemon=f'replica_id = "{name}"')
        t.write_jobs(jobs)
    a, b = DaemonProcess(tree).start(), DaemonProcess(b_tree).start()
    try:
        event = {"job_id": "broken", "run_id": "r1", "state": "FAILED"}
        tree.drop(event)
        b_tree.drop(event)

        def sent(kind: str) -> int:
            return sum(1 for r in http.requests if r.json()["alert"] == kind)

        wait_until(lambda: sent("reminder") == 3 and sent("missed") >= 3, timeout=20,
                   what="three reminders and three missed alerts")
        after = pg_rows(pg_schema, "SELECT now() AT TIME ZONE 'UTC'")[0][0]
        wait_until(lambda: pg_rows(pg_schema, "SELECT count(*) FROM replicas WHERE seen_at > "
                                   f"'{after}'")[0][0] == 2, what="both replicas polled")
        assert a.stop() == 0 and b.stop() == 0
    finally:
        a.close()
        b.close()
    keys = [k for (k,) in pg_rows(pg_schema, "SELECT alert_key FROM deliveries WHERE alert_key"
                                  " LIKE %s OR alert_key LIKE %s", "5:quiet/6:missed/%",
                                  "6:broken/8:reminder/%")]
    assert sent("reminder") == 3 == sum(1 for k in keys if "/8:reminder/" in k)
    assert sent("missed") == sum(1 for k in keys if "/6:missed/" in k)
    assert sent("failed") == 1
    rows = pg_rows(pg_schema, "SELECT alert, count(*), count(DISTINCT replica) FROM"
                   " notifications GROUP BY alert ORDER BY alert")
    assert {r[0] for r in rows} == {"failed", "missed", "reminder"}


# --- surfaces ------------------------------------------------------------------------------------

def test_explain_and_the_page_show_next_expected_last_run_and_lateness(tree, http, inproc,
                                                                       capsys, tmp_path):
    import json
    import urllib.request

    from nomaflowd.cli import main
    from nomaflowd.db import utcnow

    tree.write_config(tree.webhook("hook", http.url()), daemon='web_listen = "127.0.0.1:0"')
    tree.write_jobs('[jobs.etl]\nschedule = "@every 10m"\n[jobs.etl.alerts]\n'
                    'on_missed_minutes = 2\non_stale_hours = 26\nrecipients = ["hook"]\n'
                    '[jobs.nightly]\nschedule = "0 2 * * *"\ntimezone = "Europe/Paris"\n')
    d = inproc()
    tree.drop({"job_id": "etl", "run_id": "r7", "state": "SUCCEEDED"})
    d.pump()
    d.daemon.poll_schedules(utcnow())
    page = urllib.request.urlopen(d.daemon.web.url, timeout=5).read().decode()
    assert "<h2>Schedules</h2>" in page
    assert "@every 10m (UTC)" in page and "0 2 * * * (Europe/Paris)" in page
    assert "r7 (SUCCEEDED)" in page
    # the job is late once its expected time plus on_missed_minutes has passed
    row = tree.sql("SELECT expected_at FROM schedules WHERE job_id = 'etl'")[0][0]
    tree.sql("UPDATE schedules SET expected_at = datetime(?, '-1 hour') WHERE job_id = 'etl'",
             row)
    page = urllib.request.urlopen(d.daemon.web.url, timeout=5).read().decode()
    assert "late</span>" in page
    d.close()
    event = tmp_path / "e.json"
    event.write_text(json.dumps({"job_id": "etl", "run_id": "r8", "state": "RUNNING"}))
    assert main(["explain", "--config", str(tree.config_path), str(event)]) == 0
    out = capsys.readouterr().out
    assert "schedule: @every 10m (UTC); next expected " in out
    assert "last run r7 (SUCCEEDED, received " in out
    assert "late: LATE" in out
    assert "stale alert after 26 h without a success" in out


def test_check_warns_when_on_missed_minutes_is_shorter_than_the_usual_start_delay(
        tree, http, inproc, capsys):
    from nomaflowd.cli import main

    tree.write_config(tree.webhook("hook", http.url()), daemon='fallback_recipients = ["hook"]')
    tree.write_jobs('[jobs.nightly]\nschedule = "0 2 * * *"\n'
                    '[jobs.nightly.alerts]\non_missed_minutes = 5\n'
                    '[jobs.prompt]\nschedule = "0 2 * * *"\n'
                    '[jobs.prompt.alerts]\non_missed_minutes = 5\n')
    d = inproc()
    for day in range(1, 6):  # nightly starts 20 min late, prompt 1 min late
        for job, late in (("nightly", 20), ("prompt", 1)):
            tree.drop({"job_id": job, "run_id": f"{job}-{day}", "state": "SUCCEEDED",
                       "started_at": f"2026-05-0{day}T02:{late:02d}:00Z",
                       "finished_at": f"2026-05-0{day}T02:40:00Z"})
    d.pump()
    d.close()
    assert main(["check", "--config", str(tree.config_path)]) == 0
    out = capsys.readouterr().out
    assert ("warning: jobs.nightly.alerts.on_missed_minutes is 5, but nightly usually starts"
            " 20 min after its scheduled time (median of its last 5 runs)") in out
    assert "jobs.prompt.alerts.on_missed_minutes" not in out


def test_check_reports_a_fallback_recipient_that_matches_no_transport(tree, capsys):
    from nomaflowd.cli import main

    tree.write_config(tree.webhook("hook", "https://hooks.example/x"),
                      daemon='fallback_recipients = ["#ops"]')
    assert main(["check", "--config", str(tree.config_path)]) == 1
    assert "error: daemon.fallback_recipients: no slack transport is configured" \
        in capsys.readouterr().out


def test_a_time_near_year_9999_on_a_scheduled_job_is_recorded(tree, http, inproc):
    """An event may say it finished at 9999-12-31T23:00:00Z. It used to be quarantined as a
    value the database cannot store; now it is recorded, at the time it was read (a clock
    that far ahead is wrong), and the stale check at the end of year 9999 finds the job
    stale without overflowing."""
    setup_slack(tree, http, '[jobs.nightly]\nschedule = "@daily"\n[jobs.nightly.alerts]\n'
                'on_stale_hours = 26\nremind_every_minutes = 60\nrecipients = ["#ops"]\n')
    d = inproc()
    tree.drop({"job_id": "nightly", "run_id": "1", "state": "SUCCEEDED",
               "finished_at": "9999-12-31T23:00:00Z"})
    tree.drop({"job_id": "nightly", "run_id": "2", "state": "FAILED",
               "finished_at": "9999-12-31T23:30:00Z"})
    d.pump(lambda: len(tree.notifications()) == 1, what="the failure's row")
    assert [n for n in os.listdir(tree.spool / "rejected") if not n.startswith(".")] == [], \
        [p.read_text() for p in (tree.spool / "rejected").glob("*.error")]
    assert sorted(tree.sql("SELECT run_id, state FROM events")) == [
        ("1", "SUCCEEDED"), ("2", "FAILED")]
    assert d.daemon.poll_schedules(datetime(9999, 12, 31, 23, 59)) == 1


def test_a_parked_cron_that_never_fires_breaks_no_other_job(tree, http, inproc):
    """`0 0 31 2 *` (31 February) is how a cron job is parked. With on_missed_minutes it
    overflowed every poll (no missed, stale or reminder alert for any job) and quarantined
    the parked job's own FAILED event as a value the database cannot store."""
    from nomaflowd.db import utcnow

    setup_slack(tree, http, '[jobs.parked]\nschedule = "0 0 31 2 *"\n[jobs.parked.alerts]\n'
                'on_missed_minutes = 15\nrecipients = ["#ops"]\n'
                '[jobs.hourly]\nschedule = "@every 1h"\n[jobs.hourly.alerts]\n'
                'on_missed_minutes = 5\nrecipients = ["#ops"]\n')
    d = inproc()
    d.daemon.poll_schedules(utcnow() - timedelta(hours=3))  # watched for three hours
    tree.drop({"job_id": "parked", "run_id": "p1", "state": "FAILED", "error": "boom"})
    d.pump(lambda: len(tree.notifications()) == 1, what="the parked job's failure")
    assert [n for n in os.listdir(tree.spool / "rejected") if not n.startswith(".")] == []
    d.daemon.poll_schedules(utcnow())
    d.pump(lambda: len(tree.notifications()) == 2, what="the hourly job's missed alert")
    assert [(r["job_id"], r["alert"]) for r in tree.notifications()] == [
        ("parked", "failed"), ("hourly", "missed")]
