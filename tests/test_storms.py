"""Alert storms: pacing, digests instead of drops, 429s that delay but never lose; metrics."""

from __future__ import annotations

import re
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.servers import Reply, wait_until
from tests.smtp_server import SmtpRecorder

STORM = 1000
JOBS = 50


class SlackLimiter:
    """Answers as Slack does under load: 1 message/s with bursts of 25, then 429."""

    def __init__(self, tokens: float = 25.0) -> None:
        self.tokens = tokens
        self.stamp = time.monotonic()
        self.lock = threading.Lock()
        self.refused = 0

    def __call__(self, request) -> Reply:
        with self.lock:
            now = time.monotonic()
            self.tokens = min(25.0, self.tokens + (now - self.stamp) * 1.0)
            self.stamp = now
            if self.tokens >= 1:
                self.tokens -= 1
                return Reply(200, b"ok")
            self.refused += 1
            return Reply(429, b"rate_limited", headers={"Retry-After": "1"})


def storm(tree) -> None:
    for i in range(STORM):
        tree.drop({"job_id": f"job-{i % JOBS:02d}", "run_id": f"s{i:04d}", "state": "FAILED",
                   "error": "OperationalError: the shared database is down"})


def delivered_count(requests) -> int:
    """Alerts carried by the messages the channel accepted: 1 each, or a digest's count."""
    total = 0
    for r in requests:
        text = r.json()["text"]
        if re.match(r":package: \*digest-[0-9a-f]{8} continued\*", text):
            continue  # a digest's later part: its alerts are in the first part's count
        match = re.search(r"(\d+) alerts held back", text)
        total += int(match.group(1)) if match else 1
    return total


def named_counts(text: str) -> dict[str, int]:
    """Alerts per job as a digest names them: `job-07: 3 failed (...)` or `job-07 \u00d73`."""
    counts = {m[1]: int(m[2] or 1)
              for m in re.finditer(r"(job-\d\d): (?:(\d+) )?failed", text)}
    for m in re.finditer(r"(?:^|\u00b7 )(job-\d\d)(?: \u00d7(\d+))?(?= \u00b7|$)", text, re.M):
        counts[m[1]] = int(m[2] or 1)
    return counts


def slack_config(tree, http) -> None:
    tree.write_config(tree.slack("slack", http.url("/slack"), "digest_after_seconds = 1"),
                      daemon='metrics_listen = "127.0.0.1:0"')


def test_storm_to_slack_is_paced_into_digests_without_a_single_429(tree, http, daemon_factory):
    limiter = SlackLimiter()
    http.replies["/slack"] = limiter
    slack_config(tree, http)
    d = daemon_factory()
    storm(tree)
    rows = wait_until(lambda: len(tree.notifications()) == STORM and tree.notifications(),
                      timeout=60, what="an audit row per alert")
    accepted = list(http.requests)
    assert limiter.refused == 0
    assert len(accepted) <= 40, f"{len(accepted)} messages in the channel"
    assert delivered_count(accepted) == STORM
    assert {r["outcome"] for r in rows} == {"SENT"}
    digests = {m.group(0) for r in rows for m in [re.search(r"digest-[0-9a-f]{8}", r["detail"])]
               if m}
    in_messages = {m for r in accepted for m in re.findall(r"digest-[0-9a-f]{8}", r.body.decode())}
    assert digests and digests <= in_messages
    for text in (r.json()["text"] for r in accepted):
        held = re.search(r"(\d+) alerts held back", text)
        if held:  # every job of the digest named, with its count: none folded into "more"
            assert sum(named_counts(text).values()) == int(held.group(1)), text
    metrics = scrape(d)
    sent = sum(s.value for f in metrics if f.name == "nomaflowd_notifications"
               for s in f.samples if s.name.endswith("_total") and s.labels["outcome"] == "SENT")
    assert sent == STORM
    assert any(f.name == "nomaflowd_digests_sent" for f in metrics)
    assert d.stop() == 0


def test_429s_from_a_preloaded_channel_reappear_in_a_digest(tree, http, daemon_factory):
    limiter = SlackLimiter(tokens=0.0)
    http.replies["/slack"] = limiter
    slack_config(tree, http)
    d = daemon_factory()
    for i in range(30):
        tree.drop({"job_id": f"job-{i % 5}", "run_id": f"p{i:02d}", "state": "FAILED"})
    rows = wait_until(lambda: len(tree.notifications()) == 30 and tree.notifications(),
                      timeout=30, what="an audit row per alert")
    assert limiter.refused > 0
    assert {r["outcome"] for r in rows} == {"SENT"}
    refused_rows = [r for r in rows if "refused with HTTP 429" in r["detail"]]
    assert refused_rows and all("in digest-" in r["detail"] for r in refused_rows)
    sent_digests = {m for r in http.requests for m in re.findall(r"digest-[0-9a-f]{8}",
                                                                  r.body.decode())}
    for row in refused_rows:
        assert re.search(r"digest-[0-9a-f]{8}", row["detail"]).group(0) in sent_digests
    assert d.stop() == 0


