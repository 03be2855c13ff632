"""`nomaflowd demo`: the daemon on embedded defaults plus a local receiver, so a newcomer sees an
alert arrive without any Slack or SMTP account."""

from __future__ import annotations

import fcntl
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from nomaflowd import config, crypto
from nomaflowd.client import drop
from nomaflowd.daemon import Daemon
from nomaflowd.errors import UsageError
from nomaflowd.text import for_terminal

CONFIG = """\
# Written by `nomaflowd demo`: the embedded defaults plus a local receiver.
[daemon]
spool_dir = "../spool"
database = "sqlite:///../lib/nomaflowd.db"
jobs_file = "../../etc/jobs.toml"
key_file = "../lib/nomaflowd.key"
base_url = "http://127.0.0.1:{port}/nomaflow"
poll_seconds = 5

[transports.local-receiver]
type = "webhook"
url = "{token}"
"""


class Receiver(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
        try:
            shown = json.dumps(json.loads(body), indent=2, ensure_ascii=False)
        except ValueError:
            shown = body.decode(errors="replace")
        # Printed, not logged: the log shows a value on one line, escaped, and this is the
        # JSON a newcomer reads.
        print(for_terminal(f"local receiver got an alert:\n{shown}"), flush=True)

    def log_message(self, format: str, *args: object) -> None:
        pass  # the line above says it better


def run_demo(root: Path, port: int) -> int:
    try:
        server = ThreadingHTTPServer(("127.0.0.1", port), Receiver)
    except OSError as exc:
        raise UsageError(f"--port {port}: cannot listen on 127.0.0.1 ({exc.strerror or exc});"
                         " pick another port, or 0 for a free one") from None
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, name="demo-receiver", daemon=True).start()
    demo_dir = root / "var" / "demo"
    demo_dir.mkdir(parents=True, exist_ok=True)
    # One demo per directory: a second one rewrote the first's config, shared its spool,
    # and its alert went to the first one's receiver.
    lock = (demo_dir / ".lock").open("a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        server.server_close()
        raise UsageError(f"another nomaflowd demo is running in {demo_dir}; stop it (Ctrl-C)"
                         " or run this one from another directory") from None
    key_file = root / "var" / "lib" / "nomaflowd.key"
    if not key_file.exists():
        crypto.write_key(key_file)
    token = crypto.encrypt(crypto.load_keys(key_file), f"http://127.0.0.1:{port}/hook")
    config_file = demo_dir / "nomaflowd.toml"
    config_file.write_text(CONFIG.format(port=port, token=token), encoding="utf-8")
    cfg = config.load(config_file)
    daemon = Daemon(cfg)
    daemon.install_signals()

    def first_alert() -> None:
        while not daemon.ready and not daemon.stopping.wait(0.05):
            pass
        # A new run each time: the same event twice would (rightly) alert once.
        run_id = time.strftime("demo-%Y%m%d-%H%M%S")
        drop(cfg.spool_dir, {"job_id": "reporting-nightly-sync", "run_id": run_id,
                             "state": "FAILED", "step": "copy-orders", "triggered_by": "cron",
                             "error": "OperationalError: connection refused"})
        print(f"demo: dropped a FAILED event; drop your own with\n  nomaflowd emit --config"
              f" {config_file} --job my-job --run r1 --state FAILED --error boom\n"
              f"  then: nomaflowd audit --config {config_file}   (Ctrl-C stops)", flush=True)

    threading.Thread(target=first_alert, name="demo-event", daemon=True).start()
    try:
        return daemon.run()
    finally:
        server.shutdown()
