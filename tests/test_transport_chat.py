"""Teams, Discord and Google Chat presets against local receivers answering as each platform
does; every body checked against the platform's documented shape, digests too."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Iterator
from dataclasses import replace
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import pytest

from nomaflowd import config
from nomaflowd.alerts import Alert
from nomaflowd.cli import main
from nomaflowd.dispatch import FAILED_DELIVERY, SENT, Attempt, Dispatcher
from nomaflowd.errors import ConfigError
from nomaflowd.transports import build
from nomaflowd.transports.base import RateLimited
from tests.servers import Reply
from tests.test_transport_slack import make_alert

RUN_URL = "https://nomaflow.test/runs/run_a8c4d/"
PATHS = {
    "teams": "/workflows/0a1b/triggers/manual/paths/invoke?api-version=2016-06-01&sig=TEAMSSIG0001",
    "discord": "/api/webhooks/1234567890/DISCORDTOKEN0001",
    "google_chat": "/v1/spaces/AAAA/messages?key=GCHATKEY0001&token=GCHATTOKEN0001",
}
# What each platform answers to a message it took.
ACCEPTED = {
    "teams": Reply(202, b""),
    "discord": Reply(204, b""),
    "google_chat": Reply(200, json.dumps({"name": "spaces/AAAA/messages/m1",
                                          "thread": {"name": "spaces/AAAA/threads/t1"}}).encode(),
                         {"Content-Type": "application/json"}),
}
DISCORD_COLOURS = {"failed": 0xD00000, "long_run": 0xF2C744, "succeeded": 0x2EB67D}
TEAMS_STYLES = {"failed": "attention", "long_run": "warning", "succeeded": "good"}


class ChatRig:
    def __init__(self, tree: Any, http: Any, preset: str, extra: str = "") -> None:
        http.default = ACCEPTED[preset]
        self.preset = preset
        self.cfg = config.load(tree.write_config(tree.webhook(
            preset, http.url(PATHS[preset]), f'preset = "{preset}"\n{extra}')))
        self.transports = build(self.cfg.transports, 2)
        self.transport = self.transports[preset]
        self.dispatcher = Dispatcher(self.transports, "test-replica")

    def attempt(self, alert: Alert) -> Any:
        return self.dispatcher.attempt(Attempt(alert, self.preset, self.preset))

    def digest(self, batch: list[Alert]) -> list[Any]:
        members = tuple(Attempt(a, self.preset, self.preset) for a in batch)
        return self.dispatcher.execute(Attempt(batch[0], self.preset, self.preset,
                                               members=members, digest_id="digest-0000abcd"))

    def close(self) -> None:
        self.dispatcher.close()


@pytest.fixture
def rig_for(tree: Any, http: Any) -> Iterator[Any]:
    made: list[ChatRig] = []

    def make(preset: str, extra: str = "") -> ChatRig:
        rig = ChatRig(tree, http, preset, extra)
        made.append(rig)
        return rig

    yield make
    for rig in made:
        rig.close()


def alert_of(kind: str, **fields: Any) -> Alert:
    """As the daemon makes it; `recovered` from the succeeding run's event."""
    if kind == "recovered":
        return replace(make_alert("succeeded", **fields), kind="recovered", failures=2,
                       minutes=47)
    return make_alert(kind, minutes=40, **fields)


def card_of(body: dict[str, Any]) -> dict[str, Any]:
    """The Adaptive Card of a Teams Workflows message, checked against the documented shape."""
    assert body["type"] == "message"
    [attachment] = body["attachments"]
    assert attachment["contentType"] == "application/vnd.microsoft.card.adaptive"
    content = attachment["content"]
    assert content["type"] == "AdaptiveCard"
    assert tuple(int(x) for x in content["version"].split(".")) >= (1, 4)
    assert content["$schema"] == "http://adaptivecards.io/schemas/adaptive-card.json"
    return content  # type: ignore[no-any-return]


def texts(content: dict[str, Any]) -> list[str]:
    """Every TextBlock's text in a card, containers included."""
    out = []
    for item in content["body"]:
        for block in item.get("items", [item]):
            if block.get("type") == "TextBlock":
                out.append(block["text"])
    return out


