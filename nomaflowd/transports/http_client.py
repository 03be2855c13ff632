"""The HTTP client the HTTP transports share: requests and urllib3 with one attempt, a
whole-request deadline, no redirects, and a bounded answer."""

from __future__ import annotations

import contextlib
import http.client
import itertools
import os
import re
import socket
import ssl
import sys
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

# requests imports a character-set detector (charset_normalizer or chardet) for
# Response.text. This client reads the bytes of an answer itself (post()) and never asks
# for text, and the detector was 2.6 MB of an idle daemon's RSS (bench h, one webhook).
# So it is hidden from requests' import, which then warns that it found none. Not when
# requests is already in the process: it has chosen its detector.
_HIDDEN = () if "requests" in sys.modules else tuple(
    name for name in ("charset_normalizer", "chardet") if name not in sys.modules)
for _name in _HIDDEN:
    sys.modules[_name] = None  # type: ignore[assignment]  # import charset_normalizer: ImportError
try:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Unable to find acceptable character detection")
        import requests
finally:
    for _name in _HIDDEN:
        del sys.modules[_name]

import requests.adapters  # noqa: E402
import urllib3  # noqa: E402
import urllib3.connection  # noqa: E402
import urllib3.exceptions  # noqa: E402
import urllib3.util  # noqa: E402
import urllib3.util.connection  # noqa: E402

from nomaflowd.alerts import Alert  # noqa: E402
from nomaflowd.crypto import Secret  # noqa: E402
from nomaflowd.resolve import LookupTimeout, open_socket  # noqa: E402
from nomaflowd.transports.base import (  # noqa: E402
    DEADLINES,
    DeliveryError,
    RateLimited,
    Rendered,
    Sent,
    Transport,
    TransportError,
    b64,
    host_of,
    parse_retry_after,
    retry_after,
)

MAX_RESPONSE = 64 * 1024
USER_AGENT = "nomaflowd"
# What http.client refuses in a header value (it raises with the whole value in the message).
BAD_HEADER_VALUE = re.compile(r"[\r\n\0]")


# The sockets of the request in progress on this thread, registered by the connection
# classes below as soon as they exist (before TCP connect returns, before the TLS handshake,
# when a pooled connection is reused), so the deadline thread can cut any phase short.
_IN_FLIGHT = threading.local()


def _register(sock: Any) -> None:
    socks = getattr(_IN_FLIGHT, "socks", None)
    if socks is not None and sock is not None:
        socks.append(sock)


_MAXLINE = 65536     # http.client's own limits (_MAXLINE, _MAXHEADERS)
_MAXHEADERS = 100


def _read_head(fp: Any) -> http.client.HTTPMessage:
    """An answer's header lines as http.client.parse_headers() gives them, without the email
    package's parser: 4 us for a five-header answer against its 49, and the CPU of one
    webhook POST fell from 459-540 to 407-423 us (medians, back to back, on a machine where
    bench d ran about 1,000 deliveries/s). The same limits (line length, header count); an
    obsolete folded line is joined to the header before it, and a line with no colon is
    skipped (email's parser ended the headers there, so a Content-Length after it was lost
    and the read waited for the deadline)."""
    pairs: list[list[str]] = []
    for count in itertools.count(1):
        line = fp.readline(_MAXLINE + 1)
        if len(line) > _MAXLINE:
            raise http.client.LineTooLong("header line")
        if count > _MAXHEADERS:
            raise http.client.HTTPException(f"got more than {_MAXHEADERS} headers")
        if line in (b"\r\n", b"\n", b""):
            break
        text = line.decode("iso-8859-1").rstrip("\r\n")
        if text[:1] in (" ", "\t"):
            if pairs:
                pairs[-1][1] += " " + text.strip()
            continue
        name, colon, value = text.partition(":")
        if colon and name and name == name.rstrip():
            pairs.append([name, value.strip()])
    msg = http.client.HTTPMessage()
    for name, value in pairs:
        msg[name] = value
    return msg


