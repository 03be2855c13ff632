"""nomaflowd.toml -> frozen dataclasses. Every refusal names the dotted key and the fix."""

from __future__ import annotations

import contextlib
import math
import os
import re
import socket
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from nomaflowd import crypto
from nomaflowd.crypto import Secret
from nomaflowd.errors import ConfigError

SEARCH_PATH = (Path("etc/nomaflowd.toml"), Path("/etc/nomaflowd/nomaflowd.toml"))
TLS_MODES = ("starttls", "tls", "none")
# Header values that carry no credential may stay plaintext; every other one must be enc:.
PLAIN_HEADERS = frozenset({"content-type", "accept", "user-agent"})


@dataclass(frozen=True)
class TransportConfig:
    name: str
    type: str
    settings: Mapping[str, Any]


@dataclass(frozen=True)
class Rule:
    tag: str | None
    recipients: tuple[str, ...]


@dataclass(frozen=True)
class Config:
    path: Path
    spool_dir: Path
    database: str
    jobs_file: Path
    key_file: Path
    base_url: str
    poll_seconds: float
    retention_days: int
    send_timeout_seconds: float
    replica_id: str
    rescan_seconds: float
    web_listen: tuple[str, int] | None = None
    web_password: Secret | None = None
    metrics_listen: tuple[str, int] | None = None
    transports: Mapping[str, TransportConfig] = field(default_factory=dict)
    routing: tuple[Rule, ...] = ()
    # Glob patterns of recipients an event file may name; None: the built-in default (routing).
    event_recipients: tuple[str, ...] | None = None
    # Told when a transport keeps failing (SPEC §12), through the other transports.
    fallback_recipients: tuple[str, ...] = ()
    fallback_after_failures: int = 3

    def run_url(self, run_id: str | None) -> str:
        """The run's page. The id is a runner's text: percent-encoded whole, so `/`, `?`, a
        space or `)` cannot lead elsewhere or close a Markdown link; `.` and `..` (which a
        browser resolves, encoded or not) have no page to link."""
        if not run_id or not self.base_url or run_id in (".", ".."):
            return ""
        return f"{self.base_url.rstrip('/')}/runs/{quote(run_id, safe='')}/"


def find(explicit: str | None) -> Path:
    """--config, else $NOMAFLOWD_CONFIG, else ./etc/nomaflowd.toml, else /etc/nomaflowd/."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("NOMAFLOWD_CONFIG")
    if env:
        return Path(env)
    for candidate in SEARCH_PATH:
        if candidate.is_file():
            return candidate
    raise ConfigError(
        "no config found; pass --config FILE, set NOMAFLOWD_CONFIG, or create etc/nomaflowd.toml"
    )


def read_toml(path: Path, *, missing: dict[str, Any] | None = None) -> dict[str, Any]:
    """The file's TOML, or ConfigError in one line; `missing`: what a missing file is."""
    try:
        with path.open("rb") as fh:
            if fh.read(3) == b"\xef\xbb\xbf":  # tomllib's own word: "Invalid statement"
                raise ConfigError(f"{path} starts with a byte order mark; save it as UTF-8"
                                  " without one")
            fh.seek(0)
            return tomllib.load(fh)
    except FileNotFoundError:
        if missing is not None:
            return missing
        raise ConfigError(f"{path} not found; pass --config with the right file") from None
    except OSError as exc:
        raise ConfigError(f"{path} cannot be read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:  # tomllib decodes before it parses: not a TOMLDecodeError
        raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start}); save it as UTF-8"
                          ) from None


# --- a tiny typed reader -------------------------------------------------------------

_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               list: "a list of strings", dict: "a table"}


