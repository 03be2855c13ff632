"""SMTP email: multipart/alternative with the summary, the traceback and the run link."""

from __future__ import annotations

import contextlib
import hmac
import html
import smtplib
import socket
import ssl
import time
from collections.abc import Callable
from email.message import EmailMessage
from email.utils import formatdate, make_msgid, parseaddr
from typing import Any, cast

from nomaflowd.alerts import Alert, digest_by_job, digest_headline
from nomaflowd.resolve import LookupTimeout, bounded, open_socket
from nomaflowd.transports.base import (
    DEADLINES,
    DeliveryError,
    RateLimited,
    Rendered,
    Transport,
    TransportError,
    b64,
    describe_exception,
)


class _Utf8(str):
    """A str that smtplib's auth() encodes as UTF-8 where it asks for ASCII."""

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return str.encode(self, "utf-8", errors)


class _Smtp(smtplib.SMTP):
    """smtplib's client with the socket in `sock` from before its connect, so the deadline
    thread can cut the connect and the greeting (read inside connect(): a greeting that
    never ends held a send for good), and the name lookup bounded by the timeout too.

    AUTH sends the credentials as UTF-8 (RFC 4616 for PLAIN; what servers take for LOGIN
    and CRAM-MD5): smtplib encodes them as ASCII, and a password like `Grüße` failed every
    send with UnicodeEncodeError (python/cpython#73936)."""

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        self._host = host  # smtplib sets it only in __init__; TLS checks the name against it
        return open_socket(host, port, timeout, on_socket=self._watched)

    def _watched(self, sock: socket.socket) -> None:
        self.sock = sock

    def auth(self, mechanism: str, authobject: Any, *,
             initial_response_ok: bool = True) -> tuple[int, bytes]:
        def utf8(*challenge: bytes) -> str | None:
            answer = authobject(*challenge)
            return None if answer is None else _Utf8(answer)
        return super().auth(mechanism, cast(Any, utf8), initial_response_ok=initial_response_ok)

    # typeshed spells this as two overloads (None -> None, bytes -> str); one body serves both.
    def auth_cram_md5(self, challenge: bytes | None = None  # type: ignore[override]
                      ) -> str | None:
        if challenge is None:
            return None
        return self.user + " " + hmac.HMAC(self.password.encode("utf-8"), challenge,
                                           "md5").hexdigest()


class _SmtpTls(_Smtp, smtplib.SMTP_SSL):
    """Implicit TLS: the handshake, too, on the socket the deadline thread sees."""

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        raw = super()._get_socket(host, port, timeout)
        self.sock = self.context.wrap_socket(raw, server_hostname=self._host,
                                             do_handshake_on_connect=False)
        self.sock.do_handshake()
        return self.sock


_LOCAL_NAME: list[str] = []


def _find_local_name() -> str:
    """What smtplib gives EHLO: the host's FQDN, else its address as a domain literal."""
    name = socket.getfqdn()
    if "." not in name:
        address = "127.0.0.1"
        with contextlib.suppress(OSError):
            address = socket.gethostbyname(socket.gethostname())
        name = f"[{address}]"
    _LOCAL_NAME[:] = [name]
    return name


def _local_name(timeout: float) -> str:
    """smtplib's EHLO name, looked up once (smtplib asks the resolver on every connection)
    and within `timeout`: smtplib's own fallback while the resolver has no answer."""
    if _LOCAL_NAME:
        return _LOCAL_NAME[0]
    try:
        return bounded(_find_local_name, timeout)
    except LookupTimeout:
        return "[127.0.0.1]"


