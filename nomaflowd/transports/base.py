"""The narrow transport interface, typed verdicts, and the HTTP client HTTP transports share."""

from __future__ import annotations

import functools
import heapq
import http.client
import itertools
import re
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar, TypeVar
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from nomaflowd.alerts import Alert
from nomaflowd.crypto import Secret

MAX_RESPONSE = 64 * 1024
IDLE_CHECK = 0.5  # seconds a keep-alive connection may sit before it is checked for EOF
USER_AGENT = "nomaflowd"
MASK = "****"
# Shorter pieces of a secret are not masked on their own: "/v2" or "a" would mask half a
# detail. A whole secret value is masked from MIN_SECRET characters, a piece from MIN_PIECE.
MIN_SECRET = 4
MIN_PIECE = 8
# What http.client refuses in a header value (it raises with the whole value in the message).
BAD_HEADER_VALUE = re.compile(r"[\r\n\0]")


class TransportError(Exception):
    """No verdict from the upstream: DNS, refused, TLS, timeout, authentication, no transport."""


class DeliveryError(Exception):
    """The upstream answered and refused."""


class RateLimited(DeliveryError):
    """HTTP 429: the upstream wants us to wait `retry_after` seconds."""

    def __init__(self, detail: str, retry_after: float) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


def parse_retry_after(headers: Any, default: float = 30.0) -> float:
    """Retry-After in seconds (delta-seconds form; an HTTP date or nonsense -> default)."""
    value = headers.get("Retry-After") if headers is not None else None
    try:
        seconds = float(str(value).strip())
    except (TypeError, ValueError):
        return default
    return min(max(seconds, 0.0), 3600.0)


class Deadlines:
    """One thread that shuts down sockets whose whole-request deadline has passed.

    A socket timeout bounds each read, not the request: a server trickling a byte a
    second would hold a send forever. Shutting the socket down wakes the blocked read.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], Any]]] = []
        self._live: dict[int, bool] = {}
        self._cond = threading.Condition()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None

    @contextmanager
    def watch(self, sock: Callable[[], Any], deadline: float) -> Iterator[dict[int, bool]]:
        """`sock` returns the live socket (STARTTLS swaps it mid-conversation)."""
        with self._cond:
            ident = next(self._ids)
            self._live[ident] = False
            heapq.heappush(self._heap, (deadline, ident, sock))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="nomaflowd-deadlines",
                                                daemon=True)
                self._thread.start()
            if self._heap[0][1] == ident:  # only an earlier deadline needs the thread awake
                self._cond.notify()
        state = {0: False}
        try:
            yield state
        finally:
            with self._cond:
                state[0] = self._live.pop(ident, False)

    def _run(self) -> None:
        with self._cond:
            while True:
                while self._heap and self._heap[0][1] not in self._live:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                deadline, ident, sock = self._heap[0]
                delay = deadline - time.monotonic()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                heapq.heappop(self._heap)
                self._live[ident] = True
                try:
                    live = sock()
                    if live is not None:
                        # The plain socket's shutdown, also for TLS: SSLSocket.shutdown()
                        # would tear down the SSL object under a reading thread.
                        socket.socket.shutdown(live, socket.SHUT_RDWR)
                except OSError:
                    pass  # already closed by its owner: nothing left to interrupt


DEADLINES = Deadlines()


def secret_pieces(value: str) -> set[str]:
    """A secret and the parts of it an upstream might echo on their own.

    A URL's path, query, query values, password and long path segments (a Slack webhook's
    token is its last segment), each also percent-encoded and decoded; the credential of
    an `Authorization: Bearer X` value.
    """
    pieces = {value}
    parts = urlsplit(value) if "://" in value else None
    if parts is not None and parts.netloc:
        pieces.update((parts.path, parts.query, f"{parts.path}?{parts.query}",
                       parts.password or "", parts.username or ""))
        pieces.update(seg for seg in parts.path.split("/") if not (seg.isalpha() and seg.islower()))
        pieces.update(v for _, v in parse_qsl(parts.query, keep_blank_values=True))
    scheme, _, credential = value.partition(" ")
    if credential and scheme.isalpha():
        pieces.add(credential.strip())
    pieces |= {unquote(p) for p in pieces} | {quote(p, safe="/") for p in pieces}
    return {p for p in pieces if len(p) >= (MIN_SECRET if p == value else MIN_PIECE)}


class Masker:
    """Replaces every secret piece in a text (or bytes) with ****, longest piece first."""

    def __init__(self, values: list[str]) -> None:
        pieces = sorted({p for v in values for p in secret_pieces(v)}, key=len, reverse=True)
        self.text = re.compile("|".join(map(re.escape, pieces))) if pieces else None
        self.bytes = (re.compile(b"|".join(re.escape(p.encode("utf-8", "surrogatepass"))
                                           for p in pieces)) if pieces else None)

    def __call__(self, text: str) -> str:
        return self.text.sub(MASK, text) if self.text is not None else text

    def data(self, data: bytes) -> bytes:
        return self.bytes.sub(MASK.encode(), data) if self.bytes is not None else data


def revealed(settings: Mapping[str, Any]) -> list[str]:
    """Every secret value in a transport's settings, also inside tables (header values)."""
    out = []
    for value in settings.values():
        if isinstance(value, Secret):
            out.append(value.reveal())
        elif isinstance(value, Mapping):
            out += revealed(value)
    return [v for v in out if v]


