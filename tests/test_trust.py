"""Untrusted runners (SPEC section 15): limits, quarantine, who may write, where events send."""

from __future__ import annotations

import grp
import os
import pwd
from datetime import datetime
from pathlib import Path

import pytest

from nomaflowd import catalogue, config, db, events
from nomaflowd.cli import main
from nomaflowd.config import Rule, TransportConfig
from nomaflowd.errors import ConfigError
from nomaflowd.routing import NOT_ALLOWED, Router, email_address
from nomaflowd.spool import Spool
from tests.conftest import InProcess, Tree

NOW = datetime(2026, 5, 26, 2, 30, 0)

LONG_JOB, LONG_RUN = "j" * events.ID_MAX, "r" * events.ID_MAX


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest, tree: Tree):
    """`tree` on a fresh database of each backend (a private schema on PostgreSQL)."""
    if request.param == "postgres":
        tree.database = request.getfixturevalue("pg_schema")  # skips without a server
    yield tree
    db.proxy.close()


def test_ids_at_the_limit_are_stored_on_both_backends(backend: Tree, http,
                                                     request: pytest.FixtureRequest):
    backend.write_config(backend.webhook("hook", http.url()))
    d = InProcess(backend)
    try:
        backend.drop({"job_id": LONG_JOB, "run_id": LONG_RUN, "state": "FAILED",
                      "alerts": {"recipients": ["hook:" + "x" * 195]}})
        backend.drop({"job_id": LONG_JOB, "state": "NOTICE", "message": "m",
                      "event_id": "e" * events.ID_MAX})
        d.pump()
        assert backend.spool_files() == []
        assert sorted(r.job_id for r in db.EventRow.select()) == [LONG_JOB, LONG_JOB]
        assert [r.run_id for r in db.RunRow.select()] == [LONG_RUN]
        assert {r.outcome for r in db.NotificationRow.select()} == {"SENT"}
    finally:
        d.close()


# --- who may write for a job ----------------------------------------------------------------

NOBODY = 65534  # nobody:nogroup on Debian; the tests run as root, so they can chown to it


def owned_by(tree: Tree, event: dict[str, object], uid: int, gid: int) -> Path:
    path = tree.drop(event)
    os.chown(path, uid, gid)
    return path


def test_spool_read_reports_the_owner_the_kernel_saw(tree: Tree):
    spool = Spool(tree.spool)
    spool.prepare()
    path = owned_by(tree, {"job_id": "etl", "state": "ENABLED"}, NOBODY, NOBODY)
    read = spool.read(path.name)
    assert read is not None
    assert (read.uid, read.gid) == (NOBODY, NOBODY)
    assert events.parse(read, path.name, NOW).job_id == "etl"  # still the bytes


def test_catalogue_reads_writers_from_jobs_and_defaults():
    cat = catalogue.parse({"defaults": {"writers": ["root"]},
                           "jobs": {"etl": {"writers": ["etl-runner", "@etl"]},
                                    "locked": {"writers": []}}})
    assert cat.writers("etl") == ("etl-runner", "@etl")
    assert cat.writers("other") == ("root",)
    assert cat.writers("locked") == ()
    assert catalogue.parse({}).writers("etl") is None
    for bad in (["@"], [""], "root", [3], [" root"], ["root:root"]):
        with pytest.raises(ConfigError, match=r"jobs\.etl\.writers"):
            catalogue.parse({"jobs": {"etl": {"writers": bad}}})


@pytest.mark.parametrize(("writers", "uid", "gid", "allowed"), [
    (["root"], 0, 0, True),
    (["root"], NOBODY, NOBODY, False),
    (["nobody"], NOBODY, 0, True),
    (["@root"], 0, NOBODY, True),             # the owner's primary group
    (["@nogroup"], 0, NOBODY, True),          # the file's group
    (["@nogroup"], NOBODY, 0, True),          # nobody's primary group is nogroup
    (["@root"], NOBODY, NOBODY, False),
    (["@no-such-group", "no-such-user"], NOBODY, NOBODY, False),
    (["root"], 4_000_000, 4_000_000, False),  # a uid no account has
])
def test_may_write_matches_users_and_groups(writers, uid, gid, allowed):
    cat = catalogue.parse({"jobs": {"etl": {"writers": writers}}})
    reason = cat.may_write("etl", uid, gid)
    assert (reason is None) == allowed
    assert cat.may_write("not-listed", uid, gid) is None  # no writers: anyone may


