"""Email transport against a real local SMTP server (aiosmtpd): TLS modes, AUTH, refusals."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nomaflowd import config
from nomaflowd.dispatch import FAILED_DELIVERY, FAILED_TRANSPORT, SENT, Attempt, Dispatcher
from nomaflowd.transports import build
from nomaflowd.transports.base import b64
from nomaflowd.transports.email import Email
from tests.servers import ScriptedSmtp, SmtpTarpit, closed_port
from tests.smtp_server import Certs, SmtpRecorder, make_certs
from tests.test_transport_slack import RUN_URL, make_alert

PASSWORD = "s3cret-CANARY-pw"
TRACEBACK = ('Traceback (most recent call last):\n  File "sync.py", line 3, in <module>\n'
             "    copy(a & b)\nOperationalError: connection refused")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def smtp_factory() -> Iterator[Any]:
    made: list[SmtpRecorder] = []

    def make(**kwargs: Any) -> SmtpRecorder:
        server = SmtpRecorder(**kwargs)
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()


class EmailRig:
    """An email transport built from a real config file, and a dispatcher around it."""

    def __init__(self, tree: Any, port: int, settings: str, timeout: float) -> None:
        body = ('[transports.mail]\ntype = "email"\nhost = "127.0.0.1"\n'
                f'port = {port}\ndefault_from = "Nomaflow <nomaflow@corp.test>"\n{settings}\n')
        self.cfg = config.load(tree.write_config(body))
        self.transports = build(self.cfg.transports, timeout)
        self.transport = self.transports["mail"]
        self.dispatcher = Dispatcher(self.transports, "test-replica")

    def attempt(self, kind: str = "failed", recipient: str = "data-team@corp.test",
                **fields: Any) -> Any:
        fields.setdefault("traceback", TRACEBACK)
        alert = make_alert(kind, minutes=45, **fields)
        return self.dispatcher.attempt(Attempt(alert, "mail", recipient))


@pytest.fixture
def rig_factory(tree: Any) -> Iterator[Any]:
    made: list[EmailRig] = []

    def make(port: int, settings: str = "", timeout: float = 3) -> EmailRig:
        rig = EmailRig(tree, port, settings, timeout)
        made.append(rig)
        return rig

    yield make
    for rig in made:
        rig.dispatcher.close()


def trusted(certs: Certs, tls: str = "starttls") -> str:
    return f'tls = "{tls}"\nca_file = "{certs.ca_file}"\n'


def with_login(tree: Any, password: str = PASSWORD) -> str:
    return f'username = "nomaflow"\npassword = "{tree.enc(password)}"\n'


# --- delivered -----------------------------------------------------------------------------

def test_email_starttls_with_private_ca_is_sent_as_specified(smtp_factory, rig_factory, certs):
    smtp = smtp_factory(starttls=certs)
    result = rig_factory(smtp.port, trusted(certs)).attempt()
    assert (result.outcome, result.transport_type) == (SENT, "email"), result.detail
    [got] = smtp.wait_for(1)
    assert got.tls
    assert got.mail_from == "nomaflow@corp.test"
    assert got.rcpt_tos == ["data-team@corp.test"]
    msg = got.message
    assert msg["Subject"] == "[Nomaflow] FAILED reporting-nightly-sync"
    assert msg["From"] == "Nomaflow <nomaflow@corp.test>"
    assert msg["To"] == "data-team@corp.test"
    assert msg.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/plain", "text/html"]
    summary = ("\u274c reporting-nightly-sync run failed at step copy-orders \u00b7 "
               "OperationalError: connection refused")
    text = got.part("text/plain")
    assert text.startswith(summary + "\n")
    assert TRACEBACK in text
    assert f"View run: {RUN_URL}" in text
    page = got.part("text/html")
    assert f"<p>{summary}</p>" in page
    assert ("<pre><code>Traceback (most recent call last):\n  File &quot;sync.py&quot;, line 3,"
            " in &lt;module&gt;\n    copy(a &amp; b)\nOperationalError: connection refused"
            "</code></pre>") in page
    assert "<module>" not in page
    assert f'<a href="{RUN_URL}">View run</a>' in page
    assert "BODY=8BITMIME" in got.mail_options  # the icon is 8-bit: declared, not smuggled


def test_email_implicit_tls_is_sent(smtp_factory, rig_factory, certs):
    smtp = smtp_factory(implicit_tls=certs)
    result = rig_factory(smtp.port, trusted(certs, "tls")).attempt()
    assert result.outcome == SENT, result.detail
    assert smtp.wait_for(1)[0].tls


def test_email_tls_none_is_sent_in_plain_text(smtp_factory, rig_factory):
    smtp = smtp_factory()
    result = rig_factory(smtp.port, 'tls = "none"\n').attempt()
    assert result.outcome == SENT, result.detail
    assert not smtp.wait_for(1)[0].tls


def test_email_auth_with_right_password_is_sent(smtp_factory, rig_factory, certs, tree):
    smtp = smtp_factory(starttls=certs, users={"nomaflow": PASSWORD})
    result = rig_factory(smtp.port, trusted(certs) + with_login(tree)).attempt()
    assert result.outcome == SENT, result.detail
    assert smtp.wait_for(1)[0].login == "nomaflow"


def test_email_auth_with_wrong_password_is_failed_transport(smtp_factory, rig_factory, certs,
                                                            tree):
    smtp = smtp_factory(starttls=certs, users={"nomaflow": PASSWORD})
    result = rig_factory(smtp.port, trusted(certs) + with_login(tree, "wrong-CANARY")).attempt()
    assert result.outcome == FAILED_TRANSPORT
    assert "authentication" in result.detail and "535" in result.detail
    assert "CANARY" not in result.detail
    assert smtp.auth_attempts and not any(ok for _, ok in smtp.auth_attempts)
    assert smtp.messages == []


def test_email_auth_required_without_username_is_failed_transport(smtp_factory, rig_factory,
                                                                  certs):
    smtp = smtp_factory(starttls=certs, users={"nomaflow": PASSWORD})
    result = rig_factory(smtp.port, trusted(certs)).attempt()
    assert result.outcome == FAILED_TRANSPORT
    assert "authentication" in result.detail and "530" in result.detail


def test_email_recipient_refused_is_failed_delivery(smtp_factory, rig_factory, certs):
    smtp = smtp_factory(starttls=certs, refuse={"gone@corp.test"})
    result = rig_factory(smtp.port, trusted(certs)).attempt(recipient="gone@corp.test")
    assert result.outcome == FAILED_DELIVERY
    assert "550" in result.detail and "recipient" in result.detail
    assert smtp.messages == []


def test_email_rejected_message_is_failed_delivery(smtp_factory, rig_factory, certs):
    smtp = smtp_factory(starttls=certs, reject_data="554 5.7.1 Message rejected as spam")
    result = rig_factory(smtp.port, trusted(certs)).attempt()
    assert result.outcome == FAILED_DELIVERY
    assert "554" in result.detail and "rejected as spam" in result.detail


# --- what relays say that aiosmtpd does not --------------------------------------------------

@pytest.mark.parametrize("greeting", ["421 4.7.0 mx.test Too many concurrent SMTP connections",
                                      "554 5.7.1 mx.test You are not welcome here"])
def test_email_a_greeting_refusal_is_recorded_with_its_words(rig_factory, greeting):
    """The greeting's code and text reach the row (it said `SMTPServerDisconnected`)."""
    relay = ScriptedSmtp(greeting=greeting)
    try:
        result = rig_factory(relay.port, 'tls = "none"\n').attempt()
    finally:
        relay.close()
    assert result.outcome == FAILED_DELIVERY
    assert result.detail == f"SMTP {greeting} (greeting)"


