"""Slack app mode (bot_token, Web API) against a local receiver answering as Slack's
chat.postMessage and chat.update do: one thread per failure episode, kept in the database."""

from __future__ import annotations

import itertools
import json
import threading
from datetime import timedelta
from typing import Any

import pytest

from nomaflowd import config, db
from nomaflowd.checks import run_checks
from nomaflowd.dispatch import FAILED_DELIVERY, FAILED_TRANSPORT, SENT, Attempt, Dispatcher
from nomaflowd.errors import ConfigError
from nomaflowd.transports import build
from nomaflowd.transports.base import RateLimited
from nomaflowd.transports.slack_app import SlackApp
from tests.servers import Reply, Request
from tests.test_transport_slack import make_alert

TOKEN = "xoxb-1234-5678-CANARYbotTOKEN"
CHANNEL_ID = "C0123CHAN"


class SlackApi:
    """Answers as Slack's Web API: HTTP 200 with {"ok": true, "channel", "ts"} or
    {"ok": false, "error"}; keeps the channel's messages so tests can read threads."""

    def __init__(self) -> None:
        self.ts = itertools.count(1)
        self.lock = threading.Lock()
        self.posts: list[dict[str, Any]] = []
        self.updates: list[dict[str, Any]] = []

    def __call__(self, req: Request) -> Reply:
        if req.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self.ok_false("invalid_auth")
        body = req.json()
        if body.get("channel") in ("#gone", "C0GONE"):
            return self.ok_false("channel_not_found")
        with self.lock:
            if req.path.endswith("/chat.postMessage"):
                ts = f"1716600000.{next(self.ts):06d}"
                self.posts.append({**body, "ts": ts})
            elif req.path.endswith("/chat.update"):
                ts = body["ts"]
                self.updates.append(body)
            else:
                return Reply(404, b"")
        answer = {"ok": True, "channel": CHANNEL_ID, "ts": ts,
                  "message": {"text": body.get("text"), "ts": ts}}
        return Reply(200, json.dumps(answer).encode(), {"Content-Type": "application/json"})

    @staticmethod
    def ok_false(error: str) -> Reply:
        return Reply(200, json.dumps({"ok": False, "error": error}).encode(),
                     {"Content-Type": "application/json"})


def app_transport(tree: Any, http: Any, name: str = "slack", extra: str = "") -> str:
    return (f'[transports.{name}]\ntype = "slack"\nbot_token = "{tree.enc(TOKEN)}"\n'
            f'api_url = "{http.url("/api")}"\n{extra}\n')


@pytest.fixture
def api(http: Any) -> SlackApi:
    answer = SlackApi()
    http.replies["/api"] = answer
    return answer


@pytest.fixture
def app(tree: Any, http: Any, api: SlackApi) -> Any:
    cfg = config.load(tree.write_config(app_transport(tree, http,
                                                      extra='default_channel = "#ops"')))
    transports = build(cfg.transports, 2)
    dispatcher = Dispatcher(transports, "test-replica")
    yield transports["slack"], dispatcher
    dispatcher.close()


def attempt(app: Any, alert: Any, recipient: str = "#data") -> Any:
    return app[1].attempt(Attempt(alert, "slack", recipient))


# --- one call -------------------------------------------------------------------------

def test_app_mode_posts_to_chat_post_message_with_the_bot_token(app, http, api):
    transport, _ = app
    assert isinstance(transport, SlackApp)
    result = attempt(app, make_alert("failed"))
    assert (result.outcome, result.detail) == (SENT, "HTTP 200 ok ts 1716600000.000001")
    [req] = http.wait_for(1)
    assert req.path == "/api/chat.postMessage"
    assert req.headers["Authorization"] == f"Bearer {TOKEN}"
    assert req.headers["Content-Type"] == "application/json; charset=utf-8"
    body = req.json()
    assert body["channel"] == "#data"
    assert body["text"].startswith("\u274c reporting-nightly-sync run failed")
    assert body["attachments"][0]["color"] == "#d00000"
    assert "thread_ts" not in body
    assert transport.destination() == f"http://127.0.0.1:{http.port}"