def test_may_write_matches_supplementary_members():
    member = next(((g.gr_name, m) for g in grp.getgrall() for m in g.gr_mem
                   if m != "root"), None)
    if member is None:
        pytest.skip("no group on this host lists a supplementary member")
    group, user = member
    uid = pwd.getpwnam(user).pw_uid
    cat = catalogue.parse({"jobs": {"etl": {"writers": [f"@{group}"]}}})
    assert cat.may_write("etl", uid, 4_000_000) is None


def test_refusal_names_owner_job_and_writers():
    cat = catalogue.parse({"jobs": {"etl": {"writers": ["etl-runner", "@etl"]}}})
    assert cat.may_write("etl", NOBODY, NOBODY) == (
        "owner uid 65534 (nobody) may not write events for job etl; writers: etl-runner, @etl")
    assert "uid 4000000 (no such user)" in str(cat.may_write("etl", 4_000_000, 0))


def test_check_warns_when_no_job_names_writers(tree: Tree, capsys, http):
    tree.write_config(tree.webhook("hook", http.url()))
    tree.write_jobs('[jobs.a.alerts]\nrecipients = ["hook"]\n')
    assert main(["check", "--config", str(tree.config_path)]) == 0
    assert "names no writers: anyone who can write into the spool" in capsys.readouterr().out
    tree.write_jobs('[defaults]\nwriters = ["root", "@no-such-group"]\n'
                    '[jobs.a.alerts]\nrecipients = ["hook"]\n')
    assert main(["check", "--config", str(tree.config_path)]) == 0
    out = capsys.readouterr().out
    assert "no writers" not in out
    assert "defaults.writers: group no-such-group does not exist on this host" in out


def test_check_warns_when_a_writer_group_is_the_spools_setgid_group(tree: Tree, capsys, http):
    tree.write_config(tree.webhook("hook", http.url()))
    tree.spool.mkdir(parents=True)
    os.chown(tree.spool, 0, NOBODY)
    os.chmod(tree.spool, 0o2770)
    tree.write_jobs('[jobs.a]\nwriters = ["@nogroup"]\n')
    main(["check", "--config", str(tree.config_path)])
    assert "@nogroup is the spool's set-group-ID group" in capsys.readouterr().out


def test_daemon_rejects_a_file_whose_owner_may_not_write_for_its_job(tree: Tree, inproc):
    tree.write_config("")
    tree.write_jobs('[jobs.etl]\nwriters = ["root"]\n')
    mine = tree.drop({"job_id": "etl", "run_id": "r1", "state": "FAILED"})
    theirs = owned_by(tree, {"job_id": "etl", "run_id": "r2", "state": "FAILED"}, NOBODY,
                      NOBODY)
    open_job = owned_by(tree, {"job_id": "other", "run_id": "r3", "state": "FAILED"}, NOBODY,
                        NOBODY)
    inproc().pump()
    assert tree.spool_files() == []
    assert sorted(r[0] for r in tree.sql("SELECT event_id FROM events")) == [
        "etl/r1/FAILED", "other/r3/FAILED"]
    note = (tree.spool / "rejected" / f"{theirs.name}.error").read_text()
    assert "owner uid 65534 (nobody) may not write events for job etl; writers: root" in note
    assert not mine.exists() and not open_job.exists()


# --- where an event may send -------------------------------------------------------------------

