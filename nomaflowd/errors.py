"""The small exception hierarchy; every message is one line a user can act on."""

from __future__ import annotations


class NomaflowError(Exception):
    """Base error; `exit_code` is what the CLI exits with."""

    exit_code = 1


class ConfigError(NomaflowError):
    """The config, catalogue or key is unusable (exit 2)."""

    exit_code = 2


class UsageError(NomaflowError):
    """The command line is wrong (exit 2)."""

    exit_code = 2


class Rejected(NomaflowError):
    """A spool file cannot be accepted; the message is the reason written to `.error`."""
