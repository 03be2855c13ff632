"""SMTP email: multipart/alternative with the summary, the traceback and the run link."""

from __future__ import annotations

import html
import smtplib
import ssl
import time
from email.message import EmailMessage
from email.utils import formatdate, make_msgid, parseaddr
from typing import Any

from nomaflowd.alerts import Alert
from nomaflowd.transports.base import (
    DEADLINES,
    DeliveryError,
    Transport,
    TransportError,
    describe_exception,
)


class Email(Transport):
    type = "email"

    def default_recipient(self) -> str:
        s = self.settings
        return parseaddr(s.get("default_recipient") or s["default_from"])[1].lower()

    def destination(self) -> str:
        s = self.settings
        return f"smtp://{s['host']}:{s['port']} ({s['tls']})"

    def render(self, alert: Alert, recipient: str) -> EmailMessage:
        msg = EmailMessage()
        subject_job = alert.job_id or "transport check"
        msg["Subject"] = f"[Nomaflow] {alert.subject_word} {subject_job}".replace("\n", " ")
        msg["From"] = self.settings["default_from"]
        msg["To"] = recipient
        msg["Date"] = formatdate(usegmt=True)
        msg["Message-ID"] = make_msgid(domain="nomaflow")
        summary = alert.summary()
        traceback = alert.get("traceback")
        lines = [summary]
        if traceback:
            lines += ["", traceback]
        if alert.url:
            lines += ["", f"View run: {alert.url}"]
        msg.set_content("\n".join(lines) + "\n")
        parts = [f"<p>{html.escape(summary)}</p>"]
        if traceback:
            parts.append(f"<pre><code>{html.escape(traceback)}</code></pre>")
        if alert.url:
            parts.append(f'<p><a href="{html.escape(alert.url, quote=True)}">View run</a></p>')
        msg.add_alternative(
            "<!doctype html><html><body>" + "\n".join(parts) + "</body></html>\n", subtype="html"
        )
        return msg

    def _context(self) -> ssl.SSLContext:
        ca_file = self.settings.get("ca_file")
        return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)

    def send(self, alert: Alert, recipient: str) -> str:
        s = self.settings
        msg = self.render(alert, recipient)
        deadline = time.monotonic() + self.timeout
        smtp: smtplib.SMTP | None = None
        try:
            if s["tls"] == "tls":
                smtp = smtplib.SMTP_SSL(s["host"], s["port"], timeout=self.timeout,
                                        context=self._context())
            else:
                smtp = smtplib.SMTP(s["host"], s["port"], timeout=self.timeout)
            assert smtp.sock is not None
            with DEADLINES.watch(lambda: smtp.sock, deadline):
                return self._converse(smtp, msg, recipient)
        except smtplib.SMTPRecipientsRefused as exc:
            code, text = next(iter(exc.recipients.values()))
            raise DeliveryError(f"SMTP {code} {_text(text)} (recipient refused)") from None
        except (smtplib.SMTPDataError, smtplib.SMTPSenderRefused) as exc:
            raise DeliveryError(f"SMTP {exc.smtp_code} {_text(exc.smtp_error)}") from None
        except smtplib.SMTPAuthenticationError as exc:
            raise TransportError(f"authentication failed: SMTP {exc.smtp_code}") from None
        except smtplib.SMTPNotSupportedError as exc:
            raise TransportError(f"server does not support it: {exc}") from None
        except smtplib.SMTPResponseException as exc:
            raise TransportError(f"SMTP {exc.smtp_code} {_text(exc.smtp_error)}") from None
        except (OSError, smtplib.SMTPException) as exc:
            if time.monotonic() >= deadline:
                raise TransportError(f"timed out after {self.timeout:g}s") from None
            raise TransportError(describe_exception(exc)) from None
        finally:
            if smtp is not None:
                try:
                    smtp.close()
                except OSError:
                    pass  # the connection is gone either way

    def _converse(self, smtp: smtplib.SMTP, msg: EmailMessage, recipient: str) -> str:
        s = self.settings
        smtp.ehlo()
        if s["tls"] == "starttls":
            smtp.starttls(context=self._context())
            smtp.ehlo()
        if s.get("username"):
            password = s.get("password")
            smtp.login(s["username"], password.reveal() if password else "")
        refused = smtp.send_message(msg, from_addr=parseaddr(s["default_from"])[1],
                                    to_addrs=[recipient])
        if refused:
            code, text = next(iter(refused.values()))
            raise DeliveryError(f"SMTP {code} {_text(text)} (recipient refused)")
        try:
            smtp.quit()
        except (OSError, smtplib.SMTPException):
            pass  # the message was accepted; a rude goodbye changes nothing
        return "SMTP 250 accepted"


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return str(value).replace("\n", " ")[:200]

