"""Real-time twin of the selector unit test: does adaptive variant choice meet a round deadline when
available CPU halves mid-round, where always training the full variant misses it?

Real parts: the trainable .tflite built by export/tflite_builder (mnist_cnn, FiLM patch, 4 uniform
DISTREAL variants), run in the bare LiteRT interpreter with 1 thread; a fresh kept set is sliced in
numpy every step; `ResourceMonitor` measures the CPU share from step times and psutil. Contention is
real too: the benchmark pins itself to one CPU and, part-way through the round, starts a busy-loop
process pinned to the same CPU, so the scheduler halves the benchmark's share.

The convergence column is a stand-in (more kept filters = better), since no DSE runs here; only the
ordering matters to the selector.

    python3 benchmarks/selector_deadline.py [--steps 60] [--slack 1.35] [--out benchmarks/results/selector_deadline.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from edgepatch.device.backends.litert import LiteRTProgram
from edgepatch.device.profile import load_profile
from edgepatch.device.resources import RealClock, ResourceMonitor
from edgepatch.device.selector import VariantSelector
from edgepatch.export import tflite_builder
from edgepatch.export.reference_models import default_patch, mnist_cnn
from edgepatch.protocol.model_spec import param_infos
from edgepatch.protocol.params import init_params
from edgepatch.protocol.variants import Variant, sample_kept, slice_params, uniform_variant

BATCH = 32
RATIOS = (1.0, 0.75, 0.5, 0.25)


class Hog:
    """A busy loop pinned to `cpu`: halves the CPU share of anything else pinned there."""

    def __init__(self, cpu: int) -> None:
        code = f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True:\n    pass\n"
        self.proc = subprocess.Popen([sys.executable, "-c", code])

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _step_fn(program: LiteRTProgram, spec, patch, params, rng: np.random.Generator):  # type: ignore[no-untyped-def]
    infos = param_infos(spec, patch)
    x = rng.normal(size=(BATCH, *spec.input_shape)).astype(np.float32)
    y = rng.integers(0, spec.num_classes, size=BATCH).astype(np.int32)
    state = {"phi": np.zeros(patch.k, np.float32), "m": np.zeros(patch.k, np.float32),
             "v": np.zeros(patch.k, np.float32), "step": 0}

    def step(variant: Variant) -> float:
        """One real training step on φ with a fresh kept set; returns its wall time."""
        t0 = time.perf_counter()
        sliced = slice_params(params, infos, sample_kept(spec, variant, rng))
        out = program.train_phi(variant.id, x, y, state["phi"], state["m"], state["v"], float(state["step"]),
                                1e-3, sliced)
        state.update(phi=out["phi"], m=out["m"], v=out["v"], step=state["step"] + 1)
        return time.perf_counter() - t0

    return step


def calibrate(step, variants: list[Variant], warmup: int = 5, reps: int = 15) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Median ms per step for each variant on an uncontended CPU: the variant table's train_ms."""
    table = {}
    for v in variants:
        for _ in range(warmup):
            step(v)
        table[v.id] = 1000.0 * statistics.median(step(v) for _ in range(reps))
    return table


