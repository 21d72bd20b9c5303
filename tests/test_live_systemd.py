"""The systemd unit and its companions, and the sandbox it promises: verified by systemd's own
tools, and the sensor checked against the unit's seccomp filter and MemoryDenyWriteExecute."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from netns import REPO, Lab, count_rows, missing_tools, sh, start_sensor, wait_for

from sensor.config import load_config
from sensor.detect.rules import load_rules

UNIT = REPO / "systemd" / "registry-sensor.service"
MAX_EXPOSURE = 2.0
needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze is not installed")
needs_root = pytest.mark.skipif(os.geteuid() != 0,
                                reason="needs root: network namespaces, AF_PACKET")


def _unit_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this installation's console script (verify checks
    that the binary exists; the shipped unit names /usr/local/bin, where pip puts it)."""
    script = shutil.which("registry-sensor") or str(Path(sys.executable).parent /
                                                    "registry-sensor")
    assert Path(script).exists(), "registry-sensor is not installed (pip install -e .)"
    text = UNIT.read_text()
    assert "ExecStart=/usr/local/bin/registry-sensor live" in text
    unit = tmp_path / "registry-sensor.service"
    unit.write_text(text.replace("/usr/local/bin/registry-sensor", script))
    return unit


@needs_analyze
def test_unit_verifies(tmp_path):
    unit = _unit_copy(tmp_path)
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "registry-sensor.service" not in proc.stderr, proc.stderr  # no warnings about it


@needs_analyze
def test_unit_security_exposure_is_low_and_quoted_in_readme(tmp_path, capsys):
    unit = _unit_copy(tmp_path)
    proc = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager",
                           str(unit)], capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: ([\d.]+) (\w+)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    score = float(match.group(1))
    with capsys.disabled():
        print(f"\n[systemd-analyze security] exposure {score} {match.group(2)}")
    assert score <= MAX_EXPOSURE
    readme = (REPO / "README.md").read_text()
    assert f"exposure level {match.group(1)}" in readme, "README quotes another score"