# --- one alert: the documented shape ------------------------------------------------------

def test_teams_failed_is_an_adaptive_card_with_facts_and_run_link(rig_for, http):
    rig = rig_for("teams")
    result = rig.attempt(make_alert("failed"))
    assert (result.outcome, result.detail) == (SENT, "HTTP 202")
    req = http.wait_for(1)[0]
    assert req.path == PATHS["teams"]
    content = card_of(req.json())
    band = content["body"][0]
    assert band["type"] == "Container" and band["style"] == "attention"
    assert texts(content)[0] == ("\u274c reporting-nightly-sync run failed at step copy-orders"
                                 " \u00b7 OperationalError: connection refused")
    [factset] = [b for b in content["body"] if b["type"] == "FactSet"]
    assert [(f["title"], f["value"]) for f in factset["facts"]] == [
        ("Job", "reporting-nightly-sync"), ("Run", "run_a8c4d"), ("Step", "copy-orders"),
        ("Error", "OperationalError: connection refused"), ("Triggered by", "cron")]
    assert content["actions"] == [{"type": "Action.OpenUrl", "title": "View run",
                                   "url": RUN_URL}]


def test_discord_failed_has_content_and_a_coloured_embed_linking_the_run(rig_for, http):
    rig = rig_for("discord")
    result = rig.attempt(make_alert("failed"))
    assert (result.outcome, result.detail) == (SENT, "HTTP 204")
    body = http.wait_for(1)[0].json()
    assert set(body) == {"username", "content", "embeds", "allowed_mentions"}
    assert body["username"] == "Nomaflow"
    assert body["content"].startswith("\u274c reporting-nightly-sync run failed at step")
    [embed] = body["embeds"]
    assert set(embed) == {"title", "description", "url", "color"}
    assert embed["title"] == "FAILED reporting-nightly-sync"
    assert embed["url"] == RUN_URL
    assert embed["color"] == 0xD00000 and isinstance(embed["color"], int)
    assert "**Run** run\\_a8c4d" in embed["description"]
    assert "**Error** OperationalError: connection refused" in embed["description"]
    assert f"[View run]({RUN_URL})" in embed["description"]
    assert body["allowed_mentions"] == {"parse": []}


def test_google_chat_failed_threads_by_job_and_asks_to_reply_in_the_thread(rig_for, http):
    rig = rig_for("google_chat")
    result = rig.attempt(make_alert("failed"))
    assert (result.outcome, result.detail) == (SENT, "HTTP 200")
    req = http.wait_for(1)[0]
    parts = urlsplit(req.path)
    assert parts.path == "/v1/spaces/AAAA/messages"
    assert parse_qs(parts.query) == {"key": ["GCHATKEY0001"], "token": ["GCHATTOKEN0001"],
                                     "messageReplyOption": ["REPLY_MESSAGE_FALLBACK_TO_NEW_THREAD"]}
    body = req.json()
    assert body["thread"] == {"threadKey": "nomaflow-reporting-nightly-sync"}
    assert body["text"] == ("\u274c reporting-nightly-sync run failed at step copy-orders"
                            f" \u00b7 OperationalError: connection refused <{RUN_URL}|View run>")
    [card] = body["cardsV2"]
    widgets = card["card"]["sections"][0]["widgets"]
    assert widgets[0] == {"textParagraph": {"text": '<font color="#d00000"><b>FAILED</b></font>'}}
    assert {"topLabel": "Step", "text": "copy-orders", "wrapText": True} in [
        w.get("decoratedText") for w in widgets]
    assert widgets[-1]["buttonList"]["buttons"][0]["onClick"]["openLink"]["url"] == RUN_URL


def test_google_chat_recovery_goes_to_the_failures_thread(rig_for, http):
    rig = rig_for("google_chat")
    for kind in ("failed", "long_run", "recovered"):
        assert rig.attempt(alert_of(kind)).outcome == SENT
    keys = {r.json()["thread"]["threadKey"] for r in http.wait_for(3)}
    assert keys == {"nomaflow-reporting-nightly-sync"}


