"""The cloud companion: ingest → store → MoMoDistill → re-export → publish, as one long-running service.

Threads: the ingest loop (MQTT seam, acks after commit), the web server (fleet page, /metrics, bundle files),
and the companion's own loop, which runs a distillation when enough devices have sent a patch for the
current base version (or when asked), then republishes. Bundles travel by reference: the retained
announcement on `edgepatch/v1/<fleet>/bundle` names a URL of a `.tar.gz` the web server serves, with the
manifest's sha256 so devices verify before switching.

With `canoe=True` a `CanoeCompanion` (cloud/canoe.py) runs beside it on the same broker: its counters go to
the same /metrics registry and its requests and ensemble weights to the fleet page.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgepatch.protocol.bundle import Bundle, load_bundle
from edgepatch.protocol.messages import MAX_MESSAGE_BYTES, BundleAnnouncement, Message, encode, make_message
from edgepatch.protocol.mqtt import MqttSettings, make_client
from edgepatch.protocol.mqtt_memory import MemoryBroker
from edgepatch.protocol.param_delta import DELTA_ENCODINGS
from edgepatch.protocol.signing import BundleSigner, SequenceFile, SignatureError
from edgepatch.protocol.topics import bundle_topic

from .companion_data import CompanionError, distill_blocker, distill_html, load_cloud_data
from .distill.contributions import DEFAULT_MODE
from .ingest import IngestService, IngestSettings
from .ingest_policy import IngestPolicy, PolicyError, ProvisionedDevices
from .metrics import CloudMetrics
from .rollout import RolloutSettings, StagedRollout, rollout_html, split_heldout
from .store import DEFAULT_RETENTION_S, PatchStore, sqlite_url
from .web import FleetWeb

if TYPE_CHECKING:  # imported when Canoe is switched on: it pulls in the device-side Canoe code
    from .canoe import CanoeCompanion

log = logging.getLogger("edgepatch.cloud.companion")
CLOUD_ID = "cloud"


@dataclass
class CompanionConfig:
    bundle: Path  # the first bundle to publish
    work_dir: Path  # published bundles and the default SQLite store
    broker_host: str = "127.0.0.1"
    broker_port: int = 1883
    protocol: str = "5"  # MQTT version, any MqttVersion spelling ("3.1.1" for brokers without 5, e.g. amqtt)
    mqtt: MqttSettings | None = None  # TLS and credentials for every companion client (overrides host/port)
    fleet: str = "default"
    db_url: str | None = None  # default: sqlite in work_dir
    http_host: str = "127.0.0.1"
    http_port: int = 0
    distill_after: int = 0  # distil when this many devices sent a patch for the current base (0: on demand)
    # The base-update period R, in device rounds: a device round is one φ training round ending in one
    # patch upload, so automatic rounds wait until `distill_after` devices have each sent R patches for the
    # current base (issue 13's schedule: φ every round, the base every R rounds). 1 = every round.
    base_every: int = 10
    aggregator: str = "momodistill"
    distill: dict[str, Any] = field(default_factory=dict)  # DistillConfig overrides
    runtimes: tuple[str, ...] | None = None  # republished runtimes (default: those of the first bundle)
    delta_encoding: str | None = "int8"  # a base update's change for devices holding the parent (param_delta.py)
    canoe: bool = False  # also match Canoe help requests (helpers, slices, ensemble weights)
    canoe_timeout_s: float = 5.0  # wait this long for a helper's offer before trying the next
    data: Path | None = None  # labelled data (shard dir or .npz x, y): CE rows and, without `proxy`, proxy set
    proxy: Path | None = None  # unlabelled proxy set (shard dir or .npz x) for MoMoDistill's mode "proxy"
    retry_s: float = 2.0  # first wait after a failed round; doubles per failure up to `retry_max_s`
    retry_max_s: float = 300.0
    signing_key: Path | None = None  # the fleet's Ed25519 key (`cloud provision`): every announcement is signed
    provisioned: Path | None = None  # `cloud provision --out` directory: only its devices are admitted
    max_message_bytes: int = MAX_MESSAGE_BYTES  # larger payloads are refused before decoding
    reject_retention_s: float = DEFAULT_RETENTION_S  # rejects and quarantine records expire after this
    public_url: str | None = None  # the web address devices are told (bundle URLs); default http://host:port
    rollout: RolloutSettings | None = RolloutSettings()  # cloud gate + canaries (cloud/rollout.py); None = off


class Companion:
    def __init__(self, cfg: CompanionConfig, twin: MemoryBroker | None = None) -> None:
        """`twin`: run every MQTT client of the companion on the in-memory broker (unit tests)."""
        if cfg.base_every < 1:
            raise CompanionError(f"base_every must be at least 1 device round, got {cfg.base_every}")
        if cfg.delta_encoding is not None and cfg.delta_encoding not in DELTA_ENCODINGS:
            raise CompanionError(f"unknown delta encoding {cfg.delta_encoding!r}; choose from "
                                 f"{', '.join(DELTA_ENCODINGS)} or none")
        self.cfg = cfg
        self.twin = twin
        self.signer: BundleSigner | None = None
        if cfg.signing_key is not None:
            if cfg.fleet == "+":
                raise CompanionError("a signing key signs one fleet's announcements: give a fleet name, not '+'")
            try:
                self.signer = BundleSigner.from_file(cfg.signing_key)
            except SignatureError as exc:
                raise CompanionError(f"signing key: {exc}") from None
        self._bundle_sequence = SequenceFile(cfg.work_dir / "bundle-sequence")  # strictly increasing
        # Data and aggregator are checked before anything starts: a wrong shape is an error now, not at
        # every round; an aggregator that lacks data is said once (and refused if rounds are automatic).
        self.cloud_data, self.data_summary = load_cloud_data(cfg)
        self.heldout = None  # the cloud gate's split of --data, never used for distillation
        if cfg.rollout is not None and self.cloud_data.x is not None and self.cloud_data.y is not None \
                and len(self.cloud_data.y) >= 2:
            (tx, ty), self.heldout = split_heldout(self.cloud_data.x, self.cloud_data.y,
                                                   cfg.rollout.heldout_fraction, cfg.rollout.seed)
            proxy = tx if self.cloud_data.proxy_x is self.cloud_data.x else self.cloud_data.proxy_x
            self.cloud_data = replace(self.cloud_data, x=tx, y=ty, proxy_x=proxy)
        self.mode = str(cfg.distill.get("mode", DEFAULT_MODE))
        self.blocked = distill_blocker(cfg, self.cloud_data, self.mode)
        cfg.work_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = CloudMetrics()
        try:  # issue 11: only provisioned devices, patches only for registered bases with their k
            devices = ProvisionedDevices(cfg.provisioned) if cfg.provisioned is not None else None
        except PolicyError as exc:
            raise CompanionError(str(exc)) from None
        if devices is not None and cfg.fleet not in (devices.fleet, "+"):
            raise CompanionError(f"{devices.path} provisions fleet {devices.fleet!r}, not {cfg.fleet!r}")
        self.store = PatchStore(cfg.db_url or sqlite_url(cfg.work_dir / "companion.sqlite"),
                                retention_s=cfg.reject_retention_s)
        self.policy = IngestPolicy(self.store, devices)
        ingest = IngestSettings.from_mqtt(self._mqtt("edgepatch-ingest-0"), fleet=cfg.fleet,
                                          max_message_bytes=cfg.max_message_bytes)
        self.ingest = IngestService(self.store, ingest, metrics=self.metrics,
                                    client=make_client(ingest.mqtt(), twin), policy=self.policy)
        self.ingest.add_patch_hook(self._on_patch)
        self.web = FleetWeb(self.store, self.metrics, host=cfg.http_host, port=cfg.http_port,
                            public_url=cfg.public_url)
        self._publisher = make_client(self._mqtt(f"edgepatch-companion-{cfg.fleet}"), twin)
        self._wake = threading.Event()
        self._requested = threading.Event()  # request_distillation() was called
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._seq = 0
        self._loop: threading.Thread | None = None
        self.current: Bundle | None = None
        self.canoe: CanoeCompanion | None = None  # started with cfg.canoe
        self.history: list[dict[str, Any]] = []  # one entry per distillation (for reports)
        self.failures = 0  # consecutive failed rounds (reset by a published one)
        self.last_error: str | None = None
        self._retry_at = 0.0  # monotonic time before which no round is tried after a failure
        self._used: dict[tuple[str, str], int] = {}  # (base, device) -> its patches for that base a round used
        self.rollout = None if cfg.rollout is None else StagedRollout(
            cfg.rollout, self.publish, lambda: [d["device_id"] for d in self.store.devices(cfg.fleet)],
            self.store.metric_values, self.metrics.registry, self.heldout, stop=self._stop.is_set)
        if self.rollout is not None:
            self.web.add_section("rollout", self.rollout.section, rollout_html)

    def _mqtt(self, client_id: str) -> MqttSettings:
        """The settings of one companion client: the shared broker, TLS and credentials, its own id."""
        if self.cfg.mqtt is not None:
            return self.cfg.mqtt.replace(client_id=client_id)
        return MqttSettings(host=self.cfg.broker_host, port=self.cfg.broker_port, version=self.cfg.protocol,
                            client_id=client_id)

    # -- lifecycle -------------------------------------------------------------------------------
    def startup_note(self) -> str:
        """One line for the start-up output: what distillation will run on, or why none can."""
        if self.blocked:
            return self.blocked
        when = (f"; the base is updated once {self.cfg.distill_after} devices each sent {self.cfg.base_every} "
                "patches for it" if self.cfg.distill_after else "; rounds only on request")
        return f"distillation: {self.cfg.aggregator} (mode {self.mode}) on {self.data_summary}{when}"

    def start(self) -> None:
        log.info("%s", self.startup_note())
        self.web.add_section("distillation", self.distill_status, distill_html)
        self.web.start()
        self._publisher.connect()
        self.ingest.start()
        if not self.ingest.wait_subscribed(30):
            raise RuntimeError(f"ingest could not subscribe at {self.ingest.settings.mqtt().url}")
        self.publish(self.cfg.bundle)
        if self.cfg.canoe:
            self._start_canoe()

    def _start_canoe(self) -> None:
        from .canoe import CanoeCompanion

        assert self.current is not None
        if self.cfg.fleet == "+":
            raise ValueError("Canoe matches within one fleet: give a fleet name, not '+'")
        settings = self._mqtt(f"edgepatch-canoe-companion-{self.cfg.fleet}")
        devices = self.policy.devices  # provisioning on: histograms only from provisioned devices
        canoe = CanoeCompanion(self.cfg.fleet, settings.host, settings.port, self.current.model_spec.num_classes,
                               cloud_id=CLOUD_ID, timeout_s=self.cfg.canoe_timeout_s, metrics=self.metrics,
                               client=make_client(settings, self.twin),
                               known=None if devices is None else devices.known)
        canoe.start(30)
        canoe.attach(self.web)
        self.canoe = canoe
        log.info("canoe matching on for fleet %s (%d classes, helper timeout %.1f s)", self.cfg.fleet,
                 self.current.model_spec.num_classes, self.cfg.canoe_timeout_s)

    def start_background(self) -> None:
        """`start()`, then the distillation loop on a thread of its own (joined by `stop()`)."""
        self.start()
        self._loop = threading.Thread(target=self.run_forever, name="companion-distill", daemon=True)
        self._loop.start()

    def wait_distillations(self, count: int, timeout: float) -> bool:
        """Wait until `count` distillation rounds have been published (True) or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while len(self.history) < count and time.monotonic() < deadline:
            time.sleep(0.2)
        return len(self.history) >= count

    def stop(self) -> None:
        """Stop after the distillation in progress, if any, has been published."""
        self._stop.set()
        self._wake.set()
        if self._loop is not None:
            self._loop.join()
        if self.canoe is not None:
            self.canoe.stop()
        self.ingest.stop()
        self._publisher.disconnect()
        self.web.stop()
        self.store.close()

    def run_forever(self) -> None:
        """Distil whenever `distill_after` devices have reported on the current base (or on `request`).

        A failed round never takes the service down and never spins: it is counted on /metrics
        (`edgepatch_distillation_failures_total`), shown on the fleet page, logged as one line (the
        traceback at DEBUG) and retried after `retry_s`, doubling per consecutive failure up to `retry_max_s`.
        """
        while not self._stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            if self._stop.is_set() or time.monotonic() < self._retry_at or not self._due():
                continue
            try:
                self.distill_and_publish()
            except Exception as exc:  # noqa: BLE001 - a failed round must not take the service down
                self._round_failed(exc)
            else:
                self.failures, self.last_error, self._retry_at = 0, None, 0.0

    def _round_failed(self, exc: Exception) -> None:
        self.failures += 1
        delay = min(self.cfg.retry_max_s, self.cfg.retry_s * 2 ** (self.failures - 1))
        self._retry_at = time.monotonic() + delay
        self.last_error = f"{type(exc).__name__}: {' '.join(str(exc).split())}"  # one line, however it was raised
        self.metrics.distill_failures.inc()
        self._requested.set()  # a requested round stays requested until one succeeds
        log.error("distillation round failed (%d in a row): %s; the current bundle stays published, next try "
                  "in %.0f s", self.failures, self.last_error, delay)
        log.debug("distillation failure", exc_info=exc)

    def distill_status(self) -> dict[str, Any]:
        """The distillation part of /api/fleet and the fleet page."""
        return {"aggregator": self.cfg.aggregator, "mode": self.mode, "data": self.data_summary,
                "distill_after": self.cfg.distill_after, "base_every": self.cfg.base_every,
                "blocked": self.blocked, "rounds": len(self.history), "failures": self.failures,
                "failures_total": int(self.metrics.value("edgepatch_distillation_failures_total")),
                "last_error": self.last_error,
                "retry_in_s": round(max(0.0, self._retry_at - time.monotonic()), 1) if self.failures else None}

    def request_distillation(self) -> None:
        """Distil on the next loop turn if any device has reported on the current base."""
        self._requested.set()
        self._wake.set()

    # -- ingest hook -----------------------------------------------------------------------------
    def _on_patch(self, msg: Message) -> None:
        if self.cfg.distill_after and self.current is not None and msg.base_version == self.current.base_version:
            self._wake.set()

    def _due(self) -> bool:
        if self.current is None or self.blocked:
            if self.blocked and self._requested.is_set():
                self._requested.clear()
                log.warning("distillation requested but %s", self.blocked)
            return False
        # Only patches no round has used yet: an aggregator that leaves W alone (fedavg_patches) keeps the
        # base version, and the same patches must not trigger round after round.
        base = self.current.base_version
        new = [n - self._used.get((base, d), 0) for d, n in self._patch_counts(base).items()]
        if not any(n > 0 for n in new):
            return False
        if self._requested.is_set():  # on request: whatever has arrived, however few rounds
            self._requested.clear()
            return True
        ready = sum(1 for n in new if n >= self.cfg.base_every)
        return self.cfg.distill_after > 0 and ready >= self.cfg.distill_after

    def _patch_counts(self, base_version: str) -> dict[str, int]:
        """device -> distinct patches it sent for `base_version`: its rounds on that base (one patch per round;
        the store keeps a redelivered patch once)."""
        from sqlalchemy import func, select

        p = self.store.t["patches"]
        q = (select(p.c.device_id, func.count()).where(p.c.base_version == base_version, p.c.fleet == self.cfg.fleet)
             .group_by(p.c.device_id))
        with self.store.engine.connect() as conn:
            return {str(d): int(n) for d, n in conn.execute(q)}

    # -- publishing ------------------------------------------------------------------------------
    def publish(self, bundle_dir: Path, targets: tuple[str, ...] = ()) -> BundleAnnouncement:
        """Verify, serve over HTTP and announce (retained) a bundle directory.

        The announcement names the directory URL: a device fetches the manifest, checks its sha256,
        and downloads only the artifacts it does not already have (device/fetch.py).
        """
        with load_bundle(bundle_dir) as bundle:
            version = bundle.version
            artifacts = {e.path: e.sha256 for e in bundle.manifest.artifacts.values()}
            size = sum(e.bytes for e in bundle.manifest.artifacts.values())
        serve_dir = self.cfg.work_dir / "published" / version[:16]
        if serve_dir.exists():
            shutil.rmtree(serve_dir)
        shutil.copytree(bundle_dir, serve_dir)
        base_url = self.web.serve_bundle(version[:16], serve_dir)
        size += (serve_dir / "manifest.json").stat().st_size
        ann = BundleAnnouncement(version=version[:16], reference=base_url, manifest_sha256=version, size=size,
                                 artifacts=artifacts, targets=tuple(targets))  # targets: a canary stage
        if self.signer is not None:  # devices given the fleet's public key install only signed, newer bundles
            sequence = self._bundle_sequence.next()
            ann = replace(ann, sequence=sequence, signature=self.signer.sign(self.cfg.fleet, sequence, ann.to_json()))
        self.current = load_bundle(bundle_dir)
        # Registered before the announcement goes out: the first patches for it must find their base and k.
        self.store.add_bundle(version, version, ann.reference, base_version=self.current.base_version,
                              k=self.current.patch_spec.k)
        self.policy.note_bundle(self.current.base_version, self.current.patch_spec.k)
        with self._lock:
            self._seq += 1
            msg = make_message(ann, device_id=CLOUD_ID, fleet=self.cfg.fleet,
                               base_version=self.current.base_version, variant_id="-", seq=self._seq)
        self._publisher.publish(bundle_topic(self.cfg.fleet), encode(msg), qos=1, retain=True)
        self._publisher.flush(30)
        self.store.mark_announced(version)
        self.metrics.bundles_published.inc()
        log.info("published bundle %s (base %s) at %s", version[:12], self.current.base_version[:12],
                 ann.reference)
        return ann

    def distill_and_publish(self) -> dict[str, Any]:
        """One MoMoDistill round on the stored φ of the current base, then republish (cloud/republish.py) and publish."""
        from edgepatch.cloud.momodistill import DeviceContribution, DistillConfig, run_aggregator
        from edgepatch.cloud.republish import republish_bundle

        assert self.current is not None
        bundle = self.current
        spec, patch = bundle.model_spec, bundle.patch_spec
        used = {(bundle.base_version, d): n for d, n in self._patch_counts(bundle.base_version).items()}
        patches = self.store.latest_patches(bundle.base_version, self.cfg.fleet)
        devices = [DeviceContribution(device_id, np.asarray(phi, np.float32))
                   for device_id, (phi, _) in sorted(patches.items())]
        cloud = self.cloud_data
        t0 = time.perf_counter()
        # Devices upload φ only (no profile features), so step 2 uses each device's own φ (phi_source
        # "device"); the encoder for cold-start devices needs profiles and is not trained here.
        settings = {"phi_source": "device", **self.cfg.distill}
        result = run_aggregator(self.cfg.aggregator, spec, patch, bundle.all_params(), devices, cloud,
                                DistillConfig(**settings))
        seconds = time.perf_counter() - t0
        out = self.cfg.work_dir / "bundles" / f"round-{len(self.history) + 1}"
        if out.exists():
            shutil.rmtree(out)
        manifest = republish_bundle(bundle.root, result.params, out, runtimes=self.cfg.runtimes,
                                    delta=self.cfg.delta_encoding,
                                    meta={"distilled_from_devices": len(devices),
                                          "aggregator": self.cfg.aggregator})
        # A run counts once its candidate bundle exists; what the rollout decides is counted on its own
        # (edgepatch_rollout_decisions_total), and waiting for canaries can take minutes.
        self.metrics.distill_runs.inc()
        if self.rollout is None:
            version, decision = self.publish(out).manifest_sha256, None
        else:  # cloud gate, canaries, then promote or withdraw (the current base stays)
            with load_bundle(out) as candidate:
                version = candidate.version
            decision = self.rollout.release(bundle.root, bundle.all_params(), out, result.params, spec, version)
        entry = {"round": len(self.history) + 1, "devices": len(devices), "seconds": round(seconds, 2),
                 "parent_base": bundle.base_version, "base_version": manifest.base_version,
                 "bundle": version[:16], "metrics": result.metrics, "rollout": decision}
        self.history.append(entry)
        self._used.update(used)
        log.info("distillation round %d over %d devices in %.1f s", entry["round"], len(devices), seconds)
        return entry
