"""Alert storms: pacing, digests instead of drops, 429s that delay but never lose; metrics."""

from __future__ import annotations

import re
import threading
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.servers import Reply, wait_until

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
