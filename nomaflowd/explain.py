"""`nomaflowd explain`: why did (or didn't) this event page someone? Sends nothing."""

from __future__ import annotations

import json

from nomaflowd.config import Config
from nomaflowd.daemon import Policy
from nomaflowd.events import Event
from nomaflowd.transports import build


def explain(cfg: Config, event: Event) -> str:
    policy = Policy(cfg)
    cat = policy.current()
    eff = cat.effective(event.job_id, event.alerts, event.tags)
    out = [f"event {event.event_id}: job {event.job_id}, state {event.state}"
           + (f", run {event.run_id}" if event.run_id else "")]
    out.append(f"alerts block (from {eff.alerts_origin}): {json.dumps(eff.alerts.as_dict())}")
    out.append(f"tags (from {eff.tags_origin}): {', '.join(eff.tags) or '(none)'}")
    minutes = eff.alerts.on_long_run_minutes
    if event.state == "RUNNING" and isinstance(minutes, float):
        out.append(f"long-run warning after {minutes:g} min if still RUNNING")
    routed = policy.for_event(event, cat)
    if not routed:
        out.append(f"no alert: a {event.state} event alerts only when its alerts block asks"
                   " for it")
        return "\n".join(out)
    transports = build(cfg.transports, cfg.send_timeout_seconds)
    for r in routed:
        out.append(f"alert {r.alert.kind} (level {r.alert.level})")
        for rule in r.plan.rules:
            out.append(f"  matched {rule}")
        if not r.plan.rules and not event.get("recipients"):
            out.append("  no routing rule matched")
        for t in r.plan.targets:
            if t.error:
                out.append(f"  -> {t.written} ({t.origin}): NOT SENT, {t.error}")
                continue
            out.append(f"  -> {t.transport}: {t.recipient} ({t.origin})")
        for t in r.plan.duplicates:
            out.append(f"  dropped duplicate {t.written} ({t.origin}) = {t.transport}:"
                       f"{t.recipient}")
        for t in r.plan.targets:
            if t.error:
                continue
            transport = transports[t.transport]
            payload = transport.render(r.alert, t.recipient)
            out.append(f"  payload for {t.transport} -> {t.recipient} "
                       f"(to {transport.destination()}):")
            if isinstance(payload, dict) and "body" in payload:
                text = payload["body"]
            elif isinstance(payload, dict):
                text = json.dumps(payload, ensure_ascii=False, indent=2)
            else:
                text = payload.as_string()
            out.extend("    " + line for line in text.splitlines())
    return "\n".join(out)
