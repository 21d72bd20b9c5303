"""Network-namespace helpers for the live tests: namespaces, veth pairs, a tc-mirred span port,
Debian's docker-registry, skopeo/curl clients and tiny OCI images built by hand.

Everything a `Lab` makes (namespaces, processes, temp dirs) is torn down by `Lab.close()`, which
the fixtures call in a `finally`, so a failing test leaves nothing behind. Names carry the pid so
concurrent test runs on one machine do not collide; every address is a documentation range
(192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24) and lives only inside these namespaces.

Span port, as a switch would do it: the registry and the client hang off a Linux bridge in a
"switch" namespace; tc mirrors every frame that enters either switch port (ingress qdisc + u32
match-all filter + `mirred egress mirror`, one per direction; matchall and clsact are not
available here) out of a third veth, whose peer in the "sensor" namespace is the span port.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PASSWORD = "S3cret-Pa55word!"  # alice's; the tests check it never reaches the database


def sh(*cmd: str, ns: str | None = None, check: bool = True, timeout: float = 60,
       **kw) -> subprocess.CompletedProcess:
    full = ["ip", "netns", "exec", ns, *cmd] if ns else list(cmd)
    proc = subprocess.run(full, capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(full)} -> {proc.returncode}: {proc.stderr.strip()}")
    return proc


def missing_tools(*tools: str) -> list[str]:
    return [t for t in tools if shutil.which(t, path=SAFE_PATH) is None]


@contextlib.contextmanager
def replay_wire(tag: str):
    """Two namespaces joined by a veth pair (tx: rp0, rx: rp1) for tcpreplay into a live sensor;
    yields (lab, tx, rx) and tears everything down afterwards."""
    missing = missing_tools("ip", "tcpreplay", "setpriv", "unshare", "ethtool")
    if missing:
        raise AssertionError(f"missing tools (scripts/test installs them): {', '.join(missing)}")
    lab = Lab(tag)
    try:
        tx, rx = lab.netns("tx"), lab.netns("rx")
        lab.veth(tx, "rp0", rx, "rp1", mtu=65535)  # the loopback captures hold 6.5 KB frames
        yield lab, tx, rx
    finally:
        lab.close()


def count_rows(db: Path, table: str) -> int:
    """Rows in a table of a sensor's database, read-only while the sensor writes (0 before
    the table exists)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()


