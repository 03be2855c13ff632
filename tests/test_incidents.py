"""Incident lifecycle: recovery notices, PagerDuty/Opsgenie that open and close themselves,
long-run thresholds learned from history. End to end against local servers."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest

from nomaflowd import db, incidents
from nomaflowd.cli import main
from tests.servers import Reply, Request
from tests.smtp_server import SmtpRecorder

ROUTING_KEY = "R0UTINGKEY-CANARY-0123456789abcd"
GENIE_KEY = "6f0c2b1e-CANARY-genie-key"
PD_OK = {"status": "success", "message": "Event processed"}
PD_INVALID = {"status": "invalid event", "message": "Event object is invalid",
              "errors": ["Length of 'routing_key' is incorrect"]}
OG_OK = {"result": "Request will be processed", "took": 0.01,
         "requestId": "43a29c5c-3dbf-4fa4-9c26-f4f71023e120"}
OG_INVALID = {"message": "Request body is not processable. Please check the errors.",
              "took": 0.0, "requestId": "9ae63dd7-ed00-4c81-86f0-c4ffd33142c9"}


def stamp(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def ago(minutes: float) -> str:
    return stamp(db.utcnow() - timedelta(minutes=minutes))


def pd_reply(req: Request) -> Reply:
    """202 as PagerDuty answers it, echoing the dedup_key."""
    body = {**PD_OK, "dedup_key": req.json()["dedup_key"]}
    return Reply(202, json.dumps(body).encode(), {"Content-Type": "application/json"})


def pagerduty(tree: Any, http: Any, name: str = "pd") -> str:
    return tree.webhook(name, http.url("/v2/enqueue"),
                        f'preset = "pagerduty"\nrouting_key = "{tree.enc(ROUTING_KEY)}"')


def opsgenie(tree: Any, http: Any, name: str = "og") -> str:
    return tree.webhook(name, http.url("/"),
                        f'preset = "opsgenie"\napi_key = "{tree.enc(GENIE_KEY)}"')


def slack_reply(req: Request) -> Reply:
    if req.json().get("channel") == "#gone":
        return Reply(404, b"channel_not_found")
    return Reply(200, b"ok")


@pytest.fixture
def smtp() -> Iterator[SmtpRecorder]:
    server = SmtpRecorder()
    yield server
    server.close()


def email(port: int) -> str:
    return ('[transports.mail]\ntype = "email"\nhost = "127.0.0.1"\n'
            f'port = {port}\ntls = "none"\ndefault_from = "Nomaflow <nomaflow@corp.test>"\n')


def rows(tree: Any) -> list[tuple[str, str, str, str]]:
    return [(r["alert"], r["transport"], r["recipient"], r["outcome"])
            for r in tree.notifications()]


# --- PagerDuty ---------------------------------------------------------------------------

def test_pagerduty_triggers_then_resolves_with_one_dedup_key(tree, http, inproc):
    http.replies["/v2/enqueue"] = pd_reply
    http.replies["/slack"] = slack_reply
    tree.write_config(pagerduty(tree, http) + tree.slack("slack", http.url("/slack")))
    tree.write_jobs('[jobs.reporting-nightly-sync]\ntags = ["team-data"]\n'
                    '[jobs.reporting-nightly-sync.alerts]\nrecipients = ["pd", "#data"]\n')
    d = inproc()
    tree.drop({"job_id": "reporting-nightly-sync", "run_id": "r1", "state": "FAILED",
               "step": "copy-orders", "error": "OperationalError: connection refused",
               "finished_at": ago(30)})
    d.pump()
    tree.drop({"job_id": "reporting-nightly-sync", "run_id": "r2", "state": "FAILED",
               "error": "x" * 3000})
    d.pump()
    tree.drop({"job_id": "reporting-nightly-sync", "run_id": "r3", "state": "SUCCEEDED"})
    d.pump()

    sent = [r.json() for r in http.requests if r.path == "/v2/enqueue"]
    assert [b["event_action"] for b in sent] == ["trigger", "trigger", "resolve"]
    assert {b["dedup_key"] for b in sent} == {"nomaflow/reporting-nightly-sync"}
    assert {b["routing_key"] for b in sent} == {ROUTING_KEY}
    first = sent[0]
    assert first["payload"]["summary"] == ("reporting-nightly-sync run failed at step"
                                           " copy-orders \u00b7 OperationalError: connection"
                                           " refused")
    assert first["payload"]["source"] == "nomaflow:reporting-nightly-sync"
    assert first["payload"]["severity"] == "error"
    assert first["payload"]["custom_details"]["run_id"] == "r1"
    assert first["links"] == [{"href": "https://nomaflow.test/runs/r1/", "text": "View run"}]
    assert len(sent[1]["payload"]["summary"]) == 1024  # PagerDuty's limit
    assert set(sent[2]) == {"routing_key", "event_action", "dedup_key"}

    # on_recovery is off: Slack heard about the failures, not the recovery; PagerDuty
    # closes what it opened whatever on_recovery says.
    assert sorted(rows(tree)) == sorted([
        ("failed", "pd", "pd", "SENT"), ("failed", "slack", "#data", "SENT"),
        ("failed", "pd", "pd", "SENT"), ("failed", "slack", "#data", "SENT"),
        ("recovered", "pd", "pd", "SENT")])
    recovered = next(r for r in tree.notifications() if r["alert"] == "recovered")
    assert recovered["level"] == "low"
    assert recovered["detail"] == "HTTP 202 resolve nomaflow/reporting-nightly-sync"
    assert ROUTING_KEY not in json.dumps(tree.notifications())


def test_failure_and_recovery_in_one_batch_reach_pagerduty_in_order(tree, http, inproc):
    slow_trigger = Reply(202, json.dumps(PD_OK).encode(), delay=0.3)
    http.replies["/v2/enqueue"] = lambda req: (
        slow_trigger if req.json()["event_action"] == "trigger" else pd_reply(req))
    tree.write_config(pagerduty(tree, http))
    tree.write_jobs('[jobs.sync.alerts]\nrecipients = ["pd"]\n')
    d = inproc()
    # A backlog after downtime: the failure and the success that ends it in one batch.
    tree.drop({"job_id": "sync", "run_id": "r1", "state": "FAILED", "finished_at": ago(10)})
    tree.drop({"job_id": "sync", "run_id": "r2", "state": "SUCCEEDED", "finished_at": ago(1)})
    d.pump()
    actions = [r.json()["event_action"] for r in http.requests]
    assert actions == ["trigger", "resolve"]  # recorded in arrival order


def test_pagerduty_400_is_failed_delivery_and_nothing_to_resolve(tree, http, inproc):
    http.replies["/v2/enqueue"] = Reply(400, json.dumps(PD_INVALID).encode())
    tree.write_config(pagerduty(tree, http))
    tree.write_jobs('[jobs.sync.alerts]\nrecipients = ["pd"]\n')
    d = inproc()
    tree.drop({"job_id": "sync", "run_id": "r1", "state": "FAILED"})
    d.pump()
    tree.drop({"job_id": "sync", "run_id": "r2", "state": "SUCCEEDED"})
    d.pump()
    [row] = tree.notifications()
    assert (row["alert"], row["outcome"]) == ("failed", "FAILED_DELIVERY")
    assert row["detail"] == ("HTTP 400 invalid event: Event object is invalid:"
                             " Length of 'routing_key' is incorrect")
    assert len(http.requests) == 1  # the failed page opened nothing, so nothing is resolved


def test_pagerduty_long_run_warning_triggers_and_the_success_resolves(tree, http, inproc):
    http.replies["/v2/enqueue"] = pd_reply
    tree.write_config(pagerduty(tree, http), daemon="poll_seconds = 3600")
    tree.write_jobs('[jobs.etl.alerts]\non_long_run_minutes = 30\nrecipients = ["pd"]\n')
    d = inproc()
    start = db.utcnow().replace(microsecond=0)
    tree.drop({"job_id": "etl", "run_id": "r1", "state": "RUNNING", "started_at": stamp(start)})
    d.pump()
    assert d.daemon.poll_long_runs(start + timedelta(minutes=31)) == 1
    d.pump()
    tree.drop({"job_id": "etl", "run_id": "r1", "state": "SUCCEEDED"})
    d.pump()
    sent = [r.json() for r in http.requests]
    assert [(b["event_action"], b.get("payload", {}).get("severity")) for b in sent] == [
        ("trigger", "warning"), ("resolve", None)]
    assert {b["dedup_key"] for b in sent} == {"nomaflow/etl"}


def test_incident_transports_skip_alerts_that_are_not_incidents(tree, http, inproc):
    http.replies["/v2/enqueue"] = pd_reply
    tree.write_config(pagerduty(tree, http) + tree.webhook("hook", http.url("/hook")))
    tree.write_jobs('[jobs.sync.alerts]\non_success = true\nrecipients = ["pd", "hook"]\n')
    d = inproc()
    tree.drop({"job_id": "sync", "run_id": "r1", "state": "SUCCEEDED"})
    tree.drop({"job_id": "sync", "state": "NOTICE", "message": "hello"})
    d.pump()
    assert sorted(r.path for r in http.requests) == ["/hook", "/hook"]


# --- Opsgenie ----------------------------------------------------------------------------

def test_opsgenie_creates_then_closes_by_alias(tree, http, inproc):
    http.replies["/v2/alerts"] = Reply(202, json.dumps(OG_OK).encode())
    tree.write_config(opsgenie(tree, http))
    tree.write_jobs('[jobs.reporting-nightly-sync.alerts]\nrecipients = ["og"]\n')
    d = inproc()
    tree.drop({"job_id": "reporting-nightly-sync", "run_id": "r1", "state": "FAILED",
               "error": "OperationalError: connection refused " + "y" * 200,
               "finished_at": ago(47)})
    d.pump()
    tree.drop({"job_id": "reporting-nightly-sync", "run_id": "r2", "state": "SUCCEEDED"})
    d.pump()
    create, close = http.requests
    assert create.path == "/v2/alerts"
    assert close.path == ("/v2/alerts/nomaflow%2Freporting-nightly-sync/close"
                          "?identifierType=alias")
    assert {create.headers["Authorization"], close.headers["Authorization"]} == {
        f"GenieKey {GENIE_KEY}"}
    body = create.json()
    assert body["alias"] == "nomaflow/reporting-nightly-sync"
    assert body["priority"] == "P2"
    assert len(body["message"]) == 130 and body["message"].endswith("\u2026")
    assert body["message"].startswith("reporting-nightly-sync run failed \u00b7 Operational")
    assert body["details"]["run_id"] == "r1"
    assert body["details"]["error"].startswith("OperationalError: connection refused")
    note = close.json()["note"]
    assert note.startswith("reporting-nightly-sync recovered after 1 failed run (first"
                           " failure 47 min ago)")
    assert [(r["alert"], r["outcome"]) for r in tree.notifications()] == [
        ("failed", "SENT"), ("recovered", "SENT")]
    assert tree.notifications()[1]["detail"].startswith(
        "HTTP 202 close nomaflow/reporting-nightly-sync (requestId 43a29c5c")
    assert GENIE_KEY not in json.dumps(tree.notifications())


def test_opsgenie_422_is_failed_delivery(tree, http, inproc):
    http.replies["/v2/alerts"] = Reply(422, json.dumps(OG_INVALID).encode())
    tree.write_config(opsgenie(tree, http))
    tree.write_jobs('[jobs.sync.alerts]\nrecipients = ["og"]\n')
    d = inproc()
    tree.drop({"job_id": "sync", "run_id": "r1", "state": "FAILED"})
    d.pump()
    [row] = tree.notifications()
    assert row["outcome"] == "FAILED_DELIVERY"
    assert row["detail"].startswith("HTTP 422 Request body is not processable.")


# --- recovery notices in Slack and email -------------------------------------------------

def test_recovery_reaches_slack_and_email_that_got_the_failure(tree, http, smtp, inproc):
    http.replies["/slack"] = slack_reply
    tree.write_config(tree.slack("slack", http.url("/slack")) + email(smtp.port)
                      + '[[routing]]\ntag = "other"\nrecipients = ["#other-team"]\n')
    tree.write_jobs('[jobs.sync.alerts]\non_recovery = true\n'
                    'recipients = ["#data", "#gone", "Data Team <data@corp.test>"]\n')
    d = inproc()
    tree.drop({"job_id": "sync", "run_id": "r1", "state": "FAILED", "finished_at": ago(47)})
    d.pump()
    tree.drop({"job_id": "sync", "run_id": "r2", "state": "FAILED", "finished_at": ago(20)})
    d.pump()
    tree.drop({"job_id": "sync", "run_id": "r3", "state": "SUCCEEDED"})
    d.pump()

    recovered = [r.json() for r in http.requests if "recovered" in r.json()["text"]]
    assert len(recovered) == 1  # #gone never got the failure (404), so not the recovery
    [msg] = recovered
    assert msg["channel"] == "#data"
    assert msg["text"].startswith("\U0001f7e2 sync recovered after 2 failed runs"
                                  " (first failure 47 min ago)")
    assert msg["attachments"][0]["color"] == "#2eb67d"
    mails = smtp.wait_for(3)
    assert mails[-1].message["Subject"] == "[Nomaflow] RECOVERED sync"
    assert "sync recovered after 2 failed runs" in mails[-1].part("text/plain")
    assert mails[-1].rcpt_tos == ["data@corp.test"]
    got = sorted((r["alert"], r["recipient"], r["outcome"]) for r in tree.notifications()
                 if r["alert"] == "recovered")
    assert got == [("recovered", "#data", "SENT"), ("recovered", "data@corp.test", "SENT")]


def test_success_after_success_and_late_success_send_no_recovery(tree, http, inproc):
    tree.write_config(tree.webhook("hook", http.url("/hook")))
    tree.write_jobs('[jobs.sync.alerts]\non_recovery = true\nrecipients = ["hook"]\n')
    d = inproc()
    tree.drop({"job_id": "sync", "run_id": "r1", "state": "FAILED", "finished_at": ago(30)})
    tree.drop({"job_id": "sync", "run_id": "r3", "state": "FAILED", "finished_at": ago(10)})
    d.pump()
    # r2 finished between the two failures but its event arrives last: the incident is
    # still open (r3 failed after it), so nothing recovers.
    tree.drop({"job_id": "sync", "run_id": "r2", "state": "SUCCEEDED", "finished_at": ago(20)})
    d.pump()
    tree.drop({"job_id": "sync", "run_id": "r4", "state": "SUCCEEDED", "finished_at": ago(5)})
    d.pump()
    tree.drop({"job_id": "sync", "run_id": "r5", "state": "SUCCEEDED"})
    d.pump()
    kinds = [(r.json()["alert"], r.json()["run_id"]) for r in http.requests]
    assert sorted(kinds) == [("failed", "r1"), ("failed", "r3"), ("recovered", "r4")]
    [body] = [r.json() for r in http.requests if r.json()["alert"] == "recovered"]
    assert body["summary"].startswith("\U0001f7e2 sync recovered after 1 failed run")


def test_an_incident_a_retried_attempt_opened_is_resolved_when_the_run_succeeds(tree, http,
                                                                                inproc):
    """on_retry alerts a failed attempt: PagerDuty opens the job's incident. The run then
    succeeds: the incident is resolved and the failure's recipients hear of it (it stayed
    open: the run never FAILED, so no episode was seen to end)."""
    http.replies["/v2/enqueue"] = pd_reply
    tree.write_config(tree.webhook("hook", http.url("/hook")) + pagerduty(tree, http))
    tree.write_jobs('[jobs.pdj.alerts]\non_retry = true\non_recovery = true\n'
                    'recipients = ["pd", "hook"]\n')
    d = inproc()
    tree.drop({"job_id": "pdj", "run_id": "p1", "state": "RUNNING"})
    tree.drop({"job_id": "pdj", "run_id": "p1", "state": "FAILED", "attempt": 1,
               "max_attempts": 2, "error": "flaky"})
    d.pump(lambda: len(tree.notifications()) == 2, what="the failed attempt's two rows")
    tree.drop({"job_id": "pdj", "run_id": "p1", "state": "SUCCEEDED"})
    d.pump(lambda: len(http.requests) == 4, what="the recovery's two sends")
    sent = sorted((r.path, r.json().get("alert") or r.json()["event_action"])
                  for r in http.requests)
    assert sent == [("/hook", "failed"), ("/hook", "recovered"),
                    ("/v2/enqueue", "resolve"), ("/v2/enqueue", "trigger")]
    [recovered] = [r.json() for r in http.requests if r.json().get("alert") == "recovered"]
    assert "pdj run succeeded after a failed attempt" in recovered["summary"]


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres",
                                                           marks=pytest.mark.postgres)])
def test_a_success_while_the_attempts_trigger_is_still_in_flight_resolves_it(tree, http,
                                                                             inproc, request,
                                                                             backend):
    """The retried attempt's trigger is still on its way (PagerDuty has not answered, so no
    audit row yet) when the run's success is read: the incident is resolved all the same."""
    if backend == "postgres":
        tree.database = request.getfixturevalue("pg_schema")
    at_pagerduty, answer = threading.Event(), threading.Event()

    def slow_trigger(req: Request) -> Reply:
        if req.json()["event_action"] == "trigger":
            at_pagerduty.set()
            answer.wait(10)
        return pd_reply(req)

    http.replies["/v2/enqueue"] = slow_trigger
    tree.write_config(pagerduty(tree, http))
    tree.write_jobs('[jobs.pdj.alerts]\non_retry = true\nrecipients = ["pd"]\n')
    d = inproc()
    tree.drop({"job_id": "pdj", "run_id": "p1", "state": "FAILED", "attempt": 1,
               "max_attempts": 2, "error": "flaky"})
    d.pump(at_pagerduty.is_set, what="the trigger at PagerDuty")
    tree.drop({"job_id": "pdj", "run_id": "p1", "state": "SUCCEEDED"})
    run, audit = db.RunRow, db.NotificationRow  # the daemon's own database, either backend
    d.pump(lambda: run.get(run.run_id == "p1").state == "SUCCEEDED", what="the success read")
    answer.set()
    d.pump(lambda: audit.select().count() == 2, what="trigger and resolve audited")
    assert [r.json()["event_action"] for r in http.requests] == ["trigger", "resolve"]
    assert [(r.alert, r.outcome) for r in audit.select().order_by(audit.id)] == [
        ("failed", "SENT"), ("recovered", "SENT")]


