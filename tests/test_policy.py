"""Who hears about what: catalogue resolution, recipients, tag routing, every alert kind."""

from __future__ import annotations

import json
import signal
from datetime import timedelta
from pathlib import Path

import pytest

from nomaflowd import catalogue, db
from nomaflowd.catalogue import AlertsBlock, Catalogue
from nomaflowd.cli import main
from nomaflowd.config import Rule, TransportConfig
from nomaflowd.routing import Router
from tests.servers import wait_until

TRANSPORTS = {
    "slack": TransportConfig("slack", "slack", {"default_channel": "#nomaflow-alerts"}),
    "email": TransportConfig("email", "email", {"default_from": "Nomaflow <nomaflow@corp.local>"}),
    "opsgenie-data": TransportConfig("opsgenie-data", "webhook", {}),
}


@pytest.mark.parametrize(("written", "transport", "recipient"), [
    ("#data-oncall", "slack", "#data-oncall"),
    ("#Data-Team", "slack", "#data-team"),
    ("@Alice", "slack", "@alice"),
    ("data-team@corp.local", "email", "data-team@corp.local"),
    ("Data Team <Data-Team@Corp.Local>", "email", "data-team@corp.local"),
    ("opsgenie-data", "opsgenie-data", "opsgenie-data"),
    ("slack:#builds", "slack", "#builds"),
    ("email", "email", "nomaflow@corp.local"),
])
def test_recipient_classification(written, transport, recipient):
    target = Router(TRANSPORTS, ()).classify(written, "alerts")
    assert (target.transport, target.recipient, target.error) == (transport, recipient, "")


@pytest.mark.parametrize(("written", "reason"), [
    ("pagerduty-x", "matches no transport"),
    ("not an address@", "matches no transport"),
    ("slack:nochannel", "is not a slack recipient"),
])
def test_unmatched_recipient_says_why(written, reason):
    target = Router(TRANSPORTS, ()).classify(written, "alerts")
    assert target.transport == "" and reason in target.error


def test_two_transports_of_a_type_need_a_prefix():
    transports = {**TRANSPORTS, "slack-eng": TransportConfig("slack-eng", "slack", {})}
    router = Router(transports, ())
    assert "several slack transports" in router.classify("#builds", "alerts").error
    assert router.classify("slack-eng:#Builds", "alerts").recipient == "#builds"


def test_plan_merges_block_tag_rules_and_tagless_rules_then_deduplicates():
    rules = (Rule("team-data", ("#data-team",)), Rule("team-sec", ("sec@corp.local",)),
             Rule(None, ("#nomaflow-alerts",)))
    plan = Router(TRANSPORTS, rules).plan(["#Data-Team", "#data-team"], ["team-data", "etl"])
    assert [(t.transport, t.recipient) for t in plan.targets] == [
        ("slack", "#data-team"), ("slack", "#nomaflow-alerts")]
    assert len(plan.duplicates) == 2


def test_empty_recipients_means_every_transport_default():
    plan = Router(TRANSPORTS, ()).plan([], [])
    assert [(t.transport, t.recipient) for t in plan.targets] == [
        ("slack", "#nomaflow-alerts"), ("email", "nomaflow@corp.local"),
        ("opsgenie-data", "opsgenie-data")]


def test_effective_block_first_found_wins():
    job = AlertsBlock(on_success=True)
    default = AlertsBlock(on_failure=False)
    cat = Catalogue(jobs_alerts={"a": job}, jobs_tags={"a": ("t",)}, default_alerts=default)
    own = AlertsBlock(on_cancel=True)
    assert cat.effective("a", own, ("x",)).alerts is own
    assert cat.effective("a", own, ("x",)).alerts_origin == "event"
    assert cat.effective("a").alerts is job and cat.effective("a").tags == ("t",)
    assert cat.effective("b").alerts is default and cat.effective("b").alerts_origin == "defaults"
    builtin = Catalogue().effective("b")
    assert builtin.alerts == AlertsBlock(on_failure=True, recipients=())
    assert builtin.alerts_origin == "built-in"