def test_app_mode_ok_false_is_failed_delivery_with_the_error(app, api):
    result = attempt(app, make_alert("failed"), "#gone")
    assert result.outcome == FAILED_DELIVERY
    assert result.detail == "chat.postMessage channel_not_found"


def test_app_mode_429_waits_retry_after(app, http):
    http.replies["/api"] = Reply(429, b'{"ok": false, "error": "ratelimited"}',
                                 {"Retry-After": "3"})
    with pytest.raises(RateLimited) as caught:
        app[0].send(make_alert("failed"), "#data")
    assert caught.value.retry_after == 3
    assert str(caught.value) == "HTTP 429 ratelimited (Retry-After 3s)"
    assert attempt(app, make_alert("failed")).outcome == FAILED_DELIVERY


def test_app_mode_error_that_echoes_the_token_is_masked(app, http):
    http.replies["/api"] = lambda req: SlackApi.ok_false(
        f"invalid_auth: {req.headers['Authorization']} not allowed")
    result = attempt(app, make_alert("failed"))
    assert result.outcome == FAILED_DELIVERY
    assert "CANARY" not in result.detail and "****" in result.detail


def test_app_mode_without_a_channel_is_failed_transport(tree, http, api):
    tree.write_config(app_transport(tree, http))
    cfg = config.load(tree.config_path)
    transports = build(cfg.transports, 2)
    try:
        result = Dispatcher(transports, "r").attempt(
            Attempt(make_alert("failed"), "slack", "(webhook channel)"))
    finally:
        transports["slack"].close()
    assert result.outcome == FAILED_TRANSPORT
    assert "default_channel" in result.detail
    assert http.requests == []
    assert any("app mode" in text and "default_channel" in text
               for _, text in run_checks(cfg))


@pytest.mark.parametrize(("lines", "message"), [
    ('webhook_url = "{hook}"\nbot_token = "{token}"\n', "exactly one"),
    ("", "exactly one"),
])
def test_app_mode_config_needs_exactly_one_of_webhook_and_token(tree, lines, message):
    text = lines.format(hook=tree.enc("https://hooks.slack.test/x"), token=tree.enc(TOKEN))
    tree.write_config(f'[transports.slack]\ntype = "slack"\n{text}')
    with pytest.raises(ConfigError, match=message):
        config.load(tree.config_path)


def test_app_mode_plaintext_token_is_refused_without_showing_it(tree):
    tree.write_config(f'[transports.slack]\ntype = "slack"\nbot_token = "{TOKEN}"\n')
    with pytest.raises(ConfigError) as caught:
        config.load(tree.config_path)
    assert "transports.slack.bot_token" in str(caught.value)
    assert "CANARY" not in str(caught.value)


# --- one thread per failure episode, end to end ------------------------------------------

def ago(minutes: float) -> str:
    return (db.utcnow() - timedelta(minutes=minutes)).strftime("%Y-%m-%dT%H:%M:%SZ")


JOBS = ('[jobs.sync.alerts]\nrecipients = ["#data"]\non_recovery = true\n'
        "on_long_run_minutes = 1\n")


def event(run: str, state: str, minutes_ago: float, **fields: Any) -> dict[str, Any]:
    stamp = "started_at" if state == "RUNNING" else "finished_at"
    return {"job_id": "sync", "run_id": run, "state": state, stamp: ago(minutes_ago), **fields}