def test_storm_to_an_unlimited_webhook_goes_alert_by_alert(tree, http, daemon_factory):
    http.default = Reply(200, b"")
    tree.write_config(tree.webhook("hook", http.url()))
    d = daemon_factory()
    storm(tree)
    http.wait_for(STORM, timeout=60)
    wait_until(lambda: len(tree.notifications()) == STORM, timeout=30, what="audit rows")
    assert all("digest" not in r.body.decode() for r in http.requests)
    assert sorted(r.json()["run_id"] for r in http.requests) == [f"s{i:04d}"
                                                                 for i in range(STORM)]
    assert d.stop() == 0


def scrape(d):
    port = int(re.search(r"metrics listening on http://127.0.0.1:(\d+)/", d.output()).group(1))
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
        assert resp.status == 200
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return list(text_string_to_metric_families(resp.read().decode()))


# --- digest format: worst first, Slack's 30 lines, email's table, one audit row each ------------

LONG_RUNS = 34  # with the one failed job: 35 jobs, 5 past Slack's 30 full lines


# A lane with one token that comes back every 2 s: once a first alert has taken it, whatever
# is raised within the next second waits past digest_after_seconds and goes out as one digest.
PACED = "rate_per_minute = 30\nburst = 1\ndigest_after_seconds = 0.5\n"


def digest_storm(tree, d, sent) -> None:
    """A primer alert takes the lane's only token; then 34 runs overdue (long_run) and one
    failed run of `zz-broken`, a job that sorts after all of them by name."""
    tree.write_jobs("[defaults.alerts]\non_long_run_minutes = 1\n")
    tree.drop({"job_id": "primer", "run_id": "p1", "state": "FAILED"})
    d.pump(until=lambda: sent() >= 1, what="the primer alert")
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 600))
    for i in range(LONG_RUNS):
        tree.drop({"job_id": f"job-{i:02d}", "run_id": f"lr{i:02d}", "state": "RUNNING",
                   "started_at": started})
    tree.drop({"job_id": "zz-broken", "run_id": "zz1", "state": "FAILED",
               "error": "OperationalError: the shared database is down"})


def digest_rows(tree, total: int) -> list[dict]:
    """The storm's audit rows, once all `total` (primer included) are written."""
    rows = [r for r in tree.notifications() if r["job_id"] != "primer"]
    return rows if len(rows) == total - 1 else []


def test_slack_digest_is_worst_first_capped_at_30_lines_and_audited_per_alert(
        tree, http, inproc):
    """README: "a line per job, worst first (Slack: capped at 30 lines with "and N more
    jobs" ...). Every alert in a digest still gets its own audit row, with the digest's
    outcome and a `detail` such as `in digest-1a2b3c4d of 979 alerts: HTTP 200 ok`."""
    tree.write_config(tree.slack("slack", http.url("/slack"), PACED))
    d = inproc()
    digest_storm(tree, d, lambda: len(http.requests))
    rows = d.pump(until=lambda: digest_rows(tree, LONG_RUNS + 2), timeout=15,
                  what="an audit row per alert of the digest")
    primer, message = http.requests  # the primer, then one digest: nothing else
    assert "primer" in primer.json()["text"] and "digest-" not in primer.body.decode()
    lines = message.json()["text"].split("\n")
    assert lines[0] == (":package: *35 alerts held back by the rate limit:"
                        " 1 failed, 34 long-running*")
    full = lines[1:31]
    assert full[0].startswith("\u274c zz-broken: failed (latest run zz1)"), full[0]
    assert [re.search(r"(job-\d\d): long-running", ln)[1] for ln in full[1:]] == [
        f"job-{i:02d}" for i in range(29)]
    assert re.fullmatch(r"_5 more jobs \(5 alerts\):_", lines[31]), lines[31]
    # past the cap, the other five only by name: no sixth full line
    assert lines[32:] == [" \u00b7 ".join(f"job-{i:02d}" for i in range(29, LONG_RUNS))]
    digest_id = re.search(r"digest-[0-9a-f]{8}", message.body.decode())[0]
    assert len(rows) == LONG_RUNS + 1
    assert {(r["outcome"], r["detail"]) for r in rows} == {
        ("SENT", f"in {digest_id} of 35 alerts: HTTP 200 ok")}
    assert sorted(r["run_id"] for r in rows) == sorted(
        [f"lr{i:02d}" for i in range(LONG_RUNS)] + ["zz1"])


