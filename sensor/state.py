"""Where the sensor keeps its state on disk, and the per-installation fingerprint key.

The key is 32 random bytes in a file created with mode 0600; it keys the HMAC that lets the same
credential be recognised across events without the credential itself being kept.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

KEY_BYTES = 32


def default_state_dir() -> Path:
    """/var/lib/registry-sensor for root (and systemd's STATE_DIRECTORY), else the XDG state dir."""
    env = os.environ.get("STATE_DIRECTORY")
    if env:
        return Path(env.split(":")[0])
    if os.geteuid() == 0:
        return Path("/var/lib/registry-sensor")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "registry-sensor"


def load_or_create_key(path: Path) -> bytes:
    """The fingerprint key at `path`, created (mode 0600, parent 0700) when it does not exist."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = secrets.token_bytes(KEY_BYTES)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first
            return load_or_create_key(path)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key)
        return key
    if len(data) < 16:
        raise ValueError(f"{path}: fingerprint key is too short ({len(data)} bytes)")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        os.chmod(path, 0o600)
    return data
