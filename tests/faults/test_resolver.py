"""A DNS resolver that never answers: each send is still bounded by send_timeout_seconds."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.servers import closed_port, wait_until

FAILED = {"job_id": "nightly", "run_id": "r1", "state": "FAILED", "error": "boom"}


class DeafResolver:
    """A nameserver on 127.0.53.x:53 that reads every query and answers none."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for last in range(2, 255):
            with contextlib.suppress(OSError):
                self.sock.bind((f"127.0.53.{last}", 53))
                break
        else:
            pytest.skip("no free 127.0.53.x:53 for a test nameserver")
        self.address = self.sock.getsockname()[0]
        self.queries: list[bytes] = []
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self._read, name="deaf-resolver", daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while not self.closing.is_set():
            if select.select([self.sock], [], [], 0.05)[0]:
                self.queries.append(self.sock.recv(4096))

    def close(self) -> None:
        self.closing.set()
        self.thread.join(5)
        self.sock.close()

    def asked_for(self, name: str) -> bool:
        labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
        return any(labels in q for q in self.queries)


@pytest.fixture
def deaf_resolver(tree: Any) -> Iterator[tuple[DeafResolver, list[str]]]:
    """A command prefix that runs the daemon in a mount namespace of its own, where
    /etc/resolv.conf names only the deaf nameserver, which would be waited for 30 s."""
    if not shutil.which("unshare") or subprocess.run(
            ["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("unshare -m is not permitted here (needs root or CAP_SYS_ADMIN)")
    resolver = DeafResolver()
    conf = tree.root / "resolv.conf"
    conf.write_text(f"nameserver {resolver.address}\noptions timeout:30 attempts:1\n")
    yield resolver, ["unshare", "-m", "--propagation", "private", "sh", "-c",
                     f'mount --bind "{conf}" /etc/resolv.conf && exec "$@"', "sh"]
    resolver.close()


def test_a_resolver_that_never_answers_is_cut_at_the_send_timeout(tree, daemon_factory,
                                                                   deaf_resolver):
    resolver, prefix = deaf_resolver
    port = closed_port()
    tree.write_config(
        tree.webhook("hook", f"http://hooks.unanswered.test:{port}/x")
        + '[transports.mail]\ntype = "email"\nhost = "smtp.unanswered.test"\n'
        f'port = {port}\ntls = "none"\ndefault_from = "nomaflow@corp.test"\n'
        'default_recipient = "ops@corp.test"\n',
        daemon="send_timeout_seconds = 1")
    daemon_factory(prefix=prefix)
    tree.drop(FAILED)
    # Well before the resolver's own 30 s.
    rows = wait_until(lambda: len(tree.notifications()) == 2 and tree.notifications(),
                      timeout=10, what="both attempts recorded")
    assert resolver.asked_for("hooks.unanswered.test")
    assert resolver.asked_for("smtp.unanswered.test")
    for row in rows:
        assert row["outcome"] == "FAILED_TRANSPORT"
        assert row["detail"] == "timed out after 1s (DNS lookup)"
        assert row["duration_ms"] < 3000


def test_a_database_host_the_resolver_never_answers_for_is_an_outage_in_seconds(
        tree, deaf_resolver):
    """libpq's connect_timeout starts after its name lookup: with a resolver that does not
    answer, each connect waited resolv.conf's 30 s, and systemd's watchdog (30 s) killed
    the daemon with nothing in its log. The lookup is bounded by connect_timeout too."""
    resolver, prefix = deaf_resolver
    tree.write_config(daemon='database = "postgresql://postgres@db.unanswered.test:5432/test'
                             '?connect_timeout=2"')
    tree.spool.mkdir(parents=True)
    proc = subprocess.run([*prefix, sys.executable, "-m", "nomaflowd", "run", "--config",
                           str(tree.config_path)], capture_output=True, text=True,
                          timeout=20, cwd=tree.root, env={**os.environ, "NOTIFY_SOCKET": ""})
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        "nomaflowd: daemon.database cannot be opened: OperationalError: could not translate"
        ' host name "db.unanswered.test" to address: the resolver gave no answer within 2s')
    assert resolver.asked_for("db.unanswered.test")
