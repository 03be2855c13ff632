"""A canary secret in every secret field must show up nowhere: logs, audit rows, CLI output."""

from __future__ import annotations

import base64
import contextlib
import json
import signal
import socket
import sqlite3
import threading

import pytest

from nomaflowd import config
from nomaflowd.cli import main
from nomaflowd.transports import build
from nomaflowd.transports.base import DeliveryError
from tests.servers import ForwardProxy, Reply, closed_port, wait_until
from tests.test_transport_slack import make_alert

CANARY = "CANARY7f3a9"


def test_canary_secret_appears_nowhere(tree, http, daemon_factory, capsys, tmp_path):
    http.replies["/bad"] = Reply(500, b"upstream says no")
    http.replies["/echo"] = echo
    http.replies["/api"] = slack_api_echo
    dead = closed_port()
    tree.write_config(
        tree.webhook("good", http.url(f"/good/{CANARY}"),
                     f'headers = {{ Authorization = "{tree.enc("Bearer " + CANARY)}" }}\n'
                     f'signing_secret = "{tree.enc(CANARY)}"')
        + tree.webhook("bad", http.url(f"/bad/{CANARY}"))
        + tree.webhook("echo", http.url(f"/echo/{CANARY}"),
                       f'headers = {{ X-Api-Key = "{tree.enc(CANARY + "-key")}" }}')
        + tree.webhook("dead", f"http://{CANARY}.invalid:{dead}/{CANARY}")
        + tree.slack("slack", http.url(f"/services/T0/{CANARY}"))
        + '[transports.mail]\ntype = "email"\nhost = "127.0.0.1"\n'
        + f'port = {dead}\ndefault_from = "n@corp.local"\nusername = "u"\n'
        + f'password = "{tree.enc(CANARY)}"\n'
        + f'[transports.slackapp]\ntype = "slack"\nbot_token = "{tree.enc("xoxb-" + CANARY)}"\n'
        + f'api_url = "{http.url("/api")}"\ndefault_channel = "#ops"\n')
    d = daemon_factory()
    tree.drop({"job_id": "j", "run_id": "r", "state": "FAILED", "error": "boom"})
    rows = wait_until(lambda: len(tree.notifications()) == 7 and tree.notifications(),
                      timeout=20, what="seven audit rows")
    assert d.stop() == 0
    assert {r["outcome"] for r in rows} == {"SENT", "FAILED_DELIVERY", "FAILED_TRANSPORT"}
    outputs = [d.output(), json.dumps(rows)]
    with sqlite3.connect(tree.db_path) as conn:
        for table in ("notifications", "deliveries", "runs"):
            outputs.append(json.dumps(conn.execute(f"SELECT * FROM {table}").fetchall()))
    cfg = str(tree.config_path)
    event = tmp_path / "e.json"
    event.write_text(json.dumps({"job_id": "j", "run_id": "r2", "state": "FAILED"}))
    for argv in (["transports"], ["audit"], ["audit", "--format", "json"],
                 ["audit", "--format", "csv"], ["check"], ["explain", str(event)],
                 ["test", "dead"], ["test", "mail"], ["test", "bad"],
                 ["test", "echo"], ["test", "slackapp"]):
        main([*argv, "--config", cfg])
        captured = capsys.readouterr()
        outputs.append(captured.out + captured.err)
    for text in outputs:
        assert CANARY not in text
    assert any(CANARY in r.path for r in http.requests)  # it was really used
    assert any(r["transport"] == "echo" and "****" in r["detail"] for r in rows)
    [app] = [r for r in rows if r["transport"] == "slackapp"]
    assert app["outcome"] == "FAILED_DELIVERY" and "invalid_auth" in app["detail"]
    assert any(CANARY in r.headers.get("Authorization", "") for r in http.requests)


def slack_api_echo(request) -> Reply:
    """Slack's Web API refusing the token, its error quoting the Authorization header."""
    error = f"invalid_auth: token {request.headers.get('Authorization')} was revoked"
    return Reply(200, json.dumps({"ok": False, "error": error}).encode(),
                 {"Content-Type": "application/json"})


