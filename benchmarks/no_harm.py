"""Do no harm (issue 10): does any model update make a device worse, with the gates on and off?

Per fleet (digits + digits_cnn, mnist1d + sensor_cnn, scikit-learn breast cancer + a user's 1-D CNN — the BYO
e2e test's dataset and model), per seed: the cloud keeps half of the data (untransformed; 20 % of it held
out for the cloud gate when gates are on), the rest is split over `--devices` devices with Dirichlet label
skew and a per-device gain/offset shift, each with its own time-ordered holdout (device/runtime.py). Then
`--rounds` cloud rounds: every device trains φ in its real LiteRT runtime (`--steps` steps), the cloud runs
MoMoDistill on the uploaded φ (cloud data: its train part) and republishes, and the bundle is offered:
- gates off: every device installs it and keeps its φ (what devices did before issue 10);
- gates on: cloud gate on the held-out split, then 2 canaries (10 %, at least 2) run their adoption gate
  (device/adoption.py: shadow-fit, three options, one-sample tolerance); promoted to the others only if no
  canary rejected it, else withdrawn. Devices serve φ only while it beats φ = 0.
Reported per fleet (over seeds and devices): the worst change of a device's served holdout accuracy at any
update (also in holdout samples), the mean personalized (served) accuracy at the end, the base model (the
first bundle, φ = 0) and the majority-class baseline ("always my most common training class"). Targets with
gates on: no device worse by more than one holdout sample at any update; mean personalized accuracy above
both baselines on every fleet. The last line says whether they are met. Exports are done once per fleet
(seed 0; FiLM patches plus a head-bias patch unless --no-head-bias, so φ can carry a device's label prior)
and cached under --work (tmpfs by default). Timing: one torch thread, phases per run printed, wall and CPU
seconds and the load average in the JSON.

    python3 benchmarks/no_harm.py [--seeds 0 1 2] [--rounds 3] [--devices 6] [--steps 40]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgepatch.cloud.momodistill import CloudData, DeviceContribution, DistillConfig, run_aggregator
from edgepatch.cloud.rollout import base_logits, choose_canaries, cloud_gate, split_heldout
from edgepatch.data.datasets import Dataset, dataset_for_model
from edgepatch.data.fleet import base_split, make_fleet, write_device_timeline
from edgepatch.device.adoption import GateSettings, served_accuracy
from edgepatch.device.profile import load_profile
from edgepatch.device.runtime import DeviceConfig, DeviceRuntime
from edgepatch.protocol.bundle import load_bundle

BYO_SPEC = '''
from edgepatch.protocol.model_spec import LayerSpec as L, ModelSpec


def tiny1d() -> ModelSpec:
    return ModelSpec("tiny1d", (3, 10), 2, (
        L("conv1d", "c1", out=16, kernel=3), L("relu", "a1"),
        L("conv1d", "c2", out=16, kernel=3), L("relu", "a2"),
        L("flatten", "f"), L("dense", "head", out=2)))
'''


def breast_cancer() -> Dataset:
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    x = bunch.data.astype(np.float64)
    x = ((x - x.mean(axis=0)) / x.std(axis=0)).reshape(-1, 3, 10).astype(np.float32)
    return Dataset(x, bunch.target.astype(np.int64), np.arange(len(x), dtype=np.float64), "breast_cancer", 2)


@dataclass(frozen=True)
class Fleet:
    name: str
    model: str  # reference model id, or "file.py:attr" written under the work dir


FLEETS = (Fleet("digits", "digits_cnn"), Fleet("mnist1d", "sensor_cnn"), Fleet("breast_cancer", "byo"))


def fleet_data(fleet: Fleet) -> Dataset:
    return breast_cancer() if fleet.model == "byo" else dataset_for_model(fleet.model)


def export_once(fleet: Fleet, work: Path, cloud: Dataset, head_bias: bool) -> Path:
    from edgepatch.export.pipeline import ExportOptions, export_bundle

    out = work / "bundles" / f"{fleet.name}{'-hb' if head_bias else ''}"
    if (out / "manifest.json").exists():
        return out
    model = fleet.model
    opts: dict[str, Any] = {}
    if model == "byo":
        work.mkdir(parents=True, exist_ok=True)
        (work / "tiny1d_spec.py").write_text(BYO_SPEC)
        sys.path.insert(0, str(work))
        model = f"{work / 'tiny1d_spec.py'}:tiny1d"
        np.savez(work / "byo_cloud.npz", x=cloud.x, y=cloud.y)
        opts = {"data": work / "byo_cloud.npz", "pretrain": True}
    # Devices train the full variant (adaptive=False), so one variant; its convergence is not used here.
    export_bundle(ExportOptions(model=model, variants="1", runtimes=("litert",), pretrain_epochs=8,
                                head_bias=head_bias, dse_steps=5, dse_seeds=(0,), **opts), out)
    return out


@contextmanager
def timed(acc: dict[str, float], key: str) -> Iterator[None]:
    t = time.perf_counter()
    try:
        yield
    finally:
        acc[key] += time.perf_counter() - t


def offer(device: DeviceRuntime, bundle_dir: Path, gates: bool) -> tuple[float, float, bool]:
    """Offer a bundle as apply_announcement does after the fetch; (served acc before, after, adopted)."""
    before = served(device, gates)
    if gates:
        with load_bundle(bundle_dir) as b:
            version = b.version
        device.adoption.stage(bundle_dir, version)
        decision = device._gate_pending()
        adopted = bool(decision and decision.adopt)
    else:
        device._activate(device.bundles.install(bundle_dir))
        adopted = True
    return before, served(device, gates), adopted


def served(device: DeviceRuntime, gates: bool) -> float:
    """What the device's predictions score on its holdout: with gates, φ only while it beats φ = 0."""
    if gates:
        return served_accuracy(device.trainer, device.trainer.phi)
    acc = device.trainer.holdout_accuracy()
    return 0.0 if np.isnan(acc) else acc