def test_a_runner_clock_years_ahead_does_not_keep_the_incident_open(tree, http, inproc,
                                                                    caplog):
    """A success stamped in 2031 (a runner's clock) must not make every later real success
    "late": the next failure still opens PagerDuty's incident and the next success closes it."""
    http.replies["/v2/enqueue"] = pd_reply
    tree.write_config(tree.webhook("hook", http.url("/hook")) + pagerduty(tree, http))
    tree.write_jobs('[jobs.skew.alerts]\non_recovery = true\nrecipients = ["hook", "pd"]\n')
    d = inproc()
    tree.drop({"job_id": "skew", "run_id": "s0", "state": "SUCCEEDED",
               "finished_at": "2031-01-01T00:00:00Z", "at": "2031-01-01T00:00:00Z"})
    d.pump()
    tree.drop({"job_id": "skew", "run_id": "r1", "state": "FAILED", "error": "boom"})
    d.pump(lambda: len(http.requests) == 2, what="the failure's two sends")
    tree.drop({"job_id": "skew", "run_id": "r2", "state": "SUCCEEDED"})
    d.pump(lambda: len(http.requests) == 4, what="the recovery's two sends")
    sent = sorted((r.path, r.json().get("alert") or r.json()["event_action"])
                  for r in http.requests)
    assert sent == [("/hook", "failed"), ("/hook", "recovered"),
                    ("/v2/enqueue", "resolve"), ("/v2/enqueue", "trigger")]
    assert "finished_at 2031-01-01T00:00:00Z is ahead of this host's clock" in caplog.text


