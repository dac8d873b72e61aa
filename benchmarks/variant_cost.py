"""What a DISTREAL dropout variant really costs: train_full, train_phi and infer per variant, per runtime.

All runtimes and variants are timed in one run with interleaved repetitions (so background load hits
every cell alike) and reported as medians, with the ratio to the full model and the FLOP ratio.

    python3 benchmarks/variant_cost.py                       # mnist_cnn, batch 32, 100/75/50/25 %
    python3 benchmarks/variant_cost.py --variants conv1=1.0,conv2=0.5 --reps 40 --out results/x.json
    python3 benchmarks/variant_cost.py --model resnet8_cifar --ratios 1.0 0.5 --reps 5   # MLPerf Tiny models

Runtimes: LiteRT always; ExecuTorch through `edgepatch.export.executorch_builder.benchmark_tasks(spec, patch,
variants, params, batch, rng) -> {(variant_id, kind): callable}` (when executorch is installed), kind
in {"train_full", "train_phi", "infer"}; each callable runs one step on prepared inputs.

Issue 2's target (50 % of the filters on every conv: both training steps <= 0.55x, inference <= 0.45x of
the full model) is checked per runtime on the measured medians and written under "targets".

"litert_phi_peak_rss" is the peak resident memory of a separate LiteRT device process (numpy + the LiteRT
interpreter only, no TensorFlow or torch) that loads the trainable program and runs `--rss-steps` φ steps
of the 50 % variant, slicing the parameters per step as the device does.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np

from edgepatch.protocol.model_spec import ModelSpec, PatchSpec, dumps, param_infos
from edgepatch.protocol.params import Params, init_params, load_params, save_params, write_atomic
from edgepatch.protocol.variants import (
    Variant,
    filter_flops,
    full_variant,
    sample_kept,
    slice_params,
    uniform_variant,
    variant_id,
)

KINDS = ("train_full", "train_phi", "infer")
Task = Callable[[], object]
TaskTable = dict[tuple[str, str], Task]  # (variant id, kind) -> one step
TaskFactory = Callable[[ModelSpec, PatchSpec, Sequence[Variant], Params, int, np.random.Generator], TaskTable]


def litert_tasks(spec: ModelSpec, patch: PatchSpec, variants: Sequence[Variant], params: Params, batch: int,
                 rng: np.random.Generator, threads: int | None = None, model_bytes: bytes | None = None
                 ) -> TaskTable:
    """One trainable .tflite with every variant; each task runs one signature on a fixed kept set."""
    from edgepatch.device.backends.litert import LiteRTProgram
    from edgepatch.export.tflite_builder import build_inference_tflite, build_trainable_tflite

    if model_bytes is None:
        model_bytes = build_trainable_tflite(spec, patch, variants, batch=batch)
    program = LiteRTProgram(model_bytes, num_threads=threads)
    infos = param_infos(spec, patch)
    x = rng.normal(size=(batch, *spec.input_shape)).astype(np.float32)
    y = rng.integers(0, spec.num_classes, batch).astype(np.int32)
    phi = rng.normal(0.0, 0.1, patch.k).astype(np.float32)
    zeros = np.zeros(patch.k, np.float32)
    tasks: TaskTable = {}
    for variant in variants:
        sliced = slice_params(params, infos, sample_kept(spec, variant, rng))
        base = {n: p for n, p in sliced.items() if infos[n].role == "base"}
        vid = variant.id
        tasks[(vid, "train_full")] = partial(program.train_full, vid, x, y, base)
        tasks[(vid, "train_phi")] = partial(program.train_phi, vid, x, y, phi, zeros, zeros, 0.0, 0.01, sliced)
        tasks[(vid, "infer")] = partial(program.infer_variant, vid, x, phi, sliced)
    # the frozen inference program, for scale: what the device uses to serve predictions
    frozen = LiteRTProgram(build_inference_tflite(spec, patch, params), num_threads=threads)
    tasks[("frozen", "infer")] = lambda: frozen.infer(x, phi)
    return tasks


def litert_phi_peak_rss(model_bytes: bytes, spec: ModelSpec, patch: PatchSpec, variant: Variant, params: Params,
                        batch: int, steps: int) -> dict:
    """Peak RSS of a fresh LiteRT device process training φ on `variant` (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="edgepatch-rss-") as tmp:
        paths = {"program": Path(tmp) / "train.tflite", "params": Path(tmp) / "params.npz",
                 "spec": Path(tmp) / "spec.json"}
        paths["program"].write_bytes(model_bytes)
        save_params(paths["params"], params)
        paths["spec"].write_text(json.dumps({"model": json.loads(dumps(spec)), "patch": json.loads(dumps(patch)),
                                             "variant": {"id": variant.id, "keep": variant.keep}}))
        cmd = [sys.executable, __file__, "--rss-child", str(paths["spec"]), str(paths["program"]),
               str(paths["params"]), str(batch), str(steps)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _rss_child(spec_path: str, program_path: str, params_path: str, batch: int, steps: int) -> None:
    """The device side of `litert_phi_peak_rss`: LiteRT and numpy only (asserted), φ steps, peak RSS."""
    from edgepatch.device.backends.litert import LiteRTProgram
    from edgepatch.protocol.model_spec import ModelSpec as Spec
    from edgepatch.protocol.model_spec import PatchSpec as Patch

    desc = json.loads(Path(spec_path).read_text())
    spec, patch = Spec.from_dict(desc["model"]), Patch.from_dict(desc["patch"])
    variant = Variant(desc["variant"]["id"], desc["variant"]["keep"])
    params = load_params(params_path)
    program = LiteRTProgram(program_path)
    infos = param_infos(spec, patch)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, *spec.input_shape)).astype(np.float32)
    y = rng.integers(0, spec.num_classes, batch).astype(np.int32)
    phi, m, v = (np.zeros(patch.k, np.float32) for _ in range(3))
    start = time.perf_counter()
    for step in range(steps):
        sliced = slice_params(params, infos, sample_kept(spec, variant, rng))
        out = program.train_phi(variant.id, x, y, phi, m, v, float(step), 0.01, sliced)
        phi, m, v = out["phi"], out["m"], out["v"]
    elapsed = time.perf_counter() - start
    heavy = sorted(m for m in ("tensorflow", "torch") if m in sys.modules)
    assert not heavy, f"the device process imported {heavy}"
    peak_kb = _vm_hwm_kb()
    print(json.dumps({"variant": variant.id, "steps": steps, "batch": batch, "peak_rss_mb": peak_kb / 1024,
                      "ms_per_step": 1e3 * elapsed / steps, "program_mb": Path(program_path).stat().st_size / 2**20}))