@pytest.mark.parametrize("kind", ["failed", "long_run", "succeeded"])
def test_state_colour_per_preset(rig_for, http, kind):
    for preset in ("teams", "discord", "google_chat"):
        http.requests.clear()
        rig = rig_for(preset)
        assert rig.attempt(alert_of(kind)).outcome == SENT
        body = http.wait_for(1)[0].json()
        if preset == "teams":
            assert card_of(body)["body"][0]["style"] == TEAMS_STYLES[kind]
        elif preset == "discord":
            assert body["embeds"][0]["color"] == DISCORD_COLOURS[kind]
        else:
            colour = {"failed": "#d00000", "long_run": "#f2c744", "succeeded": "#2eb67d"}[kind]
            widget = body["cardsV2"][0]["card"]["sections"][0]["widgets"][0]
            assert f'color="{colour}"' in widget["textParagraph"]["text"]


def test_event_text_cannot_ping_everyone_or_forge_markup(rig_for, http):
    nasty = "boom @everyone <users/all> **bold** [x](https://evil.test) <!channel>"
    for preset in ("discord", "google_chat", "teams"):
        http.requests.clear()
        rig = rig_for(preset)
        assert rig.attempt(make_alert("failed", error=nasty)).outcome == SENT
        body = http.wait_for(1)[0].json()
        if preset == "discord":
            assert body["allowed_mentions"] == {"parse": []}
            assert "\\*\\*bold\\*\\*" in body["content"] and "\\[x\\]" in body["content"]
        elif preset == "teams":  # Adaptive Card text is Markdown: headline and facts alike
            content = card_of(body)
            shown = texts(content) + [f["value"] for item in content["body"]
                                      for f in item.get("facts", [])]
            error = [t for t in shown if "boom" in t]
            assert len(error) == 2, shown  # the headline and the Error fact
            for text in error:
                assert "\\*\\*bold\\*\\*" in text and "\\[x\\]\\(https" in text, text
        else:
            assert "<users/all>" not in body["text"] and "<!channel>" not in body["text"]
            assert "<users/all>" not in json.dumps(body["cardsV2"])


LINK = re.compile(r"(?<!\\)\[([^\]]*)(?<!\\)\]\(([^)]*)\)")  # [label](url), unescaped


@pytest.mark.parametrize("preset", ["discord", "teams", "google_chat"])
def test_a_run_id_cannot_add_a_link_or_leave_the_run_page(rig_for, http, preset):
    """The run id goes into the link percent-encoded: `)` and a space cannot close a
    Markdown link and open another to any host, `/` and `..` cannot reach another page of
    Nomaflow."""
    rig = rig_for(preset)
    run = "r1) [View run](https://evil.test/login?x="
    url = rig.cfg.run_url(run)
    assert url == "https://nomaflow.test/runs/r1%29%20%5BView%20run%5D%28https%3A%2F%2Fevil.test" \
        "%2Flogin%3Fx%3D/"
    alert = replace(make_alert("failed", run_id=run), url=url)
    assert rig.attempt(alert).outcome == SENT
    assert [r.outcome for r in rig.digest([alert, alert])] == [SENT, SENT]
    for request in http.wait_for(2):
        text = json.dumps(request.json())
        if preset == "google_chat":  # its links are <url|label>; Markdown is plain text there
            links = re.findall(r"<(https?://[^|>]*)\|", text)
        else:
            links = [u for _label, u in LINK.findall(text)]
        links += re.findall(r'"(?:url|openLink)": (?:\{"url": )?"([^"]*)"', text)
        assert all(u == url for u in links), links
    assert rig.cfg.run_url("../../admin/users/1/delete?confirm=1#") == (
        "https://nomaflow.test/runs/..%2F..%2Fadmin%2Fusers%2F1%2Fdelete%3Fconfirm%3D1%23/")
    assert rig.cfg.run_url("..") == rig.cfg.run_url(".") == ""  # no page to link


# --- answers: refusals and 429s as each platform sends them -------------------------------

