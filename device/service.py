"""Running the device as a system service: the systemd unit rendered from a firmware profile, the
heartbeat file `device run` keeps, and the status an operator reads.

Profile -> unit mapping (the one place it lives; `edgepatch device unit --profile NAME` prints it and
tests/test_device_service.py checks the committed firmware_configs/edgepatch-device.service against it):
- MemoryMax = budgets.memory_cap_mb (the kernel kills the service above it; Restart=on-failure brings it
  back and φ resumes from the last committed step); MemoryHigh = 90 % of it, so the kernel reclaims and
  throttles before it kills.
- CPUQuota = threads x 100 %: the trainer never gets more CPU than the threads the profile gives it,
  leaving the other cores to the OS and the MQTT link.
- TimeoutStopSec = STOP_TIMEOUT_S: on SIGTERM `device run` finishes its current step (committed
  atomically), abandons the rest of the round, flushes the outbox for at most FLUSH_TIMEOUT_S and exits 0;
  both bounds fit inside it with room for one slow step.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from edgepatch.protocol.params import write_atomic

from .profile import DeviceProfile

STOP_TIMEOUT_S = 30
FLUSH_TIMEOUT_S = 10.0
HEARTBEAT_NAME = "service.json"
SERVICE_USER = "edgepatch"
DEFAULT_CONFIG = "/etc/edgepatch/device.toml"
DEFAULT_EXEC = "/opt/edgepatch/venv/bin/edgepatch"


def unit_limits(profile: DeviceProfile) -> dict[str, str]:
    cap = profile.budgets.memory_cap_mb
    return {"MemoryHigh": f"{cap * 9 // 10}M", "MemoryMax": f"{cap}M", "CPUQuota": f"{profile.threads * 100}%",
            "TimeoutStopSec": f"{STOP_TIMEOUT_S}s"}


def render_unit(profile: DeviceProfile, config: str = DEFAULT_CONFIG, executable: str = DEFAULT_EXEC,
                user: str = SERVICE_USER) -> str:
    """The systemd unit text for one device class (deterministic: the committed file is compared to it)."""
    limits = unit_limits(profile)
    return f"""\
# edgepatch device service, rendered for firmware profile {profile.name!r} by
#   edgepatch device unit --profile {profile.name}
# Install: see docs/raspberry-pi.md. Limits come from the profile ({profile.source}):
#   MemoryMax = budgets.memory_cap_mb, MemoryHigh = 90 % of it, CPUQuota = threads x 100 %.
[Unit]
Description=edgepatch device: trains its patch vector in LiteRT and reports to the fleet
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
User={user}
Group={user}
ExecStart={executable} device run --config {config}
# SIGTERM: finish the current step, flush the outbox, exit 0 (device/service.py explains the bounds).
KillSignal=SIGTERM
TimeoutStopSec={limits["TimeoutStopSec"]}
Restart=on-failure
RestartSec=10
MemoryHigh={limits["MemoryHigh"]}
MemoryMax={limits["MemoryMax"]}
CPUQuota={limits["CPUQuota"]}
# /var/lib/edgepatch, owned by the service user; group-readable so an operator in group {user} can run
# `edgepatch device status --config {config}`.
StateDirectory=edgepatch
StateDirectoryMode=0750
UMask=0027
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
# The password (if any) comes from the file named in the config, or from here (mode 600, root):
EnvironmentFile=-/etc/edgepatch/device.env

[Install]
WantedBy=multi-user.target
"""


def write_heartbeat(state_dir: Path, **fields: Any) -> None:
    """What the running service last did, for `device status` (atomic: a reader never sees half a file)."""
    record = {"pid": os.getpid(), "updated": time.time(), **fields}
    write_atomic(state_dir / HEARTBEAT_NAME, json.dumps(record, indent=1).encode())


def _outbox_summary(path: Path) -> dict[str, Any]:
    """Pending messages, read-only (the operator may not own the file; the service may be writing).

    `unsent`: the broker has not taken them yet; `awaiting_companion`: patches the broker took, kept until
    the companion's application-level ack (device/outbox.py)."""
    if not path.exists():
        return {"pending": 0, "unsent": 0, "awaiting_companion": 0, "oldest_age_s": None}
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
        try:
            try:
                n, oldest, unsent = db.execute(
                    "SELECT COUNT(*), MIN(enqueued_at), COALESCE(SUM(next_try IS NULL), 0) FROM outbox").fetchone()
            except sqlite3.OperationalError:  # an outbox written before application-level acks existed
                n, oldest = db.execute("SELECT COUNT(*), MIN(enqueued_at) FROM outbox").fetchone()
                unsent = n
        finally:
            db.close()
    except sqlite3.Error as exc:
        return {"pending": None, "error": f"cannot read {path}: {exc}"}
    return {"pending": int(n), "unsent": int(unsent), "awaiting_companion": int(n) - int(unsent),
            "oldest_age_s": round(time.time() - oldest, 1) if oldest else None}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by the service user
        return True
    return True


def read_service_status(state_dir: Path) -> dict[str, Any]:
    path = state_dir / HEARTBEAT_NAME
    try:
        beat = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {"state": "never run"}
    except (OSError, ValueError) as exc:
        return {"state": "unknown", "error": f"{path}: {exc}"}
    if beat.get("state") in ("running", "starting") and not _pid_alive(int(beat.get("pid", 0))):
        beat["state"] = "dead (no clean stop: killed or crashed)"
    beat["age_s"] = round(time.time() - float(beat.get("updated", 0.0)), 1)
    return beat


def outbox_status(state_dir: Path) -> dict[str, Any]:
    return _outbox_summary(state_dir / "outbox.sqlite")
