"""The README's first command: `nomaflowd demo` shows an alert arriving, with no accounts."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

from tests.servers import wait_until


def test_demo_delivers_an_alert_to_its_local_receiver_and_stops_cleanly(tmp_path):
    log = tmp_path / "demo.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "nomaflowd", "demo"], cwd=tmp_path,
                                stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: "outcome=SENT" in log.read_text(), timeout=20,
                       what="the demo alert")
            # README's next step, from another terminal: emit an event with the demo's config
            config = tmp_path / "var" / "demo" / "nomaflowd.toml"
            emit = subprocess.run([sys.executable, "-m", "nomaflowd", "emit", "--config",
                                   str(config), "--job", "my-job", "--run", "r1", "--state",
                                   "FAILED", "--error", "boom"], cwd=tmp_path,
                                  capture_output=True, text=True, timeout=30)
            assert emit.returncode == 0, emit.stderr
            # A second demo in the same directory would take over the first one's files.
            second = subprocess.run([sys.executable, "-m", "nomaflowd", "demo"], cwd=tmp_path,
                                    capture_output=True, text=True, timeout=30)
            assert (second.returncode, second.stderr) == (
                2, f"nomaflowd: another nomaflowd demo is running in {tmp_path}/var/demo;"
                   " stop it (Ctrl-C) or run this one from another directory\n")
            wait_until(lambda: log.read_text().count("outcome=SENT") == 2, timeout=20,
                       what="the emitted event's alert")
            proc.send_signal(signal.SIGINT)
            assert proc.wait(20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert "local receiver got an alert" in text
    lines = text.splitlines()
    assert '  "alert": "failed",' in lines  # the JSON as it came, one field a line
    assert any(line.startswith("  nomaflowd emit --config ") for line in lines)
    assert (tmp_path / "var" / "lib" / "nomaflowd.key").exists()
    audit = subprocess.run([sys.executable, "-m", "nomaflowd", "audit", "--config",
                            str(tmp_path / "var" / "demo" / "nomaflowd.toml"), "--format",
                            "json"], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert audit.returncode == 0, audit.stderr
    rows = json.loads(audit.stdout)
    assert ("my-job", "r1", "SENT") in {(r["job_id"], r["run_id"], r["outcome"]) for r in rows}