def run_one(fleet: Fleet, bundle0: Path, dataset: Dataset, seed: int, gates: bool, args: argparse.Namespace,
            work: Path) -> dict[str, Any]:
    from edgepatch.cloud.republish import republish_bundle

    cloud, device_part = base_split(dataset, fraction=0.5, seed=0)  # the export's cloud half (seed 0)
    cx, cy = cloud.x, cloud.y
    heldout = None
    if gates:
        (cx, cy), heldout = split_heldout(cx, cy, 0.2, seed)
    fleet_devs = make_fleet(device_part, args.devices, alpha=0.5, shift="gain_offset", tail="uniform",
                            seed=seed + 3, shift_strength=2.0)
    root = work / "runs" / f"{fleet.name}-s{seed}-{'on' if gates else 'off'}"
    shutil.rmtree(root, ignore_errors=True)
    devices: dict[str, DeviceRuntime] = {}
    for d in fleet_devs:
        write_device_timeline(d, root / d.device_id / "data")
        cfg = DeviceConfig(device_id=d.device_id, profile=load_profile("linux_x86_64"), state_dir=root / d.device_id,
                           data_dir=root / d.device_id / "data", adaptive=False, seed=seed,
                           gate=GateSettings(enabled=gates, shadow_steps=args.shadow_steps))
        devices[d.device_id] = DeviceRuntime(cfg, bundle0)
    base_acc = {n: served_accuracy(dev.trainer, None) for n, dev in devices.items()}
    majority = {}
    for n, dev in devices.items():
        top = np.bincount(dev.data.train_y).argmax()
        majority[n] = float((dev.data.holdout_y == top).mean())
    changes: dict[str, list[float]] = {n: [] for n in devices}
    # Issue 10 item 4: the device's old φ on the old base vs the same φ on the new base (gate numbers).
    old_phi: dict[str, list[tuple[float, float]]] = {n: [] for n in devices}

    def note(n: str) -> None:
        last = devices[n].adoption.last
        if gates and last is not None:
            old_phi[n].append((last.acc_active, last.acc_new_old_phi))
    decisions: list[dict[str, Any]] = []
    current = bundle0
    seconds = {"train": 0.0, "distill": 0.0, "offer": 0.0}
    for rnd in range(1, args.rounds + 1):
        with timed(seconds, "train"):
            for dev in devices.values():
                dev.run_round(args.steps)
        t = time.perf_counter()
        with load_bundle(current) as b:
            spec, patch, params = b.model_spec, b.patch_spec, {k: np.array(v) for k, v in b.all_params().items()}
        contributions = [DeviceContribution(n, np.asarray(dev.trainer.phi, np.float32))
                         for n, dev in sorted(devices.items()) if dev.bundle.base_version == b.base_version]
        result = run_aggregator("momodistill", spec, patch, params, contributions,
                                CloudData(x=cx, y=cy, proxy_x=cx), DistillConfig(phi_source="device", seed=seed))
        out = root / "cloud" / f"round-{rnd}"
        republish_bundle(current, result.params, out, meta={"round": rnd})
        seconds["distill"] += time.perf_counter() - t
        entry: dict[str, Any] = {"round": rnd}
        targets = sorted(devices)
        if gates:
            assert heldout is not None
            gate = cloud_gate(base_logits(spec, params, heldout[0]), base_logits(spec, result.params, heldout[0]),
                              heldout[1])
            entry["cloud_gate"] = gate.numbers() | {"passed": gate.passed}
            if not gate.passed:
                decisions.append(entry | {"decision": "cloud_reject"})
                continue
            canaries = list(choose_canaries(targets, 0.1, 2, seed + rnd))
            verdicts = {}
            for n in canaries:
                with timed(seconds, "offer"):
                    before, after, adopted = offer(devices[n], out, gates)
                changes[n].append(after - before)
                verdicts[n] = adopted
                note(n)
            if not all(verdicts.values()):
                decisions.append(entry | {"decision": "withdraw", "canaries": verdicts})
                continue
            targets = [n for n in targets if n not in canaries]
            entry["canaries"] = verdicts
        adopted_by = []
        for n in targets:
            with timed(seconds, "offer"):
                before, after, adopted = offer(devices[n], out, gates)
            changes[n].append(after - before)
            note(n)
            if adopted:
                adopted_by.append(n)
        current = out
        decisions.append(entry | {"decision": "promote", "adopted_by": len(adopted_by), "offered": len(targets)})
    final = {n: served(dev, gates) for n, dev in devices.items()}
    hold_n = {n: len(dev.data.holdout_y) for n, dev in devices.items()}
    worst = {n: min(c) if c else 0.0 for n, c in changes.items()}
    for dev in devices.values():
        dev.stop()
    return {"fleet": fleet.name, "seed": seed, "gates": gates, "decisions": decisions, "seconds": seconds,
            "devices": {n: {"holdout": hold_n[n], "base": base_acc[n], "majority": majority[n],
                            "personalized": final[n], "worst_change": worst[n],
                            "worst_change_samples": worst[n] * hold_n[n],
                            "old_phi_old_base_vs_new_base": old_phi[n]} for n in devices}}


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for fleet in dict.fromkeys(r["fleet"] for r in runs):
        for gates in (False, True):
            sel = [r for r in runs if r["fleet"] == fleet and r["gates"] == gates]
            if not sel:
                continue
            devs = [d for r in sel for d in r["devices"].values()]
            pairs = [p for d in devs for p in d.get("old_phi_old_base_vs_new_base", [])]
            rows.append({"fleet": fleet, "gates": "on" if gates else "off", "devices": len(devs),
                         "worst_change": min(d["worst_change"] for d in devs),
                         "worst_change_samples": min(d["worst_change_samples"] for d in devs),
                         "harmed_devices": sum(d["worst_change_samples"] < -1 - 1e-9 for d in devs),
                         "personalized": float(np.mean([d["personalized"] for d in devs])),
                         "base": float(np.mean([d["base"] for d in devs])),
                         "majority": float(np.mean([d["majority"] for d in devs])),
                         "old_phi_old_base": float(np.mean([p[0] for p in pairs])) if pairs else None,
                         "old_phi_new_base": float(np.mean([p[1] for p in pairs])) if pairs else None})
    return rows


