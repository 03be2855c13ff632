"""Name lookups and TCP connects bounded in time: getaddrinfo() takes no timeout."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

_T = TypeVar("_T")


class LookupTimeout(TimeoutError):
    """The resolver gave no answer within the send's deadline."""


# getaddrinfo() takes no timeout: with a resolver that does not answer it waits resolv.conf's
# timeout x attempts x nameservers (a 2 s send took 8 s with "timeout:8 attempts:1"), and
# the deadline thread has no socket to shut down yet. So a lookup runs on a thread of its
# own and the send waits for it until its deadline, as curl's threaded resolver does; an
# abandoned lookup ends when the resolver gives up. At most LOOKUPS wait at once: a send
# finding none free waits for one, within its own deadline.
LOOKUPS = threading.BoundedSemaphore(16)


def bounded(call: Callable[[], _T], timeout: float | None) -> _T:
    """call() on a thread of its own; LookupTimeout if it has not returned within `timeout`
    (None: called here, unbounded)."""
    if timeout is None:
        return call()
    deadline = time.monotonic() + timeout
    if not LOOKUPS.acquire(timeout=timeout):
        raise LookupTimeout("no answer from the resolver")
    answer: list[Any] = []
    done = threading.Event()

    def run() -> None:
        try:
            answer.append(call())
        except BaseException as exc:  # handed to the caller, if it still waits
            answer.append(exc)
        finally:
            LOOKUPS.release()
            done.set()

    threading.Thread(target=run, name="nomaflowd-lookup", daemon=True).start()
    if not done.wait(max(0.0, deadline - time.monotonic())):
        raise LookupTimeout("no answer from the resolver")
    if isinstance(answer[0], BaseException):
        raise answer[0]
    result: _T = answer[0]
    return result


def lookup(host: str, port: int, timeout: float | None,
           family: int = socket.AF_UNSPEC) -> list[Any]:
    """getaddrinfo() for a TCP connection, bounded by `timeout` (an address needs no
    resolver, and no thread)."""
    try:
        return socket.getaddrinfo(host, port, family, socket.SOCK_STREAM, 0,
                                  socket.AI_NUMERICHOST)
    except socket.gaierror:
        pass
    return bounded(lambda: socket.getaddrinfo(host, port, family, socket.SOCK_STREAM), timeout)


def open_socket(host: str, port: int, timeout: float | None, *,
                source_address: tuple[str, int] | None = None,
                options: Iterable[tuple[int, int, Any]] = (), family: int = socket.AF_UNSPEC,
                on_socket: Callable[[socket.socket], Any] | None = None) -> socket.socket:
    """socket.create_connection() with the name lookup inside `timeout` as well, the
    addresses tried in turn in the time left, and each socket shown to `on_socket` before
    its connect (for the deadline thread)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    error: OSError | None = None
    for af, kind, proto, _, address in lookup(host, port, timeout, family):
        sock = socket.socket(af, kind, proto)
        try:
            for option in options:
                sock.setsockopt(*option)
            if deadline is not None:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
            if source_address:
                sock.bind(source_address)
            if on_socket is not None:
                on_socket(sock)
            sock.connect(address)
            return sock
        except OSError as exc:
            error = exc
            sock.close()
    raise error or OSError("the name has no address")
