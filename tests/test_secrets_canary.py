"""A canary secret in every secret field must show up nowhere: logs, audit rows, CLI output."""

from __future__ import annotations

import json
import sqlite3

from nomaflowd.cli import main
from tests.servers import Reply, closed_port, wait_until

CANARY = "CANARY7f3a9"


def test_canary_secret_appears_nowhere(tree, http, daemon_factory, capsys, tmp_path):
    http.replies["/bad"] = Reply(500, b"upstream says no")
    dead = closed_port()
    tree.write_config(
        tree.webhook("good", http.url(f"/good/{CANARY}"),
                     f'headers = {{ Authorization = "{tree.enc("Bearer " + CANARY)}" }}\n'
                     f'signing_secret = "{tree.enc(CANARY)}"')
        + tree.webhook("bad", http.url(f"/bad/{CANARY}"))
        + tree.webhook("dead", f"http://{CANARY}.invalid:{dead}/{CANARY}")
        + tree.webhook("weird", f"http://127.0.0.1:notaport/{CANARY}")
        + tree.slack("slack", http.url(f"/services/T0/{CANARY}"))
        + '[transports.mail]\ntype = "email"\nhost = "127.0.0.1"\n'
        + f'port = {dead}\ndefault_from = "n@corp.local"\nusername = "u"\n'
        + f'password = "{tree.enc(CANARY)}"\n')
    d = daemon_factory()
    tree.drop({"job_id": "j", "run_id": "r", "state": "FAILED", "error": "boom"})
    rows = wait_until(lambda: len(tree.notifications()) == 6 and tree.notifications(),
                      timeout=20, what="six audit rows")
    assert d.stop() == 0
    assert {r["outcome"] for r in rows} == {"SENT", "FAILED_DELIVERY", "FAILED_TRANSPORT"}
    outputs = [d.output(), json.dumps(rows)]
    with sqlite3.connect(tree.db_path) as conn:
        for table in ("notifications", "deliveries", "runs"):
            outputs.append(json.dumps(conn.execute(f"SELECT * FROM {table}").fetchall()))
    cfg = str(tree.config_path)
    event = tmp_path / "e.json"
    event.write_text(json.dumps({"job_id": "j", "run_id": "r2", "state": "FAILED"}))
    for argv in (["transports"], ["audit"], ["audit", "--format", "json"],
                 ["audit", "--format", "csv"], ["check"], ["explain", str(event)],
                 ["test", "dead"], ["test", "weird"], ["test", "mail"], ["test", "bad"]):
        main([*argv, "--config", cfg])
        captured = capsys.readouterr()
        outputs.append(captured.out + captured.err)
    for text in outputs:
        assert CANARY not in text
    assert any(CANARY in r.path for r in http.requests)  # it was really used