@pytest.fixture
def smtp() -> Iterator[SmtpRecorder]:
    server = SmtpRecorder()
    yield server
    server.close()


def test_email_digest_is_a_table_worst_first_and_audited_per_alert(tree, smtp, inproc):
    """README: "a headline with the count, then a line per job, worst first (... email: a
    table ...). Every alert in a digest still gets its own audit row, with the digest's
    outcome and a `detail` such as `in digest-1a2b3c4d of 979 alerts: ...`."""
    tree.write_config('[transports.mail]\ntype = "email"\nhost = "127.0.0.1"\n'
                      f'port = {smtp.port}\ntls = "none"\ndefault_from = "nomaflow@corp.test"\n'
                      'default_recipient = "ops@corp.test"\n' + PACED)
    d = inproc()
    digest_storm(tree, d, lambda: len(smtp.messages))
    rows = d.pump(until=lambda: digest_rows(tree, LONG_RUNS + 2), timeout=15,
                  what="an audit row per alert of the digest")
    primer, digest = smtp.messages
    assert "DIGEST" not in primer.message["Subject"]
    assert digest.message["Subject"] == "[Nomaflow] DIGEST 35 alerts"
    assert digest.rcpt_tos == ["ops@corp.test"]
    page = digest.part("text/html")
    assert "35 alerts held back by the rate limit: 1 failed, 34 long-running" in page
    table = re.search(r"<table>(.*)</table>", page, re.S)
    assert table, page
    cells = [re.findall(r"<t[dh]>(.*?)</t[dh]>", row)
             for row in re.findall(r"<tr>(.*?)</tr>", table[1], re.S)]
    assert cells[0] == ["alert", "job", "run", "error"]
    assert len(cells) == 1 + LONG_RUNS + 1  # a row per alert, none folded away
    assert cells[1][:2] == ["FAILED", "zz-broken"]  # worst first, though last by name
    assert "OperationalError: the shared database is down" in cells[1][3]
    assert [c[:2] for c in cells[2:]] == [["LONG-RUNNING", f"job-{i:02d}"]
                                          for i in range(LONG_RUNS)]
    digest_id = re.search(r"digest-[0-9a-f]{8}", digest.part("text/plain"))[0]
    assert len(rows) == LONG_RUNS + 1
    assert {(r["outcome"], r["transport"], r["recipient"]) for r in rows} == {
        ("SENT", "mail", "ops@corp.test")}
    assert all(r["detail"].startswith(f"in {digest_id} of 35 alerts: SMTP 250")
               for r in rows), rows[0]


# --- fallback: what counts in a transport's streak ----------------------------------------------

def fallback_config(tree, http) -> None:
    """Slack (paced, never out of tokens here) for the jobs; a webhook as the fallback."""
    tree.write_config(tree.slack("slack", http.url("/slack"),
                                 "rate_per_minute = 600\nburst = 20\ndigest_after_seconds = 0.5")
                      + tree.webhook("hook", http.url("/fallback")),
                      daemon='fallback_recipients = ["hook"]\nfallback_after_failures = 3')
    tree.write_jobs('[defaults.alerts]\nrecipients = ["#ops"]\n')


def fallback_alerts(http) -> list[dict]:
    return [r.json() for r in http.requests if r.path.startswith("/fallback")]


def slack_rows(tree) -> list[dict]:
    return [r for r in tree.notifications() if r["transport"] == "slack"]


def streak(tree) -> list[tuple]:
    return tree.sql("SELECT failures, alerted_at IS NOT NULL FROM transport_streaks"
                    " WHERE transport = 'slack'")


