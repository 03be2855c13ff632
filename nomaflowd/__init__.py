"""nomaflowd: the notification sidecar of Nomaflow."""

from __future__ import annotations

__version__ = "0.1.0"