class Email(Transport):
    type = "email"

    def secrets(self) -> list[str]:
        """The password also as AUTH PLAIN and AUTH LOGIN send it: a server may quote the
        command it refuses."""
        out = super().secrets()
        password = self.settings.get("password")
        if password is not None and password.reveal():
            user, word = self.settings.get("username") or "", password.reveal()
            out += [b64(word), b64(f"\0{user}\0{word}")]
        return out

    def destination(self) -> str:
        s = self.settings
        return f"smtp://{s['host']}:{s['port']} ({s['tls']})"

    def render(self, alert: Alert, recipient: str) -> Rendered:
        """The message as an 8-bit server gets it (a 7-bit one gets it quoted-printable)."""
        return self._rendered(self._message(alert, recipient), recipient)

    def render_digest(self, alerts: list[Alert], recipient: str, digest_id: str
                      ) -> list[Rendered]:
        return [self._rendered(self._digest(alerts, recipient, digest_id), recipient)]

    def _rendered(self, msg: EmailMessage, recipient: str) -> Rendered:
        s = self.settings
        where = f"smtp://{s.get('host')}:{s.get('port')} RCPT TO:<{recipient}>"
        return Rendered(where, msg.as_bytes(), {k: str(msg[k]) for k in ("From", "To", "Subject")})

    def _message(self, alert: Alert, recipient: str, cte: str | None = None) -> EmailMessage:
        """The message; cte="quoted-printable" for a server that takes no 8-bit bodies."""
        msg = EmailMessage()
        subject_job = _header(alert.job_id) or _header(alert.get("transport")) or "transport check"
        msg["Subject"] = f"[Nomaflow] {alert.subject_word} {subject_job}"
        msg["From"] = self.settings["default_from"]
        msg["To"] = recipient
        self._headers(msg)
        summary = alert.summary()
        traceback = alert.get("traceback")
        lines = [summary]
        if traceback:
            lines += ["", traceback]
        if alert.url:
            lines += ["", f"{alert.link_text}: {alert.url}"]
        msg.set_content("\n".join(lines) + "\n", cte=cte)
        parts = [f"<p>{html.escape(summary)}</p>"]
        if traceback:
            parts.append(f"<pre><code>{html.escape(traceback)}</code></pre>")
        if alert.url:
            parts.append(f'<p><a href="{html.escape(alert.url, quote=True)}">'
                         f"{html.escape(alert.link_text)}</a></p>")
        msg.add_alternative(
            "<!doctype html><html><body>" + "\n".join(parts) + "</body></html>\n",
            subtype="html", cte=cte,
        )
        return msg

    def _headers(self, msg: EmailMessage) -> None:
        """Date, a Message-ID in the sender's domain, and Auto-Submitted (RFC 3834), so
        that vacation replies and auto-responders leave the alerts alone."""
        msg["Date"] = formatdate(usegmt=True)
        domain = parseaddr(self.settings["default_from"])[1].rpartition("@")[2]
        msg["Message-ID"] = make_msgid(domain=domain or "nomaflow")
        msg["Auto-Submitted"] = "auto-generated"

    def _context(self) -> ssl.SSLContext:
        """Verifying context: the system's CAs, or only `ca_file` for a private CA."""
        ca_file = self.settings.get("ca_file")
        return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)

    def send(self, alert: Alert, recipient: str) -> str:
        return self._deliver(lambda cte: self._message(alert, recipient, cte), recipient)

    def send_digest(self, alerts: list[Alert], recipient: str, digest_id: str) -> str:
        return self._deliver(lambda cte: self._digest(alerts, recipient, digest_id, cte),
                             recipient)

    def _digest(self, alerts: list[Alert], recipient: str, digest_id: str,
                cte: str | None = None) -> EmailMessage:
        """One mail for many alerts: the headline, then a table with a row per alert."""
        msg = EmailMessage()
        msg["Subject"] = f"[Nomaflow] DIGEST {len(alerts)} alerts"
        msg["From"] = self.settings["default_from"]
        msg["To"] = recipient
        self._headers(msg)
        headline = digest_headline(alerts)
        ordered = [a for _, group in digest_by_job(alerts) for a in group]
        text = [f"{headline} ({digest_id})", ""]
        rows = []
        for a in ordered:
            error = _header(a.get("error")[:DIGEST_ERROR_MAX])  # each alert has its row
            text.append(f"{a.subject_word:<13} {_header(a.job_id)}  run {a.run_id or '-'}"
                        + (f"  {error}" if error else "") + (f"  {a.url}" if a.url else ""))
            link = (f'<a href="{html.escape(a.url, quote=True)}">{html.escape(a.run_id or "")}'
                    "</a>" if a.url else html.escape(a.run_id or ""))
            rows.append(f"<tr><td>{html.escape(a.subject_word)}</td>"
                        f"<td>{html.escape(a.job_id)}</td><td>{link}</td>"
                        f"<td>{html.escape(error)}</td></tr>")
        msg.set_content("\n".join(text) + "\n", cte=cte)
        msg.add_alternative(
            f"<!doctype html><html><body><p>{html.escape(headline)}</p>"
            "<table><tr><th>alert</th><th>job</th><th>run</th><th>error</th></tr>"
            + "".join(rows) + "</table></body></html>\n", subtype="html", cte=cte)
        return msg

    def _deliver(self, build: Callable[[str | None], EmailMessage], recipient: str) -> str:
        s = self.settings
        deadline = time.monotonic() + self.timeout
        box: list[smtplib.SMTP] = []  # the watch must see the socket STARTTLS swaps in
        try:
            # Connect inside the watch so the timeout bounds the whole conversation, from the
            # TCP connect to the end of DATA, not each read on its own.
            with DEADLINES.watch(lambda: box[0].sock if box else None, deadline):
                name = _local_name(self.timeout / 2)
                if s["tls"] == "tls":
                    box.append(_SmtpTls(local_hostname=name, timeout=self.timeout,
                                        context=self._context()))
                else:
                    box.append(_Smtp(local_hostname=name, timeout=self.timeout))
                code, text = box[0].connect(s["host"], s["port"])
                if code != 220:  # smtplib checks the greeting only in its constructor
                    raise _Greeting(code, text)
                return self._converse(box[0], build, recipient)
        except _Greeting as exc:
            raise self._refused(exc.smtp_code, exc.smtp_error, "greeting") from None
        except smtplib.SMTPRecipientsRefused as exc:
            code, text = next(iter(exc.recipients.values()))
            raise self._refused(code, text, "recipient refused") from None
        except smtplib.SMTPSenderRefused as exc:
            if exc.smtp_code in AUTH_CODES:
                raise TransportError(f"authentication or TLS required: SMTP {exc.smtp_code} "
                                     f"{self._text(exc.smtp_error)}") from None
            raise self._refused(exc.smtp_code, exc.smtp_error, "message too large"
                                if exc.smtp_code == 552 else "sender refused") from None
        except smtplib.SMTPDataError as exc:
            raise self._refused(exc.smtp_code, exc.smtp_error, "message rejected") from None
        except smtplib.SMTPAuthenticationError as exc:
            raise TransportError(f"authentication failed: SMTP {exc.smtp_code} "
                                 f"{self._text(exc.smtp_error)}") from None
        except smtplib.SMTPResponseException as exc:
            if time.monotonic() >= deadline:
                raise TransportError(f"timed out after {self.timeout:g}s") from None
            if exc.smtp_code == SERVICE_NOT_AVAILABLE:
                raise self._refused(exc.smtp_code, exc.smtp_error, "closing") from None
            raise TransportError(f"SMTP {exc.smtp_code} {self._text(exc.smtp_error)}") from None
        except (OSError, smtplib.SMTPException) as exc:
            if isinstance(exc, LookupTimeout):
                raise TransportError(f"timed out after {self.timeout:g}s (DNS lookup)") from None
            if time.monotonic() >= deadline:
                raise TransportError(f"timed out after {self.timeout:g}s") from None
            if isinstance(exc, smtplib.SMTPException) and str(exc):  # smtplib's own words
                raise TransportError(f"{type(exc).__name__}: {self._text(exc)}") from None
            raise TransportError(describe_exception(exc)) from None
        finally:
            for smtp in box:
                with contextlib.suppress(OSError):  # the connection is gone either way
                    smtp.close()

    def _text(self, value: Any) -> str:
        """A server's words for the row: one line, the secrets masked before the cut (a
        refusal quoting AUTH PLAIN after 170 characters kept most of the password)."""
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        return self.mask(str(value).replace("\r", " ").replace("\n", " "))[:TEXT_MAX]

    def _refused(self, code: int, text: Any, what: str) -> DeliveryError:
        """An answer refusing the send. 421 is the server closing the connection, not
        judging the message: "too many connections", "shutting down". It is SMTP's 429,
        so the alert waits in line and goes again (README, pacing)."""
        words = f"SMTP {code} {self._text(text)}"
        if code == SERVICE_NOT_AVAILABLE:
            if what != "greeting":
                what = "service not available"
            return RateLimited(f"{words} ({what})", BUSY_PAUSE)
        return DeliveryError(f"{words} ({what})")

    def _converse(self, smtp: smtplib.SMTP, build: Callable[[str | None], EmailMessage],
                  recipient: str) -> str:
        s = self.settings
        smtp.ehlo_or_helo_if_needed()
        if s["tls"] == "starttls":
            # Never fall back to plain text: a server that offers no STARTTLS gets no mail.
            if not smtp.has_extn("starttls"):
                raise TransportError("TLS: the server does not offer STARTTLS (set tls = "
                                     '"tls" for port 465, or "none" to send unencrypted)')
            try:
                smtp.starttls(context=self._context())
            except smtplib.SMTPResponseException as exc:
                raise TransportError(f"TLS: STARTTLS refused: SMTP {exc.smtp_code} "
                                     f"{self._text(exc.smtp_error)}") from None
            smtp.ehlo()
        if s.get("username"):
            if not smtp.has_extn("auth"):
                raise TransportError("authentication: the server offers no AUTH"
                                     + (" before TLS" if s["tls"] == "none" else ""))
            password = s.get("password")
            smtp.login(s["username"], password.reveal() if password else "")
        sender = parseaddr(s["default_from"])[1]
        # smtplib sends 8-bit bodies without declaring them (it only does for SMTPUTF8
        # addresses): declare it, or fall back to 7-bit for a server without 8BITMIME.
        options: list[str] = []
        if not smtp.has_extn("8bitmime"):
            msg = build("quoted-printable")
        else:
            msg = build(None)
            if (sender + recipient).isascii():
                options = ["BODY=8BITMIME"]
        refused = smtp.send_message(msg, from_addr=sender, to_addrs=[recipient],
                                    mail_options=options)
        if refused:
            code, text = next(iter(refused.values()))
            raise self._refused(code, text, "recipient refused")
        # The message was accepted; a rude goodbye changes nothing.
        with contextlib.suppress(OSError, smtplib.SMTPException):
            smtp.quit()
        return "SMTP 250 accepted"


