"""`nomaflowd test` and `nomaflowd transports`, in-process, against real local servers."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from nomaflowd.cli import main
from tests.servers import Reply, closed_port
from tests.smtp_server import SmtpRecorder

HOOK_PATH = "/services/T000/B000/CANARYSECRET"
PASSWORD = "pw-CANARY-7731"


@pytest.fixture
def smtp() -> Iterator[SmtpRecorder]:
    server = SmtpRecorder()
    yield server
    server.close()


def email_block(port: int, extra: str = "") -> str:
    return ('[transports.mail]\ntype = "email"\nhost = "127.0.0.1"\n'
            f'port = {port}\ntls = "none"\ndefault_from = "nomaflow@corp.test"\n{extra}\n')


def run(tree: Any, *argv: str) -> int:
    return main([*argv, "--config", str(tree.config_path)])


# --- nomaflowd test --------------------------------------------------------------------------

@pytest.mark.parametrize("to", ["hook:foo", "foo", "hook"])
def test_test_to_a_webhook_is_the_webhook_whatever_to_says(tree, http, capsys, to):
    """As in an event file: a webhook's recipient is the webhook (hook:anything is hook)."""
    tree.write_config(tree.webhook("hook", http.url()))
    assert run(tree, "test", "hook", "--to", to) == 0
    assert capsys.readouterr().out.startswith("SENT hook -> hook: HTTP 200")
    assert [r["recipient"] for r in tree.notifications()] == ["hook"]


def test_test_slack_sends_records_and_exits_0(tree, http, capsys):
    tree.write_config(tree.slack("slack", http.url(HOOK_PATH)))
    assert run(tree, "test", "slack") == 0
    out = capsys.readouterr()
    assert out.out.splitlines() == ["SENT slack -> (webhook channel): HTTP 200 ok"]
    assert out.err == ""
    body = http.wait_for(1)[0].json()
    assert body["text"] == "\U0001f514 test from Nomaflow <https://nomaflow.test|Open Nomaflow>"
    assert "channel" not in body  # no default_channel: the webhook's own channel
    [row] = tree.notifications()
    assert (row["alert"], row["level"], row["transport"], row["transport_type"],
            row["outcome"], row["detail"]) == ("test", "low", "slack", "slack", "SENT",
                                               "HTTP 200 ok")
    assert row["job_id"] is None and row["replica"]


def test_test_slack_uses_default_channel(tree, http, capsys):
    tree.write_config(tree.slack("slack", http.url(HOOK_PATH), 'default_channel = "#alerts"'))
    assert run(tree, "test", "slack") == 0
    assert "SENT slack -> #alerts" in capsys.readouterr().out
    assert http.wait_for(1)[0].json()["channel"] == "#alerts"


def test_test_slack_to_other_channel(tree, http, capsys):
    tree.write_config(tree.slack("slack", http.url(HOOK_PATH), 'default_channel = "#alerts"'))
    assert run(tree, "test", "slack", "--to", "#other") == 0
    assert http.wait_for(1)[0].json()["channel"] == "#other"
    assert [r["recipient"] for r in tree.notifications()] == ["#other"]
    assert "-> #other" in capsys.readouterr().out


def test_test_slack_404_exits_1_with_slack_error(tree, http, capsys):
    http.default = Reply(404, b"channel_not_found")
    tree.write_config(tree.slack("slack", http.url(HOOK_PATH)))
    assert run(tree, "test", "slack", "--to", "#gone") == 1
    out = capsys.readouterr().out
    assert out.startswith("FAILED_DELIVERY slack -> #gone:")
    assert "404" in out and "channel_not_found" in out
    [row] = tree.notifications()
    assert (row["alert"], row["outcome"]) == ("test", "FAILED_DELIVERY")


def test_test_refused_port_exits_1_failed_transport(tree, capsys):
    tree.write_config(tree.slack("slack", f"http://127.0.0.1:{closed_port()}{HOOK_PATH}"))
    assert run(tree, "test", "slack") == 1
    assert capsys.readouterr().out.startswith("FAILED_TRANSPORT slack ->")
    assert [r["outcome"] for r in tree.notifications()] == ["FAILED_TRANSPORT"]


def test_test_unknown_host_exits_1_failed_transport(tree, capsys):
    """README: no verdict from the upstream (DNS among them) is FAILED_TRANSPORT."""
    tree.write_config(tree.webhook("hook", "http://nomaflowd-test.invalid/hook"))
    assert run(tree, "test", "hook") == 1
    out = capsys.readouterr().out
    assert out.startswith("FAILED_TRANSPORT hook ->"), out
    [row] = tree.notifications()
    assert row["outcome"] == "FAILED_TRANSPORT"
    assert row["detail"] == "DNS lookup failed"


