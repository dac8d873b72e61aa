"""Head bias on vs off (issue 10 item 3): does letting φ shift the head's logits beat the trivial baselines?

Same base weights, same devices, same steps; the only difference is the patch: FiLM on every conv (k = 16)
versus the same FiLM plus a head bias (k = 16 + classes). Two fleets of digits_cnn devices, each trained
by its own PatchTrainer in the real LiteRT runtime for `--steps` steps (train on older samples, test on
the newest 25 %):
- `label_shift`: every device sees the base's own input distribution (noisy digits; the base is
  pretrained on the noisy cloud half) with 75 % of its labels one class, one device per class;
- `sensor_fleet`: `make_fleet` over the clean device half, Dirichlet label skew (`--alpha`) and a per-device
  gain/offset sensor shift (the demo's kind of fleet), base pretrained on the clean cloud half.
Reported per fleet and arm: mean holdout accuracy of the base (φ = 0), the personalized model, and
"always my most common training class". Target: with the head bias, personalized beats both baselines on
both fleets. The last line says whether it is met.

    python3 benchmarks/head_bias.py [--seeds 0 1 2] [--steps 60] [--devices 10] [--out results/head_bias.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

NOISE = 1.5  # × the data's std: the label_shift fleet's inputs (the base is unsure, so the prior matters)


def export_pair(work: Path, data: Path | None) -> dict[str, Path]:
    """Two bundles over one base: without the head bias (pretrains) and with it (reuses those weights)."""
    from edgepatch.export.pipeline import ExportOptions, export_bundle

    out = {"off": work / "off", "on": work / "on"}
    export_bundle(ExportOptions(data=data, variants="1", runtimes=("litert",), dse_steps=3, dse_seeds=(0,)),
                  out["off"])
    export_bundle(ExportOptions(data=data, weights=out["off"] / "params_base.npz", variants="1",
                                runtimes=("litert",), dse_steps=3, dse_seeds=(0,), head_bias=True), out["on"])
    return out


def label_shift_devices(seed: int, classes: int = 10) -> list[tuple[np.ndarray, np.ndarray]]:
    from edgepatch.data.datasets import load_digits
    from edgepatch.data.fleet import base_split

    digits = load_digits()
    std = float(digits.x.std())
    _, part = base_split(digits, fraction=0.5, seed=0)
    devices = []
    for cls in range(classes):
        rng = np.random.default_rng([seed, cls])
        idx = np.concatenate([rng.choice(np.flatnonzero(part.y == cls), 120),
                              rng.choice(np.flatnonzero(part.y != cls), 40)])
        rng.shuffle(idx)
        devices.append(((part.x[idx] + rng.normal(0, NOISE * std, (len(idx), *part.x.shape[1:]))).astype(np.float32),
                        part.y[idx]))
    return devices


def sensor_fleet_devices(seed: int, n: int, alpha: float) -> list[tuple[np.ndarray, np.ndarray]]:
    from edgepatch.data.datasets import load_digits
    from edgepatch.data.fleet import base_split, make_fleet

    _, part = base_split(load_digits(), fraction=0.5, seed=0)
    fleet = make_fleet(part, n, alpha=alpha, shift="gain_offset", tail="uniform", seed=seed, samples_per_device=80)
    return [(np.concatenate([d.train.x, d.holdout.x]), np.concatenate([d.train.y, d.holdout.y])) for d in fleet]


def run_device(bundle_dir: Path, x: np.ndarray, y: np.ndarray, steps: int, seed: int, state: Path) -> dict:
    from edgepatch.device.engine import open_engine
    from edgepatch.device.state import DeviceStateStore
    from edgepatch.device.trainer import LocalData, PatchTrainer
    from edgepatch.protocol.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    data = LocalData.split(x, y, np.arange(len(x)))  # rows are in time order
    trainer = PatchTrainer(bundle, open_engine(bundle, "litert"), DeviceStateStore(state), data, seed=seed,
                           variant_id=bundle.manifest.variants[0].id)
    base = trainer.holdout_accuracy(np.zeros(bundle.manifest.patch.k, np.float32))
    trainer.train_round(steps)
    common = np.bincount(data.train_y).argmax()
    return {"base": base, "personalized": trainer.holdout_accuracy(),
            "majority": float((data.holdout_y == common).mean()), "holdout": len(data.holdout_y)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--devices", type=int, default=10, help="devices of the sensor fleet")
    ap.add_argument("--alpha", type=float, default=0.3, help="Dirichlet label skew of the sensor fleet")
    ap.add_argument("--out", type=Path, default=Path("results/head_bias.json"))
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    from edgepatch.data.datasets import load_digits
    from edgepatch.data.fleet import base_split

    started, cpu0 = time.perf_counter(), time.process_time()
    work = Path(tempfile.mkdtemp(prefix="edgepatch-head-bias-"))
    digits = load_digits()
    cloud, _ = base_split(digits, fraction=0.5, seed=0)
    noisy = work / "noisy.npz"
    rng = np.random.default_rng(0)
    np.savez(noisy, x=(cloud.x + rng.normal(0, NOISE * float(digits.x.std()), cloud.x.shape)).astype(np.float32),
             y=cloud.y)
    bundles = {"label_shift": export_pair(work / "label_shift", noisy),
               "sensor_fleet": export_pair(work / "sensor_fleet", None)}
    rows = []
    for fleet, arms in bundles.items():
        for seed in args.seeds:
            devices = (label_shift_devices(seed) if fleet == "label_shift"
                       else sensor_fleet_devices(seed, args.devices, args.alpha))
            for i, (x, y) in enumerate(devices):
                for arm, bundle in arms.items():
                    r = run_device(bundle, x, y, args.steps, seed, work / "state" / f"{fleet}-{seed}-{i}-{arm}")
                    rows.append({"fleet": fleet, "seed": seed, "device": i, "head_bias": arm, **r})
    summary = {}
    table = Table("fleet", "head bias", "devices", "base", "majority class", "personalized", "beats both",
                  title=f"holdout accuracy, mean over devices and seeds ({args.steps} φ steps, LiteRT)")
    for fleet in bundles:
        for arm in ("off", "on"):
            sel = [r for r in rows if r["fleet"] == fleet and r["head_bias"] == arm]
            m = {key: float(np.mean([r[key] for r in sel])) for key in ("base", "majority", "personalized")}
            m["beats_both"] = m["personalized"] > max(m["base"], m["majority"])
            m["devices"] = len(sel)
            summary[f"{fleet}/{arm}"] = m
            table.add_row(fleet, arm, str(len(sel)), f"{m['base']:.3f}", f"{m['majority']:.3f}",
                          f"{m['personalized']:.3f}", "yes" if m["beats_both"] else "no")
    met = all(summary[f"{fleet}/on"]["beats_both"] for fleet in bundles)
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "summary": summary, "rows": rows,
              "target_met": met, "wall_s": round(time.perf_counter() - started, 1),
              "cpu_s": round(time.process_time() - cpu0, 1), "load_avg": os.getloadavg()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    Console(width=120).print(table)
    print(f"target (head bias on: personalized above base and majority-class on both fleets): "
          f"{'MET' if met else 'NOT MET'}")


if __name__ == "__main__":
    main()