# A digest line's error, in characters: 40 alerts with 900 KB errors made a 74 MB message
# (Postfix takes 10 MB by default). The whole error is in each alert's own email and row.
DIGEST_ERROR_MAX = 500

# "Authentication required" / "encryption required for this mechanism" (RFC 4954 §6), and
# "Must issue a STARTTLS command first" (RFC 3207).
AUTH_CODES = frozenset({530, 538})

# "Service not available, closing transmission channel" (RFC 5321 §3.8), at any step.
SERVICE_NOT_AVAILABLE = 421
# How long a lane waits after a 421 (SMTP names no time): a relay's connection limit clears
# as soon as the other sends end, which the lane also waits for.
BUSY_PAUSE = 2.0

# A server's words in a row, in characters.
TEXT_MAX = 200


def _header(value: str) -> str:
    """One line for a header: a CR or LF from an event must not start a new header, and an
    RFC 2047 encoded word in it stays text. Python's email package decodes `=?utf-8?b?...?=`
    in a header it is given, and before 3.11.10 (CVE-2024-6923) wrote a CR LF decoded from
    one out raw; a zero-width space after `=` leaves nothing to decode, and reads the same."""
    return " ".join(value.splitlines()).strip().replace("=?", "=\u200b?")


class _Greeting(smtplib.SMTPResponseException):
    """The server's first words were not 220."""