def echo(request) -> Reply:
    """A proxy or upstream that answers 400 quoting the whole request back, in plain text."""
    head = "\n".join(f"{k}: {v}" for k, v in request.headers.items())
    # Padding puts the secret across the 200-character cut of a plain-text refusal.
    text = f"{'x' * 150} bad request: POST {request.path}\n{head}\n\n"
    return Reply(400, text.encode() + request.body, {"Content-Type": "text/plain"})


def echo_json(request) -> Reply:
    """PagerDuty's error shape, with the request quoted into the error list."""
    body = {"status": "invalid event", "message": "Event object is invalid",
            "errors": [f"routing_key {request.json().get('routing_key')} is not valid",
                       f"request {request.path} {request.headers.get('Authorization')}"]}
    return Reply(400, json.dumps(body).encode(), {"Content-Type": "application/json"})


def test_an_upstream_that_echoes_the_request_never_shows_the_secret(tree, http, capsys):
    http.replies["/json"] = echo_json
    http.replies["/"] = echo  # after /json: the first matching prefix answers
    tree.write_config(
        tree.webhook("hook", http.url(f"/hook/{CANARY}?token={CANARY}x"),
                     f'headers = {{ Authorization = "{tree.enc("Bearer " + CANARY)}" }}\n'
                     f'signing_secret = "{tree.enc(CANARY)}"')
        + tree.slack("slack", http.url(f"/services/T0/{CANARY}"))
        + tree.webhook("pd", http.url(f"/pd/{CANARY}"),
                       f'preset = "pagerduty"\nrouting_key = "{tree.enc(CANARY + "rk")}"')
        + tree.webhook("pdjson", http.url(f"/json/{CANARY}"),
                       f'preset = "pagerduty"\nrouting_key = "{tree.enc(CANARY + "rk")}"')
        + tree.webhook("og", http.url(f"/og/{CANARY}"),
                       f'preset = "opsgenie"\napi_key = "{tree.enc(CANARY + "key")}"')
        + tree.webhook("teams", http.url(f"/workflows/{CANARY}/invoke?sig={CANARY}sig"),
                       'preset = "teams"')
        + tree.webhook("discord", http.url(f"/api/webhooks/123/{CANARY}"), 'preset = "discord"')
        + tree.webhook("gchat", http.url(f"/v1/spaces/{CANARY}/messages?key={CANARY}k"
                                         f"&token={CANARY}t"), 'preset = "google_chat"'))
    cfg = str(tree.config_path)
    outputs = []
    names = ("hook", "slack", "pd", "pdjson", "og", "teams", "discord", "gchat")
    for name in names:
        assert main(["test", name, "--config", cfg]) == 1
        captured = capsys.readouterr()
        assert captured.out.startswith(f"FAILED_DELIVERY {name} ->")
        outputs.append(captured.out + captured.err)
    for argv in (["audit"], ["audit", "--format", "json"], ["transports"]):
        main([*argv, "--config", cfg])
        captured = capsys.readouterr()
        outputs.append(captured.out + captured.err)
    rows = tree.notifications()
    assert len(rows) == len(names) and all("400" in r["detail"] for r in rows)
    assert any("****" in r["detail"] for r in rows)
    outputs.append(json.dumps(rows))
    # No piece either: the secret cut in two by a clipped detail leaves its first half.
    for text in outputs:
        assert "CANARY" not in text
    # really sent
    assert sum(CANARY in r.body.decode() + r.path for r in http.requests) >= len(names)


