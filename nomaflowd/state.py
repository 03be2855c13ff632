"""The run state machine and which alerts an event makes due."""

from __future__ import annotations

from nomaflowd.catalogue import AlertsBlock
from nomaflowd.events import FINAL_STATES, Event

# A run moves RUNNING -> one final state and never back; the first final state wins. Its row
# goes in at its first event (a run already in the table keeps its row), then FINISH_RUN.
RUN_COLUMNS = ("job_id", "run_id", "state", "started_at", "finished_at", "updated_at",
               "long_run_deadline", "overrides")
FINISH_RUN = (
    "UPDATE runs SET state = {p}, finished_at = {p}, updated_at = {p}, long_run_deadline = NULL,"
    " started_at = COALESCE(started_at, {p}) WHERE job_id = {p} AND run_id = {p}"
    " AND state = 'RUNNING'"
)


START_RUN = (
    "UPDATE runs SET started_at = {p}, long_run_deadline = {p} WHERE job_id = {p}"
    " AND run_id = {p} AND state = 'RUNNING' AND started_at IS NULL"
)


def alerts_due(event: Event, block: AlertsBlock) -> list[str]:
    """The alert kinds (SPEC §5) this event asks for under its effective alerts block."""
    state = event.state
    if event.retrying:
        return ["failed"] if block.on_retry else []
    if state == "FAILED" and block.on_failure:
        return ["failed"]
    if state == "SUCCEEDED" and block.on_success:
        return ["succeeded"]
    if state == "CANCELLED" and block.on_cancel:
        return ["cancelled"]
    if state in ("ENABLED", "DISABLED") and block.on_toggle:
        return [state.lower()]
    if state == "NOTICE":
        return ["notice"]
    return []


def is_final(state: str) -> bool:
    return state in FINAL_STATES
