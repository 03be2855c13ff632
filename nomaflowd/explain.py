"""`nomaflowd explain`: why did (or didn't) this event page someone? Sends nothing."""

from __future__ import annotations

import json
from datetime import datetime

from nomaflowd import db, incidents, schedules
from nomaflowd.config import Config
from nomaflowd.events import Event
from nomaflowd.policy import Policy, Routed
from nomaflowd.transports import build


def explain(cfg: Config, event: Event, *, history: str | None = None,
            now: datetime | None = None) -> str:
    """The dry run. `history` None: the database is open (incident state and learned
    thresholds are read from it); otherwise the reason it is not."""
    now = now or db.utcnow()  # the database stores naive UTC
    policy = Policy(cfg)
    cat = policy.current()
    eff = cat.effective(event.job_id, event.alerts, event.tags)
    out = [f"event {event.event_id}: job {event.job_id}, state {event.state}"
           + (f", run {event.run_id}" if event.run_id else "")]
    out.append(f"alerts block (from {eff.alerts_origin}): {json.dumps(eff.alerts.as_dict())}")
    out.append(f"tags (from {eff.tags_origin}): {', '.join(eff.tags) or '(none)'}")
    writers = cat.writers(event.job_id)
    out.append("writers: " + (", ".join(writers) + " (a file owned by anyone else is rejected)"
                              if writers is not None else "anyone (no writers in jobs.toml)"))
    minutes = eff.alerts.on_long_run_minutes
    if event.state == "RUNNING" and isinstance(minutes, float):
        out.append(f"long-run warning after {minutes:g} min if still RUNNING")
    routed = policy.for_event(event, eff)
    if history is not None:
        out.append(f"incident state and learned threshold unknown: {history}")
    else:
        out.extend(incidents.describe(cfg, event.job_id, eff, now,
                                      would_send=event.state != "SUCCEEDED"))
        out.extend(schedules.describe(cat, event.job_id, now))
        if event.state == "SUCCEEDED" and event.run_id:
            upto = event.finished_at or event.at
            if not incidents.newer_finish(event.job_id, upto, event.run_id):
                ep = incidents.episode(event.job_id, upto, event.run_id)
                rec = incidents.plan_recovery(cfg, ep, event.run_id, eff.alerts.on_recovery)
                if rec.plan.targets:
                    alert = incidents.recovered_alert(cfg, event, rec.episode, now)
                    routed.append(Routed(alert, eff, rec.plan))
    if not routed:
        out.append(f"no alert: a {event.state} event alerts only when its alerts block asks"
                   " for it")
        return "\n".join(out)
    transports = build(cfg.transports, cfg.send_timeout_seconds)
    for r in routed:
        out.append(f"alert {r.alert.kind} (level {r.alert.level})")
        for rule in r.plan.rules:
            out.append(f"  matched {rule}")
        if r.alert.kind == "recovered":
            out.append("  to whoever got the failure (audit and delivery rows of the episode)")
        elif not r.plan.rules and not event.get("recipients"):
            out.append("  no routing rule matched")
        for t in r.plan.targets:
            if t.error:
                out.append(f"  -> {t.written} ({t.origin}): NOT SENT, {t.error}")
                continue
            out.append(f"  -> {t.transport}: {t.recipient} ({t.origin})")
        for t in r.plan.duplicates:
            out.append(f"  dropped duplicate {t.written} ({t.origin}) = {t.transport}:"
                       f"{t.recipient}")
        for t in r.plan.skipped:
            out.append(f"  not sent to {t.transport}: {t.recipient} ({t.error})")
        for t in r.plan.targets:
            if t.error:
                continue
            transport = transports.get(t.transport)
            if transport is None:
                out.append(f"  {t.transport} is no longer configured: NOT SENT")
                continue
            rendered = transport.render(r.alert, t.recipient)
            out.append(f"  payload for {t.transport} -> {t.recipient} "
                       f"(to {transport.destination()}):")
            out.extend("    " + line for line in rendered.show(transport.mask))
    return "\n".join(out)