def test_a_stray_cr_in_a_header_secret_is_refused_without_showing_it(tree, http, capsys):
    token = tree.enc(f"Bearer {CANARY}\r\n")
    tree.write_config(tree.webhook("hook", http.url(),
                                   f'headers = {{ Authorization = "{token}" }}'))
    cfg = str(tree.config_path)
    assert main(["run", "--config", cfg]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "transports.hook.headers.Authorization has an invalid character (CR/LF)" in err
    assert main(["check", "--config", cfg]) == 1
    out = capsys.readouterr().out
    assert "transports.hook.headers.Authorization" in out
    assert "CANARY" not in err + out and "Invalid header" not in err + out


def test_a_stray_cr_in_a_header_is_a_masked_failure_at_send(http):
    from nomaflowd.alerts import test_alert
    from nomaflowd.crypto import Secret
    from nomaflowd.transports import TransportError
    from nomaflowd.transports.webhook import Webhook

    # Built directly: config refuses this value, but a send must never log it either.
    hook = Webhook("hook", {"url": Secret(http.url()), "headers": {
        "Authorization": Secret(f"Bearer {CANARY}\r")}}, timeout=2)
    with pytest.raises(TransportError) as info:
        hook.send(test_alert("https://nomaflow.test"), "hook")
    assert str(info.value) == "header Authorization has an invalid character (CR/LF)"
    hook = Webhook("hook", {"url": Secret(http.url(f"/{CANARY} x")), "headers": {}}, timeout=2)
    with pytest.raises(TransportError) as info:
        hook.send(test_alert("https://nomaflow.test"), "hook")
    assert str(info.value) == "the URL is not valid (a space or control character)"
    assert http.requests == []


@pytest.mark.parametrize("field", [
    f'webhook_url = ["{CANARY}"]',
    f'webhook_url = {{ url = "{CANARY}" }}',
    'webhook_url = 7731',
])
def test_a_wrongly_typed_secret_is_refused_without_showing_it(tree, capsys, field):
    tree.write_config(f'[transports.slack]\ntype = "slack"\n{field}\n')
    assert main(["run", "--config", str(tree.config_path)]) == 2
    err = capsys.readouterr().err
    assert err == "nomaflowd: transports.slack.webhook_url must be a string\n"


@pytest.mark.parametrize("field", [
    f'headers = {{ Authorization = ["{CANARY}"] }}',
    f'headers = "Bearer {CANARY}"',
])
def test_a_wrongly_typed_header_is_refused_without_showing_it(tree, http, capsys, field):
    tree.write_config(tree.webhook("hook", http.url(), field))
    assert main(["check", "--config", str(tree.config_path)]) == 1
    out = capsys.readouterr().out
    assert "transports.hook.headers" in out and "CANARY" not in out


def test_a_reload_with_a_wrongly_typed_secret_logs_the_key_only(tree, http, daemon_factory):
    tree.write_config(tree.webhook("hook", http.url()))
    d = daemon_factory()
    tree.write_config(f'[transports.hook]\ntype = "webhook"\nurl = {{ x = "{CANARY}" }}\n')
    d.signal(signal.SIGHUP)
    wait_until(lambda: "reload refused" in d.output(), what="the reload refusal")
    assert d.stop() == 0
    assert "transports.hook.url must be a string" in d.output()
    assert CANARY not in d.output()


class EchoingSmtp:
    """An SMTP server that offers one AUTH mechanism and refuses it quoting what the client
    sent, credentials and all (LOGIN: the password's line)."""

    def __init__(self, mechanism: str) -> None:
        self.mechanism = mechanism.encode()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, name="echoing-smtp", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.listener.accept()
                with conn, conn.makefile("rb") as lines:
                    conn.sendall(b"220 echo\r\n")
                    for line in lines:
                        verb = line[:4].upper()
                        if verb == b"EHLO":
                            conn.sendall(b"250-echo\r\n250 AUTH " + self.mechanism + b"\r\n")
                        elif line.upper().startswith(b"AUTH LOGIN"):
                            conn.sendall(b"334 UGFzc3dvcmQ6\r\n")
                        elif verb == b"QUIT":
                            conn.sendall(b"221 bye\r\n")
                            break
                        else:
                            conn.sendall(b"535 5.7.8 authentication failed for "
                                         + line.strip() + b"\r\n")

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        self.listener.close()
        self.thread.join(5)


def test_credentials_as_the_libraries_encode_them_never_show(tree, http, capsys):
    """Basic auth from a proxy URL, SMTP AUTH in base64, an answer cut before it was masked,
    a URL re-encoded for threading: the forms a secret takes on the way out are masked too."""
    proxy = ForwardProxy(echo=True)
    plain, login = EchoingSmtp("PLAIN"), EchoingSmtp("LOGIN")
    try:
        pad = "x" * 174  # the 200-character cut of an error falls inside the token
        http.replies["/slackapi"] = lambda r: Reply(
            200, json.dumps({"ok": False, "error": f"{pad} token {r.headers['Authorization']}"
                             }).encode(), {"Content-Type": "application/json"})
        http.replies["/og"] = lambda r: Reply(
            202, json.dumps({"requestId": "r" * 40 + " " + r.headers["Authorization"]}).encode(),
            {"Content-Type": "application/json"})
        http.replies["/"] = echo
        via = tree.enc(f"http://u:{CANARY}@127.0.0.1:{proxy.port}")
        dead = closed_port()
        tree.write_config(
            tree.webhook("plainproxy", f"http://127.0.0.1:{dead}/x", f'proxy = "{via}"')
            + tree.webhook("tlsproxy", f"https://127.0.0.1:{dead}/x", f'proxy = "{via}"')
            + "".join(f'[transports.{name}]\ntype = "email"\nhost = "127.0.0.1"\n'
                      f'port = {server.port}\ntls = "none"\ndefault_from = "n@corp.local"\n'
                      f'username = "u"\npassword = "{tree.enc(CANARY)}"\n'
                      for name, server in (("plain", plain), ("login", login)))
            + f'[transports.slackapp]\ntype = "slack"\nbot_token = "{tree.enc("xoxb-" + CANARY)}"\n'
            + f'api_url = "{http.url("/slackapi")}"\ndefault_channel = "#ops"\n'
            + tree.webhook("og", http.url("/og"),
                           f'preset = "opsgenie"\napi_key = "{tree.enc(CANARY + "key")}"')
            + tree.webhook("gchat", http.url(f"/v1/spaces/AAAA/messages?key={CANARY}k"
                                             f"&token=ab/cd+{CANARY}t"),
                           'preset = "google_chat"'))
        cfg = str(tree.config_path)
        outputs = []
        for name in ("plainproxy", "tlsproxy", "plain", "login", "slackapp", "og"):
            main(["test", name, "--config", cfg])
            captured = capsys.readouterr()
            outputs.append(captured.out + captured.err)
        # A job's alert goes to its Google Chat thread (the URL gains a parameter).
        transport = build(config.load(tree.config_path).transports, 5)["gchat"]
        with pytest.raises(DeliveryError) as refused:
            transport.send(make_alert("failed", minutes=1), "gchat")
        outputs.append(str(refused.value))
        for argv in (["audit"], ["audit", "--format", "json"]):
            main([*argv, "--config", cfg])
            outputs.append(capsys.readouterr().out)
        rows = tree.notifications()
        outputs.append(json.dumps(rows))
        assert {r["transport"]: r["outcome"] for r in rows} == {
            "plainproxy": "FAILED_DELIVERY", "tlsproxy": "FAILED_TRANSPORT",
            "plain": "FAILED_TRANSPORT", "login": "FAILED_TRANSPORT",
            "slackapp": "FAILED_DELIVERY", "og": "SENT"}
        forms = {CANARY, b64(f"u:{CANARY}"), b64(f"\0u\0{CANARY}"), b64(CANARY)}
        for text in outputs:
            assert "CANARY" not in text
            for form in forms:
                assert form[:12] not in text, (form, text)
        assert "Proxy-Authorization: Basic ****" in outputs[0]  # it was there, masked
    finally:
        proxy.close()
        plain.close()
        login.close()


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()
