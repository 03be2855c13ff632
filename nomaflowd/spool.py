"""The spool directory is the queue: scan it, read files safely, reject with a reason."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from watchdog.events import (
    FileClosedEvent,
    FileCreatedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from nomaflowd import metrics
from nomaflowd.errors import Rejected
from nomaflowd.events import MAX_BYTES

logger = logging.getLogger(__name__)

REJECTED = "rejected"
TMP = "tmp"


class Spool:
    def __init__(self, path: Path, replica: str = "") -> None:
        self.path = path
        self.rejected = path / REJECTED
        self.tmp = path / TMP
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in replica)
        # The names in hand right now. A plain write, no fsync: it only has to outlive a
        # crashed process, and the kernel keeps it. The next start counts a try for each.
        # It lives in rejected/, which runners cannot write to, so none can plant a symlink.
        self.handling = self.rejected / f".handling-{safe or 'local'}"
        self._handling_fd: int | None = None

    def prepare(self) -> None:
        for d in (self.path, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        self.rejected.mkdir(mode=0o700, exist_ok=True)

    def scan(self) -> list[str]:
        """Names of `*.json` entries directly in the spool, oldest name first."""
        with os.scandir(self.path) as it:
            names = [e.name for e in it if e.name.endswith(".json")
                     and not e.is_dir(follow_symlinks=False)]
        names.sort()
        return names

    def read(self, name: str) -> bytes | None:
        """The file's bytes, None if it is gone, or Rejected (symlink, FIFO, too large...)."""
        path = os.path.join(self.path, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise Rejected("is a symbolic link; write the file itself into the spool") from None
            raise Rejected(f"cannot be opened: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise Rejected("not a regular file")
            if st.st_nlink > 1:
                raise Rejected("has other hard links; rename a file of its own into the spool")
            if st.st_size > MAX_BYTES:
                raise Rejected(f"file is larger than {MAX_BYTES} bytes ({st.st_size})")
            chunks = []
            remaining = MAX_BYTES + 1
            while remaining > 0:
                chunk = os.read(fd, min(remaining, 1 << 20))
                if not chunk:
                    break
                chunks.append(chunk)
                remaining -= len(chunk)
            data = b"".join(chunks)
            if len(data) > MAX_BYTES:
                raise Rejected(f"file is larger than {MAX_BYTES} bytes")
            return data
        finally:
            os.close(fd)

    def reject(self, name: str, reason: str, now: datetime) -> None:
        """Move the file to rejected/ with `<name>.error` beside it; never overwrite another."""
        target = name
        if os.path.lexists(self.rejected / target):
            target = f"{name}.{uuid.uuid4().hex[:8]}"
        # The note is written aside and put in place only once the file is ours: a replica
        # that lost the race for the same file (shared spool) must not touch the winner's note.
        draft = self.rejected / f".{target}.error.{uuid.uuid4().hex[:8]}"
        draft.write_text(f"{now:%Y-%m-%dT%H:%M:%SZ} {name}: {reason}\n", encoding="utf-8",
                         errors="replace")
        try:
            os.rename(self.path / name, self.rejected / target)
        except FileNotFoundError:
            draft.unlink(missing_ok=True)
            return
        os.rename(draft, self.rejected / f"{target}.error")
        metrics.REJECTED.inc()
        logger.warning("spool file %r rejected: %s", name, reason)

    def remove(self, names: list[str]) -> None:
        for name in names:
            # FileNotFoundError: another replica or an operator got there first.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.path, name))

    def mark_handling(self, names: list[str]) -> None:
        if self._handling_fd is None:
            fd = os.open(self.handling, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                         0o600)
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                os.close(fd)
                raise PermissionError(f"{self.handling} is not a file of this daemon's own")
            self._handling_fd = fd
        data = b"\0".join(os.fsencode(n) for n in names)
        os.ftruncate(self._handling_fd, 0)
        os.pwrite(self._handling_fd, data, 0)

    def clear_handling(self) -> None:
        if self._handling_fd is not None:
            os.ftruncate(self._handling_fd, 0)

    def handled_when_stopped(self) -> list[str]:
        """Names that were in hand when the last run stopped without finishing them."""
        try:
            fd = os.open(self.handling, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except (FileNotFoundError, OSError):
            return []
        with os.fdopen(fd, "rb") as fh:
            data = fh.read(1 << 24)
        return [os.fsdecode(n) for n in data.split(b"\0") if n]

    def close(self) -> None:
        if self._handling_fd is not None:
            os.close(self._handling_fd)
            self._handling_fd = None

    def rejected_files(self) -> list[tuple[str, str]]:
        out = []
        for note in sorted(self.rejected.glob("*.error")):
            try:
                out.append((note.name[:-len(".error")], note.read_text(errors="replace").strip()))
            except OSError:
                continue
        return out


class Hints(FileSystemEventHandler):
    """watchdog callback: a `*.json` appeared. Only a hint; the scan finds the files."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self.wake = wake

    def on_any_event(self, event: FileSystemEvent) -> None:
        path = getattr(event, "dest_path", "") or event.src_path
        if isinstance(path, bytes):
            path = path.decode(errors="replace")
        if path.endswith(".json") and event.event_type in ("moved", "created", "closed"):
            self.wake()


def watch(path: Path, wake: Callable[[], None]) -> Any:
    observer = Observer()
    # Only arrivals (a rename from tmp/ reads as "created"; from the spool itself as
    # "moved") and closed writes: with every open, read and unlink of our own reported
    # too, the watcher thread took the GIL from the ingest loop and cut its rate by half.
    observer.schedule(Hints(wake), str(path), recursive=False,
                      event_filter=[FileCreatedEvent, FileMovedEvent, FileClosedEvent])
    observer.daemon = True
    observer.start()
    return observer