def test_email_421_at_rcpt_is_the_relay_closing_not_the_recipient_refused(rig_factory):
    relay = ScriptedSmtp(answer=lambda line: "421 4.3.2 mx.test shutting down"
                         if line.upper().startswith("RCPT") else None)
    try:
        result = rig_factory(relay.port, 'tls = "none"\n').attempt()
    finally:
        relay.close()
    assert result.outcome == FAILED_DELIVERY
    assert result.detail == "SMTP 421 4.3.2 mx.test shutting down (service not available)"


def test_email_a_non_ascii_password_logs_in(smtp_factory, rig_factory, certs, tree):
    """RFC 4616: PLAIN is UTF-8. smtplib encodes it as ASCII and raised UnicodeEncodeError,
    so every email of the transport failed as an internal error."""
    smtp = smtp_factory(starttls=certs, users={"nomaflow": "Grüße-aus-Köln-CANARY"})
    result = rig_factory(smtp.port, trusted(certs)
                         + with_login(tree, "Grüße-aus-Köln-CANARY")).attempt()
    assert result.outcome == SENT, result.detail
    assert smtp.wait_for(1)[0].login == "nomaflow"


def test_email_a_refusal_quoting_the_auth_command_late_shows_no_piece_of_it(rig_factory, tree):
    """The server's words are cut for the row; the quoted AUTH PLAIN must be masked before
    the cut, or its first characters (most of the password) stay readable."""
    relay = ScriptedSmtp(answer=lambda line: f"535 5.7.8 {'x' * 150} {line}"
                         if line.startswith("AUTH") else None, extensions=("AUTH PLAIN",))
    try:
        result = rig_factory(relay.port, 'tls = "none"\n' + with_login(tree)).attempt()
    finally:
        relay.close()
    assert result.outcome == FAILED_TRANSPORT
    plain = b64(f"\0nomaflow\0{PASSWORD}")
    assert "535 5.7.8 xxx" in result.detail
    assert not any(plain[i:i + 8] in result.detail for i in range(len(plain) - 8))


