"""The spool directory is the queue: scan it, read files safely, reject with a reason."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import stat
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from watchdog.observers.inotify_c import (
    CallbackId,
    InotifyConstants,
    InotifyEvent,
    InotifyFD,
    Mask,
)

from nomaflowd import metrics
from nomaflowd.errors import ConfigError, Rejected
from nomaflowd.events import MAX_BYTES
from nomaflowd.text import escape

logger = logging.getLogger(__name__)

REJECTED = "rejected"
TMP = "tmp"
_DRAFT = re.compile(r"\.(.+)\.error\.[0-9a-f]{8}", re.S)  # a note written aside (_reject)
# A quarantined name leaves room for ".error", a draft's "." + ".error.xxxxxxxx" and a
# collision suffix ".xxxxxxxx" within NAME_MAX (255 bytes on every Linux file system).
NAME_ROOM = 255 - len(".") - len(".error.") - 8 - len(".") - 8
# inotify(7): <sys/inotify.h>


def quarantine_name(name: str) -> str:
    """The name a rejected file gets: its own, or a short one when its own leaves no room.

    A name near the 255-byte limit cannot take the note's suffixes; such a file is kept
    under a prefix of its name plus a digest of all of it, and its note records the name.
    """
    raw = os.fsencode(name)
    if len(raw) <= NAME_ROOM:
        return name
    digest = hashlib.sha256(raw).hexdigest()[:16]
    prefix = "".join(c if c.isascii() and c.isprintable() else "_" for c in name[:64])
    return f"{prefix}~{digest}"


class SpoolFile(bytes):
    """A spool file's bytes, with its owner and group as fstat() saw them on the open file.

    A bytes subclass, so every caller that takes the bytes goes on working unchanged.
    """

    uid: int
    gid: int
    ident: tuple[int, int]  # (st_dev, st_ino): the file read, whatever its name holds later
    mtime: float  # when it was written (a rename keeps it): the event's time if it says none

    @classmethod
    def of(cls, data: bytes, st: os.stat_result) -> SpoolFile:
        read = cls(data)
        read.uid = st.st_uid
        read.gid = st.st_gid
        read.ident = (st.st_dev, st.st_ino)
        read.mtime = st.st_mtime
        return read


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
        self.said: set[str] = set()  # subdirectories already reported as not read
        self._handling_fd: int | None = None
        self._unnoted_said = 0.0  # time.monotonic() when "cannot note the files" was logged

    def prepare(self) -> None:
        try:
            for d in (self.path, self.tmp):
                d.mkdir(parents=True, exist_ok=True)
            self._own_rejected()
            self._own_handling()
        except OSError as exc:  # a file where a directory goes, a path too long, EACCES...
            where = exc.filename or self.path
            raise ConfigError(f"daemon.spool_dir {self.path}: {where} cannot be made a"
                              f" directory ({exc.strerror or exc}); move what is there or"
                              " point spool_dir elsewhere") from None
        self._finish_notes()

    def _own_rejected(self) -> None:
        """rejected/ as a directory of this daemon's own that only it can write to.

        Runners create entries in the spool, so while rejected/ is missing (an operator
        removed it) one of them could take the name: a symlink to where the daemon would
        then move and prune files, a file that stopped every rejection, a directory of
        their own where they read other runners' notes and plant a symlinked one for the
        page to show. Whatever is there and is not the daemon's is moved aside
        (`rejected.untrusted-…`, said in the log) and a new directory made. The spool is
        the daemon's and sticky: once made, no runner can rename or replace it.
        """
        for _ in range(3):
            try:
                st = os.lstat(self.rejected)
            except FileNotFoundError:
                with contextlib.suppress(FileExistsError):  # a runner was quicker: judged next
                    os.mkdir(self.rejected, 0o700)
                continue
            if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022:
                return
            what = ("a symbolic link" if stat.S_ISLNK(st.st_mode)
                    else "a file" if stat.S_ISREG(st.st_mode)
                    else "not a directory" if not stat.S_ISDIR(st.st_mode)
                    else f"owned by uid {st.st_uid}" if st.st_uid != os.geteuid()
                    else f"writable by others (mode {stat.S_IMODE(st.st_mode):04o})")
            aside = self.path / (f"{REJECTED}.untrusted-{time.strftime('%Y%m%dT%H%M%S')}"
                                 f"-{uuid.uuid4().hex[:6]}")
            os.rename(self.rejected, aside)
            logger.error("spool %s: %s/ was %s, not a directory of this daemon's own; moved"
                         " it to %s and made a new one (see what it holds, then remove it)",
                         self.path, REJECTED, what, aside.name)
        raise PermissionError(errno.EACCES, "taken again each time it is made",
                              str(self.rejected))

    def _own_handling(self) -> None:
        """The note of files in hand must be a file of ours: one left by another user (the
        daemon ran as root before) is removed, not fatal at the first batch."""
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(self.handling)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                os.unlink(self.handling)
                logger.warning("spool %s: %s was not a file of this daemon's own; removed it",
                               self.path, escape(self.handling.name))

    def _finish_notes(self) -> None:
        """_reject() moves a file, then puts its note (written aside) in place: a stop in
        between left the file without its reason. Put such a draft in place; drop a draft
        an hour old whose file never moved (a peer on a shared spool has its own in hand
        for microseconds)."""
        with os.scandir(self.rejected) as it:
            drafts = [(e.name, m[1]) for e in it if (m := _DRAFT.fullmatch(e.name))]
        for draft, target in drafts:
            with contextlib.suppress(OSError):  # a peer finished it meanwhile
                if os.path.lexists(self.rejected / target):
                    if not os.path.lexists(self.rejected / f"{target}.error"):
                        os.rename(self.rejected / draft, self.rejected / f"{target}.error")
                elif time.time() - os.lstat(self.rejected / draft).st_mtime > 3600:
                    os.unlink(self.rejected / draft)

    def scan(self) -> list[str]:
        """Names of `*.json` entries directly in the spool, oldest name first.

        Directories are not read: a directory named `*.json`, or one a writer filled by
        mistake, is said once in the log (its files would otherwise wait unnoticed).
        """
        names = []
        with os.scandir(self.path) as it:
            for e in it:
                if not e.is_dir(follow_symlinks=False):
                    if e.name.endswith(".json"):
                        names.append(e.name)
                elif e.name not in (REJECTED, TMP) and e.name not in self.said:
                    self.said.add(e.name)
                    logger.warning("spool directory %s is not read: write each event file"
                                   " directly into %s", escape(e.name), self.path)
        names.sort()
        return names

    def read(self, name: str) -> SpoolFile | None:
        """The file's bytes and owner, None if it is gone, or Rejected (symlink, FIFO...)."""
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
            # One read for a file of the size fstat() gave: a second one to find the end
            # asked for another 1 MiB buffer and a system call, per file.
            chunks = []
            remaining = MAX_BYTES + 1
            want = st.st_size + 1
            while remaining > 0:
                chunk = os.read(fd, min(remaining, want))
                if not chunk:
                    break
                chunks.append(chunk)
                remaining -= len(chunk)
                if len(chunk) == st.st_size and len(chunks) == 1:
                    break  # short of what was asked, at the size fstat() gave: the end
                want = 1 << 20
            data = b"".join(chunks)
            if len(data) > MAX_BYTES:
                raise Rejected(f"file is larger than {MAX_BYTES} bytes")
            return SpoolFile.of(data, st)
        finally:
            os.close(fd)

    def reject(self, name: str, reason: str, now: datetime) -> bool:
        """Move the file to rejected/ with a `.error` note beside it; never overwrite another.

        An OSError that belongs to this one file (its name, a race, its permissions) is
        logged and swallowed (returns False: the file stays): one file must never stall
        the others. Only a rejected/ that is unusable for every file raises.
        """
        for attempt in (1, 2):
            try:
                # Removed by an operator, or taken by a runner meanwhile: made again. If
                # that fails (a read-only mount), no file can be rejected: raise.
                self._own_rejected()
                self._reject(name, reason, now)
                return True
            except OSError as exc:
                if attempt == 1 and not os.path.isdir(self.rejected):
                    continue
                if not os.access(self.rejected, os.W_OK | os.X_OK):
                    raise
                logger.error("spool file %s could not be moved to rejected/ (%s); it stays in"
                             " the spool. It was rejected because: %s", escape(name),
                             escape(exc.strerror or str(exc)), escape(reason))
                return False
        return False

    def _reject(self, name: str, reason: str, now: datetime) -> None:
        target = quarantine_name(name)
        if os.path.lexists(self.rejected / target):
            target = f"{target}.{uuid.uuid4().hex[:8]}"
        # The note is written aside and put in place only once the file is ours: a replica
        # that lost the race for the same file (shared spool) must not touch the winner's note.
        draft = self.rejected / f".{target}.error.{uuid.uuid4().hex[:8]}"
        draft.write_text(f"{now:%Y-%m-%dT%H:%M:%SZ} {escape(name)}: {escape(reason)}\n",
                         encoding="utf-8")
        try:
            os.rename(self.path / name, self.rejected / target)
        except OSError:
            draft.unlink(missing_ok=True)
            if not os.path.lexists(self.path / name):
                return  # FileNotFoundError: another replica or an operator got there first
            raise
        os.rename(draft, self.rejected / f"{target}.error")
        metrics.count_rejected()
        if target == name:
            logger.warning("spool file %s rejected: %s", escape(name), escape(reason))
        else:
            logger.warning("spool file %s rejected as %s: %s", escape(name), escape(target),
                           escape(reason))

    def prune_rejected(self, now: datetime, retention_days: int) -> int:
        """Delete quarantined files and their notes rejected more than `retention_days` ago.

        A file's age is its note's (written when it was rejected; the file itself keeps its
        writer's mtime). A file without a note, or a draft note left by a crash, counts
        from its own change time. Returns how many entries went.
        """
        cutoff = (now.replace(tzinfo=UTC) if now.tzinfo is None else now).timestamp() \
            - retention_days * 86400
        try:
            self._own_rejected()  # never prune through a runner's symlink
            with os.scandir(self.rejected) as it:
                entries = {e.name: e for e in it}
        except FileNotFoundError:
            return 0
        handling = self.handling.name
        expired: list[str] = []
        for name, entry in entries.items():
            if name.startswith(".handling-") or name == handling:
                continue  # a replica's own note of the files in hand
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if name.endswith(".error"):  # a note (drafts end in .error.HEX)
                if st.st_mtime < cutoff:
                    expired.append(name)
                    if name[:-len(".error")] in entries:
                        expired.append(name[:-len(".error")])
            elif f"{name}.error" not in entries and max(st.st_mtime, st.st_ctime) < cutoff:
                expired.append(name)
        removed = 0
        for name in expired:
            try:
                entry = entries[name]
                if entry.is_dir(follow_symlinks=False):
                    continue  # never ours: rejected/ holds files only
                os.unlink(entry.path)
                removed += 1
            except FileNotFoundError:
                continue  # another replica pruned it first
            except OSError as exc:
                logger.error("rejected file %s could not be pruned: %s", escape(name),
                             exc.strerror or exc)
        return removed

    def remove(self, names: list[str], read: Mapping[str, tuple[int, int]]) -> None:
        """Delete the files read under these names (`read`: name -> SpoolFile.ident). A file a
        runner renamed over the name since (the same name for its next event) stays, to be
        read next; it used to be deleted unread."""
        for name in names:
            path = os.path.join(self.path, name)
            # FileNotFoundError: another replica or an operator got there first.
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(path)
                if (st.st_dev, st.st_ino) == read.get(name):
                    os.unlink(path)

    def mark_handling(self, names: list[str]) -> None:
        if self._handling_fd is None:
            self._own_rejected()
            fd = os.open(self.handling, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                         0o600)
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                os.close(fd)
                raise PermissionError(f"{self.handling} is not a file of this daemon's own")
            self._handling_fd = fd
        data = b"\0".join(os.fsencode(n) for n in names)
        try:
            os.ftruncate(self._handling_fd, 0)
            os.pwrite(self._handling_fd, data, 0)
        except OSError as exc:
            # A full disk (or quota): reading and unlinking the files needs no space, and
            # frees some. Only the crash-loop count (count_tries) goes without this note.
            if time.monotonic() - self._unnoted_said >= 60:
                self._unnoted_said = time.monotonic()
                logger.error("cannot note the spool files in hand in %s (%s); ingesting"
                             " anyway, without the crash-loop count", self.handling,
                             exc.strerror or exc)

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
        try:  # not glob("*.error"), which skips a runner's .evt.json.error
            notes = sorted(p for p in self.rejected.iterdir() if p.name.endswith(".error"))
        except FileNotFoundError:
            return []
        for note in notes:
            try:
                text = read_note(str(note), 1 << 16)
            except OSError:
                continue
            out.append((note.name[:-len(".error")], text.strip()))
        return out


