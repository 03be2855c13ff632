"""The HTTP server under the web page and the metrics endpoint: a thread per connection, as
http.server's ThreadingHTTPServer does, with a bound on how many connections are served at
once and on how long each may last.

A read timeout alone does not do it: a client that trickles its request a byte at a time
holds a thread for as long as it likes, and without one a client that connects and sends
nothing (a scanner, a half-open connection left by a network that dropped a scraper) holds
it for good. So each connection has a deadline for the whole exchange (the send deadlines'
thread shuts its socket down), and past `max_connections` a new one is answered 503 at
once and closed.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from http.server import ThreadingHTTPServer
from typing import Any

from nomaflowd.transports.base import DEADLINES

logger = logging.getLogger(__name__)

BUSY = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
        b"Content-Length: 34\r\nConnection: close\r\n\r\n"
        b"too many connections; retry later\n")
WARN_EVERY = 60.0  # seconds between two "too many connections" log lines


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, what: str, address: tuple[str, int], handler: Any, *,
                 max_connections: int, connection_seconds: float) -> None:
        self.what = what  # "web page", "metrics": for the log
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.max_connections = max_connections
        self.connection_seconds = connection_seconds
        self._slots = threading.BoundedSemaphore(max_connections)
        self._warned = -WARN_EVERY
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)  # starts the thread
        except BaseException:
            self._slots.release()
            self.shutdown_request(request)
            raise

    def deadline_seconds(self) -> float:
        """How long a connection that starts now may last."""
        return self.connection_seconds

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            deadline = time.monotonic() + self.deadline_seconds()
            with DEADLINES.watch(lambda: request, deadline):
                super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _refuse(self, request: socket.socket) -> None:
        """503 without waiting on the client (the answer fits in the socket's buffer)."""
        now = time.monotonic()
        if now - self._warned >= WARN_EVERY:
            self._warned = now
            logger.warning("%s: %d connections open, the most it serves at once; answering"
                           " more with 503 (each connection may last %gs)", self.what,
                           self.max_connections, self.deadline_seconds())
        with contextlib.suppress(OSError):
            request.setblocking(False)
            request.send(BUSY)
        self.shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("%s: request from %s failed", self.what, client_address, exc_info=True)