class Table:
    """One TOML table being read; unknown keys are refused by finish()."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{where} must be a table")
        self.data = data
        self.where = where
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def get(self, name: str, kind: type, default: Any = None, *, required: bool = False,
            secret: bool = False) -> Any:
        """The value, type-checked; `secret` keeps a wrongly typed value out of the message."""
        self.seen.add(name)
        if name not in self.data:
            if required:
                raise ConfigError(f"{self.key(name)} is required; add it to the config")
            return default
        value = self.data[name]
        ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if kind is list:
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        if not ok:
            shown = "" if secret else f", not {value!r}"
            raise ConfigError(f"{self.key(name)} must be {_TYPE_NAMES[kind]}{shown}")
        if kind is float and not math.isfinite(value):
            # TOML has nan and inf; either would pass `> 0` checks and break a timer later.
            raise ConfigError(f"{self.key(name)} must be a finite number, not {value!r}")
        return value

    def positive(self, name: str, kind: type, default: Any, *, most: float | None = None,
                 least: float | None = None) -> Any:
        """A number > 0 (and >= least, <= most): past a bound, a timer, a lease or a date
        overflows later, in the running daemon."""
        value = self.get(name, kind, default)
        if value is None:
            return value
        if value <= 0:
            raise ConfigError(f"{self.key(name)} must be greater than 0")
        if least is not None and value < least:
            raise ConfigError(f"{self.key(name)} must be at least {least:g}")
        if most is not None and value > most:
            raise ConfigError(f"{self.key(name)} must be at most {most:g}")
        return value

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            raise ConfigError(f"{self.key(unknown[0])} is not a known setting; check its spelling")


def _resolve(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def _database_url(base: Path, url: str, key: str) -> str:
    if not url.isprintable():
        raise ConfigError(f"{key} holds a control character")
    if url.startswith("sqlite:///"):
        rest = url[len("sqlite:///"):]
        if rest and rest != ":memory:" and not rest.startswith("/"):
            return "sqlite:///" + str(_resolve(base, rest))
        return url
    if url.startswith(("postgresql://", "postgres://", "postgresext://")):
        try:  # a "/", "?" or "#" in the password ends the host part early
            urlsplit(url).port  # noqa: B018 (raises ValueError, quoting the URL)
        except ValueError:
            raise ConfigError(f"{key} is not a valid URL; percent-encode the special characters"
                              " of the user name and password (/ as %2F, ? as %3F, # as %23,"
                              " @ as %40, : as %3A)") from None
        return url
    scheme, sep, _ = url.partition("://")  # the rest may hold a password: not repeated
    shown = f"a {scheme}:// URL" if sep and scheme.isalnum() else "that value"
    raise ConfigError(f"{key} must be sqlite:///PATH or postgresql://user@host/db, not {shown}")


def check_url(key: str, url: str, *, userinfo: bool = True,
              example: str = "https://host.corp.local/path") -> None:
    """An http(s) URL with a host that requests can send to; the message never shows it (a
    webhook URL is a secret). `userinfo=False`: a user or password in it is refused (it
    would be shown, or sent in every alert)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (parses the port: a bad one raises ValueError)
    except ValueError:
        parts = None
    if (parts is None or parts.scheme not in ("http", "https") or not parts.hostname
            or not url.isprintable() or " " in url):
        raise ConfigError(f"{key} must be an http(s) URL with a host, such as {example}")
    if not userinfo and (parts.username or parts.password):
        raise ConfigError(f"{key} must not hold a user or password")


def _host(t: Table, name: str) -> str:
    """A host name or an IP address (not a URL, no user, no spaces)."""
    import ipaddress

    value: str = t.get(name, str, required=True)
    try:
        ipaddress.ip_address(value.strip("[]"))
        return value
    except ValueError:
        pass
    try:
        ok = bool(value) and len(value) <= 253 and bool(value.encode("idna"))
    except UnicodeError:
        ok = False
    if not ok or not re.fullmatch(r"[^\s/@:?#\[\]\\]+", value):
        raise ConfigError(f"{t.key(name)} must be a host name or an IP address, such as"
                          " smtp.corp.local")
    return value


# --- transports ----------------------------------------------------------------------

SecretReader = Callable[[Table, str, bool], "Secret | None"]


SLACK_API = "https://slack.com/api"


def _slack(t: Table, secret: SecretReader) -> dict[str, Any]:
    """An incoming webhook (`webhook_url`), or app mode (`bot_token`: the Web API)."""
    if ("webhook_url" in t.data) == ("bot_token" in t.data):
        raise ConfigError(f"{t.key('webhook_url')} or {t.key('bot_token')} is required"
                          " (exactly one: a webhook URL, or an app's xoxb- token)")
    api_url = t.get("api_url", str, SLACK_API)
    check_url(t.key("api_url"), api_url, userinfo=False)
    return {
        "webhook_url": secret(t, "webhook_url", False),
        "bot_token": secret(t, "bot_token", False),
        "api_url": api_url.rstrip("/"),
        "default_channel": t.get("default_channel", str),
        "username": t.get("username", str, "Nomaflow"),
        "icon_emoji": t.get("icon_emoji", str, ":gear:"),
    }


