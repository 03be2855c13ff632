"""Hostile upstreams: each is a bounded, recorded failure that delays no other transport."""

from __future__ import annotations

import time

from tests.servers import HttpRecorder, Reply, wait_until

BIG = b"x" * (50 * 1024 * 1024)


def test_hostile_upstreams_are_bounded_and_recorded(tree, http, daemon_factory):
    other_host = HttpRecorder()
    try:
        http.replies.update({
            "/hang": Reply(200, b"ok", hang_after_headers=10),
            "/trickle": Reply(200, b"y" * 50, trickle=1.0),
            "/huge-error": Reply(500, BIG),
            "/redirect": Reply(302, b"", headers={"Location": other_host.url("/stolen")}),
            "/limited": Reply(429, b"rate limited", headers={"Retry-After": "0.2"}),
            "/healthy": Reply(200, b"ok"),
        })
        names = ["hang", "trickle", "huge-error", "redirect", "limited", "healthy"]
        tree.write_config("".join(tree.webhook(n, http.url(f"/{n}")) for n in names),
                          daemon="send_timeout_seconds = 1.5")
        d = daemon_factory()
        dropped = time.monotonic()
        tree.drop({"job_id": "j", "run_id": "r", "state": "FAILED"})
        healthy = http.wait_for(1, path="/healthy")[0]
        assert healthy.at - time.time() < 1 and time.monotonic() - dropped < 1.5
        rows = wait_until(lambda: len(tree.notifications()) == 6 and tree.notifications(),
                          timeout=15, what="six audit rows")
        by = {r["transport"]: r for r in rows}
        assert by["healthy"]["outcome"] == "SENT"
        for name in ("hang", "trickle"):
            assert by[name]["outcome"] == "FAILED_TRANSPORT", by[name]
            assert "timed out" in by[name]["detail"]
            assert by[name]["duration_ms"] < 3000
        assert by["huge-error"]["outcome"] == "FAILED_DELIVERY"
        assert len(by["huge-error"]["detail"]) < 400
        assert by["redirect"]["outcome"] == "FAILED_DELIVERY"
        assert "302" in by["redirect"]["detail"]
        assert other_host.requests == []
        assert by["limited"]["outcome"] == "FAILED_DELIVERY"
        # Paused for each Retry-After and tried again, then given up as a refusal.
        assert "refused 5 times" in by["limited"]["detail"]
        assert "Retry-After 0.2s" in by["limited"]["detail"]
        assert len(http.wait_for(1, path="/limited")) == 5
        assert d.stop() == 0
    finally:
        other_host.close()
