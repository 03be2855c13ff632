"""A real local SMTP server for tests: aiosmtpd on 127.0.0.1, optional TLS, AUTH and refusals."""

from __future__ import annotations

import asyncio
import datetime
import email
import email.policy
import ipaddress
import ssl
import threading
import time
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class Certs:
    """A private CA and a server certificate it signed for localhost / 127.0.0.1 (PEM files)."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx


def make_certs(directory: Path) -> Certs:
    """Generate a throwaway CA and a server certificate signed by it (EC keys: fast)."""
    now = datetime.datetime.now(datetime.UTC)
    valid = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nomaflowd test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0]).not_valid_after(valid[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0]).not_valid_after(valid[1])
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    directory.mkdir(parents=True, exist_ok=True)
    certs = Certs(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    certs.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    certs.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    certs.key_file.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return certs


@dataclass
class Received:
    """One message the server accepted."""

    mail_from: str
    rcpt_tos: list[str]
    raw: bytes
    message: EmailMessage
    mail_options: list[str]
    tls: bool                      # the conversation was encrypted when DATA arrived
    login: str | None              # the authenticated user, if any
    at: float = field(default_factory=time.time)

    def part(self, content_type: str) -> str:
        """The decoded body of the first part with this content type."""
        for part in self.message.walk():
            if part.get_content_type() == content_type:
                # 8-bit bodies keep the wire's CRLF when parsed from bytes.
                return str(part.get_content()).replace("\r\n", "\n")
        raise AssertionError(f"no {content_type} part in:\n{self.raw.decode(errors='replace')}")


class _Handler:
    def __init__(self, recorder: SmtpRecorder) -> None:
        self.recorder = recorder

    async def _delay(self, command: str) -> None:
        seconds = self.recorder.delays.get(command, 0.0)
        if seconds:
            await asyncio.sleep(seconds)

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        await self._delay("RCPT")
        if address.lower() in self.recorder.refuse:
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        await self._delay("DATA")
        if self.recorder.reject_data:
            return self.recorder.reject_data
        raw = envelope.original_content or envelope.content
        message = email.message_from_bytes(raw, policy=email.policy.default)
        login = None
        if isinstance(session.auth_data, LoginPassword):
            login = session.auth_data.login.decode()
        self.recorder._add(Received(
            mail_from=envelope.mail_from, rcpt_tos=list(envelope.rcpt_tos), raw=raw,
            message=message,  # type: ignore[arg-type]
            mail_options=list(envelope.mail_options),
            tls=server.transport.get_extra_info("ssl_object") is not None, login=login))
        return "250 Message accepted for delivery"


class _Controller(Controller):
    """Binds port 0 and learns the real port before aiosmtpd's start-up probe connects."""

    def _trigger_server(self) -> None:
        assert self.server is not None
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


class SmtpRecorder:
    """aiosmtpd on 127.0.0.1 (a free port) recording every accepted message.

    starttls / implicit_tls take a Certs; users={"name": "password"} turns on required AUTH
    (over TLS only, as aiosmtpd insists); refuse={"x@y"} answers RCPT with 550;
    reject_data="554 ..." refuses the message itself; delays={"RCPT": 0.3} slows a command.
    """

    def __init__(self, *, starttls: Certs | None = None, implicit_tls: Certs | None = None,
                 users: dict[str, str] | None = None, refuse: set[str] | None = None,
                 reject_data: str | None = None, delays: dict[str, float] | None = None) -> None:
        self.messages: list[Received] = []
        self.refuse = {r.lower() for r in refuse or ()}
        self.reject_data = reject_data
        self.delays = delays or {}
        self.users = users or {}
        self.auth_attempts: list[tuple[str, bool]] = []
        self._cond = threading.Condition()
        kwargs: dict[str, Any] = {}
        if starttls is not None:
            kwargs["tls_context"] = starttls.server_context()
            kwargs["require_starttls"] = True
        if users:
            kwargs["auth_required"] = True
            kwargs["authenticator"] = self._authenticate
        self.controller = _Controller(
            _Handler(self), hostname="127.0.0.1", port=0, server_hostname="smtp.test",
            ssl_context=implicit_tls.server_context() if implicit_tls else None, **kwargs)
        self.controller.start()
        self.host = "127.0.0.1"
        self.port: int = self.controller.port

    def _authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str,
                      auth_data: Any) -> AuthResult:
        ok = (isinstance(auth_data, LoginPassword)
              and self.users.get(auth_data.login.decode()) == auth_data.password.decode())
        with self._cond:
            self.auth_attempts.append((mechanism, ok))
        # handled=False: let aiosmtpd answer a failure with its own 535.
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)

    def _add(self, received: Received) -> None:
        with self._cond:
            self.messages.append(received)
            self._cond.notify_all()

    def wait_for(self, count: int, timeout: float = 5.0) -> list[Received]:
        """Block until `count` messages arrived (polling in short steps); fail after `timeout`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.messages) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"expected {count} message(s), got {len(self.messages)}")
                self._cond.wait(min(remaining, 0.05))
            return list(self.messages)

    def close(self) -> None:
        self.controller.stop()