# --- learned long-run thresholds ---------------------------------------------------------

def drop_history(tree: Any, job: str, minutes: list[float]) -> None:
    """Past runs: a RUNNING and a SUCCEEDED event each, with times in the past."""
    end = db.utcnow() - timedelta(days=1)
    for i, m in enumerate(minutes):
        finished = end - timedelta(hours=i)
        started = finished - timedelta(minutes=m)
        tree.drop({"job_id": job, "run_id": f"past-{i}", "state": "RUNNING",
                   "started_at": stamp(started)})
        tree.drop({"job_id": job, "run_id": f"past-{i}", "state": "SUCCEEDED",
                   "started_at": stamp(started), "finished_at": stamp(finished)})


def test_auto_threshold_fires_at_3x_usual_and_not_at_1_2x(tree, http, inproc):
    tree.write_config(tree.webhook("hook", http.url("/hook")), daemon="poll_seconds = 3600")
    tree.write_jobs('[jobs.etl.alerts]\non_long_run_minutes = "auto"\nrecipients = ["hook"]\n')
    d = inproc()
    drop_history(tree, "etl", [9, 10, 10, 11, 10, 12])
    d.pump()
    start = db.utcnow().replace(microsecond=0)
    tree.drop({"job_id": "etl", "run_id": "now", "state": "RUNNING", "started_at": stamp(start)})
    d.pump()
    # p95 (nearest rank) of 9..12 is 12 min; x1.5 = 18 min after the start; usually 10 min.
    [(usual, deadline)] = tree.sql(
        "SELECT usual_minutes, long_run_deadline FROM runs WHERE run_id = 'now'")
    assert usual == 10
    assert deadline.startswith(str(start + timedelta(minutes=18)))
    assert d.daemon.poll_long_runs(start + timedelta(minutes=12)) == 0    # 1.2x usual
    assert d.daemon.poll_long_runs(start + timedelta(minutes=30)) == 1    # 3x usual
    d.pump()
    [req] = http.requests
    body = req.json()
    assert (body["alert"], body["run_id"]) == ("long_run", "now")
    assert "etl run still running: usually 10 min, now 30 min" in body["summary"]


