"""A fast local webhook receiver for the bench: raw asyncio HTTP/1.1 with keep-alive.

Runs as its own process (`python bench/receiver.py`), prints `PORT <n>` on stdout once it
listens on 127.0.0.1, and answers every request `200 ok`. Each request's arrival is
recorded as (time.monotonic(), time.time(), path, body); bodies are parsed lazily (only
when the bench asks), so the hot path costs one header scan and one write.

Control endpoints (used by bench/run.py between and after measurements):

    GET  /__stats    {"requests": {path: n}, "items": {path: n}, "refused": {path: n}}
    GET  /__records  [[mono, wall, path, id], ...]                  one entry per item
    GET  /__bodies   [[mono, path, body text], ...]  accepted requests under /limited/
    POST /__reset    forget everything recorded so far

A path under /limited/ answers like a Slack channel under load: 1 message/s with bursts of
25 (a token bucket per path), `429 Too Many Requests` with `Retry-After: 1` beyond that.
Refused requests are counted, not recorded.

An item's id is the `run_id` of a nomaflowd webhook body, the `message` of an Apprise
json:// body, or each alert's `labels.run_id` in an Alertmanager webhook body.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import sys
import time
from typing import Any

OK = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n"
      b"\r\nok")
TOO_MANY = (b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: text/plain\r\nRetry-After: 1"
            b"\r\nContent-Length: 12\r\n\r\nrate_limited")
LIMIT_RATE, LIMIT_BURST = 1.0, 25.0
OK_CLOSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n"
            b"Connection: close\r\n\r\nok")


class Store:
    def __init__(self) -> None:
        self.raw: list[tuple[float, float, str, bytes]] = []
        self.parsed: list[tuple[float, float, str, str | None]] = []
        self.upto = 0
        self.requests: dict[str, int] = {}
        self.items: dict[str, int] = {}
        self.refused: dict[str, int] = {}
        self.buckets: dict[str, tuple[float, float]] = {}  # path -> (tokens, stamp)

    def admit(self, path: str, now: float) -> bool:
        """The /limited/ token bucket: False (and counted) when the channel is over its rate."""
        tokens, stamp = self.buckets.get(path, (LIMIT_BURST, now))
        tokens = min(LIMIT_BURST, tokens + (now - stamp) * LIMIT_RATE)
        if tokens < 1:
            self.buckets[path] = (tokens, now)
            self.refused[path] = self.refused.get(path, 0) + 1
            return False
        self.buckets[path] = (tokens - 1, now)
        return True

    def add(self, mono: float, wall: float, path: str, body: bytes) -> None:
        self.raw.append((mono, wall, path, body))

    def parse_pending(self) -> None:
        raw, n = self.raw, len(self.raw)
        for i in range(self.upto, n):
            mono, wall, path, body = raw[i]
            self.requests[path] = self.requests.get(path, 0) + 1
            for ident in ids_of(body):
                self.parsed.append((mono, wall, path, ident))
                self.items[path] = self.items.get(path, 0) + 1
        self.upto = n

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]


def ids_of(body: bytes) -> list[str | None]:
    try:
        doc: Any = json.loads(body)
    except ValueError:
        return [None]
    if not isinstance(doc, dict):
        return [None]
    if isinstance(doc.get("alerts"), list):  # Alertmanager: one entry per alert in the group
        return [(a.get("labels") or {}).get("run_id") for a in doc["alerts"]
                if isinstance(a, dict)] or [None]
    ident = doc.get("run_id") or doc.get("message")
    return [ident if isinstance(ident, str) else None]


class Http(asyncio.Protocol):
    def __init__(self, store: Store) -> None:
        self.store = store
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self.transport is not None:
            head_end = self.buf.find(b"\r\n\r\n")
            if head_end < 0:
                return
            lines = bytes(self.buf[:head_end]).decode("latin-1").split("\r\n")
            try:
                method, target, version = lines[0].split(" ", 2)
            except ValueError:
                self.transport.close()
                return
            length, close = 0, version == "HTTP/1.0"
            for line in lines[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    length = int(value)
                elif name == "connection":
                    close = value.strip().lower() == "close"
                elif name == "transfer-encoding":
                    self.transport.write(b"HTTP/1.1 411 Length Required\r\nContent-Length: 0"
                                         b"\r\nConnection: close\r\n\r\n")
                    self.transport.close()
                    return
            end = head_end + 4 + length
            if len(self.buf) < end:
                return
            body = bytes(self.buf[head_end + 4:end])
            del self.buf[:end]
            mono, wall = time.monotonic(), time.time()
            path = target.split("?", 1)[0]
            if path.startswith("/__"):
                self.transport.write(self.control(method, path))
            elif path.startswith("/limited/") and not self.store.admit(path, mono):
                self.transport.write(TOO_MANY)
            else:
                self.store.add(mono, wall, path, body)
                self.transport.write(OK_CLOSE if close else OK)
            if close:
                self.transport.close()
                return

    def control(self, method: str, path: str) -> bytes:
        store = self.store
        if path == "/__reset":
            store.reset()
            out: Any = {"ok": True}
        elif path == "/__stats":
            store.parse_pending()
            out = {"requests": store.requests, "items": store.items, "refused": store.refused}
        elif path == "/__bodies":
            out = [[m, p, b.decode(errors="replace")] for m, _w, p, b in store.raw
                   if p.startswith("/limited/")]
        elif path == "/__records":
            store.parse_pending()
            out = store.parsed
        else:
            out = {"error": f"unknown control path {path}"}
        data = json.dumps(out).encode()
        return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                + str(len(data)).encode() + b"\r\n\r\n" + data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def serve(port: int) -> None:
    store = Store()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Http(store), "127.0.0.1", port, backlog=2048,
                                      reuse_address=True)
    real = server.sockets[0].getsockname()[1]
    sys.stdout.write(f"PORT {real}\n")
    sys.stdout.flush()
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    gc.freeze()  # fewer GC pauses while recording (latency figures)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()
