"""The narrow transport interface, typed verdicts, secret masking and the send deadlines.

Nothing here imports requests: an email-only daemon never loads it (the HTTP client the
HTTP transports share is http_client.py)."""

from __future__ import annotations

import base64
import contextlib
import functools
import http.client
import itertools
import json
import math
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar
from urllib.parse import parse_qsl, quote, quote_plus, unquote, urlsplit

from nomaflowd.alerts import Alert
from nomaflowd.crypto import Secret

MASK = "****"
# Shorter pieces of a secret are not masked on their own: "/v2" or "a" would mask half a
# detail. A whole secret value is masked from MIN_SECRET characters, a piece from MIN_PIECE.
MIN_SECRET = 4
MIN_PIECE = 8


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


@dataclass(frozen=True)
class Sent:
    """What a send returns when the upstream told it something later sends need: the chat
    thread this message started (Slack app mode), for the dispatcher to record."""

    detail: str
    thread: Mapping[str, str]


@dataclass(frozen=True)
class Rendered:
    """One message as it goes on the wire: where, with which headers, what body.

    render() and render_digest() make these (no I/O), send() delivers them, and `explain`
    prints them unchanged but for masked secrets.
    """

    url: str                                   # a secret for most transports: show() masks it
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)
    what: str = ""                             # a word for the audit detail ("trigger ...")

    def json(self) -> Any:
        return json.loads(self.body)

    def show(self, mask: Callable[[str], str]) -> list[str]:
        """The request as text, secrets masked: the first line, headers, then the body."""
        url = mask(self.url)
        if url != self.url and self.url.startswith(("http://", "https://")):
            url = f"{host_of(self.url)}/{MASK}"  # the host tells where; the path is the secret
        lines = [url if self.url.startswith("smtp") else f"POST {url}"]
        lines += [f"{k}: {mask(v)}" for k, v in self.headers.items()]
        text = self.body.decode("utf-8", "replace")
        with contextlib.suppress(ValueError):  # not JSON (a template, an email): as it is
            text = json.dumps(json.loads(text), ensure_ascii=False, indent=2)
        return lines + [""] + [mask(line) for line in text.splitlines()]


class Deadlines:
    """One thread that shuts down sockets whose whole-request deadline has passed.

    A socket timeout bounds each read, not the request: a server trickling a byte a
    second would hold a send forever. Shutting the socket down wakes the blocked read.

    The requests in flight are a dict, not a heap of every request ever watched: there are
    only as many as sending threads, and a heap kept each finished request until the thread
    woke to pop it (a push and a pop per POST). The thread sleeps until the earliest
    deadline it knew of, then looks again; a watch wakes it only to bring that time forward,
    so back-to-back POSTs wake it about once per timeout, not once each.
    """

    def __init__(self) -> None:
        self._live: dict[int, tuple[float, Callable[[], Any]]] = {}
        # A plain lock taken directly where the thread needs no waking (cheaper per POST
        # than the Condition's Python-level __enter__/__exit__), the Condition on it to wait.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._ids = itertools.count()
        self._wake = math.inf  # when the thread looks next (inf: when notified)
        self._thread: threading.Thread | None = None

    def watch(self, sock: Callable[[], Any], deadline: float) -> _Watch:
        """For a `with` block; `sock` returns the live socket (STARTTLS swaps it
        mid-conversation)."""
        with self._lock:
            ident = next(self._ids)
            self._live[ident] = (deadline, sock)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="nomaflowd-deadlines",
                                                daemon=True)
                self._thread.start()
            if deadline < self._wake:
                self._wake = deadline
                self._cond.notify()
        return _Watch(self, ident)

    def _done(self, ident: int) -> bool:
        """Forget a request; whether the deadline cut it short."""
        with self._lock:
            return self._live.pop(ident, None) is None  # the thread took it: it fired

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                for ident in [k for k, (d, _) in self._live.items() if d <= now]:
                    live = self._live.pop(ident)[1]()
                    for one in live if isinstance(live, list) else [live]:
                        if one is None:
                            continue
                        # The plain socket's shutdown, also for TLS: SSLSocket.shutdown()
                        # would tear down the SSL object under a reading thread. OSError:
                        # already closed by its owner, nothing left to interrupt.
                        with contextlib.suppress(OSError):
                            socket.socket.shutdown(one, socket.SHUT_RDWR)
                self._wake = min((d for d, _ in self._live.values()), default=math.inf)
                self._cond.wait(None if self._wake == math.inf else self._wake - now)


