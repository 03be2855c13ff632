"""The daemon's lifecycle: start order, the main loop, signals, reload, watchdog, shutdown.

The work itself lives elsewhere and flows one way: spool -> ingest -> policy -> deliveries
-> dispatcher -> transports -> audit. This module only drives it. The main thread owns all
of it; APScheduler's thread only says "the poll is due" through a queue, and runs the daily
retention (with its own connection, so that a long prune never holds the spool).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import signal
import sys
import threading
import time
import traceback
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from types import FrameType
from typing import Any

from nomaflowd import config, db, fallback, longrun, metrics, schedules, systemd, transports
from nomaflowd.alerts import span
from nomaflowd.config import Config
from nomaflowd.db import utcnow
from nomaflowd.deliveries import Deliveries
from nomaflowd.dispatch import Dispatcher
from nomaflowd.errors import ConfigError, NomaflowError
from nomaflowd.ingest import Ingest, SpoolUnreadable
from nomaflowd.policy import Policy
from nomaflowd.replicas import Identity
from nomaflowd.schedules import Schedules
from nomaflowd.spool import Spool, Watcher, watch

logger = logging.getLogger(__name__)

# How often the scheduler's thread copies the SQLite WAL back (checkpoint_job); every
# CHECKPOINT_IDLE_SECONDS once it finds nothing new, until the main loop writes again.
CHECKPOINT_SECONDS = 1.0
CHECKPOINT_IDLE_SECONDS = 30.0
# Without systemd's watchdog: how long the main loop may go without turning before the log
# says where it is stuck. With it, half of WatchdogSec (15 s for the unit's 30): said before
# systemd stops the daemon. Longer than any wait the daemon bounds itself (a silent
# database link: 11 s).
STALL_SECONDS = 15.0
# A change this large between the wall clock and the monotonic one, from one turn of the
# loop to the next, is a step of the wall clock (NTP, a VM restored): see check_clock.
CLOCK_STEP_SECONDS = 5.0
# Keys whose change needs a restart: a reload keeps the running value and says so.
RESTART_ONLY = ("spool_dir", "database", "web_listen", "metrics_listen", "replica_id")


def lease_of(cfg: Config) -> float:
    """How long a replica may go without a heartbeat before its peers take its claims:
    three polls, or two sends and some slack."""
    return max(3 * cfg.poll_seconds, 2 * cfg.send_timeout_seconds + 5)


def where(thread_id: int) -> str:
    """What a thread is doing, for the log: its innermost Python frame and, when that is not
    ours (peewee, a driver), the innermost of ours that is not db.py's plumbing."""
    frame = sys._current_frames().get(thread_id)
    if frame is None:
        return "nothing (the thread has ended)"
    stack = traceback.extract_stack(frame)
    said = [f"{os.path.basename(stack[-1].filename)}:{stack[-1].lineno} {stack[-1].name}"]
    ours = [f for f in stack if f"{os.sep}nomaflowd{os.sep}" in f.filename
            and not f.filename.endswith(f"{os.sep}db.py")]
    if ours and ours[-1] is not stack[-1]:
        said.append(f"called from {os.path.basename(ours[-1].filename)}:{ours[-1].lineno}"
                    f" {ours[-1].name}")
    return ", ".join(said)


class StallWatch:
    """Says in the log when the main loop stops turning, and where it is stuck: a database
    server that takes a query and never answers (frozen, or stuck on its disk: its kernel
    still acknowledges, so no timeout fires), or a bug. systemd's watchdog then stops the
    daemon with only "Watchdog timeout" in its own log. Its thread wakes every few seconds
    and reads one timestamp; it never touches the loop's state."""

    def __init__(self, daemon: Daemon, stall_seconds: float) -> None:
        self.daemon = daemon
        self.stall_seconds = stall_seconds
        self.main = threading.main_thread().ident or 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="stall-watch", daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        stuck: float | None = None  # the busy_since of the turn said to be stuck
        while not self.done.wait(min(5.0, self.stall_seconds / 4)):
            busy = self.daemon.busy_since
            now = time.monotonic()
            if stuck is not None and busy != stuck:
                logger.warning("the main loop turns again, after %.0f s", now - stuck)
                stuck = None
            if stuck is None and busy is not None and now - busy >= self.stall_seconds:
                stuck = busy
                logger.error("the main loop has not turned for %.0f s; it is in %s",
                             now - busy, where(self.main))

    def close(self) -> None:
        self.done.set()
        self.thread.join(5)


