"""A sidecar imports only what its configuration uses (bench scenario h: idle RSS)."""

from __future__ import annotations

import json
import subprocess
import sys

# The daemon's start as `nomaflowd run` does it (cli first), one loop turn, a clean stop;
# then the modules the process holds. A fresh interpreter: the test process imports all.
START = """
import json, sys
from pathlib import Path
from nomaflowd import cli, config
from nomaflowd.daemon import Daemon
daemon = Daemon(config.load(Path(sys.argv[1])))
daemon.initialize()
daemon.step()
daemon.shutdown()
print(json.dumps(sorted(sys.modules)))
"""

# What only some configurations use: other transports and presets, SMTP, the web page,
# Prometheus, the PostgreSQL driver.
OPTIONAL = ("nomaflowd.transports.slack", "nomaflowd.transports.slack_app",
            "nomaflowd.transports.email", "nomaflowd.transports.chat",
            "nomaflowd.transports.incident", "nomaflowd.transports.pagerduty",
            "nomaflowd.transports.opsgenie", "nomaflowd.transports.teams",
            "nomaflowd.transports.discord", "nomaflowd.transports.google_chat",
            "smtplib", "nomaflowd.web", "prometheus_client", "psycopg2",
            # requests' character-set detectors: this client never decodes an answer as text
            "charset_normalizer", "chardet",
            # schema migration: only for a database made by an older version
            "playhouse.migrate",
            # secrets are decrypted in a child process
            "cryptography")


def modules_at_start(tree) -> set[str]:
    proc = subprocess.run([sys.executable, "-c", START, str(tree.config_path)], cwd=tree.root,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout.splitlines()[-1]))


def test_webhook_only_daemon_imports_no_other_transport_smtp_web_metrics_or_postgres(tree):
    tree.write_config(tree.webhook("ops", "https://hooks.example.com/x"))
    loaded = modules_at_start(tree)
    assert "nomaflowd.transports.webhook" in loaded  # the one it uses
    assert sorted(loaded.intersection(OPTIONAL)) == []


def test_a_preset_imports_its_own_module_only(tree):
    key = tree.enc("R0UTINGKEY-0123456789abcdef")
    tree.write_config(tree.webhook("pd", "https://events.example.com/v2/enqueue",
                                   f'preset = "pagerduty"\nrouting_key = "{key}"'))
    loaded = modules_at_start(tree)
    assert "nomaflowd.transports.pagerduty" in loaded
    assert sorted(loaded.intersection(OPTIONAL)) == ["nomaflowd.transports.incident",
                                                     "nomaflowd.transports.pagerduty"]


def test_an_email_only_daemon_imports_no_http_client(tree):
    """requests and urllib3 are about 9 MB of RSS and 90 ms of start; SMTP needs neither."""
    tree.write_config('[transports.mail]\ntype = "email"\nhost = "127.0.0.1"\nport = 25\n'
                      'tls = "none"\ndefault_from = "nomaflow@corp.test"\n'
                      'default_recipient = "ops@corp.test"\n')
    loaded = modules_at_start(tree)
    assert "nomaflowd.transports.email" in loaded  # the one it uses
    assert sorted(m for m in loaded if m.split(".")[0] in ("requests", "urllib3")
                  or m == "nomaflowd.transports.http_client") == []