def test_email_a_recipient_the_relay_cannot_take_says_why(rig_factory):
    """smtplib's own messages reach the row (it said only `SMTPNotSupportedError`)."""
    relay = ScriptedSmtp()  # no SMTPUTF8 on offer
    try:
        result = rig_factory(relay.port, 'tls = "none"\n').attempt(recipient="jörg@corp.test")
    finally:
        relay.close()
    assert result.outcome == FAILED_TRANSPORT
    assert "SMTPUTF8" in result.detail, result.detail


def test_email_marks_itself_automatic_so_vacation_replies_stay_away(smtp_factory, rig_factory):
    """RFC 3834: an auto-responder does not answer mail marked Auto-Submitted."""
    smtp = smtp_factory()
    assert rig_factory(smtp.port, 'tls = "none"\n').attempt().outcome == SENT
    [mail] = smtp.wait_for(1)
    assert mail.message["Auto-Submitted"] == "auto-generated"
    assert mail.message["Message-ID"].endswith("@corp.test>")


# --- no verdict ------------------------------------------------------------------------------

def test_email_untrusted_certificate_is_failed_transport(smtp_factory, rig_factory, certs):
    smtp = smtp_factory(starttls=certs)
    result = rig_factory(smtp.port, 'tls = "starttls"\n').attempt()
    assert result.outcome == FAILED_TRANSPORT
    assert "TLS" in result.detail and "CERTIFICATE_VERIFY_FAILED" in result.detail
    assert smtp.messages == []


def test_email_untrusted_certificate_with_implicit_tls_is_failed_transport(smtp_factory,
                                                                           rig_factory, certs):
    smtp = smtp_factory(implicit_tls=certs)
    result = rig_factory(smtp.port, 'tls = "tls"\n').attempt()
    assert result.outcome == FAILED_TRANSPORT
    assert "TLS" in result.detail


def test_email_starttls_not_offered_is_failed_transport_never_plain(smtp_factory, rig_factory,
                                                                    certs):
    smtp = smtp_factory()  # no STARTTLS on offer
    result = rig_factory(smtp.port, trusted(certs)).attempt()
    assert result.outcome == FAILED_TRANSPORT
    assert "STARTTLS" in result.detail
    assert smtp.messages == []


def test_email_refused_port_is_failed_transport(rig_factory):
    result = rig_factory(closed_port(), 'tls = "none"\n').attempt()
    assert result.outcome == FAILED_TRANSPORT
    assert "refused" in result.detail


