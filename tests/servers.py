"""Real local servers for tests: an HTTP recorder that answers as Slack/webhooks do.

The recorder lives in tests/harness.py (bench/ shares it); its names are re-exported here.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

from tests.harness import HttpRecorder, Reply, Request

__all__ = ["HttpRecorder", "Reply", "Request", "closed_port", "wait_until"]


def closed_port() -> int:
    """A local port with nothing listening (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll `predicate` every 0.05 s until it returns a truthy value; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
