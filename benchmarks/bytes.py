"""Bytes per device per day under issue 13's schedule, against FedAvg of the full model, at measured accuracy.

For each model (the reference CNNs and the MLPerf Tiny models of export/reference_models.py):

1. Data with the model's input shape (docs/bytes.md says which; the MLPerf models have no offline dataset
   at real size, so they get scikit-learn's digits resized to their input — a stand-in, not KWS/VWW/CIFAR).
   Half goes to the cloud (pretraining, the companion's --data), half is split into a long-tailed fleet with
   a per-device sensor shift (data/fleet.py), each device's newest 25 % held out.
2. A LiteRT bundle pretrained on the cloud half (one full variant, no DSE).
3. edgepatch: a real companion (ingest, SQLite, MoMoDistill, republication, HTTP bundle server) on a real
   Mosquitto, and the device runtime (LiteRT, PatchTrainer, link with outbox, fetch, adoption gate) for
   every device in this process. Devices train φ every round; the companion updates the base every R rounds
   (`base_every`). Bytes: every MQTT payload of the fleet counted by a subscriber (demo_bytes.WireBytes), and
   the bundle bytes each device fetched (DeviceRuntime.bytes_downloaded).
4. FedAvg of the full model: the FL server and clients of cloud/fl and device/fl_client.py (strategy
   `fedavg-wait`, LiteRT full-weight steps) over the same broker, on the same devices' training data, from
   the same pretrained weights, for the same rounds and steps per round (SGD, --fedavg-lr). Bytes: the FL server's own record
   of each device's round (global weights blob + round-open message down, update blob + message up).
5. Accuracy: the mean over devices of holdout accuracy — edgepatch's personalized model (final base + the
   device's φ) and FedAvg's final global model, on the same holdout samples.

Per day: measured bytes per round and per base update, times rounds per day (`--rounds-per-day`, 24).

Every model runs once per seed (`--seeds`, default 0 1 2: data split, fleet and pretraining change); a
single seed's holdouts are small (3 devices, 20–70 samples: one sample moves a mean accuracy by 0.005–0.02),
so accuracy is compared on the mean over the seeds, and the byte ratio must hold for every seed.

    python3 benchmarks/bytes.py                     # six models × 3 seeds, ≈ 15 min on an idle 2-core machine
    python3 benchmarks/bytes.py --seeds 0           # one seed, ≈ 5 min
    python3 benchmarks/bytes.py --quick             # digits_cnn, 2 devices, 2 rounds (a smoke test)

Targets (issue 13): ≥ 20× fewer bytes than FedAvg on the MLPerf Tiny models, at equal or better accuracy.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgepatch.demo_bytes import Schedule, WireBytes, per_day
from edgepatch.export.reference_models import MLPERF_MODELS, REFERENCE_MODELS

TARGET_RATIO = 20.0
STAND_INS = {  # MLPerf Tiny model -> (height, width, channels, classes) of digits resized to its input
    "ds_cnn_kws": (49, 10, 1, 12), "mobilenet_v1_vww": (96, 96, 3, 2), "resnet8_cifar": (32, 32, 3, 10)}


def model_data(name: str, max_samples: int) -> tuple[Any, str]:
    """(Dataset with the model's input shape, what it is)."""
    from edgepatch.data.datasets import MODEL_DATASETS, Dataset, dataset_for_model, load_digits, resize_images

    if name in MODEL_DATASETS:
        return dataset_for_model(name), f"offline {MODEL_DATASETS[name]} (the model's own dataset)"
    h, w, c, classes = STAND_INS[name]
    d = load_digits()
    keep = np.sort(np.random.default_rng(0).permutation(len(d.y))[:max_samples])
    x = np.repeat(resize_images(d.x[keep], h, w), c, axis=1)
    y = d.y[keep] >= 5 if classes == 2 else d.y[keep]  # VWW is binary: digits 5-9 stand for "person"
    what = (f"stand-in: {len(keep)} scikit-learn digits resized to {c}x{h}x{w}"
            + (", label = digit >= 5" if classes == 2 else f", labels 0-9 of {classes} classes"))
    return Dataset(x, y.astype(np.int64), d.t[keep], f"digits-{name}", classes), what


def prepare(name: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Data, fleet shards and the pretrained bundle of one model."""
    from edgepatch.data.fleet import base_split, make_fleet, write_device_timeline
    from edgepatch.export.pipeline import ExportOptions, export_bundle
    from edgepatch.export.pretrain import accuracy, pretrain_base
    from edgepatch.export.resolve import load_model
    from edgepatch.protocol.params import save_params

    data, what = model_data(name, args.max_samples)
    cloud, device_part = base_split(data, fraction=0.5, seed=args.seed)
    fleet = make_fleet(device_part, args.devices, alpha=0.5, shift="gain_offset", tail="zipf", seed=args.seed + 3,
                       shift_strength=3.0)
    np.savez(work / "cloud.npz", x=cloud.x, y=cloud.y)
    dirs = {}
    for dev in fleet:
        dirs[dev.device_id] = work / "devices" / dev.device_id / "data"
        write_device_timeline(dev, dirs[dev.device_id])
    source = name if name in REFERENCE_MODELS else f"edgepatch.export.reference_models:{name}"
    t0 = time.perf_counter()
    # Pretrained here and exported with the weights and no data: the exporter would otherwise also measure
    # φ convergence for the DSE, which one full variant does not need (and which is NaN for resnet8_cifar).
    spec, _ = load_model(source, None, use_source_weights=False)
    n_fit = int(0.8 * len(cloud.y))
    weights = pretrain_base(spec, cloud.x[:n_fit], cloud.y[:n_fit], epochs=args.pretrain_epochs, seed=args.seed)
    save_params(work / "weights.npz", weights)
    export_bundle(ExportOptions(model=source, weights=work / "weights.npz", variants="1", runtimes=("litert",),
                                seed=args.seed), work / "bundle-0")
    return {"data": what, "dirs": dirs, "export_s": round(time.perf_counter() - t0, 1),
            "pretrain_heldout_accuracy": round(accuracy(spec, weights, cloud.x[n_fit:], cloud.y[n_fit:]), 3)}


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def run_edgepatch(name: str, prep: dict[str, Any], args: argparse.Namespace, work: Path,
                  broker: tuple[str, int, str]) -> dict[str, Any]:
    from edgepatch.cloud.companion import Companion, CompanionConfig
    from edgepatch.device.adoption import GateSettings
    from edgepatch.device.profile import load_profile
    from edgepatch.device.runtime import DeviceConfig, DeviceRuntime

    host, port, protocol = broker
    fleet = f"bytes-{name.replace('_', '-')}-s{args.seed}"  # one fleet per run: no retained message crosses runs
    companion = Companion(CompanionConfig(bundle=work / "bundle-0", work_dir=work / "cloud", broker_host=host,
                                          broker_port=port, protocol=protocol, fleet=fleet, http_port=0,
                                          distill_after=len(prep["dirs"]), base_every=args.base_every,
                                          runtimes=("litert",), data=work / "cloud.npz", rollout=None,
                                          delta_encoding=None if args.delta == "none" else args.delta))
    companion.start_background()
    wire = WireBytes(host, port, fleet, protocol).start()
    devices: list[DeviceRuntime] = []
    try:
        for device_id, data_dir in prep["dirs"].items():
            cfg = DeviceConfig(device_id=device_id, profile=load_profile("linux_x86_64"),
                               state_dir=work / "devices" / device_id / "state", data_dir=data_dir, fleet=fleet,
                               runtime="litert", broker=f"mqtt://{host}:{port}", mqtt_protocol=protocol,
                               adaptive=False, gate=GateSettings(shadow_steps=args.steps))
            devices.append(DeviceRuntime(cfg, work / "bundle-0"))
        start = [device.trainer.holdout_accuracy() for device in devices]  # the pretrained base, φ = 0
        t0 = time.perf_counter()
        for rnd in range(1, args.rounds + 1):
            for device in devices:
                device.run_round(args.steps)
            if rnd % args.base_every == 0:  # the companion's update of this period, then every device fetches it
                wait_for(lambda r=rnd: len(companion.history) >= r // args.base_every, 600,
                         f"{name}: the base update after round {rnd}")
                for device in devices:
                    device.wait_for_new_bundle(120)
        train_s = time.perf_counter() - t0
        accuracy = [device.trainer.holdout_accuracy() for device in devices]
        for device in devices:
            device.link.wait_drained(30)
        time.sleep(1.0)  # the last acks and metrics reach the counting subscriber
        per_device = []
        for device in devices:
            counted = wire.device(device.cfg.device_id)
            up = sum(v for k, v in counted.items() if k.startswith("up_"))
            acks = sum(v for k, v in counted.items() if k.startswith("down_") and k != "down_bundle_announcements")
            per_device.append({"device": device.cfg.device_id, **counted, "bundle_http": device.bytes_downloaded,
                               "up": up, "acks_down": acks, "base_version": device.bundle.base_version[:12]})
    finally:
        for device in devices:
            device.stop()
        wire.stop()
        companion.stop()
    updates = max(1, len(companion.history))
    announcements = wire.fleet_wide.get("bundle", 0)
    return {"accuracy": float(np.mean(accuracy)), "accuracy_per_device": accuracy, "train_s": round(train_s, 1),
            "accuracy_start": float(np.mean(start)), "base_updates": len(companion.history), "bundle_announcement_bytes": announcements,
            "phi_up_per_round": float(np.mean([d["up"] for d in per_device])) / args.rounds,
            "acks_down_per_round": float(np.mean([d["acks_down"] for d in per_device])) / args.rounds,
            "update_down": (float(np.mean([d["bundle_http"] for d in per_device])) + announcements) / updates,
            "devices": per_device}


def run_fedavg(name: str, prep: dict[str, Any], args: argparse.Namespace, work: Path,
               broker: tuple[str, int, str]) -> dict[str, Any]:
    from edgepatch.cloud.fl.server import Evaluator, FlServer
    from edgepatch.cloud.fl.strategies import make_strategy
    from edgepatch.device.fl_client import DeviceSpec, FlDevice
    from edgepatch.device.runtime import load_local_data
    from edgepatch.protocol.bundle import load_bundle
    from edgepatch.protocol.params import params_to_bytes

    host, port, protocol = broker
    fleet = f"fedavg-{name.replace('_', '-')}-s{args.seed}"
    bundle = load_bundle(work / "bundle-0")
    trace = work / "full-share.csv"  # every device at full speed all the time: no straggler effects
    trace.write_text("t_seconds,cpu_share,free_mb\n0,1.0,4096\n3600,1.0,4096\n")
    specs, holdouts = [], []
    for i, (device_id, data_dir) in enumerate(prep["dirs"].items()):
        local = load_local_data(data_dir, bundle, 0.25)  # the same train/holdout split the device runtime makes
        path = work / "fedavg" / f"{device_id}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, x=local.train_x, y=local.train_y)
        holdouts.append((local.holdout_x, local.holdout_y))
        specs.append(DeviceSpec(device_id, fleet, str(work / "bundle-0"), str(path), "linux_x86_64", 1.0, 1.0,
                                str(trace), 0.0, host, port, protocol, str(work / "fedavg" / "uploads"),
                                args.seed * 1000 + i))
    strategy = make_strategy("fedavg-wait", bundle.model_spec, bundle.manifest.variants, args.seed)
    all_x = np.concatenate([h[0] for h in holdouts])
    all_y = np.concatenate([h[1] for h in holdouts])
    server = FlServer(broker_host=host, broker_port=port, fleet=fleet, bundle=bundle, strategy=strategy,
                      out_dir=work / "fedavg" / "server", expected_devices=[s.device_id for s in specs],
                      evaluator=Evaluator(bundle, all_x, all_y), init_params=bundle.base_params(), deadline_s=600,
                      local_steps=args.steps, lr=args.fedavg_lr, clock_origin=time.time(), mqtt_protocol=protocol)
    server.start()
    stop = threading.Event()
    clients = [FlDevice(spec, stop) for spec in specs]
    threads = [threading.Thread(target=c.run, args=(300.0,), daemon=True) for c in clients]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    try:
        records = server.run(args.rounds)
    finally:
        server.stop("benchmark done")
        for t in threads:
            t.join(60)
    train_s = time.perf_counter() - t0
    full = strategy.eval_variant()
    accuracy = [Evaluator(bundle, hx, hy)(server.params, full)[0] for hx, hy in holdouts]
    per_round = [d.bytes_down + d.bytes_up for r in records for d in r.devices]
    # edgepatch's bundle files travel gzip-compressed; what would gzip save FedAvg? Measured on its final
    # weights file (its blobs are the same kind of fp32 .npz).
    weights = params_to_bytes(server.params)
    gzip_ratio = len(gzip.compress(weights, compresslevel=9, mtime=0)) / len(weights)
    return {"accuracy": float(np.mean(accuracy)), "accuracy_per_device": accuracy, "train_s": round(train_s, 1),
            "per_round": float(np.mean(per_round)), "gzip_ratio": round(gzip_ratio, 4), "contributed": [r.contributed for r in records],
            "dropped": sorted({d.reason for r in records for d in r.devices if d.outcome == "dropped"}),
            "down_per_round": float(np.mean([d.bytes_down for r in records for d in r.devices])),
            "up_per_round": float(np.mean([d.bytes_up for r in records for d in r.devices]))}


def bench_model(name: str, args: argparse.Namespace, root: Path, broker: tuple[str, int, str]) -> dict[str, Any]:
    from edgepatch.protocol.bundle import load_bundle

    work = root / name
    work.mkdir(parents=True)
    prep = prepare(name, args, work)
    with load_bundle(work / "bundle-0") as b:
        fp32 = int(sum(4 * v.size for v in b.all_params().values()))
        fp32_base = int(sum(4 * v.size for v in b.base_params().values()))  # what FedAvg moves: W only
        k = b.patch_spec.k
    ep = run_edgepatch(name, prep, args, work, broker)
    fa = run_fedavg(name, prep, args, work, broker)
    day = per_day(Schedule(args.base_every, args.rounds_per_day), phi_up_per_round=ep["phi_up_per_round"],
                  phi_down_per_round=ep["acks_down_per_round"], update_down=ep["update_down"], update_up=0.0,
                  fedavg_per_round=fa["per_round"])
    day["fedavg_gzip_over_edgepatch"] = round(day["fedavg_per_day"] * fa["gzip_ratio"] / day["edgepatch_per_day"], 2)
    return {"model": name, "mlperf": name in MLPERF_MODELS, "data": prep["data"], "export_s": prep["export_s"],
            "pretrain_heldout_accuracy": prep["pretrain_heldout_accuracy"],
            "fp32_param_bytes": fp32, "fp32_base_bytes": fp32_base, "k": k, "edgepatch": ep, "fedavg": fa, "per_day": day}


def _one_run(name: str, seed: int, args: argparse.Namespace, root: Path, broker: tuple[str, int, str]
             ) -> dict[str, Any]:
    """One model with one seed (data split, fleet, pretraining, both systems); a failure is reported, not raised."""
    run_args = argparse.Namespace(**{**vars(args), "seed": seed})
    root.mkdir(parents=True, exist_ok=True)
    try:
        row = {**bench_model(name, run_args, root, broker), "seed": seed}
    except Exception as exc:  # noqa: BLE001 - one model's failure is reported, the others still run
        print(f"{name} seed {seed}: FAILED {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return {"model": name, "seed": seed, "mlperf": name in MLPERF_MODELS, "error": f"{type(exc).__name__}: {exc}"}
    print(f"{name} seed {seed}: {row['per_day']['fedavg_over_edgepatch']}x fewer bytes, accuracy edgepatch "
          f"{row['edgepatch']['accuracy']:.3f} vs FedAvg {row['fedavg']['accuracy']:.3f}", file=sys.stderr, flush=True)
    return row


def _summary(name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per model over its seeds: the smallest and mean byte ratio, the mean accuracies (holdouts are small:
    a single seed's 3 devices hold 20–70 samples, one sample moves a mean by 0.005–0.02)."""
    ok = [r for r in runs if "error" not in r]
    out: dict[str, Any] = {"model": name, "mlperf": name in MLPERF_MODELS, "seeds": [r["seed"] for r in ok],
                           "failed": len(runs) - len(ok)}
    if ok:
        ratios = [r["per_day"]["fedavg_over_edgepatch"] for r in ok]
        out.update(ratio_min=min(ratios), ratio_mean=round(float(np.mean(ratios)), 2),
                   ratio_gzip_min=min(r["per_day"]["fedavg_gzip_over_edgepatch"] for r in ok),
                   accuracy_edgepatch=round(float(np.mean([r["edgepatch"]["accuracy"] for r in ok])), 4),
                   accuracy_fedavg=round(float(np.mean([r["fedavg"]["accuracy"] for r in ok])), 4),
                   accuracy_start=round(float(np.mean([r["edgepatch"]["accuracy_start"] for r in ok])), 4))
    return out


def _print_table(args: argparse.Namespace, rows: list[dict[str, Any]], summary: list[dict[str, Any]]) -> None:
    print(f"schedule: φ every round, base update every {args.base_every} rounds, {args.rounds_per_day:g} rounds "
          f"a day; {args.devices} devices, {args.rounds} rounds of {args.steps} steps; bytes per device per day")
    print(f"{'model':17} {'seed':>4} {'fp32 B':>9} {'φ up/rnd':>9} {'ack/rnd':>8} {'update B':>9} "
          f"{'edgepatch/day':>14} {'FedAvg/rnd':>11} {'FedAvg/day':>12} {'ratio':>7} {'vs gzip':>7} {'acc start':>9} "
          f"{'acc edgepatch':>14} {'acc FedAvg':>11}")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:17} {r['seed']:>4} failed: {r['error'][:150]}")
            continue
        d, ep, fa = r["per_day"], r["edgepatch"], r["fedavg"]
        print(f"{r['model']:17} {r['seed']:>4} {r['fp32_param_bytes']:>9} {d['phi_up_per_round']:>9.0f} "
              f"{d['phi_down_per_round']:>8.0f} {d['update_down']:>9.0f} {d['edgepatch_per_day']:>14} "
              f"{d['fedavg_per_round']:>11} {d['fedavg_per_day']:>12} {d['fedavg_over_edgepatch']:>6}x "
              f"{d['fedavg_gzip_over_edgepatch']:>6}x {ep['accuracy_start']:>9.3f} {ep['accuracy']:>14.3f} "
              f"{fa['accuracy']:>11.3f}")
    print("over the seeds: smallest ratio (vs gzip), mean accuracy at start / edgepatch / FedAvg")
    for m in summary:
        if "ratio_min" not in m:
            print(f"{m['model']:17} every seed failed")
            continue
        print(f"{m['model']:17} {m['ratio_min']:>7}x ({m['ratio_gzip_min']}x)  {m['accuracy_start']:.3f} / "
              f"{m['accuracy_edgepatch']:.3f} / {m['accuracy_fedavg']:.3f}"
              + (f"  ({m['failed']} seed(s) failed)" if m["failed"] else ""))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=[*REFERENCE_MODELS, *MLPERF_MODELS])
    ap.add_argument("--devices", type=int, default=3)
    ap.add_argument("--base-every", type=int, default=10, help="R: rounds between base updates")
    ap.add_argument("--rounds", type=int, default=10, help="rounds run (a multiple of --base-every)")
    ap.add_argument("--steps", type=int, default=10, help="training steps per device per round (φ / full model)")
    ap.add_argument("--rounds-per-day", type=float, default=24.0)
    ap.add_argument("--fedavg-lr", type=float, default=0.01, help="FedAvg's SGD step (at the simulator's 0.05 "
                    "resnet8_cifar's rounds fail: docs/bytes.md)")
    ap.add_argument("--delta", default="int8", choices=("int8", "float16", "none"),
                    help="how a base update's change travels (cloud serve --delta-encoding)")
    ap.add_argument("--pretrain-epochs", type=int, default=12)
    ap.add_argument("--max-samples", type=int, default=900, help="stand-in dataset size for the MLPerf models")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one full run per seed (data split, "
                    "fleet, pretraining); ratios must hold for every seed, accuracy is compared on the mean")
    ap.add_argument("--quick", action="store_true", help="digits_cnn, 2 devices, R = 2, 2 rounds of 5 steps")
    ap.add_argument("--out", type=Path, default=Path("results/bytes.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.devices, args.base_every, args.rounds, args.steps = ["digits_cnn"], 2, 2, 2, 5
        args.seeds = [0]
        args.pretrain_epochs = 2
    if args.rounds % args.base_every:
        ap.error("--rounds must be a multiple of --base-every (whole base-update periods)")
    from edgepatch.protocol.params import write_atomic
    from edgepatch.sim.brokers import local_broker

    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="edgepatch-bytes-"))
    rows = []
    try:
        with local_broker(root / "broker") as broker:
            for name in args.models:
                for seed in args.seeds:
                    rows.append(_one_run(name, seed, args, root / f"seed{seed}", broker))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    summary = [_summary(name, [r for r in rows if r["model"] == name]) for name in args.models]
    mlperf = [m for m in summary if m["mlperf"]]
    done = [m for m in mlperf if m["failed"] == 0]
    ratio_ok = bool(mlperf) and len(done) == len(mlperf) and all(m["ratio_min"] >= TARGET_RATIO for m in done)
    acc_ok = bool(mlperf) and len(done) == len(mlperf) and all(
        m["accuracy_edgepatch"] >= m["accuracy_fedavg"] for m in done)
    result = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "seconds": round(time.perf_counter() - started, 1), "rows": rows, "summary": summary,
              "targets": {"ratio_ge_20_mlperf": ratio_ok, "accuracy_ge_fedavg_mlperf": acc_ok}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out, (json.dumps(result, indent=1) + "\n").encode())
    _print_table(args, rows, summary)
    print(f"(ratio: FedAvg of the full model in fp32 as it moves; vs gzip: if FedAvg's files were gzip-compressed "
          f"like edgepatch's bundle files; data per model in {args.out}; done in {result['seconds']} s)")
    print(f"targets: >= {TARGET_RATIO:g}x fewer bytes than FedAvg on the MLPerf Tiny models (every seed): "
          f"{'MET' if ratio_ok else 'NOT MET'}; at equal or better accuracy (mean over seeds "
          f"{', '.join(map(str, args.seeds))}): {'MET' if acc_ok else 'NOT MET'}"
          + ("" if mlperf else " (no MLPerf Tiny model was run)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
