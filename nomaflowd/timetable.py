"""A job's schedule from jobs.toml (`schedule`, `timezone`): when its runs are expected.

Cron expressions are APScheduler 3's (CronTrigger.from_crontab), intervals its IntervalTrigger;
daylight-saving days are whatever that library makes of them (a time that does not exist is
taken an hour later, a time that happens twice is expected twice). Times in and out are naive
UTC, the database's convention.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

if TYPE_CHECKING:  # imported by parse(): a catalogue without schedules never loads APScheduler
    from apscheduler.triggers.base import BaseTrigger

NICKNAMES = {"@hourly": "0 * * * *", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
             "@weekly": "0 0 * * 0", "@monthly": "0 0 1 * *", "@yearly": "0 0 1 1 *",
             "@annually": "0 0 1 1 *"}
# Intervals are counted from a fixed origin, so every replica and every restart expects the
# same instants (an origin at "first seen" would differ between replicas).
ORIGIN = datetime(2000, 1, 1, tzinfo=UTC)
_UNIT_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_DURATION = re.compile(r"(?:[0-9]+[dhms])+")
_PART = re.compile(r"([0-9]+)([dhms])")
# crontab counts weekdays from Sunday = 0 (7 too); APScheduler 3 from Monday = 0. Names are
# the same in both, so numbers are turned into names before APScheduler sees them.
_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


@dataclass(frozen=True)
class Schedule:
    text: str
    timezone: str
    trigger: BaseTrigger = field(compare=False, repr=False)

    @property
    def spec(self) -> str:
        """What identifies it in the database: a change restarts monitoring."""
        return f"{self.text} ({self.timezone})"

    def next_after(self, t: datetime) -> datetime:
        """The first expected time strictly after `t` (naive UTC)."""
        start = t.replace(tzinfo=UTC) + timedelta(microseconds=1)
        found = self.trigger.get_next_fire_time(None, start)
        if found is None:  # not for cron or intervals; a guard against an endless wait
            return datetime.max
        nxt = found.astimezone(UTC).replace(tzinfo=None)
        return nxt if nxt > t else t + timedelta(seconds=1)


def every_seconds(text: str) -> int:
    """`90s`, `1h30m`, `2d` -> seconds; ValueError otherwise."""
    if not _DURATION.fullmatch(text):
        raise ValueError("write a duration such as 90s, 15m or 1h30m")
    seconds = sum(int(n) * _UNIT_SECONDS[unit] for n, unit in _PART.findall(text))
    if seconds < 1:
        raise ValueError("the interval must be at least 1s")
    if seconds > 366 * 86400:  # longer overflowed the scheduler's dates
        raise ValueError("the interval must be at most 366d")
    return seconds


def _weekday(value: str) -> int:
    if value.isdigit() and int(value) <= 7:
        return int(value) % 7
    if value.lower() in _DAYS:
        return _DAYS.index(value.lower())
    raise ValueError(f"day of week {value!r} is not 0-7 or sun-sat")


def cron_weekdays(text: str) -> str:
    """A crontab day-of-week field as APScheduler 3 reads it (names, never numbers)."""
    if text in ("*", "?"):
        return "*"
    days: set[int] = set()
    for item in text.split(","):
        span, _, step_text = item.partition("/")
        step = int(step_text) if step_text.isdigit() and int(step_text) > 0 else None
        if step_text and step is None:
            raise ValueError(f"day of week step {step_text!r} is not a positive number")
        if span == "*":
            low, high = 0, 6
        elif "-" in span:
            a, b = span.split("-", 1)
            low, high = _weekday(a), _weekday(b)
            if b == "7":
                high = 7
        else:
            low = high = _weekday(span)
            if step:
                high = 6
        if low > high:
            raise ValueError(f"day of week range {span!r} runs backwards")
        days.update(d % 7 for d in range(low, high + 1, step or 1))
    return ",".join(_DAYS[d] for d in sorted(days))


def parse(text: object, timezone: object, where: str) -> Schedule:
    """Validate `schedule` and `timezone`; ValueError naming the key."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}.schedule must be a cron expression such as \"0 2 * * *\","
                         " @hourly/@daily/@weekly/@monthly, or \"@every 90s\"")
    if timezone is None:
        timezone = "UTC"
    if not isinstance(timezone, str):
        raise ValueError(f"{where}.timezone must be an IANA time zone name such as"
                         " \"Europe/Paris\"")
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{where}.timezone {timezone!r} is not a known IANA time zone"
                         " (e.g. \"Europe/Paris\", \"UTC\")") from None
    expr = " ".join(text.split())
    from apscheduler.triggers.cron import CronTrigger
    from apscheduler.triggers.interval import IntervalTrigger

    trigger: BaseTrigger
    try:
        if expr.startswith("@every"):
            seconds = every_seconds(expr[len("@every"):].strip())
            trigger = IntervalTrigger(seconds=seconds, start_date=ORIGIN, timezone=UTC)
        else:
            fields = NICKNAMES.get(expr, expr).split()
            if len(fields) != 5:
                raise ValueError(f"it has {len(fields)} fields; cron needs 5 (minute hour"
                                 " day month weekday) or a nickname such as @daily")
            fields[4] = cron_weekdays(fields[4])
            trigger = CronTrigger.from_crontab(" ".join(fields), timezone=zone)
    except ValueError as exc:
        raise ValueError(f"{where}.schedule {text!r} is not valid: {exc}") from None
    return Schedule(expr, timezone, trigger)
