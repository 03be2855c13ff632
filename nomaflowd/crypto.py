"""Secrets at rest: the key file, `enc:` tokens (Fernet) and the Secret value type."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

# cryptography is imported where a key is used: read-only commands (`audit`, `emit`) never
# decrypt, and its import is a tenth of their start-up.
if TYPE_CHECKING:
    from cryptography.fernet import MultiFernet

from nomaflowd.errors import ConfigError, NomaflowError

PREFIX = "enc:"
TOKEN_RE = re.compile(r"enc:[A-Za-z0-9_\-=]+")
CREDENTIAL_NAME = "nomaflowd.key"


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
    from cryptography.fernet import Fernet, MultiFernet
    """The key file (plus a rotation's pending key, so a rotation cut short still decrypts)."""
    keys = []
    for candidate in (path, _pending(path)):
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
    from cryptography.fernet import InvalidToken
    """Decrypt an `enc:` token; errors name the field, never the value."""
    if not token.startswith(PREFIX):
        raise ConfigError(
            f"{field} is plaintext; encrypt it with `nomaflowd secret encrypt`"
            " and use the enc: token"
        )
    try:
        return Secret(keys.decrypt(token[len(PREFIX) :].encode()).decode())
    except (InvalidToken, ValueError):
        raise ConfigError(
            f"{field} cannot be decrypted with this key;"
            " re-encrypt it with `nomaflowd secret encrypt`"
        ) from None


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
            raise ConfigError(
                f"a token in {config_file} cannot be decrypted with {key_file}; nothing was changed"
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
