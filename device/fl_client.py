"""Federated full-weight rounds on a device (DISTREAL): train the base weights inside a variant, upload by reference.

Per round the device fetches the global weights (`BlobRef`, sha256-checked), then for each local step
chooses a variant (its own `VariantSelector` decision re-made every few steps as its load changes, or
what the server assigned), gathers that sub-network (`slice_params`), gets the gradient from the device
runtime's full-weight program of that variant (LiteRT or ExecuTorch, `Engine.full_grads`), and applies
plain SGD to the kept entries only (`scatter_add`), keeping a boolean touched mask per parameter. The
upload is an .npz with only the touched entries of new − global and the packed masks, so a smaller
variant moves fewer bytes as well as fewer FLOPs.

Slowness is real: after each step the device sleeps `compute × (1/share − 1)`, where `share` is its
current compute share (static speed / reference speed × availability from its trace), so a device
with share 0.25 takes 4× the wall time of the machine's own step time.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgepatch.protocol.blobs import (  # noqa: F401 - blob helpers re-exported for the fl callers
    BlobError,
    decode_update,
    encode_update,
    fetch_blob,
    publish_blob,
)
from edgepatch.protocol.bundle import Bundle, load_bundle
from edgepatch.protocol.endpoint import WireEndpoint
from edgepatch.protocol.fl import Assignment, FlJoin, FlRoundOpen, FlStop, FlUpdate, round_topic
from edgepatch.protocol.messages import Message
from edgepatch.protocol.model_spec import param_infos
from edgepatch.protocol.mqtt import MqttClient, MqttSettings, MqttVersion, make_client
from edgepatch.protocol.mqtt_memory import MemoryBroker
from edgepatch.protocol.params import Params, params_from_bytes
from edgepatch.protocol.variants import (
    KeptSets,
    first_kept,
    sample_kept,
    scatter_add,
    slice_params,
    touched_mask,
)

from .engine import Engine, open_engine
from .profile import load_profile
from .resources import ResourceTrace, TracedResources
from .selector import VariantSelector

log = logging.getLogger("edgepatch.device.fl")


# One error type for the round's blobs, update archives and device specs (blobs live in protocol/blobs.py).
FlError = BlobError


# ------------------------------------------------------------------------------------------- training

class WallClock:
    """Unix time: the deadline is an absolute time shared by the server and every device process."""

    def now(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        time.sleep(max(0.0, seconds))


@dataclass
class RoundResult:
    status: str
    reason: str
    steps: int
    steps_planned: int
    loss: float | None
    delta: Params
    touched: dict[str, np.ndarray]
    variant_steps: dict[str, int]
    timeline: list[tuple[float, str]]
    train_s: float
    throttle_s: float


class FullWeightTrainer:
    """The compute of one device's round (no MQTT): the runtime's full-weight gradients (`Engine.full_grads`,
    LiteRT or ExecuTorch), numpy SGD on the kept entries."""

    def __init__(self, bundle: Bundle, x: np.ndarray, y: np.ndarray, seed: int,
                 resources: TracedResources | None = None, selector: VariantSelector | None = None,
                 clock: WallClock | None = None, num_threads: int = 1, runtime: str = "litert",
                 engine: Engine | None = None) -> None:
        if len(x) == 0 or len(x) != len(y):
            raise FlError(f"training data needs as many labels as samples, got {len(x)} and {len(y)}")
        self.bundle = bundle
        self.spec = bundle.model_spec
        self.infos = param_infos(self.spec, None)
        self.engine = engine or open_engine(bundle, runtime, num_threads)
        self.batch = self.engine.train_batch
        self.x = np.ascontiguousarray(x, dtype=np.float32)
        self.y = np.asarray(y, dtype=np.int32)
        self.rng = np.random.default_rng(seed)
        self.resources = resources
        self.selector = selector
        self.clock = clock or WallClock()
        rows = bundle.manifest.variants
        self.variant_ids = [r.id for r in rows]
        self.full_id = next((r.id for r in rows if r.variant.is_full(self.spec)), rows[0].id)
        # FjORD samples among uniform widths; the uniform ratio of a row is its smallest keep ratio.
        self.uniform_keep = {r.id: min(r.keep.values()) if r.keep else 1.0 for r in rows}
        self._warm_up()

    def _warm_up(self) -> None:
        """One untimed call per variant: the first call of a signature allocates its tensors, which would
        otherwise teach the selector a step time many times too slow."""
        x, y = self._batch()
        base = {n: np.zeros(info.shape, np.float32) for n, info in self.infos.items()}
        for vid in self.variant_ids:
            kept = first_kept(self.spec, self.bundle.variant(vid))
            sliced = slice_params(base, self.infos, kept)
            self.engine.full_grads(vid, x, y, sliced)
            if self.selector is not None:
                # A second, timed call calibrates the selector to this process's real compute speed
                # (other processes share the cores), so its first decision is not the table's optimism.
                t0 = time.perf_counter()
                self.engine.full_grads(vid, x, y, sliced)
                self.selector.observe(vid, time.perf_counter() - t0, runtime=self.engine.runtime, cpu_share=1.0)

    def _batch(self) -> tuple[np.ndarray, np.ndarray]:
        idx = self.rng.choice(len(self.x), size=self.batch, replace=len(self.x) < self.batch)
        return self.x[idx], self.y[idx].astype(self.y.dtype)

    def _kept(self, vid: str, assignment: Assignment, fixed: dict[str, KeptSets]) -> KeptSets:
        variant = self.bundle.variant(vid)
        if assignment.kept == "first":
            return first_kept(self.spec, variant)
        if assignment.kept == "fixed":
            if vid not in fixed:
                fixed[vid] = sample_kept(self.spec, variant, np.random.default_rng(assignment.kept_seed))
            return fixed[vid]
        return sample_kept(self.spec, variant, self.rng)

    def _choose(self, assignment: Assignment, deadline_at: float | None, steps_left: int, current: str | None
                ) -> tuple[str, bool]:
        """(variant, whether a decision was made now)."""
        if assignment.variant is not None:
            if assignment.variant not in self.variant_ids:
                raise FlError(f"assigned variant {assignment.variant!r} is not in this bundle {self.variant_ids}")
            return assignment.variant, current is None
        if assignment.max_keep is not None:  # FjORD: a width drawn per batch among those the device may run
            allowed = [v for v in self.variant_ids if self.uniform_keep[v] <= assignment.max_keep + 1e-9]
            allowed = allowed or [min(self.variant_ids, key=lambda v: self.uniform_keep[v])]
            return str(self.rng.choice(allowed)), True
        if self.selector is None or self.resources is None:
            return self.full_id, current is None
        if current is not None and not self.selector.due():
            return current, False
        time_left = (deadline_at - self.clock.now()) if deadline_at is not None else float("inf")
        snapshot = self.resources.snapshot()
        return self.selector.select(time_left, steps_left, snapshot, runtime=self.engine.runtime).variant_id, True

    def train_round(self, global_params: Mapping[str, np.ndarray], open_msg: FlRoundOpen, assignment: Assignment,
                    on_step: Callable[[int], None] | None = None) -> RoundResult:
        started = self.clock.now()
        deadline_at = open_msg.deadline_at
        local = {n: np.array(global_params[n], dtype=np.float32) for n in self.infos}
        touched = {n: np.zeros(info.shape, bool) for n, info in self.infos.items()}
        fixed: dict[str, KeptSets] = {}
        variant_steps: dict[str, int] = {}
        timeline: list[tuple[float, str]] = []
        losses: list[float] = []
        throttle = 0.0
        current: str | None = None
        planned = open_msg.local_steps
        status, reason = "ok", f"{planned} steps done"
        for i in range(planned):
            if deadline_at is not None and self.clock.now() >= deadline_at:
                status, reason = "missed_deadline", f"deadline passed after {i}/{planned} steps"
                break
            vid, decided = self._choose(assignment, deadline_at, planned - i, current)
            if decided and (vid != current or not timeline) and len(timeline) < 256:
                timeline.append((round(self.clock.now() - started, 4), vid))
            current = vid
            kept = self._kept(vid, assignment, fixed)
            x, y = self._batch()
            t0 = time.perf_counter()
            loss, grads = self.engine.full_grads(vid, x, y, slice_params(local, self.infos, kept))
            if not np.isfinite(loss):
                status, reason = "error", f"loss {loss} at step {i}: not uploading a diverged model"
                break
            for name, grad in grads.items():
                scatter_add(local[name], grad, self.infos[name], kept, alpha=-open_msg.lr)
                touched[name] |= touched_mask(self.infos[name], kept, self.infos[name].shape) > 0
            compute = time.perf_counter() - t0
            share = self.resources.snapshot().cpu_share if self.resources is not None else 1.0
            pause = compute * (1.0 / share - 1.0)
            if deadline_at is not None:  # a device past its deadline stops; it need not sleep beyond it
                pause = min(pause, max(0.0, deadline_at - self.clock.now()))
            self.clock.sleep(pause)
            throttle += pause
            if self.selector is not None and assignment.variant is None and assignment.max_keep is None:
                self.selector.observe(vid, compute + pause, runtime=self.engine.runtime, cpu_share=share)
            variant_steps[vid] = variant_steps.get(vid, 0) + 1
            losses.append(float(loss))
            if on_step is not None:
                on_step(i + 1)
        steps = len(losses)
        delta = {n: local[n] - np.asarray(global_params[n], np.float32) for n in self.infos}
        return RoundResult(status, reason, steps, planned, float(np.mean(losses[-10:])) if losses else None,
                           delta, touched, variant_steps, timeline, self.clock.now() - started, throttle)


# ------------------------------------------------------------------------------------------ the device

@dataclass
class DeviceSpec:
    """Everything a device worker needs (JSON-serializable, so it crosses process and Ray boundaries)."""

    device_id: str
    fleet: str
    bundle_dir: str
    data_path: str  # .npz with x, y (its training samples)
    profile: str  # firmware profile name or path
    relative_speed: float  # class speed × log-normal factor (reference device = 1)
    reference_speed: float  # the speed this machine stands for: share = relative_speed / reference_speed
    trace_path: str  # availability trace (t_seconds, cpu_share, free_mb) relative to sim_start
    sim_start: float  # unix time the traces start at
    broker_host: str
    broker_port: int
    mqtt_protocol: str = "5"  # any MqttVersion spelling (the embedded amqtt broker speaks 3.1.1 only)
    upload_dir: str = "."
    seed: int = 0
    reselect_every: int = 5
    num_threads: int = 1
    runtime: str = "litert"  # "litert" or "executorch": the engine that runs the full-weight steps
    credentials_dir: str = ""  # the device's folder from `cloud provision` (TLS + login); "" = plain broker
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> DeviceSpec:
        return cls(**json.loads(text))


class _ScaledTrace(TracedResources):
    """The availability trace times the device's static share, clipped to (0, 1]."""

    def __init__(self, trace: ResourceTrace, static_share: float, start: float) -> None:
        super().__init__(trace, WallClock(), start=start, loop=True, period_tail_s=1.0)
        self.static_share = static_share

    def snapshot(self):
        snap = super().snapshot()
        share = min(1.0, max(1e-3, snap.cpu_share * self.static_share))
        return type(snap)(share, snap.free_memory_mb, snap.battery_pct, snap.temp_c, 1.0 - share, snap.time)