class _Response(http.client.HTTPResponse):
    def begin(self) -> None:
        """http.client.HTTPResponse.begin() of Python 3.11, header parsing aside (_read_head)."""
        if self.headers is not None:
            return
        while True:  # 1xx interim answers (100 Continue) are read past
            version, status, reason = self._read_status()
            if status != http.client.CONTINUE:
                break
            _read_head(self.fp)
        self.code = self.status = status
        self.reason = reason.strip()
        if version in ("HTTP/1.0", "HTTP/0.9"):
            self.version = 10
        elif version.startswith("HTTP/1."):
            self.version = 11
        else:
            raise http.client.UnknownProtocol(version)
        self.headers = self.msg = _read_head(self.fp)
        encoding = self.headers.get("transfer-encoding")
        self.chunked = bool(encoding and encoding.lower() == "chunked")
        if self.chunked:
            self.chunk_left = None
        self.will_close = self._check_close()
        self.length = None
        length = self.headers.get("content-length")
        if length and not self.chunked:
            try:
                self.length = int(length)
            except ValueError:
                self.length = None
            else:
                if self.length < 0:
                    self.length = None
        if (status in (http.client.NO_CONTENT, http.client.NOT_MODIFIED)
                or 100 <= status < 200 or self._method == "HEAD"):
            self.length = 0
        if not self.will_close and not self.chunked and self.length is None:
            self.will_close = True


class _Connection(urllib3.connection.HTTPConnection):
    response_class = _Response
    # While set, send() collects what urllib3's request() writes (the head) instead of
    # writing it: see request().
    _head: list[bytes] | None = None

    def _new_conn(self) -> socket.socket:
        """urllib3's _new_conn() with the name lookup bounded by the timeout as well
        (resolve.lookup) and the socket registered before its connect."""
        host = self._dns_host.strip("[]")
        try:
            host.encode("idna")
        except UnicodeError:
            raise urllib3.exceptions.LocationParseError(
                f"'{host}', label empty or too long") from None
        timeout = self.timeout if isinstance(self.timeout, int | float) else None
        try:
            sock = open_socket(host, self.port, timeout, source_address=self.source_address,
                               options=self.socket_options or (),
                               family=urllib3.util.connection.allowed_gai_family(),
                               on_socket=_register)
        except LookupTimeout:
            raise
        except socket.gaierror as exc:
            raise urllib3.exceptions.NameResolutionError(self.host, self, exc) from exc
        except TimeoutError as exc:
            raise urllib3.exceptions.ConnectTimeoutError(
                self, f"Connection to {self.host} timed out") from exc
        except OSError as exc:
            raise urllib3.exceptions.NewConnectionError(
                self, f"Failed to establish a new connection: {exc}") from exc
        return sock

    def request(self, method: str, url: str, body: Any = None,  # type: ignore[override]
                headers: Mapping[str, str] | None = None, **kwargs: Any) -> None:
        """Head and body leave in one send. urllib3 writes them with two, and with
        TCP_NODELAY each wakes the receiver on its own (a third of a POST's cost against a
        local receiver); TCP_CORK around them cost two setsockopt calls per POST (~6 us).
        With a bytes body and our Content-Length, urllib3 writes the same head for no body."""
        _register(self.sock)  # a reused keep-alive connection
        if not isinstance(body, bytes) or headers is None or "Content-Length" not in headers:
            super().request(method, url, body=body, headers=headers, **kwargs)
            return
        self._head = head = []
        try:
            super().request(method, url, body=None, headers=headers, **kwargs)
        finally:
            self._head = None
        head.append(body)
        super().send(b"".join(head))

    def send(self, data: Any) -> None:
        if self._head is not None:
            self._head.append(data)
        else:
            super().send(data)

    # The head of the last POST (its URL and headers, Content-Length aside) and its bytes up
    # to the Content-Length value.
    _last_head: tuple[tuple[str, list[tuple[str, str]]], bytes] | None = None

    def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> _Response:
        """POST on this connection (HttpTransport._exchange): the answer, headers read.

        The head is the one http.client writes (Host, Accept-Encoding, the headers checked
        as it checks them), made by _Head once and kept while the URL and headers stay the
        same, its Content-Length filled in per body. Writing the head through request() and
        reading the answer's through getresponse() cost 96 us of CPU a POST, this way 62
        (the whole POST: 139 -> 99 us); with a 5 ms sleep before each, as paced events come,
        161 -> 99 (medians of 5 x 600 POSTs to bench/receiver.py, one thread)."""
        _register(self.sock)
        fixed = (url, [(k, v) for k, v in headers.items() if k != "Content-Length"])
        last = self._last_head
        if last is None or last[0] != fixed:
            last = self._last_head = (fixed, _Head(self).render(url, fixed[1]))
        # The upstream may have answered and closed: its answer is still readable.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.sock.sendall(b"".join((last[1], b"%d\r\n\r\n" % len(body), body)))
        resp = _Response(self.sock, method="POST")
        try:
            resp.begin()
        except BaseException:
            resp.close()
            raise
        return resp


