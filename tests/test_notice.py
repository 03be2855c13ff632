"""In-step push: a NOTICE from a shell step (`emit`) or a Python step (`client.notify`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from nomaflowd.cli import main


def test_notice_from_python_helper_and_emit_reaches_slack_and_webhook(tree, http, inproc,
                                                                       capsys):
    tree.write_config(tree.slack("slack", http.url("/slack")) + tree.webhook("ops", http.url()))
    d = inproc()
    # The helper needs only the spool path: run it where neither config nor key exists.
    env = {**os.environ, "NOMAFLOWD_SPOOL": str(tree.spool)}
    code = ("from nomaflowd.client import notify; "
            "notify('monthly report delivered', job_id='reporting-monthly', run_id='m1', "
            "recipients=['#finance', 'ops'])")
    subprocess.run([sys.executable, "-c", code], env=env, cwd="/", check=True)
    assert main(["emit", "--config", str(tree.config_path), "--job", "reporting-monthly",
                 "--run", "m1", "--notice", "second message & <b>", "--to", "ops"]) == 0
    assert "dropped" in capsys.readouterr().out
    d.pump()
    slack = [r.json() for r in http.requests if r.path == "/slack"]
    hooks = [r.json() for r in http.requests if r.path == "/hook"]
    assert [s["channel"] for s in slack] == ["#finance"]
    assert "reporting-monthly: monthly report delivered" in slack[0]["text"]
    assert sorted(h["message"] for h in hooks) == ["monthly report delivered",
                                                   "second message & <b>"]
    rows = tree.notifications()
    assert sorted((r["alert"], r["transport"]) for r in rows) == [
        ("notice", "ops"), ("notice", "ops"), ("notice", "slack")]
    assert {r["level"] for r in rows} == {"low"}


def test_notice_without_recipients_goes_to_the_jobs_recipients(tree, http, inproc):
    tree.write_config(tree.webhook("ops", http.url()) + tree.webhook("other", http.url("/o")))
    tree.write_jobs('[jobs.j.alerts]\nrecipients = ["other"]\n')
    d = inproc()
    from nomaflowd.client import notify

    notify("done", job_id="j", spool=str(tree.spool))
    d.pump()
    assert [r.path for r in http.requests] == ["/o"]


def test_emit_refuses_an_event_the_daemon_would_reject(tree, capsys):
    tree.write_config()
    tree.spool.mkdir(parents=True)
    assert main(["emit", "--config", str(tree.config_path), "--job", "j", "--state",
                 "FAILED"]) == 2
    err = capsys.readouterr().err
    assert "run_id is required" in err and err.count("\n") == 1
    assert tree.spool_files() == []


def test_emit_whole_event_from_stdin(tree, capsys, monkeypatch):
    import io

    tree.write_config()
    tree.spool.mkdir(parents=True)
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(
        b'{"job_id": "j", "run_id": "r", "state": "FAILED", "error": "x"}')))
    assert main(["emit", "--config", str(tree.config_path), "--json", "-"]) == 0
    files = tree.spool_files()
    assert len(files) == 1
    assert '"error": "x"' in (tree.spool / files[0]).read_text()


def test_emit_flags_become_the_event_fields(tree, capsys):
    """README: `emit --job J --state S [--run R] [--error E] [--step S] [--tag T]…`."""
    tree.write_config()
    tree.spool.mkdir(parents=True)
    assert main(["emit", "--config", str(tree.config_path), "--job", "etl", "--run", "r1",
                 "--state", "FAILED", "--error", "boom", "--step", "load", "--tag", "a",
                 "--tag", "b"]) == 0
    [name] = tree.spool_files()
    assert name.endswith(".json")
    event = json.loads((tree.spool / name).read_text())
    assert {k: event[k] for k in ("job_id", "run_id", "state", "error", "step", "tags")} == {
        "job_id": "etl", "run_id": "r1", "state": "FAILED", "error": "boom", "step": "load",
        "tags": ["a", "b"]}
