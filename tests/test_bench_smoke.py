"""CI smoke of bench/run.py (issue 6): it completes and loses nothing; no timed target."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_quick_completes_and_loses_nothing(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--repeat", "1",
         "--only", "a,b,d", "--out", str(out), "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=90, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["lost"] == 0
    assert doc["complete"] is True
    for name in ("a", "b", "d"):
        runs = doc["scenarios"][name]["runs"]
        assert runs and all(r["ok"] for r in runs), runs
        assert all(r["lost"] == 0 for r in runs)
    assert doc["scenarios"]["a"]["runs"][0]["rejected"] == 0
    assert doc["scenarios"]["d"]["runs"][0]["not_sent"] == 0