def test_fixed_threshold_keeps_working_beside_auto(tree, http, inproc):
    tree.write_config(tree.webhook("hook", http.url("/hook")), daemon="poll_seconds = 3600")
    tree.write_jobs('[jobs.etl.alerts]\non_long_run_minutes = 5\nrecipients = ["hook"]\n')
    d = inproc()
    drop_history(tree, "etl", [9, 10, 10, 11, 10, 12])
    d.pump()
    start = db.utcnow().replace(microsecond=0)
    tree.drop({"job_id": "etl", "run_id": "now", "state": "RUNNING", "started_at": stamp(start)})
    d.pump()
    assert d.daemon.poll_long_runs(start + timedelta(minutes=6)) == 1
    d.pump()
    assert "etl run still running after 6 min" in http.requests[0].json()["summary"]
    d.close()
    assert main(["check", "--config", str(tree.config_path)]) == 0


def test_check_warns_about_a_fixed_threshold_below_the_usual_duration(tree, inproc, capsys):
    tree.write_config()
    tree.write_jobs('[jobs.etl.alerts]\non_long_run_minutes = 5\n')
    d = inproc()
    drop_history(tree, "etl", [9, 10, 10, 11, 10])
    d.pump()
    d.close()
    main(["check", "--config", str(tree.config_path)])
    out = capsys.readouterr().out
    assert ("jobs.etl.alerts.on_long_run_minutes is 5 for etl, which usually runs 10 min"
            " (median of its last 5 successful runs)") in out


