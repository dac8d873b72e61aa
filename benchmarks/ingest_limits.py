"""The companion's ingest and web server under the faults of issue 12 items 2-3, with real parts: a Mosquitto
started here, the ingest (`IngestService`, ack after commit) in this process on SQLite or PostgreSQL, paho
publishers in a subprocess, raw sockets for the HTTP flood.

Rows:
  rejects      N junk messages of 61.6 kB each (valid JSON, no schema): how much the store grew
  poison       valid patches with seq = 2^31 / 2^53 and NUL / wrong-k / unknown-base patches in one stream:
               stored, rejected, commit failures, redelivered on a restart of the same session
  oversize_*   one 255 MiB publish (the MQTT maximum is just under 256 MiB), then a valid patch: the ingest process's peak RSS growth, and whether the
               valid patch still arrived (MQTT 5 Maximum Packet Size: the broker drops the big one; MQTT
               3.1.1 has no such property: the message reaches the client and is refused by its size)
  idle_http    400 idle HTTP connections: threads added, idle held, time to answer a request meanwhile

    python3 benchmarks/ingest_limits.py [--store postgres] [--rejects 1000] [--out results/ingest_limits.json]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from edgepatch.cloud.ingest import IngestService, IngestSettings
from edgepatch.cloud.ingest_policy import IngestPolicy
from edgepatch.cloud.metrics import CloudMetrics
from edgepatch.cloud.store import PatchStore
from edgepatch.cloud.web import FleetWeb
from edgepatch.protocol.messages import (
    PatchUpdate,
    canonical_bytes,
    content_hash_of,
    encode,
    make_message,
    to_json,
)
from edgepatch.protocol.topics import Channel, device_topic
from edgepatch.sim.brokers import MosquittoBroker

FLEET, K = "lab", 16
PG_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"

# Publishes (topic, payload file) pairs at QoS 1 and waits for every PUBACK; a separate process so the
# payloads (up to 256 MiB) never count in the ingest's memory.
PUBLISHER = """
import sys, json, paho.mqtt.client as mqtt
port, listing = int(sys.argv[1]), json.load(open(sys.argv[2]))
c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="bench-pub", protocol=mqtt.MQTTv5)
c.max_inflight_messages_set(100); c.max_queued_messages_set(0)
c.connect("127.0.0.1", port); c.loop_start()
infos = [c.publish(t, open(p, "rb").read(), qos=1) for t, p in listing]
for i in infos: i.wait_for_publish(120)
c.disconnect(); c.loop_stop()
"""


def patch(device: str, seq: int, k: int = K, base: str = "b1") -> Any:
    return make_message(PatchUpdate(phi=np.full(k, 0.5, np.float32), steps=1, samples=1, holdout_acc=0.5, loss=0.1),
                        device_id=device, fleet=FLEET, base_version=base, variant_id="v", seq=seq)


def publish(port: int, items: list[tuple[str, bytes | Path]], work: Path) -> None:
    """Publish (topic, payload or payload file) from a subprocess, waiting for every PUBACK."""
    listing = []
    for i, (topic, payload) in enumerate(items):
        path = payload if isinstance(payload, Path) else work / f"msg-{i}.bin"
        if not isinstance(payload, Path):
            path.write_bytes(payload)
        listing.append((topic, str(path)))
    (work / "listing.json").write_text(json.dumps(listing))
    subprocess.run([sys.executable, "-c", PUBLISHER, str(port), str(work / "listing.json")], check=True, timeout=600)
    for _, path in listing:
        Path(path).unlink()


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def open_store(kind: str, work: Path) -> PatchStore:
    if kind == "postgres":
        s = PatchStore(PG_URL, table_prefix=f"bench{uuid.uuid4().hex[:8]}_")
    else:
        s = PatchStore(work / "store.db")
    s.add_bundle("m1", "ab" * 32, "http://x/", base_version="b1", k=K)
    return s


def store_bytes(store: PatchStore, work: Path) -> int:
    if store.dialect == "postgresql":
        with store.engine.connect() as conn:
            return sum(int(conn.exec_driver_sql(f"SELECT pg_total_relation_size('{t.name}')").scalar_one())
                       for t in store.t.values())
    return sum(p.stat().st_size for p in work.glob("store.db*"))


def ingest(store: PatchStore, broker: MosquittoBroker, protocol: str = "5") -> IngestService:
    settings = IngestSettings(port=broker.port, fleet=FLEET, client_id=f"bench-ingest-{protocol}", protocol=protocol)
    s = IngestService(store, settings, metrics=CloudMetrics(), policy=IngestPolicy(store))
    s.start()
    assert s.wait_subscribed(10)
    return s


def wait_for(cond: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.05)
    return bool(cond())


def row_rejects(store: PatchStore, broker: MosquittoBroker, work: Path, n: int) -> dict[str, Any]:
    junk = json.dumps({"junk": "x" * 61_600}).encode()
    svc = ingest(store, broker)
    before = store_bytes(store, work)
    t0 = time.monotonic()
    publish(broker.port, [(device_topic(FLEET, f"dev-{i % 50}", Channel.PATCH), junk) for i in range(n)], work)
    ok = wait_for(lambda: svc.stats.rejected >= n, 120)
    seconds = time.monotonic() - t0
    svc.stop()
    grown = store_bytes(store, work) - before
    return {"scenario": "rejects", "sent": n, "rejected": svc.stats.rejected, "all_acked": ok,
            "payload_mb": round(n * len(junk) / 1e6, 1), "store_growth_mb": round(grown / 1e6, 2),
            "seconds": round(seconds, 2)}


def row_poison(store: PatchStore, broker: MosquittoBroker, work: Path) -> dict[str, Any]:
    env = to_json(patch("dev-nul", 1))
    env["base_version"] = "b1\x00x"
    env["content_hash"] = content_hash_of(env)
    valid = [patch(f"dev-{i}", i) for i in range(200)] + [patch("dev-big", 2**31), patch("dev-huge", 2**53)]
    bad = [(device_topic(FLEET, "dev-nul", Channel.PATCH), canonical_bytes(env)),
           (patch("dev-k", 1, k=K + 1).topic(), encode(patch("dev-k", 1, k=K + 1))),
           (patch("dev-b", 1, base="nope").topic(), encode(patch("dev-b", 1, base="nope")))]
    items = [(m.topic(), encode(m)) for m in valid[:100]] + bad + [(m.topic(), encode(m)) for m in valid[100:]]
    svc = ingest(store, broker)
    publish(broker.port, items, work)
    wait_for(lambda: svc.stats.acked >= len(items), 60)
    svc.stop()
    again = ingest(store, broker)  # the same persistent session: anything not acknowledged comes back
    time.sleep(2)
    again.stop()
    stored = len(set(store.patch_hashes()) & {m.content_hash for m in valid})
    return {"scenario": "poison", "sent": len(items), "valid_stored": f"{stored}/{len(valid)}",
            "rejected": svc.stats.rejected, "quarantined": svc.stats.quarantined,
            "commit_failures": svc.stats.commit_failures,
            "redelivered": again.stats.accepted + again.stats.rejected}


def row_oversize(store: PatchStore, broker: MosquittoBroker, work: Path, protocol: str) -> dict[str, Any]:
    svc = ingest(store, broker, protocol)
    big = work / "big.bin"
    with open(big, "wb") as fh:  # written in chunks: the benchmark itself never holds it
        for _ in range(255):
            fh.write(b"x" * (1 << 20))
    rss0 = peak_rss_mb()
    last = patch(f"dev-after-{protocol.replace('.', '')}", 1)
    publish(broker.port, [(device_topic(FLEET, "dev-x", Channel.PATCH), big), (last.topic(), encode(last))], work)
    arrived = wait_for(lambda: last.content_hash in store.patch_hashes(), 30)
    svc.stop()
    return {"scenario": f"oversize_mqtt{protocol}", "sent": 2, "payload_mb": 255, "peak_rss_growth_mb": round(peak_rss_mb() - rss0, 1),
            "valid_after_stored": arrived, "oversize_seen": svc.stats.reject_reasons.get("oversize", 0)}


def row_idle_http(store: PatchStore) -> dict[str, Any]:
    web = FleetWeb(store, CloudMetrics(), workers=8)
    web.start()
    urllib.request.urlopen(f"{web.url}/metrics", timeout=5).read()
    threads0 = threading.active_count()
    socks = [socket.create_connection(("127.0.0.1", web.port), timeout=5) for _ in range(400)]
    wait_for(lambda: web.server is not None and web.server.idle_connections >= 400, 10)
    t0 = time.monotonic()
    status = urllib.request.urlopen(f"{web.url}/api/fleet", timeout=10).status
    ms = (time.monotonic() - t0) * 1000
    row = {"scenario": "idle_http", "connections": 400, "idle_held": web.server.idle_connections if web.server else 0,
           "threads_added": threading.active_count() - threads0, "answer_status": status,
           "answer_ms": round(ms, 1)}
    for s in socks:
        s.close()
    web.stop()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite")
    ap.add_argument("--rejects", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=Path("results/ingest_limits.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        broker = MosquittoBroker(work / "broker")
        broker.start()
        store = open_store(args.store, work)
        try:
            rows = [row_rejects(store, broker, work, args.rejects), row_poison(store, broker, work),
                    row_oversize(store, broker, work, "5"), row_oversize(store, broker, work, "3.1.1"),
                    row_idle_http(store)]
        finally:
            broker.kill()
            if store.dialect == "postgresql":
                store.drop_all()
            store.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"store": args.store, "rows": rows}, indent=2) + "\n")
    for row in rows:
        print(f"{row['scenario']:<19} " + "  ".join(f"{k}={v}" for k, v in row.items() if k != "scenario"))


if __name__ == "__main__":
    main()
