"""nomaflowd.service: systemd accepts every directive, the sandbox is tight, the contract holds."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from nomaflowd import crypto

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "nomaflowd.service"
TMPFILES = ROOT / "packaging" / "tmpfiles.d" / "nomaflowd.conf"
ANALYZE = shutil.which("systemd-analyze")
MAX_EXPOSURE = 2.5
# Plain, uncoloured, unpaged output at the default level: debug lines would add noise
# about syscall names this libseccomp does not know.
ANALYZE_ENV = {**os.environ, "SYSTEMD_LOG_LEVEL": "info", "SYSTEMD_COLORS": "0",
               "SYSTEMD_PAGER": "cat"}

needs_analyze = pytest.mark.skipif(
    ANALYZE is None,
    reason="systemd-analyze not found; install the `systemd` package (CI does)")


def directives(text: str) -> dict[str, list[str]]:
    """Key -> values in file order (systemd allows a key more than once)."""
    out: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def seconds(span: str) -> float:
    """A systemd time span such as `30s`, `5min` or `1min 30s`, in seconds."""
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span)
    assert parts, f"not a time span: {span!r}"
    return sum(float(n) * units[u or "s"] for n, u in parts)


def verify(tmp_path: Path, text: str) -> tuple[int, list[str]]:
    """`systemd-analyze verify` on a copy whose ExecStart binary exists on this machine.

    Returns the exit code and the output lines that concern our unit; lines about
    other units on the host are not ours to judge."""
    copy = tmp_path / "nomaflowd.service"
    copy.write_text(re.sub(r"^ExecStart=\S+", f"ExecStart={sys.executable}", text, flags=re.M),
                    encoding="utf-8")
    assert ANALYZE is not None
    proc = subprocess.run([ANALYZE, "verify", str(copy)], capture_output=True, text=True,
                          env=ANALYZE_ENV, timeout=60, check=False)
    lines = (proc.stdout + proc.stderr).splitlines()
    return proc.returncode, [line for line in lines if "nomaflowd" in line]


@needs_analyze
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    code, complaints = verify(tmp_path, UNIT.read_text(encoding="utf-8"))
    assert complaints == []
    assert code == 0


@needs_analyze
def test_verify_reports_a_misspelt_directive(tmp_path: Path) -> None:
    # verify exits 0 on an unknown key, so the test above must read the output; make
    # sure this systemd still names the unit when it complains.
    text = UNIT.read_text(encoding="utf-8").replace("NoNewPrivileges=", "NoNewPrivilege=")
    _, complaints = verify(tmp_path, text)
    assert any("NoNewPrivilege" in line for line in complaints), complaints


@needs_analyze
def test_exposure_level_is_at_most_2_5() -> None:
    assert ANALYZE is not None
    version = subprocess.run([ANALYZE, "--version"], capture_output=True, text=True,
                             check=False).stdout
    match = re.match(r"systemd (\d+)", version)
    if not match or int(match.group(1)) < 252:
        pytest.skip(f"`systemd-analyze security --offline` needs systemd 252+ ({version[:20]!r})")
    proc = subprocess.run([ANALYZE, "security", "--offline=yes", "--no-pager", str(UNIT)],
                          capture_output=True, text=True, env=ANALYZE_ENV, timeout=60,
                          check=False)
    found = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", proc.stdout)
    assert found, f"no exposure level in the output:\n{proc.stdout}\n{proc.stderr}"
    assert float(found.group(1)) <= MAX_EXPOSURE, proc.stdout


def test_unit_keeps_the_daemon_contract() -> None:
    unit = directives(UNIT.read_text(encoding="utf-8"))
    one = {key: values[-1] for key, values in unit.items()}
    assert one["Type"] == "notify"
    assert one["NotifyAccess"] == "main"
    assert seconds(one["WatchdogSec"]) > 0
    assert one["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert one["Restart"] == "on-failure"
    assert "KillSignal" not in unit  # SIGTERM is already graceful
    assert one["ExecStart"].split()[1:] == ["run", "--config", "/etc/nomaflowd/nomaflowd.toml"]
    shipped = tomllib.loads((ROOT / "etc" / "nomaflowd.toml").read_text(encoding="utf-8"))
    send_timeout = shipped["daemon"].get("send_timeout_seconds", 10.0)  # config.py default
    assert seconds(one["TimeoutStopSec"]) > 3 * send_timeout  # the whole stop (README)
    assert (one["User"], one["Group"]) == ("nomaflowd", "nomaflowd")
    assert "DynamicUser" not in unit  # the spool's ACL names a stable user
    assert one["LoadCredential"].split(":")[0] == crypto.CREDENTIAL_NAME
    assert one["ProtectSystem"] == "strict"
    assert one["NoNewPrivileges"] == one["PrivateTmp"] == "yes"
    families = one["RestrictAddressFamilies"].split()
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= set(families)  # sd_notify, SMTP, HTTPS
    assert "IPAddressDeny" not in unit and "PrivateNetwork" not in unit


def test_tmpfiles_spool_is_the_only_extra_writable_path() -> None:
    unit = directives(UNIT.read_text(encoding="utf-8"))
    lines = [line.split() for line in TMPFILES.read_text(encoding="utf-8").splitlines()
             if line.strip() and not line.startswith("#")]
    dirs = {fields[1]: fields[2:5] for fields in lines if fields[0] == "d"}
    spool = "/var/spool/nomaflowd"
    assert unit["ReadWritePaths"] == [spool]
    assert unit["AssertPathIsDirectory"] == [f"{spool}/tmp"]
    # setgid + sticky, no listing for the runners' group; rejected/ is the daemon's alone
    assert dirs[spool] == dirs[f"{spool}/tmp"] == ["3730", "nomaflowd", "nomaflow-runners"]
    assert dirs[f"{spool}/rejected"] == ["0700", "nomaflowd", "nomaflowd"]
    acls = {fields[1]: fields[-1] for fields in lines if fields[0].startswith("a")}
    for path in (spool, f"{spool}/tmp"):
        assert "default:user:nomaflowd:r" in acls[path].split(",")
        assert "default:group::-" in acls[path].split(",")


@pytest.mark.skipif(shutil.which("systemd-tmpfiles") is None,
                    reason="systemd-tmpfiles is not installed (.ci/run installs systemd)")
def test_tmpfiles_cleans_a_runners_dead_temp_files_and_keeps_the_spool(tmp_path) -> None:
    """A runner killed between its write and its rename leaves a file in tmp/ for good:
    systemd-tmpfiles-clean takes those a day old (by every time stamp, so a file being
    written is never one of them), and nothing else."""
    users = "root:x:0:0::/root:/bin/sh\nnomaflowd:x:990:990::/:/bin/false\n"
    for name, text in (("passwd", users),
                       ("group", "root:x:0:\nnomaflowd:x:990:\nnomaflow-runners:x:991:\n")):
        (tmp_path / "etc").mkdir(exist_ok=True)
        (tmp_path / "etc" / name).write_text(text)
    spool = tmp_path / "var" / "spool" / "nomaflowd"
    (spool / "tmp").mkdir(parents=True)
    (spool / "tmp" / ".being-written.json").write_text("{")
    (spool / "waiting.json").write_text("{}")
    done = subprocess.run(["systemd-tmpfiles", "--clean", f"--root={tmp_path}", str(TMPFILES)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in spool.rglob("*")) == [".being-written.json", "tmp",
                                                        "waiting.json"]
    lines = [line.split() for line in TMPFILES.read_text(encoding="utf-8").splitlines()
             if line.startswith("d ")]
    assert {fields[1]: fields[5] for fields in lines} == {
        "/var/spool/nomaflowd": "-", "/var/spool/nomaflowd/tmp": "1d",
        "/var/spool/nomaflowd/rejected": "-"}
