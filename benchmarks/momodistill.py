"""MoMoDistill vs model-over-data vs FedAvg of patches on a long-tailed, time-ordered digits fleet.

Setup per seed: the cloud pretrains digits_cnn on its own untransformed 20% of the digits; the rest is
split over devices with a Zipf quantity skew (head = the largest 20% of devices), Dirichlet label skew
and a strong per-device gain/offset shift. Each device trains φ on its OLDER samples (torch Adam on φ
only — the maths of the LiteRT train_phi program). Each aggregator runs one round; we report per
bucket, on every device's NEWER holdout samples:
- cloud: accuracy of the round's cloud model (f(x; W), fedavg: the patched model at φ̄);
- pers_sent: the personalized model with the φ the round sends back (no further device training);
- pers_refit: after the device re-trains φ on its data for the same budget, starting from that φ.
Claims checked: MoMoDistill cloud > model_over_data cloud on tail and not worse on head;
personalized > cloud on tail. MoMoDistill runs in "samples" mode (the same data model_over_data gets)
and additionally in "teacher_outputs" and "proxy" modes.

    python3 benchmarks/momodistill.py [--seeds 0 1 2] [--devices 30] [--out results/momodistill.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edgepatch.cloud.momodistill import (
    CloudData,
    DeviceContribution,
    DistillConfig,
    cloud_logits,
    device_profile,
    personalized_logits,
    run_aggregator,
)
from edgepatch.data.datasets import load_digits
from edgepatch.data.fleet import base_split, make_fleet
from edgepatch.export.pretrain import pretrain_base
from edgepatch.export.reference_models import default_patch, digits_cnn
from edgepatch.export.torch_model import forward, to_tensors
from edgepatch.protocol.params import init_params, write_atomic

SPEC = digits_cnn()
PATCH = default_patch(SPEC, k=8)
RUNS = (("momodistill", "samples"), ("model_over_data", "samples"), ("fedavg_patches", "samples"),
        ("momodistill", "teacher_outputs"), ("momodistill", "proxy"))


def train_phi(params, x: np.ndarray, y: np.ndarray, steps: int, phi0: np.ndarray | None = None) -> np.ndarray:
    tensors = to_tensors(params)
    phi = torch.tensor(np.zeros(PATCH.k, np.float32) if phi0 is None else phi0, requires_grad=True)
    opt = torch.optim.Adam([phi], lr=0.05)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(steps):
        loss = F.cross_entropy(forward(SPEC, PATCH, tensors, xt, phi), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return phi.detach().numpy().astype(np.float32)


def acc(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == y).mean())


def contributions(fleet, params, phis, mode: str) -> list[DeviceContribution]:
    out = []
    for d in fleet:
        phi, profile = phis[d.device_id], device_profile(d.train.x, d.train.y, SPEC.num_classes)
        if mode == "samples":
            out.append(DeviceContribution(d.device_id, phi, d.train.x, d.train.y, profile=profile))
        elif mode == "teacher_outputs":
            logits = personalized_logits(SPEC, PATCH, params, phi, d.train.x)
            out.append(DeviceContribution(d.device_id, phi, d.train.x, logits=logits, profile=profile))
        else:
            out.append(DeviceContribution(d.device_id, phi, profile=profile))
    return out


def run_seed(seed: int, n_devices: int, phi_steps: int, cfg: DistillConfig) -> dict:
    cloud, rest = base_split(load_digits(), 0.2, seed=seed)
    fleet = make_fleet(rest, n_devices, alpha=0.5, shift="gain_offset", tail="zipf", seed=seed,
                       shift_strength=2.0, head_fraction=0.2, min_samples=8)
    params = init_params(SPEC, PATCH, seed)
    params.update(pretrain_base(SPEC, cloud.x, cloud.y, epochs=15, seed=seed))
    phis = {d.device_id: train_phi(params, d.train.x, d.train.y, phi_steps) for d in fleet}
    cloud_data = CloudData(cloud.x, cloud.y, proxy_x=cloud.x)
    buckets = {b: [d for d in fleet if d.bucket == b] for b in ("head", "tail")}

    def bucket_mean(fn) -> dict[str, float]:
        return {b: float(np.mean([fn(d) for d in devs])) for b, devs in buckets.items()}

    rows: dict[str, dict] = {"before_round": {
        "cloud": bucket_mean(lambda d: acc(cloud_logits_base(params, d.holdout.x), d.holdout.y)),
        "pers_sent": bucket_mean(lambda d: acc(personalized_logits(SPEC, PATCH, params, phis[d.device_id],
                                                                   d.holdout.x), d.holdout.y)),
    }}
    for name, mode in RUNS:
        result = run_aggregator(name, SPEC, PATCH, params, contributions(fleet, params, phis, mode), cloud_data,
                                replace(cfg, mode=mode, seed=seed))
        refit = {d.device_id: train_phi(result.params, d.train.x, d.train.y, phi_steps, result.device_phi[d.device_id])
                 for d in fleet}
        rows[f"{name}/{mode}"] = {
            "cloud": bucket_mean(lambda d, r=result: acc(cloud_logits(SPEC, PATCH, r, d.holdout.x), d.holdout.y)),
            "pers_sent": bucket_mean(lambda d, r=result: acc(personalized_logits(
                SPEC, PATCH, r.params, r.device_phi[d.device_id], d.holdout.x), d.holdout.y)),
            "pers_refit": bucket_mean(lambda d, r=result, f=refit: acc(personalized_logits(
                SPEC, PATCH, r.params, f[d.device_id], d.holdout.x), d.holdout.y)),
            "seconds": result.timing["total_s"], "metrics": result.metrics,
        }
    sizes = {b: [len(d.train) for d in devs] for b, devs in buckets.items()}
    return {"seed": seed, "train_sizes": sizes, "rows": rows}


def cloud_logits_base(params, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return forward(SPEC, None, to_tensors(params), torch.from_numpy(x)).numpy()


def summarize(per_seed: list[dict]) -> dict:
    summary: dict[str, dict] = {}
    for row in per_seed[0]["rows"]:
        summary[row] = {}
        for col in ("cloud", "pers_sent", "pers_refit"):
            for bucket in ("head", "tail"):
                vals = [s["rows"][row][col][bucket] for s in per_seed if col in s["rows"][row]]
                if vals:
                    summary[row][f"{col}_{bucket}"] = {"mean": float(np.mean(vals)), "std": float(np.std(vals))}
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--devices", type=int, default=30)
    ap.add_argument("--phi-steps", type=int, default=60)
    ap.add_argument("--epochs", type=int, default=5, help="epochs of each distillation step")
    ap.add_argument("--out", default="results/momodistill.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = DistillConfig(step1_epochs=args.epochs, step2_epochs=args.epochs)
    start = time.perf_counter()
    per_seed = [run_seed(s, args.devices, args.phi_steps, cfg) for s in args.seeds]
    summary = summarize(per_seed)
    print(f"{'run':28s} " + " ".join(f"{c:>16s}" for c in
                                       ("cloud head", "cloud tail", "pers_sent head", "pers_sent tail",
                                        "pers_refit head", "pers_refit tail")))
    for row, cols in summary.items():
        cells = []
        for key in ("cloud_head", "cloud_tail", "pers_sent_head", "pers_sent_tail", "pers_refit_head",
                    "pers_refit_tail"):
            cells.append(f"{cols[key]['mean']:.3f}±{cols[key]['std']:.3f}" if key in cols else "-")
        print(f"{row:28s} " + " ".join(f"{c:>16s}" for c in cells))
    momo, mod = summary["momodistill/samples"], summary["model_over_data/samples"]
    claims = {
        "momo_cloud_beats_mod_on_tail": momo["cloud_tail"]["mean"] > mod["cloud_tail"]["mean"],
        "momo_cloud_no_worse_on_head": momo["cloud_head"]["mean"] >= mod["cloud_head"]["mean"] - 0.01,
        "personalized_beats_cloud_on_tail": momo["pers_refit_tail"]["mean"] > momo["cloud_tail"]["mean"],
    }
    print("claims:", claims)
    out = {"benchmark": "momodistill", "args": vars(args), "config": cfg.__dict__, "summary": summary,
           "claims": claims, "per_seed": per_seed, "seconds": time.perf_counter() - start,
           "machine": platform.platform(), "torch": torch.__version__}
    write_atomic(Path(args.out), json.dumps(out, indent=2).encode())
    print(f"wrote {args.out} in {out['seconds']:.0f}s")


if __name__ == "__main__":
    main()