class _Watch:
    """One request registered with Deadlines, for a `with` block: `fired`, once it is left,
    says whether the deadline cut the request short. A class rather than a @contextmanager
    generator: ~10,000 instructions less per POST."""

    __slots__ = ("_deadlines", "_ident", "fired")

    def __init__(self, deadlines: Deadlines, ident: int) -> None:
        self._deadlines = deadlines
        self._ident = ident
        self.fired = False

    def __enter__(self) -> _Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.fired = self._deadlines._done(self._ident)


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
        if parts.password is not None:  # as Basic auth sends them (a proxy's, say)
            pieces.add(b64(f"{unquote(parts.username or '')}:{unquote(parts.password)}"))
        pieces.update(seg for seg in parts.path.split("/") if not (seg.isalpha() and seg.islower()))
        pieces.update(v for _, v in parse_qsl(parts.query, keep_blank_values=True))
    scheme, _, credential = value.partition(" ")
    if credential and scheme.isalpha():
        pieces.add(credential.strip())
    pieces |= {unquote(p) for p in pieces}
    pieces |= {quote(p, safe="/") for p in pieces} | {quote_plus(p) for p in pieces}
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


def b64(text: str) -> str:
    """`text` in base64, as Basic auth and SMTP AUTH send it."""
    return base64.b64encode(text.encode("utf-8", "surrogatepass")).decode()


def revealed(settings: Mapping[str, Any]) -> list[str]:
    """Every secret value in a transport's settings, also inside tables (header values)."""
    out = []
    for value in settings.values():
        if isinstance(value, Secret):
            out.append(value.reveal())
        elif isinstance(value, Mapping):
            out += revealed(value)
    return [v for v in out if v]


_Send = TypeVar("_Send", bound=Callable[..., "str | Sent"])


def _masked(send: _Send) -> _Send:
    """A send whose detail and exception messages have the transport's secrets masked.

    This is the one place every detail passes on its way to the audit row, the log and
    the CLI, so a transport cannot forget it (an upstream that echoes the request in its
    error answer, an exception message that quotes a header value).
    """
    @functools.wraps(send)
    def wrapper(self: Transport, *args: Any, **kwargs: Any) -> str | Sent:
        try:
            out = send(self, *args, **kwargs)
            if isinstance(out, Sent):
                return Sent(self.mask(out.detail), out.thread)
            return self.mask(out)
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
    # Replies in a chat thread per failure episode (Slack app mode): the dispatcher looks
    # the thread up before sending (threads.attach) and records the ones a send started.
    threads: ClassVar[bool] = False

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

    def secrets(self) -> list[str]:
        """What mask() hides: every secret value of the settings, and the forms a library
        sends one in that secret_pieces() cannot derive (SMTP AUTH, say)."""
        return revealed(self.settings)

    def mask(self, text: str) -> str:
        """`text` with every secret of this transport (and its telling pieces) as ****."""
        if self._masker is None:
            self._masker = Masker(self.secrets())
        return self._masker(text)

    def mask_data(self, data: bytes) -> bytes:
        if self._masker is None:
            self._masker = Masker(self.secrets())
        return self._masker.data(data)

    def destination(self) -> str:
        """Where it sends, safe to print (host only)."""
        raise NotImplementedError

    def render(self, alert: Alert, recipient: str) -> Rendered:
        raise NotImplementedError

    def render_digest(self, alerts: list[Alert], recipient: str, digest_id: str
                      ) -> list[Rendered]:
        """The message(s) of one digest; they name every alert in it."""
        raise NotImplementedError

    def send(self, alert: Alert, recipient: str) -> str | Sent:
        """Deliver once; return a short detail (or a Sent carrying it), or raise
        TransportError / DeliveryError."""
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
    value = headers.get("Retry-After")
    try:  # a number of seconds, or "?": never the raw text, which an upstream could fill
        shown = f"{float(str(value).strip()):g}"
    except (TypeError, ValueError):
        shown = "?"
    return f" (Retry-After {shown}s)"