class _Head(http.client.HTTPConnection):
    """Renders the head http.client would send for a connection, and sends nothing."""

    def __init__(self, conn: urllib3.connection.HTTPConnection) -> None:
        super().__init__(conn.host, conn.port)
        self.default_port = conn.default_port
        self._parts: list[bytes] = []

    def send(self, data: Any) -> None:
        self._parts.append(data)

    def render(self, url: str, headers: list[tuple[str, str]]) -> bytes:
        """Everything up to the value of Content-Length (the last header)."""
        self.putrequest("POST", url)
        for name, value in headers:
            self.putheader(name, value)
        self.putheader("Content-Length", "0")
        self.endheaders()
        head = b"".join(self._parts)
        assert head.endswith(b"Content-Length: 0\r\n\r\n")
        return head[:-len(b"0\r\n\r\n")]


class _TlsConnection(_Connection, urllib3.connection.HTTPSConnection):
    """The same registration; HTTPSConnection's connect() (TLS included) comes next in line."""


class _Pool(urllib3.HTTPConnectionPool):
    ConnectionCls = _Connection


class _TlsPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _TlsConnection


def _watched(manager: Any) -> Any:
    manager.pool_classes_by_scheme = {"http": _Pool, "https": _TlsPool}
    manager.key_fn_by_scheme = dict(manager.key_fn_by_scheme)
    return manager


