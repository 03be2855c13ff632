"""Spool event files: parse bytes into an Event, or raise Rejected with the reason."""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from nomaflowd.errors import Rejected

if TYPE_CHECKING:
    from nomaflowd.catalogue import AlertsBlock

MAX_BYTES = 1024 * 1024
RUN_STATES = ("RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")
FINAL_STATES = ("SUCCEEDED", "FAILED", "CANCELLED")
TOGGLE_STATES = ("ENABLED", "DISABLED")
STATES = (*RUN_STATES, *TOGGLE_STATES, "NOTICE")
STRING_FIELDS = ("job_id", "state", "message", "run_id", "event_id", "triggered_by", "step",
                 "error", "traceback", "by")
TIME_FIELDS = ("at", "started_at", "finished_at")
FUTURE_SLACK = timedelta(minutes=5)  # how far ahead of ours a runner's clock may be
LIST_FIELDS = ("recipients", "tags")
INT_FIELDS = ("attempt", "max_attempts")
KNOWN = frozenset((*STRING_FIELDS, *TIME_FIELDS, *LIST_FIELDS, *INT_FIELDS, "alerts"))
# The documented limit of job_id, run_id, event_id and a recipient: well inside the varchar(300)
# columns, so a long id is refused here with its reason on SQLite and PostgreSQL alike.
ID_MAX = 200
# Recipients one event file may name: each is a delivery, and 3,000 channels behind one
# Slack transport held every other job's alert behind them for most of an hour.
MAX_RECIPIENTS = 20
# RFC 3339 section 5.6 with upper-case T and Z. fromisoformat alone also takes ISO 8601 forms that
# other writers' parsers refuse: 2026-05-26T02Z, +0000, +01:60, week dates, " +00:00".
RFC3339 = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?"
                     r"(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])")


@dataclass(frozen=True)
class Event:
    event_id: str
    job_id: str
    state: str
    run_id: str | None
    at: datetime                      # naive UTC, like every stored timestamp
    started_at: datetime | None
    finished_at: datetime | None
    fields: dict[str, Any]            # the validated object as received
    payload: str                      # the JSON text as received
    alerts: AlertsBlock | None
    tags: tuple[str, ...] | None
    # Times the runner's clock put past FUTURE_SLACK ahead of ours, as written: each is
    # taken as the time the file was read instead.
    ahead: tuple[tuple[str, str], ...] = ()

    def get(self, key: str) -> Any:
        return self.fields.get(key)

    @property
    def retrying(self) -> bool:
        """A FAILED attempt that will be retried (SPEC §12): not final, the run goes on."""
        attempt, most = self.fields.get("attempt"), self.fields.get("max_attempts")
        return (self.state == "FAILED" and isinstance(attempt, int)
                and isinstance(most, int) and attempt < most)


def utc(dt: datetime) -> datetime:
    """Aware -> naive UTC (the database's convention)."""
    return dt.astimezone(UTC).replace(tzinfo=None) if dt.tzinfo else dt


def parse_time(value: Any, key: str) -> datetime:
    if not isinstance(value, str):
        raise Rejected(f"{key} must be an RFC 3339 time string")
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise Rejected(f"{key} is not an RFC 3339 time: {value[:40]!r}") from None
    if dt.tzinfo is None or not RFC3339.fullmatch(value):
        raise Rejected(f"{key} needs a date, a time and a UTC offset (e.g. 2026-05-26T02:00:00Z)")
    try:
        return utc(dt)
    except OverflowError:  # 0001-01-01T00:00:00+01:00 is before year 1 in UTC
        raise Rejected(f"{key} is out of range once converted to UTC: {value[:40]!r}") from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise Rejected(f"key {key[:40]!r} appears twice")
        obj[key] = value
    return obj


