"""The long-running device: active bundle, local data, patch trainer, MQTT link, bundle updates.

Work that arrives on the MQTT thread (a bundle announcement) is only queued there; the main loop
fetches, verifies and switches between rounds, so a slow download never blocks the network loop and a
bad bundle never replaces the last good one.
"""

from __future__ import annotations

import logging
import queue
import shutil
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgepatch.protocol.bundle import ActiveBundleStore, Bundle
from edgepatch.protocol.manifest import BundleError
from edgepatch.protocol.messages import BundleAnnouncement, Message, PatchUpdate
from edgepatch.protocol.shards import ShardError, list_shards, read_shards
from edgepatch.protocol.signing import AnnouncementGate, SignatureError
from edgepatch.protocol.transport import broker_uses_tls, parse_broker

from .adoption import AdoptionGate, GateDecision, GateSettings, served_phi
from .engine import open_engine
from .fetch import fetch_bundle
from .profile import DeviceProfile
from .resources import ResourceMonitor
from .selector import VariantSelector
from .state import DeviceStateStore
from .trainer import LocalData, PatchTrainer, RoundReport

log = logging.getLogger("edgepatch.device.runtime")
MAX_BUNDLE_BYTES = 256 * 2**20


class RoundInterrupted(Exception):
    """A stop was requested (SIGTERM) mid-round: the round ended after its last committed step."""

    def __init__(self, steps_done: int) -> None:
        super().__init__(f"round stopped after {steps_done} committed steps")
        self.steps_done = steps_done


@dataclass
class DeviceConfig:
    device_id: str
    profile: DeviceProfile
    state_dir: Path
    data_dir: Path
    fleet: str = "default"
    runtime: str | None = None  # default: the profile's runtime
    broker: str | None = None  # mqtt://host:port; None = offline (no link)
    mqtt_protocol: str | None = None  # "5" or "3.1.1"; default: the profile's
    holdout_fraction: float = 0.25
    seed: int = 0
    adaptive: bool = True  # DISTREAL variant selection; False = always the full variant
    mqtt_password: str | None = None  # read from a file by device/config.py; None = the profile's env var
    fleet_key: Path | None = None  # the fleet's bundle-signing public key: only signed, newer bundles install
    gate: GateSettings = GateSettings()  # adoption gate: a new bundle must not make this device worse


def load_local_data(data_dir: Path, bundle: Bundle, holdout_fraction: float) -> LocalData:
    """Every readable shard of `data_dir` (bad shards are logged and skipped, never fatal)."""
    manifest = bundle.manifest
    x, y, t = read_shards(data_dir, tuple(manifest.input.shape), manifest.labels.num_classes, skip_bad=True)
    return LocalData.split(x, y, t, holdout_fraction)


