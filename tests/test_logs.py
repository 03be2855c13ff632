"""The daemon's log handler: a batch's lines leave in one write, one record per line."""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Iterator

import pytest

from nomaflowd import logs


class Stderr(io.StringIO):
    """A text stream that keeps each write() apart, as the journal's socket sees them."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


@pytest.fixture
def stderr() -> Iterator[Stderr]:
    stream = Stderr()
    handler = logs.LineHandler(stream)
    handler.setFormatter(logs.OneLineFormatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("nomaflowd.test_logs")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield stream
    logger.removeHandler(handler)


def test_a_batch_of_lines_leaves_in_one_write_in_order(stderr):
    log = logging.getLogger("nomaflowd.test_logs")
    log.info("before")
    with logs.batched():
        log.info("one")
        log.warning("two\nFORGED line")
        with logs.batched():  # a nested block joins the outer one
            log.info("three")
        assert stderr.writes == ["INFO before\n"]  # nothing of the batch yet
    log.info("after")
    assert stderr.writes == ["INFO before\n",
                             "INFO one\nWARNING two\\nFORGED line\nINFO three\n",
                             "INFO after\n"]


def test_a_batch_that_ends_in_an_exception_still_writes_its_lines(stderr):
    log = logging.getLogger("nomaflowd.test_logs")
    with pytest.raises(RuntimeError), logs.batched():
        log.info("recorded")
        raise RuntimeError("database gone")
    assert stderr.getvalue() == "INFO recorded\n"


def test_another_threads_line_is_not_held_by_a_batch(stderr):
    log = logging.getLogger("nomaflowd.test_logs")
    with logs.batched():
        log.info("held")
        worker = threading.Thread(target=log.warning, args=("from a worker",))
        worker.start()
        worker.join()
        assert stderr.getvalue() == "WARNING from a worker\n"
    assert stderr.getvalue() == "WARNING from a worker\nINFO held\n"


def test_a_name_reads_in_the_log_as_in_its_note(stderr):
    """A rejected file's name is escaped once, as its note writes it: the journal showed
    `w-bad\\\\xff.json` where the note said `w-bad\\xff.json`, and grepping one for the
    other failed. A control character still cannot start a line."""
    from nomaflowd.text import escape

    name = "w-bad\udcff\udcfe.json"
    logger = logging.getLogger("nomaflowd.test_logs")
    logger.warning("spool file %s rejected: %s", escape(name), escape("not JSON"))
    logger.warning("raw %s", "a\nforged line\x1b[2K")
    assert stderr.getvalue() == ("WARNING spool file w-bad\\xff\\xfe.json rejected: not JSON\n"
                                 "WARNING raw a\\nforged line\\x1b[2K\n")
