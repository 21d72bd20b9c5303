"""Shared by the benchmark scripts: workload cache, slices, timed runs, machine facts."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections import Counter
from pathlib import Path

import make_workload

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
OUT = BENCH / "out"
GNU_TIME = "/usr/bin/time"

_PCAP_HDR = struct.Struct("<IHHiIII")
_PCAP_REC = struct.Struct("<IIII")


def fmt_size(n: int) -> str:
    """1073741824 -> '1G', 2097152 -> '2M', 1000 -> '1000'."""
    for unit, mult in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)


def log(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


# -- workloads ----------------------------------------------------------------------------------

def workload_path(size: int, blob: tuple[int, int], seed: int, out: Path = OUT) -> Path:
    lo, hi = blob
    return out / (f"workload-{fmt_size(size)}-blob{fmt_size(lo)}-{fmt_size(hi)}-s{seed}"
                  f"-v{make_workload.GENERATOR_VERSION}.pcap")


def ensure_workload(size: int, blob: tuple[int, int], seed: int, out: Path = OUT
                    ) -> tuple[Path, dict]:
    """The cached workload for these parameters (generated when missing) and its sidecar."""
    path = workload_path(size, blob, seed, out)
    side = path.with_suffix(".json")
    if path.exists() and side.exists():
        doc = json.loads(side.read_text())
        if (doc.get("generator_version") == make_workload.GENERATOR_VERSION
                and path.stat().st_size == doc.get("file_bytes")):
            return path, doc
    out.mkdir(parents=True, exist_ok=True)
    log(f"generating {path.name} (size {fmt_size(size)}, blobs {fmt_size(blob[0])}-"
        f"{fmt_size(blob[1])}, seed {seed}) ...")
    make_workload.generate(path, size, blob, seed, sidecar=side)
    return path, json.loads(side.read_text())


def slice_pcap(src: Path, max_bytes: int, out: Path = OUT) -> tuple[Path, int, int]:
    """The first whole records of `src` up to `max_bytes` of file, as a pcap (cached).

    Returns (path, packets, frame bytes). A slice at least as big as the file is the file.
    """
    if max_bytes >= src.stat().st_size:
        packets = frame_bytes = 0
        for n in _record_lengths(src):
            packets += 1
            frame_bytes += n
        return src, packets, frame_bytes
    dst = out / f"{src.stem}.slice{fmt_size(max_bytes)}.pcap"
    meta = dst.with_suffix(".json")
    if dst.exists() and meta.exists():
        m = json.loads(meta.read_text())
        if m.get("source_bytes") == src.stat().st_size and dst.stat().st_size == m["file_bytes"]:
            return dst, m["packets"], m["frame_bytes"]
    packets = frame_bytes = 0
    tmp = dst.with_name(dst.name + ".part")
    with open(src, "rb") as fi, open(tmp, "wb", buffering=8 << 20) as fo:
        header = fi.read(_PCAP_HDR.size)
        fo.write(header)
        size = len(header)
        while True:
            rec = fi.read(16)
            if len(rec) < 16:
                break
            incl = _PCAP_REC.unpack(rec)[2]
            if size + 16 + incl > max_bytes:
                break
            fo.write(rec)
            fo.write(fi.read(incl))
            size += 16 + incl
            packets += 1
            frame_bytes += incl
    os.replace(tmp, dst)
    meta.write_text(json.dumps({"source": str(src), "source_bytes": src.stat().st_size,
                                "file_bytes": size, "packets": packets,
                                "frame_bytes": frame_bytes}))
    return dst, packets, frame_bytes


def _record_lengths(path: Path):
    with open(path, "rb") as fh:
        fh.seek(_PCAP_HDR.size)
        while True:
            rec = fh.read(16)
            if len(rec) < 16:
                return
            incl = _PCAP_REC.unpack(rec)[2]
            fh.seek(incl, 1)
            yield incl


def warm_cache(path: Path) -> None:
    """Read the file once so every tool starts with it in the page cache."""
    with open(path, "rb", buffering=0) as fh:
        while fh.read(16 << 20):
            pass


# -- expected transactions ----------------------------------------------------------------------

def expected_transactions(side: dict, packets: int | None = None, mark: str = "req_last"
                          ) -> Counter:
    """Multiset of (method, uri, status) the generator wrote.

    With `packets` (a slice of the first N packets): only requests whose `mark` packet is in
    the slice; the status is None when the response's last packet is not.
    """
    out: Counter = Counter()
    for t in side["txns"]:
        if packets is not None and t[mark] > packets:
            continue
        status = t["status"] if packets is None or t["resp_last"] <= packets else None
        out[(t["method"], t["uri"], status)] += 1
    return out


def compare(expected: Counter, found: Counter, examples: int = 5) -> dict:
    """How a tool's transactions differ from the generator's."""
    missing = expected - found
    extra = found - expected
    req_exp = Counter()
    req_found = Counter()
    for (m, u, _s), n in expected.items():
        req_exp[(m, u)] += n
    for (m, u, _s), n in found.items():
        req_found[(m, u)] += n
    return {
        "expected": sum(expected.values()),
        "found": sum(found.values()),
        "matched": sum((expected & found).values()),
        "requests_missing": sum((req_exp - req_found).values()),
        "requests_extra": sum((req_found - req_exp).values()),
        "missing": sum(missing.values()),
        "extra": sum(extra.values()),
        "missing_examples": [list(k) + [n] for k, n in list(missing.items())[:examples]],
        "extra_examples": [list(k) + [n] for k, n in list(extra.items())[:examples]],
        "ok": not missing and not extra,
    }


# -- timed runs ---------------------------------------------------------------------------------

def measure(cmd: list[str], stdout: Path | None = None, cwd: Path | None = None) -> dict:
    """Run `cmd`; wall seconds, CPU seconds (user + system), peak RSS (KiB) and exit status.

    Peak RSS is `/usr/bin/time -v`'s "Maximum resident set size" (the child's ru_maxrss, which
    counts mapped file pages that were touched); without GNU time, the same ru_maxrss comes
    from os.wait4.
    """
    with contextlib.ExitStack() as stack:
        out_fh = (stack.enter_context(open(stdout, "wb")) if stdout  # noqa: SIM115
                  else subprocess.DEVNULL)
        err_fh = stack.enter_context(tempfile.TemporaryFile())
        if os.path.exists(GNU_TIME):
            tf = stack.enter_context(tempfile.NamedTemporaryFile("r", suffix=".time"))
            full = [GNU_TIME, "-v", "-o", tf.name, *cmd]
            t0 = time.perf_counter()
            rc = subprocess.call(full, stdout=out_fh, stderr=err_fh, cwd=cwd)
            wall = time.perf_counter() - t0
            text = Path(tf.name).read_text()
            m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
            rss = int(m.group(1)) if m else None
            cpu = sum(float(x) for x in
                      re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", text))
            via = "/usr/bin/time -v"
        else:
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=out_fh, stderr=err_fh, cwd=cwd)
            _pid, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - t0
            proc.returncode = rc = os.waitstatus_to_exitcode(status)
            rss = usage.ru_maxrss
            cpu = usage.ru_utime + usage.ru_stime
            via = "wait4 ru_maxrss"
        err_fh.seek(0)
        err = err_fh.read().decode("utf-8", "replace")
    return {"seconds": wall, "cpu_seconds": cpu, "rss_kib": rss, "returncode": rc,
            "rss_via": via,
            "stderr_tail": err[-2000:] if rc else ""}


def median(values: list[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


# -- the tools ----------------------------------------------------------------------------------

def sensor_command() -> list[str]:
    """registry-sensor's console script next to this interpreter (not a pyenv shim)."""
    script = Path(sysconfig.get_path("scripts")) / "registry-sensor"
    if script.exists():
        return [str(script)]
    found = shutil.which("registry-sensor")
    if found:
        return [found]
    return [sys.executable, "-m", "sensor.cli"]


