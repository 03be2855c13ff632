"""Several replicas on one PostgreSQL act as one notifier (real processes, real server)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from nomaflowd import db
from tests.conftest import DaemonProcess, replica_tree
from tests.servers import Reply, wait_until

pytestmark = pytest.mark.postgres


def pg_rows(url: str, sql: str, *params: object) -> list[tuple]:
    from playhouse.db_url import connect

    database = connect(url)
    try:
        return list(database.execute_sql(sql, params).fetchall())
    finally:
        database.close()


def start(tree, replica: str, extra: str = "", env: dict | None = None) -> DaemonProcess:
    return DaemonProcess(tree, env).start()


def configure(tree, http, replica: str, daemon: str = "") -> None:
    tree.write_config(tree.webhook("hook", http.url()),
                      daemon=f'replica_id = "{replica}"\n{daemon}')


def two_replicas(tree, http, pg_schema: str, tmp_path: Path) -> tuple[DaemonProcess,
                                                                      DaemonProcess]:
    """Replicas a and b on one PostgreSQL schema, each with its own spool and one webhook."""
    tree.database = pg_schema
    b_tree = replica_tree(tmp_path / "b", tree, pg_schema)
    configure(tree, http, "a")
    configure(b_tree, http, "b")
    return start(tree, "a"), start(b_tree, "b")


def test_same_events_in_both_spools_are_delivered_once(tree, http, pg_schema, tmp_path):
    a, b = two_replicas(tree, http, pg_schema, tmp_path)
    try:
        for i in range(20):
            event = {"job_id": "j", "run_id": f"r{i}", "state": "FAILED"}
            tree.drop(event)
            b.tree.drop(event)
        http.wait_for(20)
        wait_until(lambda: not tree.spool_files() and not b.tree.spool_files(), what="spools")
        wait_until(lambda: pg_rows(pg_schema, "SELECT count(*) FROM notifications")[0][0] == 20,
                   what="20 audit rows")
        assert a.stop() == 0 and b.stop() == 0
    finally:
        a.close()
        b.close()
    assert sorted(r.json()["run_id"] for r in http.requests) == sorted(f"r{i}" for i in range(20))
    assert pg_rows(pg_schema, "SELECT count(*) FROM events") == [(20,)]
    replicas = {r[0] for r in pg_rows(pg_schema, "SELECT DISTINCT replica FROM notifications")}
    assert replicas <= {"a", "b"}


def test_long_run_warning_is_raised_by_one_replica(tree, http, pg_schema, tmp_path):
    from datetime import timedelta

    tree.database = pg_schema
    b_tree = replica_tree(tmp_path / "b", tree, pg_schema)
    for t, name in ((tree, "a"), (b_tree, "b")):
        configure(t, http, name)
        t.write_jobs("[jobs.etl.alerts]\non_long_run_minutes = 5\n")
    a, b = start(tree, "a"), start(b_tree, "b")
    try:
        started = (db.utcnow() - timedelta(minutes=6)).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {"job_id": "etl", "run_id": "slow", "state": "RUNNING", "started_at": started}
        tree.drop(event)
        b_tree.drop(event)
        http.wait_for(1)
        after = pg_rows(pg_schema, "SELECT now() AT TIME ZONE 'UTC'")[0][0]
        # Both replicas have polled since the warning went out (their heartbeats say so).
        wait_until(lambda: pg_rows(pg_schema, "SELECT count(*) FROM replicas WHERE seen_at > "
                                   f"'{after}'")[0][0] == 2, what="both replicas polled")
        assert a.stop() == 0 and b.stop() == 0
    finally:
        a.close()
        b.close()
    assert [r.json()["alert"] for r in http.requests] == ["long_run"]


def test_killed_replica_work_is_finished_by_its_peer(tree, http, pg_schema, tmp_path):
    http.default = Reply(delay=0.05)
    tree.database = pg_schema
    b_tree = replica_tree(tmp_path / "b", tree, pg_schema)
    shared = tree.spool
    shared.mkdir(parents=True, exist_ok=True)
    b_tree.spool = shared  # one spool directory, as on a network mount
    configure(tree, http, "a")
    configure(b_tree, http, "b")
    a, b = start(tree, "a"), start(b_tree, "b")
    try:
        for i in range(50):
            tree.drop({"job_id": "j", "run_id": f"k{i}", "state": "FAILED"})
        http.wait_for(5)
        a.proc.kill()
        a.proc.wait(10)
        wanted = {f"k{i}" for i in range(50)}
        wait_until(lambda: {r.json()["run_id"] for r in http.requests} >= wanted, timeout=40,
                   what="all 50 delivered")
        wait_until(lambda: pg_rows(pg_schema, "SELECT count(*) FROM deliveries WHERE state ="
                                   " 'claimed'")[0][0] == 0, timeout=20, what="no open claim")
        assert b.stop() == 0
    finally:
        a.close()
        b.close()
    runs = [r.json()["run_id"] for r in http.requests]
    duplicates = {r for r in runs if runs.count(r) > 1}
    taken = {r[0] for r in pg_rows(pg_schema, "SELECT run_id FROM notifications WHERE detail"
                                   " LIKE %s", "taken over%")}
    assert duplicates <= taken
    assert not shared.joinpath("rejected").exists() or not any(
        p.suffix == ".json" for p in shared.joinpath("rejected").iterdir())


def test_a_replica_frozen_past_its_lease_leaves_its_queue_to_the_peer_that_took_it(
        tree, http, pg_schema, tmp_path):
    """A frozen replica (SIGSTOP, a paused VM) woke up and sent everything it had queued,
    although its peer had taken those claims over meanwhile: 80 duplicates of 100 in an
    audit. Only what it had in flight at the freeze may go out twice."""
    arrived: list[str] = []  # as each request comes in (it is recorded after the delay)

    def slow(request: Any) -> Reply:
        arrived.append(request.json()["run_id"])
        return Reply(delay=0.3)

    http.replies["/"] = slow
    a, b = two_replicas(tree, http, pg_schema, tmp_path)
    try:
        for i in range(40):
            tree.drop({"job_id": "j", "run_id": f"f{i}", "state": "FAILED"})
        http.wait_for(4)
        os.kill(a.pid, signal.SIGSTOP)
        time.sleep(0.5)  # what a wrote before the freeze arrives (b waits 9 s to take over)
        sent_before = set(arrived)
        wait_until(lambda: "took over" in b.output(), timeout=30, what="b taking a's claims")
        os.kill(a.pid, signal.SIGCONT)
        wanted = {f"f{i}" for i in range(40)}
        wait_until(lambda: {r.json()["run_id"] for r in http.requests} >= wanted, timeout=40,
                   what="all 40 delivered")
        wait_until(lambda: "left to the replica that took them over" in a.output(),
                   timeout=20, what="a saying what it left")
        wait_until(lambda: pg_rows(pg_schema, "SELECT count(*) FROM deliveries WHERE state ="
                                   " 'claimed'")[0][0] == 0, timeout=20, what="no open claim")
        assert a.stop() == 0 and b.stop() == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(a.pid, signal.SIGCONT)
        a.close()
        b.close()
    runs = [r.json()["run_id"] for r in http.requests]
    duplicates = {r for r in runs if runs.count(r) > 1}
    # What a had begun to send, its answer or its audit row not in yet, may go out twice:
    # what its four senders were on at the freeze. What it had queued may not.
    attempted = {r[0] for r in pg_rows(pg_schema, "SELECT run_id FROM notifications WHERE"
                                       " replica = 'a'")}
    assert duplicates <= attempted
    assert len(attempted - sent_before) <= 4, sorted(attempted - sent_before)
    assert len(sent_before) < 40


# --- PostgreSQL stopped and started under load: a private server --------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivatePostgres:
    """A PostgreSQL server of the test's own; inside `netns` when given (a host across a
    link, see Partition), listening on `host`."""

    def __init__(self, root: Path, netns: str = "", host: str = "127.0.0.1",
                 client: str = "") -> None:
        self.prefix = ["ip", "netns", "exec", netns] if netns else []
        self.host = host
        bindir = Path("/usr/lib/postgresql")
        versions = sorted(bindir.glob("*/bin/initdb")) if bindir.exists() else []
        if not versions or shutil.which("runuser") is None:
            pytest.skip("PostgreSQL server binaries not installed (Debian package postgresql)")
        self.bin = versions[-1].parent
        self.root = root
        root.mkdir(parents=True)
        shutil.chown(root, "postgres")
        self.data = root / "data"
        self.port = 5432 if netns else free_port()  # a namespace has its ports to itself
        self.run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres")
        if client:  # initdb trusts local connections only
            with (self.data / "pg_hba.conf").open("a") as hba:
                hba.write(f"host all all {client}/32 trust\n")
        self.start()
        self.url = f"postgresql://postgres@{host}:{self.port}/postgres"

    def run(self, tool: str, *args: str) -> None:
        subprocess.run([*self.prefix, "runuser", "-u", "postgres", "--", str(self.bin / tool),
                        *args], check=True, capture_output=True, cwd=self.root)

    def start(self) -> None:
        self.run("pg_ctl", "-D", str(self.data), "-w", "-l", str(self.root / "log"), "-o",
                 f"-p {self.port} -k {self.root} -c listen_addresses={self.host}", "start")

    def stop(self) -> None:
        self.run("pg_ctl", "-D", str(self.data), "-w", "-m", "fast", "stop")


@pytest.fixture
def private_pg():
    # Not under tmp_path: pytest's directories are 0700 and the server runs as `postgres`.
    root = Path(tempfile.mkdtemp(prefix="nomaflowd-pg-"))
    root.chmod(0o755)
    try:
        server = PrivatePostgres(root / "pg")
        yield server
        with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
            server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_postgres_outage_under_load_loses_nothing_and_duplicates_nothing(
        tree, http, private_pg, tmp_path):
    url = private_pg.url
    tree.database = url
    b_tree = replica_tree(tmp_path / "b", tree, url)
    configure(tree, http, "a", "rescan_seconds = 0.2")
    configure(b_tree, http, "b", "rescan_seconds = 0.2")
    a, b = start(tree, "a"), start(b_tree, "b")
    try:
        for i in range(20):
            (tree if i % 2 else b_tree).drop({"job_id": "j", "run_id": f"p{i}", "state": "FAILED"})
        http.wait_for(20)
        private_pg.stop()
        outage_started = time.monotonic()
        for i in range(20, 40):
            (tree if i % 2 else b_tree).drop({"job_id": "j", "run_id": f"p{i}", "state": "FAILED"})
        wait_until(lambda: "database unavailable" in a.output()
                   and "database unavailable" in b.output(), what="both replicas notice")
        assert a.proc.poll() is None and b.proc.poll() is None
        assert len(tree.spool_files()) + len(b_tree.spool_files()) == 20
        while time.monotonic() - outage_started < 3:
            assert a.proc.poll() is None and b.proc.poll() is None
            time.sleep(0.1)
        private_pg.start()
        http.wait_for(40, timeout=30)
        wait_until(lambda: not tree.spool_files() and not b_tree.spool_files(), what="spools")
        wait_until(lambda: pg_rows(url, "SELECT count(*) FROM notifications")[0][0] == 40,
                   timeout=20, what="40 audit rows")
        assert a.stop() == 0 and b.stop() == 0
    finally:
        a.close()
        b.close()
    runs = sorted(r.json()["run_id"] for r in http.requests)
    assert runs == sorted(f"p{i}" for i in range(40))


# --- PostgreSQL across a link that goes silent ----------------------------------------------

class Partition:
    """A network namespace joined to this one by a veth pair: a server inside it is a host
    across a link. cut() routes every packet from the namespace back to this side into a
    blackhole, as a network partition does: no RST, no ICMP, silence. heal() undoes it."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.ns, self.link = f"nfd-{tag}", f"nfd{tag}"
        octet = int(tag[:2], 16)
        self.near, self.far = f"10.213.{octet}.1", f"10.213.{octet}.2"
        self.ip("netns", "add", self.ns)
        try:
            self.ip("link", "add", self.link, "type", "veth", "peer", "name", f"{self.link}p")
            self.ip("link", "set", f"{self.link}p", "netns", self.ns)
            self.ip("addr", "add", f"{self.near}/30", "dev", self.link)
            self.ip("link", "set", self.link, "up")
            self.inside("addr", "add", f"{self.far}/30", "dev", f"{self.link}p")
            self.inside("link", "set", f"{self.link}p", "up")
            self.inside("link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    @staticmethod
    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True)

    def inside(self, *args: str) -> None:
        self.ip("netns", "exec", self.ns, "ip", *args)

    def cut(self) -> None:
        self.inside("route", "add", "blackhole", f"{self.near}/32")

    def heal(self) -> None:
        self.inside("route", "del", "blackhole", f"{self.near}/32")

    def close(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.ip("link", "del", self.link)  # its peer goes with it
        with contextlib.suppress(subprocess.CalledProcessError):
            self.ip("netns", "del", self.ns)


@pytest.fixture
def remote_pg():
    """A private PostgreSQL across a Partition: (server, partition)."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2's ip is not installed")
    try:
        partition = Partition()
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot make a network namespace here: {exc.stderr.strip()}")
    root = Path(tempfile.mkdtemp(prefix="nomaflowd-pg-"))
    root.chmod(0o755)
    try:
        server = PrivatePostgres(root / "pg", netns=partition.ns, host=partition.far,
                                 client=partition.near)
        try:
            yield server, partition
        finally:
            with contextlib.suppress(subprocess.CalledProcessError):
                server.stop()
    finally:
        partition.close()
        shutil.rmtree(root, ignore_errors=True)


def test_a_silent_database_link_is_an_outage_not_a_hang(tree, http, remote_pg):
    """README, Running several replicas: PostgreSQL unreachable. A link that drops packets
    (no refusal, no reset) is noticed within seconds, said as the database being
    unavailable, and the files wait; once the link is back they go out. Without bounds on
    the connection, a query waited for the kernel's retransmissions (about 15 minutes) and
    systemd's watchdog killed the daemon, again and again, with nothing in its log."""
    server, partition = remote_pg
    tree.database = server.url
    configure(tree, http, "a", "poll_seconds = 1\nrescan_seconds = 0.2")
    a = start(tree, "a")
    try:
        tree.drop({"job_id": "j", "run_id": "before", "state": "FAILED"})
        http.wait_for(1)
        partition.cut()
        tree.drop({"job_id": "j", "run_id": "during", "state": "FAILED"})
        wait_until(lambda: "database unavailable" in a.output(), timeout=45,
                   what="the outage said in the log")
        said = [line for line in a.output().splitlines() if "database unavailable" in line]
        assert not any(line.endswith("\\n") for line in said)  # the driver's, without its \\n
        assert a.proc.poll() is None
        assert len(tree.spool_files()) == 1 and len(http.requests) == 1
        partition.heal()
        http.wait_for(2, timeout=45)
        wait_until(lambda: not tree.spool_files(), what="the spool emptied")
        assert a.stop() == 0
    finally:
        a.close()
    assert [r.json()["run_id"] for r in http.requests] == ["before", "during"]
    assert "Traceback" not in a.output()


# --- PostgreSQL that takes a query and never answers ----------------------------------------

def server_processes(server: PrivatePostgres) -> list[int]:
    """The postmaster and every process it started (one backend per connection)."""
    postmaster = int((server.data / "postmaster.pid").read_text().split()[0])
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                if int(stat[stat.rindex(")") + 2:].split()[1]) == postmaster:
                    children.append(int(entry.name))
    return [postmaster, *children]


def test_a_frozen_database_is_said_before_the_watchdog_stops_the_daemon(tree, http, private_pg):
    """README, Install as a service. A server that takes a query and never answers (frozen,
    or stuck on its disk: its kernel still acknowledges, so no timeout of the connection
    fires) holds the main loop. systemd's watchdog then stops the daemon, and its own log
    says only "Watchdog timeout"; so the daemon says first that its loop is stuck, and in
    what. If the server wakes up before that, the loop says it turns again, and nothing is
    lost."""
    tree.database = private_pg.url
    configure(tree, http, "a", "rescan_seconds = 0.2")
    a = start(tree, "a", env={"WATCHDOG_USEC": "4000000"})  # pings every 2 s
    try:
        tree.drop({"job_id": "j", "run_id": "before", "state": "FAILED"})
        http.wait_for(1)
        frozen = server_processes(private_pg)
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        try:
            tree.drop({"job_id": "j", "run_id": "during", "state": "FAILED"})
            wait_until(lambda: "main loop has not turned" in a.output(), timeout=20,
                       what="the stuck loop said in the log")
            assert a.proc.poll() is None and len(http.requests) == 1
        finally:
            for pid in frozen:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        wait_until(lambda: "main loop turns again" in a.output(), timeout=20,
                   what="the loop said to turn again")
        http.wait_for(2)
        assert a.stop() == 0
    finally:
        a.close()
    [stuck] = [line for line in a.output().splitlines() if "has not turned" in line]
    assert " ERROR " in stuck and "peewee.py" in stuck  # where: a query that has no answer
    assert [r.json()["run_id"] for r in http.requests] == ["before", "during"]


@pytest.mark.parametrize(("query", "expected"), [
    ("", {"connect_timeout": "5", "keepalives_idle": "5"}),
    ("&connect_timeout=15&keepalives_idle=9", {"connect_timeout": "15", "keepalives_idle": "9"}),
])
def test_the_urls_own_link_settings_win_over_the_defaults(pg_schema, query, expected):
    """README: each link bound can be set in the URL's query string instead."""
    database = db.open_database(pg_schema + query)
    try:
        params = database.connection().get_dsn_parameters()
        assert {k: params.get(k) for k in expected} == expected
    finally:
        database.close()


def claim_of(replica: str, transport: str) -> None:
    """A claim `replica` made and has not finished (a webhook alert for job j)."""
    from nomaflowd.alerts import Alert

    alert = Alert(kind="failed", key=f"j/{transport}", job_id="j", run_id="r", event_id=None,
                  state="FAILED", url="")
    db.DeliveryRow.insert(alert_key=alert.key, transport=transport, recipient=transport,
                          context=json.dumps({"alert": alert.__dict__, "error": ""}),
                          claimed_by=replica, claimed_at=db.utcnow()).execute()


def test_a_peer_is_judged_by_its_own_lease_and_only_transports_we_have_are_taken(tree, http):
    """A replica polling every 20 s (lease 60 s) is alive 20 s after its heartbeat, whatever
    a peer's own 9 s lease says: taken for dead, its alerts went out twice. And a claim for a
    transport the taker lacks stays for a replica that has it (it was recorded
    FAILED_TRANSPORT, and lost)."""
    from nomaflowd import config
    from nomaflowd.deliveries import Deliveries
    from nomaflowd.dispatch import Dispatcher
    from nomaflowd.transports import build

    cfg = config.load(tree.write_config(tree.webhook("hookA", http.url("/a"))))
    db.open_database(f"sqlite:///{tree.db_path}")
    dispatcher = Dispatcher(build(cfg.transports, 2), "host-b")
    try:
        taker = Deliveries(dispatcher, "host-b", lease_seconds=9)
        db.heartbeat("host-a", "instance-a", 60.0)
        claim_of("host-a", "hookA")
        claim_of("host-a", "hookB")  # host-b has no hookB
        later = db.db_now() + timedelta(seconds=20)
        assert taker.take_over(later) == 0  # within host-a's own lease
        assert taker.take_over(later + timedelta(seconds=41)) == 1  # past it: hookA only
        owners = dict(db.DeliveryRow.select(db.DeliveryRow.transport, db.DeliveryRow.claimed_by)
                      .tuples())
        assert owners == {"hookA": "host-b", "hookB": "host-a"}
        assert http.wait_for(1, path="/a")
    finally:
        dispatcher.close()
