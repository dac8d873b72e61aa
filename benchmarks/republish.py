"""Republishing after MoMoDistill: seconds per republication and bytes per device per base update.

For each model (the reference CNNs and the MLPerf Tiny models of export/reference_models.py) a bundle
with LiteRT and ExecuTorch programs is exported once (variant "1", weights initialized: the weights'
values do not change the republication's cost). Then, `--reps` times, new weights (the exported ones
plus noise, standing in for a distillation round) are republished with cloud/republish.py — the
companion's code path, no converter — and timed. A device of each runtime then fetches the republished
bundle over HTTP from the companion's web server (device/fetch.py, the real code), starting from the
exported bundle: the bytes it downloads are counted (manifest included).

    python3 benchmarks/republish.py                       # all six models, 3 republications each
    python3 benchmarks/republish.py --models digits_cnn --reps 5 --out results/republish.json

Targets (issue 13): ≤ 5 s per republication for every model; a base update costs a device at most the
model's parameter bytes in fp32 (all parameters: W, θ̄ and Θ), manifest included.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edgepatch.cloud.republish import republish_bundle
from edgepatch.cloud.store import PatchStore, sqlite_url
from edgepatch.cloud.web import FleetWeb
from edgepatch.device.fetch import fetch_bundle
from edgepatch.export.pipeline import ExportOptions, export_bundle
from edgepatch.export.reference_models import MLPERF_MODELS, REFERENCE_MODELS, default_patch
from edgepatch.export.resolve import load_model
from edgepatch.protocol.bundle import load_bundle
from edgepatch.protocol.model_spec import param_infos
from edgepatch.protocol.params import init_params, save_params, write_atomic

TARGET_S = 5.0
RUNTIMES = ("litert", "executorch")


def bench_model(name: str, reps: int, work: Path, web: FleetWeb) -> dict:
    source = name if name in REFERENCE_MODELS else f"edgepatch.export.reference_models:{name}"
    spec, _ = load_model(source, None, use_source_weights=False)
    patch = default_patch(spec)
    save_params(work / f"{name}-w.npz", init_params(spec, None, 0))
    exported = work / f"{name}-0"
    t0 = time.perf_counter()
    export_bundle(ExportOptions(model=source, weights=work / f"{name}-w.npz", variants="1", runtimes=RUNTIMES), exported)
    export_s = time.perf_counter() - t0
    with load_bundle(exported) as old:
        params = old.all_params()
    fp32_bytes = 4 * sum(int(np.prod(i.shape)) for i in param_infos(spec, patch).values())
    rng = np.random.default_rng(1)
    seconds, out = [], exported
    for rep in range(reps):
        new = {n: (v + rng.normal(scale=0.01, size=v.shape)).astype(np.float32) for n, v in params.items()}
        out = work / f"{name}-{rep + 1}"
        t0 = time.perf_counter()
        republish_bundle(exported, new, out)
        seconds.append(time.perf_counter() - t0)
    with load_bundle(out) as nxt:
        version = nxt.version
        url = web.serve_bundle(f"{name}-next", out)
    updates = {}
    with load_bundle(exported) as have:
        for runtime in RUNTIMES:
            _, stats = fetch_bundle(url, version, work / f"{name}-dl-{runtime}", have, 1 << 28, runtime=runtime)
            updates[runtime] = {"downloaded_bytes": stats.downloaded_bytes, "reused_bytes": stats.reused_bytes,
                                "rebuilt_bytes": stats.rebuilt_bytes, "skipped_bytes": stats.skipped_bytes,
                                "ratio_to_fp32_params": round(stats.downloaded_bytes / fp32_bytes, 3)}
    return {"model": name, "params": fp32_bytes // 4, "fp32_param_bytes": fp32_bytes,
            "manifest_bytes": (out / "manifest.json").stat().st_size, "export_s": round(export_s, 1),
            "republish_s_median": round(statistics.median(seconds), 3), "republish_s_max": round(max(seconds), 3),
            "updates": updates}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=[*REFERENCE_MODELS, *MLPERF_MODELS])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("results/republish.json"))
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="edgepatch-republish-"))
    store = PatchStore(sqlite_url(work / "s.sqlite"))
    web = FleetWeb(store)
    web.start()
    rows = []
    try:
        for name in args.models:
            rows.append(bench_model(name, args.reps, work, web))
            print(f"{name}: republish {rows[-1]['republish_s_median']} s", file=sys.stderr, flush=True)
    finally:
        web.stop()
        store.close()
        shutil.rmtree(work, ignore_errors=True)
    seconds_ok = all(r["republish_s_max"] <= TARGET_S for r in rows)
    bytes_ok = all(u["downloaded_bytes"] <= r["fp32_param_bytes"] for r in rows for u in r["updates"].values())
    result = {"reps": args.reps, "target_s": TARGET_S, "rows": rows,
              "targets": {"republish_le_5s": seconds_ok, "update_le_fp32_params": bytes_ok}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out, (json.dumps(result, indent=1) + "\n").encode())
    print(f"{'model':18} {'params':>8} {'export s':>9} {'republish s':>12} {'LiteRT update B':>16} "
          f"{'ExecuTorch update B':>20} {'fp32 params B':>14}")
    for r in rows:
        lt, et = r["updates"]["litert"], r["updates"]["executorch"]
        print(f"{r['model']:18} {r['params']:>8} {r['export_s']:>9} {r['republish_s_median']:>12} "
              f"{lt['downloaded_bytes']:>16} {et['downloaded_bytes']:>20} {r['fp32_param_bytes']:>14}")
    print(f"(update bytes: manifest + downloaded artifacts over HTTP by device/fetch.py; results in {args.out})")
    print(f"targets: republish <= {TARGET_S:g} s for every model: {'MET' if seconds_ok else 'NOT MET'}; "
          f"base update <= fp32 parameter bytes per device: {'MET' if bytes_ok else 'NOT MET'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