def test_discord_429_waits_what_the_json_body_says(rig_for, http):
    rig = rig_for("discord")
    http.default = Reply(429, json.dumps({"message": "You are being rate limited.",
                                          "retry_after": 12.5, "global": False}).encode(),
                         {"Retry-After": "13", "Content-Type": "application/json"})
    with pytest.raises(RateLimited) as caught:
        rig.transport.send(make_alert("failed"), "discord")
    assert caught.value.retry_after == 12.5
    assert "429" in str(caught.value) and "retry_after 12.5s" in str(caught.value)
    result = rig.attempt(make_alert("failed"))
    assert result.outcome == FAILED_DELIVERY and "You are being rate limited" in result.detail


def test_discord_429_without_a_body_falls_back_to_retry_after(rig_for, http):
    rig = rig_for("discord")
    http.default = Reply(429, b"", {"Retry-After": "7"})
    with pytest.raises(RateLimited) as caught:
        rig.transport.send(make_alert("failed"), "discord")
    assert caught.value.retry_after == 7


def test_discord_unknown_webhook_is_failed_delivery_with_its_message(rig_for, http):
    rig = rig_for("discord")
    http.default = Reply(404, b'{"message": "Unknown Webhook", "code": 10015}')
    result = rig.attempt(make_alert("failed"))
    assert result.outcome == FAILED_DELIVERY
    assert result.detail == "HTTP 404 10015 Unknown Webhook"
    assert "DISCORDTOKEN0001" not in result.detail


@pytest.mark.parametrize("preset", ["teams", "google_chat"])
def test_teams_and_google_chat_429_wait_for_retry_after(rig_for, http, preset):
    rig = rig_for(preset)
    answer = ({"error": {"code": 429, "message": "Resource has been exhausted (e.g. check"
                         " quota).", "status": "RESOURCE_EXHAUSTED"}} if preset == "google_chat"
              else {"error": {"code": "WorkflowTriggerIsThrottled",
                              "message": "The workflow trigger is throttled."}})
    http.default = Reply(429, json.dumps(answer).encode(), {"Retry-After": "20"})
    with pytest.raises(RateLimited) as caught:
        rig.transport.send(make_alert("failed"), preset)
    assert caught.value.retry_after == 20
    word = "RESOURCE_EXHAUSTED" if preset == "google_chat" else "WorkflowTriggerIsThrottled"
    assert word in str(caught.value) and "Retry-After 20s" in str(caught.value)


def test_teams_schema_mismatch_is_failed_delivery(rig_for, http):
    rig = rig_for("teams")
    http.default = Reply(400, json.dumps({"error": {
        "code": "TriggerInputSchemaMismatch",
        "message": "The input body for trigger 'manual' of type 'Request' did not match"}}
    ).encode())
    result = rig.attempt(make_alert("failed"))
    assert result.outcome == FAILED_DELIVERY
    assert result.detail.startswith("HTTP 400 TriggerInputSchemaMismatch The input body")
    assert "TEAMSSIG0001" not in result.detail


# --- digests: every job named, within each platform's limits ------------------------------

def storm(jobs: int, per_job: int = 1) -> list[Alert]:
    return [make_alert("failed", job_id=f"nightly-{j:04d}-sync", run_id=f"r{j}-{k}")
            for k in range(per_job) for j in range(jobs)]


