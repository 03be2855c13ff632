"""Scenario a's floor: one process reading, parsing and unlinking a spool's files, no database.

    python bench/floor.py SPOOL_DIR

What nomaflowd's backlog ingest cannot beat on this machine: the same scan (names sorted),
the same safe read (O_NOFOLLOW, fstat, read), the same parser (nomaflowd.events.parse) and
an unlink per file, on one thread. Prints one JSON line: {"files": n, "loop_s": s} (the
caller times the process from spawn, as it times the daemon).
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path


def main() -> int:
    from nomaflowd.events import parse
    from nomaflowd.spool import Spool

    spool = Spool(Path(sys.argv[1]))
    t = time.monotonic()
    now = datetime.now(UTC).replace(tzinfo=None)
    names = spool.scan()
    for name in names:
        raw = spool.read(name)
        if raw is not None:
            parse(raw, name, now)
        os.unlink(os.path.join(spool.path, name))
    print(json.dumps({"files": len(names), "loop_s": time.monotonic() - t}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