TRANSPORTS = {
    "slack": TransportConfig("slack", "slack", {"default_channel": "#nomaflow-alerts"}),
    "email": TransportConfig("email", "email", {"default_from": "Nomaflow <nomaflow@Corp.Local>"}),
    "ops-hook": TransportConfig("ops-hook", "webhook", {}),
}
RULES = (Rule("team-data", ("partner@partner.example",)),)
CATALOGUE = catalogue.parse({
    "jobs": {"other": {"alerts": {"recipients": ["Pager@Vendor.example"]}}},
    "defaults": {"alerts": {"recipients": ["boss@home.example"]}}})


def verdicts(router: Router, recipients: list[str]) -> dict[str, str]:
    plan = router.plan(recipients, (), use_rules=False, from_event=True, catalogue=CATALOGUE)
    return {t.written: t.error for t in plan.targets}


def test_event_recipients_default_to_slack_and_the_senders_domain_plus_everything_named():
    router = Router(TRANSPORTS, RULES)
    assert verdicts(router, [
        "#any-channel", "@bob", "alice@corp.local", "Al <AL@CORP.LOCAL>",  # default patterns
        "ops-hook", "email", "slack:#x",                                     # transports
        "pager@vendor.example", "boss@home.example",                         # named in jobs.toml
        "partner@partner.example",                                           # a routing rule
    ]) == dict.fromkeys([
        "#any-channel", "@bob", "alice@corp.local", "Al <AL@CORP.LOCAL>", "ops-hook", "email",
        "slack:#x", "pager@vendor.example", "boss@home.example", "partner@partner.example"], "")
    plan = router.plan(["mallory@attacker.example", "#ok"], (), use_rules=False,
                       from_event=True, catalogue=CATALOGUE)
    assert [(t.transport, t.recipient, t.error) for t in plan.targets] == [
        ("email", "mallory@attacker.example", "recipient not allowed from an event file"),
        ("slack", "#ok", "")]


def test_recipients_from_jobs_toml_or_rules_are_not_checked():
    plan = Router(TRANSPORTS, RULES, ["#nothing"]).plan(["mallory@attacker.example"], ())
    assert [t.error for t in plan.targets] == [""]


def test_configured_event_recipients_replace_the_default_and_ignore_case():
    router = Router(TRANSPORTS, RULES, ["#ops-*", "*@Corp.Local"])
    assert verdicts(router, ["#OPS-1", "#random", "@bob", "ALICE@corp.local", "ops-hook",
                             "pager@vendor.example"]) == {
        "#OPS-1": "", "#random": NOT_ALLOWED, "@bob": NOT_ALLOWED, "ALICE@corp.local": "",
        "ops-hook": "", "pager@vendor.example": ""}
    assert Router(TRANSPORTS, (), []).plan(["#x"], (), from_event=True).targets[0].error \
        == NOT_ALLOWED


def test_unknown_recipients_keep_their_own_reason():
    assert verdicts(Router(TRANSPORTS, ()), ["nowhere"])["nowhere"].startswith(
        "'nowhere' matches no transport")


def test_a_webhook_named_many_ways_is_one_delivery():
    plan = Router(TRANSPORTS, ()).plan([f"ops-hook:{i}" for i in range(200)] + ["ops-hook"], ())
    assert [(t.transport, t.recipient, t.error) for t in plan.targets] == [
        ("ops-hook", "ops-hook", "")]
    assert len(plan.duplicates) == 200


def test_config_reads_event_recipients(tree: Tree):
    tree.write_config("", daemon='event_recipients = ["#*", "*@corp.local"]')
    assert config.load(tree.config_path).event_recipients == ("#*", "*@corp.local")
    tree.write_config("")
    assert config.load(tree.config_path).event_recipients is None
    for bad in ('"#*"', '["#*", ""]', "[1]"):
        tree.write_config("", daemon=f"event_recipients = {bad}")
        with pytest.raises(ConfigError, match=r"daemon\.event_recipients"):
            config.load(tree.config_path)