def test_a_429_is_not_a_failure_but_the_digest_after_it_counts(tree, http, inproc):
    """README: a 429 that held alerts for a digest is the rate limit, not a broken channel;
    the digest's own outcome is what counts. Held alerts whose digest went out reset the
    streak; a digest the channel refuses (404 channel_not_found) is three failures in a
    row, and the fallback hears of them: a storm must not hide a revoked webhook."""
    broken = threading.Event()

    def slack(request) -> Reply:
        if b"digest-" not in request.body:
            return Reply(429, b"rate_limited", headers={"Retry-After": "0.1"})
        return Reply(404, b"channel_not_found") if broken.is_set() else Reply(200, b"ok")

    http.replies["/slack"] = slack
    http.replies["/fallback"] = Reply(200, b"")
    fallback_config(tree, http)
    d = inproc()
    for i in range(3):
        tree.drop({"job_id": f"held-{i}", "run_id": f"h{i}", "state": "FAILED"})
    digested = d.pump(until=lambda: len(slack_rows(tree)) == 3 and slack_rows(tree),
                      timeout=15, what="the three alerts' rows, after their digest")
    assert {r["outcome"] for r in digested} == {"SENT"}
    assert all(re.search(r"refused with HTTP 429.*in digest-[0-9a-f]{8} of 3 alerts: "
                         r"HTTP 200 ok$", r["detail"]) for r in digested), digested
    assert streak(tree) in ([], [(0, 0)])  # rate-limited, then delivered: no failure at all
    broken.set()
    for i in range(3):
        tree.drop({"job_id": f"lost-{i}", "run_id": f"l{i}", "state": "FAILED"})
    d.pump(until=lambda: fallback_alerts(http), timeout=15, what="the fallback alert")
    d.pump()
    lost = [r for r in slack_rows(tree) if r["job_id"].startswith("lost-")]
    assert {r["outcome"] for r in lost} == {"FAILED_DELIVERY"}
    assert all(re.search(r"in digest-[0-9a-f]{8} of 3 alerts: HTTP 404 channel_not_found$",
                         r["detail"]) for r in lost), lost
    (alert,) = fallback_alerts(http)
    assert (alert["alert"], alert["level"]) == ("transport_failing", "high")
    assert "transport slack failed 3 times in a row" in alert["summary"], alert
    assert all(f"lost-{i}/l{i} failed" in alert["summary"] for i in range(3)), alert
    assert "held-" not in alert["summary"]
    assert streak(tree) == [(3, 1)]


def test_a_digest_takes_everything_waiting_for_its_recipient(tree, http, inproc):
    """README: a 429 "puts the refused alert back in line; it is folded into the next
    digest", and a digest is "everything waiting for the same recipient". Alerts that came
    while the channel was paused go in that digest too, not each in a message of its own
    behind it: a refused alert sent alone again at every pause's end (the bucket is empty
    after a 429) used its five refusals up while the alerts behind it waited."""
    answers = iter([Reply(429, b"rate_limited", headers={"Retry-After": "2"})])
    http.replies["/slack"] = lambda request: next(answers, Reply(200, b"ok"))
    tree.write_config(tree.slack("slack", http.url("/slack"),
                                 "rate_per_minute = 600\nburst = 20\ndigest_after_seconds = 30"))
    tree.write_jobs('[defaults.alerts]\nrecipients = ["#ops"]\n')
    d = inproc()
    tree.drop({"job_id": "first", "run_id": "r0", "state": "FAILED"})
    d.pump(until=lambda: len(http.requests) == 1 and d.daemon.dispatcher.pacer.waiting == 1,
           what="the first alert sent, refused, back in line")
    for i in (1, 2):
        tree.drop({"job_id": f"later-{i}", "run_id": f"r{i}", "state": "FAILED"})
    d.pump(until=lambda: d.daemon.dispatcher.pacer.waiting == 3, what="all three in line")
    rows = d.pump(until=lambda: len(slack_rows(tree)) == 3 and slack_rows(tree), timeout=15,
                  what="three audit rows")
    assert len(http.requests) == 2  # the refused message, then one digest
    assert b"digest-" in http.requests[1].body
    assert {r["outcome"] for r in rows} == {"SENT"}
    assert all(re.search(r"in digest-[0-9a-f]{8} of 3 alerts: HTTP 200 ok$", r["detail"])
               for r in rows), [r["detail"] for r in rows]


def test_after_a_429_the_channel_waits_for_the_answers_still_on_their_way(tree, http, inproc):
    """Three alerts go out at once and the channel refuses all three, the first answer
    quickly, the other two slowly. The pause of the first 429 ends before the others come
    back; the refused alert then waits for them instead of going out alone again, and the
    three go together in one digest: four messages in all, each alert SENT."""
    lock = threading.Lock()
    singles: list[int] = []

    def slack(request) -> Reply:
        if b"digest-" in request.body:
            return Reply(200, b"ok")
        with lock:
            singles.append(1)
            first = len(singles) == 1
        return Reply(429, b"rate_limited", headers={"Retry-After": "0.1"},
                     delay=0.0 if first else 1.0)

    http.replies["/slack"] = slack
    tree.write_config(tree.slack("slack", http.url("/slack"),
                                 "rate_per_minute = 600\nburst = 20\ndigest_after_seconds = 30"))
    tree.write_jobs('[defaults.alerts]\nrecipients = ["#ops"]\n')
    d = inproc()
    for i in range(3):
        tree.drop({"job_id": f"job-{i}", "run_id": f"r{i}", "state": "FAILED"})
    rows = d.pump(until=lambda: len(slack_rows(tree)) == 3 and slack_rows(tree), timeout=15,
                  what="three audit rows")
    assert len(singles) == 3 and len(http.requests) == 4
    assert {r["outcome"] for r in rows} == {"SENT"}
    assert all(re.search(r"in digest-[0-9a-f]{8} of 3 alerts: HTTP 200 ok$", r["detail"])
               for r in rows), [r["detail"] for r in rows]


