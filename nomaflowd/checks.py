"""`nomaflowd check`: the seed's common pitfalls, found before a real failure finds them."""

from __future__ import annotations

import os
import pwd
import stat
import statistics
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

from nomaflowd import catalogue, db, incidents
from nomaflowd.alerts import span
from nomaflowd.config import Config, read_toml
from nomaflowd.crypto import key_path
from nomaflowd.errors import ConfigError
from nomaflowd.routing import Router
from nomaflowd.timetable import Schedule


def run_checks(cfg: Config, *, history: bool = False) -> list[tuple[str, str]]:
    """(level, text) pairs; level is "error" or "warning".

    history: the database is open, so thresholds can be compared with real durations.
    """
    problems: list[tuple[str, str]] = []
    if not cfg.transports:
        problems.append(("error", "no transports configured: no alert can reach anyone"))
    if not cfg.base_url:
        problems.append(("warning", "daemon.base_url is empty: alerts carry no run link"))
    if "://" in cfg.database and urlsplit(cfg.database).password:
        # Not an enc: token: runners' `emit` and `audit` open the database without the key.
        problems.append(("warning", "daemon.database holds a password in plaintext, in a file"
                         " runners may read; leave it out of the URL and give it in a"
                         " ~/.pgpass file of the daemon's user, or as PGPASSWORD in the unit's"
                         " environment"))
    try:
        cat = catalogue.load(cfg.jobs_file)
    except ConfigError as exc:
        problems.append(("error", str(exc)))
        cat = catalogue.Catalogue()
    if not cfg.jobs_file.exists():
        problems.append(("warning", f"{cfg.jobs_file} not found: every job gets the built-in"
                         " policy (alert on failure to every transport's default recipient)"))
    else:
        problems += [("warning", f"jobs.toml: [{found}] is not read; did you mean [{meant}]?")
                     for found, meant in near_misses(cfg.jobs_file)]
    router = Router.from_config(cfg)

    def recipients(where: str, values: tuple[str, ...]) -> None:
        for value in values:
            target = router.classify(value, where)
            if target.error:
                problems.append(("error", f"{where}: {target.error}"))

    for i, rule in enumerate(cfg.routing):
        recipients(f"routing[{i}]", rule.recipients)
    recipients("daemon.fallback_recipients", cfg.fallback_recipients)
    if cfg.transports and not cfg.fallback_recipients:
        problems.append(("warning", "daemon.fallback_recipients is empty: when a transport keeps"
                         " failing (a revoked webhook, a dead relay), nobody is told"))
    if cat.default_alerts:
        recipients("defaults.alerts.recipients", cat.default_alerts.recipients)
    for job, block in cat.jobs_alerts.items():
        recipients(f"jobs.{job}.alerts.recipients", block.recipients)
        if isinstance(block.on_long_run_minutes, float) and block.on_long_run_minutes < 2:
            problems.append(("warning", f"jobs.{job}.alerts.on_long_run_minutes is"
                             f" {block.on_long_run_minutes:g}: tune it to the job's normal"
                             " runtime plus headroom"))
    if history:
        problems.extend(threshold_checks(cat))
        problems.extend(start_delay_checks(cat))
    problems.extend(writer_checks(cat, cfg.spool_dir))
    for name, tc in cfg.transports.items():
        if tc.type == "slack" and tc.settings.get("bot_token") is not None \
                and not tc.settings.get("default_channel"):
            problems.append(("warning", f"transports.{name} is in app mode (bot_token) without"
                             " default_channel: an alert to its default recipient (no"
                             " recipients, `nomaflowd test` without --to) has no channel and"
                             " fails; set default_channel"))
        preset = tc.settings.get("preset") if tc.type == "webhook" else None
        if preset and tc.settings.get("body_template"):
            problems.append(("warning", f"transports.{name}.body_template is ignored: the"
                             f" {preset} preset sends that API's own body"))
    blocks = list(cat.jobs_alerts.values())
    loud = [b for b in blocks if b.on_success]
    if len(blocks) >= 4 and len(loud) * 2 > len(blocks):
        problems.append(("warning", f"on_success is on for {len(loud)} of {len(blocks)} jobs:"
                         " failures get lost among the green ticks"))
    key = key_path(cfg.key_file)
    if key.exists() and stat.S_IMODE(os.stat(key).st_mode) & 0o077:
        problems.append(("warning", f"{key} is readable by others; chmod 600 {key}"))
    if not cfg.spool_dir.is_dir():
        problems.append(("warning", f"spool {cfg.spool_dir} does not exist yet (run creates it)"))
    return problems


def threshold_checks(cat: catalogue.Catalogue) -> list[tuple[str, str]]:
    """A fixed on_long_run_minutes below what the job usually takes warns on every run."""
    problems: list[tuple[str, str]] = []
    for job in sorted(set(cat.jobs_alerts) | set(cat.jobs_tags)):
        eff = cat.effective(job)
        minutes = eff.alerts.on_long_run_minutes
        if not isinstance(minutes, float):
            continue
        learned = incidents.learn(job)
        if learned.usual is not None and minutes < learned.usual:
            where = f"jobs.{job}.alerts" if eff.alerts_origin == "job" else "defaults.alerts"
            problems.append(("warning", f"{where}.on_long_run_minutes is {minutes:g} for {job},"
                             f" which usually runs {span(learned.usual)} (median of its last"
                             f" {learned.samples} successful runs): most runs would warn;"
                             ' raise it or use "auto"'))
    return problems