def test_unit_settings():
    text = UNIT.read_text()
    settings = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    one = {k: v[-1] for k, v in settings.items()}
    assert one["Type"] == "notify" and int(one["WatchdogSec"]) > 0
    assert one["Restart"] == "on-failure"
    assert one["AmbientCapabilities"] == one["CapabilityBoundingSet"] == \
        "CAP_NET_RAW CAP_NET_ADMIN"
    assert one["User"] == "registry-sensor" and one["StateDirectory"] == "registry-sensor"
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "MemoryDenyWriteExecute",
                "LockPersonality", "RestrictRealtime", "ProtectKernelTunables",
                "ProtectKernelModules", "ProtectControlGroups"):
        assert one[key] == "yes", key
    assert one["ProtectSystem"] == "strict"
    assert "AF_PACKET" in one["RestrictAddressFamilies"]
    assert settings["SystemCallFilter"][0] == "@system-service"
    assert "ExecReload" in one and "-HUP" in one["ExecReload"]


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None
                    or shutil.which("systemd-tmpfiles") is None,
                    reason="systemd-sysusers/systemd-tmpfiles are not installed")
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: systemd-tmpfiles sets owners")
def test_sysusers_and_tmpfiles_apply_to_an_empty_root(tmp_path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    sysusers = REPO / "systemd" / "sysusers.d" / "registry-sensor.conf"
    subprocess.run(["systemd-sysusers", f"--root={root}", str(sysusers)], check=True,
                   capture_output=True, timeout=60)
    passwd = (root / "etc" / "passwd").read_text()
    entry = [line for line in passwd.splitlines() if line.startswith("registry-sensor:")]
    assert entry and entry[0].endswith(":/var/lib/registry-sensor:/usr/sbin/nologin")
    uid = int(entry[0].split(":")[2])
    tmpfiles = REPO / "systemd" / "tmpfiles.d" / "registry-sensor.conf"
    subprocess.run(["systemd-tmpfiles", "--create", f"--root={root}", str(tmpfiles)],
                   check=True, capture_output=True, timeout=60)
    state = (root / "var" / "lib" / "registry-sensor").stat()
    assert state.st_mode & 0o777 == 0o700 and state.st_uid == uid
    assert (root / "etc" / "registry-sensor" / "rules.d").is_dir()


def test_example_config_loads(tmp_path):
    config_dir = tmp_path / "etc"
    (config_dir / "rules.d").mkdir(parents=True)
    shutil.copy(REPO / "systemd" / "registry-sensor.yaml", config_dir)
    config = load_config(config_dir / "registry-sensor.yaml")
    assert config.live.interfaces == ("eth1",) and config.live.capture == "ring"
    assert load_rules(config.rule_paths, config.networks, config.rule_overrides)


# -- the sandbox, for real ------------------------------------------------------------------

def _syscall_groups() -> dict[str, list[str]]:
    out = subprocess.run(["systemd-analyze", "syscall-filter", "--no-pager"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    groups: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif current is not None and line.strip() and not line.strip().startswith("#"):
            current.append(line.strip())
    return groups


def _expand(groups: dict[str, list[str]], name: str) -> set[str]:
    out: set[str] = set()
    for item in groups.get(name, []):
        out |= _expand(groups, item) if item.startswith("@") else {item}
    return out


def _capture_run(lab: Lab, name: str, *, mdwe: bool = False, strace: Path | None = None):
    """A sensor as the unit runs it (nobody, two capabilities) on a veth; the sample captures
    replayed into it, a SIGHUP, a SIGTERM. Returns (exit code, transactions recorded)."""
    tx, rx = lab.netns("tx"), lab.netns("rx")
    lab.veth(tx, "rp0", rx, "rp1", mtu=65535)
    work = lab.dir / name
    config = "key_file: fingerprint.key\nlive: {stats_interval: 0.5, user: nobody}\n"
    proc, notify = start_sensor(lab, rx, name, "rp1", work, config, caps_only=True,
                                mdwe=mdwe, strace=strace)
    captures = sorted(str(p) for p in (REPO / "pcaps").glob("*.pcap"))
    sh("tcpreplay", "--topspeed", "-i", "rp0", *captures, ns=tx, timeout=60)
    db = work / "sensor.db"

    wait_for(lambda: count_rows(db, "transactions"), 30, "transactions")
    pid = proc.pid
    if strace is not None:  # signals go to the traced sensor, not to strace
        pid = int(Path(f"/proc/{pid}/task/{pid}/children").read_text().split()[0])
    os.kill(pid, signal.SIGHUP)
    wait_for(lambda: "reloaded" in (lab.dir / f"{name}.log").read_text(), 30, "the reload")
    wait_for(lambda: len(notify.seen("WATCHDOG=1")) >= 2, 10, "watchdog pings")
    os.kill(pid, signal.SIGTERM)
    rc = proc.wait(30)
    return rc, count_rows(db, "transactions"), (lab.dir / f"{name}.log").read_text()


@needs_root
def test_runs_under_memory_deny_write_execute():
    """MemoryDenyWriteExecute= is a seccomp filter against W+X mappings; the kernel's own
    PR_SET_MDWE (Linux 6.3+, inherited across exec) enforces the same rule: the whole run —
    start, capture, reload, stop — works under it."""
    missing = missing_tools("ip", "tcpreplay", "setpriv", "unshare")
    if missing:
        pytest.fail(f"missing tools: {', '.join(missing)}")
    probe = subprocess.run([sys.executable, "-c", "import ctypes; "
                            "print(ctypes.CDLL(None).prctl(66, 0, 0, 0, 0))"],
                           capture_output=True, text=True)
    if probe.stdout.strip() == "-1":
        pytest.skip("this kernel has no PR_SET_MDWE (Linux < 6.3)")
    lab = Lab("m")
    try:
        rc, transactions, log = _capture_run(lab, "mdwe", mdwe=True)
    finally:
        lab.close()
    assert rc == 0, log[-2000:]
    assert transactions > 0


@needs_root
@needs_analyze
def test_system_calls_stay_within_the_unit_filter():
    """Every system call of a run as the unit runs it (strace -f) is allowed by the unit's
    SystemCallFilter=@system-service ~@privileged @resources."""
    missing = missing_tools("ip", "tcpreplay", "setpriv", "unshare", "strace")
    if missing:
        pytest.fail(f"missing tools (scripts/test installs them): {', '.join(missing)}")
    lab = Lab("c")
    trace = lab.dir / "strace" / "trace.txt"
    trace.parent.mkdir()
    os.chown(trace.parent, 65534, 65534)
    try:
        rc, transactions, log = _capture_run(lab, "strace", strace=trace)
        text = trace.read_text()
    finally:
        lab.close()
    assert rc == 0, log[-2000:]
    assert transactions > 0
    used = set(re.findall(r"^\d+\s+(?:<\.\.\. )?([a-z0-9_]+)\(", text, re.M))
    used.discard("execve")  # strace's exec of the interpreter, before any filter applies
    groups = _syscall_groups()
    allowed = _expand(groups, "@system-service") - _expand(groups, "@privileged") \
        - _expand(groups, "@resources")
    assert len(used) > 20
    assert used <= allowed, f"outside the filter: {sorted(used - allowed)}"