_Send = TypeVar("_Send", bound=Callable[..., str])


def _masked(send: _Send) -> _Send:
    """A send whose detail and exception messages have the transport's secrets masked.

    This is the one place every detail passes on its way to the audit row, the log and
    the CLI, so a transport cannot forget it (an upstream that echoes the request in its
    error answer, an exception message that quotes a header value).
    """
    @functools.wraps(send)
    def wrapper(self: Transport, *args: Any, **kwargs: Any) -> str:
        try:
            return self.mask(send(self, *args, **kwargs))
        except Exception as exc:
            if exc.args and isinstance(exc.args[0], str):
                exc.args = (self.mask(exc.args[0]), *exc.args[1:])
            raise

    return wrapper  # type: ignore[return-value]


class Transport:
    """One configured transport. render() is pure; send() is the only I/O."""

    type: ClassVar[str]
    supports_digest: ClassVar[bool] = True
    # Sends one at a time, in order: for incident APIs, where a resolve must not overtake
    # the trigger it closes.
    ordered: ClassVar[bool] = False

    def __init__(self, name: str, settings: Mapping[str, Any], *, timeout: float) -> None:
        self.name = name
        self.settings = settings
        self.timeout = timeout
        self._masker: Masker | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in ("send", "send_digest"):
            if name in cls.__dict__:
                setattr(cls, name, _masked(cls.__dict__[name]))

    def mask(self, text: str) -> str:
        """`text` with every secret of this transport (and its telling pieces) as ****."""
        if self._masker is None:
            self._masker = Masker(revealed(self.settings))
        return self._masker(text)

    def mask_data(self, data: bytes) -> bytes:
        if self._masker is None:
            self._masker = Masker(revealed(self.settings))
        return self._masker.data(data)

    def destination(self) -> str:
        """Where it sends, safe to print (host only)."""
        raise NotImplementedError

    def render(self, alert: Alert, recipient: str) -> Any:
        raise NotImplementedError

    def send(self, alert: Alert, recipient: str) -> str:
        """Deliver once; return a short detail, or raise TransportError / DeliveryError."""
        raise NotImplementedError

    def send_digest(self, alerts: list[Alert], recipient: str, digest_id: str) -> str:
        """Deliver several alerts as one message (pacing); same verdicts as send()."""
        raise NotImplementedError

    def close(self) -> None:
        """Drop pooled connections."""

    def __str__(self) -> str:
        return f"{self.name} ({self.type}) -> {self.destination()}"


def host_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or '?'}" + (f":{parts.port}" if parts.port else "")


def describe_exception(exc: BaseException) -> str:
    if isinstance(exc, socket.timeout | TimeoutError):
        return "timed out"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or type(exc).__name__}"
    if isinstance(exc, socket.gaierror):
        return f"DNS lookup failed: {exc.strerror}"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, http.client.InvalidURL):  # its message quotes the URL
        return "the URL is not valid (a space or control character)"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"
    return type(exc).__name__


def retry_after(status: int, headers: Any) -> str:
    """A 429's Retry-After, for the audit row (the next alert may learn from it)."""
    if status != 429 or headers is None:
        return ""
    return f" (Retry-After {str(headers.get('Retry-After', '?'))[:40]}s)"