def test_failure_episode_is_one_thread_and_recovery_updates_the_first_message(
        tree, http, api, inproc):
    tree.write_config(app_transport(tree, http))
    tree.write_jobs(JOBS)
    d = inproc()
    tree.drop(event("r1", "FAILED", 30, error="OperationalError: connection refused"))
    d.pump()
    tree.drop(event("r2", "FAILED", 20))
    d.pump()
    tree.drop(event("r3", "RUNNING", 5))
    d.pump(lambda: len(api.posts) == 3, what="the long-run warning")
    tree.drop(event("r3", "SUCCEEDED", 0))
    d.pump(lambda: api.updates, what="the first message updated")
    d.pump()

    first, second, long_run, recovered = api.posts
    assert "thread_ts" not in first
    assert second["thread_ts"] == long_run["thread_ts"] == recovered["thread_ts"] == first["ts"]
    assert "still running" in long_run["text"] and "recovered" in recovered["text"]
    [update] = api.updates
    assert (update["channel"], update["ts"]) == (CHANNEL_ID, first["ts"])
    assert update["text"].startswith("\U0001f7e2 sync recovered after 2 failed runs")
    assert "Episode over" in update["text"] and first["text"] in update["text"]
    assert update["attachments"][0]["color"] == "#2eb67d"
    details = {r["alert"]: r["detail"] for r in tree.notifications() if r["alert"] != "failed"}
    assert details["recovered"].endswith(f"in thread {first['ts']}, first message updated")
    assert tree.sql("SELECT job_id, recipient, ts, channel FROM chat_threads") == [
        ("sync", "#data", first["ts"], CHANNEL_ID)]

    # The success ended the episode: the next failure starts a new thread.
    tree.drop(event("r4", "FAILED", 0))
    d.pump()
    assert "thread_ts" not in api.posts[-1]
    assert len(tree.sql("SELECT ts FROM chat_threads")) == 2


def test_thread_survives_a_restart(tree, http, api, inproc):
    tree.write_config(app_transport(tree, http))
    tree.write_jobs(JOBS)
    first = inproc()
    tree.drop(event("r1", "FAILED", 30))
    first.pump()
    first.close()
    [root] = api.posts

    again = inproc()  # a new process on the same database: nothing kept in memory
    tree.drop(event("r2", "FAILED", 10))
    again.pump()
    tree.drop(event("r3", "SUCCEEDED", 0))
    again.pump(lambda: api.updates, what="the first message updated")
    again.pump()
    assert [p.get("thread_ts") for p in api.posts] == [None, root["ts"], root["ts"]]
    assert api.updates[0]["ts"] == root["ts"]
    assert {r["outcome"] for r in tree.notifications()} == {SENT}


def test_a_failure_right_behind_the_first_replies_in_its_thread(tree, http, api, inproc):
    # Both in one batch: the second is handed to the transport before the first's ts is in
    # the database; the transport's own memory of the thread it started covers that.
    tree.write_config(app_transport(tree, http))
    tree.write_jobs(JOBS)
    d = inproc()
    tree.drop(event("r1", "FAILED", 2))
    tree.drop(event("r2", "FAILED", 1))
    d.pump()
    first, second = api.posts
    assert second["thread_ts"] == first["ts"]
    assert len(tree.sql("SELECT ts FROM chat_threads")) == 1


def test_other_alerts_are_not_threaded(tree, http, api, inproc):
    tree.write_config(app_transport(tree, http))
    tree.write_jobs('[jobs.sync.alerts]\nrecipients = ["#data"]\non_cancel = true\n')
    d = inproc()
    tree.drop(event("r1", "FAILED", 2))
    tree.drop(event("r2", "CANCELLED", 1))
    d.pump()
    assert [p.get("thread_ts") for p in api.posts] == [None, None]


@pytest.mark.postgres
def test_episode_thread_on_postgresql_across_a_restart(tree, http, api, inproc, pg_schema):
    tree.database = pg_schema
    tree.write_config(app_transport(tree, http))
    tree.write_jobs(JOBS)
    first = inproc()
    tree.drop(event("r1", "FAILED", 30))
    first.pump()
    first.close()
    again = inproc()
    tree.drop(event("r2", "FAILED", 10))
    again.pump()
    tree.drop(event("r3", "SUCCEEDED", 0))
    again.pump(lambda: api.updates, what="the first message updated")
    again.pump()
    root = api.posts[0]
    assert [p.get("thread_ts") for p in api.posts] == [None, root["ts"], root["ts"]]
    assert api.updates[0]["ts"] == root["ts"]
    tree.drop(event("r4", "FAILED", 0))
    again.pump()
    assert "thread_ts" not in api.posts[-1]


