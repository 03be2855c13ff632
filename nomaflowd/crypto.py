"""Secrets at rest: the key file, `enc:` tokens (Fernet) and the Secret value type."""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

# cryptography is imported where a key is used: read-only commands (`audit`, `emit`) never
# decrypt, and its import is a tenth of their start-up.
if TYPE_CHECKING:
    from cryptography.fernet import MultiFernet

from nomaflowd.errors import ConfigError, NomaflowError

PREFIX = "enc:"
TOKEN_RE = re.compile(r"enc:[A-Za-z0-9_\-=]+")
CREDENTIAL_NAME = "nomaflowd.key"
# The daemon decrypts its secrets in a child process: cryptography (a Rust extension with
# its own static OpenSSL) stays mapped for the life of a process that imported it, and was
# 8.6 MB of an idle daemon's RSS (bench h with one encrypted webhook URL: 44.7 -> 36.1 MB;
# READY came about 40 ms later). The child gets the parent's sys.path, so it imports the
# same nomaflowd and cryptography.
_CHILD = ("import json, sys; job = json.load(sys.stdin); sys.path[:] = job['path'];"
          " from nomaflowd.crypto import answer_job; answer_job(job)")
CHILD_TIMEOUT = 20.0  # seconds; a reload waits for it on the main loop (WatchdogSec=30s)


class Secret:
    """A decrypted secret that never prints itself; call reveal() only where it is sent."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('****')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def key_path(configured: Path) -> Path:
    """systemd's LoadCredential= wins over the configured key file."""
    cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    if cred_dir and (Path(cred_dir) / CREDENTIAL_NAME).is_file():
        return Path(cred_dir) / CREDENTIAL_NAME
    return configured


def _pending(path: Path) -> Path:
    return path.with_name(path.name + ".new")


def load_keys(path: Path) -> MultiFernet:
    """The key file (plus a rotation's pending key, so a rotation cut short still decrypts)."""
    from cryptography.fernet import Fernet, MultiFernet

    keys = []
    # The pending key first: `secret rotate` moves it over the key file once the config
    # holds tokens of the new key, and read the other way round, a reload in between found
    # the old key alone and refused the new tokens.
    for candidate in (_pending(path), path):
        try:
            raw = candidate.read_bytes().strip()
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise ConfigError(f"key file {candidate} cannot be read ({exc.strerror})") from None
        try:
            keys.append(Fernet(raw))
        except ValueError:
            raise ConfigError(
                f"key file {candidate} is not a nomaflowd key;"
                " make one with `nomaflowd secret keygen`"
            ) from None
    if not keys:
        raise ConfigError(f"key file {path} not found; create it with `nomaflowd secret keygen`")
    return MultiFernet(keys)


def write_key(path: Path, key: bytes | None = None) -> None:
    """Create a new key file with mode 0600; never overwrite an existing one."""
    from cryptography.fernet import Fernet

    key = key or Fernet.generate_key()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise NomaflowError(f"key file {path} already exists; it is never overwritten") from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(key + b"\n")
        fh.flush()
        os.fsync(fh.fileno())


def encrypt(keys: MultiFernet, value: str) -> str:
    return PREFIX + keys.encrypt(value.encode()).decode()


def decrypt(keys: MultiFernet, token: str, field: str) -> Secret:
    """Decrypt an `enc:` token; errors name the field, never the value."""
    from cryptography.fernet import InvalidToken

    if not token.startswith(PREFIX):
        raise ConfigError(
            f"{field} is plaintext; encrypt it with `nomaflowd secret encrypt`"
            " and use the enc: token"
        )
    try:
        return Secret(keys.decrypt(token[len(PREFIX) :].encode()).decode())
    except (InvalidToken, ValueError):
        raise undecryptable(field) from None


def undecryptable(field: str) -> ConfigError:
    return ConfigError(
        f"{field} cannot be decrypted with this key; re-encrypt it with `nomaflowd secret encrypt`"
    )


