"""Real local servers for tests: an HTTP recorder that answers as Slack/webhooks do.

The recorder lives in tests/harness.py (bench/ shares it); its names are re-exported here.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from tests.harness import HttpRecorder, Reply, Request

__all__ = ["ForwardProxy", "HttpRecorder", "Reply", "Request", "ScriptedSmtp", "SilentTls",
           "SmtpTarpit",
           "closed_port", "wait_until"]


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


class ForwardProxy:
    """A forward proxy on 127.0.0.1:0, as corporate hosts have: absolute-URI requests for
    http:// and CONNECT tunnels for https://; records each request line. `refuse` answers
    403 to everything, as a proxy that does not allow the destination."""

    def __init__(self, refuse: bool = False, echo: bool = False) -> None:
        self.refuse = refuse
        self.echo = echo  # refuse, quoting the request: 400 with its head, or a 403 CONNECT
        self.seen: list[str] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.closing = threading.Event()
        self.threads: list[threading.Thread] = []
        self.thread = threading.Thread(target=self._accept, name="proxy", daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self.closing.is_set():
            if not select.select([self.listener], [], [], 0.05)[0]:
                continue
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(client,), name="proxy-conn",
                                 daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, client: socket.socket) -> None:
        with client:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = client.recv(65536)
                if not chunk:
                    return
                head += chunk
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            self.seen.append(line)
            method, target, _ = line.split(" ", 2)
            if self.refuse:
                client.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                return
            if self.echo and method == "CONNECT":
                auth = [h for h in head.split(b"\r\n") if h.lower().startswith(b"proxy-auth")]
                client.sendall(b"HTTP/1.1 403 Forbidden " + b"".join(auth)
                               + b"\r\nContent-Length: 0\r\n\r\n")
                return
            if self.echo:
                client.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d\r\n\r\n%s"
                               % (len(head), head))
                return
            if method == "CONNECT":
                host, port = target.rsplit(":", 1)
                upstream = socket.create_connection((host, int(port)))
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                rest = b""
            else:  # absolute URI: rewrite to origin form and pass the bytes on
                url = target.split("://", 1)[1]
                hostport, _, path = url.partition("/")
                host, _, port = hostport.partition(":")
                upstream = socket.create_connection((host, int(port or 80)))
                rest = head.replace(target.encode(), b"/" + path.encode(), 1)
            with upstream:
                if rest:
                    upstream.sendall(rest)
                self._pipe(client, upstream)

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        while not self.closing.is_set():
            ready = select.select([a, b], [], [], 0.05)[0]
            for sock in ready:
                data = sock.recv(65536)
                if not data:
                    return
                (b if sock is a else a).sendall(data)

    def close(self) -> None:
        self.closing.set()
        self.listener.close()
        self.thread.join(5)
        for t in self.threads:
            t.join(5)


class SilentTls:
    """Accepts TCP connections and never answers: a TLS handshake that never completes."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.held: list[socket.socket] = []
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self._accept, name="silent-tls", daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.closing.is_set():
            if select.select([self.listener], [], [], 0.05)[0]:
                with contextlib.suppress(OSError):
                    self.held.append(self.listener.accept()[0])

    def close(self) -> None:
        self.closing.set()
        self.thread.join(5)
        self.listener.close()
        for s in self.held:
            s.close()


class SmtpTarpit:
    """An SMTP server whose greeting never ends: a "220-" continuation line every `every`
    seconds, each well within a read timeout (after a TLS handshake with `context`)."""

    def __init__(self, context: Any = None, every: float = 0.05) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.context = context
        self.every = every
        self.greeted = threading.Event()  # a client has read at least one line
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="smtp-tarpit", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.closing.is_set():
            if not select.select([self.listener], [], [], 0.05)[0]:
                continue
            with contextlib.suppress(OSError), self.listener.accept()[0] as conn:
                sock = conn
                if self.context is not None:
                    sock = self.context.wrap_socket(conn, server_side=True)
                while not self.closing.is_set():
                    sock.sendall(b"220-still here\r\n")  # OSError once the client is gone
                    self.greeted.set()
                    self.closing.wait(self.every)

    def close(self) -> None:
        self.closing.set()
        self.thread.join(5)
        self.listener.close()


