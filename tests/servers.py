"""Real local servers for tests: an HTTP recorder that answers as Slack/webhooks do."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float = field(default_factory=time.time)

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Reply:
    status: int = 200
    body: bytes = b"ok"
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0            # seconds before answering
    trickle: float = 0.0          # seconds between body bytes (after the headers)
    hang_after_headers: float = 0.0


class HttpRecorder:
    """ThreadingHTTPServer on 127.0.0.1:0; scripted replies per path prefix; records requests."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.replies: dict[str, Reply | Callable[[Request], Reply]] = {}
        self.default = Reply()
        self._cond = threading.Condition()
        self.closing = threading.Event()
        self.connections: set[socket.socket] = set()  # open client connections
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with recorder._cond:
                    recorder.connections.add(self.connection)

            def finish(self) -> None:
                with recorder._cond:
                    recorder.connections.discard(self.connection)
                super().finish()

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length)
                if len(body) < length:
                    return  # the sender died mid-request: nothing was delivered
                req = Request("POST", self.path, dict(self.headers.items()), body)
                reply = recorder.reply_for(req)
                if reply.delay:
                    recorder.closing.wait(reply.delay)
                with recorder._cond:
                    recorder.requests.append(req)
                    recorder._cond.notify_all()
                try:
                    self.send_response(reply.status)
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(reply.body)))
                    self.end_headers()
                    if reply.hang_after_headers:
                        self.wfile.flush()
                        recorder.closing.wait(reply.hang_after_headers)
                    if reply.trickle:
                        for b in reply.body:
                            self.wfile.write(bytes([b]))
                            self.wfile.flush()
                            if recorder.closing.wait(reply.trickle):
                                break
                    else:
                        self.wfile.write(reply.body)
                except OSError:
                    pass

            def log_message(self, format: str, *args: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # clients cut off mid-request are part of the tests

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True,
                                       kwargs={"poll_interval": 0.05})
        self.thread.start()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def reply_for(self, req: Request) -> Reply:
        for prefix, reply in self.replies.items():
            if req.path.startswith(prefix):
                return reply(req) if callable(reply) else reply
        return self.default

    def wait_for(self, count: int, timeout: float = 10.0, path: str | None = None) -> list[Request]:
        """Block until `count` requests (to `path`, if given) arrived; fail after `timeout`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                got = [r for r in self.requests if path is None or r.path.startswith(path)]
                if len(got) >= count:
                    return got
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"expected {count} request(s), got {len(got)}")
                self._cond.wait(min(remaining, 0.05))

    @property
    def open_connections(self) -> int:
        with self._cond:
            return len(self.connections)

    def close(self) -> None:
        """Stop serving and end every handler: scripted waits return, connections are cut."""
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()
        with self._cond:
            for conn in self.connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)


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