def test_catalogue_ignores_other_keys_and_refuses_url_recipients():
    cat = catalogue.parse({"jobs": {"j": {"schedule": "* * * * *", "steps": [1],
                                          "alerts": {"recipients": ["#x"]}}}})
    assert cat.jobs_alerts["j"].recipients == ("#x",)
    with pytest.raises(Exception, match="URL"):
        catalogue.parse({"jobs": {"j": {"alerts": {"recipients": ["https://hooks.x/y"]}}}})


def test_broken_catalogue_keeps_the_last_good_one(tmp_path, caplog):
    path = tmp_path / "jobs.toml"
    path.write_text('[jobs.j.alerts]\nrecipients = ["#one"]\n')
    watched = catalogue.WatchedCatalogue(path)
    path.write_text("[jobs.j.alerts\nbroken")
    assert watched.refresh().jobs_alerts["j"].recipients == ("#one",)
    assert "keeping the last good one" in caplog.text
    path.write_text('[jobs.j.alerts]\nrecipients = ["#two"]\n')
    assert watched.refresh().jobs_alerts["j"].recipients == ("#two",)


# --- end to end with the real daemon -----------------------------------------------------

def slack_channels(http):
    return sorted(r.json().get("channel", "") for r in http.requests if r.path == "/slack")


def test_tagged_job_with_rules_gets_exactly_two_slack_deliveries(tree, http, daemon_factory):
    tree.write_config(tree.slack("slack", http.url("/slack"))
                      + '[[routing]]\ntag = "team-data"\nrecipients = ["#data-team"]\n'
                      + '[[routing]]\nrecipients = ["#nomaflow-alerts"]\n')
    tree.write_jobs('[jobs.sync]\ntags = ["team-data", "etl"]\n[jobs.sync.alerts]\n'
                    'recipients = ["#Data-Team", "#data-team"]\n')
    d = daemon_factory()
    tree.drop({"job_id": "sync", "run_id": "r1", "state": "FAILED", "error": "boom"})
    wait_until(lambda: len(tree.notifications()) == 2, what="two audit rows")
    assert d.stop() == 0
    assert slack_channels(http) == ["#data-team", "#nomaflow-alerts"]


def test_success_cancel_toggle_are_opt_in_and_on_failure_false_silences(tree, http, inproc):
    tree.write_config(tree.webhook("hook", http.url()))
    tree.write_jobs("[jobs.loud.alerts]\non_success = true\non_cancel = true\non_toggle = true\n"
                    "[jobs.quiet.alerts]\non_failure = false\n")
    d = inproc()
    for job in ("loud", "quiet", "plain"):
        tree.drop({"job_id": job, "run_id": f"{job}-1", "state": "SUCCEEDED"})
        tree.drop({"job_id": job, "run_id": f"{job}-2", "state": "CANCELLED", "by": "bob"})
        tree.drop({"job_id": job, "state": "DISABLED", "by": "bob"})
        tree.drop({"job_id": job, "state": "ENABLED", "by": "bob"})
        tree.drop({"job_id": job, "run_id": f"{job}-3", "state": "FAILED"})
    d.pump()
    got = sorted((r.json()["job_id"], r.json()["alert"], r.json()["level"]) for r in http.requests)
    assert got == sorted([
        ("loud", "succeeded", "low"), ("loud", "cancelled", "low"), ("loud", "disabled", "low"),
        ("loud", "enabled", "low"), ("loud", "failed", "high"), ("plain", "failed", "high")])
    rows = tree.notifications()
    assert sorted((r["job_id"], r["alert"], r["level"]) for r in rows) == got


def test_editing_jobs_toml_changes_recipients_without_restart(tree, http, daemon_factory):
    tree.write_config(tree.slack("slack", http.url("/slack")))
    tree.write_jobs('[jobs.j.alerts]\nrecipients = ["#first"]\n')
    daemon_factory()
    tree.drop({"job_id": "j", "run_id": "r1", "state": "FAILED"})
    http.wait_for(1)
    tree.write_jobs('[jobs.j.alerts]\nrecipients = ["#second"]\n')
    tree.drop({"job_id": "j", "run_id": "r2", "state": "FAILED"})
    http.wait_for(2)
    assert slack_channels(http) == ["#first", "#second"]


