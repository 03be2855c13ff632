"""HTTP transports on requests: proxies (the transport's own, the environment's), private
CAs, and the whole-request deadline, against real local servers (SPEC section 14)."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
import trustme

from nomaflowd import alerts, config
from nomaflowd.cli import main
from nomaflowd.dispatch import FAILED_DELIVERY, FAILED_TRANSPORT, SENT, Attempt, attempt_once
from nomaflowd.transports import build
from nomaflowd.transports.base import DEADLINES, RateLimited
from tests.servers import ForwardProxy, HttpRecorder, ScriptedHttp, SilentTls


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def https(ca: trustme.CA) -> Iterator[HttpRecorder]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    server = HttpRecorder(tls=context)
    yield server
    server.close()


@pytest.fixture
def proxy() -> Iterator[ForwardProxy]:
    p = ForwardProxy()
    yield p
    p.close()


def send(tree, body: str, name: str = "hook"):
    cfg = config.load(tree.write_config(body))
    transports = build(cfg.transports, cfg.send_timeout_seconds)
    try:
        alert = alerts.test_alert("https://n.test")
        return attempt_once(transports[name], Attempt(alert, name, name))
    finally:
        transports[name].close()


def ca_file(tree, ca: trustme.CA) -> str:
    path = tree.etc / "private-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return f'ca_file = "{path}"\n'


def test_a_private_ca_is_trusted_with_ca_file_and_refused_without(tree, https, ca):
    refused = send(tree, tree.webhook("hook", https.url()))
    assert refused.outcome == FAILED_TRANSPORT
    assert "certificate verify failed" in refused.detail
    assert https.requests == []
    trusted = send(tree, tree.webhook("hook", https.url(), ca_file(tree, ca)))
    assert trusted.outcome == SENT, trusted.detail
    assert https.wait_for(1)[0].json()["alert"] == "test"


def test_https_trusts_what_the_host_trusts_as_email_does(tree, https, ca, monkeypatch):
    """A CA the host trusts (a corporate CA installed with update-ca-certificates; here
    $SSL_CERT_FILE, which OpenSSL reads as the host's bundle) is trusted by the HTTP
    transports without ca_file, as SMTP's STARTTLS and curl trust it. requests alone used
    certifi's own copy of the public CAs, so a webhook and an email to the same internal
    host disagreed."""
    bundle = tree.etc / "host-bundle.pem"
    ca.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    sent = send(tree, tree.webhook("hook", https.url()))
    assert sent.outcome == SENT, sent.detail
    assert https.wait_for(1)[0].json()["alert"] == "test"


def test_without_a_host_bundle_https_falls_back_to_certifi():
    """A host with no CA bundle at all (a minimal container) still verifies public hosts:
    certifi's copy, which requests ships with."""
    import ssl

    import certifi

    from nomaflowd.transports.http_client import host_trust

    none = ssl.DefaultVerifyPaths(None, None, "SSL_CERT_FILE", "/nonexistent/cert.pem",
                                  "SSL_CERT_DIR", "/nonexistent/certs")
    assert host_trust(none) == certifi.where()
    found = ssl.DefaultVerifyPaths(certifi.where(), None, "SSL_CERT_FILE", certifi.where(),
                                   "SSL_CERT_DIR", "/nonexistent/certs")
    assert host_trust(found) == certifi.where()


def test_a_certificate_for_another_host_is_refused_even_from_a_trusted_ca(tree, ca):
    """The CA is trusted (ca_file), but the certificate names another host: no send."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("other.test").configure_cert(context)
    server = HttpRecorder(tls=context)
    try:
        refused = send(tree, tree.webhook("hook", server.url(), ca_file(tree, ca)))
        assert refused.outcome == FAILED_TRANSPORT
        assert refused.detail.startswith("TLS error"), refused.detail
        assert server.requests == []
    finally:
        server.close()


def test_the_transports_own_proxy_carries_plain_http(tree, http, proxy):
    result = send(tree, tree.webhook("hook", http.url("/via"), f'proxy = "{proxy.url}"'))
    assert result.outcome == SENT, result.detail
    assert http.wait_for(1)[0].path == "/via"
    assert proxy.seen == [f"POST {http.url('/via')} HTTP/1.1"]


def test_https_goes_through_the_proxy_as_a_connect_tunnel(tree, https, proxy, ca):
    result = send(tree, tree.webhook("hook", https.url(),
                                     f'proxy = "{proxy.url}"\n' + ca_file(tree, ca)))
    assert result.outcome == SENT, result.detail
    assert [line.rsplit(" ", 1)[0] for line in proxy.seen] == [f"CONNECT 127.0.0.1:{https.port}"]
    assert len(https.wait_for(1)) == 1


def test_proxies_come_from_the_environment_and_no_proxy_is_honoured(tree, http, proxy,
                                                                    monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert send(tree, tree.webhook("hook", http.url("/env"))).outcome == SENT
    assert proxy.seen == [f"POST {http.url('/env')} HTTP/1.1"]
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    assert send(tree, tree.webhook("hook", http.url("/direct"))).outcome == SENT
    assert len(proxy.seen) == 1
    assert [r.path for r in http.requests] == ["/env", "/direct"]


def test_test_through_a_refusing_proxy_says_so_in_one_line(tree, https, capsys):
    refusing = ForwardProxy(refuse=True)
    try:
        tree.write_config(tree.webhook("hook", https.url(), f'proxy = "{refusing.url}"'))
        assert main(["test", "hook", "--config", str(tree.config_path)]) == 1
    finally:
        refusing.close()
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1
    assert "FAILED_TRANSPORT" in out and "proxy refused to tunnel" in out


def test_transports_shows_the_proxy_host_and_never_its_password(tree, http, proxy, capsys):
    with_password = proxy.url.replace("http://", "http://ops:CANARYPROXYPASS@")
    tree.write_config(tree.webhook("hook", http.url(), f'proxy = "{tree.enc(with_password)}"'))
    assert main(["transports", "--config", str(tree.config_path)]) == 0
    out = capsys.readouterr().out
    assert f"via proxy http://127.0.0.1:{proxy.port}" in out
    assert "CANARYPROXYPASS" not in out and "ops" not in out.split("via proxy")[1]


def test_a_plaintext_password_in_a_proxy_is_refused(tree, capsys):
    tree.write_config(tree.webhook("hook", "http://127.0.0.1:1/x",
                                   'proxy = "http://ops:CANARYPROXYPASS@proxy.corp.test:3128"'))
    assert main(["check", "--config", str(tree.config_path)]) == 1
    out = capsys.readouterr()
    assert "transports.hook.proxy holds a password in plaintext" in out.out + out.err
    assert "CANARYPROXYPASS" not in out.out + out.err


def test_a_tls_handshake_that_never_completes_is_cut_at_the_send_timeout(tree):
    silent = SilentTls()
    try:
        result = send(tree, tree.webhook("hook", f"https://127.0.0.1:{silent.port}/x"))
    finally:
        silent.close()
    assert result.outcome == FAILED_TRANSPORT
    assert "timed out" in result.detail
    assert result.duration_ms < 4000  # send_timeout_seconds = 2 in the test tree


def test_a_missing_ca_file_is_refused_at_start_naming_the_key(tree, capsys):
    tree.write_config(tree.webhook("hook", "https://hooks.example/x",
                                   'ca_file = "no-such-ca.pem"'))
    assert main(["check", "--config", str(tree.config_path)]) == 1
    out = capsys.readouterr()
    assert "transports.hook.ca_file: no such file" in out.out + out.err


def test_a_shorter_deadline_watched_later_still_cuts_its_read_on_time():
    """The deadline thread sleeps until the earliest deadline it knows; a later watch with
    an earlier deadline (another transport's shorter timeout) must wake it."""
    pairs = [socket.socketpair() for _ in range(3)]
    (long_a, _), (first_a, _), (short_a, _) = pairs
    try:
        start = time.monotonic()
        with DEADLINES.watch(lambda: long_a, start + 60) as long_watch:
            # Once this one is cut, the thread sleeps towards the 60 s deadline.
            with DEADLINES.watch(lambda: first_a, start + 0.1):
                assert first_a.recv(1) == b""
            with DEADLINES.watch(lambda: [short_a], time.monotonic() + 0.3) as short_watch:
                assert short_a.recv(1) == b""  # until the deadline shuts it down
            assert short_watch.fired
            assert time.monotonic() - start < 3
        assert not long_watch.fired
    finally:
        for pair in pairs:
            for sock in pair:
                sock.close()


def test_sends_share_a_connection_and_connect_again_when_the_upstream_hangs_up(tree):
    """Sends to one webhook reuse one kept-alive connection. An upstream that closes it while
    it sits idle, or answers `Connection: close`, costs no alert: the next send connects
    again. close() closes the connection a send left open."""
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    last = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    server = ScriptedHttp([ok, ok, ok, last, ok, ok], hang_up_after={1})
    cfg = config.load(tree.write_config(tree.webhook("hook", server.url())))
    hook = build(cfg.transports, cfg.send_timeout_seconds)["hook"]
    alert = alerts.test_alert("https://n.test")
    try:
        sends = [attempt_once(hook, Attempt(alert, "hook", "hook")) for _ in range(2)]
        assert server.hung_up.wait(5)
        sends += [attempt_once(hook, Attempt(alert, "hook", "hook")) for _ in range(3)]
        assert [r.outcome for r in sends] == [SENT] * 5, [r.detail for r in sends]
        assert server.connections == 3  # the first, after the hang-up, after the close
        # The client closed the second (`Connection: close`), before the third connected.
        assert server.closed_by_client.is_set()
        server.closed_by_client.clear()
        hook.close()
        assert server.closed_by_client.wait(5)
    finally:
        hook.close()
        server.close()


def test_an_answer_cut_short_by_the_upstream_is_no_verdict(tree):
    """A 200 whose body stops before its Content-Length, or before the last chunk, when the
    upstream hangs up: FAILED_TRANSPORT, saying so; the next send connects again."""
    answers = [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nok",
               b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nok",
               b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]
    server = ScriptedHttp(answers, hang_up_after={0, 1})
    cfg = config.load(tree.write_config(tree.webhook("hook", server.url())))
    hook = build(cfg.transports, cfg.send_timeout_seconds)["hook"]
    alert = alerts.test_alert("https://n.test")
    try:
        sends = [attempt_once(hook, Attempt(alert, "hook", "hook")) for _ in range(3)]
        assert [(r.outcome, r.detail) for r in sends] == [
            (FAILED_TRANSPORT, "the answer was cut short (connection closed)"),
            (FAILED_TRANSPORT, "the answer was cut short (connection closed)"),
            (SENT, "HTTP 200")]
        assert server.connections == 3
    finally:
        hook.close()
        server.close()


# --- answers read by nomaflowd's own header parser (transports/http_client.py, _read_head) --------

def test_answer_headers_are_read_as_http_client_reads_them(tree):
    """Folded headers, a 100 Continue before the answer, a chunked body and keep-alive: the
    parser that replaced the email package's one reads them all; a 429's Retry-After still
    counts; a line with no colon is skipped (the email parser ended the headers there, lost
    Content-Length and waited out the deadline); a garbled Retry-After means the default
    wait; a flood of headers or a header line over 64 KiB fails that one send."""
    answers = [
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Folded: one\r\n two\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 429 Too Many Requests\r\nretry-after:   7 \r\nContent-Length: 4\r\n\r\nslow",
        b"HTTP/1.1 500 Oops\r\nNo colon here\r\nContent-Length: 4\r\n\r\nboom",
        b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(120))
        + b"Content-Length: 2\r\n\r\nok",
        b"HTTP/1.1 429 Slow\r\nRetry-After: \x00\xff\x1b[2J\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 70_000 + b"\r\nContent-Length: 2\r\n\r\nok",
    ]
    server = ScriptedHttp(answers)
    cfg = config.load(tree.write_config(tree.webhook("hook", server.url())))
    transports = build(cfg.transports, cfg.send_timeout_seconds)
    hook = transports["hook"]
    try:
        alert = alerts.test_alert("https://n.test")
        first = attempt_once(hook, Attempt(alert, "hook", "hook"))
        assert first.outcome == SENT, first.detail
        with pytest.raises(RateLimited) as refused:
            hook.send(alert, "hook")
        assert refused.value.retry_after == 7.0
        third = attempt_once(hook, Attempt(alert, "hook", "hook"))
        assert (third.outcome, "500" in third.detail) == (FAILED_DELIVERY, True), third.detail
        fourth = attempt_once(hook, Attempt(alert, "hook", "hook"))
        assert fourth.outcome == FAILED_TRANSPORT, fourth.detail  # as http.client refuses it
        assert fourth.detail == "not a valid HTTP answer (HTTPException)"
        with pytest.raises(RateLimited) as garbled:  # a Retry-After that is no number
            hook.send(alert, "hook")
        assert garbled.value.retry_after == 30.0
        assert "\x1b" not in str(garbled.value)
        long_line = attempt_once(hook, Attempt(alert, "hook", "hook"))
        assert long_line.outcome == FAILED_TRANSPORT, long_line.detail
        assert long_line.detail == "not a valid HTTP answer (LineTooLong)"
        assert len(server.heads) == 6
    finally:
        hook.close()
        server.close()


def test_each_post_on_a_kept_alive_connection_carries_its_own_head(tree, http):
    """The head of a POST is made once and kept while the URL and headers stay the same:
    bodies of other lengths, then other headers, then another path, on one connection, each
    arrive with their own Content-Length, headers and path, and the Host http.client sends."""
    cfg = config.load(tree.write_config(tree.webhook("hook", http.url())))
    hook = build(cfg.transports, cfg.send_timeout_seconds)["hook"]
    base = http.url().rstrip("/")
    sends = [(base + "/a", b'{"n":1}', {"X-Sig": "one"}),
             (base + "/a", b'{"n":22222}', {"X-Sig": "one"}),
             (base + "/a", b"{}", {"X-Sig": "two"}),
             (base + "/b?q=1", b'{"n":3}', {"X-Sig": "two"})]
    try:
        for url, body, headers in sends:
            status, _data, _headers = hook.post(url, body, headers)
            assert status == 200
        got = http.wait_for(4)
        assert len(http.connections) == 1
    finally:
        hook.close()
    host = urlsplit(base).netloc  # 127.0.0.1:port
    assert [(r.path, r.body, r.headers["X-Sig"], r.headers["Content-Length"], r.headers["Host"])
            for r in got] == [(url.split(host, 1)[1], body, headers["X-Sig"], str(len(body)),
                               host) for url, body, headers in sends]