def sensor_config(out: Path = OUT) -> Path:
    """A config that keeps the fingerprint key under bench/out, not the system state dir."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "sensor.yaml"
    path.write_text("# written by bench/: the key stays here, the default rules apply\n"
                    "key_file: sensor.key\n")
    return path


def tool_version(cmd: list[str]) -> str | None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (proc.stdout or proc.stderr).strip().splitlines()
    return text[0].strip() if text else None


def machine_info() -> dict:
    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = round(int(line.split()[1]) / (1 << 20), 1)
    except OSError:
        pass
    try:
        import scapy

        scapy_version = scapy.__version__
    except ImportError:
        scapy_version = None
    try:
        from sensor import __version__ as sensor_version
    except ImportError:
        sensor_version = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem,
        "kernel": platform.release(),
        "os": _os_name(),
        "python": platform.python_version(),
        "registry_sensor": sensor_version,
        "suricata": tool_version(["suricata", "-V"]) if shutil.which("suricata") else None,
        "tshark": tool_version(["tshark", "--version"]) if shutil.which("tshark") else None,
        "scapy": scapy_version,
        "py_spy": tool_version(["py-spy", "--version"]) if shutil.which("py-spy") else None,
    }


def source_state() -> dict:
    """Which sensor code was measured: the commit and the files changed since (read-only git)."""
    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", "--no-optional-locks", "-C", str(ROOT), *args],
                                  capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    changed = git("status", "--porcelain", "--", "sensor")
    digest = hashlib.sha256()
    for path in sorted((ROOT / "sensor").rglob("*.py")):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return {"commit": git("rev-parse", "HEAD"),
            "sensor_changes": changed.splitlines() if changed else [],
            "sensor_tree_sha256": digest.hexdigest()[:16]}


def _os_name() -> str | None:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return None