def test_auto_threshold_waits_for_five_samples_and_explain_says_so(tree, http, inproc,
                                                                    capsys, tmp_path):
    tree.write_config(tree.webhook("hook", http.url("/hook")), daemon="poll_seconds = 3600")
    tree.write_jobs('[jobs.etl.alerts]\non_long_run_minutes = "auto"\nrecipients = ["hook"]\n')
    d = inproc()
    drop_history(tree, "etl", [9, 10, 11])
    d.pump()
    start = db.utcnow().replace(microsecond=0)
    tree.drop({"job_id": "etl", "run_id": "now", "state": "RUNNING", "started_at": stamp(start)})
    d.pump()
    assert tree.sql("SELECT long_run_deadline FROM runs WHERE run_id = 'now'") == [(None,)]
    assert d.daemon.poll_long_runs(start + timedelta(days=2)) == 0
    d.close()
    event = tmp_path / "running.json"
    event.write_text(json.dumps({"job_id": "etl", "run_id": "next", "state": "RUNNING"}))
    assert main(["explain", "--config", str(tree.config_path), str(event)]) == 0
    out = capsys.readouterr().out
    assert ('no long-run warning yet: "auto" learns from 5 successful runs with start and'
            " finish times and this job has 3") in out
    assert http.requests == []


# --- explain -------------------------------------------------------------------------------

