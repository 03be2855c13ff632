"""The Python peer of scenario d: send N JSON webhooks with Apprise, as fast as it goes.

    python bench/apprise_peer.py URL COUNT TIME_LIMIT_SECONDS PREFIX

URL is an Apprise `json://127.0.0.1:PORT/path` URL. Each notification's body is
`PREFIX-<i>`, which the bench receiver records as the item id. Prints one JSON line:
{"sent": n, "ok": n, "elapsed": s, "version": "..."}; stops early at the time limit.
"""

from __future__ import annotations

import json
import logging
import sys
import time


def main() -> int:
    url, count, limit, prefix = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    try:
        import apprise
    except ImportError:
        print(json.dumps({"error": "apprise not installed: .venv/bin/pip install apprise"}))
        return 3
    logging.getLogger("apprise").setLevel(logging.CRITICAL)
    notifier = apprise.Apprise()
    if not notifier.add(url):
        print(json.dumps({"error": f"apprise refused the URL {url}"}))
        return 2
    sent = ok = 0
    started = time.monotonic()
    deadline = started + limit
    for i in range(count):
        if time.monotonic() >= deadline:
            break
        ok += bool(notifier.notify(title="FAILED bench-job", body=f"{prefix}-{i}"))
        sent += 1
    elapsed = time.monotonic() - started
    print(json.dumps({"sent": sent, "ok": ok, "elapsed": elapsed,
                      "version": getattr(apprise, "__version__", "?")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
