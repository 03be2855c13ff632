"""Slack transport against a real local HTTP server answering as Slack's incoming webhooks do."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from nomaflowd import alerts, config, events
from nomaflowd.alerts import Alert
from nomaflowd.dispatch import FAILED_DELIVERY, FAILED_TRANSPORT, SENT, Attempt, Dispatcher
from nomaflowd.routing import SLACK_DEFAULT, default_recipient
from nomaflowd.transports import build
from nomaflowd.transports.slack import Slack
from tests.servers import Reply, closed_port

HOOK_PATH = "/services/T000/B000/CANARYSECRET"
RUN_URL = "https://nomaflow.test/runs/run_a8c4d/"
FAILED = {"job_id": "reporting-nightly-sync", "run_id": "run_a8c4d", "state": "FAILED",
          "triggered_by": "cron", "step": "copy-orders",
          "error": "OperationalError: connection refused",
          "traceback": "Traceback (most recent call last):\n  ...\nOperationalError"}
STATE_OF = {"failed": "FAILED", "long_run": "RUNNING", "succeeded": "SUCCEEDED",
            "cancelled": "CANCELLED", "enabled": "ENABLED", "disabled": "DISABLED",
            "notice": "NOTICE"}


def make_alert(kind: str, minutes: float | None = None, **fields: Any) -> Alert:
    """An alert built the way the daemon builds it: a parsed event through from_event()."""
    if kind == "test":
        return alerts.test_alert("https://nomaflow.test")
    obj = {**FAILED, "state": STATE_OF[kind], **fields}
    obj = {k: v for k, v in obj.items() if v is not None}
    event = events.parse(json.dumps(obj).encode(), "t.json", datetime(2026, 5, 26, 2, 15))
    url = f"https://nomaflow.test/runs/{event.run_id}/" if event.run_id else ""
    return alerts.from_event(kind, event, url, minutes=minutes)


class SlackRig:
    """A Slack transport built from a real config file, and a dispatcher around it."""

    def __init__(self, tree: Any, url: str, extra: str = "", timeout: float = 2) -> None:
        self.cfg = config.load(tree.write_config(tree.slack("slack", url, extra)))
        self.transports = build(self.cfg.transports, timeout)
        self.transport = self.transports["slack"]
        self.dispatcher = Dispatcher(self.transports, "test-replica")

    def attempt(self, alert: Alert, recipient: str = "#data-oncall") -> Any:
        return self.dispatcher.attempt(Attempt(alert, "slack", recipient))

    def close(self) -> None:
        self.dispatcher.close()


@pytest.fixture
def rig_factory(tree: Any) -> Iterator[Any]:
    made: list[SlackRig] = []

    def make(url: str, extra: str = "", timeout: float = 2) -> SlackRig:
        rig = SlackRig(tree, url, extra, timeout)
        made.append(rig)
        return rig

    yield make
    for rig in made:
        rig.close()


@pytest.fixture
def rig(rig_factory: Any, http: Any) -> SlackRig:
    return rig_factory(http.url(HOOK_PATH))


# --- outcomes: what Slack answers -> what the audit row says --------------------------

@pytest.mark.parametrize(("reply", "outcome", "words"), [
    (Reply(200, b"ok"), SENT, ["HTTP 200 ok"]),
    (Reply(400, b"invalid_payload"), FAILED_DELIVERY, ["400", "invalid_payload"]),
    (Reply(404, b"channel_not_found"), FAILED_DELIVERY, ["404", "channel_not_found"]),
    (Reply(410, b"channel_is_archived"), FAILED_DELIVERY, ["410", "channel_is_archived"]),
    (Reply(403, b"action_prohibited"), FAILED_DELIVERY, ["403", "action_prohibited"]),
    (Reply(404, b"no_service"), FAILED_DELIVERY, ["404", "no_service"]),
    (Reply(500, b"rollup_error"), FAILED_DELIVERY, ["500", "rollup_error"]),
    (Reply(429, b"rate_limited", {"Retry-After": "30"}), FAILED_DELIVERY,
     ["429", "Retry-After 30"]),
    (Reply(200, b"no_text"), FAILED_DELIVERY, ["200", "no_text"]),
], ids=["ok", "invalid_payload", "channel_not_found", "channel_is_archived",
        "action_prohibited", "no_service", "rollup_error", "rate_limited", "200_not_ok"])
def test_slack_answer_gives_outcome(rig, http, reply, outcome, words):
    http.default = reply
    result = rig.attempt(make_alert("failed"))
    assert (result.outcome, result.transport_type) == (outcome, "slack")
    for word in words:
        assert word in result.detail
    assert len(http.wait_for(1)) == 1  # one attempt, never a retry


def test_slack_refused_port_is_failed_transport(rig_factory):
    rig = rig_factory(f"http://127.0.0.1:{closed_port()}{HOOK_PATH}")
    result = rig.attempt(make_alert("failed"))
    assert result.outcome == FAILED_TRANSPORT
    assert "refused" in result.detail


def test_slack_plain_http_behind_https_url_is_failed_transport(rig_factory, http):
    rig = rig_factory(f"https://127.0.0.1:{http.port}{HOOK_PATH}")
    result = rig.attempt(make_alert("failed"))
    assert result.outcome == FAILED_TRANSPORT
    assert "TLS" in result.detail
    assert http.requests == []  # nothing readable reached the server


def test_slack_slow_answer_is_failed_transport(rig_factory, http):
    http.default = Reply(200, b"ok", delay=0.6)
    rig = rig_factory(http.url(HOOK_PATH), timeout=0.2)
    result = rig.attempt(make_alert("failed"))
    assert result.outcome == FAILED_TRANSPORT
    assert "timed out" in result.detail


def test_slack_detail_never_carries_the_webhook_path(rig, http):
    http.default = Reply(404, b"no_service")
    result = rig.attempt(make_alert("failed"))
    assert "CANARYSECRET" not in result.detail
    assert "CANARYSECRET" not in str(rig.transport)
    assert rig.transport.destination() == f"http://127.0.0.1:{http.port}"


# --- the payload ------------------------------------------------------------------------

def test_slack_failed_payload(rig, http):
    assert rig.attempt(make_alert("failed"), "#data-oncall").outcome == SENT
    req = http.wait_for(1)[0]
    assert req.path == HOOK_PATH
    assert req.headers["Content-Type"] == "application/json"
    body = req.json()
    assert body["text"] == (
        "\u274c reporting-nightly-sync run failed at step copy-orders \u00b7 "
        f"OperationalError: connection refused <{RUN_URL}|View run>")
    assert body["channel"] == "#data-oncall"
    assert body["username"] == "Nomaflow"
    assert body["icon_emoji"] == ":gear:"
    [attachment] = body["attachments"]
    assert attachment["color"] == "#d00000"
    assert "run_a8c4d" in attachment["text"] and "cron" in attachment["text"]


def test_slack_user_recipient_and_custom_username_icon(rig_factory, http):
    rig = rig_factory(http.url(HOOK_PATH), 'username = "Liberty"\nicon_emoji = ":robot_face:"\n')
    assert rig.attempt(make_alert("succeeded"), "@alice").outcome == SENT
    body = http.wait_for(1)[0].json()
    assert (body["channel"], body["username"], body["icon_emoji"]) == (
        "@alice", "Liberty", ":robot_face:")


def test_slack_default_recipient_uses_default_channel(rig_factory, http):
    rig = rig_factory(http.url(HOOK_PATH), 'default_channel = "#nomaflow-alerts"\n')
    recipient = default_recipient(rig.cfg.transports["slack"])
    assert recipient == "#nomaflow-alerts"
    assert rig.attempt(make_alert("failed"), recipient).outcome == SENT
    assert http.wait_for(1)[0].json()["channel"] == "#nomaflow-alerts"


def test_slack_default_recipient_without_default_channel_sends_no_channel(rig, http):
    assert default_recipient(rig.cfg.transports["slack"]) == SLACK_DEFAULT
    assert rig.attempt(make_alert("failed"), SLACK_DEFAULT).outcome == SENT
    assert "channel" not in http.wait_for(1)[0].json()


@pytest.mark.parametrize(("kind", "colour"), [
    ("failed", "#d00000"), ("long_run", "#f2c744"), ("succeeded", "#2eb67d"),
    ("cancelled", None), ("enabled", None), ("notice", None), ("test", None),
])
def test_slack_colour_per_kind(kind, colour):
    payload = Slack("s", {"username": "Nomaflow"}, timeout=1).payload(
        make_alert(kind, minutes=45, message="hi", by="alice"), "#x")
    if colour is None:
        assert "attachments" not in payload
    else:
        assert payload["attachments"][0]["color"] == colour


@pytest.mark.parametrize(("kind", "fields", "text"), [
    ("failed", {"step": None, "error": None},
     f"\u274c reporting-nightly-sync run failed <{RUN_URL}|View run>"),
    ("long_run", {"minutes": 45},
     f"\u23f3 reporting-nightly-sync run still running after 45 min <{RUN_URL}|View run>"),
    ("succeeded", {}, f"\u2705 reporting-nightly-sync run succeeded <{RUN_URL}|View run>"),
    ("cancelled", {"by": "alice"},
     f"\U0001f6ab reporting-nightly-sync run cancelled by alice <{RUN_URL}|View run>"),
    ("enabled", {"by": "bob", "run_id": None},
     "\u25b6\ufe0f reporting-nightly-sync enabled by bob"),
    ("disabled", {"by": "bob", "run_id": None},
     "\u23f8\ufe0f reporting-nightly-sync disabled by bob"),
    ("notice", {"message": "rows loaded: 1200", "run_id": None},
     "\U0001f4e3 reporting-nightly-sync: rows loaded: 1200"),
    ("test", {}, "\U0001f514 test from Nomaflow <https://nomaflow.test|Open Nomaflow>"),
])
def test_slack_wording_per_kind(kind, fields, text):
    minutes = fields.pop("minutes", None)
    payload = Slack("s", {}, timeout=1).payload(make_alert(kind, minutes, **fields), "#x")
    assert payload["text"] == text


def test_slack_escapes_event_text(rig, http):
    error = "boom <!channel> rows & columns <http://evil.test|click here>"
    rig.attempt(make_alert("failed", error=error, step="load <b>"))
    text = http.wait_for(1)[0].json()["text"]
    assert "&lt;!channel&gt; rows &amp; columns &lt;http://evil.test|click here&gt;" in text
    assert "at step load &lt;b&gt;" in text
    assert "<!channel>" not in text and "<http://evil" not in text
    # The only markup left is our own link.
    assert text.count("<") == 1 and text.endswith(f"<{RUN_URL}|View run>")


def test_slack_text_cannot_mention_or_link_in_mattermost(rig, http):
    """Mattermost takes Slack's payload but reads its text as Markdown, where `@channel`,
    `@all` and `@here` notify everyone and `[label](url)` is a link. Event text keeps its
    look; a word joiner after `@` and between `]` and `(` leaves neither to parse."""
    error = "db down @channel @all @here, log in at [View run](https://evil.test/sso)"
    rig.attempt(make_alert("failed", error=error))
    send_digest(rig, [make_alert("failed", error=error), make_alert("failed", job_id="b@here")])
    for request in http.wait_for(2):
        text = json.dumps(request.json(), ensure_ascii=False)
        assert not re.search(r"@(channel|all|here)", text), text
        assert "](https://evil" not in text
        assert text.replace("\u2060", "").count("[View run](https://evil.test/sso)") >= 1


def test_slack_run_id_cannot_forge_the_link(rig, http):
    rig.attempt(make_alert("failed", run_id="r1|<!here>&x"))
    text = http.wait_for(1)[0].json()["text"]
    assert text.endswith("<https://nomaflow.test/runs/r1%7C%3C!here%3E&amp;x/|View run>")
    assert "<!here>" not in text
    assert text.count("<") == 1 and text.count("|") == 1


def test_slack_multiline_error_stays_one_line(rig, http):
    rig.attempt(make_alert("failed", error="first line\nsecond line\r\nthird"))
    text = http.wait_for(1)[0].json()["text"]
    assert "\n" not in text and "\r" not in text
    assert "first line second line third" in text


# --- digests: every job named, within Slack's limits --------------------------------------

# https://api.slack.com/changelog/2018-04-truncating-really-long-messages and the Block Kit
# reference: text past 40,000 characters is cut off; at most 100 attachments, 50 blocks.
SLACK_TEXT_LIMIT = 40_000
DIGEST_ID = "digest-0000abcd"


def storm_alerts(jobs: int, per_job: int = 1) -> list[Alert]:
    return [make_alert("failed", job_id=f"nightly-{j:04d}-sync", run_id=f"r{j}-{k}")
            for k in range(per_job) for j in range(jobs)]


def send_digest(rig: SlackRig, batch: list[Alert], recipient: str = "#data-oncall") -> list:
    members = tuple(Attempt(a, "slack", recipient) for a in batch)
    return rig.dispatcher.execute(Attempt(batch[0], "slack", recipient, members=members,
                                          digest_id=DIGEST_ID))


def assert_within_slack_limits(body: dict[str, Any]) -> None:
    assert len(body["text"]) <= SLACK_TEXT_LIMIT
    assert len(body.get("attachments", [])) <= 100
    assert len(body.get("blocks", [])) <= 50


@pytest.mark.parametrize(("jobs", "per_job"), [(40, 3), (2000, 1)])
def test_slack_digest_names_every_job(rig, http, jobs, per_job):
    batch = storm_alerts(jobs, per_job)
    results = send_digest(rig, batch)
    assert {r.outcome for r in results} == {SENT} and len(results) == jobs * per_job
    bodies = [r.json() for r in http.requests]
    for body in bodies:
        assert_within_slack_limits(body)
        assert body["channel"] == "#data-oncall"
    channel = "\n".join(b["text"] for b in bodies)
    missing = [j for j in range(jobs) if f"nightly-{j:04d}-sync" not in channel]
    assert missing == []
    assert f"{jobs * per_job} alerts held back" in bodies[0]["text"]
    assert all(DIGEST_ID in json.dumps(b) for b in bodies)  # each part says what it is part of
    if per_job > 1:
        assert f"\u00d7{per_job}" in channel  # jobs past the readable part: `job x3`


def test_slack_digest_that_fits_is_one_message(rig, http):
    results = send_digest(rig, storm_alerts(40, 3))
    assert len(http.requests) == 1
    assert results[0].detail.endswith("HTTP 200 ok")


def test_slack_digest_part_refused_fails_the_whole_digest_and_names_the_part(rig, http):
    answers = iter([Reply(200, b"ok"), Reply(400, b"invalid_payload")])
    http.default = Reply(200, b"ok")
    http.replies[HOOK_PATH] = lambda request: next(answers, Reply(200, b"ok"))
    results = send_digest(rig, storm_alerts(2000))
    assert len(http.requests) == 2  # no part is sent after one was refused
    assert {r.outcome for r in results} == {FAILED_DELIVERY}
    assert all("part 2 of" in r.detail and "invalid_payload" in r.detail for r in results)


def test_slack_digest_of_long_errors_stays_within_slack_limits(rig, http):
    # Each error is clipped to MAX_PIECE before escaping, which can make it five times longer.
    batch = [make_alert("failed", job_id=f"nightly-{j:04d}-sync", run_id=f"r{j}",
                        error="OperationalError: " + "<&>" * 2000) for j in range(60)]
    assert {r.outcome for r in send_digest(rig, batch)} == {SENT}
    bodies = [r.json() for r in http.requests]
    for body in bodies:
        assert_within_slack_limits(body)
    channel = "\n".join(b["text"] for b in bodies)
    assert [j for j in range(60) if f"nightly-{j:04d}-sync" not in channel] == []


# --- Mattermost: `type = "slack"` with a Mattermost incoming-webhook URL ----------------------

MATTERMOST_HOOK = "/hooks/xxx-generatedkey-xxx"


def mattermost(request: Any) -> Reply:
    """Answers as Mattermost's incoming webhooks do: `ok` as text/plain, or a JSON error."""
    body = request.json()
    if not body.get("text") and not body.get("attachments"):
        return Reply(400, json.dumps({
            "id": "web.incoming_webhook.text.app_error", "message": "No text specified",
            "detailed_error": "", "request_id": "hoan6o9ws7rp5xj7wu9rmysrte",
            "status_code": 400}).encode(), {"Content-Type": "application/json"})
    if body.get("channel") == "#gone":
        return Reply(403, json.dumps({
            "id": "web.incoming_webhook.channel_locked.app_error",
            "message": "This webhook is not permitted to post to the requested channel.",
            "detailed_error": "", "request_id": "x", "status_code": 403}).encode(),
            {"Content-Type": "application/json"})
    return Reply(200, b"ok", {"Content-Type": "text/plain", "X-Request-Id": "hoan6o9ws7"})