def clean_env(**extra: str) -> dict[str, str]:
    """No proxies, no REGISTRY_* overrides (docker-registry reads them as config)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("REGISTRY_") and "proxy" not in k.lower()
           and k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    env.update(extra)
    return env


class Lab:
    """Namespaces, processes and temp dirs of one test, all removed by close()."""

    def __init__(self, tag: str) -> None:
        self.prefix = f"rs{os.getpid() % 100000}{tag}"
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen] = []
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-", dir="/tmp"))
        self.dir.chmod(0o755)

    def netns(self, role: str) -> str:
        name = f"{self.prefix}-{role}"
        sh("ip", "netns", "del", name, check=False)
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        sh("ip", "link", "set", "lo", "up", ns=name)
        return name

    def veth(self, ns_a: str, dev_a: str, ns_b: str, dev_b: str, mtu: int = 1500) -> None:
        """A veth pair made directly inside the namespaces (no name clash in the root one);
        offloads off, so every frame on the wire is at most MTU + 14 bytes."""
        sh("ip", "link", "add", dev_a, "netns", ns_a, "mtu", str(mtu), "type", "veth",
           "peer", "name", dev_b, "netns", ns_b, "mtu", str(mtu))
        for ns, dev in ((ns_a, dev_a), (ns_b, dev_b)):
            sh("ip", "link", "set", dev, "gso_max_segs", "1", ns=ns, check=False)
            sh("ethtool", "-K", dev, "gso", "off", "tso", "off", "gro", "off", ns=ns,
               check=False)
            sh("ip", "link", "set", dev, "up", ns=ns)

    def spawn(self, *cmd: str, ns: str | None = None, log: Path | None = None,
              env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
        full = ["ip", "netns", "exec", ns, *cmd] if ns else list(cmd)
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
        kw.setdefault("stdout", out)
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(full, stderr=subprocess.STDOUT if log else out,
                                env=env or clean_env(), **kw)
        if log:
            out.close()
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, sig: int = signal.SIGTERM,
             timeout: float = 10) -> int | None:
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        return proc.returncode

    def close(self) -> None:
        for proc in reversed(self.procs):
            orphans = _descendants(proc.pid)  # e.g. a sensor under strace
            with contextlib.suppress(Exception):  # cleanup goes on
                self.stop(proc, timeout=5)
            for pid in orphans:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        for notify in getattr(self, "notifiers", []):
            notify.close()
        for name in reversed(self.namespaces):
            sh("ip", "netns", "del", name, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


def _descendants(pid: int) -> list[int]:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    out = []
    for child in map(int, children):
        out += [child, *_descendants(child)]
    return out


def mirror(ns: str, from_dev: str, to_dev: str) -> None:
    """Copy every frame entering from_dev out of to_dev (tc ingress + u32 + mirred)."""
    sh("tc", "qdisc", "add", "dev", from_dev, "handle", "ffff:", "ingress", ns=ns)
    sh("tc", "filter", "add", "dev", from_dev, "parent", "ffff:", "protocol", "all", "u32",
       "match", "u32", "0", "0", "action", "mirred", "egress", "mirror", "dev", to_dev, ns=ns)


@dataclass
class SpanPort:
    reg: str  # namespace of the registries
    cli: str  # namespace of the clients
    sensor: str  # namespace the sensor captures in
    span: str  # the span interface (in `sensor`)


REG_AUTH_IP = "192.0.2.10"  # registry with htpasswd auth
REG_OPEN_IP = "192.0.2.11"  # registry without auth
CLI_IP = "198.51.100.20"  # an internal client (the tests' config says so)
EXT_IP = "203.0.113.50"  # a client from outside


def build_span_port(lab: Lab) -> SpanPort:
    reg, cli, sw, sensor = (lab.netns(r) for r in ("reg", "cli", "sw", "sen"))
    lab.veth(reg, "eth0", sw, "p-reg")
    lab.veth(cli, "eth0", sw, "p-cli")
    lab.veth(sw, "p-span", sensor, "span0")
    sh("ip", "link", "add", "br0", "type", "bridge", ns=sw)
    for dev in ("p-reg", "p-cli"):
        sh("ip", "link", "set", dev, "master", "br0", ns=sw)
    sh("ip", "link", "set", "br0", "up", ns=sw)
    for dev in ("p-reg", "p-cli"):
        mirror(sw, dev, "p-span")
    for ns, mine, peers in ((reg, (REG_AUTH_IP, REG_OPEN_IP), (CLI_IP, EXT_IP)),
                            (cli, (CLI_IP, EXT_IP), (REG_AUTH_IP, REG_OPEN_IP))):
        for ip in mine:
            sh("ip", "addr", "add", f"{ip}/32", "dev", "eth0", ns=ns)
        for ip in peers:
            sh("ip", "route", "add", f"{ip}/32", "dev", "eth0", "src", mine[0], ns=ns)
    return SpanPort(reg, cli, sensor, "span0")


# -- the registry ---------------------------------------------------------------------------

def start_registry(lab: Lab, ns: str, addr: str, name: str, auth: bool) -> Path:
    """Debian's docker-registry on addr:5000 in ns; returns its log (one line per request)."""
    root = lab.dir / f"registry-{name}"
    root.mkdir()
    lines = ["version: 0.1", "log:", "  level: info", "  formatter: text", "storage:",
             "  filesystem:", f"    rootdirectory: {root}/storage", "http:",
             f"  addr: {addr}:5000", "  secret: registry-sensor-test-secret"]
    if auth:
        htpasswd = sh("htpasswd", "-Bbn", "alice", PASSWORD).stdout
        (root / "htpasswd").write_text(htpasswd)
        lines += ["auth:", "  htpasswd:", "    realm: registry-sensor",
                  f"    path: {root}/htpasswd"]
    (root / "config.yml").write_text("\n".join(lines) + "\n")
    log = root / "registry.log"
    lab.spawn("docker-registry", "serve", str(root / "config.yml"), ns=ns, log=log,
              env={"PATH": SAFE_PATH})
    for _ in range(100):
        code = sh("curl", "-q", "--noproxy", "*", "-s", "-o", "/dev/null", "-w",
                  "%{http_code}", "--max-time", "2", f"http://{addr}:5000/v2/", ns=ns,
                  check=False).stdout
        if code in ("200", "401"):
            return log
        time.sleep(0.1)
    raise RuntimeError(f"registry {name} did not start: {log.read_text()[-2000:]}")