def test_explain_shows_the_open_episode_and_what_recovery_would_send(tree, http, inproc,
                                                                     capsys, tmp_path):
    http.replies["/v2/enqueue"] = pd_reply
    tree.write_config(pagerduty(tree, http) + tree.slack("slack", http.url("/slack")))
    tree.write_jobs('[jobs.sync.alerts]\nrecipients = ["pd", "#data"]\n')
    d = inproc()
    tree.drop({"job_id": "sync", "run_id": "r1", "state": "FAILED", "finished_at": ago(47)})
    d.pump()
    tree.drop({"job_id": "sync", "run_id": "r2", "state": "FAILED"})
    d.pump()
    d.close()
    before = len(http.requests)

    running = tmp_path / "running.json"
    running.write_text(json.dumps({"job_id": "sync", "run_id": "r3", "state": "RUNNING"}))
    assert main(["explain", "--config", str(tree.config_path), str(running)]) == 0
    out = capsys.readouterr().out
    assert ("incident: open, 2 failed runs since the last success (first failure 47 min ago);"
            " dedup key nomaflow/sync") in out
    assert "a SUCCEEDED run would send `recovered` to:" in out
    assert "-> pd: pd (got the failure; pagerduty closes it)" in out
    assert "not told slack: #data (got the failure, but on_recovery is off)" in out

    success = tmp_path / "success.json"
    success.write_text(json.dumps({"job_id": "sync", "run_id": "r3", "state": "SUCCEEDED"}))
    assert main(["explain", "--config", str(tree.config_path), str(success)]) == 0
    out = capsys.readouterr().out
    assert "alert recovered (level low)" in out
    assert '"event_action": "resolve"' in out
    assert '"dedup_key": "nomaflow/sync"' in out
    assert '"routing_key": "****"' in out and ROUTING_KEY not in out
    assert len(http.requests) == before  # explain sends nothing


def test_explain_says_no_incident_is_open(tree, http, capsys, tmp_path, inproc):
    tree.write_config(pagerduty(tree, http))
    tree.write_jobs('[jobs.sync.alerts]\non_success = true\nrecipients = ["pd"]\n')
    d = inproc()
    tree.drop({"job_id": "sync", "run_id": "r1", "state": "SUCCEEDED"})
    d.pump()
    d.close()
    event = tmp_path / "e.json"
    event.write_text(json.dumps({"job_id": "sync", "run_id": "r2", "state": "SUCCEEDED"}))
    assert main(["explain", "--config", str(tree.config_path), str(event)]) == 0
    out = capsys.readouterr().out
    assert "incident: none open (last success " in out
    assert "not sent to pd: pd (a pagerduty transport takes failed, long-run and recovered" \
           " alerts only)" in out


# --- pure parts ----------------------------------------------------------------------------

def test_learned_threshold_is_p95_times_one_and_a_half_with_a_floor():
    assert incidents.learn_from([10, 11, 12, 9]).threshold is None
    learned = incidents.learn_from([10] * 28 + [20, 40])
    assert (learned.samples, learned.usual, learned.p95, learned.threshold) == (30, 10, 20, 30)
    assert incidents.learn_from([0.1] * 5).threshold == incidents.FLOOR_MINUTES
    assert incidents.learn_from([5, 5, 5, 5, 5, -3]).samples == 5  # clock skew dropped


def test_dedup_key_fits_pagerduty_limit():
    assert incidents.dedup_key("sync") == "nomaflow/sync"
    long = incidents.dedup_key("j" * 256)
    assert len(long) == 255 and long != incidents.dedup_key("j" * 255 + "k")


# --- PostgreSQL: the same queries on the replicas' backend ---------------------------------

@pytest.mark.postgres
def test_episode_and_learned_threshold_on_postgresql(tree, http, inproc, pg_schema):
    http.replies["/v2/enqueue"] = pd_reply
    tree.database = pg_schema
    tree.write_config(pagerduty(tree, http), daemon="poll_seconds = 3600")
    tree.write_jobs('[jobs.etl.alerts]\non_long_run_minutes = "auto"\nrecipients = ["pd"]\n')
    d = inproc()
    drop_history(tree, "etl", [9, 10, 10, 11, 10, 12])
    d.pump()
    tree.drop({"job_id": "etl", "run_id": "f1", "state": "FAILED", "finished_at": ago(30)})
    d.pump()
    start = db.utcnow().replace(microsecond=0)
    tree.drop({"job_id": "etl", "run_id": "now", "state": "RUNNING", "started_at": stamp(start)})
    d.pump()
    assert d.daemon.poll_long_runs(start + timedelta(minutes=12)) == 0
    assert d.daemon.poll_long_runs(start + timedelta(minutes=30)) == 1
    d.pump()
    tree.drop({"job_id": "etl", "run_id": "now", "state": "SUCCEEDED"})
    d.pump()
    sent = [r.json() for r in http.requests]
    assert [(b["event_action"], b.get("payload", {}).get("severity")) for b in sent] == [
        ("trigger", "error"), ("trigger", "warning"), ("resolve", None)]
    assert "usually 10 min, now 30 min" in sent[1]["payload"]["summary"]


