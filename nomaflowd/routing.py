"""Recipients -> {(transport, normalised recipient)}: classification, tag rules, de-duplication."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from email.utils import parseaddr

from nomaflowd.config import Rule, TransportConfig

SLACK_DEFAULT = "(webhook channel)"


@dataclass(frozen=True)
class Target:
    transport: str          # "" when nothing matched
    recipient: str          # normalised
    written: str            # as the operator wrote it
    origin: str             # "alerts", "rule tag=x", "rule (all jobs)", "default", "notice"
    error: str = ""         # why nothing matched


@dataclass
class Plan:
    """The outcome of routing one alert, with enough detail for `explain`."""

    targets: list[Target] = field(default_factory=list)
    duplicates: list[Target] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)
    skipped: list[Target] = field(default_factory=list)  # by design, not sent (error = why)


def email_address(value: str) -> str | None:
    """`a@b.c` or `Name <a@b.c>` -> `a@b.c` (lowercased), else None."""
    addr = parseaddr(value)[1]
    if not addr or "@" not in addr or " " in addr:
        return None
    local, _, domain = addr.rpartition("@")
    if not local or "." not in domain.strip("."):
        return None
    if "<" in value and not value.rstrip().endswith(">"):
        return None
    return addr.lower()


def default_recipient(t: TransportConfig) -> str:
    s = t.settings
    if t.type == "slack":
        return str(s.get("default_channel") or SLACK_DEFAULT)
    if t.type == "email":
        return str(email_address(s.get("default_recipient") or s["default_from"]))
    return t.name


class Router:
    def __init__(self, transports: Mapping[str, TransportConfig], rules: Iterable[Rule]) -> None:
        self.transports = dict(transports)
        self.rules = tuple(rules)
        self.by_type: dict[str, list[str]] = {}
        for name, t in self.transports.items():
            self.by_type.setdefault(t.type, []).append(name)

    def classify(self, written: str, origin: str) -> Target:
        """One recipient string -> its transport and normalised form (or why none fits)."""
        value = written.strip()
        prefix, sep, rest = value.partition(":")
        if sep and prefix in self.transports:
            t = self.transports[prefix]
            normal = self._normalise(t.type, rest.strip())
            if normal is None:
                return Target("", value, written, origin,
                              f"{rest.strip()!r} is not a {t.type} recipient for {prefix}")
            return Target(prefix, normal, written, origin)
        if value in self.transports:
            return Target(value, default_recipient(self.transports[value]), written, origin)
        if value.startswith(("#", "@")):
            kind = "slack"
        elif email_address(value):
            kind = "email"
        else:
            return Target("", value, written, origin,
                          f"{value!r} matches no transport (not #channel, @user, an address,"
                          " or a transport name)")
        names = self.by_type.get(kind, [])
        if not names:
            return Target("", value, written, origin, f"no {kind} transport is configured")
        if len(names) > 1:
            return Target("", value, written, origin,
                          f"several {kind} transports ({', '.join(names)}); write NAME:{value}")
        normal = self._normalise(kind, value)
        assert normal is not None
        return Target(names[0], normal, written, origin)

    @staticmethod
    def _normalise(kind: str, value: str) -> str | None:
        if kind == "slack":
            return value.lower() if value[:1] in ("#", "@") and len(value) > 1 else None
        if kind == "email":
            return email_address(value)
        return value or None

    def plan(self, recipients: Iterable[str], tags: Iterable[str], *,
             use_rules: bool = True) -> Plan:
        """Alerts-block recipients + matching tag rules + tag-less rules, de-duplicated."""
        plan = Plan()
        wanted: list[tuple[str, str]] = [(r, "alerts") for r in recipients]
        if use_rules:
            tag_set = set(tags)
            for rule in self.rules:
                if rule.tag is None or rule.tag in tag_set:
                    label = f"rule tag={rule.tag}" if rule.tag else "rule (all jobs)"
                    plan.rules.append(f"{label} -> {', '.join(rule.recipients)}")
                    wanted.extend((r, label) for r in rule.recipients)
        if not wanted:
            wanted = [(name, "default") for name in self.transports]
        seen: set[tuple[str, str]] = set()
        for written, origin in wanted:
            target = self.classify(written, origin)
            key = (target.transport, target.recipient)
            if key in seen:
                plan.duplicates.append(target)
                continue
            seen.add(key)
            plan.targets.append(target)
        return plan
