"""The FL server: opens rounds over MQTT, collects updates by reference, aggregates with a strategy.

Round r: write the global weights to `<out>/global/r<r>.npz`, publish `FlRoundOpen` (reference,
deadline, per-device assignments) on `.../fl/round`; wait until every device answered or the deadline
plus `grace_s` passed (strategies without a deadline wait up to `max_wait_s`); fetch and check each
"ok" update, aggregate, evaluate the new global model on the evaluation set in LiteRT. Every device of
every round ends up in the round record as contributed, or dropped with its reason.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgepatch.protocol.blobs import BlobError, decode_update, fetch_blob, publish_blob
from edgepatch.protocol.bundle import Bundle
from edgepatch.protocol.endpoint import WireEndpoint
from edgepatch.protocol.fl import FlJoin, FlRoundOpen, FlStop, FlUpdate, fleet_fl_filter
from edgepatch.protocol.messages import Message, encode
from edgepatch.protocol.model_spec import param_infos
from edgepatch.protocol.mqtt import MqttClient, MqttSettings, MqttVersion, make_client
from edgepatch.protocol.params import Params, params_to_bytes
from edgepatch.protocol.variants import first_kept, slice_params

from .strategies import ClientUpdate, Strategy

log = logging.getLogger("edgepatch.cloud.fl")
SERVER_ID = "fl-server"


@dataclass
class DeviceRound:
    device_id: str
    outcome: str  # "contributed" or "dropped"
    reason: str
    steps: int = 0
    steps_planned: int = 0
    num_samples: int = 0
    loss: float | None = None
    variant_steps: dict[str, int] = field(default_factory=dict)
    timeline: list[tuple[float, str]] = field(default_factory=list)  # (seconds since sim start, variant)
    train_s: float = 0.0
    throttle_s: float = 0.0
    bytes_down: int = 0
    bytes_up: int = 0
    reply_s: float | None = None  # seconds from round open to the update's arrival


@dataclass
class RoundRecord:
    round: int
    strategy: str
    opened_s: float  # since the simulation's clock origin
    closed_s: float
    accuracy: float
    eval_loss: float
    contributed: int
    dropped: int
    bytes_down: int
    bytes_up: int
    devices: list[DeviceRound]


class Evaluator:
    """Accuracy and loss of global weights, run as the variant (its first filters, φ = 0) through the
    torch reference forward — the one every runtime's programs are parity-tested against; the cloud does
    not load device runtimes."""

    def __init__(self, bundle: Bundle, x: np.ndarray, y: np.ndarray) -> None:
        self.bundle = bundle
        self.spec = bundle.model_spec
        self.patch = bundle.patch_spec
        self.shared = bundle.shared_params()
        self.infos = param_infos(self.spec, self.patch)
        self.x = np.ascontiguousarray(x, np.float32)
        self.y = np.asarray(y, np.int64)

    def __call__(self, params: Mapping[str, np.ndarray], variant_id: str) -> tuple[float, float]:
        import torch

        from edgepatch.export.torch_model import forward, to_tensors

        variant = self.bundle.variant(variant_id)
        sliced = slice_params({**self.shared, **params}, self.infos, first_kept(self.spec, variant))
        with torch.no_grad():
            z = forward(variant.spec(self.spec), self.patch, to_tensors(sliced), torch.from_numpy(self.x),
                        torch.zeros(self.patch.k)).numpy().astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        loss = float(-logp[np.arange(len(self.y)), self.y].mean())
        return float((z.argmax(axis=1) == self.y).mean()), loss


class FlServer:
    def __init__(self, *, broker_host: str, broker_port: int, fleet: str, bundle: Bundle, strategy: Strategy,
                 out_dir: Path, expected_devices: list[str], evaluator: Evaluator, init_params: Params,
                 deadline_s: float, local_steps: int, lr: float, clock_origin: float, grace_s: float = 2.0,
                 max_wait_s: float = 600.0, join_timeout_s: float = 120.0,
                 mqtt_protocol: MqttVersion | str = MqttVersion.V5, client: MqttClient | None = None) -> None:
        if deadline_s <= 0 or local_steps < 1 or lr <= 0:
            raise ValueError(f"need deadline_s > 0, local_steps >= 1, lr > 0; got {deadline_s}, {local_steps}, {lr}")
        self.fleet = fleet
        self.bundle = bundle
        self.strategy = strategy
        self.out_dir = Path(out_dir)
        self.expected = sorted(expected_devices)
        self.evaluate = evaluator
        self.params = {k: np.asarray(v, np.float32) for k, v in init_params.items()}
        self.infos = param_infos(bundle.model_spec, None)
        self.deadline_s, self.local_steps, self.lr = deadline_s, local_steps, lr
        self.clock_origin = clock_origin
        self.grace_s, self.max_wait_s, self.join_timeout_s = grace_s, max_wait_s, join_timeout_s
        self.joined: dict[str, FlJoin] = {}
        self.records: list[RoundRecord] = []
        self.rejects: list[str] = []
        self.inbox: queue.Queue[tuple[Message, int, float]] = queue.Queue()
        if client is None:
            client = make_client(MqttSettings(host=broker_host, port=broker_port, client_id=f"{SERVER_ID}-{fleet}",
                                              version=mqtt_protocol, keepalive=60))
        self.link = WireEndpoint(client, fleet=fleet, device_id=SERVER_ID, first_seq=1)
        for leaf in ("join", "update"):  # decoded strictly; rejects are counted in self.link.rejects
            self.link.subscribe(fleet_fl_filter(fleet, leaf), self._arrived)

    def _arrived(self, msg: Message) -> None:
        self.inbox.put((msg, len(encode(msg)), time.time()))  # canonical: the bytes the sender sent

    def _publish(self, payload: FlRoundOpen | FlStop) -> int:
        size = self.link.send(payload)
        self.link.flush(10)
        return size

    def _take(self, timeout: float) -> tuple[Any, int, float] | None:
        """The next valid message (message, its size, arrival time), or None on timeout."""
        try:
            return self.inbox.get(timeout=max(0.01, timeout))
        except queue.Empty:
            return None

    def start(self) -> None:
        self.link.start(30)

    def wait_for_joins(self) -> None:
        deadline = time.time() + self.join_timeout_s
        while set(self.joined) < set(self.expected):
            got = self._take(deadline - time.time())
            if got is None and time.time() >= deadline:
                missing = sorted(set(self.expected) - set(self.joined))
                raise TimeoutError(f"{len(missing)} devices never joined in {self.join_timeout_s:.0f} s: "
                                   f"{', '.join(missing[:10])}")
            if got is not None and isinstance(got[0].payload, FlJoin) and got[0].device_id in self.expected:
                self.joined[got[0].device_id] = got[0].payload

    def run_round(self, rnd: int) -> RoundRecord:
        plan = self.strategy.configure_round(rnd, self.joined)
        ref = publish_blob(self.out_dir / "global", f"r{rnd:04d}.npz", params_to_bytes(self.params))
        opened = time.time()
        deadline_at = opened + self.deadline_s if plan.uses_deadline else None
        open_msg = FlRoundOpen(rnd, self.strategy.name, deadline_at, ref, self.local_steps, self.lr,
                               plan.assignments, plan.default, self.clock_origin)
        open_bytes = self._publish(open_msg)
        # Devices stop at the deadline and then report; after `grace_s` more, silence means dropped.
        close_at = (deadline_at + self.grace_s) if deadline_at is not None else opened + self.max_wait_s
        replies: dict[str, tuple[FlUpdate, int, float]] = {}
        while set(replies) < set(self.expected) and time.time() < close_at:
            got = self._take(close_at - time.time())
            if got is None:
                continue
            msg, size, at = got
            if isinstance(msg.payload, FlUpdate) and msg.device_id in self.expected:
                if msg.payload.round == rnd:
                    replies[msg.device_id] = (msg.payload, size, at)
                else:
                    self.rejects.append(f"{msg.device_id}: late update for round {msg.payload.round}")
            elif isinstance(msg.payload, FlJoin):
                self.joined[msg.device_id] = msg.payload
        devices: list[DeviceRound] = []
        updates: list[ClientUpdate] = []
        for dev in self.expected:
            if dev not in replies:
                why = "no reply by deadline + grace" if deadline_at is not None else f"no reply in {self.max_wait_s} s"
                devices.append(DeviceRound(dev, "dropped", why, bytes_down=ref.bytes + open_bytes))
                continue
            upd, size, at = replies[dev]
            rec = DeviceRound(dev, "dropped", f"{upd.status}: {upd.reason}", upd.steps, upd.steps_planned,
                              upd.num_samples, upd.loss, dict(upd.variant_steps),
                              [(round(opened - self.clock_origin + t, 4), v) for t, v in upd.timeline],
                              upd.train_s, upd.throttle_s, upd.bytes_down + open_bytes, size, round(at - opened, 4))
            if upd.status == "ok" and upd.update_ref is not None:
                try:
                    delta, touched = decode_update(fetch_blob(upd.update_ref), self.infos)
                    updates.append(ClientUpdate(dev, max(1, upd.num_samples), delta, touched))
                    rec.outcome, rec.reason = "contributed", upd.reason
                    rec.bytes_up += upd.update_ref.bytes
                except BlobError as exc:
                    rec.reason = f"bad update: {exc}"
            devices.append(rec)
        self.params = self.strategy.aggregate(rnd, self.params, updates)
        accuracy, loss = self.evaluate(self.params, self.strategy.eval_variant())
        closed = time.time()
        record = RoundRecord(rnd, self.strategy.name, round(opened - self.clock_origin, 4),
                             round(closed - self.clock_origin, 4), accuracy, loss, len(updates),
                             len(self.expected) - len(updates), sum(d.bytes_down for d in devices),
                             sum(d.bytes_up for d in devices), devices)
        self.records.append(record)
        return record

    def run(self, rounds: int, on_round: Callable[[RoundRecord], None] | None = None) -> list[RoundRecord]:
        self.wait_for_joins()
        for rnd in range(1, rounds + 1):
            record = self.run_round(rnd)
            if on_round is not None:
                on_round(record)
        return self.records

    def stop(self, reason: str = "done") -> None:
        try:
            self._publish(FlStop(reason))
        finally:
            self.link.stop()


def record_to_json(record: RoundRecord) -> dict[str, Any]:
    return asdict(record)
