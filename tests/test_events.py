"""Event files: parser and etc/event.schema.json agree; default event ids; no crash on any input."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator, FormatChecker

from nomaflowd import events
from nomaflowd.catalogue import ALERT_KEYS
from nomaflowd.errors import Rejected

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "etc" / "event.schema.json"
SCHEMA = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
VALIDATOR = Draft202012Validator(SCHEMA, format_checker=FormatChecker())
RECEIVED = datetime(2026, 5, 26, 3, 0, 0)

RUN = {"job_id": "reporting-nightly-sync", "state": "FAILED", "run_id": "run_a8c4d"}
NOTICE = {"job_id": "reporting-monthly", "state": "NOTICE", "message": "report delivered"}


def at(value: Any) -> dict[str, Any]:
    return {**RUN, "at": value}


def alerts(**block: Any) -> dict[str, Any]:
    return {**RUN, "alerts": block}


class Case(NamedTuple):
    name: str
    value: Any              # serialised with json.dumps
    reason: str | None      # None: accepted; else a substring of the parser's reason


# Every sample here must get the same verdict from events.parse and from the schema.
CASES = [
    # accepted
    Case("minimal run event", RUN, None),
    Case("running with long-run alert", {**RUN, "state": "RUNNING", "started_at":
         "2026-05-26T02:00:00Z", "alerts": {"on_long_run_minutes": 90}}, None),
    Case("every field", {
        **RUN, "state": "SUCCEEDED", "event_id": "evt-1", "at": "2026-05-26T02:14:22Z",
        "started_at": "2026-05-26T02:00:00Z", "finished_at": "2026-05-26T02:14:22.5+00:00",
        "triggered_by": "cron", "step": "copy-orders", "error": "", "traceback": "Traceback...",
        "by": "alice", "tags": ["finance", "nightly"], "message": "done",
        "alerts": {"on_failure": True, "on_success": True, "on_cancel": False,
                   "on_toggle": False, "on_long_run_minutes": 0.5, "recipients": ["ops"]}},
         None),
    Case("cancelled by operator", {**RUN, "state": "CANCELLED", "by": "bob"}, None),
    Case("enabled needs no run", {"job_id": "j", "state": "ENABLED"}, None),
    Case("disabled may name a run", {"job_id": "j", "state": "DISABLED", "run_id": "r",
                                     "by": "alice"}, None),
    Case("notice", NOTICE, None),
    Case("notice with recipients", {**NOTICE, "recipients": ["ops", "alice@example.com"]}, None),
    Case("notice with empty recipients", {**NOTICE, "recipients": []}, None),
    Case("notice with run", {**NOTICE, "run_id": "r1"}, None),
    Case("empty message outside NOTICE", {**RUN, "message": ""}, None),
    Case("empty tags", {**RUN, "tags": []}, None),
    Case("empty alerts block", alerts(), None),
    Case("long-run minutes null", alerts(on_long_run_minutes=None), None),
    Case("time with fraction and offset", at("2026-05-26T04:00:00.250+05:30"), None),
    Case("time with nanoseconds", at("2026-05-26T02:00:00.123456789Z"), None),
    Case("time with -00:00", at("2026-05-26T02:00:00-00:00"), None),
    Case("time on a leap day", at("2024-02-29T23:59:59Z"), None),
    Case("id of 200 characters", {**RUN, "run_id": "r" * 200}, None),
    Case("recipient of 200 characters", {**NOTICE, "recipients": ["@" + "a" * 199]}, None),
    Case("twenty recipients", alerts(recipients=[f"#c{i}" for i in range(20)]), None),
    Case("id with inner spaces and unicode", {**RUN, "job_id": "nightly sync ✓ 日本"}, None),
    # not an event object
    Case("top level array", [RUN], "must be a JSON object"),
    Case("top level string", "FAILED", "must be a JSON object"),
    Case("top level null", None, "must be a JSON object"),
    Case("empty object", {}, "job_id is required"),
    # keys and types
    Case("unknown key", {**RUN, "jobid": "x"}, "unknown key 'jobid'"),
    Case("missing job_id", {"state": "FAILED", "run_id": "r"}, "job_id is required"),
    Case("empty job_id", {**RUN, "job_id": ""}, "job_id is required"),
    Case("numeric job_id", {**RUN, "job_id": 5}, "job_id must be a string"),
    Case("missing state", {"job_id": "j", "run_id": "r"}, "state is required"),
    Case("null state", {**RUN, "state": None}, "state must be a string"),
    Case("lower-case state", {**RUN, "state": "failed"}, "is not one of"),
    Case("unknown state", {**RUN, "state": "EXPLODED"}, "EXPLODED"),
    Case("null run_id", {**RUN, "run_id": None}, "run_id must be a string"),
    Case("empty run_id", {**RUN, "run_id": ""}, "run_id must be 1-200"),
    Case("empty event_id", {**RUN, "event_id": ""}, "event_id must be 1-200"),
    Case("job_id of 201 characters", {**RUN, "job_id": "j" * 201},
         "job_id is 201 characters; the limit is 200"),
    Case("run_id of 201 characters", {**RUN, "run_id": "r" * 201},
         "run_id is 201 characters; the limit is 200"),
    Case("event_id of 201 characters", {**RUN, "event_id": "e" * 201},
         "event_id is 201 characters; the limit is 200"),
    Case("notice recipient of 201 characters", {**NOTICE, "recipients": ["ops", "@" + "a" * 200]},
         "recipients[1] is 201 characters; the limit is 200"),
    Case("21 recipients in an alerts block", alerts(recipients=[f"#c{i}" for i in range(21)]),
         "alerts.recipients names 21 recipients; an event file may name at most 20"),
    Case("3,000 recipients in a notice", {**NOTICE, "recipients": [f"#c{i}" for i in range(3000)]},
         "recipients names 3000 recipients; an event file may name at most 20"),
    Case("alerts recipient of 201 characters", alerts(recipients=["#" + "c" * 200]),
         "alerts.recipients[0] is 201 characters; the limit is 200"),
    Case("numeric by", {**RUN, "by": 7}, "by must be a string"),
    Case("list triggered_by", {**RUN, "triggered_by": ["cron"]}, "triggered_by must be a string"),
    Case("null traceback", {**RUN, "traceback": None}, "traceback must be a string"),
    Case("tags as a string", {**RUN, "tags": "finance"}, "tags must be a list of strings"),
    Case("tags holding null", {**RUN, "tags": ["a", None]}, "tags must be a list of strings"),
    # conditional requirements
    *[Case(f"{s} without run_id", {"job_id": "j", "state": s}, f"run_id is required for a {s}")
      for s in events.RUN_STATES],
    Case("notice without message", {"job_id": "j", "state": "NOTICE"}, "message is required"),
    Case("notice with empty message", {**NOTICE, "message": ""}, "message is required"),
    Case("notice with numeric message", {**NOTICE, "message": 1}, "message must be a string"),
    Case("recipients on a run event", {**RUN, "recipients": ["ops"]}, "recipients is only for"),
    Case("recipients on a toggle", {"job_id": "j", "state": "ENABLED", "recipients": []},
         "recipients is only for"),
    Case("recipients as a string", {**NOTICE, "recipients": "ops"}, "list of strings"),
    Case("recipients holding a number", {**NOTICE, "recipients": ["ops", 3]}, "list of strings"),
    Case("recipient URL in a notice", {**NOTICE, "recipients": ["https://hooks.slack.com/x"]},
         "holds a URL"),
    # times
    Case("time without offset", at("2026-05-26T02:00:00"), "UTC offset"),
    Case("date only", at("2026-05-26"), "UTC offset"),
    Case("space instead of T", at("2026-05-26 02:00:00Z"), "UTC offset"),
    Case("lower-case t", at("2026-05-26t02:00:00Z"), "UTC offset"),
    Case("lower-case z", at("2026-05-26T02:00:00z"), "not an RFC 3339 time"),
    Case("no seconds", at("2026-05-26T02:00Z"), "UTC offset"),
    Case("hours only", at("2026-05-26T02Z"), "UTC offset"),
    Case("compact offset", at("2026-05-26T02:00:00+0000"), "UTC offset"),
    Case("offset hours only", at("2026-05-26T02:00:00+02"), "UTC offset"),
    Case("offset with seconds", at("2026-05-26T02:00:00+00:00:00"), "UTC offset"),
    Case("space before offset", at("2026-05-26T02:00:00 +00:00"), "UTC offset"),
    Case("comma fraction", at("2026-05-26T02:00:00,5Z"), "UTC offset"),
    Case("dot without digits", at("2026-05-26T02:00:00.Z"), "UTC offset"),
    Case("ISO basic format", at("20260526T020000Z"), "UTC offset"),
    Case("ISO week date", at("2026-W22-2T02:00:00Z"), "UTC offset"),
    Case("month 13", at("2026-13-01T02:00:00Z"), "not an RFC 3339 time"),
    Case("30 February", at("2026-02-30T02:00:00Z"), "not an RFC 3339 time"),
    Case("29 February of a common year", at("2026-02-29T02:00:00Z"), "not an RFC 3339 time"),
    Case("hour 24", at("2026-05-26T24:00:00Z"), "not an RFC 3339 time"),
    Case("leap second", at("2026-06-30T23:59:60Z"), "not an RFC 3339 time"),
    Case("offset minute 60", at("2026-05-26T02:00:00+01:60"), "UTC offset"),
    Case("year 0", at("0000-01-01T00:00:00Z"), "not an RFC 3339 time"),
    Case("epoch number", at(1779760800), "at must be an RFC 3339 time string"),
    Case("bad started_at", {**RUN, "started_at": "yesterday"}, "started_at is not an RFC 3339"),
    Case("bad finished_at", {**RUN, "finished_at": "2026-05-26"}, "finished_at needs"),
    # alerts block
    Case("alerts as a list", {**RUN, "alerts": []}, "alerts must be an object"),
    Case("alerts as true", {**RUN, "alerts": True}, "alerts must be an object"),
    Case("unknown alerts key", alerts(on_failures=True), "alerts.on_failures is not a known"),
    Case("on_failure as a string", alerts(on_failure="yes"), "on_failure must be true or false"),
    Case("on_toggle as 1", alerts(on_toggle=1), "on_toggle must be true or false"),
    Case("on_success as null", alerts(on_success=None), "on_success must be true or false"),
    Case("long-run minutes 0", alerts(on_long_run_minutes=0), "above 0"),
    Case("negative long-run minutes", alerts(on_long_run_minutes=-5), "above 0"),
    Case("long-run minutes as a string", alerts(on_long_run_minutes="90"), "above 0"),
    Case("long-run minutes as true", alerts(on_long_run_minutes=True), "above 0"),
    Case("alerts recipients as a string", alerts(recipients="ops"), "list of strings"),
    Case("alerts recipient URL", alerts(recipients=["ops", "https://example.com/hook"]),
         "holds a URL"),
]


def verdict(raw: bytes, name: str = "sample.json") -> str | None:
    try:
        events.parse(raw, name, RECEIVED)
    except Rejected as exc:
        return str(exc)
    return None


def test_schema_is_valid_draft_2020_12():
    Draft202012Validator.check_schema(SCHEMA)
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_schema_checks_date_time_format():
    # jsonschema checks "date-time" only when rfc3339-validator is installed; without it the
    # range samples below (30 February, hour 24) would pass the schema silently.
    assert "date-time" in FormatChecker().checkers, "pip install rfc3339-validator"


def test_schema_knows_the_parsers_keys_and_states():
    assert set(SCHEMA["properties"]) == events.KNOWN
    assert SCHEMA["properties"]["state"]["enum"] == list(events.STATES)
    assert set(SCHEMA["$defs"]["alerts"]["properties"]) == set(ALERT_KEYS)
    assert SCHEMA["$defs"]["id"]["maxLength"] == events.ID_MAX


def test_every_state_and_rule_is_sampled():
    states = {c.value.get("state") for c in CASES if isinstance(c.value, dict) and c.reason is None}
    assert states == set(events.STATES)
    assert len(CASES) >= 40


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_parser_and_schema_agree(case: Case):
    reason = verdict(json.dumps(case.value).encode())
    schema_errors = [e.message for e in VALIDATOR.iter_errors(case.value)]
    if case.reason is None:
        assert reason is None
        assert schema_errors == []
    else:
        assert reason is not None and case.reason in reason
        assert schema_errors, "the schema accepts what the parser rejects"


def nested(depth: int) -> bytes:
    return b'{"job_id": "j", "state": "NOTICE", "message": "m", "x": ' + b"[" * depth \
        + b"]" * depth + b"}"


def padded(total: int) -> bytes:
    """A valid event of exactly `total` bytes."""
    head = b'{"job_id": "j", "state": "FAILED", "run_id": "r", "error": "'
    return head + b"x" * (total - len(head) - 2) + b'"}'


def dumps(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode()


# What JSON Schema cannot say: the bytes themselves, duplicate keys, number range, printable ids.
PARSER_ONLY = [
    Case("exactly 1 MiB", padded(events.MAX_BYTES), None),
    Case("one byte over 1 MiB", padded(events.MAX_BYTES + 1), "larger than 1048576 bytes"),
    Case("empty file", b"", "empty"),
    Case("only whitespace", b" \n\t ", "empty"),
    Case("latin-1 byte", b'{"job_id": "caf\xe9", "state": "ENABLED"}', "not UTF-8 (byte 15)"),
    Case("UTF-16", json.dumps(RUN).encode("utf-16"), "not UTF-8"),
    Case("UTF-8 byte-order mark", b"\xef\xbb\xbf" + dumps(RUN), "not JSON"),
    Case("truncated", dumps(RUN)[:-1], "not JSON"),
    Case("trailing garbage", dumps(RUN) + b" x", "not JSON: Extra data"),
    Case("two objects", dumps(RUN) + dumps(RUN), "not JSON: Extra data"),
    Case("single quotes", b"{'job_id': 'j', 'state': 'ENABLED'}", "not JSON"),
    Case("duplicate key", b'{"job_id": "a", "job_id": "b", "state": "ENABLED"}',
         "key 'job_id' appears twice"),
    Case("duplicate key in alerts", b'{"job_id": "j", "state": "ENABLED", "alerts": '
         b'{"on_toggle": true, "on_toggle": false}}', "key 'on_toggle' appears twice"),
    Case("NaN", b'{"job_id": "j", "state": "FAILED", "run_id": "r", "alerts": '
         b'{"on_long_run_minutes": NaN}}', "NaN is not valid JSON"),
    Case("Infinity", b'{"job_id": "j", "state": "FAILED", "run_id": "r", "alerts": '
         b'{"on_long_run_minutes": Infinity}}', "Infinity is not valid JSON"),
    Case("-Infinity", b'{"job_id": "j", "state": "ENABLED", "x": -Infinity}',
         "-Infinity is not valid JSON"),
    Case("number overflowing a double", b'{"job_id": "j", "state": "FAILED", "run_id": "r", '
         b'"alerts": {"on_long_run_minutes": 1e400}}', "number 1e400 is out of range"),
    Case("integer of 5000 digits", b'{"job_id": "j", "state": "ENABLED", "alerts": '
         b'{"on_long_run_minutes": 1' + b"0" * 4999 + b"}}", "not acceptable JSON"),
    Case("integer too large for a float", dumps(alerts(on_long_run_minutes=10**4000)),
         "on_long_run_minutes must be a number of minutes above 0 and at most 10000000"),
    Case("nesting 100000 deep", nested(100_000), "nested too deeply"),
    Case("nesting 100 deep is fine until the unknown key", nested(100), "unknown key 'x'"),
    Case("job_id with a bell", dumps({**RUN, "job_id": "j\a"}), "job_id must be 1-200"),
    Case("run_id with a tab", dumps({**RUN, "run_id": "r\t1"}), "run_id must be 1-200"),
    Case("event_id with NUL", dumps({**RUN, "event_id": "e\x00"}), "event_id holds a NUL"),
    Case("job_id with a newline", dumps({**RUN, "job_id": "j\n"}), "job_id must be 1-200"),
    Case("job_id with a zero-width space", dumps({**RUN, "job_id": "j\u200bk"}),
         "job_id must be 1-200"),
    Case("job_id with a line separator", dumps({**RUN, "job_id": "j\u2028k"}),
         "job_id must be 1-200"),
    Case("job_id with a lone surrogate", dumps({**RUN, "job_id": "j\ud800"}),
         "job_id holds a lone surrogate (\\ud800)"),
    Case("leading space", dumps({**RUN, "job_id": " j"}), "job_id must be 1-200"),
    Case("trailing space", dumps({**RUN, "run_id": "r "}), "run_id must be 1-200"),
    Case("trailing no-break space", dumps({**RUN, "run_id": "r\u00a0"}), "run_id must be 1-200"),
    Case("only a space", dumps({**RUN, "job_id": " "}), "job_id must be 1-200"),
    # Python's re `$` and rfc3339-validator both let a final newline through; the parser does not.
    Case("time with a final newline", dumps(at("2026-05-26T02:00:00Z\n")),
         "not an RFC 3339 time"),
    Case("time before year 1 in UTC", dumps(at("0001-01-01T00:30:00+01:00")), "out of range"),
    Case("time after year 9999 in UTC", dumps(at("9999-12-31T23:30:00-01:00")), "out of range"),
    Case("control characters in free text are fine", dumps({**RUN, "error": "a\x01b\nc\r"}),
         None),
    Case("paired surrogates are one character", dumps({**RUN, "error": "\U0001f525"}), None),
    # What no database column or UTF-8 encoder takes, wherever it sits: refused, naming where.
    Case("message with a lone surrogate", dumps({**NOTICE, "message": "ok \udcff"}),
         "message holds a lone surrogate (\\udcff)"),
    Case("error with a NUL", dumps({**RUN, "error": "a\x00b"}), "error holds a NUL"),
    Case("traceback with a NUL", dumps({**RUN, "traceback": "x\x00"}), "traceback holds a NUL"),
    Case("state with a NUL", dumps({**RUN, "state": "FAILED\x00"}), "state holds a NUL"),
    Case("tag with a lone surrogate", dumps({**RUN, "tags": ["a", "\udfff"]}),
         "tags[1] holds a lone surrogate"),
    Case("alerts recipient with a NUL", dumps(alerts(recipients=["#ok", "#x\x00"])),
         "alerts.recipients[1] holds a NUL"),
    Case("notice recipient with a lone surrogate", dumps({**NOTICE, "recipients": ["\ud83d"]}),
         "recipients[0] holds a lone surrogate"),
    Case("unknown key holding a NUL", dumps({**RUN, "x": {"y": ["\x00"]}}), "x.y[0] holds a NUL"),
    Case("key with a NUL", dumps({**RUN, "alerts": {"on_failure\x00": True}}),
         "a key of alerts holds a NUL"),
]


@pytest.mark.parametrize("case", PARSER_ONLY, ids=[c.name for c in PARSER_ONLY])
def test_parser_only_rules(case: Case):
    reason = verdict(case.value)
    if case.reason is None:
        assert reason is None
    else:
        assert reason is not None and case.reason in reason


def test_parse_keeps_the_payload_and_converts_times_to_naive_utc():
    raw = dumps({**RUN, "started_at": "2026-05-26T04:00:00+02:00",
                 "finished_at": "2026-05-26T02:14:22.5Z"})
    e = events.parse(raw, "a.json", RECEIVED)
    assert e.payload == raw.decode()
    assert e.started_at == datetime(2026, 5, 26, 2, 0, 0)
    assert e.finished_at == datetime(2026, 5, 26, 2, 14, 22, 500000)
    assert e.at == RECEIVED
    assert (e.job_id, e.state, e.run_id) == ("reporting-nightly-sync", "FAILED", "run_a8c4d")


# --- default event ids -------------------------------------------------------------------------


@pytest.mark.parametrize("state", events.RUN_STATES)
def test_run_event_id_defaults_to_job_run_state(state: str):
    raw = dumps({"job_id": "etl", "run_id": "r-7", "state": state})
    assert events.parse(raw, "x.json", RECEIVED).event_id == f"etl/r-7/{state}"
    # the same transition under another name and another time is the same event
    assert events.parse(raw + b"\n", "y.json", RECEIVED + timedelta(1)).event_id == \
        f"etl/r-7/{state}"


def test_explicit_event_id_wins():
    for obj in ({**RUN, "event_id": "mine"}, {**NOTICE, "event_id": "mine"}):
        assert events.parse(dumps(obj), "x.json", RECEIVED).event_id == "mine"


@pytest.mark.parametrize("obj", [NOTICE, {"job_id": "etl", "state": "ENABLED", "by": "alice"},
                                 {"job_id": "etl", "state": "DISABLED", "run_id": "r"}],
                         ids=["notice", "enabled", "disabled-with-run"])
def test_notice_and_toggle_ids_come_from_name_and_content(obj: dict[str, Any]):
    raw = dumps(obj)
    first = events.parse(raw, "a.json", RECEIVED).event_id
    assert first.startswith(f"{obj['job_id']}/{obj['state'].lower()}/")
    assert events.parse(raw, "a.json", RECEIVED + timedelta(hours=1)).event_id == first
    assert events.parse(raw + b" ", "a.json", RECEIVED).event_id != first
    assert events.parse(dumps({**obj, "by": "carol"}), "a.json", RECEIVED).event_id != first
    assert events.parse(raw, "b.json", RECEIVED).event_id != first


def test_undecodable_file_names_give_distinct_ids():
    # os.scandir hands back b"\xff.json" as "\udcff.json"; two such names must not collide.
    raw = dumps(NOTICE)
    ids = {events.parse(raw, name, RECEIVED).event_id
           for name in ("\udcff.json", "\udcfe.json", "?.json", "\ud800.json")}
    assert len(ids) == 4


def test_default_ids_of_the_longest_ids_fit_the_limit_and_stay_distinct():
    job, run = "j" * events.ID_MAX, "r" * events.ID_MAX
    runs = [{"job_id": j, "run_id": r, "state": "FAILED"}
            for j, r in ((job, run), (job, run[:-1] + "s"), (job[:-1] + "k", run))]
    notices = [{"job_id": j, "state": "NOTICE", "message": "m"} for j in (job, job[:-1] + "k")]
    found = set()
    for obj in runs + notices:
        event_id = events.parse(dumps(obj), "a.json", RECEIVED).event_id
        assert len(event_id) <= events.ID_MAX
        found.add(event_id)
    assert len(found) == 5
    # the same transition in another file, received later, is still the same event
    later = events.parse(dumps(runs[0]) + b" ", "b.json", RECEIVED + timedelta(1))
    assert later.event_id == events.parse(dumps(runs[0]), "a.json", RECEIVED).event_id


# --- never anything but an Event or Rejected ----------------------------------------------------

json_scalars = st.sampled_from([None, True, False, 0, -1, 1.5, 10**400, "", "x", " ", "FAILED"])
json_values = st.one_of(json_scalars, st.lists(json_scalars, max_size=2),
                        st.dictionaries(st.sampled_from(["", "a", "on_failure"]), json_scalars,
                                        max_size=2))
offsets = st.integers(-24 * 60 + 1, 24 * 60 - 1).map(lambda m: timezone(timedelta(minutes=m)))
times = st.one_of(
    st.builds(lambda d, tz, spec: d.replace(tzinfo=tz).isoformat(timespec=spec),
              st.datetimes(), st.none() | offsets,
              st.sampled_from(["seconds", "milliseconds", "microseconds", "auto", "minutes"])),
    st.sampled_from(["0001-01-01T00:00:00+00:01", "9999-12-31T23:59:59-00:01",
                     "2026-05-26t02:00:00Z", "2026-05-26T02:00:00+0100", "2026-02-30T00:00:00Z",
                     "2026-05-26T02:00:00+01:60", "2026-05-26T02:00:00Z\n"]),
    json_values,
)
ids = st.one_of(st.sampled_from(["etl", "r-1", " x", "x\n", "a\u200b", "", "r" * 201, "\udcff"]),
                st.text(max_size=6), json_values)
strings = st.text(max_size=6) | json_values
string_lists = (st.lists(st.sampled_from(["ops", "a@b.c", "https://x", ""]), max_size=2)
                | json_values)
alert_blocks = st.fixed_dictionaries({}, optional={
    **{key: st.booleans() | json_values for key in ("on_failure", "on_success", "on_cancel",
                                                     "on_toggle")},
    "on_long_run_minutes": st.floats() | st.integers(-1, 10**7) | st.just(10**4000) | json_values,
    "recipients": string_lists, "on_failures": st.booleans()}) | json_values
FIELDS = {
    "job_id": ids, "run_id": ids, "event_id": ids,
    "state": st.sampled_from(events.STATES) | json_values,
    "message": strings, "recipients": string_lists, "tags": string_lists, "alerts": alert_blocks,
    **dict.fromkeys(events.TIME_FIELDS, times),
    **dict.fromkeys(("triggered_by", "step", "error", "traceback", "by"), strings),
    "unknown": json_values,
}
valid_events = st.sampled_from([
    RUN, NOTICE, {**RUN, "state": "RUNNING"}, {"job_id": "etl", "state": "ENABLED"},
    {**NOTICE, "recipients": ["ops"]}, {**RUN, "alerts": {"on_long_run_minutes": 5}}])


@st.composite
def event_objects(draw: st.DrawFn) -> Any:
    """A valid event with a few keys replaced, added or removed (now and then: not an object)."""
    obj = dict(draw(valid_events))
    for key in draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=3, unique=True)):
        if draw(st.integers(0, 4)) == 0:
            obj.pop(key, None)
        else:
            obj[key] = draw(FIELDS[key])
    return obj if draw(st.integers(0, 19)) else draw(json_values)


def parse_or_reject(raw: bytes, name: str = "h.json") -> events.Event | None:
    try:
        return events.parse(raw, name, RECEIVED)
    except Rejected:
        return None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.text(max_size=10))
def test_any_bytes_are_an_event_or_rejected(raw: bytes, name: str):
    parse_or_reject(raw, name)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([RUN, NOTICE, {**RUN, "state": "RUNNING", "at": "2026-05-26T02:00:00Z",
                                      "alerts": {"on_long_run_minutes": 5}}]),
       st.integers(0, 200), st.binary(max_size=8), st.integers(0, 8))
def test_damaged_events_are_an_event_or_rejected(obj: dict[str, Any], where: int, junk: bytes,
                                                 cut: int):
    raw = dumps(obj)
    where %= len(raw)
    parse_or_reject(raw[:where] + junk + raw[where + cut:])


@settings(max_examples=300, deadline=None)
@given(event_objects())
def test_any_json_object_is_an_event_or_rejected_and_accepted_ones_fit_the_schema(obj: Any):
    raw = json.dumps(obj).encode()  # NaN and Infinity come out as the bare words
    event = parse_or_reject(raw)
    if event is not None:
        # the parser is never more lenient than the schema it documents
        assert VALIDATOR.is_valid(json.loads(raw)), list(VALIDATOR.iter_errors(json.loads(raw)))
