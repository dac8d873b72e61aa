"""On-device φ training raises each device's later-in-time holdout accuracy over the base model.

Exports the digits reference bundle (LiteRT), splits the rest of scikit-learn digits into a fleet whose
devices each see their data through their own miscalibrated sensor gain/offset (a shift a FiLM patch
can correct; every device is noticeably off),
then trains φ on every device in the real LiteRT interpreter and compares holdout accuracy before and
after (train on older samples, test on the newest 25 %).

    python benchmarks/personalization.py --devices 8 --steps 200 --out results/personalization.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--shift", default="miscalibration", help="per-device transform kinds (data/fleet.py)")
    ap.add_argument("--shift-strength", type=float, default=1.5)
    ap.add_argument("--tail", default="uniform", choices=["uniform", "zipf", "lognormal"])
    ap.add_argument("--samples-per-device", type=int, default=110)
    ap.add_argument("--bundle", type=Path, default=None, help="reuse an exported bundle")
    ap.add_argument("--runtime", default="litert", choices=["litert", "executorch"])
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("results/personalization.json"))
    args = ap.parse_args()

    from edgepatch.data.datasets import load_digits
    from edgepatch.data.fleet import base_split, make_fleet, write_device_timeline
    from edgepatch.device.profile import load_profile
    from edgepatch.device.runtime import DeviceConfig, DeviceRuntime

    work = Path(tempfile.mkdtemp(prefix="edgepatch-personalization-"))
    bundle = args.bundle
    if bundle is None:
        from edgepatch.export.pipeline import ExportOptions, export_bundle

        bundle = work / "bundle"
        runtimes = ("litert",) if args.runtime == "litert" else ("litert", "executorch")
        export_bundle(ExportOptions(variants="1", runtimes=runtimes, dse_steps=5, dse_seeds=(0,)), bundle)
    _, device_part = base_split(load_digits(), fraction=0.5, seed=0)
    fleet = make_fleet(device_part, args.devices, alpha=1.0, shift=args.shift, tail=args.tail, seed=args.seed,
                       shift_strength=args.shift_strength, samples_per_device=args.samples_per_device)
    rows = []
    for device in fleet:
        data_dir = work / device.device_id
        write_device_timeline(device, data_dir)
        cfg = DeviceConfig(device_id=device.device_id, profile=load_profile("linux_x86_64"),
                           state_dir=work / "state" / device.device_id, data_dir=data_dir,
                           runtime=args.runtime, adaptive=False, seed=args.seed)
        runtime = DeviceRuntime(cfg, bundle)
        t0 = time.perf_counter()
        report = runtime.run_round(args.steps)
        rows.append({"device": device.device_id, "bucket": device.bucket, "train": len(runtime.data.train_x),
                     "holdout": len(runtime.data.holdout_x), "acc_base": report.holdout_acc_before,
                     "acc_personalized": report.holdout_acc_after,
                     "gain": report.holdout_acc_after - report.holdout_acc_before,
                     "seconds": time.perf_counter() - t0})
    gains = np.array([r["gain"] for r in rows])
    summary = {"runtime": args.runtime, "steps": args.steps, "devices": rows, "mean_gain": float(gains.mean()),
               "devices_improved": int((gains > 0).sum()), "devices_worse": int((gains < 0).sum())}
    table = Table("device", "bucket", "train", "holdout", "base acc", "personalized", "gain",
                  title=f"φ personalization on LiteRT ({args.steps} steps)")
    for r in rows:
        table.add_row(r["device"], r["bucket"], str(r["train"]), str(r["holdout"]), f"{r['acc_base']:.3f}",
                      f"{r['acc_personalized']:.3f}", f"{r['gain']:+.3f}")
    Console().print(table)
    Console().print(f"mean gain {summary['mean_gain']:+.3f}; improved {summary['devices_improved']}, "
                    f"worse {summary['devices_worse']} of {len(rows)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
