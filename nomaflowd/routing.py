"""Recipients -> {(transport, normalised recipient)}: classification, tag rules, de-duplication."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from email.utils import getaddresses
from fnmatch import fnmatchcase

from nomaflowd.catalogue import Catalogue
from nomaflowd.config import Config, Rule, TransportConfig

SLACK_DEFAULT = "(webhook channel)"
NOT_ALLOWED = "recipient not allowed from an event file"


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
    """`a@b.c` or `Name <a@b.c>` -> `a@b.c` (lowercased), else None.

    One address only: of `a@b.c, d@e.f` (or `a@b.c <d@e.f>`) parseaddr keeps the first and
    drops the rest without a word."""
    found = getaddresses([value])  # parseaddr's own parse, every address kept
    if len(found) != 1:
        return None
    addr = found[0][1]
    # Not a control character, not an encoded word: quoted local parts let both through
    # the parse, and the email package would refuse (or, `=?`, decode) them in To.
    if not addr or "@" not in addr or " " in addr or not addr.isprintable() or "=?" in addr:
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


def default_event_patterns(transports: Mapping[str, TransportConfig]) -> tuple[str, ...]:
    """Slack channels and users, and addresses in the domain of an email transport's sender."""
    patterns = ["#*", "@*"]
    for t in transports.values():
        sender = email_address(str(t.settings.get("default_from", ""))) if t.type == "email" \
            else None
        if sender:
            patterns.append("*@" + sender.rpartition("@")[2])
    return tuple(dict.fromkeys(patterns))


class Router:
    def __init__(self, transports: Mapping[str, TransportConfig], rules: Iterable[Rule],
                 event_recipients: Iterable[str] | None = None) -> None:
        self.transports = dict(transports)
        self.rules = tuple(rules)
        self.by_type: dict[str, list[str]] = {}
        for name, t in self.transports.items():
            self.by_type.setdefault(t.type, []).append(name)
        patterns = (default_event_patterns(self.transports) if event_recipients is None
                    else tuple(event_recipients))
        self.event_patterns = tuple(p.strip().lower() for p in patterns)
        # What the operator named in nomaflowd.toml: always allowed from an event file.
        self.configured = self._keys(r for rule in self.rules for r in rule.recipients) | {
            (name, default_recipient(t)) for name, t in self.transports.items()}
        self._catalogue: tuple[Catalogue, frozenset[tuple[str, str]]] | None = None

    @classmethod
    def from_config(cls, cfg: Config) -> Router:
        return cls(cfg.transports, cfg.routing, cfg.event_recipients)

    def _keys(self, written: Iterable[str]) -> frozenset[tuple[str, str]]:
        targets = (self.classify(w, "known") for w in written)
        return frozenset((t.transport, t.recipient) for t in targets if not t.error)

    def _named_in(self, cat: Catalogue) -> frozenset[tuple[str, str]]:
        """Recipients of every alerts block in jobs.toml, worked out once per catalogue."""
        if self._catalogue is None or self._catalogue[0] is not cat:
            blocks = [*cat.jobs_alerts.values(),
                      *([cat.default_alerts] if cat.default_alerts else [])]
            self._catalogue = (cat, self._keys(r for b in blocks for r in b.recipients))
        return self._catalogue[1]

    def allowed_from_event(self, target: Target, cat: Catalogue | None = None) -> bool:
        """May an event file name this (classified) recipient? See [daemon] event_recipients."""
        key = (target.transport, target.recipient)
        if key in self.configured or (cat is not None and key in self._named_in(cat)):
            return True
        # The recipient as it will be used, never the text as written: "mallory@…,
        # alice@corp.local" matched *@corp.local and mailed mallory.
        forms = {target.recipient.lower(), f"{target.transport}:{target.recipient}".lower()}
        return any(fnmatchcase(form, p) for form in forms for p in self.event_patterns)

    def classify(self, written: str, origin: str) -> Target:
        """One recipient string -> its transport and normalised form (or why none fits)."""
        value = written.strip()
        prefix, sep, rest = value.partition(":")
        if sep and prefix in self.transports:
            t = self.transports[prefix]
            if t.type == "webhook":
                # A webhook's recipient is the webhook: hook:0 ... hook:199 are one delivery,
                # so one event cannot make an endpoint take the same alert many times.
                return Target(prefix, default_recipient(t), written, origin)
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

    def plan(self, recipients: Iterable[str], tags: Iterable[str], *, use_rules: bool = True,
             from_event: bool = False, catalogue: Catalogue | None = None) -> Plan:
        """Alerts-block recipients + matching tag rules + tag-less rules, de-duplicated.

        from_event: `recipients` were written in an event file (its alerts block or a
        NOTICE's list); each must be known (nomaflowd.toml, `catalogue`) or match
        [daemon] event_recipients, else its target carries NOT_ALLOWED and is not sent.
        """
        plan = Plan()
        wanted: list[tuple[str, str, bool]] = [(r, "alerts", from_event) for r in recipients]
        if use_rules:
            tag_set = set(tags)
            for rule in self.rules:
                if rule.tag is None or rule.tag in tag_set:
                    label = f"rule tag={rule.tag}" if rule.tag else "rule (all jobs)"
                    plan.rules.append(f"{label} -> {', '.join(rule.recipients)}")
                    wanted.extend((r, label, False) for r in rule.recipients)
        if not wanted:
            wanted = [(name, "default", False) for name in self.transports]
        seen: set[tuple[str, str]] = set()
        for written, origin, untrusted in wanted:
            target = self.classify(written, origin)
            if untrusted and not target.error and not self.allowed_from_event(target, catalogue):
                target = replace(target, error=NOT_ALLOWED)
            key = (target.transport, target.recipient)
            if key in seen:
                plan.duplicates.append(target)
                continue
            seen.add(key)
            plan.targets.append(target)
        return plan
