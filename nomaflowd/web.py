"""The Notifications page: transports with a Test button, the audit table, RUNNING runs, rejects.

Served when `daemon.web_listen` is set, from a standard-library HTTP server on its own
threads. Read-only apart from Test. Every value on the page is HTML-escaped; every query
is a keyset page on an index, so the page stays fast with millions of audit rows.
"""

from __future__ import annotations

import base64
import binascii
import heapq
import hmac
import html
import logging
import os
import re
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from datetime import datetime
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

import peewee as pw

from nomaflowd import __version__, db, schedules
from nomaflowd.catalogue import WatchedCatalogue
from nomaflowd.config import Config, is_loopback
from nomaflowd.dispatch import SENT, Result, send_test
from nomaflowd.errors import ConfigError
from nomaflowd.routing import default_recipient
from nomaflowd.serving import Server
from nomaflowd.spool import Spool, read_note
from nomaflowd.text import escape
from nomaflowd.transports import Transport, build

logger = logging.getLogger(__name__)

PAGE_SIZE = 50
RUNS_SHOWN = 100
REJECTED_SHOWN = 50
NOTE_BYTES = 2048  # of a rejected file's .error note: the reason is its first line
MAX_FORM_BYTES = 4096
MAX_FILTER_CHARS = 300
MAX_QUERY_FIELDS = 20
TESTS_KEPT = 256  # Test results a visitor may still come back to (one per press)
# A keyset bound or an offset: digits only, small enough for a 64-bit integer column.
NUMBER = re.compile(r"[0-9]{1,18}")
OUTCOMES = ("SENT", "FAILED_TRANSPORT", "FAILED_DELIVERY")
DB_ERRORS = (pw.PeeweeException, OSError)

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                               "form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1d1d1f}
h1{font-size:1.4em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.6em 0 .4em}
.meta{color:#666;margin:0}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:.25em .6em;border-bottom:1px solid #ddd;vertical-align:top}
th{background:#f4f4f6;font-weight:600}
td.num{text-align:right}td.detail{max-width:32em;overflow-wrap:anywhere}
.SENT{color:#17692f;font-weight:600}
.FAILED_TRANSPORT,.FAILED_DELIVERY{color:#b3261e;font-weight:600}
.banner{padding:.6em 1em;border-radius:4px;margin:1em 0}
.banner.ok{background:#e3f4e6;border:1px solid #8fce9c}
.banner.bad{background:#fbe4e2;border:1px solid #e39b94}
form.filters{margin:.4em 0}form.filters input,form.filters select{margin-right:.6em}
form.inline{margin:0}.pager{margin:.6em 0}.empty{color:#666}
"""


def e(value: object) -> str:
    """HTML-escape anything for text and quoted attribute values."""
    return html.escape("" if value is None else str(value), quote=True)


def when(value: datetime | None) -> str:
    return value.isoformat(sep=" ", timespec="seconds") + "Z" if value else ""


def url_of(address: tuple[Any, ...]) -> str:
    """http://host:port/ of a bound socket address (IPv6 in brackets)."""
    host, port = str(address[0]), int(address[1])
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


class BadRequest(Exception):
    """A request the page answers with 400 and this one-line message."""


def parse_query(query: str) -> dict[str, str]:
    """The page's query fields (first value of each, clipped); BadRequest on abuse."""
    try:
        fields = parse_qs(query, max_num_fields=MAX_QUERY_FIELDS)
    except ValueError:
        raise BadRequest(f"too many query fields (at most {MAX_QUERY_FIELDS})") from None
    out = {k: v[0][:MAX_FILTER_CHARS] for k, v in fields.items()}
    if any("\0" in v for v in out.values()):
        raise BadRequest("a query value holds a NUL character")
    for name in ("before", "rejected"):
        if out.get(name) and not NUMBER.fullmatch(out[name]):
            raise BadRequest(f"{name} must be a row number")
    return out


def shown_name(name: str) -> str:
    """A file name for the page: bytes that are not UTF-8 shown as U+FFFD, and invisible or
    reordering characters (U+202E, U+200B, U+2028) as escapes, as the log shows them, so a
    name cannot pass for another."""
    return escape(os.fsencode(name).decode("utf-8", "replace"))


def rejected_notes(directory: Path, skip: int, count: int) -> tuple[int, list[tuple[str, str]]]:
    """(how many rejected files, [(name, reason)] of `count` newest after `skip`).

    One scandir and a stat per note; only the notes shown are read, so twenty thousand
    rejected files cost milliseconds.
    """
    notes: list[tuple[int, str]] = []
    try:
        with os.scandir(directory) as it:
            for entry in it:
                # A note ends in .error, whatever its first character (a runner's
                # .evt.json is quarantined too); the daemon's own dot files do not: a note
                # being written (.NAME.error.XXXX), a replica's files in hand (.handling-*).
                if entry.name.endswith(".error"):
                    try:
                        notes.append((entry.stat(follow_symlinks=False).st_mtime_ns,
                                      entry.name))
                    except OSError:
                        continue  # pruned between the listing and the stat
    except FileNotFoundError:
        return 0, []
    out = []
    for _, note in heapq.nlargest(skip + count, notes)[skip:]:
        try:
            text = read_note(os.path.join(directory, note), NOTE_BYTES)
        except OSError:
            text = "(note not readable)"
        lines = text.strip().splitlines()
        out.append((shown_name(note[:-len(".error")]), lines[0] if lines else ""))
    return len(notes), out


class WebServer:
    """The page's HTTP server on a daemon thread; `config` returns the current config."""

    def __init__(self, address: tuple[str, int], config: Callable[[], Config],
                 spool: Spool) -> None:
        self.address = address
        self.config = config
        self.spool = spool
        self.csrf_token = secrets.token_urlsafe(32)  # per process: a restart invalidates old forms
        self.loopback = is_loopback(address[0])
        # A reload that drops web_password must not leave a non-loopback socket open to all.
        self.start_password = config().web_password
        # Test results by an unguessable id carried in the Test button's redirect: only the
        # visitor who pressed it sees its banner.
        self.tests: OrderedDict[str, tuple[str, Result]] = OrderedDict()
        self._built: tuple[Config, dict[str, Transport]] | None = None
        self._catalogue: WatchedCatalogue | None = None  # this thread's own, for schedules
        self._lock = threading.Lock()
        self._sending = 0
        self._idle = threading.Condition(self._lock)
        try:
            # 32 connections at once (a browser opens about six); each lasts at most 30 s
            # more than a Test's send.
            self.httpd = _Server("web page", address, _Handler, max_connections=32,
                                 connection_seconds=30)
        except OSError as exc:
            raise ConfigError(f"daemon.web_listen {address[0]}:{address[1]}: cannot listen"
                              f" ({exc.strerror or exc}); pick another address or port") from None
        self.httpd.web = self
        self.port = int(self.httpd.server_address[1])
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="web",
                                       kwargs={"poll_interval": 0.2}, daemon=True)
        self.thread.start()
        self.url = url_of(self.httpd.server_address)
        logger.info("web page listening on %s", self.url)

    def close(self, timeout: float = 15.0) -> None:
        """Stop accepting requests, then let a Test send in flight finish and record its row."""
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()
        with self._idle:
            self._idle.wait_for(lambda: self._sending == 0, timeout)

    # --- Test ------------------------------------------------------------------------

    def run_test(self, name: str) -> str:
        """Send a test through `name`; returns the id under which its result is shown."""
        with self._lock:
            self._sending += 1
        try:
            result = send_test(self.config(), name)
        finally:
            with self._idle:
                self._sending -= 1
                self._idle.notify_all()
        ident = secrets.token_urlsafe(16)
        with self._lock:
            self.tests[ident] = (name, result)
            while len(self.tests) > TESTS_KEPT:
                self.tests.popitem(last=False)
        return ident

    # --- the page --------------------------------------------------------------------

    def render(self, query: dict[str, str]) -> str:
        cfg = self.config()
        parts = [
            "<!doctype html><html lang=en><head><meta charset=utf-8>",
            "<meta name=viewport content='width=device-width'>",
            "<title>Notifications · nomaflowd</title>",
            f"<style>{STYLE}</style></head><body>",
            "<h1>Notifications</h1>",
            f"<p class=meta>replica {e(cfg.replica_id)} · nomaflowd {e(__version__)}"
            " · times in UTC</p>",
        ]
        if "tested" in query:
            parts.append(self.render_banner(query["tested"]))
        parts += self.render_transports(cfg)
        parts += self.render_notifications(cfg, query)
        parts += self.render_runs()
        parts += self.render_schedules(cfg)
        parts += self.render_rejected(query)
        parts.append("</body></html>")
        return "".join(parts)

    def render_banner(self, ident: str) -> str:
        with self._lock:
            found = self.tests.get(ident)
        if found is None:
            return ("<div class='banner bad' id=banner>This test result is no longer kept"
                    " (the daemon may have restarted); press Test again.</div>")
        name, result = found
        cls = "ok" if result.outcome == SENT else "bad"
        return (f"<div class='banner {cls}' id=banner>Test via <b>{e(name)}</b> to"
                f" {e(result.attempt.recipient)}: <span class={e(result.outcome)}>"
                f"{e(result.outcome)}</span> — {e(result.detail)}"
                f" ({e(result.duration_ms)} ms)</div>")

    def render_transports(self, cfg: Config) -> list[str]:
        out = ["<h2>Transports</h2>"]
        if not cfg.transports:
            return [*out, "<p class=empty>No transports configured.</p>"]
        built = self.transports(cfg)
        n = db.NotificationRow
        out.append("<table id=transports><tr><th>Name<th>Type<th>Default recipient"
                   "<th>Sends to<th>Last attempt<th></tr>")
        for name, tc in cfg.transports.items():
            # (transport, id) index: the newest row of this transport, one index probe.
            last = (n.select(n.outcome, n.created_at, n.alert).where(n.transport == name)
                    .order_by(n.id.desc()).limit(1).first())
            if last is None:
                last_cell = "<span class=empty>never used</span>"
            else:
                last_cell = (f"<span class={e(last.outcome)}>{e(last.outcome)}</span>"
                             f" {e(when(last.created_at))} ({e(last.alert)})")
            # destination() is scheme and host only: never a webhook path or a password.
            out.append(
                f"<tr><td>{e(name)}<td>{e(tc.type)}<td>{e(default_recipient(tc))}"
                f"<td>{e(built[name].destination())}<td>{last_cell}"
                f"<td><form class=inline method=post action='/test/{e(quote(name, safe=''))}'>"
                f"<input type=hidden name=csrf value='{e(self.csrf_token)}'>"
                f"<button type=submit name=transport value='{e(name)}'>Test</button>"
                "</form></tr>")
        out.append("</table>")
        return out

    def transports(self, cfg: Config) -> dict[str, Transport]:
        """Built once per config (a transport's TLS context costs ~50 ms), for destination()."""
        with self._lock:
            if self._built is None or self._built[0] is not cfg:
                self._built = (cfg, build(cfg.transports, cfg.send_timeout_seconds))
            return self._built[1]

    def notifications(self, query: dict[str, str]) -> list[Any]:
        """One keyset page, newest first: WHERE <filters> [AND id < before] ORDER BY id DESC."""
        n = db.NotificationRow
        filters = [(n.job_id, query.get("job")), (n.transport, query.get("transport")),
                   (n.outcome, query.get("outcome"))]
        conditions = []
        lead = True
        for column, value in filters:
            if not value:
                continue
            if lead:
                conditions.append(column == value)
                lead = False
            else:
                # Without table statistics SQLite may walk the (outcome, id) index, i.e. most
                # of the table, for "job X and SENT". `col || ''` keeps the lead filter's
                # index, job before transport before outcome (most selective first).
                conditions.append(column.concat("") == value)
        before = query.get("before", "")
        if before:  # digits only, below 10**18: parse_query() saw to it
            conditions.append(n.id < int(before))
        select = n.select().order_by(n.id.desc()).limit(PAGE_SIZE + 1)
        if conditions:
            select = select.where(*conditions)
        return list(select)

    def render_notifications(self, cfg: Config, query: dict[str, str]) -> list[str]:
        job, outcome, transport = (query.get(k, "") for k in ("job", "outcome", "transport"))
        out = ["<h2>Latest notifications</h2>",
               "<form class=filters method=get action='/'>",
               f"<label>Job <input name=job value='{e(job)}' size=24></label>",
               "<label>Outcome <select name=outcome>",
               *self.options(OUTCOMES, outcome),
               "</select></label><label>Transport <select name=transport>",
               *self.options(cfg.transports, transport),
               "</select></label><button type=submit>Filter</button> <a href='/'>clear</a></form>"]
        rows = self.notifications(query)
        more = len(rows) > PAGE_SIZE
        rows = rows[:PAGE_SIZE]
        if not rows:
            return [*out, "<p class=empty id=no-notifications>No notifications match.</p>"]
        out.append("<table id=notifications><tr><th>#<th>Time<th>Job<th>Run<th>Alert<th>Level"
                   "<th>Transport<th>Recipient<th>Outcome<th>Detail<th>ms<th>Replica</tr>")
        for r in rows:
            out.append(
                f"<tr><td class=num>{e(r.id)}<td>{e(when(r.created_at))}<td>{e(r.job_id)}"
                f"<td>{e(r.run_id)}<td>{e(r.alert)}<td>{e(r.level)}<td>{e(r.transport)}"
                f"<td>{e(r.recipient)}<td class={e(r.outcome)}>{e(r.outcome)}"
                f"<td class=detail>{e(r.detail)}<td class=num>{e(r.duration_ms)}"
                f"<td>{e(r.replica)}</tr>")
        out.append("</table><p class=pager>")
        keep = {k: v for k, v in (("job", job), ("outcome", outcome), ("transport", transport))
                if v}
        if query.get("before"):
            out.append(f"<a href='/?{e(urlencode(keep))}'>newest</a> ")
        if more:
            older = urlencode({**keep, "before": rows[-1].id})
            out.append(f"<a id=older href='/?{e(older)}'>older →</a>")
        out.append("</p>")
        return out

    @staticmethod
    def options(values: Iterable[str], chosen: str) -> list[str]:
        out = ["<option value=''>any</option>"]
        values = list(values)
        if chosen and chosen not in values:
            values.append(chosen)
        for v in values:
            selected = " selected" if v == chosen else ""
            out.append(f"<option value='{e(v)}'{selected}>{e(v)}</option>")
        return out

    def render_runs(self) -> list[str]:
        r = db.RunRow
        runs = list(r.select().where(r.state == "RUNNING").order_by(r.updated_at.desc())
                    .limit(RUNS_SHOWN + 1))
        out = ["<h2>Running runs</h2>"]
        if not runs:
            return [*out, "<p class=empty>No run is RUNNING.</p>"]
        out.append("<table id=runs><tr><th>Job<th>Run<th>Started<th>Long-run deadline"
                   "<th>Updated</tr>")
        for run in runs[:RUNS_SHOWN]:
            if run.long_run_alerted_at:
                deadline = f"warned at {when(run.long_run_alerted_at)}"
            else:
                deadline = when(run.long_run_deadline) or "none"
            out.append(f"<tr><td>{e(run.job_id)}<td>{e(run.run_id)}<td>{e(when(run.started_at))}"
                       f"<td>{e(deadline)}<td>{e(when(run.updated_at))}</tr>")
        out.append("</table>")
        if len(runs) > RUNS_SHOWN:
            out.append(f"<p class=empty>Showing the {RUNS_SHOWN} most recently updated.</p>")
        return out

    def render_schedules(self, cfg: Config) -> list[str]:
        """Each scheduled job's next expected time, its last run, and whether it is late."""
        with self._lock:
            if self._catalogue is None or self._catalogue.path != cfg.jobs_file:
                try:
                    self._catalogue = WatchedCatalogue(cfg.jobs_file)
                except ConfigError:
                    return []
            cat = self._catalogue.refresh()
        out = ["<h2>Schedules</h2>"]
        rows = schedules.status(cat, db.utcnow(), RUNS_SHOWN)
        if not rows:
            return [*out, "<p class=empty>No job in jobs.toml has a schedule.</p>"]
        out.append("<table id=schedules><tr><th>Job<th>Schedule<th>Next expected<th>Last run"
                   "<th>Late</tr>")
        for st in rows:
            last = (f"{st['last_run_id']} ({st['last_run_state']}) {when(st['last_run_at'])}"
                    if st["last_run_id"] else "none")
            late = ("paused" if st["disabled"] else
                    "<span class=FAILED_DELIVERY>late</span>" if st["late"] else "no")
            out.append(f"<tr><td>{e(st['job_id'])}<td>{e(st['schedule'])}"
                       f"<td>{e(when(st['next']))}<td>{e(last)}<td>{late}</tr>")
        out.append("</table>")
        if len(cat.jobs_schedules) > RUNS_SHOWN:
            out.append(f"<p class=empty>Showing the first {RUNS_SHOWN} by name.</p>")
        return out

    def render_rejected(self, query: dict[str, str]) -> list[str]:
        out = ["<h2 id=rejected-files>Rejected spool files</h2>"]
        skip = int(query.get("rejected") or 0)
        try:
            total, files = rejected_notes(self.spool.rejected, skip, REJECTED_SHOWN)
        except OSError as exc:  # not the database: a 503 "database unavailable" would mislead
            return [*out, f"<p class=empty>{e(self.spool.rejected)} cannot be read"
                          f" ({e(exc.strerror)}).</p>"]
        if not total:
            return [*out, "<p class=empty>None.</p>"]
        first, last = min(skip + 1, total), min(skip + len(files), total)
        out.append(f"<p class=meta id=rejected-count>{total} in {e(self.spool.rejected)};"
                   f" showing {first} to {last}, newest first.</p>")
        if files:
            out.append("<table id=rejected><tr><th>File<th>Reason</tr>")
            out += [f"<tr><td>{e(name)}<td>{e(reason)}</tr>" for name, reason in files]
            out.append("</table>")
        keep = {k: v for k, v in query.items() if k in ("job", "outcome", "transport", "before")}
        links = []
        if skip:
            links.append(f"<a href='/?{e(urlencode(keep))}#rejected-files'>newest</a>")
        if skip + len(files) < total:
            older = urlencode({**keep, "rejected": skip + REJECTED_SHOWN})
            links.append(f"<a id=rejected-older href='/?{e(older)}#rejected-files'>older →</a>")
        if links:
            out.append(f"<p class=pager>{' '.join(links)}</p>")
        return out

    # --- request checks --------------------------------------------------------------

    def host_allowed(self, host: str) -> bool:
        """On loopback, only loopback names: a DNS-rebound name must not reach the page."""
        if not self.loopback:
            return True
        try:
            parts = urlsplit(f"//{host}")
            port = parts.port
        except ValueError:
            return False
        name = parts.hostname or ""
        return (name == "localhost" or is_loopback(name)) and (port or 80) == self.port

    def authorized(self, header: str | None) -> bool:
        secret = self.config().web_password
        if secret is None and not self.loopback:
            secret = self.start_password
        if secret is None:
            return True
        scheme, _, value = (header or "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(value.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        password = decoded.partition(b":")[2]
        return hmac.compare_digest(password, secret.reveal().encode())

    def same_origin(self, host: str, origin: str | None, referer: str | None) -> bool:
        """Origin (or, without one, Referer) must be this page's own scheme://host:port."""
        source = origin if origin is not None else referer
        if not source or source == "null":
            return False
        try:
            parts = urlsplit(source)
        except ValueError:  # "http://[" and the like
            return False
        return parts.scheme in ("http", "https") and parts.netloc.lower() == host.lower()

    def token_ok(self, token: str) -> bool:
        return hmac.compare_digest(token.encode(), self.csrf_token.encode())


class _Server(Server):
    web: WebServer

    def deadline_seconds(self) -> float:
        """30 s plus a Test's send, as the config says now (a reload may change it)."""
        return self.connection_seconds + self.web.config().send_timeout_seconds


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "nomaflowd"
    sys_version = ""
    timeout = 15  # a silent client must not hold a thread forever

    def do_GET(self) -> None:
        self.guarded(self.get)

    def do_POST(self) -> None:
        self.guarded(self.post)

    def guarded(self, handler: Callable[[WebServer], None]) -> None:
        web = self.server.web
        try:
            if not web.host_allowed(self.headers.get("Host", "")):
                self.reply(421, "text/plain", "unknown host name; use 127.0.0.1 or localhost\n")
            elif not web.authorized(self.headers.get("Authorization")):
                self.reply(401, "text/plain", "password required\n",
                           {"WWW-Authenticate": 'Basic realm="nomaflowd", charset="UTF-8"'})
            else:
                handler(web)
        except BadRequest as exc:
            self.reply(400, "text/plain", f"{exc}\n")
        except ConnectionError:  # the visitor went away (a closed tab) or was cut at the
            logger.debug("notifications page: %s %s: the client went away",  # deadline
                         self.command, self.path)
        except DB_ERRORS as exc:
            logger.error("notifications page: database unavailable: %s", db.one_line(exc))
            self.reply(503, "text/plain", "database unavailable; see the daemon's log\n")
        except Exception:  # the page must never take the daemon down
            logger.exception("notifications page: %s %s failed", self.command, self.path)
            self.reply(500, "text/plain", "internal error; see the daemon's log\n")
        finally:
            db.proxy.close()  # this thread's connection: none is kept between requests

    def get(self, web: WebServer) -> None:
        try:
            parts = urlsplit(self.path)
        except ValueError:
            raise BadRequest("malformed request path") from None
        if parts.path != "/":
            self.reply(404, "text/plain", "not found\n")
            return
        self.reply(200, "text/html; charset=utf-8", web.render(parse_query(parts.query)))

    def post(self, web: WebServer) -> None:
        path = urlsplit(self.path).path
        if not path.startswith("/test/"):
            self.reply(404, "text/plain", "not found\n")
            return
        host = self.headers.get("Host", "")
        if not web.same_origin(host, self.headers.get("Origin"), self.headers.get("Referer")):
            logger.warning("notifications page: cross-origin Test refused (Origin %r)",
                           self.headers.get("Origin"))
            self.reply(403, "text/plain", "cross-origin request refused\n")
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self.reply(400, "text/plain", "bad Content-Length\n")
            return
        if length > MAX_FORM_BYTES:
            self.reply(413, "text/plain", "form too large\n")
            return
        try:
            form = parse_qs(self.rfile.read(length).decode("utf-8", "replace"),
                            max_num_fields=10)
        except ValueError:
            raise BadRequest("too many form fields") from None
        if not web.token_ok(form.get("csrf", [""])[0]):
            self.reply(403, "text/plain", "missing or stale form token; reload the page\n")
            return
        name = unquote(path[len("/test/"):])
        if name not in web.config().transports:
            self.reply(404, "text/plain", "no such transport\n")
            return
        logger.info("notifications page: Test of transport %s from %s", name,
                    self.client_address[0])
        ident = web.run_test(name)
        self.reply(303, "text/plain", "sent\n", {"Location": f"/?tested={ident}"})

    def reply(self, status: int, kind: str, text: str,
              headers: dict[str, str] | None = None) -> None:
        body = text.encode("utf-8", "replace")  # a lone surrogate must not cost the answer
        self.send_response(status)
        for key, value in {**SECURITY_HEADERS, **(headers or {})}.items():
            self.send_header(key, value)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        logger.debug("web: %s %s", self.client_address[0], format % args)