def _vm_hwm_kb() -> float:
    """This process's peak RSS. Not getrusage's ru_maxrss: Linux carries that across exec from the forked
    parent (here a process with TensorFlow loaded), while VmHWM belongs to the new address space."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return float(line.split()[1])
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # not Linux: the best available


def executorch_factory() -> TaskFactory | None:
    """The ExecuTorch half, if its backend exposes `benchmark_tasks` (see the module docstring)."""
    try:
        from edgepatch.export.executorch_builder import benchmark_tasks
    except ImportError as exc:  # executorch not installed: the LiteRT numbers still stand
        print(f"[variant_cost] ExecuTorch skipped: {exc}", file=sys.stderr)
        return None
    return benchmark_tasks


def parse_variant(text: str, spec: ModelSpec) -> Variant:
    """'conv1=1.0,conv2=0.5' -> a Variant (unnamed layers keep everything)."""
    keep: dict[str, float] = {}
    for item in text.split(","):
        name, _, ratio = item.partition("=")
        if name.strip() not in spec.droppable_layers():
            raise SystemExit(f"--variants: {name!r} is not a droppable layer of {spec.name} "
                             f"({', '.join(spec.droppable_layers())})")
        keep[name.strip()] = float(ratio)
    return Variant(variant_id(keep, spec.droppable_layers()), keep)


def measure(runtimes: dict[str, TaskTable], reps: int, warmup: int) -> dict[str, dict[tuple[str, str], float]]:
    """Median ms per task; every repetition visits every (runtime, task) once, in a rotating order."""
    cells = [(rt, key) for rt, table in runtimes.items() for key in table]
    for rt, key in cells:
        for _ in range(warmup):
            runtimes[rt][key]()
    samples: dict[tuple[str, tuple[str, str]], list[float]] = {cell: [] for cell in cells}
    for rep in range(reps):
        shift = rep % len(cells)
        for rt, key in cells[shift:] + cells[:shift]:
            start = time.perf_counter()
            runtimes[rt][key]()
            samples[(rt, key)].append((time.perf_counter() - start) * 1e3)
    result: dict[str, dict[tuple[str, str], float]] = {rt: {} for rt in runtimes}
    for (rt, key), values in samples.items():
        result[rt][key] = statistics.median(values)
    return result


TRAIN_RATIO_MAX, INFER_RATIO_MAX = 0.55, 0.45  # issue 2's target at 50 % of the filters on every conv


def targets(report: dict, variant: str) -> dict:
    """Issue 2's target per runtime, checked on the measured ratios (both training programs count)."""
    result: dict = {"variant": variant, "train_ratio_max": TRAIN_RATIO_MAX, "infer_ratio_max": INFER_RATIO_MAX,
                    "runtimes": {}}
    for rt, rows in report["runtimes"].items():
        row = rows.get(variant)
        if not row:
            continue
        checks = {f"{kind}_ratio": row[f"{kind}_ratio"] for kind in KINDS}
        met = (checks["train_full_ratio"] <= TRAIN_RATIO_MAX and checks["train_phi_ratio"] <= TRAIN_RATIO_MAX
               and checks["infer_ratio"] <= INFER_RATIO_MAX)
        result["runtimes"][rt] = {**checks, "met": met}
    return result


