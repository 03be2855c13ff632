"""The daemon's log: one record per line on stderr (the journal under systemd).

A batch of results logs a `notification` line per attempt. Written one by one, each line
was a write(2) to stderr, and under systemd a wake-up of the journal for each: py-spy put
those writes at a tenth of the main thread's samples in bench d, and against a stream
socket like the journal's a line cost 33 us of CPU, 15 us in a batch. Inside `batched()`
the lines of this thread wait and leave in one write at the end of the block, still one
record per line and in the order they were logged; other threads' lines go out at once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

from nomaflowd.text import escape

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_held = threading.local()  # .lines: this thread's formatted lines, while batched()


class OneLineFormatter(logging.Formatter):
    """One record per line: control characters in a message (a newline in a recipient or a
    job name from an event file) are escaped, so no value can forge a record. A traceback
    appended by logger.exception keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        # Backslashes stay: the values that may hold them (names, reasons) were escaped
        # where they were logged, as in the rejected files' notes; doubling them again
        # made the journal and the note disagree.
        record.message = escape(record.message, backslash=False)
        return super().formatMessage(record)


class LineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """StreamHandler that holds this thread's lines while batched() is open."""

    def emit(self, record: logging.LogRecord) -> None:
        lines: list[tuple[LineHandler, str]] | None = getattr(_held, "lines", None)
        if lines is None:
            super().emit(record)
            return
        try:
            lines.append((self, self.format(record) + self.terminator))
        except Exception:  # as StreamHandler.emit: a bad record must not sink the caller
            self.handleError(record)

    def write_all(self, text: str) -> None:
        self.acquire()
        try:
            self.stream.write(text)
            self.flush()
        except Exception:
            self.handleError(logging.makeLogRecord({"msg": text[:200]}))
        finally:
            self.release()


def setup(level: int, stream: TextIO) -> None:
    # Not in our format: skip them (a getpid() system call and two look-ups per record).
    logging.logProcesses = logging.logMultiprocessing = logging.logThreads = False
    handler = LineHandler(stream)
    handler.setFormatter(OneLineFormatter(FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    # peewee logs every statement with its parameters at DEBUG: not what NOMAFLOWD_DEBUG is
    # for, and formatting them inflated the commit stage that bench/stages.py reports.
    logging.getLogger("peewee").setLevel(logging.INFO)


@contextmanager
def batched() -> Iterator[None]:
    """This thread's log lines inside the block leave in one write when it ends (also when
    it ends by an exception). Nested blocks join the outer one."""
    if getattr(_held, "lines", None) is not None:
        yield
        return
    lines: list[tuple[LineHandler, str]] = []
    _held.lines = lines
    try:
        yield
    finally:
        _held.lines = None
        handlers: dict[LineHandler, list[str]] = {}
        for handler, text in lines:
            handlers.setdefault(handler, []).append(text)
        for handler, texts in handlers.items():
            handler.write_all("".join(texts))