def _email(t: Table, secret: SecretReader, base: Path) -> dict[str, Any]:
    tls = t.get("tls", str, "starttls")
    if tls not in TLS_MODES:
        raise ConfigError(f"{t.key('tls')} must be one of starttls, tls, none; not {tls!r}")
    port = t.get("port", int, required=True)
    if not 0 < port < 65536:
        raise ConfigError(f"{t.key('port')} must be a TCP port (1-65535)")
    return {
        "host": _host(t, "host"),
        "port": port,
        "tls": tls,
        "username": t.get("username", str),
        "password": secret(t, "password", False),
        "default_from": _address(t, "default_from", required=True),
        "default_recipient": _address(t, "default_recipient"),
        "ca_file": _ca_file(t, base),
    }


def _address(t: Table, name: str, *, required: bool = False) -> str | None:
    """An email address (`a@b.c` or `Name <a@b.c>`); else the default recipient is garbage."""
    from nomaflowd.routing import email_address  # routing imports this module

    value: str | None = t.get(name, str, required=required)
    if value is not None and email_address(value) is None:
        raise ConfigError(f"{t.key(name)} must be an email address such as"
                          f" \"nomaflow@corp.local\", not {value!r}")
    return value


PRESET_URLS = {
    "pagerduty": "https://events.pagerduty.com/v2/enqueue",
    "opsgenie": "https://api.opsgenie.com",
}
# Chat platforms behind a webhook preset: each webhook URL is the secret, so `url` is required.
CHAT_PRESETS = ("teams", "discord", "google_chat")
PRESETS = (*PRESET_URLS, *CHAT_PRESETS)
# Provider pacing defaults (Slack: ~1 message/s with short bursts; SMTP relays: modest).
PACING = {"slack": (60.0, 20), "email": (120.0, 20), "webhook": (None, None)}


def _http(t: Table, secret: SecretReader, base: Path) -> dict[str, Any]:
    """What every HTTP transport may set: its own proxy (wins over $HTTPS_PROXY and co.) and
    a CA file to trust (a private CA for an internal endpoint)."""
    raw = t.get("proxy", str, secret=True)
    proxy: Secret | str | None = raw
    if raw is not None and raw.startswith(crypto.PREFIX):
        proxy = secret(t, "proxy", False)  # credentials in the URL: keep it encrypted
    if proxy is not None and (proxy.reveal() if isinstance(proxy, Secret) else proxy):
        # (An enc: proxy read without the key, by emit, audit and prune, is not checked.)
        text = proxy.reveal() if isinstance(proxy, Secret) else proxy
        check_url(t.key("proxy"), text, example="http://proxy.corp.local:3128")
        if urlsplit(text).password and not isinstance(proxy, Secret):
            raise ConfigError(f"{t.key('proxy')} holds a password in plaintext; run"
                              " `nomaflowd secret encrypt` and paste the enc: token")
    return {"proxy": proxy, "ca_file": _ca_file(t, base)}


def _ca_file(t: Table, base: Path) -> Path | None:
    """A CA file to trust; a missing one is a config error, not a failed send at 03:00."""
    value = t.get("ca_file", str)
    if not value:
        return None
    path = _resolve(base, value)
    if not path.is_file():
        raise ConfigError(f"{t.key('ca_file')}: no such file {path}; give the PEM file of the"
                          " CA that signed the server's certificate")
    return path


def _pacing(t: Table, kind: str) -> dict[str, Any]:
    rate, burst = PACING[kind]
    # At least one message every 10 minutes: a slower bucket held every alert after the
    # first (a digest needs a token too).
    rate = t.positive("rate_per_minute", float, rate, least=0.1, most=1e6)
    if burst is None and rate:
        burst = max(1, int(rate))
    burst = t.get("burst", int, burst)
    if burst is not None and not 1 <= burst <= 1_000_000:
        raise ConfigError(f"{t.key('burst')} must be between 1 and 1000000")
    return {
        "rate_per_minute": rate,
        "burst": burst,
        "digest_after_seconds": t.positive("digest_after_seconds", float, 10.0, most=3600),
    }


