"""What each `Engine` primitive costs on a device, per runtime and variant, and how closely the runtimes agree.

The device calls exactly these (device/engine.py): `phi_step`, `full_grads`, `variant_logits` (LiteRT:
`infer_<vid>`; ExecuTorch: the logits output of `train_phi_<vid>`, forward + backward) and the frozen
`logits`. One bundle exported for both runtimes; cells timed with interleaved repetitions (so background
load hits every cell alike), medians in ms. `agreement` is the largest absolute difference between the two
runtimes' outputs for the same inputs (loss, gradients, logits).

    python3 benchmarks/engine_primitives.py --reps 20                 # exports digits_cnn (1, 0.5) first
    python3 benchmarks/engine_primitives.py --bundle DIR --out results/engine_primitives.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgepatch.device.engine import RUNTIMES, Engine, open_engine
from edgepatch.protocol.bundle import Bundle, load_bundle
from edgepatch.protocol.model_spec import param_infos
from edgepatch.protocol.params import write_atomic
from edgepatch.protocol.variants import sample_kept, slice_params

Cell = tuple[str, str, str]  # runtime, variant ("-" for the frozen program), primitive


def cells_for(engine: Engine, bundle: Bundle, rng: np.random.Generator) -> dict[Cell, Callable[[], Any]]:
    spec, patch = bundle.model_spec, bundle.patch_spec
    x = rng.normal(size=(engine.train_batch, *spec.input_shape)).astype(np.float32)
    y = rng.integers(0, spec.num_classes, engine.train_batch)
    xi = rng.normal(size=(engine.infer_batch or engine.train_batch, *spec.input_shape)).astype(np.float32)
    phi = rng.normal(0.0, 0.1, patch.k).astype(np.float32)
    zeros = np.zeros(patch.k, np.float32)
    params, rt = bundle.all_params(), engine.runtime
    cells: dict[Cell, Callable[[], Any]] = {(rt, "-", "logits"): lambda: engine.logits(xi, phi)}
    for row in bundle.manifest.variants:
        kept = sample_kept(spec, row.variant, np.random.default_rng(0))  # the same kept set on both runtimes
        sliced = slice_params(params, param_infos(spec, patch), kept)
        base = slice_params(params, param_infos(spec, None), kept)
        vid = row.id
        cells[(rt, vid, "phi_step")] = lambda v=vid, s=sliced: engine.phi_step(v, x, y, phi, zeros, zeros, 0.0,
                                                                                0.05, s)
        cells[(rt, vid, "full_grads")] = lambda v=vid, b=base: engine.full_grads(v, x, y, b)
        cells[(rt, vid, "variant_logits")] = lambda v=vid, s=sliced: engine.variant_logits(v, x, phi, s)
    return cells


def _flat(out: Any) -> np.ndarray:
    """Every number a primitive returned, in a fixed order."""
    if isinstance(out, tuple):
        return np.concatenate([_flat(o) for o in out])
    if isinstance(out, dict):
        return np.concatenate([_flat(out[k]) for k in sorted(out)])
    return np.atleast_1d(np.asarray(out, np.float64)).ravel()


def measure(cells: dict[Cell, Callable[[], Any]], reps: int) -> tuple[dict[Cell, float], dict[Cell, np.ndarray]]:
    outputs = {cell: _flat(fn()) for cell, fn in cells.items()}  # warm-up; kept for the agreement check
    samples: dict[Cell, list[float]] = {cell: [] for cell in cells}
    for _ in range(reps):
        for cell, fn in cells.items():
            t0 = time.perf_counter()
            fn()
            samples[cell].append((time.perf_counter() - t0) * 1e3)
    return {cell: statistics.median(v) for cell, v in samples.items()}, outputs


def export_default(out: Path) -> Path:
    from edgepatch.export.pipeline import ExportOptions, export_bundle

    export_bundle(ExportOptions(variants="1,0.5", runtimes=RUNTIMES, pretrain_epochs=8, dse_steps=5,
                                dse_seeds=(0,)), out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, help="a bundle with LiteRT and ExecuTorch programs (default: export one)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path("results/engine_primitives.json"))
    args = ap.parse_args(argv)
    if args.reps < 1:
        ap.error("--reps must be >= 1")
    with tempfile.TemporaryDirectory() as tmp:
        bundle = load_bundle(args.bundle or export_default(Path(tmp) / "bundle"))
        cells: dict[Cell, Callable[[], Any]] = {}
        for runtime in RUNTIMES:
            cells.update(cells_for(open_engine(bundle, runtime), bundle, np.random.default_rng(0)))
        medians, outputs = measure(cells, args.reps)
    agreement = {f"{vid}/{kind}": float(np.abs(outputs[("litert", vid, kind)] - outputs[("executorch", vid, kind)]).max())
                 for (rt, vid, kind) in cells if rt == "litert"}
    report = {"model": bundle.manifest.model_id, "batch": bundle.manifest.train.batch, "reps": args.reps,
              "ms": [{"runtime": rt, "variant": vid, "primitive": kind, "median_ms": round(ms, 3)}
                     for (rt, vid, kind), ms in medians.items()],
              "agreement_max_abs_diff": agreement}
    write_atomic(args.out, (json.dumps(report, indent=2) + "\n").encode())
    print(f"{'variant':10} {'primitive':15} " + " ".join(f"{rt + ' ms':>14}" for rt in RUNTIMES) + "   max |Δ|")
    for (rt, vid, kind) in cells:
        if rt == "litert":
            times = " ".join(f"{medians[(r, vid, kind)]:14.2f}" for r in RUNTIMES)
            print(f"{vid:10} {kind:15} {times}   {agreement[f'{vid}/{kind}']:.1e}")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
