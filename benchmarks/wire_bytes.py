"""Compact messages (issue 13 item 3): bytes of a patch message as a binary frame against the JSON envelope,
what the change-only metrics save over a run of rounds, and what decoding each form costs.

    python3 benchmarks/wire_bytes.py                      # k = 16, 64, 1024; 100 metric rounds
    python3 benchmarks/wire_bytes.py --rounds 200 --out results/wire_bytes.json

Patch: the real codec (`make_message` + `encode`) with the ids a fleet really has (a 64-hex base version,
"dev-007", "default", "k100-100"). Metrics: a real `DeviceLink` on the in-memory MQTT twin publishing the
device runtime's round report (holdout_acc, holdout_acc_base, round_seconds, steps) every round; the
readings follow a seeded schedule shaped like a device's (accuracy on a 40-sample holdout moves by one sample
in about a third of the rounds, the base model's accuracy and the step count stay, the round time always
varies), so the saving depends on that schedule and is reported as measured on it, not as a constant.
Decode: median µs of `decode()` over the same message in both forms, side by side in one process.
Acks (down): the companion's PatchAck for one stored patch, one rejected patch (with the reason the ingest
writes) and a batch of 8, as the JSON envelope it used to send and as the frame `ingest_acks.ack_payload`
sends now (sender "cloud", a millisecond-clock seq and a real clock's sent_at, as the ingest writes them).

Targets: a patch message's payload ≤ 4·k + 200 bytes for k = 16, 64, 1024; a one-patch ack ≤ 150 bytes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from edgepatch.cloud.ingest_acks import SENDER, ack_payload
from edgepatch.device.link import DeviceLink, LinkSettings
from edgepatch.device.outbox import Outbox
from edgepatch.protocol.messages import AckEntry, Metrics, PatchAck, PatchUpdate, decode, encode, make_message
from edgepatch.protocol.mqtt import make_client
from edgepatch.protocol.mqtt_memory import MemoryBroker
from edgepatch.protocol.params import write_atomic
from edgepatch.protocol.topics import Channel, device_topic

IDS = {"device_id": "dev-007", "fleet": "default", "base_version": "1f" * 32, "variant_id": "k100-100"}


def patch_sizes(ks: list[int], reps: int) -> list[dict]:
    rows = []
    for k in ks:
        update = PatchUpdate(phi=np.random.default_rng(k).standard_normal(k).astype(np.float32), steps=400,
                             samples=96, holdout_acc=0.8125, loss=0.4137)
        frame = make_message(update, seq=17, **IDS)
        old = make_message(update, seq=17, binary=False, **IDS)
        fb, jb = encode(frame), encode(old)
        topic = frame.topic()
        us = {}
        for name, data in (("frame", fb), ("json", jb)):
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                decode(topic, data)
                times.append(time.perf_counter() - t0)
            us[name] = 1e6 * statistics.median(times)
        rows.append({"k": k, "json_bytes": len(jb), "frame_bytes": len(fb), "target_bytes": 4 * k + 200,
                     "met": len(fb) <= 4 * k + 200, "decode_us_json": round(us["json"], 1),
                     "decode_us_frame": round(us["frame"], 1)})
    return rows


def _median_us(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(1e6 * statistics.median(times), 1)


def ack_sizes(reps: int) -> list[dict]:
    """Bytes of the companion's PatchAck down to one device: the JSON envelope (before) and the frame (after)."""
    rng = np.random.default_rng(13)
    hashes = [bytes(rng.integers(0, 256, 32, dtype=np.uint8)).hex() for _ in range(8)]
    rejected = AckEntry(hashes[0], "rejected", "wrong_size: phi has 15 floats, bundle base '1f1f1f1f1f1f' has k=16")
    cases = (("1 stored", [AckEntry(hashes[0], "stored")]), ("1 rejected", [rejected]),
             ("8 stored", [AckEntry(h, "stored") for h in hashes]))
    topic = device_topic(IDS["fleet"], IDS["device_id"], Channel.ACK)
    seq, sent_at = 1_796_025_025_408, 1_796_025_025.4083927  # as the ingest writes them: ms clock, time.time()
    rows = []
    for label, entries in cases:
        frame = ack_payload(IDS["fleet"], entries, seq, sent_at)
        old = encode(make_message(PatchAck(tuple(entries)), device_id=SENDER, fleet=IDS["fleet"], seq=seq,
                                  sent_at=sent_at, binary=False))
        assert decode(topic, frame).payload.acks == decode(topic, old).payload.acks == tuple(entries)
        rows.append({"acks": label, "json_bytes": len(old), "frame_bytes": len(frame),
                     "decode_us_json": _median_us(lambda d=old: decode(topic, d), reps),
                     "decode_us_frame": _median_us(lambda d=frame: decode(topic, d), reps)})
    return rows


