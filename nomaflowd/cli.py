"""Command line: argparse subcommands. The only module that prints; maps errors to 0/1/2."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import signal
import stat
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from nomaflowd import __version__, config, crypto, db, events, logs
from nomaflowd.config import Config
from nomaflowd.errors import ConfigError, NomaflowError, Rejected, UsageError
from nomaflowd.text import escape, for_terminal

STATES_HELP = ", ".join(events.STATES)


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        """argparse's exit 2, in one line (README): the usage block is a --help away."""
        raise UsageError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    common = Parser(add_help=False)
    common.add_argument("--config", metavar="FILE", help="nomaflowd.toml (default: "
                        "$NOMAFLOWD_CONFIG, ./etc/nomaflowd.toml, /etc/nomaflowd/nomaflowd.toml)")
    parser = Parser(prog="nomaflowd", parents=[common],
                    description="Nomaflow's notification sidecar.")
    parser.add_argument("--version", action="version", version=f"nomaflowd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True

    sub.add_parser("run", parents=[common], help="run the daemon in the foreground")

    p = sub.add_parser("emit", parents=[common], help="drop an event file into the spool")
    p.add_argument("--job")
    p.add_argument("--state", help=STATES_HELP)
    p.add_argument("--run")
    p.add_argument("--error")
    p.add_argument("--step")
    p.add_argument("--tag", action="append", dest="tags")
    p.add_argument("--by")
    p.add_argument("--triggered-by")
    p.add_argument("--notice", metavar="TEXT", help="a NOTICE event with this message")
    p.add_argument("--to", action="append", dest="to", metavar="RECIPIENT",
                   help="NOTICE recipient (repeatable)")
    p.add_argument("--json", metavar="FILE", help="a whole event as JSON (- for stdin)")

    p = sub.add_parser("test", parents=[common], help="send a test message through a transport")
    p.add_argument("transport")
    p.add_argument("--to", metavar="RECIPIENT")

    sub.add_parser("transports", parents=[common], help="list transports and their last outcome")
    sub.add_parser("check", parents=[common], help="validate config and catalogue")

    p = sub.add_parser("audit", parents=[common], help="query the notifications audit table")
    p.add_argument("--job")
    p.add_argument("--run")
    p.add_argument("--since", help="e.g. 7d, 12h, 2026-05-01")
    p.add_argument("--outcome", help="SENT, FAILED_TRANSPORT or FAILED_DELIVERY")
    p.add_argument("--limit", type=int_in(1, 10_000_000, "a number of rows"))
    p.add_argument("--format", choices=("table", "json", "csv"), default="table")

    p = sub.add_parser("secret", parents=[common], help="key file and enc: tokens")
    ss = p.add_subparsers(dest="secret_command", metavar="keygen|encrypt|rotate",
                          parser_class=Parser)
    ss.required = True
    ss.add_parser("keygen", parents=[common], help="create the key file (mode 0600)")
    ss.add_parser("encrypt", parents=[common], help="encrypt stdin to an enc: token")
    ss.add_parser("rotate", parents=[common], help="re-encrypt every token under a new key")

    sub.add_parser("prune", parents=[common], help="apply retention now")

    p = sub.add_parser("explain", parents=[common], help="dry run: who would get what, and why")
    p.add_argument("event", metavar="EVENT.json")

    p = sub.add_parser("demo", parents=[common],
                       help="run the daemon with a local receiver and send one alert to it")
    p.add_argument("--port", type=int_in(0, 65535, "a port (0 takes a free one)"), default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        handler = HANDLERS[args.command]
        return int(handler(args) or 0)
    except NomaflowError as exc:
        print(f"nomaflowd: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `nomaflowd audit | head`: the reader has what it wanted
        with contextlib.suppress(OSError):  # and Python's own flush at exit must not fail
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except db.OUTAGES as exc:  # an outage or a file it may not write, after it opened
        print(f"nomaflowd: daemon.database cannot be written: {db.one_line(exc)}"
              + (f"; {READONLY_FIX}" if "readonly" in str(exc) else ""), file=sys.stderr)
        return 1
    except Exception as exc:  # never a traceback at a user
        logging.getLogger("nomaflowd").debug("unexpected error", exc_info=True)
        print(f"nomaflowd: internal error: {type(exc).__name__}; run again with"
              " NOMAFLOWD_DEBUG=1 for details", file=sys.stderr)
        if os.environ.get("NOMAFLOWD_DEBUG"):
            raise
        return 1


READONLY_FIX = ("the daemon's user needs write access to the database file and its"
                " directory")


def int_in(least: int, most: int, what: str) -> Any:
    """An argparse type: an integer from `least` to `most`, `what` naming it in a refusal."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not least <= value <= most:
            raise argparse.ArgumentTypeError(f"{value}: give {what} from {least} to {most}")
        return value

    return parse


def setup_logging() -> None:
    logs.setup(logging.DEBUG if os.environ.get("NOMAFLOWD_DEBUG") else logging.INFO, sys.stderr)


def load_config(args: argparse.Namespace, *, decrypt: bool = True) -> Config:
    return config.load(config.find(args.config), decrypt=decrypt)


def open_history(cfg: Config) -> tuple[Any, str | None]:
    """The database for reading run history, or (None, why not): a dry run creates none."""
    import peewee as pw

    if cfg.database.startswith("sqlite:///"):
        path = cfg.database[len("sqlite:///"):]
        if path != ":memory:" and not Path(path).exists():
            return None, f"no database yet at {path}"
    try:
        return db.open_database(cfg.database, migrate=False), None
    except NomaflowError as exc:  # "daemon.database cannot be opened: ...", password masked
        return None, str(exc)
    except (pw.PeeweeException, OSError) as exc:
        return None, f"database unavailable ({type(exc).__name__})"


# --- commands ------------------------------------------------------------------------

def utcnow() -> datetime:
    """Naive UTC, as events and the database expect."""
    return datetime.now(UTC).replace(tzinfo=None)


def warn_loose_key(path: Path) -> None:
    """A key others can read decrypts every secret in the config: say so once, at start."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return  # no key file: a config without secrets needs none
    if mode & 0o077:
        logging.getLogger("nomaflowd").warning(
            "key file %s is readable by others (mode %04o); run `chmod 600 %s`",
            path, mode, path)


def _import_quietly(name: str) -> None:
    with contextlib.suppress(Exception):  # the main thread's own import says what failed
        importlib.import_module(name)


def cmd_run(args: argparse.Namespace) -> int:
    # SIGHUP's default ends the process: until the daemon's own handling is in place (after
    # the config is read, a few hundred milliseconds), one is noted and acted on then. It
    # killed the daemon without a line, an exit systemd does not restart.
    early_hup: list[int] = []
    signal.signal(signal.SIGHUP, lambda signum, frame: early_hup.append(signum))
    # The daemon's modules load on a thread while load_config() waits for the child process
    # that decrypts the secrets (about 45 ms). Spawn -> READY on an empty spool, one
    # encrypted webhook: 217 and 235 ms before, 174 and 171 after (medians of 7, interleaved).
    loading = threading.Thread(target=_import_quietly, args=("nomaflowd.daemon",),
                               name="nomaflowd-import", daemon=True)
    loading.start()
    try:
        cfg = load_config(args)
    finally:
        loading.join()
    from nomaflowd.daemon import Daemon

    setup_logging()
    warn_loose_key(crypto.key_path(cfg.key_file))
    daemon = Daemon(cfg)
    daemon.install_signals()
    if early_hup:
        daemon.reload_requested = True
    return daemon.run()


def cmd_emit(args: argparse.Namespace) -> int:
    from nomaflowd.client import drop

    cfg = load_config(args, decrypt=False)
    flags = (("--job", args.job), ("--state", args.state), ("--run", args.run),
             ("--error", args.error), ("--step", args.step), ("--by", args.by),
             ("--triggered-by", args.triggered_by), ("--notice", args.notice),
             ("--tag", args.tags), ("--to", args.to))
    for flag, value in flags:
        for one in value if isinstance(value, list) else [value]:
            if one is not None and not is_utf8(one):
                raise UsageError(f"{flag} is not valid UTF-8 text")
    given = [flag for flag, value in flags if value is not None]
    if args.json and given:
        raise UsageError(f"--json gives the whole event; leave out {', '.join(given)}")
    if args.notice is not None and not args.notice.strip():
        raise UsageError("--notice needs the message's text")
    if args.notice is not None and args.state and args.state.upper() != "NOTICE":
        raise UsageError(f"--notice makes a NOTICE event, not {args.state}; leave out --state")
    if any(not r.strip() for r in args.to or []):
        raise UsageError("--to needs a recipient (a #channel, an address, a transport name)")
    if args.json:
        raw = read_event_file(args.json)
        try:
            event, _ = events.decode(raw)
        except Rejected as exc:
            raise UsageError(f"--json: {exc}") from None
    else:
        if not args.job:
            raise UsageError("--job is required (or give a whole event with --json)")
        state = "NOTICE" if args.notice else (args.state or "").upper()
        if not state:
            raise UsageError(f"--state is required: one of {STATES_HELP}")
        event = {"job_id": args.job, "state": state}
        for key, value in (("run_id", args.run), ("error", args.error), ("step", args.step),
                           ("by", args.by), ("triggered_by", args.triggered_by),
                           ("message", args.notice)):
            if value:
                event[key] = value
        if args.tags:
            event["tags"] = args.tags
        if args.to:
            event["recipients"] = args.to
        if state in events.RUN_STATES:
            now = utcnow().strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            event["at"] = now
            event.setdefault("started_at" if state == "RUNNING" else "finished_at", now)
    try:
        events.parse(json.dumps(event).encode(), "emit", utcnow())
    except Rejected as exc:
        raise UsageError(f"the event would be rejected: {exc}") from None
    try:
        path = drop(cfg.spool_dir, event)
    except OSError as exc:
        raise NomaflowError(f"cannot write into {cfg.spool_dir}: {exc.strerror or exc}"
                            ) from None
    print(f"dropped {path}")
    return 0


def is_utf8(value: str) -> bool:
    """False for an argument whose bytes were not UTF-8 (Python keeps them as surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_event_file(name: str, what: str | None = None) -> bytes:
    """`--json FILE` (or - for stdin), read no further than the event size limit allows;
    `what` names it in a message (default `--json FILE`)."""
    what = what or f"--json {name}"
    try:
        if name == "-":
            raw = sys.stdin.buffer.read(events.MAX_BYTES + 1)
        else:
            with open(name, "rb") as fh:  # /dev/zero or a FIFO never ends: read a bound
                raw = fh.read(events.MAX_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"{what}: {exc.strerror}") from None
    if len(raw) > events.MAX_BYTES:
        raise UsageError(f"{what}: larger than the event limit of {events.MAX_BYTES} bytes")
    return raw


def cmd_test(args: argparse.Namespace) -> int:
    from nomaflowd.dispatch import SENT, Result, send_test
    from nomaflowd.routing import Router, default_recipient

    cfg = load_config(args)
    if args.transport not in cfg.transports:
        names = ", ".join(cfg.transports) or "none configured"
        raise UsageError(f"no transport named {args.transport!r} (have: {names})")
    tc = cfg.transports[args.transport]
    recipient = default_recipient(tc)
    if args.to and tc.type != "webhook":  # a webhook's recipient is the webhook, as in routing
        written = args.to.strip()
        if written.startswith(f"{tc.name}:"):  # the routing form NAME:recipient
            written = written[len(tc.name) + 1:].strip()
        normal = Router._normalise(tc.type, written)
        if normal is None:
            raise UsageError(f"--to {args.to!r} is not a {tc.type} recipient")
        recipient = normal
    database = db.open_database(cfg.database, migrate=False)
    # The same path as a real alert and as the web page's Test button (send_test). Without
    # a handler its `notification` log line would reach the terminal through logging's last
    # resort, repeating the line printed below.
    quiet = logging.getLogger("nomaflowd")
    if not quiet.handlers:
        quiet.addHandler(logging.NullHandler())
    def say(result: Result) -> None:  # before it is recorded: it happened either way
        # The detail quotes the upstream's answer: escaped, as in the log.
        print(f"{result.outcome} {tc.name} -> {escape(recipient)}: {escape(result.detail)}",
              flush=True)

    try:
        result = send_test(cfg, tc.name, recipient, say)
    finally:
        database.close()
    return 0 if result.outcome == SENT else 1


def cmd_transports(args: argparse.Namespace) -> int:
    from nomaflowd.routing import default_recipient
    from nomaflowd.transports import build

    cfg = load_config(args)
    if not cfg.transports:
        print("no transports configured")
        return 0
    built = build(cfg.transports, cfg.send_timeout_seconds)
    database = db.open_database(cfg.database, migrate=False)
    n = db.NotificationRow
    rows = []
    try:
        for name, tc in cfg.transports.items():
            last = n.select(n.outcome, n.created_at).where(n.transport == name).order_by(
                n.created_at.desc(), n.id.desc()).first()
            when = f"{last.outcome} at {last.created_at:%Y-%m-%d %H:%M:%S}Z" if last else None
            # destination() is scheme and host only: never a webhook path or a password.
            preset = tc.settings.get("preset")
            kind = f"{tc.type} ({preset})" if preset else tc.type
            rows.append((name, kind, default_recipient(tc), built[name].destination(),
                         when or "never used"))
    finally:
        database.close()
    header = ("NAME", "TYPE", "DEFAULT RECIPIENT", "SENDS TO", "LAST ATTEMPT")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    for line in (header, *rows):
        print("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip())
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from nomaflowd.checks import run_checks

    try:
        cfg = load_config(args)
    except ConfigError as exc:
        print(f"error: {exc}")
        return 1
    database, why = open_history(cfg)
    try:
        problems = run_checks(cfg, history=database is not None)
    finally:
        if database is not None:
            database.close()
    if why and not why.startswith("no database yet"):
        problems.append(("warning", why))
    for level, text in problems:
        print(f"{level}: {text}")
    errors = sum(1 for level, _ in problems if level == "error")
    warnings = len(problems) - errors
    print(f"{cfg.path}: {errors} error(s), {warnings} warning(s)")
    return 1 if errors else 0


def cmd_audit(args: argparse.Namespace) -> int:
    from nomaflowd import audit
    for flag, value in (("--job", args.job), ("--run", args.run), ("--since", args.since),
                        ("--outcome", args.outcome)):
        if value is not None and not is_utf8(value):
            raise UsageError(f"{flag}: the argument is not UTF-8 text")
    cfg = load_config(args, decrypt=False)
    db.open_database(cfg.database, migrate=False)
    since = audit.parse_since(args.since, db.utcnow()) if args.since else None
    filters = {"job": args.job, "run": args.run, "since": since, "outcome": args.outcome,
               "limit": args.limit}
    if args.format == "json":
        print(audit.query_json(**filters))
    else:
        print(audit.render(audit.query(**filters), args.format))
    return 0


def cmd_secret(args: argparse.Namespace) -> int:
    if args.secret_command in ("keygen", "encrypt"):
        key_file = config.key_file_of(config.find(args.config))
        if args.secret_command == "keygen":
            crypto.write_key(key_file)
            print(f"created {key_file} (mode 0600); keep it out of version control")
            return 0
        try:  # the bytes: a text stdin may have kept undecodable ones as surrogates
            raw = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read()
            value = raw.decode() if isinstance(raw, bytes) else raw
            value.encode()
        except UnicodeError:
            raise UsageError("the secret on stdin is not UTF-8 text") from None
        value = value.removesuffix("\n").removesuffix("\r")  # the line's end, if any
        if not value:
            raise UsageError("nothing on stdin: pipe the secret in, e.g. `printf %s URL | "
                             "nomaflowd secret encrypt`")
        print(crypto.encrypt(crypto.load_keys(crypto.key_path(key_file)), value))
        return 0
    cfg = load_config(args, decrypt=False)
    count = crypto.rotate(cfg.path, cfg.key_file)
    print(f"re-encrypted {count} token(s) in {cfg.path} under a new key in {cfg.key_file}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    cfg = load_config(args, decrypt=False)
    db.open_database(cfg.database, migrate=False)
    removed = db.prune(db.utcnow(), cfg.retention_days)
    from nomaflowd.spool import Spool

    removed["rejected files"] = Spool(cfg.spool_dir).prune_rejected(db.utcnow(),
                                                                  cfg.retention_days)
    from nomaflowd import catalogue, schedules

    removed["schedules"] = schedules.forget(catalogue.load(cfg.jobs_file), db.utcnow()
                                            - timedelta(days=cfg.retention_days))
    print("removed " + ", ".join(f"{n} {table}" for table, n in removed.items())
          + f" (older than {cfg.retention_days} days)")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from nomaflowd.explain import explain

    cfg = load_config(args)
    raw = read_event_file(args.event, args.event)
    try:
        event = events.parse(raw, Path(args.event).name, utcnow())
    except Rejected as exc:
        print(f"the daemon would reject this file: {escape(str(exc))}")
        return 1
    database, why = open_history(cfg)
    try:
        print(for_terminal(explain(cfg, event, history=why)))  # the event's text, shown
    finally:
        if database is not None:
            database.close()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from nomaflowd.demo import run_demo

    setup_logging()
    return run_demo(Path.cwd(), args.port)


HANDLERS = {
    "run": cmd_run, "emit": cmd_emit, "test": cmd_test, "transports": cmd_transports,
    "check": cmd_check, "audit": cmd_audit, "secret": cmd_secret, "prune": cmd_prune,
    "explain": cmd_explain, "demo": cmd_demo,
}