def run_round(step, variants: list[Variant], rows: list[dict], steps: int, deadline_s: float,  # type: ignore[no-untyped-def]
              hog_at_s: float, cpu: int, adaptive: bool) -> dict:
    profile = load_profile("linux_x86_64")
    clock = RealClock()
    monitor = ResourceMonitor(profile, clock=clock)
    for row in rows:
        monitor.calibrate(row["id"], row["train_ms"]["litert"] / 1000.0)
    selector = VariantSelector(rows, profile, reselect_every=5)
    by_id = {v.id: v for v in variants}
    variant = variants[0]
    used: list[str] = []
    hog: Hog | None = None
    start = clock.now()
    try:
        for done in range(steps):
            elapsed = clock.now() - start
            if hog is None and elapsed >= hog_at_s:
                hog = Hog(cpu)
            snap = monitor.snapshot()
            if adaptive and selector.due():
                variant = by_id[selector.select(deadline_s - elapsed, steps - done, snap, "litert").variant_id]
            seconds = step(variant)
            monitor.record_step(variant.id, seconds)
            selector.observe(variant.id, seconds, cpu_share=snap.cpu_share)
            used.append(variant.id)
        total = clock.now() - start
    finally:
        if hog is not None:
            hog.stop()
    return {"policy": "adaptive" if adaptive else "always_full", "elapsed_s": total,
            "deadline_s": deadline_s, "met": total <= deadline_s, "hog_started": hog is not None,
            "steps_per_variant": {vid: used.count(vid) for vid in by_id if used.count(vid)},
            "decisions": [{"variant": d.variant_id, "fits": d.fits, "cpu_share": round(d.inputs["cpu_share"], 3),
                           "time_left_s": round(d.inputs["time_left_s"], 3), "steps_left": d.inputs["steps_left"]}
                          for d in selector.history]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--slack", type=float, default=1.35, help="deadline = slack × steps × full-variant time")
    ap.add_argument("--hog-at", type=float, default=0.35, help="contention starts at this fraction of the deadline")
    ap.add_argument("--cpu", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "selector_deadline.json")
    args = ap.parse_args()

    os.sched_setaffinity(0, {args.cpu})
    spec = mnist_cnn()
    patch = default_patch(spec, "film", k=16)
    variants = [uniform_variant(spec, r) for r in RATIOS]
    t0 = time.perf_counter()
    program = LiteRTProgram(tflite_builder.build_trainable_tflite(spec, patch, variants, batch=BATCH), num_threads=1)
    build_s = time.perf_counter() - t0
    step = _step_fn(program, spec, patch, init_params(spec, patch, seed=0), np.random.default_rng(0))

    # The machine is shared: re-calibrate right before every pair of rounds and alternate which policy
    # goes first, so slow drift in background load does not favour one policy.
    results = []
    for rep in range(args.repeats):
        table = calibrate(step, variants)
        rows = [{"id": v.id, "keep": v.keep, "train_ms": {"litert": table[v.id]}, "memory_bytes": 0,
                 "convergence": 1.0 - r, "pareto": True} for v, r in zip(variants, RATIOS, strict=True)]
        deadline_s = args.slack * args.steps * table[variants[0].id] / 1000.0
        order = (False, True) if rep % 2 == 0 else (True, False)
        for adaptive in order:
            result = run_round(step, variants, rows, args.steps, deadline_s, args.hog_at * deadline_s,
                               args.cpu, adaptive)
            results.append({"repeat": rep, "train_ms_litert": table, **result})

    report = {"benchmark": "selector_deadline", "model": spec.name, "batch": BATCH, "steps": args.steps,
              "slack": args.slack, "hog_at_fraction": args.hog_at, "build_s": build_s,
              "load_avg_at_end": os.getloadavg(), "machine": platform.machine(), "python": platform.python_version(),
              "rounds": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))

    print(f"{'rep':>3} {'policy':<12} {'full ms':>8} {'deadline s':>10} {'elapsed s':>10} {'met':>5}  steps per variant")
    for r in results:
        print(f"{r['repeat']:>3} {r['policy']:<12} {r['train_ms_litert'][variants[0].id]:>8.1f} "
              f"{r['deadline_s']:>10.2f} {r['elapsed_s']:>10.2f} {str(r['met']):>5}  {r['steps_per_variant']}")
    met = {p: sum(r["met"] for r in results if r["policy"] == p) for p in ("always_full", "adaptive")}
    print(f"deadlines met: always_full {met['always_full']}/{args.repeats}, adaptive {met['adaptive']}/{args.repeats}"
          f" (CPU halved from {args.hog_at:.0%} of the deadline)")
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