@pytest.mark.parametrize("mode", ["none", "tls"])
def test_email_timeout_bounds_the_whole_conversation(smtp_factory, rig_factory, certs, mode):
    # Each reply alone comes within the timeout; together they do not.
    tls = {"implicit_tls": certs} if mode == "tls" else {}
    smtp = smtp_factory(delays={"RCPT": 0.3, "DATA": 0.3}, **tls)
    rig = rig_factory(smtp.port, trusted(certs, mode), timeout=0.45)
    result = rig.attempt()
    assert result.outcome == FAILED_TRANSPORT
    assert "timed out" in result.detail
    assert result.duration_ms < 1000


@pytest.mark.parametrize("mode", ["none", "starttls", "tls"])
def test_email_a_greeting_that_never_ends_is_cut_at_the_timeout(rig_factory, certs, mode):
    # Each line of the greeting comes within the timeout, and the greeting never ends.
    tarpit = SmtpTarpit(certs.server_context() if mode == "tls" else None)
    try:
        rig = rig_factory(tarpit.port, trusted(certs, mode), timeout=0.45)
        result = rig.attempt()
        assert tarpit.greeted.is_set()
        assert result.outcome == FAILED_TRANSPORT
        assert result.detail == "timed out after 0.45s"
        assert result.duration_ms < 1000
    finally:
        tarpit.close()


# --- rendering -------------------------------------------------------------------------------

@pytest.mark.parametrize(("kind", "word"), [
    ("failed", "FAILED"), ("long_run", "LONG-RUNNING"), ("succeeded", "SUCCEEDED"),
    ("cancelled", "CANCELLED"), ("enabled", "ENABLED"), ("disabled", "DISABLED"),
])
def test_email_subject_word_per_kind(kind, word):
    transport = Email("mail", {"default_from": "nomaflow@corp.test"}, timeout=1)
    msg = parsed(transport.render(make_alert(kind, minutes=45, by="alice"), "a@corp.test"))
    assert msg["Subject"] == f"[Nomaflow] {word} reporting-nightly-sync"


def test_email_job_id_cannot_inject_headers():
    transport = Email("mail", {"default_from": "nomaflow@corp.test"}, timeout=1)
    alert = make_alert("failed")
    alert = type(alert)(**{**alert.__dict__, "job_id": "x\r\nBcc: evil@x.test"})
    msg = parsed(transport.render(alert, "a@corp.test"))
    assert msg["Bcc"] is None
    assert "\n" not in msg["Subject"] and "\r" not in msg["Subject"]


@pytest.mark.parametrize("job_id", [
    "=?utf-8?b?eA0KUmVwbHktVG86IGV2aWxAeC50ZXN0DQoNCllvdXIgcGFzc3dvcmQgZXhwaXJlZA==?=",
    "=?utf-8?q?x=0D=0ABcc:_evil@x.test?=",
])
def test_email_encoded_word_in_a_job_id_stays_text(smtp_factory, rig_factory, job_id):
    """An RFC 2047 encoded word is printable ASCII, so an event may carry one; Python's email
    package (before 3.11.10) decoded it in the Subject and wrote its CR LF out raw: a
    runner's Reply-To, Bcc and body. The Subject must read as the job id, literally."""
    smtp = smtp_factory()
    result = rig_factory(smtp.port, 'tls = "none"').attempt(job_id=job_id)
    assert result.outcome == SENT, result.detail
    [got] = smtp.wait_for(1)
    assert got.message["Reply-To"] is None and got.message["Bcc"] is None
    assert got.message["From"] == "Nomaflow <nomaflow@corp.test>"
    shown = got.message["Subject"].replace("\u200b", "")
    assert shown == f"[Nomaflow] FAILED {job_id}"
    assert "password expired" not in got.part("text/plain")


def parsed(rendered: Any) -> Any:
    """The rendered message as a mail client reads it."""
    import email
    import email.policy

    return email.message_from_bytes(rendered.body, policy=email.policy.default)


@pytest.mark.parametrize(("settings", "expected"), [
    ({"default_from": "Nomaflow <Nomaflow@Corp.test>"}, "nomaflow@corp.test"),
    ({"default_from": "nomaflow@corp.test", "default_recipient": "Data <data@corp.test>"},
     "data@corp.test"),
])
def test_email_default_recipient(settings, expected):
    from nomaflowd.config import TransportConfig
    from nomaflowd.routing import default_recipient

    assert default_recipient(TransportConfig("mail", "email", settings)) == expected


