"""The README's first command: `nomaflowd demo` shows an alert arriving, with no accounts."""

from __future__ import annotations

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
            proc.send_signal(signal.SIGINT)
            assert proc.wait(20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert "local receiver got an alert" in text
    assert '"alert": "failed"' in text
    assert (tmp_path / "var" / "lib" / "nomaflowd.key").exists()
