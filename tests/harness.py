"""What tests/ and bench/ both build on: a throwaway install, the real daemon process, an HTTP
recorder.

No pytest in here: bench/run.py imports this module (with the repository root on sys.path)
and runs where only nomaflowd and its runtime dependencies are installed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any, Self

from nomaflowd import crypto
from nomaflowd.client import drop

# --- the install --------------------------------------------------------------------------------

class Tree:
    """A throwaway install: etc/ with a key, config and catalogue; var/ with spool and database."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.etc = root / "etc"
        self.etc.mkdir(parents=True)
        self.spool = root / "var" / "spool"
        self.db_path = root / "var" / "lib" / "nomaflowd.db"
        self.key = self.etc / "nomaflowd.key"
        crypto.write_key(self.key)
        self.keys = crypto.load_keys(self.key)
        self.config_path = self.etc / "nomaflowd.toml"
        self.jobs_path = self.etc / "jobs.toml"
        self.database = "sqlite:///../var/lib/nomaflowd.db"

    def enc(self, value: str) -> str:
        return crypto.encrypt(self.keys, value)

    def write_config(self, body: str = "", *, daemon: str = "") -> Path:
        """[daemon] with test-friendly settings (`daemon` lines override them) plus `body`."""
        settings = {
            "spool_dir": f'"{self.spool}"',
            "database": f'"{self.database}"',
            "jobs_file": '"jobs.toml"',
            "key_file": '"nomaflowd.key"',
            "base_url": '"https://nomaflow.test"',
            "send_timeout_seconds": "2",
            "poll_seconds": "0.2",
        }
        extra = []
        for line in daemon.splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip() in settings:
                settings[key.strip()] = value.strip()
            elif line.strip():
                extra.append(line)
        lines = [f"{k} = {v}" for k, v in settings.items()] + extra
        self.config_path.write_text("[daemon]\n" + "\n".join(lines) + f"\n\n{body}\n",
                                    encoding="utf-8")
        return self.config_path

    def webhook(self, name: str, url: str, extra: str = "") -> str:
        return f'[transports.{name}]\ntype = "webhook"\nurl = "{self.enc(url)}"\n{extra}\n'

    def slack(self, name: str, url: str, extra: str = "") -> str:
        return f'[transports.{name}]\ntype = "slack"\nwebhook_url = "{self.enc(url)}"\n{extra}\n'

    def write_jobs(self, text: str) -> None:
        tmp = self.jobs_path.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.jobs_path)

    def drop(self, event: dict[str, Any]) -> Path:
        self.spool.mkdir(parents=True, exist_ok=True)
        (self.spool / "tmp").mkdir(exist_ok=True)
        return drop(self.spool, event)

    def spool_files(self) -> list[str]:
        return sorted(p.name for p in self.spool.glob("*.json"))

    def rejected(self) -> list[str]:
        return sorted(p.name for p in (self.spool / "rejected").iterdir())

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.db_path, timeout=10) as conn:
            return conn.execute(query, params).fetchall()

    def notifications(self) -> list[dict[str, Any]]:
        with sqlite3.connect(self.db_path, timeout=10) as conn:
            conn.row_factory = sqlite3.Row
            rows = conn.execute("SELECT * FROM notifications ORDER BY id").fetchall()
            return [dict(r) for r in rows]


# --- the daemon as a real process ---------------------------------------------------------------

class DaemonProcess:
    """`python -m nomaflowd run --config …` as a real process; READY comes over $NOTIFY_SOCKET.

    `tag` names the log (daemon-<tag>.log in the tree's root). `abstract_socket` binds
    $NOTIFY_SOCKET as "@name", as systemd allows: no path length limit, no file left behind.
    `started` and `ready_at` are time.monotonic() at spawn and when READY=1 was read.
    """

    def __init__(self, tree: Tree, env: dict[str, str] | None = None, *, tag: str | None = None,
                 abstract_socket: bool = False, prefix: list[str] | None = None) -> None:
        self.tree = tree
        self.prefix = prefix or []  # a command the daemon runs under (it execs the rest)
        tag = tag or str(time.monotonic_ns())
        self.log_path = tree.root / f"daemon-{tag}.log"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract_socket:
            name = f"nomaflowd-{os.getpid()}-{tag}-{time.monotonic_ns()}"
            self.sock.bind("\0" + name)
            notify = "@" + name
        else:
            self.notify_path = tree.root / f"notify-{time.monotonic_ns()}.sock"
            self.sock.bind(str(self.notify_path))
            notify = str(self.notify_path)
        self.env = {**os.environ, "NOTIFY_SOCKET": notify, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: IO[bytes] | None = None
        self.messages: list[str] = []
        self.started = 0.0
        self.ready_at: float | None = None

    def start(self, wait: bool = True) -> Self:
        self.log = self.log_path.open("ab")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "nomaflowd", "run", "--config",
             str(self.tree.config_path)],
            stdout=self.log, stderr=subprocess.STDOUT, env=self.env, cwd=self.tree.root)
        if wait:
            self.wait_message("READY=1")
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def receive(self, timeout: float = 0.0) -> bool:
        """Read one message from the daemon, waiting up to `timeout` (0: only one already sent)."""
        if timeout > 0:
            self.sock.settimeout(timeout)
        else:
            self.sock.setblocking(False)
        try:
            msg = self.sock.recv(4096).decode(errors="replace")
        except (TimeoutError, BlockingIOError):
            return False
        self.messages.append(msg)
        if self.ready_at is None and "READY=1" in msg:
            self.ready_at = time.monotonic()
        return True

    def poll_ready(self) -> bool:
        """Read what the daemon has sent so far, without waiting; True once READY=1 came."""
        while self.ready_at is None and self.receive():
            pass
        return self.ready_at is not None

    def wait_message(self, word: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(word in m for m in self.messages):
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.output()}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {word} from the daemon:\n{self.output()}")
            self.receive(min(remaining, 0.2))

    def check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"daemon exited {self.proc.returncode}:\n{self.tail()}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.output().splitlines()[-lines:])
        except OSError:
            return ""

    def log_problems(self) -> int:
        """ERROR/CRITICAL lines and tracebacks in the daemon's log (0 expected)."""
        try:
            text = self.output()
        except OSError:
            return 0
        return sum(1 for ln in text.splitlines()
                   if " ERROR " in ln or " CRITICAL " in ln or ln.startswith("Traceback"))

    def status_kb(self, key: str) -> int:
        """A field of /proc/<pid>/status (VmRSS, VmHWM, Threads …); 0 when absent."""
        with open(f"/proc/{self.pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        return 0

    def cpu_ticks(self) -> int:
        with open(f"/proc/{self.pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime (all threads)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and the exit code; subprocess.TimeoutExpired if it does not exit in time."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._close_log()
        return code

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self._close_log()

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._close_log()
        self.sock.close()

    def _close_log(self) -> None:
        if self.log is not None and not self.log.closed:
            self.log.close()


# --- receivers ----------------------------------------------------------------------------------

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
    """ThreadingHTTPServer on 127.0.0.1:0; scripted replies per path prefix; records requests.

    The bench's receiver (bench/receiver.py) is the other one: a separate process, built for
    throughput and timing, that only ever answers 200.
    """

    def __init__(self, tls: Any = None) -> None:
        """`tls`: an ssl.SSLContext (server side) to answer https:// instead."""
        self.tls = tls
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
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True,
                                       kwargs={"poll_interval": 0.05})
        self.thread.start()

    def url(self, path: str = "/hook", host: str = "127.0.0.1") -> str:
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}{path}"

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