class HttpTransport(Transport):
    """POSTs over http.client with one keep-alive connection per worker thread.

    http.client rather than requests: the whole-request deadline needs the socket, and
    the per-request cost is a third (see bench/). Redirects are never followed.
    """

    def __init__(self, name: str, settings: Mapping[str, Any], *, timeout: float) -> None:
        super().__init__(name, settings, timeout=timeout)
        self._local = threading.local()
        self._ssl = ssl.create_default_context()
        # Every thread's connection, so that close() (another thread) can close them all.
        self._conns: set[http.client.HTTPConnection] = set()
        self._conns_lock = threading.Lock()

    def _connection(self, scheme: str, host: str, port: int | None) -> http.client.HTTPConnection:
        key = (scheme, host, port)
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is not None and self._local.key == key and conn.sock is not None:
            # A pooled socket the server closed while idle reads as ready (EOF): drop it
            # instead of sending into it, so keep-alive never costs a failed attempt.
            # Servers close idle connections after seconds, so a socket used a moment ago
            # skips the check (a syscall per request in a burst).
            idle = time.monotonic() - self._local.used
            if idle > IDLE_CHECK and select.select([conn.sock], [], [], 0)[0]:
                conn.close()
            return conn
        if conn is not None:
            conn.close()
            with self._conns_lock:
                self._conns.discard(conn)
        if scheme == "https":
            conn = http.client.HTTPSConnection(host, port, timeout=self.timeout, context=self._ssl)
        elif scheme == "http":
            conn = http.client.HTTPConnection(host, port, timeout=self.timeout)
        else:
            raise TransportError(f"unsupported URL scheme {scheme!r}")
        self._local.conn, self._local.key, self._local.used = conn, key, 0.0
        with self._conns_lock:
            self._conns.add(conn)
        return conn

    def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> tuple[int, bytes, Any]:
        """One POST bounded by the timeout as a whole; returns (status, first bytes, headers)."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:  # its message quotes the URL's text
            raise TransportError("the URL is not valid (host or port)") from None
        if not parts.hostname:
            raise TransportError("the URL has no host")
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn = self._connection(parts.scheme, parts.hostname, port)
        deadline = time.monotonic() + self.timeout
        all_headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT,
                       "Connection": "keep-alive", **headers}
        for name, value in all_headers.items():
            # http.client would raise ValueError quoting the whole value (a credential).
            if BAD_HEADER_VALUE.search(value):
                raise TransportError(f"header {name} has an invalid character (CR/LF)")
        try:
            if conn.sock is None:
                conn.connect()
            assert conn.sock is not None
            with DEADLINES.watch(lambda: conn.sock, deadline) as fired:
                try:
                    conn.request("POST", path, body=body, headers=all_headers)
                    resp = conn.getresponse()
                    data = resp.read(MAX_RESPONSE)
                    if not resp.isclosed() or resp.will_close:
                        conn.close()  # unread rest (huge answers) or server wants it closed
                except (OSError, http.client.HTTPException):
                    conn.close()
                    raise
            self._local.used = time.monotonic()
            if fired[0]:
                # Cut off mid-answer (a trickling server): no complete verdict within the bound.
                conn.close()
                raise TransportError(f"timed out after {self.timeout:g}s")
        except ValueError as exc:
            # http.client's refusals (a header value it cannot encode) quote the offending
            # value: the type is all that is safe to say.
            conn.close()
            raise TransportError(f"request refused before sending: {type(exc).__name__}"
                                 ) from None
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            if time.monotonic() >= deadline:
                raise TransportError(f"timed out after {self.timeout:g}s") from None
            raise TransportError(describe_exception(exc)) from None
        return resp.status, data, resp.headers

    def check_response(self, status: int, data: bytes, headers: Any) -> str:
        """2xx -> detail; anything else raises DeliveryError via describe_refusal()."""
        if 200 <= status < 300:
            return f"HTTP {status}"
        raise self.refusal(status, data, headers)

    def refusal(self, status: int, data: bytes, headers: Any) -> DeliveryError:
        """The exception for a refusal: RateLimited for a 429, DeliveryError otherwise.

        The answer is masked before describe_refusal() cuts it short: a cut must not leave
        the first half of a secret that the upstream echoed.
        """
        detail = self.mask(self.describe_refusal(status, self.mask_data(data), headers))
        if status == 429:
            return RateLimited(detail, parse_retry_after(headers))
        return DeliveryError(detail)

    def describe_refusal(self, status: int, data: bytes, headers: Any) -> str:
        snippet = data[:200].decode("utf-8", "replace").replace("\n", " ").strip()
        detail = f"HTTP {status}" + (f": {snippet}" if snippet else "")
        return detail + retry_after(status, headers)

    def close(self) -> None:
        """Close every thread's pooled connection (call it once no send is running)."""
        with self._conns_lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            conn.close()
