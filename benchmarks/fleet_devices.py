"""Lightweight simulated devices for benchmarks/fleet_load.py: thousands of real MQTT 3.1.1 connections per
process on one asyncio loop (a thread per paho client would not scale to 10,000).

The MQTT client is the minimum a device needs, hand-written over asyncio streams: CONNECT / CONNACK,
SUBSCRIBE (QoS 1) to the device's own `ack` topic, PUBLISH QoS 1 with PUBACK tracking, PUBACK for the
companion's QoS-1 acks, PINGREQ when idle. Payloads are the project's, built at send time so `sent_at` is the real send time: patches as the
codec's binary frame (`patch_frame`, checked equal to `encode(make_message(...))` at start), metrics by
`make_message` + `encode`. No training.

Each device publishes one PatchUpdate every `interval` seconds (random phase) and a Metrics message every
`metrics_every`-th tick. The companion's PatchAck (cloud/ingest_acks.py, sent after the commit) closes the
loop: sent_at -> ack received is the device-seen "stored" latency. Acks (binary frames, protocol/acks.py) are
read by `ack_entries` (the hash and status only) rather than the strict decoder, to keep the generator's CPU
for publishing.
"""

from __future__ import annotations

import asyncio
import json
import random
import resource
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgepatch.protocol.acks import ACK_STATUSES, ENTRY_BYTES
from edgepatch.protocol.frame import HEADER, encode_frame, frame_hash
from edgepatch.protocol.messages import Metrics, PatchUpdate, encode, make_message
from edgepatch.protocol.topics import Channel, device_topic

BASE, VARIANT = "fleet-b1", "v100"
_ACK_ENTRY = struct.Struct("<32sBH")  # protocol/acks.py: sha256, status code, reason bytes


def ack_entries(payload: bytes) -> list[tuple[str, str]]:
    """(content hash, status) of each entry of the companion's PatchAck frame, read without the strict checks
    (the ack comes from our own companion; a malformed one raises struct.error / IndexError)."""
    n_dev, n_fleet, n_base, n_var = HEADER.unpack_from(payload)[3:7]
    at = HEADER.size + n_dev + n_fleet + n_base + n_var
    (count,) = struct.unpack_from("<H", payload, at)
    at += 2
    out = []
    for _ in range(count):
        digest, code, n_reason = _ACK_ENTRY.unpack_from(payload, at)
        out.append((digest.hex(), ACK_STATUSES[code]))
        at += ENTRY_BYTES + n_reason
    return out


def patch_frame(dev: str, fleet: str, seq: int, sent_at: float, phi: np.ndarray) -> tuple[bytes, str]:
    """A PatchUpdate as the device codec sends it (a binary frame, protocol/frame.py) and its content hash,
    without make_message's strict round trip (31 -> 7 µs: the generator shares the cores it measures).
    `check_codec` proves it equal to `encode(make_message(...))` when a generator starts."""
    header = {"kind": PatchUpdate.KIND, "device_id": dev, "fleet": fleet, "base_version": BASE, "variant_id": VARIANT,
              "seq": seq, "sent_at": sent_at}
    data = encode_frame(header, PatchUpdate(phi=phi, steps=seq, samples=32, holdout_acc=0.5, loss=0.1))
    return data, frame_hash(data)


def check_codec(fleet: str) -> None:
    phi = np.arange(16, dtype=np.float32)
    msg = make_message(PatchUpdate(phi=phi, steps=7, samples=32, holdout_acc=0.5, loss=0.1), device_id="d000001",
                       fleet=fleet, base_version=BASE, variant_id=VARIANT, seq=7, sent_at=1.7e9)
    if patch_frame("d000001", fleet, 7, 1.7e9, phi) != (encode(msg), msg.content_hash):
        raise SystemExit("fleet_devices.patch_frame no longer matches the codec's encode(make_message(...))")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf8(s: str) -> bytes:
    b = s.encode()
    return struct.pack("!H", len(b)) + b


