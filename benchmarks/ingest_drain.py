"""Ingest CPU per patch (issue 12, fleet load): the cost of the companion's ingest alone, without load generators
competing for the cores, so the figure means something even on a shared machine.

A real Mosquitto (started here) queues N messages (5 patches : 1 metrics, 1,000 devices, the device codec's
payloads) for the ingest's persistent shared-subscription session (MQTT 5, or 3.1.1 with `--protocol 3.1.1`:
Mosquitto shares for 3.1.1 clients too, and paho's 3.1.1 receive path skips property parsing) while the
ingest is away; then one
IngestService (in this process) drains them into PostgreSQL (fresh tables, dropped afterwards), with PatchAcks
to the devices' topics as in production. Measured: this process's CPU seconds (all threads: MQTT client,
validation, batching, acks, the store writer) per stored patch, wall rate, batch count, the largest arrival
backlog (bounded by `arrival_bound`).

    python3 benchmarks/ingest_drain.py [--messages 12000] [--repeat 3] [--protocol 5|3.1.1]

Budget: 5,000 stored patches/s on 2 cores leaves ~400 µs of CPU per patch for everything (load generators,
broker, PostgreSQL, ingest); the ingest's share must stay well under that.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import struct
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from edgepatch.cloud.ingest import IngestService, IngestSettings
from edgepatch.cloud.metrics import CloudMetrics
from edgepatch.cloud.store import PatchStore
from edgepatch.protocol.messages import Metrics, PatchUpdate, encode, make_message
from edgepatch.sim.brokers import MosquittoBroker

PG_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
FLEET = "drain"
BUDGET_US = 200  # the ingest's share of the ~400 µs per patch that 5,000/s on 2 cores allows in all


def _packet(kind: int, body: bytes) -> bytes:
    n, out = len(body), bytearray([kind])
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out) + body


def _utf8(s: str) -> bytes:
    return struct.pack("!H", len(s.encode())) + s.encode()


def messages(n: int) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        dev = f"d{i % 1000:06d}"
        if i % 6 == 5:
            m = make_message(Metrics({"train_ms": 12.5, "rss_bytes": 4.0e6, "battery": 0.8}), device_id=dev,
                             fleet=FLEET, base_version="b1", variant_id="v100", seq=i, sent_at=time.time())
        else:
            m = make_message(PatchUpdate(phi=rng.standard_normal(16).astype(np.float32), steps=i, samples=32,
                                         holdout_acc=0.5, loss=0.1), device_id=dev, fleet=FLEET, base_version="b1",
                             variant_id="v100", seq=i, sent_at=time.time())
        out.append((m.topic(), encode(m)))
    return out


def queue_at_broker(broker: MosquittoBroker, msgs: list[tuple[str, bytes]]) -> None:
    """Publish everything at QoS 1 over one raw MQTT 3.1.1 connection and wait for every PUBACK."""
    with socket.create_connection((broker.host, broker.port)) as s:
        body = _utf8("MQTT") + bytes([4, 0x02]) + struct.pack("!H", 60) + _utf8("drain-publisher")
        s.sendall(_packet(0x10, body))
        s.recv(4)
        s.sendall(b"".join(_packet(0x32, _utf8(t) + struct.pack("!H", i % 65535 + 1) + p)
                           for i, (t, p) in enumerate(msgs)))
        got = 0
        while got < 4 * len(msgs):
            chunk = s.recv(65536)
            if not chunk:
                raise RuntimeError("broker closed the publisher's connection")
            got += len(chunk)


class _Counting:
    """The ingest's arrival queue, noting the largest backlog it held."""

    def __init__(self, q: Any) -> None:
        self.q, self.max = q, 0

    def put(self, item: Any) -> None:
        self.max = max(self.max, self.q.qsize() + 1)
        self.q.put(item)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.q, name)


def drain_once(store_url: str, n: int, max_batch: int, protocol: str = "5") -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="edgepatch-drain-"))
    broker = MosquittoBroker(work / "broker", persistence=False, settings={
        "max_queued_messages": "1000000", "max_inflight_messages": "1000"}).start()
    store = PatchStore(store_url, table_prefix=f"dr{uuid.uuid4().hex[:10]}_")
    try:
        settings = IngestSettings(host=broker.host, port=broker.port, fleet=FLEET, max_batch=max_batch,
                                  inflight_window=1000, client_id="ingest-drain", protocol=protocol,
                                  shared=True)  # as fleet_load runs it
        first = IngestService(store, settings, metrics=CloudMetrics())
        first.start()
        if not first.wait_subscribed(10):
            raise RuntimeError("ingest did not subscribe")
        first.stop()  # the persistent session queues what follows
        msgs = messages(n)
        patches = sum(1 for t, _ in msgs if t.endswith("/patch"))
        queue_at_broker(broker, msgs)
        service = IngestService(store, settings, metrics=CloudMetrics())
        counting = _Counting(service._arrivals)
        service._arrivals = counting  # type: ignore[assignment]
        c0, t0 = time.process_time(), time.perf_counter()
        service.start()
        deadline = time.monotonic() + 600
        while store.count("patches") < patches and time.monotonic() < deadline:
            time.sleep(0.05)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        service.stop()
        stored = store.count("patches")
        return {"protocol": settings.protocol.value, "messages": n, "patches": patches, "stored": stored, "wall_s": round(wall, 2),
                "stored_per_s": round(stored / wall, 1), "cpu_s": round(cpu, 2),
                "cpu_us_per_patch": round(cpu / max(stored, 1) * 1e6, 1), "batches": service.stats.batches,
                "max_arrival_backlog": counting.max, "arrival_bound": service.arrival_bound,
                "app_acks": service.stats.app_acks}
    finally:
        broker.kill()
        store.drop_all()
        store.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=12000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--max-batch", type=int, default=500)
    ap.add_argument("--store", default=PG_URL)
    ap.add_argument("--protocol", default="5", help="the ingest's MQTT version: 5 (shared subscription) or 3.1.1")
    ap.add_argument("--out", type=Path, default=Path("results/ingest_drain.json"))
    args = ap.parse_args(argv)
    load_before = os.getloadavg()
    runs = [drain_once(args.store, args.messages, args.max_batch, args.protocol) for _ in range(args.repeat)]
    median = statistics.median(r["cpu_us_per_patch"] for r in runs)
    ok = all(r["stored"] == r["patches"] for r in runs) and median <= BUDGET_US
    report = {"benchmark": "ingest_drain", "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "cpus": os.cpu_count(),
              "runs": runs, "median_cpu_us_per_patch": median, "budget_us": BUDGET_US, "targets_met": ok}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(args.out)
    print("| run | stored / patches | wall s | stored/s | CPU µs per patch | batches | max backlog (bound) |")
    for i, r in enumerate(runs):
        print(f"| {i} | {r['stored']} / {r['patches']} | {r['wall_s']} | {r['stored_per_s']} | {r['cpu_us_per_patch']}"
              f" | {r['batches']} | {r['max_arrival_backlog']} ({r['arrival_bound']}) |")
    print(f"load average before/after: {load_before[0]:.1f} / {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"written {args.out}")
    print(f"targets met: {'yes' if ok else 'no'} (median {median} µs CPU per stored patch, budget {BUDGET_US})")
    return 0 if all(r["stored"] == r["patches"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
