"""What runners and visitors send that the CLI and the page must answer in one line, not a crash."""

from __future__ import annotations

import io
import json
import os
import select
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from nomaflowd import crypto
from nomaflowd.cli import main
from nomaflowd.serving import Server
from tests.harness import Tree
from tests.servers import Reply, closed_port, wait_until
from tests.test_web import bound_port

NOBODY = 65534


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


def test_emit_that_cannot_write_the_whole_event_fails_and_leaves_nothing(tree):
    """A disk that fills mid-write (here RLIMIT_FSIZE, 8 KiB: the same short write): emit
    said `dropped`, exit 0, renamed the cut file into the spool, and the daemon quarantined
    it as not JSON. The event must not be half delivered and reported sent."""
    import resource
    import signal

    tree.write_config()
    (tree.spool / "tmp").mkdir(parents=True)

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit: EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))

    out = subprocess.run(
        [sys.executable, "-m", "nomaflowd", "emit", "--config", str(tree.config_path),
         "--job", "big", "--run", "r1", "--state", "FAILED", "--error", "x" * 20_000],
        capture_output=True, text=True, preexec_fn=small_files, timeout=60)
    assert out.returncode == 1, out
    assert out.stdout == ""
    assert out.stderr.startswith(f"nomaflowd: cannot write into {tree.spool}: File too large")
    assert out.stderr.count("\n") == 1
    assert tree.spool_files() == []
    assert os.listdir(tree.spool / "tmp") == []


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


# --- the daemon's HTTP servers: clients that connect and say nothing ---------------------------

def silent_clients(port: int, count: int) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(count)]


def answer_past_the_limit(url: str, limit: int) -> tuple[int, bytes]:
    """What `url` answers while `limit` silent clients hold the server; then, once they
    hang up (each held thread ends with its client), it must answer 200 again."""
    port = int(url.split(":")[2].split("/")[0])
    held = silent_clients(port, limit)
    try:
        answer = status_of(url)
    finally:
        for sock in held:
            sock.close()
    wait_until(lambda: status_of(url)[0] == 200, what=f"{url} answering 200 again")
    return answer


def status_of(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_the_metrics_port_serves_16_connections_at_once_and_answers_more_503(
        tree, http, daemon_factory):
    tree.write_config(tree.webhook("ops", http.url()), daemon='metrics_listen = "127.0.0.1:0"')
    d = daemon_factory()
    assert answer_past_the_limit(f"http://127.0.0.1:{bound_port(d, 'metrics')}/healthz", 16) \
        == (503, b"too many connections; retry later\n")
    assert d.stop() == 0
    assert d.output().count("metrics: 16 connections open, the most it serves at once") == 1
    assert "Traceback" not in d.output()


def test_the_web_page_serves_32_connections_at_once(tree, http, daemon_factory):
    tree.write_config(tree.webhook("ops", http.url()), daemon='web_listen = "127.0.0.1:0"')
    d = daemon_factory()
    assert answer_past_the_limit(f"http://127.0.0.1:{bound_port(d)}/", 32)[0] == 503
    assert d.stop() == 0


class Hello(BaseHTTPRequestHandler):
    timeout = 5  # each read; the connection's own deadline is shorter

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "6")
        self.end_headers()
        self.wfile.write(b"hello\n")

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_a_connection_that_trickles_its_request_is_cut_at_its_deadline():
    server = Server("test", ("127.0.0.1", 0), Hello, max_connections=2,
                    connection_seconds=0.5)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        port = server.server_address[1]
        silent = socket.create_connection(("127.0.0.1", port), timeout=5)
        trickler = socket.create_connection(("127.0.0.1", port), timeout=5)
        # One byte of the request line every 0.1 s: each read well within its timeout.
        request = b"GET / HTTP/1.0\r\nX-Slow: " + b"y" * 100
        sent = 0
        for byte in request:
            try:
                trickler.send(bytes([byte]))
            except OSError:  # cut: reset or shut
                break
            sent += 1
            if select.select([trickler], [], [], 0.1)[0]:
                break  # the server closed it
        assert sent < len(request)
        assert trickler.recv(100) == b""
        assert silent.recv(100) == b""
        assert status_of(f"http://127.0.0.1:{port}/") == (200, b"hello\n")
        silent.close()
        trickler.close()
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# --- the CLI: every odd argument is one line, never "internal error" ----------------------------

