"""What application-level acks (issue 12) cost the ingest: patches/s with and without them.

Real parts: a Mosquitto started here, the ingest as `python -m edgepatch.cloud.ingest` (SQLite), 2 paho
publishers sending pre-encoded patches of `--devices` device ids at QoS 1; rate = patches / time until the
store holds all of them. Runs alternate (on, off, on, off, ...) so machine load hits both alike.

    python3 benchmarks/ack_cost.py [--patches 6000] [--devices 300] [--reps 2] [--out results/ack_cost.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt

from edgepatch.cloud.store import PatchStore
from edgepatch.protocol.messages import PatchUpdate, encode, make_message
from edgepatch.sim.brokers import MosquittoBroker


def one_run(app_acks: bool, payloads: list[tuple[str, bytes]], timeout_s: float = 300.0) -> float:
    work = Path(tempfile.mkdtemp(prefix="edgepatch-ackcost-"))
    broker = MosquittoBroker(work / "broker", settings={"max_inflight_messages": "1000"}).start()
    db, ready = work / "store.db", work / "ready"
    proc = subprocess.Popen([sys.executable, "-m", "edgepatch.cloud.ingest", "--store", str(db), "--port",
                             str(broker.port), "--client-id", "ingest-ackcost", "--fleet", "lab", "--ready-file",
                             str(ready), "--log-level", "WARNING", *([] if app_acks else ["--no-app-acks"])])
    clients: list[mqtt.Client] = []
    try:
        while not ready.exists():
            if proc.poll() is not None:
                raise RuntimeError("the ingest exited before subscribing")
            time.sleep(0.05)
        store = PatchStore(db)

        def publish(part: int) -> None:
            c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
            c.max_inflight_messages_set(200)
            c.max_queued_messages_set(0)
            c.connect(broker.host, broker.port)
            c.loop_start()
            clients.append(c)
            for topic, payload in payloads[part::2]:
                c.publish(topic, payload, qos=1)

        t0 = time.monotonic()
        for part in range(2):
            threading.Thread(target=publish, args=(part,), daemon=True).start()
        while store.count("patches") < len(payloads):
            if time.monotonic() - t0 > timeout_s:
                raise RuntimeError(f"only {store.count('patches')} of {len(payloads)} stored in {timeout_s} s")
            time.sleep(0.05)
        rate = len(payloads) / (time.monotonic() - t0)
        store.close()
        return rate
    finally:
        for c in clients:
            c.disconnect()
            c.loop_stop()
        proc.terminate()
        proc.wait(15)
        broker.kill()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patches", type=int, default=6000)
    ap.add_argument("--devices", type=int, default=300)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("results/ack_cost.json"))
    args = ap.parse_args(argv)
    payloads = []
    for i in range(args.patches):
        device = f"dev-{i % args.devices}"
        msg = make_message(PatchUpdate(np.full(16, i, np.float32), i, 32, 0.5, 0.1), device_id=device, fleet="lab",
                           base_version="b1", variant_id="v50", seq=i)
        payloads.append((msg.topic(), encode(msg)))
    rates: dict[str, list[float]] = {"app acks on": [], "app acks off": []}
    for _ in range(args.reps):
        for on in (True, False):
            rate = one_run(on, payloads)
            rates["app acks on" if on else "app acks off"].append(round(rate))
            print(json.dumps({"app_acks": on, "patches_per_s": round(rate)}), flush=True)
    report = {"benchmark": "ack_cost", "patches": args.patches, "devices": args.devices, "rates": rates}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for name, values in rates.items():
        print(f"{name:13s} median {statistics.median(values):7.0f} patches/s  runs {values}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