def metric_rounds(rounds: int, full_every: int, work: Path) -> dict:
    """Bytes of the metrics messages a real DeviceLink sends over `rounds` round reports."""
    rng = np.random.default_rng(0)
    correct, out = 30, {}
    reports = []
    for _ in range(rounds):
        if rng.random() < 1 / 3:
            correct = int(np.clip(correct + rng.choice([-1, 1]), 0, 40))
        reports.append({"holdout_acc": correct / 40, "holdout_acc_base": 0.6, "steps": 20.0,
                        "round_seconds": round(float(rng.uniform(1.5, 2.5)), 6)})
    for label, every in (("every_report_full", 0), ("changes_only", full_every)):
        broker = MemoryBroker()
        settings = LinkSettings(fleet=IDS["fleet"], device_id=IDS["device_id"], metrics_full_every=every)
        link = DeviceLink(settings, Outbox(work / f"{label}.sqlite"), base_version=IDS["base_version"],
                          variant_id=IDS["variant_id"], client=make_client(settings.mqtt(), broker))
        sent = [link.publish_metrics(r) for r in reports]
        link.outbox.close()
        msgs = [m for m in sent if m is not None]
        out[label] = {"messages": len(msgs), "values": sum(len(m.payload.values) for m in msgs),
                      "bytes": sum(len(encode(m)) for m in msgs)}
    # Before issue 13: every report in full, as the JSON envelope (the same messages, binary=False).
    json_msgs = [make_message(Metrics(values=r), seq=i, binary=False, **IDS) for i, r in enumerate(reports)]
    out["json_every_report_full"] = {"messages": rounds, "values": 4 * rounds,
                                     "bytes": sum(len(encode(m)) for m in json_msgs)}
    out["saving"] = round(1 - out["changes_only"]["bytes"] / out["json_every_report_full"]["bytes"], 3)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ks", default="16,64,1024")
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--full-every", type=int, default=LinkSettings.metrics_full_every)
    ap.add_argument("--decode-reps", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=Path("results/wire_bytes.json"))
    args = ap.parse_args(argv)
    patches = patch_sizes([int(k) for k in args.ks.split(",")], args.decode_reps)
    with tempfile.TemporaryDirectory(prefix="wire-bytes-") as tmp:
        metrics = metric_rounds(args.rounds, args.full_every, Path(tmp))
    acks = ack_sizes(args.decode_reps)
    met = all(r["met"] for r in patches)
    ack_met = acks[0]["frame_bytes"] <= 150
    result = {"ids": IDS, "patches": patches, "metrics": {"rounds": args.rounds, "full_every": args.full_every,
                                                          **metrics}, "acks": acks,
              "targets": {"patch_le_4k_plus_200": met, "one_patch_ack_le_150": ack_met}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out, (json.dumps(result, indent=1) + "\n").encode())
    print(f"{'k':>5} {'JSON B':>8} {'frame B':>8} {'4k+200':>7} {'decode µs JSON':>15} {'frame':>7}")
    for r in patches:
        print(f"{r['k']:>5} {r['json_bytes']:>8} {r['frame_bytes']:>8} {r['target_bytes']:>7} "
              f"{r['decode_us_json']:>15.1f} {r['decode_us_frame']:>7.1f}")
    print(f"metrics over {args.rounds} round reports")
    print(f"  {'form':38} {'messages':>8} {'values':>7} {'bytes':>8}")
    for label, text in (("json_every_report_full", "JSON, every report in full (before)"),
                        ("every_report_full", "frames, every report in full"),
                        ("changes_only", f"frames, changes only (full every {args.full_every})")):
        m = metrics[label]
        print(f"  {text:38} {m['messages']:>8} {m['values']:>7} {m['bytes']:>8,}")
    print(f"PatchAck down to the device (sender {SENDER!r}, fleet {IDS['fleet']!r})")
    print(f"  {'acks':12} {'JSON B':>8} {'frame B':>8} {'decode µs JSON':>15} {'frame':>7}")
    for r in acks:
        print(f"  {r['acks']:12} {r['json_bytes']:>8} {r['frame_bytes']:>8} {r['decode_us_json']:>15.1f} "
              f"{r['decode_us_frame']:>7.1f}")
    result["per_round_down_bytes"] = {"ack": "1 stored", "before": acks[0]["json_bytes"],
                                      "after": acks[0]["frame_bytes"]}
    k16 = patches[0]
    before = k16["json_bytes"] + metrics["json_every_report_full"]["bytes"] / args.rounds
    after = k16["frame_bytes"] + metrics["changes_only"]["bytes"] / args.rounds
    result["per_round_up_bytes"] = {"k": k16["k"], "before": round(before), "after": round(after)}
    print(f"per device per round up (patch k={k16['k']} + metrics): {before:,.0f} B before, {after:,.0f} B after "
          f"({before / after:.1f}× fewer); metrics {100 * metrics['saving']:.0f} % fewer bytes than before")
    write_atomic(args.out, (json.dumps(result, indent=1) + "\n").encode())
    print(f"(results in {args.out})")
    print(f"target: patch payload <= 4·k + 200 bytes for k = {args.ks}: {'MET' if met else 'NOT MET'}")
    print(f"target: one-patch ack <= 150 bytes: {'MET' if ack_met else 'NOT MET'} ({acks[0]['frame_bytes']} B)")
    return 0 if met and ack_met else 1


if __name__ == "__main__":
    raise SystemExit(main())