def test_one_notice_cannot_fan_out_to_a_webhook(tree: Tree, http, inproc):
    tree.write_config(tree.webhook("hook", http.url()))
    tree.drop({"job_id": "j", "state": "NOTICE", "message": "hi",
               "recipients": [f"hook:{i}" for i in range(20)]})
    inproc().pump()
    assert [(r["recipient"], r["outcome"]) for r in tree.notifications()] == [("hook", "SENT")]
    assert len(http.requests) == 1


def test_daemon_records_a_recipient_an_event_may_not_name_as_failed(tree: Tree, http, inproc):
    tree.write_config(tree.slack("slack", http.url("/slack")) + tree.webhook("hook", http.url()),
                      daemon='event_recipients = ["#ops-*"]')
    tree.drop({"job_id": "j", "run_id": "r", "state": "FAILED",
               "alerts": {"recipients": ["#random", "#ops-1", "hook:x"]}})
    tree.drop({"job_id": "j", "state": "NOTICE", "message": "m", "recipients": ["@mallory"]})
    inproc().pump()
    rows = {(r["alert"], r["recipient"]): (r["outcome"], r["detail"]) for r in tree.notifications()}
    assert rows[("failed", "#random")] == ("FAILED_TRANSPORT", NOT_ALLOWED)
    assert rows[("failed", "#ops-1")][0] == "SENT"
    assert rows[("failed", "hook")][0] == "SENT"
    assert rows[("notice", "@mallory")] == ("FAILED_TRANSPORT", NOT_ALLOWED)
    assert [r.path for r in http.requests].count("/slack") == 1


def test_an_event_cannot_reach_an_address_by_hiding_it_beside_an_allowed_one():
    """The allow-list is checked on the address that would be mailed, never on the text as
    written: "mallory@…, alice@corp.local" used to match *@corp.local and mail mallory."""
    hidden = ["mallory@attacker.example, alice@corp.local",
              "mallory@attacker.example (alice@corp.local",
              "mallory@attacker.example (alice@corp.local)",
              "alice@corp.local <mallory@attacker.example>",
              "email:mallory@attacker.example, alice@corp.local"]
    for router in (Router(TRANSPORTS, RULES), Router(TRANSPORTS, RULES, ["*@corp.local"])):
        plan = router.plan(hidden, (), use_rules=False, from_event=True, catalogue=CATALOGUE)
        sent = [(t.written, t.recipient) for t in plan.targets if not t.error]
        assert all(r.endswith("@corp.local") for _w, r in sent), sent
        assert "mallory@attacker.example" not in {t.recipient for t in plan.targets
                                                  if not t.error}


def test_a_list_of_addresses_is_not_an_address(tree: Tree):
    assert email_address("a@corp.local, b@corp.local") is None
    assert email_address("a@corp.local <b@corp.local>") is None
    assert email_address('"Doe, Jo" <jo@corp.local>') == "jo@corp.local"
    tree.write_config('[transports.mail]\ntype = "email"\nhost = "127.0.0.1"\nport = 25\n'
                      'default_from = "a@corp.local, b@corp.local"\n')
    with pytest.raises(ConfigError, match=r"transports\.mail\.default_from must be an email"):
        config.load(tree.config_path)


@pytest.mark.parametrize("written", ['"evil\nBcc:x"@corp.local', '"a\u2028b"@corp.local',
                                     "a\x0bb@corp.local", '"=?utf-8?q?a=0Ab?="@corp.local'])
def test_an_address_with_a_control_character_or_an_encoded_word_is_not_an_address(written):
    """Quoted local parts let these through the address parser and the *@corp.local rule;
    the email package then refused to build the message ("internal error", a traceback in
    the log). They are no address: recorded as matching no transport, nothing sent."""
    assert email_address(written) is None
    router = Router(TRANSPORTS, RULES, ["*@corp.local"])
    plan = router.plan([written], (), use_rules=False, from_event=True, catalogue=CATALOGUE)
    assert [t.recipient for t in plan.targets if not t.error] == []

