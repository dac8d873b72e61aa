"""Bytes per device under issue 13's schedule, measured on the wire, for the demo and benchmarks/bytes.py.

The schedule: a device *round* is one φ training round ending in one patch upload; devices run one every
round, and the companion updates the base every R rounds (`cloud serve --base-every R`). What moves:

- every round, device → cloud: its patch (φ), metrics and state messages; cloud → device: the companion's
  patch acknowledgements. `WireBytes` counts the payload of every MQTT message of the fleet as a
  subscriber on the same broker receives it, by device and channel — the real messages, not a formula.
- every R rounds, cloud → device: the bundle announcement (every device receives it) and the files a
  device of that runtime downloads (manifest, int8 parameter delta, gzip on the wire: device/fetch.py),
  counted as wire bytes where they are served or fetched.
- FedAvg of the full model over the same rounds: the global weights down and the device's update up, every
  round, as the FL server and clients serialize them (cloud/fl, device/fl_client.py). `fedavg_blob_bytes`
  measures one round's pair from real serialized tensors when no FL run is at hand (the demo).

Per day = the measured bytes per round × rounds per day + the measured bytes per base update × updates per
day (rounds per day / R). Nothing here estimates a message size.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgepatch.protocol.mqtt import Incoming, MqttSettings, make_client
from edgepatch.protocol.topics import PREFIX, RELAYED_CHANNELS, Channel, TopicError, parse_topic

ROUNDS_PER_DAY = 24  # one φ round an hour: what "per day" means in the reports unless told otherwise


class WireBytes:
    """Payload bytes of every MQTT message of one fleet, by (device, channel) and direction.

    Device channels are uplink (device → cloud) except the relayed ones (acks, Canoe replies), which the
    cloud sends to the device in the topic; the fleet-wide bundle topic reaches every device once per
    announcement (and the retained one once at connect, as this subscriber sees it too)."""

    def __init__(self, host: str, port: int, fleet: str, protocol: Any = "5", client_id: str | None = None) -> None:
        self.fleet = fleet
        self.up: Counter[tuple[str, str]] = Counter()
        self.down: Counter[tuple[str, str]] = Counter()
        self.fleet_wide: Counter[str] = Counter()  # channel -> bytes of one copy (each device gets one)
        self.messages: Counter[str] = Counter()  # channel -> messages seen
        self._lock = threading.Lock()
        self.client = make_client(MqttSettings(host=host, port=port, version=protocol,
                                               client_id=client_id or f"edgepatch-wirebytes-{fleet}"))

    def start(self, timeout: float = 30.0) -> WireBytes:
        self.client.subscribe(f"{PREFIX}/{self.fleet}/#", self._count)
        self.client.connect()
        if not self.client.wait_subscribed(timeout):
            raise RuntimeError(f"could not subscribe to {PREFIX}/{self.fleet}/# at {self.client.settings.url}")
        return self

    def stop(self) -> None:
        self.client.disconnect()

    def _count(self, msg: Incoming) -> None:
        if not msg.payload:  # a cleared retained topic carries nothing
            return
        try:
            addr = parse_topic(msg.topic)
        except TopicError:
            return
        size = len(msg.payload)
        with self._lock:
            self.messages[addr.channel.value] += 1
            if addr.device_id is None:
                self.fleet_wide[addr.channel.value] += size
            elif addr.channel in RELAYED_CHANNELS:
                self.down[(addr.device_id, addr.channel.value)] += size
            else:
                self.up[(addr.device_id, addr.channel.value)] += size

    def device(self, device_id: str) -> dict[str, int]:
        """Bytes of one device so far: uplink by channel, downlink by channel (bundle announcements included)."""
        with self._lock:
            out = {f"up_{c}": n for (d, c), n in self.up.items() if d == device_id}
            out.update({f"down_{c}": n for (d, c), n in self.down.items() if d == device_id})
            out["down_bundle_announcements"] = self.fleet_wide[Channel.BUNDLE.value]
        return out

    def announcements(self) -> int:
        with self._lock:
            return self.messages[Channel.BUNDLE.value]


def fedavg_blob_bytes(params: Mapping[str, np.ndarray]) -> dict[str, int]:
    """One FedAvg round of the full model for one device, from real serialized tensors: the global weights
    the FL server publishes (params_to_bytes, fp32) and a full-model update as a client uploads it
    (encode_update: every entry touched)."""
    from edgepatch.protocol.blobs import encode_update
    from edgepatch.protocol.params import params_to_bytes

    ones = {k: np.ones(np.shape(v), bool) for k, v in params.items()}
    delta = {k: np.full(np.shape(v), 1e-3, np.float32) for k, v in params.items()}
    return {"down": len(params_to_bytes(params)), "up": len(encode_update(delta, ones)),
            "fp32_param_bytes": int(sum(4 * np.size(v) for v in params.values()))}


@dataclass(frozen=True)
class Schedule:
    base_every: int = 10  # R: rounds between base updates
    rounds_per_day: float = ROUNDS_PER_DAY

    @property
    def updates_per_day(self) -> float:
        return self.rounds_per_day / self.base_every


def per_day(schedule: Schedule, *, phi_up_per_round: float, phi_down_per_round: float, update_down: float,
            update_up: float, fedavg_per_round: float) -> dict[str, Any]:
    """Bytes per device per day from measured per-round and per-update bytes, and the FedAvg ratio."""
    phi = schedule.rounds_per_day * (phi_up_per_round + phi_down_per_round)
    base = schedule.updates_per_day * (update_down + update_up)
    total = phi + base
    fedavg = schedule.rounds_per_day * fedavg_per_round
    return {"rounds_per_day": schedule.rounds_per_day, "base_every": schedule.base_every,
            "phi_up_per_round": round(phi_up_per_round, 1), "phi_down_per_round": round(phi_down_per_round, 1),
            "update_down": round(update_down, 1), "update_up": round(update_up, 1),
            "edgepatch_phi_per_day": round(phi), "edgepatch_base_per_day": round(base),
            "edgepatch_per_day": round(total), "fedavg_per_round": round(fedavg_per_round),
            "fedavg_per_day": round(fedavg), "fedavg_over_edgepatch": round(fedavg / total, 2) if total else None}