def test_email_destination_masks_the_password(rig_factory, tree, certs):
    rig = rig_factory(2525, trusted(certs) + with_login(tree))
    assert rig.transport.destination() == "smtp://127.0.0.1:2525 (starttls)"
    assert PASSWORD not in str(rig.transport)


def test_email_ca_file_resolves_against_the_config(rig_factory, certs, tree):
    local = Path(tree.etc) / "private-ca.pem"
    local.write_bytes(certs.ca_file.read_bytes())
    rig = rig_factory(2525, 'ca_file = "private-ca.pem"\n')
    assert rig.transport.settings["ca_file"] == local


@pytest.mark.parametrize("jobs", [40, 2000])
def test_email_digest_names_every_job(smtp_factory, rig_factory, jobs):
    smtp = smtp_factory()
    rig = rig_factory(smtp.port, 'tls = "none"\n')
    batch = [make_alert("failed", job_id=f"nightly-{j:04d}-sync", run_id=f"r{j}")
             for j in range(jobs)]
    members = tuple(Attempt(a, "mail", "data-team@corp.test") for a in batch)
    results = rig.dispatcher.execute(Attempt(batch[0], "mail", "data-team@corp.test",
                                             members=members, digest_id="digest-0000abcd"))
    assert {r.outcome for r in results} == {SENT}, results[0].detail
    [mail] = smtp.wait_for(1)
    assert mail.message["Subject"] == f"[Nomaflow] DIGEST {jobs} alerts"
    for part in ("text/plain", "text/html"):
        body = mail.part(part)
        assert [j for j in range(jobs) if f"nightly-{j:04d}-sync" not in body] == [], part


def test_email_digest_of_huge_errors_stays_a_size_a_server_takes(smtp_factory, rig_factory):
    """40 alerts with 900 KB errors made a 74 MB digest (Postfix takes 10 MB by default):
    each line's error is clipped, as a digest line is in chat."""
    smtp = smtp_factory()
    rig = rig_factory(smtp.port, 'tls = "none"\n')
    batch = [make_alert("failed", job_id=f"job-{j}", run_id=f"r{j}", error="E" * 900_000)
             for j in range(40)]
    members = tuple(Attempt(a, "mail", "data-team@corp.test") for a in batch)
    results = rig.dispatcher.execute(Attempt(batch[0], "mail", "data-team@corp.test",
                                             members=members, digest_id="digest-0000abcd"))
    assert {r.outcome for r in results} == {SENT}, results[0].detail
    [mail] = smtp.wait_for(1)
    assert len(mail.message.as_bytes()) < 1_000_000
    assert all(f"job-{j}" in mail.part("text/plain") for j in range(40))


# --- a relay's limits, end to end ------------------------------------------------------------

def test_a_relay_taking_one_connection_at_a_time_gets_every_alert(tree, inproc):
    """The senders open connections side by side; a relay allowing one answers the others
    421 "too many connections". Those alerts wait in line, as after a 429, and go again:
    all twelve arrive (eleven were recorded FAILED_TRANSPORT `SMTPServerDisconnected`)."""
    relay = ScriptedSmtp(max_connections=1)
    try:
        tree.write_config('[transports.mail]\ntype = "email"\nhost = "127.0.0.1"\n'
                          f'port = {relay.port}\ntls = "none"\n'
                          'default_from = "Nomaflow <nomaflow@corp.test>"\n')
        tree.write_jobs('[jobs.sync.alerts]\nrecipients = ["ops@corp.test"]\n')
        d = inproc()
        for i in range(12):
            tree.drop({"job_id": "sync", "run_id": f"run-{i:02d}", "state": "FAILED",
                       "error": "boom"})
        d.pump(lambda: len(tree.notifications()) == 12, timeout=30, what="twelve rows")
    finally:
        relay.close()
    assert relay.refused > 0  # the limit was met
    assert {r["outcome"] for r in tree.notifications()} == {"SENT"}
    arrived = b"".join(relay.messages)
    assert all(f"run-{i:02d}".encode() in arrived for i in range(12))
    refused = [r for r in tree.notifications() if "421" in r["detail"]]
    assert refused and all("refused with SMTP 421 4.7.0" in r["detail"] for r in refused)
