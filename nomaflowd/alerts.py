"""The Alert value object: what happened, how loud, and the words every transport shares."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

LEVELS = {
    "failed": "high",
    "long_run": "medium",
    "succeeded": "low",
    "cancelled": "low",
    "enabled": "low",
    "disabled": "low",
    "notice": "low",
    "test": "low",
}
SUBJECT_WORDS = {
    "failed": "FAILED",
    "long_run": "LONG-RUNNING",
    "succeeded": "SUCCEEDED",
    "cancelled": "CANCELLED",
    "enabled": "ENABLED",
    "disabled": "DISABLED",
    "notice": "NOTICE",
    "test": "TEST",
}
ICONS = {
    "failed": "\u274c",
    "long_run": "\u23f3",
    "succeeded": "\u2705",
    "cancelled": "\U0001f6ab",
    "enabled": "\u25b6\ufe0f",
    "disabled": "\u23f8\ufe0f",
    "notice": "\U0001f4e3",
    "test": "\U0001f514",
}
# Event fields an alert carries to its transports (all optional strings).
DETAIL_FIELDS = ("triggered_by", "step", "error", "traceback", "by", "message")


def _iso(dt: datetime | None) -> str | None:
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ") if dt else None


@dataclass(frozen=True)
class Alert:
    kind: str
    key: str                      # what makes it "the same alert" for de-duplication
    job_id: str
    run_id: str | None
    event_id: str | None
    state: str
    url: str
    started_at: str | None = None
    finished_at: str | None = None
    details: dict[str, str] = field(default_factory=dict)
    minutes: float | None = None  # long_run: how long it has been running

    @property
    def level(self) -> str:
        return LEVELS[self.kind]

    @property
    def subject_word(self) -> str:
        return SUBJECT_WORDS[self.kind]

    @property
    def link_text(self) -> str:
        """The label of the link to `url` (a test has no run: it links to Nomaflow itself)."""
        return "Open Nomaflow" if self.kind == "test" else "View run"

    def get(self, name: str) -> str:
        return self.details.get(name) or ""

    def summary_parts(self) -> tuple[str, list[str]]:
        """(icon, pieces): the one-line summary before any transport-specific escaping."""
        job, by = self.job_id, self.get("by")
        if self.kind == "failed":
            step = self.get("step")
            head = f"{job} run failed" + (f" at step {step}" if step else "")
            pieces = [head] + ([self.get("error")] if self.get("error") else [])
        elif self.kind == "long_run":
            pieces = [f"{job} run still running after {round(self.minutes or 0)} min"]
        elif self.kind == "succeeded":
            pieces = [f"{job} run succeeded"]
        elif self.kind == "cancelled":
            pieces = [f"{job} run cancelled" + (f" by {by}" if by else "")]
        elif self.kind in ("enabled", "disabled"):
            pieces = [f"{job} {self.kind}" + (f" by {by}" if by else "")]
        elif self.kind == "notice":
            pieces = [f"{job}: {self.get('message')}"]
        else:
            pieces = ["test from Nomaflow"]
        return ICONS[self.kind], pieces

    def summary(self) -> str:
        icon, pieces = self.summary_parts()
        return " ".join([icon, " \u00b7 ".join(pieces)]).replace("\n", " ").replace("\r", " ")

    def variables(self) -> dict[str, str]:
        """Values for webhook bodies and templates."""
        return {
            "job_id": self.job_id,
            "run_id": self.run_id or "",
            "state": self.state,
            "triggered_by": self.get("triggered_by"),
            "started_at": self.started_at or "",
            "finished_at": self.finished_at or "",
            "error": self.get("error"),
            "step": self.get("step"),
            "url": self.url,
            "alert": self.kind,
            "level": self.level,
            "message": self.get("message"),
        }

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Alert:
        return cls(**json.loads(text))


def from_event(kind: str, event: Any, url: str, *, minutes: float | None = None) -> Alert:
    """Build the alert of one kind for an events.Event."""
    if event.run_id and kind not in ("notice",):
        key = f"{event.job_id}/{event.run_id}/{kind}"
    else:
        key = f"{event.event_id}/{kind}"
    details = {k: event.get(k) for k in DETAIL_FIELDS if event.get(k)}
    return Alert(
        kind=kind,
        key=key,
        job_id=event.job_id,
        run_id=event.run_id,
        event_id=event.event_id,
        state=event.state,
        url=url,
        started_at=_iso(event.started_at),
        finished_at=_iso(event.finished_at),
        details=details,
        minutes=minutes,
    )


def test_alert(url: str = "") -> Alert:
    return Alert(kind="test", key="test", job_id="", run_id=None, event_id=None, state="TEST",
                 url=url)