def test_a_failure_streak_survives_a_restart(tree, http, inproc):
    """README: "The streak is a row of the `transport_streaks` table, so a restart does not
    forget it": 2 failures, a restart, 1 failure make the one `transport_failing` alert of
    fallback_after_failures = 3."""
    http.replies["/slack"] = Reply(404, b"channel_not_found")
    http.replies["/fallback"] = Reply(200, b"")
    fallback_config(tree, http)
    before = inproc()
    for i in range(2):
        tree.drop({"job_id": f"etl-{i}", "run_id": f"r{i}", "state": "FAILED"})
    before.pump(until=lambda: len(slack_rows(tree)) == 2, what="two failed deliveries")
    before.pump()
    before.close()
    assert streak(tree) == [(2, 0)]
    assert fallback_alerts(http) == []
    after = inproc()
    tree.drop({"job_id": "etl-2", "run_id": "r2", "state": "FAILED"})
    after.pump(until=lambda: fallback_alerts(http), what="the fallback alert")
    after.pump()
    (alert,) = fallback_alerts(http)
    assert (alert["alert"], alert["level"]) == ("transport_failing", "high")
    assert "transport slack failed 3 times in a row" in alert["summary"], alert
    assert "HTTP 404 channel_not_found" in alert["summary"]
    assert all(f"etl-{i}/r{i} failed" in alert["summary"] for i in range(3)), alert
    assert [r["outcome"] for r in slack_rows(tree)] == ["FAILED_DELIVERY"] * 3


# --- pacing: one bucket for every replica ------------------------------------------------------

def test_replicas_draw_from_one_token_bucket_in_the_database(tree, http, inproc, tmp_path):
    """README: "Each transport paces itself with a token bucket, shared by all its recipients
    and, through the database, by every replica": with rate_per_minute = 1 and burst = 1,
    four alerts across two replicas make one message, not one per replica."""
    from tests.conftest import DaemonProcess, replica_tree

    http.replies["/slack"] = Reply(200, b"ok")
    other = replica_tree(tmp_path / "b", tree, f"sqlite:///{tree.db_path}")
    lane = "rate_per_minute = 1\nburst = 1\ndigest_after_seconds = 0.3"
    for t, replica in ((tree, "a"), (other, "b")):
        t.write_config(t.slack("slack", http.url("/slack"), lane),
                       daemon=f'replica_id = "{replica}"')
    b = DaemonProcess(other).start()  # a real process: the bucket is not in our memory
    try:
        for i in range(2):
            other.drop({"job_id": f"etl-b{i}", "run_id": f"b{i}", "state": "FAILED"})
        http.wait_for(1)  # b's first alert took the only token
        a = inproc()
        for i in range(2):
            tree.drop({"job_id": f"etl-a{i}", "run_id": f"a{i}", "state": "FAILED"})
        line = a.daemon.dispatcher.pacer.lanes["slack"]

        def settled() -> bool:
            """Both of a's alerts claimed, none in flight, and any still in line due for a
            digest: by now a bucket of a's own would have let at least one out."""
            claimed = tree.sql("SELECT count(*) FROM deliveries WHERE claimed_by = 'a'")
            return claimed == [(2,)] and not a.daemon.dispatcher.sending and all(
                time.monotonic() - w.since > line.digest_after for w in line.waiting)

        a.pump(until=settled, what="a's two alerts claimed and due for a digest")
        a.daemon.step()  # a pace() with both due: there is no token for them
        assert len(line.waiting) == 2
        assert len(http.requests) == 1, [r.json()["text"] for r in http.requests]
        assert "digest-" not in http.requests[0].body.decode()
        assert tree.sql("SELECT replica FROM notifications") == [("b",)]
        assert sorted(tree.sql("SELECT replica_id FROM replicas")) == [("a",), ("b",)]
        assert b.stop() == 0
    finally:
        b.close()