class FlDevice:
    """One simulated (or real) device on the fl topics: join, then train every round it is offered."""

    def __init__(self, spec: DeviceSpec, stop: threading.Event | None = None, *, client: MqttClient | None = None,
                 broker: MemoryBroker | None = None) -> None:
        """`client` (or `broker`, the in-memory twin) replaces the paho client built from the spec."""
        self.spec = spec
        self.stop = stop or threading.Event()
        self.bundle = load_bundle(spec.bundle_dir, verify=False)
        with np.load(spec.data_path, allow_pickle=False) as data:
            x, y = data["x"], data["y"]
        self.num_samples = len(x)
        profile = load_profile(spec.profile)
        share = min(1.0, spec.relative_speed / spec.reference_speed)
        self.resources = _ScaledTrace(ResourceTrace.load(spec.trace_path), share, spec.sim_start)
        rows = [{"id": r.id, "train_ms": r.train_ms, "memory_bytes": r.memory_bytes or 0,
                 "convergence": r.convergence if r.convergence is not None else r.flops_ratio, "pareto": r.pareto}
                for r in self.bundle.manifest.variants]
        # The table's times were measured on this machine: at share 1 this device runs at that speed.
        selector = VariantSelector(rows, profile, reselect_every=spec.reselect_every)
        self.trainer = FullWeightTrainer(self.bundle, x, y, spec.seed, self.resources, selector,
                                         num_threads=spec.num_threads, runtime=spec.runtime)
        self.inbox: queue.Queue[Message] = queue.Queue()
        self.rounds_done = 0
        if client is None:
            client_id, version = f"fl-{spec.fleet}-{spec.device_id}", MqttVersion.parse(spec.mqtt_protocol)
            settings = (MqttSettings.from_credentials(Path(spec.credentials_dir), client_id, version=version,
                                                      keepalive=60) if spec.credentials_dir else
                        MqttSettings(host=spec.broker_host, port=spec.broker_port, keepalive=60,
                                     client_id=client_id, version=version))
            client = make_client(settings, broker)
        self.link = WireEndpoint(client, fleet=spec.fleet, device_id=spec.device_id, first_seq=1)
        self.link.subscribe(round_topic(spec.fleet), self.inbox.put)  # decoded strictly; rejects counted
        client.connect_hooks.append(self._on_connect)

    def _on_connect(self, session_present: bool) -> None:
        """Join (again) on every connect: the server learns who is there and what it can run."""
        self.link.send(FlJoin(load_profile(self.spec.profile).name, self.spec.relative_speed, self.num_samples,
                              tuple(self.trainer.variant_ids)))

    def run(self, idle_timeout_s: float = 600.0) -> int:
        """Serve rounds until FlStop (or `stop`); returns the number of rounds trained."""
        self.link.client.connect()
        last = time.time()
        try:
            while not self.stop.is_set():
                try:
                    msg = self.inbox.get(timeout=0.2)
                except queue.Empty:
                    if time.time() - last > idle_timeout_s:
                        log.warning("%s: no round for %.0f s, leaving", self.spec.device_id, idle_timeout_s)
                        break
                    continue
                # Only the newest round matters: older ones queued while training are over.
                while not self.inbox.empty():
                    msg = self.inbox.get_nowait()
                if isinstance(msg.payload, FlStop):
                    break
                if isinstance(msg.payload, FlRoundOpen):
                    self._serve_round(msg.payload)
                    last = time.time()
        finally:
            self.link.flush(5.0)
            self.link.stop()
        return self.rounds_done

    def _serve_round(self, open_msg: FlRoundOpen) -> None:
        assignment = open_msg.assignment_for(self.spec.device_id)
        if open_msg.clock_origin is not None:  # every device's load trace starts when the server says
            self.resources.start = open_msg.clock_origin
        try:
            global_params = params_from_bytes(fetch_blob(open_msg.global_ref))
            result = self.trainer.train_round(global_params, open_msg, assignment)
        except Exception as exc:  # report, never die silently: the server records the reason
            log.exception("%s: round %d failed", self.spec.device_id, open_msg.round)
            result = RoundResult("error", f"{type(exc).__name__}: {exc}"[:250], 0, open_msg.local_steps, None,
                                 {}, {}, {}, [], 0.0, 0.0)
        ref = None
        if result.status == "ok":
            data = encode_update(result.delta, result.touched)
            ref = publish_blob(Path(self.spec.upload_dir), f"{self.spec.device_id}-r{open_msg.round}.npz", data)
        touched = {n: int(m.sum()) for n, m in result.touched.items()}
        update = FlUpdate(open_msg.round, result.status, result.reason, result.steps, result.steps_planned,
                          self.num_samples, result.loss, ref, touched, result.variant_steps,
                          tuple(result.timeline[:256]), round(result.train_s, 4), round(result.throttle_s, 4),
                          open_msg.global_ref.bytes)
        self.link.send(update)
        self.rounds_done += 1


def run_device_host(spec_jsons: list[str], idle_timeout_s: float = 600.0) -> dict[str, int]:
    """Run several devices as threads of this process (one per device when given one spec).
    Returns rounds trained per device. Used by the simulator's processes and Ray tasks alike."""
    logging.basicConfig(level=logging.WARNING)
    # A device that cannot meet its deadline logs every decision at WARNING; the round report says it once.
    logging.getLogger("edgepatch.device.selector").setLevel(logging.ERROR)
    specs = [DeviceSpec.from_json(s) for s in spec_jsons]
    results: dict[str, int] = {}
    errors: list[str] = []

    def one(spec: DeviceSpec) -> None:
        try:
            results[spec.device_id] = FlDevice(spec).run(idle_timeout_s)
        except Exception as exc:
            errors.append(f"{spec.device_id}: {type(exc).__name__}: {exc}")
            log.exception("device %s crashed", spec.device_id)

    threads = [threading.Thread(target=one, args=(s,), name=s.device_id, daemon=True) for s in specs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise FlError("; ".join(errors))
    return results
