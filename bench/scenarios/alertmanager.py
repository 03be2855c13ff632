"""Scenario e, Alertmanager: the alerts of c (paced) and d (burst) posted to a local
Alertmanager that sends them to the same receiver; skipped when it is not installed.
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.scenarios.base import (
    Ctx,
    Incomplete,
    Metric,
    Scenario,
    Skip,
    latencies,
    paced,
    percentile,
    slowest,
)

METRICS = [
    Metric("am_c_p50_ms", "Alertmanager paced: POST -> webhook p50", "ms", kind="info"),
    Metric("am_c_p99_ms", "Alertmanager paced: POST -> webhook p99", "ms", kind="info"),
    Metric("am_d_rate", "Alertmanager burst: alerts/s (first POST -> last webhook)", "/s",
           kind="info"),
    Metric("am_d_send_rate", "Alertmanager burst: first -> last webhook", "/s", kind="info"),
    Metric("am_lost", "Alertmanager deliveries missing", "", kind="info"),
]


def alertmanager_binary() -> str | None:
    return shutil.which("alertmanager") or shutil.which("prometheus-alertmanager")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Alertmanager:
    def __init__(self, binary: str, base: Path, hook_url: str, tag: str, *,
                 group_by: str = "['...']", group_wait: str = "0s",
                 group_interval: str = "1s") -> None:
        self.root = Path(tempfile.mkdtemp(prefix=f"am-{tag}-", dir=base))
        self.port = free_port()
        config = self.root / "alertmanager.yml"
        config.write_text(
            "route:\n"
            "  receiver: bench\n"
            f"  group_by: {group_by}\n"
            f"  group_wait: {group_wait}\n"
            f"  group_interval: {group_interval}\n"
            "  repeat_interval: 24h\n"
            "receivers:\n"
            "  - name: bench\n"
            "    webhook_configs:\n"
            f"      - url: '{hook_url}'\n"
            "        send_resolved: false\n", encoding="utf-8")
        self.logf = (self.root / "alertmanager.log").open("ab")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.path={self.root / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--cluster.listen-address=",
             "--log.level=warn"],
            stdout=self.logf, stderr=subprocess.STDOUT, cwd=self.root)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"alertmanager exited {self.proc.returncode}: "
                                   f"{(self.root / 'alertmanager.log').read_text()[-800:]}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                c.request("GET", "/-/ready")
                if c.getresponse().status == 200:
                    c.close()
                    break
                c.close()
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise Incomplete("alertmanager not ready within 30 s")
            time.sleep(0.05)
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)

    def post(self, alerts: list[dict[str, Any]]) -> None:
        body = json.dumps(alerts).encode()
        self.conn.request("POST", "/api/v2/alerts", body=body,
                          headers={"Content-Type": "application/json"})
        resp = self.conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"alertmanager refused alerts: {resp.status} {data[:200]!r}")

    def stop(self) -> None:
        self.conn.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.logf.close()


def am_alert(prefix: str, i: int) -> dict[str, Any]:
    run = f"{prefix}-{i}"
    return {"labels": {"alertname": "NomaflowRunFailed", "job_id": f"job-{i % 200:03d}",
                       "run_id": run, "severity": "high"},
            "annotations": {"summary": f"job-{i % 200:03d} run failed at step copy-orders",
                            "error": "OperationalError: connection refused"},
            "generatorURL": f"https://nomaflow.bench/runs/{run}/"}


def run(ctx: Ctx, rep: int) -> dict[str, Any]:
    assert ctx.receiver is not None
    binary = alertmanager_binary()
    if binary is None:
        raise Skip("alertmanager not installed: apt-get install prometheus-alertmanager")
    version = subprocess.run([binary, "--version"], capture_output=True, text=True)
    version_line = (version.stdout or version.stderr).splitlines()[0] if (
        version.stdout or version.stderr) else "?"
    out: dict[str, Any] = {"version": version_line}

    # c: the same paced FAILED alerts, one alert per POST (a source sends each as it happens)
    rate, seconds = ctx.sizes["c_rate"], ctx.sizes["c_seconds"]
    n = int(rate * seconds)
    path = f"/e{rep}c/alertmanager"
    am = Alertmanager(binary, ctx.base, ctx.receiver.url(path), f"c{rep}")
    prefix = f"e{rep}c"
    try:
        def send(i: int) -> float:
            t = time.monotonic()
            am.post([am_alert(prefix, i)])
            return t
        times = paced(rate, n, send)
        ctx.receiver.wait_items(path, n, 30.0)
    finally:
        am.stop()
        if not ctx.keep:
            shutil.rmtree(am.root, ignore_errors=True)
    sent = {f"{prefix}-{i}": t for i, t in times.items()}
    lat, missing_c, _ = latencies(sent, ctx.receiver.records(path))
    out["am_c_slowest"] = slowest(sent, ctx.receiver.records(path), min(times.values()))
    out.update(am_c_p50_ms=percentile(lat, 50), am_c_p99_ms=percentile(lat, 99),
               am_c_max_ms=max(lat) if lat else None, am_c_missing=missing_c)

    # d: the same burst, posted in batches of 64 (Prometheus's own batch size)
    n = ctx.sizes["d_count"]
    batch = ctx.sizes["am_batch"]
    path = f"/e{rep}d/alertmanager"
    prefix = f"e{rep}d"
    am = Alertmanager(binary, ctx.base, ctx.receiver.url(path), f"d{rep}")
    try:
        alerts = [am_alert(prefix, i) for i in range(n)]
        rcv0 = ctx.receiver.cpu_seconds()
        t0 = time.monotonic()
        for i in range(0, n, batch):
            am.post(alerts[i:i + batch])
        posted = time.monotonic()
        got = ctx.receiver.wait_items(path, n, max(60.0, n / 50))
        rcv1 = ctx.receiver.cpu_seconds()
    finally:
        am.stop()
        if not ctx.keep:
            shutil.rmtree(am.root, ignore_errors=True)
    records = ctx.receiver.records(path)
    sent = {f"{prefix}-{i}": t0 for i in range(n)}
    lat, missing_d, dups = latencies(sent, records)
    arrivals = sorted(m for m, _w, _i in records)
    out.update(am_d_rate=len(lat) / (arrivals[-1] - t0) if arrivals else None,
               am_d_send_rate=(len(arrivals) - 1) / (arrivals[-1] - arrivals[0])
               if len(arrivals) > 1 else None,
               am_d_post_s=posted - t0, am_d_received=got, am_d_webhooks=len(
                   {m for m, _w, _i in records}), am_d_duplicates=dups,
               am_lost=missing_c + missing_d,
               am_d_receiver_cpu_pct=(rcv1 - rcv0) / (arrivals[-1] - t0) * 100
               if arrivals else None)
    return out


SCENARIO = Scenario("Alertmanager side by side", METRICS, run)
