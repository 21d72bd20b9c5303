"""The replay progress bar: shown on a terminal (bytes read, rate, time left), never in a pipe."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def workload(tmp_path_factory) -> Path:
    """A 30 MB registry workload (tens of thousands of frames), from the bench's generator."""
    out = tmp_path_factory.mktemp("progress") / "w.pcap"
    subprocess.run([sys.executable, str(ROOT / "bench" / "make_workload.py"), str(out),
                    "--size", "30M", "-q"], check=True, capture_output=True, timeout=120)
    return out


def replay_args(pcap: Path, tmp: Path) -> list[str]:
    config = tmp / "sensor.yaml"
    config.write_text("key_file: fingerprint.key\n")
    return [sys.executable, "-m", "sensor.cli", "replay", str(pcap), "--db", str(tmp / "x.db"),
            "--config", str(config)]


def test_progress_bar_on_a_terminal(workload: Path, tmp_path: Path) -> None:
    leader, follower = pty.openpty()
    proc = subprocess.Popen(replay_args(workload, tmp_path), stdout=subprocess.PIPE,
                            stderr=follower, cwd=ROOT)
    os.close(follower)
    seen = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        seen += chunk
    os.close(leader)
    stdout = proc.stdout.read().decode()
    assert proc.wait(timeout=60) == 0
    size_mb = workload.stat().st_size / 1e6
    text = seen.decode()
    assert "\r[" in text and "MB/s" in text and "s left" in text, text
    assert f"/{size_mb:,.1f} MB" in text  # the total is the file's size
    assert "transactions:" in stdout and "MB/s" not in stdout


def test_no_progress_bar_in_a_pipe(workload: Path, tmp_path: Path) -> None:
    done = subprocess.run(replay_args(workload, tmp_path), capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0
    assert "MB/s" not in done.stderr and "\r" not in done.stderr
