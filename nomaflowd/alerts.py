"""The Alert value object: what happened, how loud, and the words every transport shares."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class Kind:
    """What every transport says about one kind of alert."""

    level: str          # high | medium | low (SPEC section 5)
    word: str           # the email subject's word: [Nomaflow] FAILED job
    icon: str           # the summary line's first character
    colour: str | None  # the chat message's side colour (None: the platform's own)


KINDS: dict[str, Kind] = {
    "failed": Kind("high", "FAILED", "\u274c", "#d00000"),
    "long_run": Kind("medium", "LONG-RUNNING", "\u23f3", "#f2c744"),
    "succeeded": Kind("low", "SUCCEEDED", "\u2705", "#2eb67d"),
    "cancelled": Kind("low", "CANCELLED", "\U0001f6ab", None),
    "enabled": Kind("low", "ENABLED", "\u25b6\ufe0f", None),
    "disabled": Kind("low", "DISABLED", "\u23f8\ufe0f", None),
    "notice": Kind("low", "NOTICE", "\U0001f4e3", None),
    "recovered": Kind("low", "RECOVERED", "\U0001f7e2", "#2eb67d"),
    "test": Kind("low", "TEST", "\U0001f514", None),
    "missed": Kind("high", "MISSED", "\u23f0", "#d00000"),
    "stale": Kind("medium", "STALE", "\U0001f578\ufe0f", "#f2c744"),
    "reminder": Kind("high", "STILL FAILING", "\U0001f501", "#d00000"),
    "transport_failing": Kind("high", "TRANSPORT FAILING", "\U0001f4f5", "#d00000"),
    "transport_restored": Kind("low", "TRANSPORT RESTORED", "\U0001f4f6", "#2eb67d"),
}


# Kinds about a job or a transport, not about one run.
JOB_LEVEL = frozenset({"test", "missed", "stale", "reminder", "transport_failing",
                       "transport_restored"})

# Event fields an alert carries to its transports (all optional strings).
DETAIL_FIELDS = ("triggered_by", "step", "error", "traceback", "by", "message")


def span(minutes: float) -> str:
    """A duration as people say it: `40 s`, `47 min`, `3 h 10 min`, `4 days`."""
    if minutes < 1:
        return f"{max(0, round(minutes * 60))} s"
    if minutes < 120:
        return f"{round(minutes)} min"
    if minutes < 48 * 60:
        hours, rest = divmod(round(minutes), 60)
        return f"{hours} h" + (f" {rest} min" if rest else "")
    return f"{round(minutes / 1440)} days"


def rfc3339(dt: datetime | None) -> str | None:
    """RFC 3339 in UTC (isoformat pads a year before 1000: strftime's %Y does not)."""
    return dt.replace(microsecond=0).isoformat() + "Z" if dt else None


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
    # long_run: running for; recovered, reminder: since the first failure; stale: since the
    # last success; missed: the on_missed_minutes allowed
    minutes: float | None = None
    # recovered, reminder: failed runs in the episode; missed: scheduled times missed;
    # transport_failing / _restored: failures in a row
    failures: int | None = None
    usual_minutes: float | None = None  # long_run with "auto": the job's usual duration
    # Slack app mode: the failure episode's thread for one transport and recipient
    # (episode, ts, channel, text), set by threads.attach() just before sending.
    thread: dict[str, str] | None = None

    @classmethod
    def stored(cls, values: dict[str, Any]) -> Alert:
        """An alert from a claim's context. A field this version does not know (the claim
        was made by a newer one) is left out; a missing or unknown kind raises."""
        known = {k: v for k, v in values.items() if k in _ALERT_FIELDS}
        if known.get("kind") not in KINDS:
            raise ValueError(f"unknown alert kind {str(known.get('kind'))[:40]!r}")
        return cls(**known)

    @property
    def level(self) -> str:
        return KINDS[self.kind].level

    @property
    def colour(self) -> str | None:
        return KINDS[self.kind].colour

    @property
    def subject_word(self) -> str:
        return KINDS[self.kind].word

    @property
    def link_text(self) -> str:
        """The label of the link to `url` (a test, a missed run... have no run: the link goes to
        Nomaflow itself)."""
        return "View run" if self.run_id or self.kind not in JOB_LEVEL else "Open Nomaflow"

    def get(self, name: str) -> str:
        return self.details.get(name) or ""

    def summary_parts(self) -> tuple[str, list[str]]:
        """(icon, pieces): the one-line summary before any transport-specific escaping."""
        job, by = self.job_id, self.get("by")
        if self.kind == "failed":
            step = self.get("step")
            head = f"{job} run failed" + (f" at step {step}" if step else "")
            attempt, most = self.get("attempt"), self.get("max_attempts")
            if attempt and most and int(attempt) < int(most):
                head += f" (attempt {attempt} of {most}; it will be retried)"
            elif attempt and int(attempt) > 1:
                head += f" after {attempt} attempts"
            pieces = [head] + ([self.get("error")] if self.get("error") else [])
        elif self.kind == "long_run" and self.usual_minutes is not None:
            pieces = [f"{job} run still running: usually {span(self.usual_minutes)},"
                      f" now {span(self.minutes or 0)}"]
        elif self.kind == "long_run":
            pieces = [f"{job} run still running after {round(self.minutes or 0)} min"]
        elif self.kind == "recovered" and self.failures:
            runs = "run" if self.failures == 1 else "runs"
            pieces = [f"{job} recovered after {self.failures} failed {runs}"
                      f" (first failure {span(self.minutes or 0)} ago)"]
        elif self.kind == "recovered":
            after = self.get("after") or "its long-run warning"
            pieces = [f"{job} run succeeded after {after}"]
        elif self.kind == "succeeded":
            pieces = [f"{job} run succeeded"]
        elif self.kind == "cancelled":
            pieces = [f"{job} run cancelled" + (f" by {by}" if by else "")]
        elif self.kind in ("enabled", "disabled"):
            pieces = [f"{job} {self.kind}" + (f" by {by}" if by else "")]
        elif self.kind == "notice":
            pieces = [f"{job}: {self.get('message')}"]
        elif self.kind in ("missed", "stale", "reminder", "transport_failing",
                           "transport_restored"):
            pieces = self.schedule_pieces()
        else:
            pieces = ["test from Nomaflow"]
        return KINDS[self.kind].icon, pieces

    def schedule_pieces(self) -> list[str]:
        """The summary of the alerts of SPEC §12 (what is expected, and what broke)."""
        job, n = self.job_id, self.failures or 0
        if self.kind == "missed" and n > 1:
            return [f"{job} missed {n} scheduled runs ({self.get('expected')} to"
                    f" {self.get('last_expected')}); no run started within"
                    f" {span(self.minutes or 0)} of them"]
        if self.kind == "missed":
            return [f"{job} did not run at {self.get('expected')}: no run started within"
                    f" {span(self.minutes or 0)}"]
        if self.kind == "stale":
            since = self.get("last_success")
            return [f"{job} has not succeeded for {span(self.minutes or 0)}"
                    + (f" (last success {since})" if since else
                       " (no success since monitoring began)")]
        if self.kind == "reminder":
            runs = "run" if n == 1 else "runs"
            pieces = [f"{job} still failing for {span(self.minutes or 0)}: {n} failed {runs}"
                      f" (reminder {self.get('reminder')})"]
            return pieces + ([self.get("error")] if self.get("error") else [])
        name = self.get("transport")
        if self.kind == "transport_restored":
            return [f"transport {name} delivers again after {n} failed attempts"]
        pieces = [f"transport {name} failed {n} times in a row", self.get("error")]
        if self.get("undelivered"):
            pieces.append(f"not delivered: {self.get('undelivered')}")
        return pieces

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


_ALERT_FIELDS = frozenset(f.name for f in fields(Alert))


def alert_key(*parts: str) -> str:
    """The de-duplication key of an alert, e.g. (job, run, kind): each part prefixed by its
    length, so that no choice of ids makes two alerts' keys equal. Joined with a bare `/`,
    job "etl", run "orders/42" and job "etl/orders", run "42" shared one key, and one job's
    event took the claim of the other's alert."""
    return "/".join(f"{len(part)}:{part}" for part in parts)


def from_event(kind: str, event: Any, url: str, *, minutes: float | None = None) -> Alert:
    """Build the alert of one kind for an events.Event."""
    if event.run_id and kind not in ("notice",):
        if getattr(event, "retrying", False):  # the final attempt keeps job/run/failed
            key = alert_key(event.job_id, event.run_id, kind, f"attempt-{event.get('attempt')}")
        else:
            key = alert_key(event.job_id, event.run_id, kind)
    else:
        key = alert_key(event.job_id, event.event_id, kind)  # event ids are per job
    details = {k: event.get(k) for k in DETAIL_FIELDS if event.get(k)}
    details.update({k: str(event.get(k)) for k in ("attempt", "max_attempts")
                    if isinstance(event.get(k), int)})
    return Alert(
        kind=kind,
        key=key,
        job_id=event.job_id,
        run_id=event.run_id,
        event_id=event.event_id,
        state=event.state,
        url=url,
        started_at=rfc3339(event.started_at),
        finished_at=rfc3339(event.finished_at),
        details=details,
        minutes=minutes,
    )


def test_alert(url: str = "") -> Alert:
    return Alert(kind="test", key="test", job_id="", run_id=None, event_id=None, state="TEST",
                 url=url)


# Worst first, for digests.
SEVERITY = ("transport_failing", "failed", "missed", "reminder", "long_run", "stale",
            "cancelled", "disabled", "enabled", "recovered", "transport_restored", "succeeded",
            "notice", "test")
KIND_WORDS = {"failed": "failed", "long_run": "long-running", "succeeded": "succeeded",
              "cancelled": "cancelled", "enabled": "enabled", "disabled": "disabled",
              "notice": "notice", "recovered": "recovered", "test": "test",
              "missed": "missed", "stale": "stale", "reminder": "still failing",
              "transport_failing": "transport failing",
              "transport_restored": "transport restored"}


def _rank(kind: str) -> int:
    return SEVERITY.index(kind) if kind in SEVERITY else len(SEVERITY)


def digest_headline(alerts: list[Alert]) -> str:
    """`212 alerts held back by the rate limit: 200 failed, 12 long-running`."""
    counts: dict[str, int] = {}
    for a in alerts:
        counts[a.kind] = counts.get(a.kind, 0) + 1
    parts = ", ".join(f"{n} {KIND_WORDS.get(k, k)}"
                      for k, n in sorted(counts.items(), key=lambda kv: _rank(kv[0])))
    return f"{len(alerts)} alerts held back by the rate limit: {parts}"


def digest_by_job(alerts: list[Alert]) -> list[tuple[str, list[Alert]]]:
    """Alerts grouped by job, the job with the worst alert first."""
    jobs: dict[str, list[Alert]] = {}
    for a in alerts:
        jobs.setdefault(a.job_id, []).append(a)
    return sorted(jobs.items(), key=lambda kv: (min(_rank(a.kind) for a in kv[1]), kv[0]))


def digest_line(job: str, alerts: list[Alert]) -> tuple[str, list[str]]:
    """(icon, pieces) of one job's line: `job: 3 failed (latest run r9) · error`."""
    worst = min(alerts, key=lambda a: _rank(a.kind))
    kinds: dict[str, int] = {}
    for a in alerts:
        kinds[a.kind] = kinds.get(a.kind, 0) + 1
    what = ", ".join(f"{n} {KIND_WORDS.get(k, k)}" if n > 1 else KIND_WORDS.get(k, k)
                     for k, n in sorted(kinds.items(), key=lambda kv: _rank(kv[0])))
    latest = alerts[-1]
    pieces = [f"{job}: {what}" + (f" (latest run {latest.run_id})" if latest.run_id else "")]
    if worst.get("error"):
        pieces.append(worst.get("error"))
    return KINDS[worst.kind].icon if worst.kind in KINDS else "", pieces