# -- clients --------------------------------------------------------------------------------

def make_oci_image(dest: Path, label: str, tag: str = "1.0") -> Path:
    """A tiny OCI image layout (one gzip layer, a config, a manifest), as make_pcaps.sh builds
    it: the layer holds hello.txt and 6 KiB of reproducible bytes, so a blob spans frames."""
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> tuple[str, int]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return f"sha256:{digest}", len(data)

    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w", format=tarfile.PAX_FORMAT) as tar:
        stream = hashlib.shake_256(label.encode())
        for name, data in (("hello.txt", f"hello from {label}\n".encode()),
                           ("app/data.bin", stream.digest(6144))):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 1700000000, 0o644
            tar.addfile(info, io.BytesIO(data))
    layer = gzip.compress(tar_bytes.getvalue(), mtime=0)
    layer_d, layer_s = put(layer)
    config = json.dumps({
        "architecture": "amd64", "os": "linux", "config": {"Labels": {"sample": label}},
        "rootfs": {"type": "layers",
                   "diff_ids": ["sha256:" + hashlib.sha256(tar_bytes.getvalue()).hexdigest()]},
    }).encode()
    cfg_d, cfg_s = put(config)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg_d,
                   "size": cfg_s},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": layer_d, "size": layer_s}],
    }).encode()
    man_d, man_s = put(manifest)
    (dest / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": man_d,
        "size": man_s, "annotations": {"org.opencontainers.image.ref.name": tag}}]}))
    (dest / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    return dest


def skopeo(lab: Lab, ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """skopeo with a clean, private view: an empty tmpfs over its blob-info cache (no
    cross-repository mounts learned earlier), no credentials but those given, no mirrors."""
    home = lab.dir / "skopeo-home"
    for sub in ("run", "tmp", "registries.d", ".config"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    (home / "auth.json").write_text('{"auths":{}}')
    (home / "policy.json").write_text('{"default":[{"type":"insecureAcceptAnything"}]}')
    (home / "registries.conf").write_text("")
    env = {"PATH": SAFE_PATH, "HOME": str(home), "XDG_RUNTIME_DIR": str(home / "run"),
           "XDG_CONFIG_HOME": str(home / ".config"), "TMPDIR": str(home / "tmp"),
           "CONTAINERS_REGISTRIES_CONF": str(home / "registries.conf"),
           "REGISTRY_AUTH_FILE": str(home / "auth.json")}
    script = ('set -e; if [ -d /var/lib/containers ]; then d=/var/lib/containers; '
              'else d=/var/lib; fi; mount -t tmpfs -o size=16m skopeo-cache "$d"; '
              'exec skopeo "$@"')
    return sh("unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", script,
              "sh", "--policy", str(home / "policy.json"), "--registries.d",
              str(home / "registries.d"), *args, ns=ns, check=check, env=env, timeout=120)


def curl(ns: str, *args: str, source: str | None = None) -> str:
    """curl in ns (never through a proxy); returns stdout."""
    extra = ["--interface", source] if source else []
    return sh("curl", "-q", "--noproxy", "*", "-sS", *extra, *args, ns=ns,
              env={"PATH": SAFE_PATH}).stdout


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    """Poll predicate() until it returns something truthy; fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


# -- the sensor -----------------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent
SENSOR = [sys.executable, "-m", "sensor.cli"]  # the venv's python: its site-packages
NOBODY_CAPS = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--init-groups",
               "--inh-caps=+net_raw,+net_admin", "--ambient-caps=+net_raw,+net_admin", "--"]


def _visible_roots() -> list[str]:
    """Top-level directories under /root that an unprivileged process must read: this
    machine's Python may live in /root/.pyenv, and a checkout may sit under /root; /root
    itself is 0700. They are shown in a private mount namespace, nothing else changes."""
    paths = {os.path.realpath(sys.executable), os.path.realpath(sys.prefix),
             os.path.realpath(sys.base_prefix), str(REPO)}
    return sorted({"/root/" + p.split("/")[2] for p in paths
                   if p.startswith("/root/") and len(p.split("/")) > 2})


def sensor_command(*args: str, caps_only: bool = False, mdwe: bool = False,
                   strace: Path | None = None) -> list[str]:
    """`registry-sensor ARGS` for `ip netns exec`: in a private mount namespace where the
    interpreter is readable by nobody; with caps_only, as nobody with only CAP_NET_RAW and
    CAP_NET_ADMIN (setpriv, as systemd's AmbientCapabilities= would); with mdwe, under
    PR_SET_MDWE (the kernel's MemoryDenyWriteExecute=, inherited across exec)."""
    roots = _visible_roots()
    script = ["set -e"]
    if roots:
        # a tmpfs over /mnt, private to this mount namespace: nothing is left on the host
        script.append('mount -t tmpfs -o size=1m rs-keep /mnt; keep=/mnt')
        for i, root in enumerate(roots):
            script.append(f'mkdir "$keep/{i}"; mount --bind "{root}" "$keep/{i}"')
        script.append("mount -t tmpfs -o mode=0755,size=1m rs-root /root")
        for i, root in enumerate(roots):
            script.append(f'mkdir "{root}"; mount --bind "$keep/{i}" "{root}"')
    script.append('exec "$@"')
    tracer = ["strace", "-f", "-qq", "-o", str(strace)] if strace else []
    cmd = [*(NOBODY_CAPS if caps_only else []), *tracer, *SENSOR, *args]
    if mdwe:
        cmd = [SENSOR[0], "-c", "import ctypes, os, sys; "
               "libc = ctypes.CDLL(None, use_errno=True); "
               "assert libc.prctl(65, 1, 0, 0, 0) == 0, 'PR_SET_MDWE failed'; "
               "os.execvp(sys.argv[1], sys.argv[1:])", *cmd]
    return ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c",
            "\n".join(script), "sh", *cmd]


class NotifyListener:
    """A stand-in for systemd's $NOTIFY_SOCKET: collects (time, message) datagrams."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        os.chmod(path, 0o777)  # the sensor may run as nobody
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            for line in data.decode().splitlines():
                self.messages.append((time.monotonic(), line))

    def seen(self, prefix: str) -> list[float]:
        return [t for t, m in list(self.messages) if m.startswith(prefix)]

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


def start_sensor(lab: Lab, ns: str, name: str, iface: str, workdir: Path, config: str,
                 *extra: str, caps_only: bool = False, mdwe: bool = False,
                 strace: Path | None = None, watchdog_usec: int = 1_000_000,
                 ) -> tuple[subprocess.Popen, NotifyListener]:
    """`registry-sensor live` in ns on iface; returns the process once it said READY=1.
    workdir (owned by nobody) receives the config, the database and the key."""
    workdir.mkdir(mode=0o700, exist_ok=True)
    (workdir / "sensor.yaml").write_text(config)
    for p in [workdir, *workdir.iterdir()]:
        os.chown(p, 65534, 65534)
    notify = NotifyListener(lab.dir / f"notify-{name}.sock")
    env = clean_env(NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC=str(watchdog_usec),
                    PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1",
                    STATE_DIRECTORY="/nonexistent/registry-sensor-test-state")
    cmd = sensor_command("live", "--interface", iface, "--config",
                         str(workdir / "sensor.yaml"), "--db", str(workdir / "sensor.db"),
                         *extra, caps_only=caps_only, mdwe=mdwe, strace=strace)
    proc = lab.spawn(*cmd, ns=ns, log=lab.dir / f"{name}.log", env=env, cwd="/")
    lab.notifiers = getattr(lab, "notifiers", []) + [notify]
    deadline = time.monotonic() + 30
    while not notify.seen("READY=1"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"sensor {name} did not become ready (rc {proc.poll()}):\n"
                                 + (lab.dir / f"{name}.log").read_text()[-3000:])
        time.sleep(0.05)
    return proc, notify
