"""Is the on-device φ step faster than the framework a user would run instead? One run, side by side.

For each model (the reference CNN mnist_cnn and the MLPerf Tiny models), batch B, FiLM k = 16, full
variant, the same random weights, φ, x and y in every cell:
- `litert_phi`: the trainable program's `train_phi_<full>` signature, weights as inputs, exactly as the
  device calls it (device/backends/litert.py `LiteRTProgram.train_phi`);
- `litert_phi_const`: the bundle's `litert_phi_const` program (export/pipeline.py: `build_phi_const_tflite`
  through `build_frozen`), the same step with the weights baked in as constants — what the device's engine
  runs for every full-variant φ step with the bundle's own weights (device/phi_const.py);
- `litert_infer`: the frozen inference program of the same variant (weights baked), batch B;
- `torch_phi`: torch eager, export/torch_model.py forward, autograd on φ only, torch.optim.Adam;
- `torch_infer`: torch eager forward under inference_mode;
- `et_phi`: the ExecuTorch φ program (gradient out, Adam in numpy, as device/engine.py does);
- `et_infer`: the XNNPACK-delegated ExecuTorch inference program.
Every cell runs in its own process (peak RSS = its VmHWM: the runtime, the program and the inputs, no
exporter). LiteRT and torch use `--threads` threads; ExecuTorch's XNNPACK threadpool is not settable from
its Python bindings (its default is used). Each cell: 3 warm-up steps, `--reps` timed; the whole table is
run `--rounds` times (cells interleaved per round) and the smallest median per cell kept, so a burst of
load from other processes on the machine does not decide a ratio. Each step is timed twice: wall clock
(the target's measure) and the process's CPU time (all its threads), which a shared machine disturbs less.

    python3 benchmarks/step_vs_torch.py --reps 20 --rounds 2            # all models, 1 thread
    python3 benchmarks/step_vs_torch.py --models mnist_cnn --threads 2 --no-executorch

Targets (issue 13, item 6): the LiteRT φ step faster than the torch eager step, and within 3× of the
frozen inference of the same variant. The device's φ step is `litert_phi_const`; the last line says whether
the targets are met for it by wall clock (and, in brackets, by CPU time); `litert_phi` (weights as inputs,
what variants other than the full one and bundles exported before the baked program run) is shown beside.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

K = 16
LITERT_CELLS = ("litert_phi", "litert_phi_const", "litert_infer")
TORCH_CELLS = ("torch_phi", "torch_infer")
ET_CELLS = ("et_phi", "et_infer")


def _model(name: str):  # noqa: ANN202 - (spec, patch)
    from edgepatch.export.reference_models import MLPERF_MODELS, REFERENCE_MODELS, default_patch

    table = {**REFERENCE_MODELS, **MLPERF_MODELS}
    if name not in table:
        raise SystemExit(f"unknown model {name!r}; choose from {', '.join(table)}")
    spec = table[name]()
    return spec, default_patch(spec, k=K)


def _inputs(spec, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # noqa: ANN001
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, *spec.input_shape)).astype(np.float32)
    y = rng.integers(0, spec.num_classes, batch).astype(np.int32)
    phi = rng.normal(0.0, 0.1, K).astype(np.float32)
    return x, y, phi


def build(name: str, batch: int, out: Path, executorch: bool) -> None:
    """Every program of one model into `out` (the exporters run here, never in a timed process)."""
    from edgepatch.export.frozen import build_frozen
    from edgepatch.export.tflite_builder import (
        build_inference_tflite,
        build_phi_const_tflite,
        build_trainable_tflite,
    )
    from edgepatch.protocol.params import init_params, save_params
    from edgepatch.protocol.variants import full_variant

    spec, patch = _model(name)
    params = init_params(spec, patch, seed=0)
    save_params(out / "params.npz", params)
    (out / "trainable.tflite").write_bytes(build_trainable_tflite(spec, patch, [full_variant(spec)], batch))
    (out / "phi_const.tflite").write_bytes(build_frozen(build_phi_const_tflite, spec, patch, params, batch)[0])
    (out / "infer.tflite").write_bytes(build_inference_tflite(spec, patch, params, batch))
    if executorch:
        from edgepatch.export.executorch_builder import build_inference_pte, build_train_phi_pte

        (out / "train_phi.pte").write_bytes(build_train_phi_pte(spec, patch, full_variant(spec), batch))
        (out / "infer.pte").write_bytes(build_inference_pte(spec, patch, params, batch))


def _step(cell: str, name: str, d: Path, batch: int, threads: int) -> Callable[[], object]:
    """One step of `cell`, with everything loaded; imports only what that runtime needs."""
    from edgepatch.protocol.params import load_params
    from edgepatch.protocol.variants import full_variant

    spec, patch = _model(name)
    params = load_params(d / "params.npz")
    x, y, phi = _inputs(spec, batch)
    zeros = np.zeros(K, np.float32)
    if cell.startswith("litert"):
        from edgepatch.device.backends.litert import LiteRTProgram

        if cell == "litert_phi":
            prog, vid = LiteRTProgram(d / "trainable.tflite", threads), full_variant(spec).id
            return lambda: prog.train_phi(vid, x, y, phi, zeros, zeros, 0.0, 0.01, params)
        if cell == "litert_phi_const":
            prog = LiteRTProgram(d / "phi_const.tflite", threads)
            return lambda: prog.run("train_phi", x=x, y=y, phi=phi, m=zeros, v=zeros,
                                    step=np.float32(0.0), lr=np.float32(0.01))
        prog = LiteRTProgram(d / "infer.tflite", threads)
        return lambda: prog.infer(x, phi)
    if cell.startswith("torch"):
        import torch
        import torch.nn.functional as F

        from edgepatch.export.torch_model import forward, to_tensors

        torch.set_num_threads(threads)
        weights = to_tensors(params)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
        phit = torch.tensor(phi, requires_grad=True)
        if cell == "torch_infer":
            def infer() -> object:
                with torch.inference_mode():
                    return forward(spec, patch, weights, xt, phit)
            return infer
        opt = torch.optim.Adam([phit], lr=0.01)

        def torch_step() -> object:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(forward(spec, patch, weights, xt, phit), yt)
            loss.backward()
            opt.step()
            return loss
        return torch_step
    from edgepatch.device.backends.executorch import ExecuTorchInference, ExecuTorchPhiTrainer
    from edgepatch.protocol.optim import AdamConfig, adam_step

    if cell == "et_phi":
        trainer, adam = ExecuTorchPhiTrainer(d / "train_phi.pte"), AdamConfig()
        y64 = y.astype(np.int64)

        def et_step() -> object:
            _, grad = trainer.grad(x, y64, phi, params)
            return adam_step(phi, grad, zeros, zeros, 0.0, adam, lr=0.01)
        return et_step
    infer_prog = ExecuTorchInference(d / "infer.pte")
    return lambda: infer_prog.infer(x, phi)


def _vmhwm_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return -1


def worker(cell: str, name: str, d: Path, batch: int, threads: int, reps: int) -> None:
    step = _step(cell, name, d, batch, threads)
    for _ in range(3):
        step()
    times, cpu = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    heavy = sorted(m for m in ("tensorflow", "torch") if m in sys.modules)
    print(json.dumps({"median_ms": statistics.median(times), "median_cpu_ms": statistics.median(cpu),
                      "peak_rss_mb": _vmhwm_kb() / 1024, "frameworks_imported": heavy}))


def run_cell(cell: str, name: str, d: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", cell, "--models", name, "--dir", str(d), "--batch",
           str(args.batch), "--threads", str(args.threads), "--reps", str(args.reps)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{name}/{cell} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def ratios(ms: dict[str, float]) -> dict[str, float]:
    out = {}
    for prog in ("litert_phi", "litert_phi_const", "et_phi"):
        if prog in ms:
            out[f"{prog}/torch_phi"] = ms[prog] / ms["torch_phi"]
            infer = "et_infer" if prog == "et_phi" else "litert_infer"
            out[f"{prog}/{infer}"] = ms[prog] / ms[infer]
    out["torch_phi/torch_infer"] = ms["torch_phi"] / ms["torch_infer"]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from edgepatch.export.reference_models import MLPERF_MODELS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(["mnist_cnn", *MLPERF_MODELS]))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-executorch", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("results/step_vs_torch.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if min(args.batch, args.threads, args.reps, args.rounds) < 1:
        ap.error("--batch, --threads, --reps and --rounds must be >= 1")
    if args.worker:
        worker(args.worker, args.models, args.dir, args.batch, args.threads, args.reps)
        return 0
    cells = (*LITERT_CELLS, *TORCH_CELLS, *(() if args.no_executorch else ET_CELLS))
    report: dict = {"batch": args.batch, "k": K, "threads": args.threads, "reps": args.reps,
                    "rounds": args.rounds, "variant": "full", "models": {}}
    with tempfile.TemporaryDirectory(prefix="step-vs-torch-") as tmp:
        for name in args.models.split(","):
            d = Path(tmp) / name
            d.mkdir()
            build(name, args.batch, d, not args.no_executorch)
            runs: dict[str, list[dict]] = {c: [] for c in cells}
            for _ in range(args.rounds):
                for cell in cells:
                    runs[cell].append(run_cell(cell, name, d, args))
            ms = {c: min(r["median_ms"] for r in runs[c]) for c in cells}
            cpu = {c: min(r["median_cpu_ms"] for r in runs[c]) for c in cells}
            report["models"][name] = {
                "ms": {c: round(v, 3) for c, v in ms.items()},
                "cpu_ms": {c: round(v, 3) for c, v in cpu.items()},
                "cpu_ratios": {k: round(v, 3) for k, v in ratios(cpu).items()},
                "ms_per_round": {c: [round(r["median_ms"], 3) for r in runs[c]] for c in cells},
                "peak_rss_mb": {c: round(max(r["peak_rss_mb"] for r in runs[c]), 1) for c in cells},
                "frameworks_imported": {c: runs[c][0]["frameworks_imported"] for c in cells},
                "program_bytes": {p.name: p.stat().st_size for p in sorted(d.iterdir())},
                "ratios": {k: round(v, 3) for k, v in ratios(ms).items()}}
    report["targets"] = targets(report["models"])
    report["load_average_1_5_15"] = [round(v, 2) for v in os.getloadavg()]  # other processes share the CPU
    from edgepatch.protocol.params import write_atomic

    write_atomic(args.out, (json.dumps(report, indent=2) + "\n").encode())
    print_table(report, cells)
    print(f"written to {args.out}")
    print(f"load average at the end: {report['load_average_1_5_15']} on {os.cpu_count()} CPUs")
    print(verdict(report["targets"]))
    return 0


def targets(models: dict) -> dict[str, dict[str, bool]]:
    """Per LiteRT φ program and clock: faster than torch eager and within 3× of the frozen inference, per model."""
    out: dict[str, dict[str, bool]] = {}
    for prog in ("litert_phi_const", "litert_phi"):
        for clock, key in (("wall", "ratios"), ("cpu", "cpu_ratios")):
            out[f"{prog}/{clock}"] = {
                name: m[key][f"{prog}/torch_phi"] < 1.0 and m[key][f"{prog}/litert_infer"] <= 3.0
                for name, m in models.items()}
    return out


def verdict(t: dict[str, dict[str, bool]]) -> str:
    def missed(key: str) -> str:
        bad = [n for n, ok in t[key].items() if not ok]
        return "met on every model" if not bad else f"NOT met on {', '.join(bad)}"

    return ("targets (φ step < torch eager step and <= 3x frozen inference): device φ step (litert_phi_const) "
            f"{missed('litert_phi_const/wall')} by wall clock [{missed('litert_phi_const/cpu')} by CPU time]; "
            f"weights-as-inputs program (litert_phi) {missed('litert_phi/wall')}")


def print_table(report: dict, cells: Sequence[str]) -> None:
    print(f"batch {report['batch']}, k {report['k']}, {report['threads']} thread(s), full variant; "
          "median ms (peak RSS MB)")
    print(f"{'model':18} " + " ".join(f"{c:>18}" for c in cells))
    for name, m in report["models"].items():
        print(f"{name:18} " + " ".join(f"{m['ms'][c]:8.2f} ({m['peak_rss_mb'][c]:6.0f})" for c in cells))
    print("CPU ms per step (process time, all threads)")
    for name, m in report["models"].items():
        print(f"{name:18} " + " ".join(f"{m['cpu_ms'][c]:18.2f}" for c in cells))
    for title, key in (("ratios (wall clock)", "ratios"), ("ratios (CPU time)", "cpu_ratios")):
        print(title)
        for name, m in report["models"].items():
            print(f"{name:18} " + "  ".join(f"{k} {v:.2f}" for k, v in m[key].items()))


if __name__ == "__main__":
    raise SystemExit(main())