def test_bot_token_never_on_the_page_nor_in_the_log(tree, http, daemon_factory):
    from tests.test_web import bound_port, csrf_token, fetch

    http.replies["/api"] = lambda req: SlackApi.ok_false(
        f"invalid_auth: {req.headers.get('Authorization')} was revoked")
    tree.write_config(app_transport(tree, http, extra='default_channel = "#ops"'),
                      daemon='web_listen = "127.0.0.1:0"')
    d = daemon_factory()
    base = f"http://127.0.0.1:{bound_port(d)}"
    token = csrf_token(fetch(base + "/").text)
    resp = fetch(f"{base}/test/slack", data=f"csrf={token}&transport=slack".encode(),
                 headers={"Content-Type": "application/x-www-form-urlencoded", "Origin": base})
    assert resp.status == 303
    page = fetch(base + resp.headers["Location"]).text
    assert "FAILED_DELIVERY" in page and "invalid_auth" in page
    assert d.stop() == 0
    assert "invalid_auth" in d.output()
    for text in (page, d.output(), json.dumps(tree.notifications())):
        assert "CANARY" not in text
    assert any("CANARY" in r.headers.get("Authorization", "") for r in http.requests)


def test_app_mode_digest_posts_every_part_outside_any_thread(app, api):
    from tests.test_transport_slack import storm_alerts

    batch = storm_alerts(2000)
    members = tuple(Attempt(a, "slack", "#data") for a in batch)
    results = app[1].execute(Attempt(batch[0], "slack", "#data", members=members,
                                     digest_id="digest-0000abcd"))
    assert {r.outcome for r in results} == {SENT}
    assert len(api.posts) > 1 and all("thread_ts" not in p for p in api.posts)
    text = "\n".join(p["text"] for p in api.posts)
    assert all(f"nightly-{j:04d}-sync" in text for j in range(2000))
    assert results[0].detail.endswith(f"({len(api.posts)} messages)")


class RefusesUpdates(SlackApi):
    """As Slack answers a chat.update it will not do (a message the bot may no longer edit):
    HTTP 200 with {"ok": false, "error": "cant_update_message"}; posts as before."""

    def __init__(self) -> None:
        super().__init__()
        self.refused: list[dict[str, Any]] = []

    def __call__(self, req: Request) -> Reply:
        if req.path.endswith("/chat.update"):
            with self.lock:
                self.refused.append(req.json())
            return self.ok_false("cant_update_message")
        return super().__call__(req)


def test_a_refused_chat_update_does_not_undo_the_recovery_reply(tree, http, inproc):
    """README: "A refused `chat.update` does not undo the recovery's reply: it is noted in
    its `detail`"."""
    api = RefusesUpdates()
    http.replies["/api"] = api
    tree.write_config(app_transport(tree, http))
    tree.write_jobs(JOBS)
    d = inproc()
    tree.drop(event("r1", "FAILED", 30))
    d.pump()
    tree.drop(event("r2", "SUCCEEDED", 0))
    d.pump(lambda: any(r["alert"] == "recovered" for r in tree.notifications()),
           what="the recovery's audit row")
    d.pump()

    first, recovered = api.posts
    assert recovered["thread_ts"] == first["ts"] and "recovered" in recovered["text"]
    [update] = api.refused  # the edit was tried, and refused
    assert update["ts"] == first["ts"] and api.updates == []
    row = next(r for r in tree.notifications() if r["alert"] == "recovered")
    assert row["outcome"] == SENT
    assert row["detail"].startswith(f"HTTP 200 ok ts {recovered['ts']} in thread {first['ts']}")
    assert "chat.update cant_update_message" in row["detail"]
    assert "first message updated" not in row["detail"]