def connect_packet(client_id: str, keepalive: int) -> bytes:
    body = _utf8("MQTT") + bytes([4, 0x02]) + struct.pack("!H", keepalive) + _utf8(client_id)  # 3.1.1, clean
    return b"\x10" + _varint(len(body)) + body


def subscribe_packet(pid: int, topic_filter: str) -> bytes:
    body = struct.pack("!H", pid) + _utf8(topic_filter) + b"\x01"
    return b"\x82" + _varint(len(body)) + body


def publish_packet(pid: int, topic: str, payload: bytes) -> bytes:
    body = _utf8(topic) + struct.pack("!H", pid) + payload
    return b"\x32" + _varint(len(body)) + body


def puback_packet(pid: int) -> bytes:
    return b"\x40\x02" + struct.pack("!H", pid)


async def read_packet(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    first = (await reader.readexactly(1))[0]
    length, shift = 0, 0
    while True:
        digit = (await reader.readexactly(1))[0]
        length += (digit & 0x7F) << shift
        if not digit & 0x80:
            break
        shift += 7
    return first, await reader.readexactly(length) if length else b""


@dataclass(frozen=True)
class FleetPlan:
    host: str
    port: int
    fleet: str
    first: int  # device index range [first, first + count)
    count: int
    interval: float  # seconds between a device's patches
    metrics_every: int  # a Metrics message every n-th tick (0: none)
    k: int  # floats in phi
    start_at: float  # wall time the publishing starts (connections are opened before it)
    duration: float  # seconds of publishing
    drain_s: float  # after publishing: wait this long at most for outstanding acks
    connect_rate: float  # new connections per second (this process)
    out: str  # directory for this process's results


class Generator:
    def __init__(self, plan: FleetPlan) -> None:
        self.plan = plan
        self.held = 0
        self.connect_errors = 0
        self.lost_connections = 0
        self.patches_sent = 0
        self.metrics_sent = 0
        self.pubacks = 0
        self.acks: dict[str, int] = {}
        self.latencies: list[float] = []
        self.held_series: list[tuple[float, int, int]] = []  # (t, connections held, patches sent)
        self.sent_hashes: list[str] = []
        self.metric_hashes: list[str] = []
        self.pending: dict[str, float] = {}  # patch hash -> sent_at, until its PatchAck arrives
        self.rng = np.random.default_rng(plan.first)

    async def device(self, index: int, gate: asyncio.Semaphore) -> None:
        p = self.plan
        dev = f"d{index:06d}"
        ack_topic = device_topic(p.fleet, dev, Channel.ACK)
        patch_topic = device_topic(p.fleet, dev, Channel.PATCH)
        metrics_topic = device_topic(p.fleet, dev, Channel.METRICS)
        for attempt in range(5):
            async with gate:
                try:
                    reader, writer = await asyncio.wait_for(asyncio.open_connection(p.host, p.port), 30)
                    writer.write(connect_packet(f"fleet-{dev}", 600) + subscribe_packet(1, ack_topic))
                    kind, body = await asyncio.wait_for(read_packet(reader), 30)
                    if kind != 0x20 or body[1] != 0:
                        raise ConnectionError(f"CONNACK refused: {body!r}")
                    break
                except (TimeoutError, OSError, asyncio.IncompleteReadError, ConnectionError):
                    self.connect_errors += 1
            await asyncio.sleep(0.5 * 2 ** attempt)
        else:
            return
        self.held += 1
        reading = asyncio.ensure_future(self.read_loop(reader, writer))
        try:
            await asyncio.sleep(max(0.0, p.start_at - time.time()) + random.random() * p.interval)
            end = p.start_at + p.duration
            pid, tick, next_t = 1, 0, time.time()
            phi = self.rng.standard_normal(p.k).astype(np.float32)
            while next_t < end and not reading.done():
                now = time.time()
                data, content_hash = patch_frame(dev, p.fleet, tick, now, phi)
                pid = pid % 65535 + 1
                out = publish_packet(pid, patch_topic, data)
                self.pending[content_hash] = now
                self.sent_hashes.append(content_hash)
                self.patches_sent += 1
                if p.metrics_every and tick % p.metrics_every == 0:
                    met = make_message(Metrics({"train_ms": 12.5, "rss_bytes": 4.0e6, "battery": 0.8}),
                                       device_id=dev, fleet=p.fleet, base_version=BASE, variant_id=VARIANT,
                                       seq=tick, sent_at=now)
                    pid = pid % 65535 + 1
                    out += publish_packet(pid, metrics_topic, encode(met))
                    self.metric_hashes.append(met.content_hash)
                    self.metrics_sent += 1
                writer.write(out)
                tick += 1
                next_t += p.interval
                await asyncio.sleep(max(0.0, next_t - time.time()))
            await asyncio.sleep(max(0.0, end + p.drain_s - time.time()))
        finally:
            reading.cancel()
            writer.close()
            self.held -= 1

    async def read_loop(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                kind, body = await read_packet(reader)
                t = kind & 0xF0
                if t == 0x40:
                    self.pubacks += 1
                elif t == 0x30:  # the companion's PatchAck (QoS 1: acknowledge it)
                    tlen = struct.unpack_from("!H", body)[0]
                    qos = (kind >> 1) & 3
                    payload = body[2 + tlen + (2 if qos else 0):]
                    if qos:
                        writer.write(puback_packet(struct.unpack_from("!H", body, 2 + tlen)[0]))
                    now = time.time()
                    for content_hash, status in ack_entries(payload):
                        self.acks[status] = self.acks.get(status, 0) + 1
                        sent = self.pending.pop(content_hash, None)
                        if sent is not None:
                            self.latencies.append(now - sent)
        except asyncio.CancelledError:
            raise
        except (OSError, asyncio.IncompleteReadError, ValueError, KeyError, IndexError, struct.error):
            self.lost_connections += 1

    async def run(self) -> None:
        p = self.plan
        gate = asyncio.Semaphore(200)
        tasks = []
        sampler = asyncio.ensure_future(self.sample())
        t0 = time.time()
        for i in range(p.count):
            tasks.append(asyncio.ensure_future(self.device(p.first + i, gate)))
            if i % 50 == 49:  # paced on an absolute schedule: a loaded loop does not stretch the ramp
                await asyncio.sleep(max(0.0, t0 + (i + 1) / p.connect_rate - time.time()))
        await asyncio.gather(*tasks)
        sampler.cancel()

    async def sample(self) -> None:
        while True:
            self.held_series.append((round(time.time(), 2), self.held, self.patches_sent))
            await asyncio.sleep(1.0)

    def report(self) -> dict[str, Any]:
        return {"first": self.plan.first, "count": self.plan.count, "connect_errors": self.connect_errors,
                "lost_connections": self.lost_connections, "patches_sent": self.patches_sent,
                "metrics_sent": self.metrics_sent, "pubacks": self.pubacks, "acks": self.acks,
                "unacked": len(self.pending), "held_series": self.held_series}


def run_devices(plan: FleetPlan) -> None:
    """One load-generator process: writes report.json, latencies.npy and the sent hashes to `plan.out`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    check_codec(plan.fleet)
    gen = Generator(plan)
    asyncio.run(gen.run())
    out = Path(plan.out)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "latencies.npy", np.asarray(gen.latencies, dtype=np.float64))
    (out / "patch_hashes.txt").write_text("\n".join(gen.sent_hashes) + "\n")
    (out / "metric_hashes.txt").write_text("\n".join(gen.metric_hashes) + "\n")
    (out / "report.json").write_text(json.dumps(gen.report()))


if __name__ == "__main__":
    import sys

    run_devices(FleetPlan(**json.loads(sys.argv[1])))