def print_devices(runs: list[dict[str, Any]]) -> None:
    print(f"\n{'fleet':<14}{'seed':>4} {'gates':<6}{'device':<9}{'hold':>5}{'worst Δ (samples)':>18}"
          f"{'personalized':>13}{'base':>7}{'majority':>9}")
    for r in runs:
        for n, d in r["devices"].items():
            print(f"{r['fleet']:<14}{r['seed']:>4} {'on' if r['gates'] else 'off':<6}{n:<9}{d['holdout']:>5}"
                  f"{d['worst_change_samples']:>+18.1f}{d['personalized']:>13.3f}{d['base']:>7.3f}{d['majority']:>9.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--devices", type=int, default=6)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--shadow-steps", type=int, default=20)
    ap.add_argument("--fleets", nargs="+", default=[f.name for f in FLEETS])
    ap.add_argument("--per-device", action="store_true", help="also print every device's row (always in the JSON)")
    ap.add_argument("--head-bias", action=argparse.BooleanOptionalAction, default=True,
                    help="export the fleets' bundles with a head-bias patch (φ can carry a label prior)")
    # tmpfs when there is one: every φ step commits the device state with fsync (crash safety), which on a
    # shared disk made training 3x slower (16 s vs 5 s per digits run) without changing a number.
    ap.add_argument("--work", type=Path, default=Path("/dev/shm/edgepatch-no-harm" if Path("/dev/shm").is_dir()
                                                      else "/tmp/edgepatch-no-harm"))
    ap.add_argument("--out", type=Path, default=Path("results/no_harm.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch

    # MoMoDistill's small convolutions on a shared 2-core machine: one torch thread took 6.3 s per digits
    # round where the default two took 71-121 s (thread contention with other jobs); results do not change.
    torch.set_num_threads(1)
    t0, cpu0, load0 = time.perf_counter(), time.process_time(), os.getloadavg()
    runs = []
    for fleet in (f for f in FLEETS if f.name in args.fleets):
        dataset = fleet_data(fleet)
        cloud, _ = base_split(dataset, fraction=0.5, seed=0)
        t = time.perf_counter()
        bundle0 = export_once(fleet, args.work, cloud, args.head_bias)
        print(f"{fleet.name}: bundle {bundle0} ({time.perf_counter() - t:.1f} s)", flush=True)
        for seed in args.seeds:
            for gates in (False, True):
                t = time.perf_counter()
                runs.append(run_one(fleet, bundle0, dataset, seed, gates, args, args.work))
                phases = ", ".join(f"{k} {v:.1f} s" for k, v in runs[-1]["seconds"].items())
                print(f"{fleet.name} seed {seed} gates {'on' if gates else 'off'}: {time.perf_counter() - t:.1f} s "
                      f"({phases})", flush=True)
    rows = summarize(runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    wall, cpu, load1 = time.perf_counter() - t0, time.process_time() - cpu0, os.getloadavg()
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "summary": rows,
                                    "runs": runs, "seconds": round(wall, 1), "cpu_seconds": round(cpu, 1),
                                    "load_average_before_after": [load0, load1]}, indent=1))
    if args.per_device:
        print_devices(runs)
    print(f"\n{'fleet':<14}{'gates':<6}{'devs':>5}{'worst Δacc':>11}{'(samples)':>10}{'harmed':>7}"
          f"{'personalized':>13}{'base':>7}{'majority':>9}")
    for r in rows:
        print(f"{r['fleet']:<14}{r['gates']:<6}{r['devices']:>5}{r['worst_change']:>+11.3f}"
              f"{r['worst_change_samples']:>+10.1f}{r['harmed_devices']:>7}{r['personalized']:>13.3f}"
              f"{r['base']:>7.3f}{r['majority']:>9.3f}")
    for r in rows:
        if r["old_phi_old_base"] is not None:
            print(f"{r['fleet']}: device φ on the old base {r['old_phi_old_base']:.3f} vs the same φ on the offered "
                  f"new base {r['old_phi_new_base']:.3f} (mean over gate decisions)")
    on = [r for r in rows if r["gates"] == "on"]
    no_harm = all(r["harmed_devices"] == 0 for r in on)
    beats = all(r["personalized"] > max(r["base"], r["majority"]) for r in on)
    print(f"total {wall:.0f} s wall, {cpu:.0f} s CPU (load average {load0[0]:.1f} before, {load1[0]:.1f} after, "
          f"2 cores); wrote {args.out}")
    print(f"targets (gates on): no device worse by more than one holdout sample at any update: "
          f"{'MET' if no_harm else 'NOT MET'}; mean personalized accuracy above base and majority on every "
          f"fleet: {'MET' if beats else 'NOT MET'} -> {'ALL TARGETS MET' if no_harm and beats else 'TARGETS NOT MET'}")


if __name__ == "__main__":
    main()
