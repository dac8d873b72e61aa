"""Ingest throughput end to end: N publisher processes -> Mosquitto -> ingest worker(s) -> SQLite store.

Real parts only: a Mosquitto started here on a free loopback port (persistence on), publishers are paho
clients in separate processes sending pre-encoded PatchUpdate messages (k=16 floats) at QoS 1, the ingest
runs as `python -m edgepatch.cloud.ingest` subprocess(es) (SQLite WAL, synchronous=FULL, ack after commit).

Sustained rate = messages / (time from the first publish to the moment the store holds all of them).
"Nothing lost" = the store's patch count equals the number sent, and the stored hashes are exactly the sent
ones.

    python3 benchmarks/ingest.py [--publishers 2] [--messages 20000] [--out results/ingest.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt

from edgepatch.cloud.store import PatchStore
from edgepatch.protocol.messages import PatchUpdate, encode, make_message
from edgepatch.sim.brokers import MosquittoBroker


def publisher(port: int, index: int, count: int, k: int, start_at: float, out: Any) -> None:
    """One device-fleet process: pre-encodes its messages, then publishes them as fast as PUBACKs allow."""
    payloads = []
    for i in range(count):
        dev = f"dev-{index}-{i % 50}"
        m = make_message(PatchUpdate(phi=np.full(k, i, dtype=np.float32), steps=i, samples=32, holdout_acc=0.5,
                                     loss=0.1), device_id=dev, fleet="bench", base_version="b1", variant_id="v",
                         seq=i, sent_at=1.7e9 + i)
        payloads.append((m.topic(), encode(m), m.content_hash))
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{index}",
                         protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(200)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    while time.time() < start_at:
        time.sleep(0.001)
    t0 = time.time()
    infos = [client.publish(topic, data, qos=1) for topic, data, _ in payloads]
    for info in infos:
        info.wait_for_publish(120)
    t1 = time.time()
    client.disconnect()
    client.loop_stop()
    out.put({"index": index, "sent": count, "t0": t0, "t1": t1, "hashes": [h for _, _, h in payloads]})


def run(protocol: str, publishers: int, messages: int, k: int, workers: int, max_inflight: int,
        max_batch: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="edgepatch-ingest-bench-") as tmp:
        work = Path(tmp)
        broker = MosquittoBroker(work / "mosquitto", settings={"max_queued_messages": "1000000",
                                                               "max_inflight_messages": str(max_inflight)}).start()
        port = broker.port
        db = work / "store.db"
        store = PatchStore(db)
        ingests = []
        try:
            for w in range(workers):
                ready = work / f"ready-{w}"
                ingests.append(subprocess.Popen(
                    [sys.executable, "-m", "edgepatch.cloud.ingest", "--store", str(db), "--port", str(port),
                     "--protocol", protocol, "--worker", f"w{w}", "--fleet", "bench", "--ready-file", str(ready),
                     "--inflight-window", str(max_inflight), "--max-batch", str(max_batch),
                     "--stats-file", str(work / f"stats-{w}.json"), "--log-level", "WARNING"]))
                deadline = time.monotonic() + 30
                while not ready.exists():
                    if time.monotonic() > deadline:
                        raise RuntimeError("ingest did not subscribe")
                    time.sleep(0.05)
            per = messages // publishers
            q: Any = mp.get_context("fork").Queue()
            start_at = time.time() + 3.0  # publishers pre-encode meanwhile
            procs = [mp.get_context("fork").Process(target=publisher, args=(port, i, per, k, start_at, q))
                     for i in range(publishers)]
            for p in procs:
                p.start()
            results = [q.get(timeout=600) for _ in procs]
            for p in procs:
                p.join()
            sent = sum(r["sent"] for r in results)
            t_first = min(r["t0"] for r in results)
            pub_done = max(r["t1"] for r in results)
            deadline = time.monotonic() + 120
            stored = store.count("patches")
            while stored < sent and time.monotonic() < deadline:
                time.sleep(0.005)
                stored = store.count("patches")
            t_stored = time.time()
            for proc in ingests:
                proc.terminate()
                proc.wait(30)
            stats = [json.loads((work / f"stats-{w}.json").read_text()) for w in range(workers)]
            sent_hashes = sorted(h for r in results for h in r["hashes"])
            exact = sorted(store.patch_hashes()) == sent_hashes
            return {
                "protocol": protocol, "publishers": publishers, "ingest_workers": workers, "k": k,
                "broker_max_inflight": max_inflight, "max_batch": max_batch, "sent": sent,
                "stored": store.count("patches"), "stored_exactly_sent": exact,
                "publish_seconds": round(pub_done - t_first, 3),
                "end_to_end_seconds": round(t_stored - t_first, 3),
                "publish_msgs_per_s": round(sent / (pub_done - t_first), 1),
                "sustained_msgs_per_s": round(sent / (t_stored - t_first), 1),
                "batches": sum(s["batches"] for s in stats),
                "mean_batch": round(sum(s["accepted"] for s in stats) / max(1, sum(s["batches"] for s in stats)), 1),
                "duplicates": sum(s["duplicates"] for s in stats),
            }
        finally:
            for proc in ingests:
                if proc.poll() is None:
                    proc.kill()
            broker.kill()
            store.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--publishers", type=int, default=2)
    ap.add_argument("--messages", type=int, default=20000, help="total over all publishers")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=500)
    ap.add_argument("--out", type=Path, default=Path("results/ingest.json"))
    ap.add_argument("--configs", default="mqttv5:1:1000,mqttv311:1:20,mqttv5:2:1000",
                    help="protocol:workers:broker_max_inflight, comma separated")
    args = ap.parse_args()
    rows = []
    for cfg in args.configs.split(","):
        protocol, workers, inflight = cfg.split(":")
        row = run(protocol, args.publishers, args.messages, args.k, int(workers), int(inflight), args.max_batch)
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = {"benchmark": "ingest", "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                                 "platform": platform.platform()},
              "store": "sqlite (WAL, synchronous=FULL)", "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    cols = ["protocol", "ingest_workers", "broker_max_inflight", "sent", "stored", "stored_exactly_sent",
            "publish_msgs_per_s", "sustained_msgs_per_s", "mean_batch", "duplicates"]
    print("\n" + " | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
