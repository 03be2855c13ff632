"""Webhook digests against a real local HTTP server: one JSON body naming every alert."""

from __future__ import annotations

import base64
from dataclasses import replace

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


@pytest.mark.parametrize("headers", ["", 'headers = { Authorization = "ENC" }'])
def test_credentials_in_a_webhook_url_are_sent_as_basic_auth(tree, http, headers):
    """As curl and requests do: `https://user:password@host/…` logs in with Basic auth, and
    an Authorization header of the transport's own wins."""
    headers = headers.replace("ENC", tree.enc("Bearer own-token"))
    url = http.url("/hook").replace("http://", "http://ops%40corp:pa%3Ass@")
    cfg = config.load(tree.write_config(tree.webhook("hook", url, headers)))
    dispatcher = Dispatcher(build(cfg.transports, 5), "test-replica")
    try:
        [result] = dispatcher.execute(Attempt(make_alert("failed"), "hook", "hook"))
        assert result.outcome == SENT, result.detail
        [request] = http.wait_for(1)
        expected = "Bearer own-token" if headers else "Basic " + base64.b64encode(
            b"ops@corp:pa:ss").decode()
        assert request.headers["Authorization"] == expected
        assert "pa%3Ass" not in request.path and "ops" not in request.path
    finally:
        dispatcher.close()


def test_a_transport_keeps_no_state_per_job(tree, http):
    """Opsgenie closes an alert at a URL that names the job: the transport's caches, keyed
    by URL (Basic auth, proxies, connection routes), grew by a URL a job, about 1.2 KB each,
    until a reload. A daemon up for months meets every job it ever had."""
    key = tree.enc("6f0c2b1e-genie-key")
    cfg = config.load(tree.write_config(tree.webhook(
        "og", http.url("/"), f'preset = "opsgenie"\napi_key = "{key}"')))
    dispatcher = Dispatcher(build(cfg.transports, 5), "test-replica")
    try:
        for j in range(70):
            recovered = replace(make_alert("succeeded", job_id=f"job-{j:03d}"), kind="recovered")
            result = dispatcher.attempt(Attempt(recovered, "og", "og"))
            assert result.outcome == SENT, result.detail
        og = dispatcher.transports["og"]
        sizes = (len(og._auths), len(og._proxies), len(og._local.routes))
        assert max(sizes) <= 64, sizes
        assert len({r.path for r in http.requests}) == 70
    finally:
        dispatcher.close()