def test_unmatched_recipient_is_a_failed_row_and_others_still_get_it(tree, http, inproc):
    tree.write_config(tree.webhook("hook", http.url()))
    tree.write_jobs('[jobs.j.alerts]\nrecipients = ["hook", "#nobody-has-slack"]\n')
    d = inproc()
    tree.drop({"job_id": "j", "run_id": "r1", "state": "FAILED"})
    d.pump()
    rows = {r["recipient"]: r for r in tree.notifications()}
    assert rows["hook"]["outcome"] == "SENT"
    assert rows["#nobody-has-slack"]["outcome"] == "FAILED_TRANSPORT"
    assert "no slack transport" in rows["#nobody-has-slack"]["detail"]


def ago(minutes: float) -> str:
    return (db.utcnow() - timedelta(minutes=minutes)).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_long_run_warning_fires_from_the_running_daemon(tree, http, daemon_factory):
    tree.write_config(tree.webhook("hook", http.url()))
    tree.write_jobs("[jobs.etl.alerts]\non_long_run_minutes = 30\n")
    d = daemon_factory()
    tree.drop({"job_id": "etl", "run_id": "late", "state": "RUNNING", "started_at": ago(31)})
    body = http.wait_for(1)[0].json()
    assert (body["alert"], body["level"], body["run_id"]) == ("long_run", "medium", "late")
    assert body["state"] == "RUNNING"
    wait_until(lambda: len(tree.notifications()) == 1, what="audit row")
    assert d.stop() == 0
    assert tree.sql("SELECT state, long_run_alerted_at IS NOT NULL FROM runs") == [("RUNNING", 1)]


FAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")


@pytest.mark.skipif(not FAKETIME.exists(), reason="libfaketime is not installed (.ci/run"
                    " installs Debian's faketime)")
