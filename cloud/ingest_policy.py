"""What the ingest admits beyond a valid message (issue 11: a cloud that bad devices cannot steer).

A message can be well-formed and still unusable. `IngestPolicy.admit` refuses, with a reason counted like
a validation reject (`edgepatch_ingest_rejects_total{reason}`, the `rejects` table, acknowledged):

    unknown_device  provisioning is on and the sender is not in the provisioned device list (or the
                    message names another fleet). With the provisioned broker's ACL a device can publish
                    only on its own topics, so the topic's device id is the authenticated login.
    unknown_base    a patch whose base version no registered bundle has (`PatchStore.bundle_bases`)
    wrong_size      a patch whose φ size is not the `k` of the bundle it claims

`ProvisionedDevices` reads the device list from `provision.json` in the directory `cloud provision` wrote
(re-read when the file changes, so `--device` additions and `--revoke` apply without a restart).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

from edgepatch.protocol.messages import Message, PatchUpdate

from .store import PatchStore

log = logging.getLogger(__name__)

POLICY_REASONS = ("unknown_device", "unknown_base", "wrong_size")


class PolicyError(ValueError):
    """The provisioned device list cannot be read."""


def provision_file(path: str | Path) -> Path:
    """provision.json for `path`: the fleet directory, the file itself, or the companion folder inside."""
    p = Path(path)
    for candidate in (p, p / "provision.json", p.parent / "provision.json"):
        if candidate.is_file() and candidate.name == "provision.json":
            return candidate
    raise PolicyError(f"{path}: no provision.json here (give the directory `cloud provision --out` wrote)")


class ProvisionedDevices:
    """The fleet and device ids of a provisioned fleet; re-read when provision.json changes."""

    def __init__(self, path: str | Path, *, check_every_s: float = 2.0) -> None:
        self.path = provision_file(path)
        self.check_every_s = check_every_s
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._next_check = 0.0
        self.fleet = ""
        self.devices: frozenset[str] = frozenset()
        self._reload(force=True)

    def _reload(self, force: bool = False) -> None:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
            if not force and stamp == self._stamp:
                return
            meta = json.loads(self.path.read_text())
            fleet, devices = meta["fleet"], meta["devices"]
            if not isinstance(fleet, str) or not isinstance(devices, list):
                raise TypeError("fleet must be a string and devices a list")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            if force:
                raise PolicyError(f"{self.path}: cannot read the provisioned devices: {exc}") from None
            log.error("keeping the previous device list: %s: %s", self.path, exc)  # a half-written edit
            return
        self.fleet, self.devices, self._stamp = fleet, frozenset(map(str, devices)), stamp
        log.info("provisioned devices of fleet %s: %d (%s)", fleet, len(self.devices), self.path)

    def known(self, fleet: str, device_id: str) -> bool:
        now = time.monotonic()
        with self._lock:
            if now >= self._next_check:
                self._next_check = now + self.check_every_s
                self._reload()
            return fleet == self.fleet and device_id in self.devices


class IngestPolicy:
    """Admission checks after validation. `store`: the bundles patches are checked against (None: no bundle
    check, e.g. a standalone ingest worker with no bundles registered); `devices`: provisioning on."""

    def __init__(self, store: PatchStore | None = None, devices: ProvisionedDevices | None = None, *,
                 refresh_s: float = 1.0) -> None:
        self.store = store
        self.devices = devices
        self.refresh_s = refresh_s
        self._bases: dict[str, int] = {}
        self._next_refresh = 0.0
        self._lock = threading.Lock()

    def note_bundle(self, base_version: str, k: int) -> None:
        """A bundle the companion just registered: admit its patches at once, before the next refresh."""
        with self._lock:
            self._bases[base_version] = int(k)

    def _k_of(self, base_version: str) -> int | None:
        assert self.store is not None
        with self._lock:
            k = self._bases.get(base_version)
            now = time.monotonic()
            if k is not None or now < self._next_refresh:
                return k
            # An unknown base: look again (another companion may have registered it), at most every refresh_s.
            self._next_refresh = now + self.refresh_s
        bases = self.store.bundle_bases()
        with self._lock:
            self._bases.update(bases)
            return self._bases.get(base_version)

    def admit(self, msg: Message) -> tuple[str, str] | None:
        """None if `msg` may be stored, else (reason, one-line text)."""
        if self.devices is not None and not self.devices.known(msg.fleet, msg.device_id):
            return "unknown_device", (f"device {msg.device_id!r} of fleet {msg.fleet!r} is not provisioned "
                                      f"({self.devices.path})")
        if self.store is not None and isinstance(msg.payload, PatchUpdate):
            k = self._k_of(msg.base_version)
            if k is None:
                return "unknown_base", f"patch for base version {msg.base_version[:64]!r}, which no bundle has"
            size = int(msg.payload.phi.size)
            if size != k:
                return "wrong_size", f"phi has {size} floats, bundle base {msg.base_version[:16]!r} has k={k}"
        return None