def start_delay(schedule: Schedule, started: datetime) -> float | None:
    """Seconds from the scheduled time before `started` to `started` (None if none near)."""
    first = schedule.next_after(started)
    period = schedule.next_after(first) - first
    t = schedule.next_after(started - 2 * period)
    before = None
    while t <= started:
        before, t = t, schedule.next_after(t)
    return (started - before).total_seconds() if before is not None else None


def start_delay_checks(cat: catalogue.Catalogue, samples: int = 20) -> list[tuple[str, str]]:
    """on_missed_minutes shorter than the job's usual start delay: most runs would be
    called missed. The delay of each of its last runs is measured from the scheduled time
    before it started."""
    problems: list[tuple[str, str]] = []
    for job, schedule in sorted(cat.jobs_schedules.items()):
        minutes = cat.effective(job).alerts.on_missed_minutes
        if minutes is None:
            continue
        r = db.RunRow
        starts = [row.started_at for row in r.select(r.started_at).where(
            (r.job_id == job) & r.started_at.is_null(False))
            .order_by(r.started_at.desc()).limit(samples)]
        delays = [d for d in (start_delay(schedule, s) for s in starts) if d is not None]
        if len(delays) < 3:
            continue  # too few runs to say what is usual
        usual = statistics.median(delays)
        if minutes * 60 < usual:
            problems.append(("warning", f"jobs.{job}.alerts.on_missed_minutes is {minutes:g},"
                             f" but {job} usually starts {span(usual / 60)} after its"
                             f" scheduled time (median of its last {len(delays)} runs): most"
                             " runs would be called missed; raise it"))
    return problems


def writer_checks(cat: catalogue.Catalogue, spool_dir: Path) -> list[tuple[str, str]]:
    """Who may write which job's events: open doors and names this host does not know."""
    lists = {f"jobs.{job}.writers": w for job, w in cat.jobs_writers.items()}
    if cat.default_writers is not None:
        lists["defaults.writers"] = cat.default_writers
    if not lists:
        return [("warning", "jobs.toml names no writers: anyone who can write into the spool"
                 " may write events for any job; set [defaults] writers or [jobs.ID] writers")]
    problems: list[tuple[str, str]] = []
    if cat.default_writers is None:
        open_jobs = sorted((set(cat.jobs_alerts) | set(cat.jobs_tags)) - set(cat.jobs_writers))
        if open_jobs:
            problems.append(("warning", f"{len(open_jobs)} job(s) without writers (e.g."
                             f" {open_jobs[0]}) and no [defaults] writers: anyone who can write"
                             " into the spool may write their events, and those of any job"
                             " not in jobs.toml"))
    try:
        st = os.stat(spool_dir)
        setgid = st.st_gid if st.st_mode & stat.S_ISGID else None
    except OSError:
        setgid = None
    for where, writers in lists.items():
        for writer in writers:
            if writer.startswith("@"):
                group = catalogue.ACCOUNTS.group(writer[1:])
                if group is None:
                    problems.append(("warning", f"{where}: group {writer[1:]} does not exist on"
                                     " this host, so it admits nobody"))
                elif group[0] == setgid:
                    problems.append(("warning", f"{where}: {writer} is the spool's set-group-ID"
                                     " group, which every file in it takes: it admits anyone"
                                     " who can write into the spool"))
            else:
                try:
                    pwd.getpwnam(writer)
                except KeyError:
                    problems.append(("warning", f"{where}: user {writer} does not exist on this"
                                     " host, so it admits nobody"))
    return problems


# jobs.toml is Nomaflow's own catalogue: keys the daemon does not read are allowed, so a
# misspelt one is silent. These are the misspellings one letter away from what it reads.
_NEAR = {"default": "defaults", "job": "jobs"}
_NEAR_IN_BLOCK = {"alert": "alerts", "tag": "tags", "writer": "writers",
                  "schedules": "schedule", "time_zone": "timezone", "tz": "timezone"}


def near_misses(path: Path) -> list[tuple[str, str]]:
    """(written, meant) table or key names in jobs.toml that the daemon would not read."""
    try:
        data = read_toml(path, missing={})
    except ConfigError:
        return []  # said already, as an error
    found = [(k, v) for k, v in _NEAR.items() if k in data]
    blocks = [("defaults", data.get("defaults"))]
    jobs = data.get("jobs")
    if isinstance(jobs, dict):
        blocks += [(f"jobs.{job}", block) for job, block in jobs.items()]
    for where, block in blocks:
        if isinstance(block, dict):
            found += [(f"{where}.{k}", f"{where}.{v}") for k, v in _NEAR_IN_BLOCK.items()
                      if k in block and v not in block]
    return found