@pytest.mark.parametrize(("argv", "says"), [
    (["audit", "--limit", "99999999999999999999"], "--limit"),
    (["audit", "--limit", "0"], "--limit"),
    (["audit", "--since", "99999999999d"], "--since"),
    (["audit", "--job", "j\udcff"], "--job"),
    (["audit", "--run", "r\udcfe"], "--run"),
    (["demo", "--port", "99999"], "--port"),
    (["demo", "--port", "-1"], "--port"),
])
def test_an_odd_cli_argument_is_a_usage_error_naming_it(tree, capsys, argv, says):
    tree.write_config()
    code = main([*argv, "--config", str(tree.config_path)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("nomaflowd: ") and err.count("\n") == 1 and says in err, err
    assert "internal error" not in err


def test_secret_encrypt_of_bytes_that_are_not_utf8_is_a_usage_error(tree, capsys, monkeypatch):
    tree.write_config()
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"\xff\xfe"),
                                                      errors="surrogateescape"))
    assert main(["secret", "encrypt", "--config", str(tree.config_path)]) == 2
    err = capsys.readouterr().err
    assert err == "nomaflowd: the secret on stdin is not UTF-8 text\n"


def test_explain_reads_no_further_than_the_event_limit(tree, capsys):
    tree.write_config()
    assert main(["explain", "/dev/zero", "--config", str(tree.config_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nomaflowd: /dev/zero: larger than the event limit of ")


def test_emit_into_a_spool_that_does_not_exist_says_what_to_do(tree, capsys):
    tree.write_config()  # the daemon has never run: no spool yet
    assert main(["emit", "--job", "j", "--run", "r", "--state", "FAILED",
                 "--config", str(tree.config_path)]) == 1
    err = capsys.readouterr().err
    assert err == (f"nomaflowd: cannot write into {tree.spool}: the spool directory does not"
                   " exist (the daemon creates it when it starts)\n")


def test_a_reader_that_stops_reading_ends_the_output_quietly(tree):
    tree.write_config()
    assert main(["audit", "--config", str(tree.config_path)]) == 0  # creates the database
    with sqlite3.connect(tree.db_path) as conn:  # more than a pipe holds
        conn.executemany(
            "INSERT INTO notifications (created_at, job_id, run_id, alert, level, transport,"
            " transport_type, recipient, outcome, detail, duration_ms, replica) VALUES"
            " ('2026-12-01 00:00:00', ?, 'r', 'failed', 'error', 'hook', 'webhook', 'hook',"
            " 'SENT', 'HTTP 200', 1, 'a')", [(f"job-{i}",) for i in range(3000)])
    proc = subprocess.run(
        f'"{sys.executable}" -m nomaflowd audit --format json --config "{tree.config_path}"'
        ' | head -c 1 >/dev/null; echo "${PIPESTATUS[0]}"',
        shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=60)
    assert proc.stderr == "", proc.stderr
    assert proc.stdout.strip() == "141"  # as a process that SIGPIPE ended


@pytest.fixture
def nobodys_tree():
    """A tree `nobody` can reach (pytest's own directories are root's alone)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run as another user")
    top = Path(tempfile.mkdtemp(prefix="nomaflowd-nobody-"))
    top.chmod(0o755)
    yield Tree(top / "t")
    shutil.rmtree(top)


def test_a_config_the_user_may_not_read_is_one_line(nobodys_tree):
    tree = nobodys_tree
    tree.write_config()
    tree.config_path.chmod(0o600)
    tree.config_path.parent.chmod(0o700)
    proc = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         sys.executable, "-m", "nomaflowd", "audit", "--config", str(tree.config_path)],
        capture_output=True, text=True, timeout=60, cwd=tree.root.parent)
    assert (proc.returncode, proc.stderr) == (
        2, f"nomaflowd: {tree.config_path} cannot be read (Permission denied)\n")


@pytest.mark.parametrize("command", [["run"], ["prune"], ["test", "hook"]])
def test_a_database_that_cannot_be_written_is_one_line_naming_the_key(tree, command):
    """The database file on a read-only mount (root writes through file modes)."""
    tree.write_config(tree.webhook("hook", f"http://127.0.0.1:{closed_port()}/x"))
    assert main(["audit", "--config", str(tree.config_path)]) == 0  # creates the database
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -m is not permitted here (needs root or CAP_SYS_ADMIN)")
    proc = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         'mount --bind -o ro "$0" "$0" && exec "$@"', str(tree.db_path),
         sys.executable, "-m", "nomaflowd", *command, "--config", str(tree.config_path)],
        capture_output=True, text=True, timeout=60, cwd=tree.root,
        env={**os.environ, "NOTIFY_SOCKET": ""})
    assert proc.returncode == 1, proc.stderr
    assert "internal error" not in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        "nomaflowd: daemon.database cannot be written: attempt to write a readonly database;"
        " the daemon's user needs write access to the database file and its directory")
    if command[0] == "test":  # the send happened: it says so before the database error
        assert proc.stdout.startswith("FAILED_TRANSPORT hook -> hook: connection refused")


TERMINAL_TRICKS = "a\x1b[2J\x1b]0;pwned\x07b\rOVERWRITE\x9b31m"


def test_explain_shows_an_events_control_characters_instead_of_obeying_them(tree, capsys):
    tree.write_config('[transports.mail]\ntype = "email"\nhost = "127.0.0.1"\nport = 25\n'
                      'tls = "none"\ndefault_from = "n@corp.local"\n'
                      'default_recipient = "ops@corp.local"\n')
    event = tree.root / "e.json"
    event.write_text(json.dumps({"job_id": "j", "run_id": "r", "state": "FAILED",
                                 "error": TERMINAL_TRICKS, "step": 'say "hi"\\there'}))
    assert main(["explain", str(event), "--config", str(tree.config_path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\r" not in out and "\x9b" not in out
    assert "a\\x1b[2J\\x1b]0;pwned\\x07b" in out and "OVERWRITE\\x9b31m" in out
    assert "\n" in out  # still lines


def test_test_shows_an_upstreams_control_characters_instead_of_obeying_them(tree, http, capsys):
    http.default = Reply(500, ("bad" + TERMINAL_TRICKS + "\r\nouted").encode())
    tree.write_config(tree.webhook("evil", http.url()))
    assert main(["test", "evil", "--config", str(tree.config_path)]) == 1
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert "\x1b" not in out and "\x07" not in out and "\r" not in out
    assert out.startswith("FAILED_DELIVERY evil -> evil: HTTP 500: bada\\x1b[2J")


@pytest.mark.parametrize(("argv", "says"), [
    (["--job", "j", "--run", "r", "--state", "FAILED", "--notice", "hi"],
     "--notice makes a NOTICE event, not FAILED; leave out --state"),
    (["--json", "-", "--job", "j", "--state", "FAILED"],
     "--json gives the whole event; leave out --job, --state"),
    (["--job", "j", "--notice", ""], "--notice needs the message's text"),
    (["--job", "j", "--notice", "hi", "--to", ""], "--to needs a recipient"),
])
def test_emit_refuses_flags_it_would_silently_drop(tree, capsys, argv, says):
    tree.write_config()
    tree.spool.mkdir(parents=True)
    assert main(["emit", *argv, "--config", str(tree.config_path)]) == 2
    assert capsys.readouterr().err.startswith(f"nomaflowd: {says}")
    assert tree.spool_files() == []


def test_secret_encrypt_drops_the_line_end_a_windows_editor_left(tree, capsys, monkeypatch):
    tree.write_config()
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"https://hooks.example/x\r\n")))
    assert main(["secret", "encrypt", "--config", str(tree.config_path)]) == 0
    token = capsys.readouterr().out.strip()
    assert crypto.decrypt(tree.keys, token, "t").reveal() == "https://hooks.example/x"