def decrypt_tokens(key_file: Path, tokens: Iterable[str], *, apart: bool | None = None
                   ) -> dict[str, str]:
    """Each `enc:` token the key file decrypts, mapped to its plaintext; a token it cannot
    decrypt is left out. Raises ConfigError when the key file is missing or not a key.

    `apart`: decrypt in a child process. By default only where cryptography is not imported
    yet (the daemon); a process that has it already (`secret` commands, tests) needs none.
    """
    job = {"path": sys.path, "key_file": str(key_file), "tokens": sorted(set(tokens))}
    if apart is None:
        apart = "cryptography.fernet" not in sys.modules and bool(sys.executable)
    if not apart:
        return _decrypt_here(job)
    import subprocess  # here: a command that decrypts nothing (audit) skips its import

    try:
        proc = subprocess.run([sys.executable, "-I", "-c", _CHILD], input=json.dumps(job),
                              capture_output=True, encoding="utf-8", timeout=CHILD_TIMEOUT,
                              check=False)
    except subprocess.TimeoutExpired:
        raise ConfigError(f"decrypting the secrets took more than {CHILD_TIMEOUT:g}s") from None
    except OSError as exc:
        raise ConfigError(f"cannot start {sys.executable} to decrypt the secrets"
                          f" ({exc.strerror})") from None
    try:
        answer = json.loads(proc.stdout)
    except ValueError:
        answer = None
    if proc.returncode != 0 or not isinstance(answer, dict):
        last = proc.stderr.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        raise ConfigError(f"the secrets could not be decrypted: {last[0]}")
    if "error" in answer:
        raise ConfigError(answer["error"])
    plain: dict[str, str] = answer["plain"]
    return plain


def answer_job(job: dict[str, Any]) -> None:
    """The child's side of decrypt_tokens(): its answer as one JSON object on stdout."""
    try:
        answer: dict[str, Any] = {"plain": _decrypt_here(job)}
    except ConfigError as exc:
        answer = {"error": str(exc)}
    sys.stdout.write(json.dumps(answer))


def _decrypt_here(job: dict[str, Any]) -> dict[str, str]:
    from cryptography.fernet import InvalidToken

    keys = load_keys(Path(job["key_file"]))
    plain = {}
    for token in job["tokens"]:
        try:
            plain[token] = keys.decrypt(token[len(PREFIX) :].encode()).decode()
        except (InvalidToken, ValueError):
            continue  # the field that holds it is refused by name (undecryptable)
    return plain


def rotate(config_file: Path, key_file: Path) -> int:
    """Re-encrypt every token of the config under a new key; returns how many tokens changed.

    The new key is written beside the old one first, then the config, then the key is
    swapped in: a crash at any point leaves a config that one of the two keys decrypts.
    """
    from cryptography.fernet import Fernet, InvalidToken

    old = load_keys(key_file)
    new_key = Fernet.generate_key()
    new = Fernet(new_key)
    text = config_file.read_text(encoding="utf-8")
    count = 0

    def swap(match: re.Match[str]) -> str:
        nonlocal count
        try:
            plain = old.decrypt(match.group(0)[len(PREFIX) :].encode())
        except InvalidToken:
            line = text.count("\n", 0, match.start()) + 1
            raise ConfigError(
                f"{config_file}, line {line}: an enc: token (in a comment too) cannot be"
                f" decrypted with {key_file}; re-encrypt or remove it; nothing was changed"
            ) from None
        count += 1
        return PREFIX + new.encrypt(plain).decode()

    rewritten = TOKEN_RE.sub(swap, text)
    pending = _pending(key_file)
    pending.unlink(missing_ok=True)
    write_key(pending, new_key)
    tmp = config_file.with_name(config_file.name + ".rotating")
    tmp.write_text(rewritten, encoding="utf-8")
    os.chmod(tmp, config_file.stat().st_mode & 0o7777)
    os.replace(tmp, config_file)
    os.replace(pending, key_file)
    return count
