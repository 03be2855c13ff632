"""What runners and visitors send that the CLI and the page must answer in one line, not a crash."""

from __future__ import annotations

import io
import os

import pytest

from nomaflowd.cli import main


def run(tree, *argv: str) -> int:
    return main([*argv, "--config", str(tree.config_path)])


# --- nomaflowd emit ------------------------------------------------------------------------

@pytest.mark.parametrize(("argv", "flag"), [
    (["--job", "j", "--state", "FAILED", "--tag", "\udcff"], "--tag"),  # $'\xff' in Python
    (["--job", "j\udcfe", "--state", "FAILED"], "--job"),
    (["--job", "j", "--notice", "hi", "--to", "#ops\udcff"], "--to"),
])
def test_emit_with_an_argument_that_is_not_utf8_is_a_usage_error(tree, capsys, argv, flag):
    tree.write_config()
    tree.spool.mkdir(parents=True)
    assert run(tree, "emit", *argv) == 2
    assert capsys.readouterr().err == f"nomaflowd: {flag} is not valid UTF-8 text\n"
    assert tree.spool_files() == []


def test_emit_json_from_an_endless_file_stops_at_the_event_limit(tree, capsys):
    tree.write_config()
    tree.spool.mkdir(parents=True)
    assert run(tree, "emit", "--json", "/dev/zero") == 2
    err = capsys.readouterr().err
    assert err == "nomaflowd: --json /dev/zero: larger than the event limit of 1048576 bytes\n"
    assert tree.spool_files() == []


def test_emit_json_from_stdin_stops_at_the_event_limit(tree, capsys, monkeypatch):
    tree.write_config()
    tree.spool.mkdir(parents=True)
    big = io.TextIOWrapper(io.BytesIO(b"{" + b" " * (2 << 20) + b"}"))
    monkeypatch.setattr("sys.stdin", big)
    assert run(tree, "emit", "--json", "-") == 2
    assert "larger than the event limit" in capsys.readouterr().err


# --- nomaflowd run -------------------------------------------------------------------------

def test_run_warns_once_when_the_key_file_is_readable_by_others(tree, http, daemon_factory):
    tree.write_config(tree.webhook("ops", http.url()))
    os.chmod(tree.key, 0o644)
    d = daemon_factory()
    assert d.stop() == 0
    lines = [line for line in d.output().splitlines() if "readable by others" in line]
    assert len(lines) == 1
    assert f"key file {tree.key} is readable by others (mode 0644)" in lines[0]
    assert "chmod 600" in lines[0]


def test_run_is_quiet_about_a_0600_key_file(tree, http, daemon_factory):
    tree.write_config(tree.webhook("ops", http.url()))
    d = daemon_factory()
    assert d.stop() == 0
    assert "readable by others" not in d.output()


# --- /metrics and /healthz -------------------------------------------------------------------

def test_metrics_on_an_ephemeral_port_answer_whatever_is_asked(tree, http, daemon_factory):
    import re
    import urllib.error
    import urllib.request

    from tests.servers import wait_until

    tree.write_config(tree.webhook("ops", http.url()), daemon='metrics_listen = "127.0.0.1:0"')
    d = daemon_factory()
    found = wait_until(lambda: re.search(r"metrics listening on http://127\.0\.0\.1:(\d+)/metrics",
                                         d.output()), what="the metrics log line")
    base = f"http://127.0.0.1:{found.group(1)}"
    answers = {}
    for path in ("/metrics", "/healthz", "/metrics?x=%ff&" + "y=1&" * 50, "/%ff", "//[x"):
        try:
            with urllib.request.urlopen(base + path, timeout=5) as resp:
                answers[path] = resp.status
        except urllib.error.HTTPError as exc:
            answers[path] = exc.code
    assert d.stop() == 0
    assert list(answers.values()) == [200, 200, 200, 404, 404]
    assert "Traceback" not in d.output()


def test_the_python_client_refuses_a_lone_surrogate_with_a_clear_error(tree):
    import pytest

    from nomaflowd.client import drop

    tree.spool.mkdir(parents=True)
    with pytest.raises(ValueError, match="not valid Unicode"):
        drop(tree.spool, {"job_id": "etl\ud800", "state": "NOTICE", "message": "m"})
    assert list(tree.spool.iterdir()) == []  # nothing half-written left behind