def test_test_unknown_transport_exits_2_with_one_line(tree, http, capsys):
    tree.write_config(tree.slack("slack", http.url(HOOK_PATH)))
    assert run(tree, "test", "slak") == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.splitlines() == ["nomaflowd: no transport named 'slak' (have: slack)"]
    assert http.requests == []


def test_test_recipient_of_the_wrong_kind_exits_2(tree, http, capsys):
    tree.write_config(tree.slack("slack", http.url(HOOK_PATH)))
    assert run(tree, "test", "slack", "--to", "alice@corp.test") == 2
    assert "not a slack recipient" in capsys.readouterr().err
    assert http.requests == []


def test_test_email_to_address(tree, smtp, capsys):
    tree.write_config(email_block(smtp.port))
    assert run(tree, "test", "mail", "--to", "Alice <Alice@Corp.test>") == 0
    assert capsys.readouterr().out.startswith("SENT mail -> alice@corp.test:")
    [got] = smtp.wait_for(1)
    assert got.rcpt_tos == ["alice@corp.test"]
    assert got.message["Subject"] == "[Nomaflow] TEST transport check"
    assert "test from Nomaflow" in got.part("text/plain")
    assert [(r["alert"], r["transport_type"], r["outcome"]) for r in tree.notifications()] == [
        ("test", "email", "SENT")]


def test_test_email_default_recipient(tree, smtp, capsys):
    tree.write_config(email_block(smtp.port, 'default_recipient = "data@corp.test"'))
    assert run(tree, "test", "mail") == 0
    assert smtp.wait_for(1)[0].rcpt_tos == ["data@corp.test"]


def test_test_works_while_the_daemon_runs(tree, http, daemon_factory, capsys):
    tree.write_config(tree.slack("slack", http.url(HOOK_PATH)))
    d = daemon_factory()
    assert run(tree, "test", "slack") == 0
    assert "SENT" in capsys.readouterr().out
    assert [r["alert"] for r in tree.notifications()] == ["test"]
    assert d.stop() == 0


# --- nomaflowd transports --------------------------------------------------------------------

def test_transports_lists_each_with_last_outcome_and_masks_secrets(tree, http, smtp, capsys):
    login = f'username = "nomaflow"\npassword = "{tree.enc(PASSWORD)}"'
    tree.write_config(
        tree.slack("slack", http.url(HOOK_PATH), 'default_channel = "#nomaflow-alerts"')
        + email_block(smtp.port, login)
        + tree.webhook("opsgenie", f"http://127.0.0.1:{closed_port()}/v2/alerts/CANARYHOOK"))
    assert run(tree, "test", "slack") == 0
    assert run(tree, "test", "opsgenie") == 1
    capsys.readouterr()

    assert run(tree, "transports") == 0
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert lines[0].split() == ["NAME", "TYPE", "DEFAULT", "RECIPIENT", "SENDS", "TO", "LAST",
                                "ATTEMPT"]
    by_name = {line.split()[0]: line for line in lines[1:]}
    assert set(by_name) == {"slack", "mail", "opsgenie"}
    slack = by_name["slack"].split()
    assert slack[:4] == ["slack", "slack", "#nomaflow-alerts", f"http://127.0.0.1:{http.port}"]
    assert slack[4:6] == ["SENT", "at"]
    mail = by_name["mail"]
    assert mail.split()[:4] == ["mail", "email", "nomaflow@corp.test",
                                f"smtp://127.0.0.1:{smtp.port}"]
    assert mail.rstrip().endswith("never used")
    assert by_name["opsgenie"].split()[1:3] == ["webhook", "opsgenie"]
    assert "FAILED_TRANSPORT at" in by_name["opsgenie"]
    for secret in ("CANARYSECRET", "CANARYHOOK", "/services/", PASSWORD):
        assert secret not in out.out + out.err
    for row in tree.notifications():
        assert "CANARY" not in str(row)


def test_transports_last_attempt_is_the_latest(tree, http, capsys):
    tree.write_config(tree.slack("slack", http.url(HOOK_PATH)))
    assert run(tree, "test", "slack") == 0
    http.default = Reply(410, b"channel_is_archived")
    assert run(tree, "test", "slack") == 1
    capsys.readouterr()
    assert run(tree, "transports") == 0
    [line] = capsys.readouterr().out.splitlines()[1:]
    assert "FAILED_DELIVERY at" in line and "SENT" not in line


def test_transports_with_none_configured(tree, capsys):
    tree.write_config()
    assert run(tree, "transports") == 0
    assert capsys.readouterr().out == "no transports configured\n"

