"""The notifications page, end to end: the daemon as a real process, requests as a browser
(or an attacker's page) would send them, and a real headless Chromium clicking Test."""

from __future__ import annotations

import base64
import os
import re
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.servers import wait_until

CANARY = "CANARY-7f3e9d-not-for-eyes"
PASSWORD = "web-pass-CANARY-41ab"
# Every run saves its screenshot under var/ (ignored by git); with
# NOMAFLOWD_UPDATE_SCREENSHOT=1 it also replaces the README's copy in docs/.
ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "var" / "notifications-page.png"
README_SCREENSHOT = ROOT / "docs" / "notifications-page.png"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def bound_port(daemon: Any, what: str = "web page") -> int:
    """The port a `...:0` listener got, from the daemon's log line (awaited, with a deadline)."""
    pattern = re.compile(rf"{what} listening on http://[^ ]*:(\d+)/")
    match = wait_until(lambda: pattern.search(daemon.output()), what=f"{what} log line")
    return int(match.group(1))


class Response:
    def __init__(self, status: int, headers: Any, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.text = body.decode("utf-8", "replace")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # the test looks at the 303 itself


OPENER = urllib.request.build_opener(_NoRedirect, urllib.request.ProxyHandler({}))


def fetch(url: str, *, data: bytes | None = None, headers: dict[str, str] | None = None,
          password: str | None = None) -> Response:
    request = urllib.request.Request(url, data=data, headers=headers or {})
    if password is not None:
        token = base64.b64encode(f"ops-person:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with OPENER.open(request, timeout=10) as resp:
            return Response(resp.status, resp.headers, resp.read())
    except urllib.error.HTTPError as exc:
        return Response(exc.code, exc.headers, exc.read())


def csrf_token(page: str) -> str:
    match = re.search(r"name=csrf value='([^']+)'", page)
    assert match, "no CSRF token on the page"
    return match.group(1)


class Web:
    """A daemon with the page on an ephemeral loopback port and one webhook transport `ops`."""

    def __init__(self, tree: Any, http: Any, daemon_factory: Any, daemon: str = "") -> None:
        tree.write_config(tree.webhook("ops", http.url(f"/hook/{CANARY}")),
                          daemon=f'web_listen = "127.0.0.1:0"\n{daemon}')
        self.start(daemon_factory)

    def start(self, daemon_factory: Any) -> None:
        self.daemon = daemon_factory()
        self.port = bound_port(self.daemon)
        self.base = f"http://127.0.0.1:{self.port}"

    def get(self, path: str = "/", **kwargs: Any) -> Response:
        return fetch(self.base + path, **kwargs)

    def post_test(self, name: str, token: str | None, headers: dict[str, str] | None = None,
                  **kwargs: Any) -> Response:
        body = b"" if token is None else f"csrf={token}&transport={name}".encode()
        return fetch(f"{self.base}/test/{name}", data=body, headers={
            "Content-Type": "application/x-www-form-urlencoded", **(headers or {})}, **kwargs)


@pytest.fixture
def web(tree, http, daemon_factory) -> Web:
    return Web(tree, http, daemon_factory)


def test_page_lists_transports_with_masked_destination_and_security_headers(web, http):
    page = web.get()
    assert page.status == 200
    assert "text/html" in page.headers["Content-Type"]
    assert "<td>ops<td>webhook<td>ops<td>" in page.text  # name, type, default recipient
    assert f"http://127.0.0.1:{http.port}" in page.text  # where it sends: host only
    assert "never used" in page.text
    assert CANARY not in page.text and "/hook/" not in page.text
    csp = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert "form-action 'self'" in csp
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert page.headers["Referrer-Policy"] == "same-origin"
    assert page.headers["Cache-Control"] == "no-store"


def test_test_button_sends_records_and_shows_the_outcome(web, tree, http):
    token = csrf_token(web.get().text)
    resp = web.post_test("ops", token, {"Origin": web.base})
    assert resp.status == 303
    location = resp.headers["Location"]
    assert re.fullmatch(r"/\?tested=[A-Za-z0-9_-]{20,}", location)
    body = http.wait_for(1)[0].json()
    assert body["alert"] == "test"
    rows = tree.notifications()
    assert [(r["alert"], r["transport"], r["outcome"]) for r in rows] == [("test", "ops", "SENT")]
    page = web.get(location).text
    assert re.search(r"id=banner>Test via <b>ops</b> to ops: <span class=SENT>SENT", page)
    assert "<span class=SENT>SENT</span>" in page  # the transport's last attempt
    assert CANARY not in page
    assert "notification test" in web.daemon.output()


def test_test_with_referer_of_the_page_and_no_origin_is_accepted(web, http):
    token = csrf_token(web.get().text)
    resp = web.post_test("ops", token, {"Referer": web.base + "/"})
    assert resp.status == 303
    http.wait_for(1)


@pytest.mark.parametrize("headers", [
    {"Origin": "http://evil.example"},
    {"Origin": "http://127.0.0.1:1"},                      # another port is another origin
    {"Origin": "null"},                                   # sandboxed frame, data: URL
    {"Referer": "http://evil.example/page"},
    {},                                                   # neither header: refused too
], ids=["foreign-origin", "other-port", "null-origin", "foreign-referer", "no-origin"])
def test_a_request_from_another_origin_cannot_trigger_test(web, tree, http, headers):
    token = csrf_token(web.get().text)  # even with a valid token
    resp = web.post_test("ops", token, headers)
    assert resp.status == 403
    # The send happens inside the request, before its answer: a 403 means nothing went out.
    assert http.requests == []
    assert tree.notifications() == []


def test_test_without_the_form_token_is_refused(web, tree, http):
    assert web.post_test("ops", None, {"Origin": web.base}).status == 403
    assert web.post_test("ops", "forged-token", {"Origin": web.base}).status == 403
    assert http.requests == [] and tree.notifications() == []


def test_test_of_an_unknown_transport_is_404(web, http):
    token = csrf_token(web.get().text)
    assert web.post_test("nope", token, {"Origin": web.base}).status == 404
    assert http.requests == []


def test_a_rebound_host_name_is_refused_on_loopback(web):
    # DNS rebinding: evil.example resolved to 127.0.0.1 by the attacker's DNS.
    resp = web.get(headers={"Host": f"evil.example:{web.port}"})
    assert resp.status == 421
    assert web.get(headers={"Host": f"localhost:{web.port}"}).status == 200


def test_basic_auth_is_required_when_a_password_is_set(tree, http, daemon_factory):
    web = Web(tree, http, daemon_factory, daemon=f'web_password = "{tree.enc(PASSWORD)}"')
    resp = web.get()
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"].startswith("Basic ")
    assert web.get(password="wrong").status == 401
    page = web.get(password=PASSWORD)
    assert page.status == 200 and "<td>ops<td>webhook" in page.text
    assert PASSWORD not in page.text and CANARY not in page.text
    # Test needs the password too, not only the token.
    token = csrf_token(page.text)
    assert web.post_test("ops", token, {"Origin": web.base}).status == 401
    assert web.post_test("ops", token, {"Origin": web.base}, password=PASSWORD).status == 303
    http.wait_for(1)
    assert PASSWORD not in web.daemon.output()



def test_the_page_follows_a_reload_transports_and_password(tree, http, daemon_factory):
    """README: the page's transports and its password follow a reload (the listen
    address waits for a restart)."""
    web = Web(tree, http, daemon_factory, daemon='web_password = "{}"'.format(
        tree.enc("old-pw-1")))
    assert web.get(password="old-pw-1").status == 200
    tree.write_config(tree.webhook("ops", http.url(f"/hook/{CANARY}"))
                      + tree.webhook("ops2", http.url("/two")),
                      daemon=f'web_listen = "127.0.0.1:0"\nweb_password = "{tree.enc("new-pw-2")}"')
    web.daemon.signal(signal.SIGHUP)
    wait_until(lambda: "reloaded" in web.daemon.output(), what="reload")
    assert web.get(password="old-pw-1").status == 401
    page = web.get(password="new-pw-2")
    assert page.status == 200 and "<td>ops2<td>webhook" in page.text


def test_non_loopback_page_keeps_its_password_when_a_reload_drops_it(tree, http,
                                                                      daemon_factory):
    webhook = tree.webhook("ops", http.url())
    tree.write_config(webhook, daemon='web_listen = "0.0.0.0:0"\n'
                                      f'web_password = "{tree.enc(PASSWORD)}"')
    d = daemon_factory()
    port = bound_port(d)
    assert f"web page listening on http://0.0.0.0:{port}/" in d.output()
    base = f"http://127.0.0.1:{port}/"
    assert fetch(base).status == 401
    assert fetch(base, headers={"Host": f"nomaflow.corp.example:{port}"},
                 password=PASSWORD).status == 200  # any host name: the password guards it
    tree.write_config(webhook)  # the operator removes the page's settings and reloads
    d.signal(signal.SIGHUP)
    wait_until(lambda: "reloaded" in d.output(), what="reload")
    assert fetch(base).status == 401  # still bound until a restart, still locked

def test_non_loopback_listen_without_password_is_refused_at_start(tree, http):
    tree.write_config(tree.webhook("ops", http.url()),
                      daemon='web_listen = "0.0.0.0:0"')
    proc = subprocess.run(
        [sys.executable, "-m", "nomaflowd", "run", "--config", str(tree.config_path)],
        capture_output=True, text=True, timeout=30, cwd=tree.root)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "daemon.web_password" in lines[0]
    assert "Traceback" not in proc.stderr


def test_a_busy_port_is_refused_at_start_with_one_line(tree, http):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        tree.write_config(tree.webhook("ops", http.url()),
                          daemon=f'web_listen = "127.0.0.1:{port}"')
        proc = subprocess.run(
            [sys.executable, "-m", "nomaflowd", "run", "--config", str(tree.config_path)],
            capture_output=True, text=True, timeout=30, cwd=tree.root)
    assert proc.returncode == 2
    assert f"daemon.web_listen 127.0.0.1:{port}: cannot listen" in proc.stderr
    assert "Traceback" not in proc.stderr


def _seed(tree: Any, rejected: str = "broken<b>.json") -> None:
    """A FAILED run (one notification), a RUNNING run with a deadline, a rejected file."""
    started = datetime.now(UTC) - timedelta(minutes=5)
    tree.drop({"job_id": "reporting-nightly-sync", "run_id": "run_a8c4d", "state": "FAILED",
               "step": "copy-orders", "error": "OperationalError: connection refused"})
    tree.drop({"job_id": "warehouse-load", "run_id": "run_77", "state": "RUNNING",
               "started_at": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
               "alerts": {"on_long_run_minutes": 30}})
    tree.spool.mkdir(parents=True, exist_ok=True)
    (tree.spool / rejected).write_text("{not json", encoding="utf-8")


def test_page_shows_runs_deadlines_rejects_and_escapes_everything(web, tree, http):
    _seed(tree)
    http.wait_for(1)
    wait_until(lambda: len(tree.notifications()) == 1 and not tree.spool_files(),
               what="events ingested")
    page = web.get().text
    assert "<td>warehouse-load<td>run_77<td>" in page
    deadline = tree.sql("SELECT long_run_deadline FROM runs WHERE run_id = 'run_77'")[0][0]
    assert deadline[:19] in page  # the long-run deadline is shown
    assert "broken&lt;b&gt;.json" in page and "broken<b>" not in page
    assert "<td>reporting-nightly-sync<td>run_a8c4d<td>failed<td>high<td>ops" in page
    # Hostile text in an audit row (a job id, a detail) is shown as text, never as markup.
    with sqlite3.connect(tree.db_path) as conn:
        conn.execute(
            "INSERT INTO notifications (created_at, job_id, alert, level, transport,"
            " transport_type, recipient, outcome, detail, replica) VALUES"
            " ('2026-05-01 00:00:00', '<script>alert(1)</script>', 'failed', 'high', 'ops',"
            " 'webhook', 'ops', 'FAILED_DELIVERY', '\"><img src=x onerror=alert(2)>', 'r')")
    page = web.get("/?job=%3Cscript%3Ealert(1)%3C/script%3E").text
    assert "<script>" not in page and "<img" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&quot;&gt;&lt;img src=x onerror=alert(2)&gt;" in page



@pytest.mark.postgres
def test_page_and_test_button_on_postgresql(tree, http, daemon_factory, pg_schema):
    tree.database = pg_schema
    web = Web(tree, http, daemon_factory)
    _seed(tree)
    http.wait_for(1)
    token = csrf_token(web.get().text)
    assert web.post_test("ops", token, {"Origin": web.base}).status == 303
    assert [r.json()["alert"] for r in http.wait_for(2)] == ["failed", "test"]
    page = web.get(f"/?tested={CANARY}").text
    assert "no longer kept" in page  # an id the page never gave out
    page = web.get().text
    assert "<span class=SENT>SENT</span>" in page and "<td>warehouse-load<td>run_77<td>" in page

    def filtered() -> str:  # the POST lands a moment before its audit row: await the row
        return web.get("/?job=reporting-nightly-sync&outcome=SENT&transport=ops").text

    row = "<td>reporting-nightly-sync<td>run_a8c4d<td>"
    assert wait_until(lambda: row in filtered() and filtered()).count(row) == 1
    none = web.get("/?job=reporting-nightly-sync&outcome=FAILED_DELIVERY").text
    assert "No notifications match" in none


def _insert_rows(db_path: Path, count: int) -> None:
    """`count` audit rows: 1000 jobs, 3 transports, 90% SENT; one transaction, no journal."""
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=OFF")  # the daemon is stopped; WAL comes back below
        conn.execute("PRAGMA synchronous=OFF")
        indexes = conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index'"
                               " AND tbl_name = 'notifications' AND sql IS NOT NULL").fetchall()
        conn.execute("BEGIN")
        for name, _ in indexes:  # building an index once is faster than growing it row by row
            conn.execute(f'DROP INDEX "{name}"')
        conn.execute(
            "WITH RECURSIVE seq(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM seq WHERE i < ?)"
            " INSERT INTO notifications (created_at, event_id, job_id, run_id, alert, level,"
            " transport, transport_type, recipient, outcome, detail, duration_ms, replica)"
            " SELECT datetime('2026-01-01', '+' || (i / 10) || ' seconds'), 'e' || i,"
            " 'job-' || (i % 1000), 'run-' || i, 'failed', 'high',"
            " CASE i % 3 WHEN 0 THEN 'ops' WHEN 1 THEN 'slack-eng' ELSE 'mail' END, 'webhook',"
            " 'ops', CASE i % 20 WHEN 17 THEN 'FAILED_TRANSPORT' WHEN 18 THEN 'FAILED_DELIVERY'"
            " ELSE 'SENT' END, 'HTTP 200', 12, 'host-a' FROM seq", (count - 1,))
        for _, sql in indexes:
            conn.execute(sql)
        conn.execute("COMMIT")
        conn.execute("PRAGMA journal_mode=WAL")
    finally:
        conn.close()


def test_page_stays_fast_with_a_million_audit_rows(tree, http, daemon_factory):
    web = Web(tree, http, daemon_factory)  # creates the tables
    assert web.daemon.stop() == 0
    started = time.monotonic()
    _insert_rows(tree.db_path, 1_000_000)
    print(f"\n1,000,000 rows inserted in {time.monotonic() - started:.1f}s")
    web.start(daemon_factory)
    cases = {
        "/": "<td class=num>1000000<td>",
        "/?job=job-7": "<td>job-7<td>run-999007<td>",
        "/?transport=mail": "<td class=num>999999<td>",
        "/?outcome=FAILED_DELIVERY": "<td class=num>999999<td>",
        "/?job=job-18&outcome=FAILED_DELIVERY": "<td>job-18<td>run-999018<td>",
        "/?job=job-7&outcome=FAILED_DELIVERY": "No notifications match",  # none: worst case
        "/?job=no-such-job&outcome=SENT": "No notifications match",
        "/?transport=ops&outcome=FAILED_TRANSPORT": "<td class=num>999958<td>",
        "/?before=500000": "<td class=num>499999<td>",
        "/?job=job-7&before=500000": "<td>job-7<td>run-499007<td>",
    }
    web.get()  # first request pays for opening the database file
    for path, expected in cases.items():
        t = time.monotonic()
        page = web.get(path)
        elapsed = time.monotonic() - t
        print(f"GET {path}: {elapsed * 1000:.0f} ms")
        assert page.status == 200, path
        assert expected in page.text, path
        assert elapsed < 2.0, f"{path} took {elapsed:.2f}s"
    page = web.get("/?job=job-7").text
    assert page.count("<td>job-7<td>") == 50
    older = re.search(r"id=older href='([^']+)'", page)
    assert older and "before=" in older.group(1)
    second = web.get(older.group(1).replace("&amp;", "&")).text
    assert "<td>job-7<td>run-949007<td>" in second and "run-999007" not in second


# --- a real browser ------------------------------------------------------------------------

def _browser() -> Any:
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.skip("needs Debian's chromium and chromium-driver:"
                    " apt-get install -y chromium chromium-driver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("needs selenium: pip install selenium")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--window-size=1280,900"):
        options.add_argument(arg)
    return webdriver, Service, options


def test_browser_clicks_test_and_sees_sent(tree, http, daemon_factory, tmp_path):
    webdriver, service_class, options = _browser()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    web = Web(tree, http, daemon_factory)
    _seed(tree, "evt-20260526-0042.json")
    http.wait_for(1)
    wait_until(lambda: len(tree.notifications()) == 1 and not tree.spool_files(),
               what="events ingested")
    driver = webdriver.Chrome(service=service_class(CHROMEDRIVER, log_output=str(
        tmp_path / "chromedriver.log")), options=options)
    try:
        driver.set_page_load_timeout(20)
        driver.get(web.base + "/")
        assert driver.title.startswith("Notifications")
        driver.find_element(By.CSS_SELECTOR, "form[action='/test/ops'] button").click()
        banner = WebDriverWait(driver, 15).until(
            expected_conditions.presence_of_element_located((By.ID, "banner")))
        assert "SENT" in banner.text and "ops" in banner.text
        assert re.fullmatch(re.escape(web.base) + r"/\?tested=[A-Za-z0-9_-]+",
                            driver.current_url)
        assert CANARY not in driver.page_source
        SCREENSHOT.parent.mkdir(exist_ok=True)
        driver.save_screenshot(str(SCREENSHOT))
    finally:
        driver.quit()
    requests = http.wait_for(2)
    assert [r.json()["alert"] for r in requests] == ["failed", "test"]
    rows = tree.notifications()
    assert [(r["alert"], r["outcome"]) for r in rows] == [("failed", "SENT"), ("test", "SENT")]
    assert SCREENSHOT.stat().st_size > 10_000
    if os.environ.get("NOMAFLOWD_UPDATE_SCREENSHOT"):
        shutil.copyfile(SCREENSHOT, README_SCREENSHOT)


# --- what runners and visitors send: never a 500 ------------------------------------------

def test_test_banner_is_shown_only_to_the_visitor_who_pressed_test(web, http):
    token = csrf_token(web.get().text)
    mine = web.post_test("ops", token, {"Origin": web.base}).headers["Location"]
    http.wait_for(1)
    assert "id=banner>Test via <b>ops</b>" in web.get(mine).text
    # Another visitor, with the old form of the link or none, sees no one else's result.
    for other in ("/?tested=ops", "/", "/?tested=" + mine.split("=", 1)[1][:-1]):
        assert "Test via" not in web.get(other).text
    again = web.post_test("ops", token, {"Origin": web.base}).headers["Location"]
    assert again != mine
    assert "Test via <b>ops</b>" in web.get(mine).text  # each press keeps its own banner


def test_a_rejected_file_whose_name_is_not_utf8_is_listed(web, tree):
    rejected = os.fsencode(tree.spool / "rejected")
    with open(rejected + b"/run-\xff\xfe<b>.json", "wb") as fh:
        fh.write(b"{not json")
    with open(rejected + b"/run-\xff\xfe<b>.json.error", "wb") as fh:
        fh.write(b"2026-05-01T00:00:00Z run-\xff\xfe.json: not JSON \xff\n")
    page = web.get()
    assert page.status == 200
    assert "<td>run-\ufffd\ufffd&lt;b&gt;.json<td>2026-05-01T00:00:00Z" in page.text
    assert "1 in " in page.text


def test_a_rejected_file_whose_name_starts_with_a_dot_is_listed(web, tree):
    """A runner's `.evt-7.json` is quarantined like any other; only the daemon's own dot
    files (a note being written, a replica's list of files in hand) are not listed."""
    rejected = tree.spool / "rejected"
    (rejected / ".evt-7.json").write_text("{not json")
    (rejected / ".evt-7.json.error").write_text("2026-05-01T00:00:00Z .evt-7.json: not JSON\n")
    (rejected / ".other.json.error.0123abcd").write_text("a note being written\n")
    (rejected / ".handling-local").write_text("")
    page = web.get()
    assert "<td>.evt-7.json<td>2026-05-01T00:00:00Z" in page.text
    assert "1 in " in page.text and "being written" not in page.text


@pytest.mark.parametrize(("query", "message"), [
    ("before=" + "9" * 400, "before must be a row number"),
    ("before=%C2%B2", "before must be a row number"),                # "²" passes isdigit()
    ("before=-1", "before must be a row number"),
    ("rejected=" + "9" * 30, "rejected must be a row number"),
    ("&".join(f"f{i}=x" for i in range(21)), "too many query fields (at most 20)"),
    ("job=a%00b", "a query value holds a NUL character"),
], ids=["huge-before", "unicode-digit", "negative", "huge-offset", "21-fields", "nul"])
def test_an_abusive_query_is_a_short_400(web, query, message):
    resp = web.get(f"/?{query}")
    assert (resp.status, resp.text) == (400, f"{message}\n")
    assert "Traceback" not in web.daemon.output()


@pytest.mark.parametrize("path", [
    "/?nonsense=%ff%fe&job=" + "x" * 5000,   # unknown fields ignored, filters clipped
    "/?transport=%3Cb%3E&outcome=NOPE",
    "/?before=",
    "/?tested=" + "A" * 300,
])
def test_garbage_parameters_are_ignored(web, path):
    resp = web.get(path)
    assert resp.status == 200 and "<h1>Notifications</h1>" in resp.text


def test_a_malformed_path_or_form_is_never_a_500(web):
    raw = socket.create_connection(("127.0.0.1", web.port), timeout=10)
    with raw:
        raw.sendall(f"GET //[x HTTP/1.0\r\nHost: 127.0.0.1:{web.port}\r\n\r\n".encode())
        answer = raw.makefile("rb").read().decode("utf-8", "replace")
    assert answer.startswith("HTTP/1.0 404")  # not a netloc: "//" is folded to "/"
    token = csrf_token(web.get().text)
    resp = fetch(f"{web.base}/test/ops", data=("&".join(["a=b"] * 11) + f"&csrf={token}").encode(),
                 headers={"Origin": web.base})
    assert (resp.status, resp.text) == (400, "too many form fields\n")
    resp = web.post_test("ops", token, {"Origin": "http://["})
    assert resp.status == 403
    assert "Traceback" not in web.daemon.output()


def test_twenty_thousand_rejected_files_are_paged(web, tree):
    rejected = tree.spool / "rejected"
    base = time.time_ns() - 10**12
    for i in range(20_000):
        note = rejected / f"evt-{i:05d}.json.error"
        note.write_text(f"2026-05-01T00:00:00Z evt-{i:05d}.json: reason {i}\n")
        os.utime(note, ns=(base + i * 1000, base + i * 1000))  # evt-19999 is the newest
    page = web.get()
    assert page.status == 200
    assert "id=rejected-count>20000 in " in page.text
    assert "showing 1 to 50, newest first" in page.text
    shown = re.findall(r"<td>(evt-\d{5})\.json<td>", page.text)
    assert shown == [f"evt-{i:05d}" for i in range(19_999, 19_949, -1)]
    older = re.search(r"id=rejected-older href='([^']+)'", page.text)
    assert older
    second = web.get(older.group(1).replace("&amp;", "&").split("#")[0]).text
    assert "showing 51 to 100, newest first" in second
    assert re.findall(r"<td>(evt-\d{5})\.json<td>", second)[0] == "evt-19949"
    last = web.get("/?rejected=19990").text
    assert "showing 19991 to 20000" in last and "id=rejected-older" not in last
    assert "<td>evt-00000.json<td>" in last


def test_a_rejected_name_cannot_reorder_or_hide_itself_on_the_page(web, tree):
    rejected = tree.spool / "rejected"
    for name in ("bidi\u202e\u2066nosj.json", "\u200bzero\u061cal.json"):
        (rejected / name).write_bytes(b"{not json")
        (rejected / f"{name}.error").write_text("2026-05-01T00:00:00Z x: not JSON\n")
    page = web.get().text
    for char in ("\u202e", "\u2066", "\u200b", "\u061c"):
        assert char not in page
    assert "bidi\\u202e\\u2066nosj.json" in page and "\\u200bzero\\u061cal.json" in page


def test_a_visitor_who_hangs_up_is_no_database_outage(web):
    """A closed tab resets the connection while the page is written: nothing to log at
    error level, and above all not "database unavailable"."""
    for _ in range(3):
        sock = socket.create_connection(("127.0.0.1", web.port))
        sock.sendall(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # RST
    assert web.get().status == 200  # served after them
    assert web.daemon.stop() == 0
    assert "database unavailable" not in web.daemon.output()
    assert " ERROR " not in web.daemon.output()


def test_a_test_from_the_page_is_counted_in_the_metrics(tree, http, daemon_factory):
    web = Web(tree, http, daemon_factory, daemon='metrics_listen = "127.0.0.1:0"')
    token = csrf_token(web.get().text)
    assert web.post_test("ops", token, {"Origin": web.base}).status == 303
    metrics = fetch(f"http://127.0.0.1:{bound_port(web.daemon, 'metrics')}/metrics").text
    assert re.search(r'nomaflowd_notifications_total\{alert="test",outcome="SENT",'
                     r'transport="ops",transport_type="webhook"\} 1\.0', metrics), metrics


def test_a_page_connection_may_last_30_s_plus_the_send_timeout_a_reload_set(tree):
    """README: each connection lasts at most 30 s plus send_timeout_seconds (a Test's send);
    after a reload raises the timeout, a Test that takes longer must not be cut at the old."""
    from dataclasses import replace

    from nomaflowd import config
    from nomaflowd.spool import Spool
    from nomaflowd.web import WebServer

    tree.write_config()
    current = [config.load(tree.config_path)]
    server = WebServer(("127.0.0.1", 0), lambda: current[0], Spool(tree.spool))
    try:
        assert server.httpd.deadline_seconds() == 30 + 2
        current[0] = replace(current[0], send_timeout_seconds=60)  # what a reload installs
        assert server.httpd.deadline_seconds() == 30 + 60
    finally:
        server.close()