def test_test_button_opens_and_closes_at_once(tree, http, capsys):
    http.replies["/v2/enqueue"] = pd_reply
    http.replies["/v2/alerts"] = Reply(202, json.dumps(OG_OK).encode())
    tree.write_config(pagerduty(tree, http) + opsgenie(tree, http))
    assert main(["test", "pd", "--config", str(tree.config_path)]) == 0
    assert main(["test", "og", "--config", str(tree.config_path)]) == 0
    out = capsys.readouterr().out
    assert "SENT pd -> pd: HTTP 202 trigger nomaflow/test, resolved at once" in out
    assert "SENT og -> og: HTTP 202 create nomaflow/test" in out
    pd = [r.json() for r in http.requests if r.path == "/v2/enqueue"]
    assert [(b["event_action"], b["dedup_key"]) for b in pd] == [
        ("trigger", "nomaflow/test"), ("resolve", "nomaflow/test")]
    assert pd[0]["payload"]["severity"] == "info"
    og = [(r.path, r.json().get("priority")) for r in http.requests if r.path.startswith("/v2/al")]
    assert og == [("/v2/alerts", "P5"),
                  ("/v2/alerts/nomaflow%2Ftest/close?identifierType=alias", None)]


# --- README promises: cancels, long-run priority, presets and digests/headers -------------

def test_cancelled_runs_neither_open_nor_close_an_episode(tree, http, inproc):
    """README: "A job's failure episode is its FAILED runs since its last SUCCEEDED one,
    ordered by `finished_at` (CANCELLED runs neither open nor close one)"."""
    http.replies["/v2/enqueue"] = pd_reply
    tree.write_config(pagerduty(tree, http) + tree.webhook("hook", http.url("/hook")))
    tree.write_jobs('[jobs.sync.alerts]\non_recovery = true\nrecipients = ["hook", "pd"]\n'
                    '[jobs.other.alerts]\non_recovery = true\nrecipients = ["hook", "pd"]\n')
    d = inproc()
    runs = [
        ("sync", "r1", "FAILED", 47),
        ("sync", "r2", "CANCELLED", 30),  # a cancel inside the episode does not close it...
        ("sync", "r3", "FAILED", 20),
        ("sync", "r4", "SUCCEEDED", 10),
        ("sync", "r5", "CANCELLED", 5),   # ...and one after the success opens none
        ("sync", "r6", "SUCCEEDED", 1),
        ("other", "o1", "CANCELLED", 9),  # a job whose only trouble was a cancel
        ("other", "o2", "SUCCEEDED", 2),
    ]
    for job, run, state, minutes in runs:  # one at a time, in this order
        tree.drop({"job_id": job, "run_id": run, "state": state, "finished_at": ago(minutes)})
        d.pump()

    hook = [r.json() for r in http.requests if r.path == "/hook"]
    assert [(b["alert"], b["run_id"]) for b in hook] == [
        ("failed", "r1"), ("failed", "r3"), ("recovered", "r4")]
    # Both failures count, the first one's age is the episode's: the cancel closed nothing.
    assert hook[2]["summary"].startswith("\U0001f7e2 sync recovered after 2 failed runs"
                                         " (first failure 47 min ago)")
    pd = [r.json() for r in http.requests if r.path == "/v2/enqueue"]
    assert [b["event_action"] for b in pd] == ["trigger", "trigger", "resolve"]
    assert {b["dedup_key"] for b in pd} == {"nomaflow/sync"}
    assert sorted(rows(tree)) == sorted([
        ("failed", "hook", "hook", "SENT"), ("failed", "pd", "pd", "SENT"),
        ("failed", "hook", "hook", "SENT"), ("failed", "pd", "pd", "SENT"),
        ("recovered", "hook", "hook", "SENT"), ("recovered", "pd", "pd", "SENT")])


def test_opsgenie_long_run_warning_is_p3_and_the_success_closes_it(tree, http, inproc):
    """README: "| `long_run` | `trigger`, severity `warning` | `POST /v2/alerts`, priority
    P3 |" and "a long-run warning is P3 / `warning`" ... "the next success resolves it, also
    when no run failed"."""
    http.replies["/v2/alerts"] = Reply(202, json.dumps(OG_OK).encode())
    tree.write_config(opsgenie(tree, http), daemon="poll_seconds = 3600")
    tree.write_jobs('[jobs.etl.alerts]\non_long_run_minutes = 30\nrecipients = ["og"]\n')
    d = inproc()
    start = db.utcnow().replace(microsecond=0)
    tree.drop({"job_id": "etl", "run_id": "r1", "state": "RUNNING", "started_at": stamp(start)})
    d.pump()
    assert d.daemon.poll_long_runs(start + timedelta(minutes=31)) == 1
    d.pump()
    tree.drop({"job_id": "etl", "run_id": "r1", "state": "SUCCEEDED"})
    d.pump()
    create, close = http.requests
    assert create.path == "/v2/alerts"
    body = create.json()
    assert (body["alias"], body["priority"]) == ("nomaflow/etl", "P3")
    assert body["details"]["alert"] == "long_run"
    assert close.path == "/v2/alerts/nomaflow%2Fetl/close?identifierType=alias"
    assert [(r["alert"], r["outcome"]) for r in tree.notifications()] == [
        ("long_run", "SENT"), ("recovered", "SENT")]