def test_mattermost_takes_the_slack_payload(rig_factory, http):
    http.replies[MATTERMOST_HOOK] = mattermost
    rig = rig_factory(http.url(MATTERMOST_HOOK))
    result = rig.attempt(make_alert("failed"), "#town-square")
    assert (result.outcome, result.detail) == (SENT, "HTTP 200 ok")
    body = http.wait_for(1)[0].json()
    # The fields Mattermost documents for Slack compatibility.
    assert set(body) == {"text", "channel", "username", "icon_emoji", "attachments"}
    assert body["channel"] == "#town-square"
    assert f"<{RUN_URL}|View run>" in body["text"]
    assert body["attachments"][0]["color"] == "#d00000"


def test_mattermost_refusal_is_failed_delivery_with_its_message(rig_factory, http):
    http.replies[MATTERMOST_HOOK] = mattermost
    rig = rig_factory(http.url(MATTERMOST_HOOK))
    result = rig.attempt(make_alert("failed"), "#gone")
    assert result.outcome == FAILED_DELIVERY
    assert result.detail == ("HTTP 403 web.incoming_webhook.channel_locked.app_error: This"
                             " webhook is not permitted to post to the requested channel.")
    assert "generatedkey" not in result.detail


def test_mattermost_digest_is_sent(rig_factory, http):
    http.replies[MATTERMOST_HOOK] = mattermost
    rig = rig_factory(http.url(MATTERMOST_HOOK))
    results = send_digest(rig, storm_alerts(40, 3))
    assert {r.outcome for r in results} == {SENT}