def test_a_wall_clock_stepped_back_does_not_stop_the_poll(tree, http, daemon_factory):
    """An NTP step or a restored VM moves the wall clock back 3 h: APScheduler, timing the
    poll on it, waited 3 h (no long-run warning, no schedule check, no heartbeat, and
    /healthz said ok). The daemon sees the step and polls again from then."""
    clock = tree.root / "faketime"
    clock.write_text("+0\n")
    tree.write_config(tree.webhook("hook", http.url()),
                      daemon="poll_seconds = 1\nmetrics_listen = \"127.0.0.1:0\"")
    tree.write_jobs("[jobs.etl.alerts]\non_long_run_minutes = 1\n")
    d = daemon_factory({"LD_PRELOAD": str(FAKETIME), "FAKETIME_TIMESTAMP_FILE": str(clock),
                        "FAKETIME_NO_CACHE": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1"})
    wait_until(lambda: "nomaflowd started" in d.output(), what="the start")
    clock.write_text("-10800\n")  # 3 h back
    tree.drop({"job_id": "etl", "run_id": "late", "state": "RUNNING",
               "started_at": ago(180 + 2)})  # 2 min ago by the daemon's clock
    body = http.wait_for(1, timeout=20)[0].json()
    assert (body["alert"], body["run_id"]) == ("long_run", "late")
    assert "the wall clock stepped back by 3 h; the poll starts again from now" in d.output()
    assert d.stop() == 0


@pytest.mark.skipif(not FAKETIME.exists(), reason="libfaketime is not installed (.ci/run"
                    " installs Debian's faketime)")
def test_a_wall_clock_far_ahead_for_a_moment_does_not_prune_the_history(tree, http,
                                                                       daemon_factory):
    """190 days ahead: the daily retention, overdue by that clock, ran at once and deleted
    the whole history for good."""
    clock = tree.root / "faketime"
    clock.write_text("+0\n")
    tree.write_config(tree.webhook("hook", http.url()))
    d = daemon_factory({"LD_PRELOAD": str(FAKETIME), "FAKETIME_TIMESTAMP_FILE": str(clock),
                        "FAKETIME_NO_CACHE": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1"})
    tree.drop({"job_id": "etl", "run_id": "r1", "state": "FAILED"})
    wait_until(lambda: tree.notifications(), what="the audit row")
    clock.write_text(f"+{190 * 86400}\n")
    wait_until(lambda: "retention skipped today: the wall clock moved forward by 190 days"
               in d.output(), what="the retention's refusal")
    clock.write_text("+0\n")
    assert [r["run_id"] for r in tree.notifications()] == ["r1"]
    assert tree.sql("SELECT run_id FROM events") == [("r1",)]
    assert d.stop() == 0


def test_a_wall_clock_stepped_forward_fires_the_timers_once_not_per_skipped_tick():
    """APScheduler's own interval walked every tick a step skipped before coalescing them:
    5 million for the 1 s checkpoint after a 60-day step (5 s of CPU, 285 MB)."""
    from datetime import UTC, datetime

    from nomaflowd.daemon import every

    last = datetime(2026, 1, 1, tzinfo=UTC)
    now = last + timedelta(days=60)
    assert now < every(1).get_next_fire_time(last, now) <= now + timedelta(seconds=1)
    assert every(1).get_next_fire_time(last, last) == last + timedelta(seconds=1)


def test_a_reload_applies_a_new_poll_interval(tree, http, daemon_factory):
    """README: SIGHUP rereads the config; a new poll_seconds used to be logged as reloaded
    and then ignored (the poll kept its old interval: no long-run warning for 30 s)."""
    tree.write_jobs("[jobs.etl.alerts]\non_long_run_minutes = 30\n")
    tree.write_config(tree.webhook("hook", http.url()), daemon="poll_seconds = 600")
    d = daemon_factory()
    wait_until(lambda: "nomaflowd started" in d.output(), what="the start")
    tree.write_config(tree.webhook("hook", http.url()), daemon="poll_seconds = 0.2")
    d.signal(signal.SIGHUP)
    wait_until(lambda: "reloaded" in d.output(), what="the reload")
    tree.drop({"job_id": "etl", "run_id": "late", "state": "RUNNING", "started_at": ago(31)})
    body = http.wait_for(1, timeout=20)[0].json()
    assert (body["alert"], body["run_id"]) == ("long_run", "late")
    assert d.stop() == 0


def test_long_run_warns_once_across_polls_and_restart(tree, http, inproc):
    tree.write_config(tree.webhook("hook", http.url()))
    tree.write_jobs("[jobs.etl.alerts]\non_long_run_minutes = 30\n")
    d = inproc()
    tree.drop({"job_id": "etl", "run_id": "late", "state": "RUNNING", "started_at": ago(31)})
    tree.drop({"job_id": "etl", "run_id": "early", "state": "RUNNING", "started_at": ago(5)})
    tree.drop({"job_id": "etl", "run_id": "done", "state": "RUNNING", "started_at": ago(40)})
    tree.drop({"job_id": "etl", "run_id": "done", "state": "SUCCEEDED"})
    d.pump()
    now = db.utcnow()
    polls = [d.daemon.poll_long_runs(now) for _ in range(3)]
    d.pump()
    assert polls in ([1, 0, 0], [0, 0, 0])  # the scheduler's own first poll may have won
    d.close()
    again = inproc()
    assert again.daemon.poll_long_runs(db.utcnow()) == 0
    assert again.daemon.poll_long_runs(db.utcnow() + timedelta(minutes=26)) == 1  # early
    again.pump()
    assert sorted(r.json()["run_id"] for r in http.requests) == ["early", "late"]
    assert sorted(r["run_id"] for r in tree.notifications()) == ["early", "late"]


def test_a_changed_threshold_applies_to_the_runs_already_running(tree, http, inproc):
    """README: jobs.toml is followed as it changes. A run's deadline was fixed when its
    RUNNING event came: lowering the threshold warned no run already running, and removing
    it still warned at the old deadline. The deadlines follow the catalogue in force."""
    tree.write_config(tree.webhook("hook", http.url()))
    tree.write_jobs("[jobs.etl.alerts]\non_long_run_minutes = 60\n"
                    "[jobs.sync.alerts]\non_long_run_minutes = 60\n")
    d = inproc()
    for job in ("etl", "sync"):
        tree.drop({"job_id": job, "run_id": "r1", "state": "RUNNING", "started_at": ago(10)})
    tree.drop({"job_id": "etl", "run_id": "own", "state": "RUNNING", "started_at": ago(10),
               "alerts": {"on_long_run_minutes": 120}})  # the event's own threshold holds
    d.pump()
    assert d.daemon.poll_long_runs(db.utcnow()) == 0
    tree.write_jobs("[jobs.etl.alerts]\non_long_run_minutes = 5\n[jobs.sync]\n")
    now = db.utcnow()
    assert d.daemon.poll_long_runs(now) == 1  # etl r1: 10 min against 5
    assert d.daemon.poll_long_runs(now + timedelta(minutes=90)) == 0  # sync: none any more
    d.pump()
    assert [(r.json()["job_id"], r.json()["run_id"]) for r in http.requests] == [("etl", "r1")]
    assert d.daemon.poll_long_runs(now + timedelta(minutes=111)) == 1  # etl own, at 120 min


@pytest.mark.parametrize("gone", ["removed", "emptied", "dangling symlink"])
def test_a_jobs_toml_gone_or_emptied_keeps_the_last_good_catalogue(tree, http, inproc, caplog,
                                                                  gone):
    """A jobs.toml removed, emptied (an editor's truncate, then write) or a symlink to
    nothing became an empty catalogue, said only as `reloaded`: every job's alerts went to
    every transport's default recipient, and `writers` no longer applied."""
    tree.write_config(tree.webhook("pager", http.url("/pager"))
                      + tree.webhook("everyone", http.url("/everyone")))
    tree.write_jobs('[jobs.secret-job.alerts]\nrecipients = ["pager"]\n')
    d = inproc()
    d.pump()
    if gone == "removed":
        tree.jobs_path.unlink()
    elif gone == "emptied":
        tree.jobs_path.write_text("")
    else:
        tree.jobs_path.unlink()
        tree.jobs_path.symlink_to(tree.root / "nowhere.toml")
    tree.drop({"job_id": "secret-job", "run_id": "r1", "state": "FAILED"})
    d.pump(lambda: tree.notifications(), what="the failure's row")
    assert [r.path for r in http.requests] == ["/pager"]
    assert "keeping the last good one" in caplog.text
    tree.write_jobs("# no jobs: the built-in policy for all\n")  # what a file says on purpose
    tree.drop({"job_id": "secret-job", "run_id": "r2", "state": "FAILED"})
    d.pump(lambda: len(tree.notifications()) == 3, what="the next failure's rows")
    assert sorted(r.path for r in http.requests) == ["/everyone", "/pager", "/pager"]


def test_late_running_event_for_finished_run_changes_nothing(tree, http, inproc):
    tree.write_config(tree.webhook("hook", http.url()))
    tree.write_jobs("[jobs.etl.alerts]\non_long_run_minutes = 1\n")
    d = inproc()
    tree.drop({"job_id": "etl", "run_id": "r", "state": "SUCCEEDED"})
    d.pump()
    tree.drop({"job_id": "etl", "run_id": "r", "state": "RUNNING", "started_at": ago(90)})
    d.pump()
    assert d.daemon.poll_long_runs(db.utcnow()) == 0
    assert tree.sql("SELECT state FROM runs") == [("SUCCEEDED",)]
    assert http.requests == []


def test_explain_and_check_never_create_a_database(tree, http, capsys, tmp_path):
    """README: `explain` and `check` read the database when it exists; they never create
    one (a dry run on a host where the daemon has not run yet leaves nothing behind)."""
    tree.write_config(tree.slack("slack", http.url("/slack")))
    event = tmp_path / "e.json"
    event.write_text(json.dumps({"job_id": "sync", "run_id": "r1", "state": "FAILED"}))
    assert main(["explain", "--config", str(tree.config_path), str(event)]) == 0
    assert main(["check", "--config", str(tree.config_path)]) == 0
    assert "-> slack" in capsys.readouterr().out
    assert not tree.db_path.exists()
    assert not http.requests


def test_explain_shows_block_origin_rules_dedup_and_payload(tree, http, capsys, tmp_path):
    tree.write_config(tree.slack("slack", http.url("/slack"))
                      + '[[routing]]\ntag = "team-data"\nrecipients = ["#data-team"]\n')
    tree.write_jobs('[jobs.sync]\ntags = ["team-data"]\n[jobs.sync.alerts]\n'
                    'recipients = ["#Data-Team"]\n')
    event = tmp_path / "e.json"
    event.write_text(json.dumps({"job_id": "sync", "run_id": "r1", "state": "FAILED",
                                 "error": "x < y"}))
    assert main(["explain", "--config", str(tree.config_path), str(event)]) == 0
    out = capsys.readouterr().out
    assert "alerts block (from job)" in out
    assert "tags (from job): team-data" in out
    assert "alert failed (level high)" in out
    assert "matched rule tag=team-data" in out
    assert "-> slack: #data-team (alerts)" in out
    assert "dropped duplicate #data-team (rule tag=team-data)" in out
    assert '"channel": "#data-team"' in out
    assert "x &lt; y" in out
    assert http.requests == []


def test_a_job_that_is_not_a_table_is_refused_naming_the_key(tree, capsys):
    from nomaflowd.cli import main

    tree.write_config("")
    tree.write_jobs('[jobs]\netl = "nightly"\n')
    assert main(["check", "--config", str(tree.config_path)]) in (1, 2)
    out = capsys.readouterr()
    assert "jobs.etl must be a table" in out.out + out.err


def test_explain_and_check_say_when_the_database_cannot_be_opened(tree, http, capsys,
                                                                  tmp_path):
    """They read the history when they can; a database that is down is said, once, and the
    dry run and the checks still run (a password in the URL is not shown)."""
    tree.write_config(tree.slack("slack", http.url("/slack")),
                      daemon='database = "postgresql://u:SECRETPW@127.0.0.1:1/test"')
    event = tmp_path / "e.json"
    event.write_text(json.dumps({"job_id": "sync", "run_id": "r1", "state": "FAILED"}))
    assert main(["explain", "--config", str(tree.config_path), str(event)]) == 0
    out = capsys.readouterr().out
    assert "-> slack" in out and "SECRETPW" not in out
    assert main(["check", "--config", str(tree.config_path)]) == 0
    out = capsys.readouterr().out
    assert "warning: daemon.database cannot be opened" in out and "SECRETPW" not in out


def test_check_warns_of_a_near_miss_name_in_jobs_toml(tree, http, capsys):
    """jobs.toml is Nomaflow's catalogue, so keys the daemon does not read are allowed; but
    `[default.alerts]` or `[jobs.etl.alert]` silently left every job on the built-in policy.
    check names them, with the name it expected."""
    tree.write_config(tree.slack("slack", http.url("/slack")))
    tree.write_jobs('[default.alerts]\nrecipients = ["#data"]\n'
                    '[jobs.etl.alert]\non_failure = false\n[jobs.etl]\ncommand = "run.sh"\n'
                    '[defaults.alert]\non_success = true\n')
    assert main(["check", "--config", str(tree.config_path)]) == 0
    out = capsys.readouterr().out
    said = [line for line in out.splitlines() if "is not read" in line]
    assert said == [
        "warning: jobs.toml: [default] is not read; did you mean [defaults]?",
        "warning: jobs.toml: [defaults.alert] is not read; did you mean [defaults.alerts]?",
        "warning: jobs.toml: [jobs.etl.alert] is not read; did you mean [jobs.etl.alerts]?"]
    assert "command" not in out  # Nomaflow's own keys are not ours to judge