def set_executorch_threads(threads: int | None) -> int | None:
    """Give ExecuTorch's (process-wide) XNNPACK/kernel thread pool the same count as LiteRT's interpreters,
    so `--threads` compares like with like; returns the count in effect (None: ExecuTorch not installed)."""
    try:
        from executorch.extension.pybindings import portable_lib
    except ImportError:
        return None
    if threads is not None:
        portable_lib._unsafe_reset_threadpool(threads)  # before any program is loaded
    return int(portable_lib._threadpool_get_thread_count())


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--rss-child"]:
        _rss_child(argv[1], argv[2], argv[3], int(argv[4]), int(argv[5]))
        return 0
    from edgepatch.export.reference_models import MLPERF_MODELS, REFERENCE_MODELS, default_patch
    from edgepatch.export.tflite_builder import build_trainable_tflite

    models = {**REFERENCE_MODELS, **MLPERF_MODELS}
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mnist_cnn", choices=sorted(models))
    ap.add_argument("--patch", default="film", choices=["film", "lowrank"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ratios", type=float, nargs="+", default=[1.0, 0.75, 0.5, 0.25])
    ap.add_argument("--variants", nargs="*", default=[], help="extra variants, e.g. conv1=1.0,conv2=0.5")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="threads of LiteRT's interpreters and ExecuTorch's thread pool "
                    "(default: each runtime's own)")
    ap.add_argument("--no-executorch", action="store_true")
    ap.add_argument("--rss-steps", type=int, default=20, help="φ steps of the peak-RSS device process (0: skip)")
    ap.add_argument("--out", default="results/variant_cost.json")
    args = ap.parse_args(argv)

    spec = models[args.model]()
    patch = default_patch(spec, args.patch)
    params = init_params(spec, patch, seed=0)
    variants = [full_variant(spec) if r == 1.0 else uniform_variant(spec, r) for r in args.ratios]
    variants += [parse_variant(text, spec) for text in args.variants]
    variants = list({v.id: v for v in variants}.values())
    full_id = full_variant(spec).id
    if full_id not in {v.id for v in variants}:
        variants.insert(0, full_variant(spec))
    rng = np.random.default_rng(0)

    model_bytes = build_trainable_tflite(spec, patch, variants, batch=args.batch)
    half = uniform_variant(spec, 0.5)
    rss = None
    if args.rss_steps > 0 and half.id in {v.id for v in variants}:  # before the timing: a quiet process
        rss = litert_phi_peak_rss(model_bytes, spec, patch, half, params, args.batch, args.rss_steps)
    runtimes: dict[str, TaskTable] = {"litert": litert_tasks(spec, patch, variants, params, args.batch, rng,
                                                             args.threads, model_bytes)}
    factory = None if args.no_executorch else executorch_factory()
    et_threads = None if factory is None else set_executorch_threads(args.threads)
    if factory is not None:
        runtimes["executorch"] = factory(spec, patch, variants, params, args.batch, rng)
    medians = measure(runtimes, args.reps, args.warmup)

    full_flops = filter_flops(spec)
    report: dict = {"model": spec.name, "patch": args.patch, "batch": args.batch, "reps": args.reps,
                    "threads": args.threads,
                    "executorch_threads": et_threads, "litert_phi_peak_rss": rss, "variants": {}, "runtimes": {}}
    for v in variants:
        report["variants"][v.id] = {"keep": v.keep, "widths": v.widths(spec),
                                    "flops_ratio": filter_flops(v.spec(spec)) / full_flops}
    for rt, table in medians.items():
        rows: dict = {}
        for (vid, kind), ms in table.items():
            full_ms = table.get((full_id, kind))
            rows.setdefault(vid, {})[f"{kind}_ms"] = ms
            if full_ms and vid != "frozen":
                rows[vid][f"{kind}_ratio"] = ms / full_ms
        report["runtimes"][rt] = rows
    report["targets"] = targets(report, uniform_variant(spec, 0.5).id)

    out = Path(args.out)
    write_atomic(out, (json.dumps(report, indent=2) + "\n").encode())
    _print_table(report)
    print(f"wrote {out}")
    return 0


def _print_table(report: dict) -> None:
    print(f"\n{report['model']} ({report['patch']} patch), batch {report['batch']}, median of {report['reps']}")
    head = f"{'runtime':<11}{'variant':<12}{'FLOPs':>7}" + "".join(f"{k + ' ms':>15}{'ratio':>7}" for k in KINDS)
    print(head)
    print("-" * len(head))
    for rt, rows in report["runtimes"].items():
        for vid, row in rows.items():
            flops = report["variants"].get(vid, {}).get("flops_ratio")
            line = f"{rt:<11}{vid:<12}{'' if flops is None else f'{flops:.2f}':>7}"
            for kind in KINDS:
                ms, ratio = row.get(f"{kind}_ms"), row.get(f"{kind}_ratio")
                line += f"{'' if ms is None else f'{ms:.2f}':>15}{'' if ratio is None else f'{ratio:.2f}':>7}"
            print(line)
    rss = report.get("litert_phi_peak_rss")
    if rss:
        print(f"LiteRT device process, train_phi {rss['variant']} x{rss['steps']} at batch {rss['batch']}: peak RSS "
              f"{rss['peak_rss_mb']:.0f} MB ({rss['ms_per_step']:.1f} ms/step, program {rss['program_mb']:.1f} MB)")
    t = report.get("targets")
    if t:
        for rt, check in t["runtimes"].items():
            print(f"target {rt} at {t['variant']}: train_full {check['train_full_ratio']:.2f}x, train_phi "
                  f"{check['train_phi_ratio']:.2f}x <= {t['train_ratio_max']}x; infer {check['infer_ratio']:.2f}x "
                  f"<= {t['infer_ratio_max']}x -> {'met' if check['met'] else 'NOT met'}")


if __name__ == "__main__":
    raise SystemExit(main())