def digest_text(preset: str, body: dict[str, Any]) -> str:
    """The visible text of one digest message, after checking the platform's limits."""
    if preset == "teams":
        # Teams' message size limit, on the UTF-8 JSON as it is sent
        assert len(json.dumps(body, ensure_ascii=False).encode()) < 28_000
        return "\n".join(texts(card_of(body)))
    if preset == "discord":
        assert len(body["content"]) <= 2000
        assert 1 <= len(body["embeds"]) <= 10
        assert sum(len(e.get("title", "")) + len(e.get("description", ""))
                   for e in body["embeds"]) <= 6000
        for embed in body["embeds"]:
            assert len(embed["description"]) <= 4096 and len(embed["title"]) <= 256
            assert embed["color"] == 0xD00000
        assert body["allowed_mentions"] == {"parse": []}
        return body["content"] + "\n" + "\n".join(e["title"] + "\n" + e["description"]
                                                for e in body["embeds"])
    assert len(body["text"]) <= 4096
    assert "thread" not in body  # many jobs: no one job's thread
    return body["text"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("preset", ["teams", "discord", "google_chat"])
@pytest.mark.parametrize(("jobs", "per_job"), [(40, 3), (2000, 1)])
def test_chat_digest_names_every_job(rig_for, http, preset, jobs, per_job):
    rig = rig_for(preset)
    results = rig.digest(storm(jobs, per_job))
    assert {r.outcome for r in results} == {SENT} and len(results) == jobs * per_job
    shown = [digest_text(preset, r.json()) for r in http.requests]
    channel = "\n".join(shown).replace("\\", "")
    assert [j for j in range(jobs) if f"nightly-{j:04d}-sync" not in channel] == []
    assert f"{jobs * per_job} alerts held back" in shown[0]
    assert all("digest-0000abcd" in s for s in shown)
    if len(shown) > 1:
        assert all(f"of {len(shown)})" in s for s in shown)
        assert results[0].detail.endswith(f"({len(shown)} messages)")
    if per_job > 1:
        assert "\u00d73" in channel


WIDE = {
    "japanese errors": lambda j: {"job_id": f"job-{j:04d}", "error": "\u65e5\u672c\u8a9e" * 94},
    "chinese errors": lambda j: {"job_id": f"job-{j:04d}", "error": "\u4e2d\u6587" * 500},
    "emoji job ids": lambda j: {"job_id": f"{j:04d}" + "\U0001f525" * 196},
}


@pytest.mark.parametrize("preset", ["teams", "discord", "google_chat"])
@pytest.mark.parametrize(("wide", "jobs"), [("japanese errors", 30), ("chinese errors", 300),
                                            ("emoji job ids", 400)])
def test_a_digest_of_wide_characters_fits_each_platforms_limits(rig_for, http, preset, wide,
                                                                 jobs):
    """A character is 3 or 4 bytes on the wire: a digest part measured in characters went
    over Teams' 28 KB (30 jobs with Japanese errors: 30,754 bytes)."""
    rig = rig_for(preset)
    batch = [make_alert("failed", run_id=f"r{j}", **WIDE[wide](j)) for j in range(jobs)]
    results = rig.digest(batch)
    assert {r.outcome for r in results} == {SENT}
    for request in http.requests:
        body = request.json()
        digest_text(preset, body)
        if preset == "teams":
            assert len(request.body) < 28_000, len(request.body)  # what goes on the wire
        if preset == "google_chat":
            assert len(request.body) < 32_000, len(request.body)


def test_a_teams_card_of_control_characters_fits_28_kb(rig_for, http):
    """Each control character is six bytes of JSON (\\u0001): a card of them went over."""
    rig = rig_for("teams")
    junk = "\x01\x02\x1b" * 700
    result = rig.attempt(make_alert("failed", job_id="\U0001f525" * 200, run_id="r" * 200,
                                    step=junk, error=junk, triggered_by=junk))
    assert result.outcome == SENT
    [request] = http.requests
    assert len(request.body) < 28_000, len(request.body)


# --- config -------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["teams", "discord", "google_chat"])
def test_chat_preset_needs_its_url(tree, preset):
    tree.write_config(f'[transports.chat]\ntype = "webhook"\npreset = "{preset}"\n')
    with pytest.raises(ConfigError, match=r"transports\.chat\.url is required"):
        config.load(tree.config_path)


def test_unknown_preset_lists_the_known_ones(tree, http):
    tree.write_config(tree.webhook("chat", http.url(), 'preset = "msteams"'))
    with pytest.raises(ConfigError) as caught:
        config.load(tree.config_path)
    assert "teams, discord, google_chat" in str(caught.value)


# --- headers, signing_secret and body_template with a preset ------------------------------

SIGNING_SECRET = "whsec-chat-preset-0123"
TEMPLATE = "body_template = '{\"custom\": \"TEMPLATE-${job_id}\"}'\n"


def preset_extras(tree: Any) -> str:
    return (f'headers = {{ X-Team-Token = "{tree.enc("team-data-token")}" }}\n'
            f'signing_secret = "{tree.enc(SIGNING_SECRET)}"\n' + TEMPLATE)


def assert_signed(req: Any) -> None:
    """The configured header and the HMAC of the body as sent, over `timestamp.body`."""
    assert req.headers["X-Team-Token"] == "team-data-token"
    stamp = req.headers["X-Nomaflow-Timestamp"]
    mac = hmac.new(SIGNING_SECRET.encode(), stamp.encode() + b"." + req.body, hashlib.sha256)
    assert req.headers["X-Nomaflow-Signature"] == "sha256=" + mac.hexdigest()


@pytest.mark.parametrize("preset", ["teams", "discord", "google_chat"])
def test_preset_still_sends_headers_and_signature_but_not_the_body_template(
        tree, rig_for, http, preset):
    """README: "`headers` and `signing_secret` are still sent; `body_template` is ignored"
    (chat presets). The body stays the platform's shape, for one alert and for a digest."""
    rig = rig_for(preset, preset_extras(tree))
    assert rig.attempt(make_alert("failed")).outcome == SENT
    assert {r.outcome for r in rig.digest(storm(3))} == {SENT}
    requests = http.wait_for(2)
    for req in requests:
        assert_signed(req)
        assert b"TEMPLATE-" not in req.body and "custom" not in req.json()
    one, digest = (r.json() for r in requests)
    if preset == "teams":
        assert texts(card_of(one))[0].startswith("\u274c reporting-nightly-sync run failed")
        assert "nightly-0002-sync" in digest_text(preset, digest)
    elif preset == "discord":
        assert one["embeds"][0]["title"] == "FAILED reporting-nightly-sync"
        assert "nightly-0002-sync" in digest_text(preset, digest).replace("\\", "")
    else:
        assert one["thread"] == {"threadKey": "nomaflow-reporting-nightly-sync"}
        assert "nightly-0002-sync" in digest_text(preset, digest)


@pytest.mark.parametrize("preset", ["teams", "discord", "google_chat"])
def test_check_says_body_template_is_ignored_with_a_chat_preset(tree, http, capsys, preset):
    """README: "`body_template` is ignored (`nomaflowd check` says so)"."""
    tree.write_config(tree.webhook(preset, http.url(PATHS[preset]),
                                   f'preset = "{preset}"\n{TEMPLATE}'))
    assert main(["check", "--config", str(tree.config_path)]) == 0
    out = capsys.readouterr().out
    assert (f"warning: transports.{preset}.body_template is ignored: the {preset} preset"
            " sends that API's own body") in out
    # Without a template there is nothing to say.
    tree.write_config(tree.webhook(preset, http.url(PATHS[preset]), f'preset = "{preset}"'))
    main(["check", "--config", str(tree.config_path)])
    assert "body_template is ignored" not in capsys.readouterr().out


@pytest.mark.parametrize("preset", ["discord", "google_chat"])
def test_the_run_link_survives_when_the_text_is_clipped(rig_for, http, preset):
    """The text is clipped before the link is added: a clip through `<url|View run>` left
    broken markup, and Discord's description lost its `[View run](…)` line."""
    rig = rig_for(preset)
    fire = "\U0001f525" * 200  # as the daemon links it: 2,400 characters percent-encoded
    long = "x" * 1000
    alert = replace(make_alert("failed", job_id=fire, run_id=fire, step=long, error=long,
                               triggered_by=long, by=long),
                    url=f"https://nomaflow.test/runs/{quote(fire)}/")
    result = rig.attempt(alert)
    assert result.outcome == SENT
    body = http.requests[0].json()
    text = body["text"] if preset == "google_chat" else body["embeds"][0]["description"]
    assert len(text) <= 4096
    assert text.endswith((f"<{alert.url}|View run>", f"[View run]({alert.url})")), text[-60:]