class _Adapter(requests.adapters.HTTPAdapter):
    """requests' adapter on connections whose sockets the deadline thread can shut down."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        _watched(self.poolmanager)

    def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
        new = proxy not in self.proxy_manager
        manager = super().proxy_manager_for(proxy, **kwargs)
        return _watched(manager) if new else manager


def describe_request_error(exc: BaseException, mask: Callable[[str], str] = str) -> str:
    """One safe line for a failed request (the libraries' messages quote URLs and internals);
    `mask` is applied before any part of a message is kept (a cut secret is not masked)."""
    if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
        exc = exc.reason  # what went wrong on the one attempt
    text = mask(str(exc))
    if isinstance(exc, urllib3.exceptions.ProxyError):
        reason = "refused the connection" if "refused" in text.lower() else "failed"
        if "407" in text:
            reason = "asked for authentication (407)"
        elif "Tunnel connection failed: " in text:
            answer = text.split("Tunnel connection failed: ")[-1][:60].strip(" ')\"")
            reason = f"refused to tunnel ({answer})"
        return f"proxy {reason}"
    if isinstance(exc, urllib3.exceptions.SSLError | ssl.SSLError):
        if "CERTIFICATE_VERIFY_FAILED" in text:
            return "TLS error: certificate verify failed (set ca_file for a private CA)"
        return "TLS error"
    # Before the timeout test: urllib3's NewConnectionError is a ConnectTimeoutError.
    if isinstance(exc, urllib3.exceptions.NameResolutionError) \
            or "Name or service not known" in text or "NameResolutionError" in text \
            or "Temporary failure in name resolution" in text:
        return "DNS lookup failed"
    if "Connection refused" in text or isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, urllib3.exceptions.NewConnectionError):
        return "connection failed"
    if isinstance(exc, urllib3.exceptions.TimeoutError | TimeoutError):
        return "timed out"
    # requests itself only prepares the URL for a pool (HttpTransport._route).
    if isinstance(exc, requests.RequestException | urllib3.exceptions.LocationValueError):
        return "the URL is not valid"
    if isinstance(exc, urllib3.exceptions.HTTPError | OSError):
        return "connection failed (reset or closed)"
    if isinstance(exc, http.client.IncompleteRead):
        return "the answer was cut short (connection closed)"
    if isinstance(exc, http.client.HTTPException):  # read by http.client (_exchange)
        return f"not a valid HTTP answer ({type(exc).__name__})"
    return type(exc).__name__


def host_trust(paths: ssl.DefaultVerifyPaths | None = None) -> str:
    """The CA bundle HTTPS verifies against without `ca_file`: the host's ($SSL_CERT_FILE,
    else OpenSSL's default file: /etc/ssl/certs/ca-certificates.crt on Debian), which curl
    and SMTP's STARTTLS trust, a corporate CA installed there included; certifi's copy of
    the public CAs, which requests ships with, where the host has none (a minimal image)."""
    paths = paths or ssl.get_default_verify_paths()
    if paths.cafile and Path(paths.cafile).is_file():
        return paths.cafile
    import certifi  # requests' own dependency

    return str(certifi.where())


# URLs a transport keeps its look-ups for (Basic auth, proxies, connection routes). One or
# two for most; Opsgenie closes at a URL that names the job, and these grew by a URL (about
# 1.2 KB) per job until a reload.
URL_CACHE = 64


def bounded(cache: dict[str, Any]) -> None:
    """Room for one more URL's look-up: past URL_CACHE, all are forgotten (each is cheap to
    make again), not grown for months."""
    if len(cache) >= URL_CACHE:
        cache.clear()


def _check_url(url: str) -> None:
    """Raise TransportError for a URL the HTTP libraries would mangle or quote in an error."""
    if " " in url or not url.isprintable():
        # requests would quietly percent-encode it and send somewhere else.
        raise TransportError("the URL is not valid (a space or control character)")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (a bad port raises ValueError, quoting the URL)
    except ValueError:
        raise TransportError("the URL is not valid (host or port)") from None
    if parts.scheme not in ("http", "https"):
        raise TransportError(f"unsupported URL scheme {parts.scheme!r}")
    if not parts.hostname:
        raise TransportError("the URL has no host")


# One attempt: no retry of a connect or a read (requests' own default for its adapters).
ONE_ATTEMPT = urllib3.util.Retry(0, read=False)


class HttpTransport(Transport):
    """POSTs with requests: one pooled Session per sending thread, the whole request bounded.

    requests' timeout bounds each socket operation, not the request: a server that trickles
    a byte a second (or stalls a TLS handshake) would hold a send for ever. So the sockets
    of each request are registered with one deadline thread that shuts them down when
    send_timeout_seconds has passed (hand-written because no requests option does this; the
    hostile-upstream tests measure it). Redirects are never followed; at most MAX_RESPONSE
    bytes of an answer are read. Proxies: the transport's `proxy`, else $HTTPS_PROXY /
    $HTTP_PROXY / $NO_PROXY; `ca_file` trusts a private CA.
    """

    def __init__(self, name: str, settings: Mapping[str, Any], *, timeout: float) -> None:
        super().__init__(name, settings, timeout=timeout)
        self._local = threading.local()
        # Every thread's session, so that close() (another thread) can close them all.
        self._sessions: set[requests.Session] = set()
        self._conns: set[Any] = set()  # every thread's direct connections (_exchange)
        self._lock = threading.Lock()
        self._proxies: dict[str, dict[str, str]] = {}
        self._auths: dict[str, dict[str, str]] = {}
        ca_file = settings.get("ca_file")
        self._verify: str = str(ca_file) if ca_file else host_trust()

    def secrets(self) -> list[str]:
        """Also a proxy with credentials from the environment ($HTTPS_PROXY and co.):
        requests sends them as Proxy-Authorization, which a proxy may quote back."""
        return super().secrets() + [
            value for key, value in os.environ.items()
            if key.lower() in ("http_proxy", "https_proxy", "all_proxy") and "@" in value]

    def url_auth(self, url: str) -> dict[str, str]:
        """Credentials in the URL (`https://user:password@host/…`) as the Basic auth header
        curl and requests send for them; {} for a URL without."""
        auth = self._auths.get(url)
        if auth is None:
            parts = urlsplit(url)
            bounded(self._auths)
            auth = self._auths[url] = {} if parts.username is None else {
                "Authorization": "Basic " + b64(f"{unquote(parts.username)}:"
                                                f"{unquote(parts.password or '')}")}
        return auth

    def proxy_for(self, url: str) -> str | None:
        """The proxy URL a request to `url` goes through (credentials included), or None."""
        return self.proxies(url).get(urlsplit(url).scheme)

    def proxies(self, url: str) -> dict[str, str]:
        cached = self._proxies.get(url)
        if cached is None:
            own = self.settings.get("proxy")
            if own is not None:
                value = own.reveal() if isinstance(own, Secret) else str(own)
                cached = {"http": value, "https": value}
            else:  # read once: requests would parse the environment on every request
                cached = dict(requests.utils.get_environ_proxies(url))
            bounded(self._proxies)
            self._proxies[url] = cached
        return cached

    def endpoint(self) -> str:
        """The URL it posts to (a secret: never print it)."""
        raise NotImplementedError

    def destination(self) -> str:
        """Scheme and host, and the proxy's host when one is used: never a path or password."""
        url = self.endpoint()
        proxy = self.proxy_host(url)
        return host_of(url) + (f" via proxy {proxy}" if proxy else "")

    def proxy_host(self, url: str) -> str | None:
        """The proxy as safe to print: host and port only."""
        proxy = self.proxy_for(url)
        return host_of(proxy) if proxy else None

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            # Only its adapter is used (see _route): proxies are resolved once, in proxies(),
            # and the User-Agent goes with each request.
            session = requests.Session()
            adapter = _Adapter(pool_connections=16, pool_maxsize=4, max_retries=0)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            self._local.session = session
            with self._lock:
                self._sessions.add(session)
        return session

    def _route(self, url: str) -> tuple[Any, str]:
        """(connection pool, URL as that pool wants it) for `url` on this thread's session.

        Asked of requests' adapter once per URL, which picks the pool (direct, or through
        the proxy, with the TLS settings); each POST then goes to that pool. Going through
        adapter.send() and building a requests Response every time cost 40 % more per POST
        (cProfile, 3,000 POSTs to bench/receiver.py) for nothing this client uses: no
        cookies, no hooks, no redirects.
        """
        routes: dict[str, tuple[Any, str]] = self._local.__dict__.setdefault("routes", {})
        route = routes.get(url)
        if route is None or route[0].pool is None:  # new, or closed by the manager's LRU
            _check_url(url)
            adapter = self._session().get_adapter(url)
            assert isinstance(adapter, requests.adapters.HTTPAdapter)
            prepared = requests.PreparedRequest()
            prepared.prepare(method="POST", url=url)
            proxies = self.proxies(url)
            pool = adapter.get_connection_with_tls_context(prepared, self._verify,
                                                           proxies=proxies)
            adapter.cert_verify(pool, url, self._verify, None)
            bounded(routes)
            route = routes[url] = (pool, adapter.request_url(prepared, proxies))
        return route

    def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> tuple[int, bytes, Any]:
        """One POST bounded by the timeout as a whole; returns (status, first bytes, headers)."""
        all_headers = {"User-Agent": USER_AGENT, "Content-Type": "application/json",
                       **self.url_auth(url), **headers, "Content-Length": str(len(body))}
        for name, value in all_headers.items():
            # The HTTP library would raise quoting the whole value (a credential).
            if BAD_HEADER_VALUE.search(value):
                raise TransportError(f"header {name} has an invalid character (CR/LF)")
        deadline = time.monotonic() + self.timeout
        socks: list[Any] = []
        _IN_FLIGHT.socks = socks
        resp = conn = pool = None
        try:
            with DEADLINES.watch(lambda: socks, deadline) as watch:
                try:
                    left = max(0.001, deadline - time.monotonic())
                    pool, target = self._route(url)
                    if pool.proxy is None:
                        conn, resp = self._exchange(pool, target, body, all_headers, left)
                    else:
                        resp = pool.urlopen(
                            "POST", target, body=body, headers=all_headers, redirect=False,
                            assert_same_host=False, preload_content=False,
                            decode_content=False, retries=ONE_ATTEMPT, timeout=left)
                    data = resp.read(MAX_RESPONSE + 1)
                except (requests.RequestException, urllib3.exceptions.HTTPError, OSError,
                        ValueError, http.client.HTTPException) as exc:
                    if pool is not None:
                        self._drop(pool)
                    if resp is not None and conn is None:
                        resp.close()
                        resp.release_conn()
                    if isinstance(exc, LookupTimeout) or isinstance(
                            getattr(exc, "reason", None), LookupTimeout):
                        raise TransportError(f"timed out after {self.timeout:g}s (DNS lookup)"
                                             ) from None
                    if time.monotonic() >= deadline - 0.001:
                        raise TransportError(f"timed out after {self.timeout:g}s") from None
                    if isinstance(exc, ValueError) and not isinstance(  # a certificate
                            exc, requests.RequestException | ssl.SSLError):  # error is both
                        raise TransportError("request refused before sending:"
                                             f" {type(exc).__name__}") from None
                    raise TransportError(describe_request_error(exc, self.mask)) from None
            # Read whole: a known length read to its end (or, on our own connection, chunks
            # to the last one: one cut short raises IncompleteRead). A body that ends when
            # the connection does is never known to be whole once the deadline shut it.
            if conn is None:
                whole = resp.length_remaining == 0
            else:
                whole = resp.length == 0 or (resp.chunked and resp.isclosed())
            # Cut off mid-answer (a trickling server), the read ends early without an error:
            # no complete verdict within the bound. An answer read whole stands, even if the
            # deadline fired just after. On our own connection, a body shorter than its
            # Content-Length is no verdict either (urllib3's read raises for it).
            cut = not whole and len(data) <= MAX_RESPONSE and (
                watch.fired or (conn is not None and bool(resp.length)))
            if cut or len(data) > MAX_RESPONSE or (conn is not None and (
                    not whole or resp.will_close)):
                # The unread rest of a huge answer, an upstream that closes: drop the
                # connection.
                resp.close()
                if conn is not None:
                    conn.close()
            if conn is None:
                resp.release_conn()  # back to the pool (reconnected if it was closed)
            if cut:
                raise TransportError(f"timed out after {self.timeout:g}s" if watch.fired
                                     else "the answer was cut short (connection closed)")
        finally:
            _IN_FLIGHT.socks = None
        # Masked here, before any transport parses or cuts it: an answer may quote the
        # request, and a secret cut in two is not recognised by the masker.
        return resp.status, self.mask_data(data[:MAX_RESPONSE]), resp.headers

    def _exchange(self, pool: Any, target: str, body: bytes, headers: Mapping[str, str],
                  left: float) -> tuple[Any, Any]:
        """Send one POST on this thread's kept-alive connection to the pool's host (no
        proxy); the connection and its answer, headers read, body not.

        The connection is urllib3's, taken from the route's pool: its connect() does the
        TCP and TLS work, certificate and host name checks included; its post() writes the
        request and reads the answer with http.client. Through pool.urlopen() a POST cost 171 us of
        CPU, this way 100 us (medians of 7 x 2,000 POSTs to bench/receiver.py, one thread):
        urlopen adds timeout, retry and pool objects and urllib3's response wrapper, for one
        attempt on a connection that no other thread uses.
        """
        conns: dict[tuple[str, str, int], Any] = self._local.__dict__.setdefault("conns", {})
        key = _host_key(pool)
        conn = conns.get(key)
        if conn is not None and conn.sock is not None and not conn.is_connected:
            conn.close()  # the upstream closed it while it sat idle: connect again
        if conn is None:
            conn = conns[key] = pool._new_conn()
        if conn.sock is None:
            with self._lock:
                self._conns.add(conn)  # for close(), from any thread
            conn.timeout = left
            conn.connect()
            # Connected: blocking from now on, and the deadline thread shuts the socket down
            # at the deadline, which wakes a blocked send or read. With a timeout, every send
            # and read is a poll() and then the call, each giving up the GIL and taking it
            # back, and each setting of it an ioctl().
            conn.sock.settimeout(None)  # type: ignore[attr-defined]  # connected: a socket
        return conn, conn.post(target, body, headers)

    def _drop(self, pool: Any) -> None:
        """Close this thread's connection to the pool's host after a failed exchange."""
        conn = self._local.__dict__.get("conns", {}).get(_host_key(pool))
        if conn is not None:
            conn.close()

    def deliver(self, request: Rendered) -> str:
        """POST one rendered request; the verdict as a detail, or the typed exception."""
        status, data, headers = self.post(request.url, request.body, request.headers)
        return self.accept(status, data, headers, request)

    def accept(self, status: int, data: bytes, headers: Any, request: Rendered) -> str:
        """2xx -> detail; anything else raises DeliveryError via describe_refusal()."""
        if 200 <= status < 300:
            return f"HTTP {status}" + (f" {request.what}" if request.what else "")
        raise self.refusal(status, data, headers)

    def send(self, alert: Alert, recipient: str) -> str | Sent:
        return self.deliver(self.render(alert, recipient))

    def send_digest(self, alerts: list[Alert], recipient: str, digest_id: str) -> str:
        """Every message of the digest; SENT only when each was accepted. A refused one
        stops the rest and fails the digest, naming which message met it."""
        requests_ = self.render_digest(alerts, recipient, digest_id)
        detail = ""
        for k, request in enumerate(requests_, 1):
            try:
                detail = self.deliver(request)
            except (TransportError, DeliveryError) as exc:
                if len(requests_) == 1:
                    raise
                raise _in_part(exc, k, len(requests_)) from None
        return detail if len(requests_) == 1 else f"{detail} ({len(requests_)} messages)"

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
        """Close every thread's pooled connections (call it once no send is running)."""
        with self._lock:
            sessions, self._sessions = self._sessions, set()
            conns, self._conns = self._conns, set()
        for session in sessions:
            session.close()
        for conn in conns:
            conn.close()


def _host_key(pool: Any) -> tuple[str, str, int]:
    """Which of a sender thread's direct connections serves this pool's host."""
    return (pool.scheme, pool.host, pool.port)


def _in_part(exc: TransportError | DeliveryError, k: int, n: int
             ) -> TransportError | DeliveryError:
    """The same verdict, its detail naming which message of the digest met it."""
    detail = f"part {k} of {n}: {exc}"
    if isinstance(exc, RateLimited):
        return RateLimited(detail, exc.retry_after)
    return type(exc)(detail)
