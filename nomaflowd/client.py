"""Writing events into a spool, for `nomaflowd emit` and for job steps written in Python.

Needs only the spool path: no config, no key, no third-party package.

    from nomaflowd.client import notify
    notify("monthly report delivered", job_id="reporting-monthly", run_id=run_id)
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

_seq = itertools.count(1)


def drop(spool_dir: str | os.PathLike[str], event: dict[str, Any]) -> Path:
    """Write one event the protocol's way: temp name, fsync, rename to `*.json`."""
    spool = Path(spool_dir)
    if not spool.is_dir():
        raise FileNotFoundError(errno.ENOENT, "the spool directory does not exist (the daemon"
                                " creates it when it starts)")
    try:
        body = json.dumps(event, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the event holds text that is not valid Unicode (a lone surrogate);"
                         " the daemon would reject it") from None
    name = f"{time.time_ns()}-{os.getpid()}-{next(_seq)}-{uuid.uuid4().hex[:8]}.json"
    tmp_dir = spool / "tmp" if (spool / "tmp").is_dir() else spool
    tmp = tmp_dir / f".{name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
    try:
        # The whole event or an error: os.write() may write part of it (a disk filling
        # up), and a cut file renamed into the spool was quarantined as not JSON.
        with os.fdopen(fd, "wb") as fh:
            fh.write(body)
            fh.flush()
            os.fsync(fh.fileno())
        final = spool / name
        os.rename(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return final


def notify(message: str, *, job_id: str, run_id: str | None = None,
           recipients: list[str] | None = None, spool: str | None = None) -> Path:
    """Push a NOTICE from inside a step; the spool is `spool` or $NOMAFLOWD_SPOOL."""
    spool = spool or os.environ.get("NOMAFLOWD_SPOOL")
    if not spool:
        raise ValueError("pass spool= or set NOMAFLOWD_SPOOL to the daemon's spool directory")
    event: dict[str, Any] = {"job_id": job_id, "state": "NOTICE", "message": message}
    if run_id:
        event["run_id"] = run_id
    if recipients:
        event["recipients"] = list(recipients)
    return drop(spool, event)