class ScriptedHttp:
    """Answers every request on a keep-alive connection with the next bytes of `answers`,
    as they are (header folding, 1xx, chunked bodies, header floods): what an HTTP library's
    own server classes would not write. Records each request's head, counts connections,
    and hangs up after the answers whose index is in `hang_up_after` (an upstream closing
    an idle keep-alive connection); `hung_up` is set each time it has."""

    def __init__(self, answers: list[bytes], hang_up_after: set[int] = frozenset()) -> None:
        self.answers = list(answers)
        self.hang_up_after = set(hang_up_after)
        self.heads: list[bytes] = []
        self.connections = 0
        self.closed_by_client = threading.Event()  # a connection the client closed
        self.hung_up = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, name="scripted-http", daemon=True)
        self.thread.start()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while self.answers:
                conn, _ = self.listener.accept()
                self.connections += 1
                with conn, conn.makefile("rb") as reader:
                    while self.answers:
                        head = b""
                        while not head.endswith(b"\r\n\r\n"):
                            line = reader.readline()
                            if not line:
                                break
                            head += line
                        if not head.endswith(b"\r\n\r\n"):
                            self.closed_by_client.set()
                            break  # the client closed this connection
                        length = 0
                        for line in head.split(b"\r\n"):
                            name, _, value = line.partition(b":")
                            if name.strip().lower() == b"content-length":
                                length = int(value)
                        reader.read(length)
                        self.heads.append(head)
                        conn.sendall(self.answers.pop(0))
                        if len(self.heads) - 1 in self.hang_up_after:
                            conn.shutdown(socket.SHUT_RDWR)
                            self.hung_up.set()
                            break

    def close(self) -> None:
        self.answers.clear()
        with contextlib.suppress(OSError):  # wake an accept() waiting for the next client
            socket.create_connection(("127.0.0.1", self.port), timeout=5).close()
        self.listener.close()
        self.thread.join(5)


class ScriptedSmtp:
    """A plain SMTP server saying what real MTAs say and aiosmtpd will not: a greeting other
    than 220 (`greeting`, after which it hangs up), 421 to a connection past `max_connections`
    open at once, and answers computed from a command (`answer(line)` returns the reply
    line, or None for the usual one). Accepted messages' bytes are in `messages`."""

    def __init__(self, greeting: str = "220 mx.test ESMTP", max_connections: int = 0,
                 answer: Callable[[str], str | None] = lambda line: None,
                 extensions: tuple[str, ...] = ("8BITMIME", "AUTH PLAIN LOGIN")) -> None:
        self.greeting, self.max_connections = greeting, max_connections
        self.answer, self.extensions = answer, extensions
        self.messages: list[bytes] = []
        self.refused = 0  # connections answered 421 for the limit
        self.open = 0
        self._lock = threading.Condition()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self._accept, name="scripted-smtp", daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.closing.is_set():
            if select.select([self.listener], [], [], 0.05)[0]:
                with contextlib.suppress(OSError):
                    conn = self.listener.accept()[0]
                    threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with self._lock:
            self.open += 1
            over = 0 < self.max_connections < self.open
            self.refused += over
        try:
            with conn, contextlib.suppress(OSError), conn.makefile("rb") as reader:
                if over:
                    conn.sendall(b"421 4.7.0 Too many concurrent SMTP connections\r\n")
                    return
                conn.sendall(self.greeting.encode() + b"\r\n")
                if not self.greeting.startswith("220"):
                    return
                self._converse(conn, reader)
        finally:
            with self._lock:
                self.open -= 1

    def _converse(self, conn: socket.socket, reader: Any) -> None:
        while line := reader.readline().decode("utf-8", "replace").rstrip("\r\n"):
            verb = line.split(" ", 1)[0].upper()
            said = self.answer(line)
            if said is None and verb == "EHLO":
                said = "\r\n".join(f"250-{x}" for x in ("mx.test", *self.extensions)) + "\r\n250 OK"
            elif said is None and verb == "DATA":
                conn.sendall(b"354 go ahead\r\n")
                data = b""
                while not data.endswith(b"\r\n.\r\n"):
                    chunk = reader.readline()
                    if not chunk:
                        return
                    data += chunk
                with self._lock:
                    self.messages.append(data[:-3])
                    self._lock.notify_all()
                said = "250 2.0.0 queued"
            elif said is None:
                said = {"QUIT": "221 bye", "AUTH": "235 2.7.0 ok"}.get(verb, "250 OK")
            conn.sendall(said.encode() + b"\r\n")
            if said.startswith(("221", "421")):
                return

    def close(self) -> None:
        self.closing.set()
        self.thread.join(5)
        self.listener.close()