def _no_constants(name: str) -> Any:
    raise Rejected(f"{name} is not valid JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 would otherwise arrive as inf
        raise Rejected(f"number {text[:40]} is out of range")
    return value


def decode(raw: bytes) -> tuple[dict[str, Any], str]:
    """Bytes -> (object, text); every failure is Rejected."""
    if len(raw) > MAX_BYTES:
        raise Rejected(f"file is larger than {MAX_BYTES} bytes")
    if not raw.strip():
        raise Rejected("file is empty")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Rejected(f"not UTF-8 (byte {exc.start})") from None
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants,
                         parse_float=_finite)
    except json.JSONDecodeError as exc:
        raise Rejected(f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise Rejected("JSON nested too deeply") from None
    except ValueError as exc:  # e.g. an integer beyond Python's digit limit
        raise Rejected(f"not acceptable JSON: {str(exc)[:80]}") from None
    if not isinstance(obj, dict):
        raise Rejected(f"top level must be a JSON object, not {type(obj).__name__}")
    return obj, text


def storable(obj: Any) -> None:
    """Reject a string the database cannot store (NUL) or encode (a lone surrogate), anywhere.

    JSON lets both through as \\u0000 and \\ud800; PostgreSQL refuses the first and every
    UTF-8 encoder the second, and either error would otherwise surface at commit time as a
    failed batch instead of this one file's reason.
    """
    stack: list[tuple[Any, str]] = [(obj, "")]
    while stack:  # iterative: the decoder allows nesting deeper than our own recursion would
        value, where = stack.pop()
        if isinstance(value, str):
            if "\0" in value:
                raise Rejected(f"{where or 'a key'} holds a NUL character (\\u0000), which"
                               " cannot be stored")
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError as exc:
                    raise Rejected(f"{where or 'a key'} holds a lone surrogate"
                                   f" (\\u{ord(value[exc.start]):04x}), which is not UTF-8"
                                   " text") from None
        elif isinstance(value, dict):
            for key, item in value.items():
                stack.append((key, f"a key of {where}" if where else "a key"))
                label = key if key.isidentifier() else repr(key[:40])
                stack.append((item, f"{where}.{label}" if where else label))
        elif isinstance(value, list):
            stack.extend((item, f"{where}[{i}]") for i, item in enumerate(value))


def _recipients_fit(values: list[str], where: str) -> None:
    if len(values) > MAX_RECIPIENTS:
        raise Rejected(f"{where} names {len(values)} recipients; an event file may name at"
                       f" most {MAX_RECIPIENTS} (list more in jobs.toml)")
    for i, value in enumerate(values):
        if len(value) > ID_MAX:
            raise Rejected(f"{where}[{i}] is {len(value)} characters; the limit is {ID_MAX}")


def default_event_id(job_id: str, run_id: str | None, state: str, name: str,
                     raw: bytes, attempt: int | None = None) -> str:
    """job/run/STATE (job/run/STATE/attempt when the event names its attempt) for run events,
    job/state/digest of name and content for the others.

    The id must fit ID_MAX like a written one: a run event whose job/run/STATE would not
    gets STATE/digest of job and run instead (still the same id for the same transition).
    """
    if state in RUN_STATES and run_id:
        # Each attempt of a retried run is its own transition: attempt 1's FAILED must not
        # swallow attempt 3's.
        suffix = f"/{attempt}" if attempt is not None else ""
        event_id = f"{job_id}/{run_id}/{state}{suffix}"
        if len(event_id) <= ID_MAX:
            return event_id
        digest = hashlib.sha256(f"{job_id}\0{run_id}".encode()).hexdigest()
        return f"{state}/{digest}{suffix}"
    # surrogatepass: undecodable names (b"\xff.json" -> "\udcff.json") stay distinct
    named = name.encode("utf-8", "surrogatepass")
    digest = hashlib.sha256(named + b"\0" + raw).hexdigest()
    event_id = f"{job_id}/{state.lower()}/{digest[:32]}"
    return event_id if len(event_id) <= ID_MAX else f"{state.lower()}/{digest}"


# A file older than this when read waited in the spool (the daemon or its database was
# down): it happened when it was written.
WAITED = timedelta(minutes=1)


def written_at(mtime: float) -> datetime:
    """A file's modification time as the naive UTC the events use."""
    return datetime.fromtimestamp(mtime, UTC).replace(tzinfo=None)


def parse(raw: bytes, name: str, received_at: datetime,
          written_at: datetime | None = None) -> Event:
    """Validate one spool file's bytes; `name` feeds the default event_id of notices.

    `at` defaults to `received_at`, or to `written_at` (the file's modification time), which
    the caller gives for a file that waited in the spool longer than WAITED: a run that
    reported while the daemon was down happened then, not when the backlog was read after
    the restart (it was called missed). Not for every file: file times are coarse (a few
    ms), and a failure stamped so could seem older than the success read just before it.
    """
    obj, text = decode(raw)
    # A NUL or a lone surrogate can only come from a \u escape: the decoder refuses a raw
    # control character in a string, and UTF-8 has no surrogates. Without one, the walk
    # (a sixth of a backlog event's CPU) has nothing to find.
    if "\\u" in text:
        storable(obj)
    unknown = sorted(set(obj) - KNOWN)
    if unknown:
        raise Rejected(f"unknown key {unknown[0][:40]!r}")
    for key in STRING_FIELDS:
        if key in obj and not isinstance(obj[key], str):
            raise Rejected(f"{key} must be a string")
    for key in LIST_FIELDS:
        if key in obj and (
            not isinstance(obj[key], list) or not all(isinstance(v, str) for v in obj[key])
        ):
            raise Rejected(f"{key} must be a list of strings")
    for key in ("job_id", "state"):
        if not obj.get(key):
            raise Rejected(f"{key} is required")
    state = obj["state"]
    if state not in STATES:
        raise Rejected(f"state {state[:40]!r} is not one of {', '.join(STATES)}")
    for key in ("job_id", "run_id", "event_id"):
        value = obj.get(key)
        if value is not None and len(value) > ID_MAX:
            raise Rejected(f"{key} is {len(value)} characters; the limit is {ID_MAX}")
        if value is not None and (
            not value or not value.isprintable() or value != value.strip()
        ):
            raise Rejected(f"{key} must be 1-{ID_MAX} printable characters without edge spaces")
    for key in INT_FIELDS:
        value = obj.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 10_000:
            raise Rejected(f"{key} must be an integer from 1 to 10000")
        if state != "FAILED":
            raise Rejected(f"{key} is only for FAILED events (a failure that may be retried)")
    run_id = obj.get("run_id")
    if state in RUN_STATES and not run_id:
        raise Rejected(f"run_id is required for a {state} event")
    if state == "NOTICE" and not obj.get("message"):
        raise Rejected("message is required for a NOTICE event")
    if "recipients" in obj and state != "NOTICE":
        raise Rejected("recipients is only for NOTICE events; use alerts.recipients")
    times = {key: parse_time(obj[key], key) for key in TIME_FIELDS if key in obj}
    # A runner's clock ahead of ours: a finish in 2031 would order this run after every
    # later one, each real success until then "late", and an incident it opened would never
    # be closed. Past FUTURE_SLACK, the time the file was read stands in for it.
    ahead = tuple((key, str(obj[key])) for key, t in times.items()
                  if t > received_at + FUTURE_SLACK)
    for key, _ in ahead:
        times[key] = received_at
    # Here, not at import: the CLI's commands that never parse an event (audit: bench g) skip
    # the catalogue's imports (time zones, cron), 9 ms of their start.
    from nomaflowd.catalogue import parse_alerts, parse_tags
    try:
        alerts = parse_alerts(obj["alerts"], "alerts") if "alerts" in obj else None
        tags = parse_tags(obj["tags"], "tags") if "tags" in obj else None
        if state == "NOTICE" and "recipients" in obj:
            parse_alerts({"recipients": obj["recipients"]}, "notice")
            _recipients_fit(obj["recipients"], "recipients")
        if alerts is not None:
            _recipients_fit(list(alerts.recipients), "alerts.recipients")
    except ValueError as exc:
        raise Rejected(str(exc)) from None
    event_id = obj.get("event_id") or default_event_id(obj["job_id"], run_id, state, name, raw,
                                                       obj.get("attempt"))
    return Event(
        event_id=event_id,
        job_id=obj["job_id"],
        state=state,
        run_id=run_id,
        at=times.get("at", min(written_at, received_at) if written_at else received_at),
        started_at=times.get("started_at"),
        finished_at=times.get("finished_at"),
        fields=obj,
        payload=text,
        alerts=alerts,
        tags=tags,
        ahead=ahead,
    )
