"""Webhook digests against a real local HTTP server: one JSON body naming every alert."""

from __future__ import annotations

import pytest

from nomaflowd import config
from nomaflowd.dispatch import SENT, Attempt, Dispatcher
from nomaflowd.transports import build
from tests.test_transport_slack import make_alert


@pytest.mark.parametrize("jobs", [40, 2000])
def test_webhook_digest_lists_every_alert(tree, http, jobs):
    cfg = config.load(tree.write_config(tree.webhook("hook", http.url())))
    dispatcher = Dispatcher(build(cfg.transports, 5), "test-replica")
    try:
        batch = [make_alert("failed", job_id=f"nightly-{j:04d}-sync", run_id=f"r{j}-{k}")
                 for j in range(jobs) for k in range(2)]
        members = tuple(Attempt(a, "hook", "hook") for a in batch)
        results = dispatcher.execute(Attempt(batch[0], "hook", "hook", members=members,
                                             digest_id="digest-0000abcd"))
        assert {r.outcome for r in results} == {SENT}, results[0].detail
        [request] = http.wait_for(1)
        body = request.json()
        assert (body["digest"], body["count"]) == ("digest-0000abcd", 2 * jobs)
        assert sorted((a["job_id"], a["run_id"]) for a in body["alerts"]) == sorted(
            (a.job_id, a.run_id) for a in batch)
    finally:
        dispatcher.close()