class DeviceRuntime:
    def __init__(self, cfg: DeviceConfig, bundle_path: Path | None = None) -> None:
        self.cfg = cfg
        self.runtime = cfg.runtime or cfg.profile.runtime
        self.bundles = ActiveBundleStore(cfg.state_dir / "bundles")
        if bundle_path is not None:
            self._install_local(bundle_path)
        self.adoption = AdoptionGate(cfg.state_dir, cfg.gate, self.runtime, cfg.profile.threads, cfg.seed)
        # A decision recorded before a crash is carried out before anything reads the active bundle.
        self.adoption.apply(self.bundles, DeviceStateStore(cfg.state_dir / "state"))
        bundle = self.bundles.current()
        if bundle is None:
            raise BundleError(f"no bundle installed in {cfg.state_dir}; pass --bundle")
        self.announcements: queue.Queue[Message] = queue.Queue()
        self.bytes_downloaded = 0
        self.refused: Counter[str] = Counter()  # announcements refused before fetching, by reason
        self.gate = None if cfg.fleet_key is None else AnnouncementGate(
            cfg.fleet_key, cfg.fleet, cfg.state_dir / "bundle-sequence")
        self.link: Any = None
        self.gate_report: dict[str, float] = {}  # the last gate decision, until it has been published
        self.last_gate_decision: GateDecision | None = None  # for the operator's console line
        # Set from a signal handler; checked only between steps, so a step is never cut in half.
        self.stop_requested = threading.Event()
        self._activate(bundle)
        if self.adoption.pending_version() is not None:  # killed during a shadow fit: finish it now
            self._gate_pending()
        if cfg.broker:
            self._start_link()

    # -- bundles ---------------------------------------------------------------------------------
    def _install_local(self, path: Path) -> None:
        try:
            self.bundles.install(path)
        except BundleError as exc:
            if self.bundles.current_version() is None:
                raise
            log.error("bundle %s refused, keeping the installed one: %s", path, exc)

    def _data_signature(self) -> tuple[tuple[str, int, int], ...]:
        try:
            shards = list_shards(self.cfg.data_dir)
        except ShardError:
            return ()
        return tuple((p.name, (st := p.stat()).st_size, st.st_mtime_ns) for p in shards)

    def refresh_data(self) -> bool:
        """Re-read the shards if the data directory changed (a long-running service gets new samples
        while it runs); the trainer keeps φ, its optimizer and the selector's calibration."""
        signature = self._data_signature()
        if signature == self._data_seen:
            return False
        self.data = load_local_data(self.cfg.data_dir, self.bundle, self.cfg.holdout_fraction)
        self.trainer.data = self.data
        self._data_seen = signature
        log.info("local data changed: %d train / %d holdout samples", len(self.data.train_x),
                 len(self.data.holdout_x))
        return True

    def _activate(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self._data_seen = self._data_signature()
        self.data = load_local_data(self.cfg.data_dir, bundle, self.cfg.holdout_fraction)
        engine = open_engine(bundle, self.runtime, self.cfg.profile.threads)
        rows = [row.to_dict() for row in bundle.manifest.variants]
        runtime_rows = [r for r in rows if self.runtime in r.get("train_ms", {})]
        selector = VariantSelector(runtime_rows, self.cfg.profile) if (self.cfg.adaptive and runtime_rows) else None
        self.trainer = PatchTrainer(bundle, engine, DeviceStateStore(self.cfg.state_dir / "state"), self.data,
                                    selector=selector, resources=ResourceMonitor(self.cfg.profile),
                                    seed=self.cfg.seed)
        if self.link is not None:
            self.link.base_version = bundle.base_version
        self._refresh_served_phi()
        log.info("active bundle %s (base %s), %d train / %d holdout samples, runtime %s",
                 bundle.version[:12], bundle.base_version[:12], len(self.data.train_x),
                 len(self.data.holdout_x), self.runtime)

    def apply_announcement(self, ann: BundleAnnouncement) -> bool:
        """Fetch the announced bundle by reference, verify it, switch to it. False = kept the old one."""
        if ann.manifest_sha256 == self.bundle.version:
            return False
        if ann.targets and self.cfg.device_id not in ann.targets:
            return False  # a canary announcement for other devices (cloud/rollout.py)
        sequence = 0
        if self.gate is not None:  # signature, freshness and reference are checked before any download
            try:
                sequence = self.gate.check(ann.to_json())
            except SignatureError as exc:
                self.refused[exc.reason] += 1
                log.error("bundle %s refused before fetching, keeping %s: %s", ann.version,
                          self.bundle.version[:12], exc)
                return False
        if self.cfg.gate.enabled and ann.manifest_sha256 in self.adoption.rejected_versions():
            return False  # this device's gate already rejected exactly this bundle
        tmp = Path(tempfile.mkdtemp(prefix="edgepatch-fetch-"))
        try:
            candidate, stats = fetch_bundle(ann.reference, ann.manifest_sha256, tmp, self.bundle,
                                            min(MAX_BUNDLE_BYTES, ann.size + 1024), runtime=self.runtime)
            self.bytes_downloaded += stats.downloaded_bytes
            if self.cfg.gate.enabled:
                self.adoption.stage(candidate, ann.manifest_sha256)
            else:
                installed = self.bundles.install(candidate, expected_version=ann.manifest_sha256)
        except (BundleError, OSError, ValueError) as exc:
            log.error("bundle %s refused, keeping %s: %s", ann.version, self.bundle.version[:12], exc)
            return False
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if self.cfg.gate.enabled:
            decision = self._gate_pending()
            if decision is None or not decision.adopt:
                return False
        else:
            self._activate(installed)
        if self.gate is not None:
            self.gate.installed(sequence)
        return True

    def _gate_pending(self) -> GateDecision | None:
        """Shadow-fit, score and decide on the staged candidate; switch only if the gate adopts it.
        The active bundle and trainer keep serving until the switch."""
        try:
            self.adoption.evaluate(self.trainer, lambda b: load_local_data(self.cfg.data_dir, b,
                                                                             self.cfg.holdout_fraction))
        except (BundleError, OSError, ValueError) as exc:
            log.error("adoption gate failed on the staged bundle, keeping %s: %s", self.bundle.version[:12], exc)
            return None
        decision = self.adoption.apply(self.bundles, self.trainer.store)
        if decision is not None and decision.adopt:
            installed = self.bundles.current()
            assert installed is not None
            self._activate(installed)
        if decision is not None:  # reported now, or with the next round's metrics when not yet linked
            self.last_gate_decision = decision
            self.gate_report = decision.metrics()
            if self.link is not None:
                self.link.publish_metrics({}, events=self.gate_report)  # an event: sent even if it repeats
                self.gate_report = {}
        return decision

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Logits as served: the active bundle with φ only while φ beats φ = 0 on the holdout."""
        return self.trainer.predict(x, self.served_phi)

    def _refresh_served_phi(self) -> None:
        self.served_phi = served_phi(self.trainer)

    def wait_for_new_bundle(self, timeout: float) -> bool:
        """Block until an announced bundle newer than the active one is installed (True) or timeout."""
        deadline = time.monotonic() + timeout
        # Announcements queued before the wait (the broker's retained one of the running bundle, delivered at
        # connect) are news only if they install something; a re-announcement of ours ends the wait only
        # when it arrives during it.
        queued = self.announcements.qsize()
        while (left := deadline - time.monotonic()) > 0 and not self.stop_requested.is_set():
            try:
                msg = self.announcements.get(timeout=min(left, 1.0))
                queued -= 1
            except queue.Empty:
                continue
            if not isinstance(msg.payload, BundleAnnouncement):
                continue
            decided = self.adoption.decided
            if self.apply_announcement(msg.payload):
                return True
            if self.adoption.decided != decided:
                return False  # the adoption gate kept the active bundle: waiting longer changes nothing
            if msg.payload.manifest_sha256 == self.bundle.version and not msg.payload.targets and queued < 0:
                return False  # the fleet's bundle is the one running here (e.g. a withdrawn canary bundle)
        return False

    def poll_announcements(self) -> None:
        while True:
            try:
                msg = self.announcements.get_nowait()
            except queue.Empty:
                return
            if isinstance(msg.payload, BundleAnnouncement):
                self.apply_announcement(msg.payload)

    # -- link ------------------------------------------------------------------------------------
    def _start_link(self) -> None:
        from .link import DeviceLink, LinkSettings
        from .outbox import Outbox

        host, port = parse_broker(self.cfg.broker or "")
        mqtt_cfg = self.cfg.profile.mqtt
        tls = mqtt_cfg.tls if broker_uses_tls(self.cfg.broker or "") else None
        settings = LinkSettings(
            fleet=self.cfg.fleet, device_id=self.cfg.device_id, host=host, port=port,
            protocol=self.cfg.mqtt_protocol or mqtt_cfg.protocol, tls=broker_uses_tls(self.cfg.broker or ""),
            client_id=mqtt_cfg.client_id(self.cfg.fleet, self.cfg.device_id), keepalive=mqtt_cfg.keepalive_s,
            tls_ca=tls.ca_file if tls else None, tls_cert=tls.cert_file if tls else None,
            tls_key=tls.key_file if tls else None,
            username=mqtt_cfg.username, password=self.cfg.mqtt_password or mqtt_cfg.password(),
            ack_timeout_s=mqtt_cfg.ack_timeout_s, ack_max_backoff_s=mqtt_cfg.ack_max_backoff_s)
        outbox = Outbox(self.cfg.state_dir / "outbox.sqlite")
        self.link = DeviceLink(settings, outbox, base_version=self.bundle.base_version,
                               variant_id=self.trainer.state.variant_id, on_bundle=self.announcements.put)
        self.link.start()

    def stop(self) -> None:
        if self.link is not None:
            self.link.stop()

    # -- rounds ----------------------------------------------------------------------------------
    def run_round(self, steps: int, deadline_s: float | None = None) -> RoundReport:
        self.poll_announcements()
        self.refresh_data()
        before = self.trainer.holdout_accuracy()
        done = 0

        def check_stop(_i: int, _loss: float, _vid: str) -> None:
            # Called after each committed step: stopping here leaves φ, m, v and the step count consistent.
            nonlocal done
            done += 1
            if self.stop_requested.is_set():
                raise RoundInterrupted(done)

        if self.stop_requested.is_set():
            raise RoundInterrupted(0)
        report = self.trainer.train_round(steps, deadline_s, on_step=check_stop)
        report.holdout_acc_before, report.holdout_acc_after = before, self.trainer.holdout_accuracy()
        self._refresh_served_phi()
        self.adoption.prune_rollback(self.bundles)
        if self.link is not None:
            self.link.variant_id = self.trainer.state.variant_id
            acc = report.holdout_acc_after
            self.link.publish_patch(PatchUpdate(
                phi=np.asarray(self.trainer.phi, np.float32), steps=self.trainer.state.step,
                samples=len(self.data.train_x), holdout_acc=0.0 if np.isnan(acc) else acc,
                loss=report.losses[-1] if report.losses else 0.0))
            base_acc = self.trainer.holdout_accuracy(np.zeros_like(self.trainer.phi))
            self.link.publish_metrics({"holdout_acc": 0.0 if np.isnan(acc) else acc,
                                       "holdout_acc_base": 0.0 if np.isnan(base_acc) else base_acc,
                                       "round_seconds": report.seconds, "steps": float(report.steps)},
                                      events=self.gate_report)  # readings only when changed (issue 13)
            self.gate_report = {}
        return report