def _webhook(t: Table, secret: SecretReader) -> dict[str, Any]:
    headers: dict[str, Secret | str] = {}
    raw = Table(t.get("headers", dict, {}, secret=True), t.key("headers"))
    for name in list(raw.data):
        value = raw.get(name, str, secret=True)
        if value.startswith(crypto.PREFIX) or name.lower() not in PLAIN_HEADERS:
            headers[name] = secret(raw, name, True)  # type: ignore[assignment]
        else:
            headers[name] = value
        _check_header(raw.key(name), name, headers[name])
    raw.finish()
    preset = t.get("preset", str)
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"{t.key('preset')} must be one of {', '.join(PRESETS)}; not {preset!r}")
    extra: dict[str, Any] = {"preset": preset}
    if preset == "pagerduty":
        extra["routing_key"] = secret(t, "routing_key", True)
    elif preset == "opsgenie":
        extra["api_key"] = secret(t, "api_key", True)
    url = secret(t, "url", preset not in PRESET_URLS)
    return {
        **extra,
        "url": url if url is not None else Secret(PRESET_URLS[str(preset)]),
        "headers": headers,
        "body_template": t.get("body_template", str),
        "signing_secret": secret(t, "signing_secret", False),
    }


TRANSPORT_TYPES = ("slack", "email", "webhook")
# What http.client refuses in a header (it would raise with the whole value in the message).
_BAD_HEADER_VALUE = re.compile(r"[\r\n\0]")
_HEADER_NAME = re.compile(r"[^:\s][^:\r\n]*")


def _check_header(key: str, name: str, value: Secret | str) -> None:
    """Refuse at load what would fail every send; the message never shows the value."""
    if not name.isascii() or not _HEADER_NAME.fullmatch(name):
        raise ConfigError(f"{key}: {name!r} is not a valid HTTP header name")
    text = value.reveal() if isinstance(value, Secret) else value
    if _BAD_HEADER_VALUE.search(text):
        raise ConfigError(f"{key} has an invalid character (CR/LF); encrypt the value again"
                          " without the line break")
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        raise ConfigError(f"{key} has a character HTTP headers cannot carry (not Latin-1)"
                          ) from None


def _listen(d: Table, name: str) -> tuple[str, int] | None:
    value = d.get(name, str)
    if not value:
        return None
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    # Port 0 binds a free port; the server logs the one it got.
    if not sep or not host or not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"daemon.{name} must be HOST:PORT, e.g. \"127.0.0.1:8787\"")
    return host, int(port)


def _patterns(d: Table, name: str) -> tuple[str, ...] | None:
    value = d.get(name, list)
    if value is not None and not all(p.strip() for p in value):
        raise ConfigError(f"daemon.{name} holds an empty pattern; write e.g. \"#*\"")
    return None if value is None else tuple(value)


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _tokens(value: Any) -> Iterator[str]:
    """The `enc:` tokens anywhere in parsed TOML."""
    if isinstance(value, str) and value.startswith(crypto.PREFIX):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tokens(item)
    elif isinstance(value, list):
        for item in value:
            yield from _tokens(item)


def key_file_of(path: Path) -> Path:
    """daemon.key_file of the config at `path`, read alone: `secret keygen` and `encrypt`
    are what a config refused for a plaintext secret asks for, so they need no more."""
    path = path.resolve() if path.exists() else path
    d = Table(Table(read_toml(path), "").get("daemon", dict, required=True), "daemon")
    return _resolve(path.parent, d.get("key_file", str, "nomaflowd.key"))