@pytest.mark.parametrize("preset", ["pagerduty", "opsgenie"])
def test_incident_presets_never_batch_alerts_into_digests(tree, http, inproc, preset):
    """README: "Presets never batch alerts into digests." A paced lane that would fold the
    waiting alerts into one digest (any other webhook would) sends each on its own."""
    http.replies["/v2/enqueue"] = pd_reply
    http.replies["/v2/alerts"] = Reply(202, json.dumps(OG_OK).encode())
    pacing = "rate_per_minute = 600\nburst = 1\ndigest_after_seconds = 0.001\n"
    if preset == "pagerduty":
        transport = tree.webhook("inc", http.url("/v2/enqueue"), f'preset = "pagerduty"\n'
                                 f'routing_key = "{tree.enc(ROUTING_KEY)}"\n{pacing}')
    else:
        transport = tree.webhook("inc", http.url("/"), f'preset = "opsgenie"\n'
                                 f'api_key = "{tree.enc(GENIE_KEY)}"\n{pacing}')
    tree.write_config(transport)
    tree.write_jobs("".join(f'[jobs.job-{i}.alerts]\nrecipients = ["inc"]\n' for i in range(3)))
    d = inproc()
    for i in range(3):
        tree.drop({"job_id": f"job-{i}", "run_id": f"r{i}", "state": "FAILED"})
    d.pump(lambda: len(tree.notifications()) == 3, what="three audit rows")
    d.pump()

    assert len(http.requests) == 3
    bodies = [r.json() for r in http.requests]
    if preset == "pagerduty":
        assert sorted(b["dedup_key"] for b in bodies) == [f"nomaflow/job-{i}" for i in range(3)]
        assert {b["event_action"] for b in bodies} == {"trigger"}
    else:
        assert sorted(b["alias"] for b in bodies) == [f"nomaflow/job-{i}" for i in range(3)]
    assert all("alerts" not in b and "digest" not in b for b in bodies)
    got = tree.notifications()
    assert sorted((r["job_id"], r["outcome"]) for r in got) == [
        (f"job-{i}", "SENT") for i in range(3)]
    assert not any("digest" in r["detail"] for r in got), [r["detail"] for r in got]


def test_incident_preset_still_sends_headers_and_signature_and_ignores_body_template(
        tree, http, inproc, capsys):
    """README: "`headers` and `signing_secret` are still sent with a preset; `body_template`
    is ignored (`nomaflowd check` says so)"."""
    http.replies["/v2/enqueue"] = pd_reply
    secret = "whsec-incident-0123"
    extra = (f'preset = "pagerduty"\nrouting_key = "{tree.enc(ROUTING_KEY)}"\n'
             f'headers = {{ X-Team = "{tree.enc("team-data")}" }}\n'
             f'signing_secret = "{tree.enc(secret)}"\n'
             "body_template = '{\"custom\": \"${job_id}\"}'\n")
    tree.write_config(tree.webhook("pd", http.url("/v2/enqueue"), extra))
    tree.write_jobs('[jobs.sync.alerts]\nrecipients = ["pd"]\n')
    d = inproc()
    tree.drop({"job_id": "sync", "run_id": "r1", "state": "FAILED"})
    d.pump()
    d.close()

    [req] = http.requests
    assert req.headers["X-Team"] == "team-data"
    stamp_ = req.headers["X-Nomaflow-Timestamp"]
    mac = hmac.new(secret.encode(), stamp_.encode() + b"." + req.body, hashlib.sha256)
    assert req.headers["X-Nomaflow-Signature"] == "sha256=" + mac.hexdigest()
    body = req.json()  # PagerDuty's event, not the template
    assert "custom" not in body
    assert (body["event_action"], body["dedup_key"]) == ("trigger", "nomaflow/sync")
    assert tree.notifications()[0]["outcome"] == "SENT"

    assert main(["check", "--config", str(tree.config_path)]) == 0
    assert ("warning: transports.pd.body_template is ignored: the pagerduty preset sends"
            " that API's own body") in capsys.readouterr().out


def test_a_pagerduty_event_stays_under_512_kb_whatever_the_event_holds():
    """PagerDuty refuses an event over 512 KB: every text of custom_details is clipped, the
    step and who triggered it too (a 530,000-character step made 531,561 bytes)."""
    from nomaflowd.transports.pagerduty import PagerDuty
    from tests.test_transport_slack import make_alert

    transport = PagerDuty("pd", {"routing_key": "k" * 32}, timeout=1)
    for field in ("step", "triggered_by", "error"):
        alert = make_alert("failed", **{field: "\U0001f525" * 60_000})
        body = transport.event(alert, "k" * 32)
        assert len(json.dumps(body, ensure_ascii=False).encode()) < 100_000, field