def read_note(path: str, limit: int) -> str:
    """A rejected file's note, up to `limit` bytes: a regular file of the daemon's own, never
    a symlink or a FIFO (the key, the database) that something else put in its place."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            raise PermissionError(errno.EACCES, "not a note of this daemon's own", path)
        return fh.read(limit).decode("utf-8", "replace")


class Watcher:
    """watchdog's inotify reader on the spool directory, calling back directly (since
    watchdog 7.1.1 from its second thread: it reads on one, dispatches on another).

    watchdog's Observer put two more in the way (an emitter and a dispatcher, each a queue
    and a GIL hand-off), most of a paced event's rename-to-POST time (bench/README.md,
    stages). Only a hint: the scan finds the files, so an overflowed queue just wakes the
    loop too.
    """

    MASK = Mask(InotifyConstants.IN_MOVED_TO | InotifyConstants.IN_CREATE
                | InotifyConstants.IN_CLOSE_WRITE | InotifyConstants.IN_ONLYDIR)

    def __init__(self, path: Path, wake: Callable[[], None]) -> None:
        self.wake = wake
        self.reader = InotifyFD()  # its own (get_instance() would be shared process-wide)
        self.reader.name = "spool-watch"
        self.reader.add_callback(os.fsencode(path), self.MASK, self, CallbackId(1))

    def start(self) -> None:
        self.reader.start()

    def on_event(self, event: InotifyEvent) -> None:
        if event.name.endswith(b".json"):
            self.wake()

    def on_queue_overflow(self) -> None:
        self.wake()  # events were lost: the scan finds the files

    def on_events_lost(self) -> None:
        """watchdog 7.1.1+: said once every watch has had on_queue_overflow (woken already)."""

    def on_watch_deleted(self, wd: Any) -> None:
        self.wake()  # the spool went away: the scan says so

    def stop(self) -> None:
        self.reader.stop()

    def join(self, timeout: float | None = None) -> None:
        self.reader.join(timeout)


def watch(path: Path, wake: Callable[[], None]) -> Watcher:
    """Watch for arrivals only (a rename in: IN_MOVED_TO; a write in place: IN_CREATE and
    IN_CLOSE_WRITE). Our own opens, reads and unlinks are not reported, so the watcher
    never competes with the ingest loop during a burst. A missing spool raises OSError."""
    watcher = Watcher(path, wake)
    watcher.start()
    return watcher