def load(path: Path, *, decrypt: bool = True) -> Config:
    """Read and validate the whole config; raises ConfigError with one line.

    decrypt=False checks that secret fields hold enc: tokens without needing the key
    (for `emit` and `secret keygen`, which may run where the key is not readable).
    """
    with contextlib.suppress(OSError):  # one it may not see: read_toml says so
        path = path.resolve(strict=True)
    data = read_toml(path)
    base = path.parent
    top = Table(data, "")
    # Every token of the file, decrypted at the first secret field in one go: a config
    # without secrets needs no key.
    plain: list[dict[str, str]] = []

    def secret(t: Table, name: str, required: bool) -> Secret | None:
        value = t.get(name, str, required=required, secret=True)
        if value is None:
            return None
        if not value.startswith(crypto.PREFIX):
            crypto.decrypt(None, value, t.key(name))  # type: ignore[arg-type]
        if not decrypt:
            return Secret("")
        if not plain:
            plain.append(crypto.decrypt_tokens(crypto.key_path(key_file), _tokens(data)))
        if value not in plain[0]:
            raise crypto.undecryptable(t.key(name))
        return Secret(plain[0][value])

    d = Table(top.get("daemon", dict, required=True), "daemon")
    spool_dir = d.get("spool_dir", str, required=True)
    if not spool_dir.strip() or not spool_dir.isprintable():
        raise ConfigError("daemon.spool_dir must name a directory, such as"
                          " /var/spool/nomaflowd")
    spool = _resolve(base, spool_dir)
    database = d.get("database", str)
    database = (
        _database_url(base, database, "daemon.database")
        if database
        else "sqlite:///" + str(spool.parent / "lib" / "nomaflowd.db")
    )
    key_file = _resolve(base, d.get("key_file", str, "nomaflowd.key"))
    config_kwargs: dict[str, Any] = {
        "path": path,
        "spool_dir": spool,
        "database": database,
        "jobs_file": _resolve(base, d.get("jobs_file", str, "jobs.toml")),
        "key_file": key_file,
        "base_url": d.get("base_url", str, ""),
        # Below a tenth of a second a timer is a busy loop (0.001: a core at 100 % and the
        # scheduler logging its skipped runs 60 times a second).
        "poll_seconds": d.positive("poll_seconds", float, 30.0, most=86400, least=0.1),
        "retention_days": d.positive("retention_days", int, 183, most=36500),
        "send_timeout_seconds": d.positive("send_timeout_seconds", float, 10.0, most=300),
        "replica_id": d.get("replica_id", str) or socket.gethostname(),
        "rescan_seconds": d.positive("rescan_seconds", float, 2.0, most=3600, least=0.1),
        "web_listen": _listen(d, "web_listen"),
        "web_password": secret(d, "web_password", False),
        "metrics_listen": _listen(d, "metrics_listen"),
        "event_recipients": _patterns(d, "event_recipients"),
        "fallback_recipients": tuple(d.get("fallback_recipients", list, [])),
        "fallback_after_failures": d.positive("fallback_after_failures", int, 3, most=1000),
    }
    if config_kwargs["base_url"]:  # it goes out in every alert's run link
        check_url("daemon.base_url", config_kwargs["base_url"], userinfo=False)
    password = config_kwargs["web_password"]
    if decrypt and password is not None and not password.reveal().strip():
        raise ConfigError("daemon.web_password must not be empty; encrypt a password with"
                          " `nomaflowd secret encrypt`")
    for value in config_kwargs["fallback_recipients"]:
        if "://" in value:
            raise ConfigError("daemon.fallback_recipients holds a URL; configure it as an"
                              " encrypted transport and list the transport's name instead")
    d.finish()
    web = config_kwargs["web_listen"]
    if web and not is_loopback(web[0]) and config_kwargs["web_password"] is None:
        raise ConfigError("daemon.web_listen binds a non-loopback address; set"
                          " daemon.web_password (an enc: token) or listen on 127.0.0.1")

    transports: dict[str, TransportConfig] = {}
    for name, raw in top.get("transports", dict, {}).items():
        if not re.fullmatch(r"[^\s:#@][^\s:]*", name) or not name.isprintable():
            raise ConfigError(f"transports.{name!r} is not a usable transport name; use"
                              " letters, digits, - and _ (it is written in recipients as"
                              " name or name:#channel)")
        t = Table(raw, f"transports.{name}")
        kind = t.get("type", str, required=True)
        if kind == "slack":
            settings = _slack(t, secret)
        elif kind == "email":
            settings = _email(t, secret, base)
        elif kind == "webhook":
            settings = _webhook(t, secret)
        else:
            raise ConfigError(f"{t.key('type')} must be one of slack, email, webhook; not {kind!r}")
        if kind in ("slack", "webhook"):
            settings.update(_http(t, secret, base))
            if decrypt:  # the URL is a secret: checked once decrypted, never shown
                for field_name in ("webhook_url", "url"):
                    if isinstance(settings.get(field_name), Secret) and field_name in t.data:
                        check_url(t.key(field_name), settings[field_name].reveal())
        settings.update(_pacing(t, kind))
        t.finish()
        transports[name] = TransportConfig(name, kind, settings)

    rules = []
    raw_rules = data.get("routing", [])
    top.seen.add("routing")
    if not isinstance(raw_rules, list):
        raise ConfigError("routing must be an array of tables: write [[routing]]")
    for i, raw in enumerate(raw_rules):
        r = Table(raw, f"routing[{i}]")
        recipients = tuple(r.get("recipients", list, required=True))
        if any("://" in value for value in recipients):
            raise ConfigError(f"{r.key('recipients')} holds a URL; configure it as an encrypted"
                              " transport and list the transport's name instead")
        rules.append(Rule(r.get("tag", str), recipients))
        r.finish()
    top.finish()
    return Config(**config_kwargs, transports=transports, routing=tuple(rules))