def _ignore(signum: int, frame: FrameType | None) -> None:
    """A Python-level handler that does nothing: the wakeup fd carries the signal."""


def every(seconds: float) -> Any:
    """APScheduler's interval trigger, which after a step of the wall clock forward fires once
    and goes on from then. Its own walks every fire time the step skipped, one by one,
    before it coalesces them: a 60-day step made 5 million for the 1 s checkpoint job (5 s
    of CPU and 285 MB more memory, the poll waiting behind it)."""
    from apscheduler.triggers.interval import IntervalTrigger

    class Every(IntervalTrigger):  # type: ignore[misc]
        def get_next_fire_time(self, previous: datetime | None, now: datetime
                               ) -> datetime | None:
            nxt: datetime | None = super().get_next_fire_time(previous, now)
            if previous is not None and nxt is not None and nxt <= now:
                later: datetime = now + self.interval
                return later
            return nxt

    return Every(seconds=seconds, timezone="UTC")


class Daemon:
    def __init__(self, cfg: Config) -> None:
        self.config = cfg
        self.wakeup = threading.Event()
        self.stopping = threading.Event()
        self.exit_code = 0  # 1 when it stops because it must not go on
        self.reload_requested = False
        self.timers: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.ready = False
        self.last_ping = 0.0
        self.watchdog_every = systemd.watchdog_interval()
        self.last_progress = time.monotonic()
        self.busy_since: float | None = None  # when the loop's current turn began; None asleep
        self.logged: dict[str, float] = {}
        self.outage = False
        self.spool_lost = False
        self.pace_wait: float | None = None
        self.polled_at = time.monotonic()  # the last heartbeat the database took
        self.clock_offset = time.time() - time.monotonic()  # see check_clock
        self.pruned_offset = self.clock_offset  # see prune_job
        self.scheduler: Any = None  # APScheduler's BackgroundScheduler, once started
        self.checkpoint_idle = False  # the checkpoint job runs every CHECKPOINT_IDLE_SECONDS
        self._checkpoint_lock = threading.Lock()
        self._relay: threading.Thread | None = None
        self._signal_pipe = (-1, -1)
        # A peer silent for this long is taken for dead and its unfinished sends are redone.
        self.lease_seconds = lease_of(cfg)
        self.identity = Identity(cfg.replica_id, self.lease_seconds)
        if cfg.metrics_listen:
            metrics.enable()  # before anything is counted
        self.policy = Policy(cfg)
        self.dispatcher = Dispatcher(transports.build(cfg.transports, cfg.send_timeout_seconds),
                                     cfg.replica_id, wake=self.wakeup.set)
        self.deliveries = Deliveries(self.dispatcher, cfg.replica_id, self.lease_seconds)
        self.spool = Spool(cfg.spool_dir, cfg.replica_id)
        self.ingest = Ingest(self.spool, self.policy, self.deliveries)
        self.schedules = Schedules()
        self.long_runs = longrun.LongRuns()
        self.deliveries.on_recorded = lambda results, now: fallback.observe(
            results, self.policy, now)
        self.observer: Watcher | None = None
        self.web: Any = None  # nomaflowd.web.WebServer when daemon.web_listen is set
        self.metrics_server: metrics.MetricsServer | None = None

    # --- start -----------------------------------------------------------------------

    def initialize(self) -> None:
        self.spool.prepare()
        self.database = db.open_database(self.config.database)
        if self.config.web_listen:  # bound before anything starts: a busy port fails fast
            from nomaflowd.web import WebServer
            self.web = WebServer(self.config.web_listen, lambda: self.config, self.spool)
        self.watch_spool()                                      # watch first...
        self.ingest.hinted = True                               # ...then scan the backlog
        self.ingest.count_tries(utcnow())
        self.heartbeat()
        self.deliveries.resume()
        from apscheduler.schedulers.background import BackgroundScheduler

        self.scheduler = BackgroundScheduler(timezone="UTC", job_defaults={
            "max_instances": 1, "coalesce": True, "misfire_grace_time": None})
        self.scheduler.add_job(self.poll_due, every(self.config.poll_seconds),
                               next_run_time=datetime.now().astimezone(), id="poll")
        self.scheduler.add_job(self.prune_job, "interval", days=1,
                               next_run_time=datetime.now().astimezone() + timedelta(minutes=1),
                               id="prune")
        self.scheduler.add_job(self.checkpoint_job, every(CHECKPOINT_SECONDS), id="checkpoint")
        self.scheduler.start()
        if self.config.metrics_listen:
            self.metrics_server = metrics.MetricsServer(
                self.config.metrics_listen, self.gauges, self.unhealthy)

    def install_signals(self) -> None:
        """SIGTERM/SIGINT stop, SIGHUP reloads. The kernel's signal reaches a relay thread
        through signal.set_wakeup_fd, and the relay sets the events: a Python handler that
        set them itself could run while the main thread holds the same Event's lock (inside
        wait() or clear()) and hang the daemon on its own lock, deaf to SIGTERM."""
        read, write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        os.set_blocking(read, True)
        self._signal_pipe = (read, write)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, _ignore)  # replaces the default (die); the relay acts
        signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        self._relay = threading.Thread(target=self._relay_signals, name="signals", daemon=True)
        self._relay.start()

    def _relay_signals(self) -> None:
        read = self._signal_pipe[0]
        while True:
            data = os.read(read, 64)
            if not data or 0 in data:  # closed, or the stop byte of shutdown()
                return
            for signum in data:
                if signum in (signal.SIGTERM, signal.SIGINT):
                    self.stopping.set()
                elif signum == signal.SIGHUP:
                    self.reload_requested = True
            self.wakeup.set()

    def _close_signals(self) -> None:
        if self._relay is None:
            return
        signal.set_wakeup_fd(-1)
        read, write = self._signal_pipe
        os.write(write, b"\0")
        self._relay.join(5)
        os.close(read)
        os.close(write)
        self._relay = None

    def hint(self) -> None:
        """The spool watcher's thread: a `*.json` arrived."""
        self.ingest.hinted_at = time.monotonic()
        self.ingest.hinted = True
        self.wakeup.set()

    def check_clock(self) -> None:
        """APScheduler times its jobs on the wall clock: after a step back of 3 hours (NTP,
        a VM restored from a snapshot) the poll waited 3 hours, and with it long-run
        warnings, schedules, the heartbeat (and so, with peers, every send). A step either
        way makes the poll and the checkpoint due now; they go on from there."""
        offset = time.time() - time.monotonic()
        step, self.clock_offset = offset - self.clock_offset, offset
        if abs(step) < CLOCK_STEP_SECONDS or self.scheduler is None:
            return
        logger.warning("the wall clock stepped %s by %s; the poll starts again from now",
                       "back" if step < 0 else "forward", span(abs(step) / 60))
        from apscheduler.jobstores.base import JobLookupError

        for job in ("poll", "checkpoint"):
            with contextlib.suppress(JobLookupError):  # the scheduler is shutting down
                self.scheduler.modify_job(job, next_run_time=datetime.now(UTC))

    def poll_due(self) -> None:
        """The poll is due now (any thread): tell the main loop."""
        self.timers.put("poll")
        self.wakeup.set()

    # --- the loop --------------------------------------------------------------------

    def run(self) -> int:
        try:
            self.initialize()
        except BaseException:  # the caller says why in one line; leave nothing running
            self._close_signals()
            if self.web is not None:
                self.web.close()
            if self.observer is not None:
                self.observer.stop()
            raise
        logger.info("nomaflowd started: spool %s, replica %s, %d transport(s)",
                    self.config.spool_dir, self.config.replica_id, len(self.config.transports))
        stall_watch = StallWatch(self, self.watchdog_every or STALL_SECONDS)
        while not self.stopping.is_set():
            self.busy_since = time.monotonic()
            try:
                self.check_clock()
                more = self.step()
                if self.reload_requested:
                    self.reload()
            except Exception:  # the loop must outlive a bug in one iteration
                logger.exception("main loop iteration failed; going on")
                self.stopping.wait(1.0)
                more = False
            self.maybe_ping()
            if not more:
                self.busy_since = None
                self.wakeup.wait(self.idle_timeout())
                self.wakeup.clear()
        stall_watch.close()
        self.shutdown()
        return self.exit_code

    def step(self, now: datetime | None = None) -> bool:
        """Finish what came back, do what is due, ingest at most one batch.
        Returns "more work right away?"."""
        try:
            return self._step(now)
        finally:
            self.wake_checkpoint()

    def _step(self, now: datetime | None) -> bool:
        self.last_progress = self.ingest.woke_at = time.monotonic()
        try:
            self.deliveries.collect()
            if not self.timers.empty():  # ticks that piled up while a query waited: one poll
                while not self.timers.empty():
                    self.timers.get_nowait()
                self.poll(now or utcnow())
            self.pace_wait = self.dispatcher.pace()
            scanned = self.ingest.last_scan
            try:
                pending = self.ingest.refill(self.config.rescan_seconds)
            except SpoolUnreadable as exc:  # not the database's fault: say what it is
                self.say_once_a_minute("spool", "spool %s cannot be read: %s",
                                       self.config.spool_dir, exc)
                self.spool_lost = True
                return False
            if self.spool_lost and self.ingest.last_scan != scanned:
                self.rewatch()  # it is back (perhaps a new directory): watch it anew
            elif self.observer is None and self.ingest.last_scan != scanned:
                self.watch_spool()  # inotify had no room at the last try
            if not pending:
                return False  # nothing here met the database: the poll says how it is
            more = self.ingest.step(now or utcnow())
            self.outage = False
            return more
        except db.OUTAGES as exc:
            self.database_down(exc)
            return False

    def poll(self, now: datetime) -> None:
        """Every poll_seconds: heartbeat, take over a dead peer's claims, sweep our own
        unfinished ones, long-run warnings, schedules."""
        gone = db.file_gone()
        if gone:
            logger.critical("daemon.database: %s was %s while the daemon ran; stopping, so that"
                            " nothing more is recorded into a file that is gone",
                            db.file_path(), gone)
            self.exit_code = 1
            self.stopping.set()
            return
        try:
            beat_at = time.monotonic()  # before the heartbeat: its stamp is no earlier
            self.heartbeat()
            self.polled_at = beat_at
            self.outage = False  # the database answered
            # Our claims are safe from a peer's take-over for a lease after this heartbeat;
            # the senders stop short of it by a third (a poll's worth and more), as the
            # peer's clock and ours read the same lease a few milliseconds apart.
            self.dispatcher.alive_until = (beat_at + self.lease_seconds * 2 / 3
                                           if self.deliveries.peers() else math.inf)
            self.deliveries.recheck()
            if self.identity.unique:  # with a twin on our id, its claims look like ours
                self.deliveries.take_over(db.db_now())
                self.deliveries.sweep(utcnow())
            self.long_runs.poll(self.policy, self.deliveries, now)
            # Not before the spool's backlog is in: a run that happened while we were down
            # is waiting there, and must not be called missed.
            if self.ingest.last_scan and not self.ingest.pending:
                self.schedules.poll(self.policy, self.deliveries, now)
        except db.OUTAGES as exc:
            self.outage = True
            self.say_once_a_minute("poll", "poll skipped, database unavailable: %s",
                                   db.one_line(exc))
            # Broken for good (peewee does not notice a closed PostgreSQL connection): the
            # next query connects anew. Kept, every poll said "connection already closed"
            # until a file came and the ingest's outage handling closed it.
            with contextlib.suppress(*db.OUTAGES):
                self.database.close()

    def poll_long_runs(self, now: datetime) -> int:
        """The long-run poll alone, at `now` (what tests drive)."""
        return self.long_runs.poll(self.policy, self.deliveries, now)

    def poll_schedules(self, now: datetime) -> int:
        """The due-schedule poll alone, at `now` (what tests drive)."""
        return self.schedules.poll(self.policy, self.deliveries, now)

    def heartbeat(self) -> None:
        self.identity.beat()

    def database_down(self, exc: BaseException) -> None:
        """Files stay in the spool; say so once a minute, wait a moment, try again."""
        self.outage = True
        self.say_once_a_minute("database", "database unavailable, files wait in the spool: %s",
                               db.one_line(exc))
        self.ingest.pending.clear()
        self.stopping.wait(1.0)
        with contextlib.suppress(*db.OUTAGES):  # broken anyway; the next query reconnects
            self.database.close()

    def say_once_a_minute(self, what: str, message: str, *args: Any) -> None:
        if time.monotonic() - self.logged.get(what, -60.0) >= 60:
            self.logged[what] = time.monotonic()
            logger.error(message, *args)

    def rewatch(self) -> None:
        """After the spool was gone: its subdirectories and a watch on the new directory
        (tried again at the next scan if either cannot be made yet)."""
        self.spool.close()
        try:
            self.spool.prepare()
        except ConfigError as exc:
            self.say_once_a_minute("spool", "%s", exc)
            return
        self.spool_lost = False
        self.watch_spool()
        self.ingest.hinted = True
        logger.info("spool %s is back; %s", self.config.spool_dir, "watching it again"
                    if self.observer is not None else "finding files by the rescan")

    def watch_spool(self) -> None:
        """Watch the spool for arrivals. File events are only hints: without a watch
        (inotify's limits reached, which failed the start) the rescan every rescan_seconds
        finds the files, and each rescan tries the watch again."""
        try:
            watcher = watch(self.config.spool_dir, self.hint)
        except OSError as exc:
            if self.observer is not None:
                self.observer.stop()
                self.observer.join()
                self.observer = None
            self.say_once_a_minute(
                "inotify", "cannot watch the spool %s for new files (%s); finding them by the"
                " rescan every %gs meanwhile. Raise fs.inotify.max_user_instances or"
                " fs.inotify.max_user_watches (sysctl)", self.config.spool_dir,
                exc.strerror or exc, self.config.rescan_seconds)
            return
        old, self.observer = self.observer, watcher
        if old is not None:
            old.stop()
            old.join()
        if self.logged.pop("inotify", None) is not None:
            logger.info("watching the spool %s again", self.config.spool_dir)

    def idle_timeout(self) -> float:
        """How long the loop may block: until the next rescan, ping or paced send is due."""
        if self.ingest.pending or not self.timers.empty():
            return 0.0
        timeout = self.config.rescan_seconds - (time.monotonic() - self.ingest.last_scan)
        if self.watchdog_every:
            timeout = min(timeout, self.watchdog_every)
        if self.pace_wait is not None:
            timeout = min(timeout, self.pace_wait)
        record = self.deliveries.record_due()
        if record is not None:
            timeout = min(timeout, record)
        return max(0.001 if record is not None else 0.01, timeout)

    def maybe_ping(self) -> None:
        if not self.ready:
            if not self.ingest.pending and not self.ingest.hinted:
                self.ready = True
                systemd.notify("READY=1", "STATUS=watching the spool")
                logger.info("backlog ingested; watching %s", self.config.spool_dir)
            return
        if self.watchdog_every and time.monotonic() - self.last_ping >= self.watchdog_every:
            self.last_ping = time.monotonic()
            systemd.notify("WATCHDOG=1")

    # --- reload and stop -------------------------------------------------------------

    def reload(self) -> None:
        """New config, catalogue and transports, all or nothing: a bad one is refused and the
        running one kept (and said in the log)."""
        self.reload_requested = False
        systemd.reloading()
        try:
            cfg = config.load(self.config.path)
            for key in RESTART_ONLY:
                if getattr(cfg, key) != getattr(self.config, key):
                    logger.warning("daemon.%s changed; it takes effect at the next restart", key)
                    cfg = replace(cfg, **{key: getattr(self.config, key)})
            policy = Policy(cfg, self.policy)
            built = transports.build(cfg.transports, cfg.send_timeout_seconds)
        except NomaflowError as exc:
            logger.error("reload refused, keeping the running config: %s", exc)
            # The running catalogue still follows jobs.toml on its own; a broken one was
            # named in the line above, and is not named again at the next batch.
            self.policy.catalogue.refresh(quiet=True)
        else:
            timings = (cfg.poll_seconds, cfg.send_timeout_seconds)
            if timings != (self.config.poll_seconds, self.config.send_timeout_seconds):
                self.retime(cfg)
            self.config = cfg
            self.policy = self.ingest.policy = policy
            self.dispatcher.configure(built)
            logger.info("reloaded %s: %d transport(s)", cfg.path, len(cfg.transports))
        systemd.notify("READY=1")

    def retime(self, cfg: Config) -> None:
        """A reload's new poll_seconds or send_timeout_seconds: the poll's interval and the
        lease that peers are judged by follow it."""
        lease = lease_of(cfg)
        self.lease_seconds = self.deliveries.lease_seconds = self.identity.lease_seconds = lease
        if self.scheduler is not None and cfg.poll_seconds != self.config.poll_seconds:
            self.scheduler.reschedule_job("poll", trigger=every(cfg.poll_seconds))

    def shutdown(self) -> None:
        # The whole stop, in-flight sends and an unavailable database included, within
        # 3 x send_timeout_seconds (the unit's TimeoutStopSec leaves room for it): the wait
        # for the database used to start after the sends' (38 s were seen, and SIGKILL).
        stop_by = time.monotonic() + 3 * self.config.send_timeout_seconds
        systemd.notify("STOPPING=1")
        self._close_signals()
        logger.info("stopping: waiting for %d send(s) in flight", self.dispatcher.sending)
        if self.observer is not None:
            self.observer.stop()
            self.observer.join()
        if self.scheduler is not None:
            self.scheduler.shutdown(wait=True)
        if self.metrics_server is not None:
            self.metrics_server.close()
        if self.web is not None:
            self.web.close()
        results, unsent = self.dispatcher.close(
            max(0.0, min(self.config.send_timeout_seconds + 1, stop_by - time.monotonic())))
        self.deliveries.closing = True
        self.deliveries.unrecorded.extend(results)
        # Unrecorded results leave their claims open, and the next start sends them again:
        # a page twice. So a database away at the stop is waited for, a while (systemd
        # gives a stop 90 s by default).
        while True:
            try:
                self.deliveries.finish([])
                self.deliveries.release(unsent)
                break
            except db.OUTAGES as exc:
                with contextlib.suppress(*db.OUTAGES):  # the next try connects anew
                    self.database.close()
                if time.monotonic() >= stop_by:  # their claims stay open: sent again
                    logger.error("could not record the last %d result(s), database"
                                 " unavailable: %s", len(self.deliveries.unrecorded),
                                 db.one_line(exc))
                    break
                self.say_once_a_minute("stop", "waiting for the database to record the last"
                                       " %d result(s): %s", len(self.deliveries.unrecorded),
                                       db.one_line(exc))
                time.sleep(1.0)
        self.spool.close()
        with contextlib.suppress(*db.OUTAGES):
            self.database.close()
        logger.info("stopped")

    # --- read from other threads (metrics) -------------------------------------------

    def unhealthy(self) -> str:
        """/healthz: "" while the loop turns, the database answers and our replica id is our
        own; else which of them is not so."""
        if time.monotonic() - self.last_progress >= max(10.0, 3 * self.config.rescan_seconds):
            return "main loop stalled"
        if self.outage:
            return "database unavailable"
        if time.monotonic() - self.polled_at >= 3 * self.config.poll_seconds + 10:
            return "poll stalled"
        if not self.identity.unique:
            return f"another live daemon uses replica_id {self.config.replica_id}"
        return ""

    def gauges(self) -> dict[str, float]:
        """Live values for /metrics (called on the metrics thread)."""
        values = {"spool_backlog": float(len(self.ingest.pending)),
                  "alerts_waiting": float(self.dispatcher.waiting)}
        if self.ingest.last_event_at is not None:
            values["newest_event_age_seconds"] = time.monotonic() - self.ingest.last_event_at
        try:
            values["running_runs"] = float(
                db.RunRow.select().where(db.RunRow.state == "RUNNING").count())
        except db.OUTAGES:
            pass  # the gauge is left out while the database is away
        finally:
            db.proxy.close()
        return values

    def checkpoint_job(self) -> None:
        """APScheduler's thread: the SQLite WAL copied back into the database file, off the
        main loop (a checkpoint inside a commit held that event for milliseconds).

        Finding nothing new, it slows to every CHECKPOINT_IDLE_SECONDS: an idle daemon woke
        two threads a second for it (bench h: most of its idle CPU). The main loop speeds
        it up again when it has written (wake_checkpoint).
        """
        changed = True
        try:
            changed = db.checkpoint()
        except db.OUTAGES:
            pass  # the main loop says so; the backstop or the next turn checkpoints
        finally:
            self.database.close()
        with self._checkpoint_lock:
            if changed == self.checkpoint_idle:
                self._checkpoint_every(idle=not changed)

    def wake_checkpoint(self) -> None:
        """The main loop, after each step: back to a checkpoint a second once it wrote."""
        if self.checkpoint_idle and db.wal_changed():
            with self._checkpoint_lock:
                if self.checkpoint_idle:
                    self._checkpoint_every(idle=False)

    def _checkpoint_every(self, *, idle: bool) -> None:
        """With _checkpoint_lock held: the job's pace and the flag that says which it is."""
        from apscheduler.jobstores.base import JobLookupError

        self.checkpoint_idle = idle
        # JobLookupError: the scheduler is shutting down (it then knows no job by id).
        with contextlib.suppress(JobLookupError):
            self.scheduler.reschedule_job("checkpoint", trigger=every(
                CHECKPOINT_IDLE_SECONDS if idle else CHECKPOINT_SECONDS))

    def prune_job(self) -> None:
        """APScheduler's thread, daily: retention (database rows only, no shared state).

        Not just after a step of the wall clock of more than an hour since its last run: a
        clock 190 days ahead for a moment (a VM restored, a bad time source) made it delete
        the whole history, for good. After a real correction it runs the next day."""
        offset = time.time() - time.monotonic()
        stepped, self.pruned_offset = offset - self.pruned_offset, offset
        if abs(stepped) >= 3600:
            logger.warning("retention skipped today: the wall clock moved %s by %s since it"
                           " last ran", "back" if stepped < 0 else "forward",
                           span(abs(stepped) / 60))
            return
        try:
            removed: dict[str, int] = dict(db.prune(utcnow(), self.config.retention_days,
                                                    self.stopping))
            removed["rejected files"] = self.spool.prune_rejected(utcnow(),
                                                                  self.config.retention_days)
            removed["schedules"] = schedules.forget(  # the catalogue as the loop last saw it
                self.policy.catalogue.current,
                utcnow() - timedelta(days=self.config.retention_days))
            logger.info("retention: removed %s", ", ".join(f"{n} {t}" for t, n in removed.items()))
        except db.OUTAGES as exc:
            logger.error("retention skipped, database unavailable: %s", db.one_line(exc))
        finally:
            self.database.close()
