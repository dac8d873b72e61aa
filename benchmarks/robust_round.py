"""A MoMoDistill round with 20 % adversarial devices: does it abort, and how far does the cloud model move?

Digits, a shifted long-tail fleet of N devices that personalize φ with torch Adam on φ only (the maths the
LiteRT train_phi program runs), proxy mode (the companion's default). Scenarios, each one round:

    honest_only     the honest 80 % alone (the reference for "broken")
    broken          + 20 % sending φ of 3e38, NaN and the wrong size (dropped by cloud/robust.py)
    all_honest      all N honest (the reference for "scaled")
    scaled          20 % of them send 1000 × their φ (finite, clipped to 3 × the median norm)
    unscreened      the aggregator called directly, bypassing the screen, with one 3e38 φ (issue 11's NaN)

Cloud accuracy = the round's cloud model on every device's holdout.

    python3 benchmarks/robust_round.py [--devices 15] [--out results/robust_round.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from edgepatch.cloud.momodistill import (
    AGGREGATORS,
    CloudData,
    DeviceContribution,
    DistillConfig,
    cloud_logits,
    run_aggregator,
)
from edgepatch.data.datasets import load_digits
from edgepatch.data.fleet import base_split, make_fleet
from edgepatch.export.pretrain import pretrain_base
from edgepatch.export.reference_models import default_patch, digits_cnn
from edgepatch.export.torch_model import forward, to_tensors
from edgepatch.protocol.params import init_params

SPEC = digits_cnn()
PATCH = default_patch(SPEC, k=8)
CFG = DistillConfig(mode="proxy", phi_source="device", step1_epochs=3, step2_epochs=3, beta=0.5)


def train_phi(params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, steps: int = 40) -> np.ndarray:
    tensors = to_tensors(params)
    phi = torch.zeros(PATCH.k, requires_grad=True)
    opt = torch.optim.Adam([phi], lr=0.05)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(steps):
        loss = F.cross_entropy(forward(SPEC, PATCH, tensors, xt, phi), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return phi.detach().numpy().astype(np.float32)


def build_world(n_devices: int, seed: int = 0) -> dict[str, Any]:
    torch.set_num_threads(1)
    cloud, rest = base_split(load_digits(), 0.2, seed=seed)
    fleet = make_fleet(rest, n_devices, alpha=0.5, shift="gain_offset", seed=seed, samples_per_device=50,
                       shift_strength=2.0)
    params = init_params(SPEC, PATCH, seed)
    params.update(pretrain_base(SPEC, cloud.x, cloud.y, epochs=8, seed=seed))
    honest = [DeviceContribution(d.device_id, train_phi(params, d.train.x, d.train.y)) for d in fleet]
    test = (np.concatenate([d.holdout.x for d in fleet]), np.concatenate([d.holdout.y for d in fleet]))
    return {"cloud": CloudData(cloud.x, cloud.y, cloud.x), "params": params, "honest": honest, "test": test}


def round_accuracy(world: dict[str, Any], devices: list[DeviceContribution]) -> dict[str, Any]:
    result = run_aggregator("momodistill", SPEC, PATCH, world["params"], devices, world["cloud"], CFG)
    x, y = world["test"]
    return {"accuracy": float((cloud_logits(SPEC, PATCH, result, x).argmax(1) == y).mean()),
            "finite": all(bool(np.all(np.isfinite(v))) for v in result.params.values()),
            "dropped": int(result.metrics.get("devices_dropped", 0)),
            "clipped": int(result.metrics.get("devices_clipped", 0))}


def run(n_devices: int = 15, seed: int = 0) -> dict[str, Any]:
    world = build_world(n_devices, seed)
    honest: list[DeviceContribution] = world["honest"]
    n_bad = max(1, round(0.2 * n_devices))
    k = PATCH.k
    kinds = [np.full(k, 3e38, np.float32), np.full(k, np.nan, np.float32), np.zeros(k + 5, np.float32)]
    broken = [DeviceContribution(d.device_id, kinds[i % 3]) if i < n_bad else d for i, d in enumerate(honest)]
    scaled = [DeviceContribution(d.device_id, d.phi * 1000.0) if i < n_bad and d.phi is not None else d
              for i, d in enumerate(honest)]
    unscreened = AGGREGATORS["momodistill"].run(SPEC, PATCH, world["params"], [broken[0], *honest[n_bad:]],
                                                world["cloud"], CFG)
    return {"devices": n_devices, "adversarial": n_bad,
            "honest_only": round_accuracy(world, honest[n_bad:]), "broken": round_accuracy(world, broken),
            "all_honest": round_accuracy(world, honest), "scaled": round_accuracy(world, scaled),
            "unscreened_finite": all(bool(np.all(np.isfinite(v))) for v in unscreened.params.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    r = run(args.devices, args.seed)
    print(f"{'scenario':<14} {'cloud acc':>9} {'finite':>6} {'dropped':>7} {'clipped':>7}")
    for name in ("honest_only", "broken", "all_honest", "scaled"):
        s = r[name]
        print(f"{name:<14} {s['accuracy']:>9.4f} {str(s['finite']):>6} {s['dropped']:>7} {s['clipped']:>7}")
    print(f"without the screen, one 3e38 phi leaves the parameters finite: {r['unscreened_finite']}")
    print(f"broken vs honest-only: {100 * (r['broken']['accuracy'] - r['honest_only']['accuracy']):+.2f} points; "
          f"scaled vs all honest: {100 * (r['scaled']['accuracy'] - r['all_honest']['accuracy']):+.2f} points")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(r, indent=2) + "\n")


if __name__ == "__main__":
    main()
