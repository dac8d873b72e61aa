"""Canoe vs isolation vs full-model transfer + fine-tune vs FedAvg around a known drift (new classes appear).

Setting (scikit-learn digits, the digits_cnn bundle, LiteRT for every forward/backward):
- the shared starting model is pretrained on the cloud's data of classes 0..6 only (random init, LiteRT
  `train_full` + SGD), so classes 7..9 are truly new to the target;
- peers (`make_fleet`, no drift, Dirichlet α) have been fine-tuning on their own data of all classes;
- the target's stream comes from `make_fleet(..., drift=Drift(at, new_classes=(7, 8, 9)))`: after the
  drift, half its samples are of the new classes. It receives `chunk` samples per tick and takes
  `steps_per_chunk` full-weight SGD steps per tick on its own model in every method.
Methods over the same stream:
- isolation: the target learns alone;
- canoe: at the drift detector's request, the best-matching peer (label histograms of the requested classes
  × the share of the target's other classes it knows) ships its significant sub-network for the requested
  classes: the smallest sliced bundle variant (25 % of the filters here), top filters by Taylor importance,
  fine-tuned on its own data, in float16. The target boosts {own model, slice} with SAMME on its window
  (class-balanced, class-conditional soft vote; a slice votes only for the classes it was cut for), keeps
  learning — its own model and, `--slice-steps` per tick, each slice it holds — and asks again at once for
  a new label no request named yet (else after a cooldown while drift is still detected);
- full transfer: at the same detection time the same peer's whole model, in the same file format and
  encoding, replaces the target's, then fine-tunes;
- fedavg: every `fedavg_every` ticks from the start, target + peers average their full weights (each trains
  locally between rounds); bytes = raw float32 weights up + down per participant per round (a lower bound:
  no serialization overhead, favouring FedAvg).
Bytes for canoe / full transfer: the request message + the slice (or whole-model) file twice (helper ->
cloud -> target), in the same pickle-free npz format; envelope/base64 overhead is not counted.
Accuracy is measured on held-out test samples with the post-drift label mix (old and new classes
equally weighted). Time to recover = samples after the drift until that accuracy first reaches
`--recover-frac` of the target's pre-drift accuracy on the old classes. "target compute" = the target's
training work in full-weight steps (slice steps weighed by their measured cost): Canoe's slice steps are
extra work the other methods do not do. The last line states whether issue 13's targets are met: every
slice ≤ 0.25× the helper's whole model in the same format and encoding, and mean recovery no slower than
full-model transfer.

    python3 benchmarks/canoe.py            # exports a digits bundle (variants 1, 0.5, 0.25) first (~1.5 min)
    python3 benchmarks/canoe.py --bundle /path/to/that_bundle --seeds 5 [--first-seed 5]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgepatch.cloud.canoe import rank_helpers
from edgepatch.data.datasets import Dataset, load_digits
from edgepatch.data.fleet import Drift, base_split, make_fleet
from edgepatch.device.canoe_boost import TailoredModel, bundle_variants, tailored_from_bundle
from edgepatch.device.canoe_helper import CanoeHelper, SliceOptions, full_model_bytes, full_model_file
from edgepatch.device.canoe_target import CanoeTarget, DriftDetector
from edgepatch.protocol.bundle import Bundle, load_bundle
from edgepatch.protocol.canoe import CanoeMeta, CanoeReply, CanoeTask, decode_slice, encode_message
from edgepatch.protocol.params import init_params, write_atomic

NEW = (7, 8, 9)
OLD = tuple(c for c in range(10) if c not in NEW)


@dataclass
class Setup:
    bundle: Bundle
    start: TailoredModel
    peers: list[tuple[str, TailoredModel, np.ndarray, np.ndarray]]
    stream_x: np.ndarray
    stream_y: np.ndarray
    drift_index: int
    test_x: np.ndarray
    test_y: np.ndarray


def build(bundle: Bundle, seed: int, n_peers: int, pretrain_steps: int, peer_steps: int) -> Setup:
    data = load_digits()
    cloud, devices = base_split(data, fraction=0.3, seed=seed)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(devices))
    test_idx, target_idx, peer_idx = order[:300], order[300:800], order[800:]
    start = tailored_from_bundle(bundle)
    start.base = dict(init_params(start.spec, None, seed=seed + 1))
    old = np.flatnonzero(np.isin(cloud.y, OLD))
    for _ in range(pretrain_steps):
        idx = rng.choice(old, start.batch)
        start.train_step(cloud.x[idx], cloud.y[idx])
    drift = Drift(at=0.4, new_classes=NEW, new_class_share=0.5)
    target_data = make_fleet(devices.subset(target_idx, "target"), 1, alpha=100.0, shift="none", tail="uniform",
                             seed=seed, holdout_fraction=0.05, drift=drift)[0]
    peer_data = make_fleet(devices.subset(peer_idx, "peers"), n_peers, alpha=1.0, shift="none", tail="uniform",
                           seed=seed + 7, holdout_fraction=0.05)
    peers = []
    for k, dev in enumerate(peer_data):
        model = start.copy()
        for _ in range(peer_steps):
            idx = rng.choice(len(dev.train.y), model.batch)
            model.train_step(dev.train.x[idx], dev.train.y[idx])
        peers.append((f"peer-{k}", model, dev.train.x, dev.train.y.astype(np.int64)))
    stream: Dataset = target_data.train
    drift_index = int(np.searchsorted(stream.t, target_data.drift_time or 0.0))
    return Setup(bundle, start, peers, stream.x, stream.y.astype(np.int64), drift_index,
                 devices.x[test_idx], devices.y[test_idx].astype(np.int64))


def mixed_accuracy(pred: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(post-drift-mix accuracy, old-class accuracy, new-class accuracy)."""
    old = float((pred[np.isin(y, OLD)] == y[np.isin(y, OLD)]).mean())
    new = float((pred[np.isin(y, NEW)] == y[np.isin(y, NEW)]).mean())
    return 0.5 * old + 0.5 * new, old, new


def run_method(method: str, s: Setup, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    variants = bundle_variants(s.bundle)
    target = CanoeTarget("target", s.start.copy(), variants, s.bundle.base_version,
                         DriftDetector(10, reference=96, window=64), cooldown=args.cooldown, seed=seed)
    target.ensemble.balanced, target.ensemble.expert = args.balanced, args.expert
    target.ensemble.boosted_classes, target.ensemble.soft = args.boosted_classes, args.soft
    target.slice_steps = args.slice_steps
    options = SliceOptions(args.variant, args.mass, args.encoding, recover_steps=args.recover_steps, focus=args.focus)
    peers = [(name, m.copy(), x, y) for name, m, x, y in s.peers]
    metas = {name: CanoeMeta(np.bincount(y, minlength=10).tolist()) for name, _, _, y in peers}
    rng = np.random.default_rng(seed)
    curve, bytes_moved, events, slice_steps = [], 0, [], {}
    full_bytes_raw = 4 * sum(v.size for v in s.start.base.values())
    t0 = time.perf_counter()
    for tick, begin in enumerate(range(0, len(s.stream_y), args.chunk)):
        xb, yb = s.stream_x[begin:begin + args.chunk], s.stream_y[begin:begin + args.chunk]
        target.observe(xb, yb)
        for helper in target.ensemble.helpers:  # the target's extra compute: steps on each slice it holds
            slice_steps[helper.variant_id] = slice_steps.get(helper.variant_id, 0) + target.slice_steps
        target.learn(args.steps_per_chunk)
        if method == "fedavg":
            for _, model, x, y in peers:
                for _ in range(args.steps_per_chunk):
                    idx = rng.choice(len(y), model.batch)
                    model.train_step(x[idx], y[idx])
            if (tick + 1) % args.fedavg_every == 0:
                members = [target.model] + [m for _, m, _, _ in peers]
                avg = {k: np.mean([m.base[k] for m in members], axis=0).astype(np.float32) for k in target.model.base}
                for m in members:
                    m.base = {k: v.copy() for k, v in avg.items()}
                bytes_moved += 2 * full_bytes_raw * len(members)
        elif method in ("canoe", "full_transfer"):
            request = target.maybe_request()
            if request is not None and (method == "canoe" or not any(e["event"] == "full_model" for e in target.events)):
                bytes_moved += len(encode_message(request, fleet="bench", device_id="target"))
                ranked = rank_helpers(metas, request.classes, "target",
                                      context=request.label_histogram if args.context else None)
                if not ranked:
                    target.on_reply(CanoeReply(request.request_id, error="no_helper: none"))
                    continue
                name, model, x, y = next(p for p in peers if p[0] == ranked[0][0])
                event = {"sample": begin + len(yb), "classes": request.classes, "helper": name,
                         "full_bytes": full_model_bytes(model, options.encoding),
                         "full_bytes_float32": full_model_bytes(model, "float32")}
                if method == "canoe":
                    helper = CanoeHelper(name, model, x, y, variants, s.bundle.base_version, options=options, seed=seed)
                    offer = helper.answer(CanoeTask(request.request_id, "target", request.classes))
                    bytes_moved += 2 * offer.size  # helper -> cloud -> target
                    target.on_reply(CanoeReply(request.request_id, offer=offer))
                    event.update(slice_bytes=offer.size, variant=helper.served[-1]["variant"] if offer.ok else None)
                else:  # the whole model through the same file format and encoding (what it would receive)
                    blob = full_model_file(model, options.encoding)
                    target.adopt_full_model(decode_slice(blob).base, name, request.classes, len(blob))
                    bytes_moved += 2 * len(blob)  # helper -> cloud -> target
                events.append(event)
        pred = target.ensemble.predict(s.test_x)
        mix, old, new = mixed_accuracy(pred, s.test_y)
        curve.append({"samples": begin + len(yb), "acc": mix, "old": old, "new": new, "bytes": bytes_moved,
                      "weights": target.ensemble.weights()})
    return {"method": method, "curve": curve, "bytes": bytes_moved, "requests": events, "slice_steps": slice_steps,
            "own_steps": args.steps_per_chunk * len(curve),
            "seconds": time.perf_counter() - t0, "retired": target.ensemble.retired}


def step_costs(model: TailoredModel, variants: list[Any], reps: int = 20, rounds: int = 9) -> dict[str, float]:
    """Seconds of one full-weight SGD step of each variant relative to the full variant's, measured here:
    round-robin over the variants (a load spike hits them alike), median of `rounds` × `reps` steps; so the
    target's extra work on its slices is counted in full-step equivalents."""
    from edgepatch.device.engine import sgd_step
    from edgepatch.protocol.model_spec import param_infos
    from edgepatch.protocol.variants import first_kept, slice_params

    rng = np.random.default_rng(0)
    x = rng.random((model.batch, *model.spec.input_shape), dtype=np.float32)
    y = rng.integers(0, model.spec.num_classes, model.batch)
    bases = {v.id: slice_params(model.base, param_infos(model.spec, None), first_kept(model.spec, v)) for v in variants}
    times: dict[str, list[float]] = {vid: [] for vid in bases}
    for vid, base in bases.items():
        sgd_step(model.engine, vid, x, y, base, 0.0)  # warm-up
    for _ in range(rounds):
        for vid, base in bases.items():
            t = time.perf_counter()
            for _ in range(reps):
                sgd_step(model.engine, vid, x, y, base, 0.0)
            times[vid].append(time.perf_counter() - t)
    return {vid: float(np.median(ts) / np.median(times[model.full_vid])) for vid, ts in times.items()}


def time_to_recover(curve: list[dict[str, Any]], drift_index: int, threshold: float) -> int | None:
    for point in curve:
        if point["samples"] > drift_index and point["acc"] >= threshold:
            return int(point["samples"] - drift_index)
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=None, help="digits_cnn bundle with variants 1, 0.5 and 0.25")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--peers", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--steps-per-chunk", type=int, default=2)
    ap.add_argument("--pretrain-steps", type=int, default=250)
    ap.add_argument("--peer-steps", type=int, default=300)
    ap.add_argument("--fedavg-every", type=int, default=2, help="ticks between FedAvg rounds")
    ap.add_argument("--cooldown", type=int, default=96)
    ap.add_argument("--recover-frac", type=float, default=0.9)
    ap.add_argument("--variant", default="", help="ship this bundle variant; default: chosen by importance mass")
    ap.add_argument("--mass", type=float, default=SliceOptions.mass)
    ap.add_argument("--encoding", choices=("float32", "float16"), default=SliceOptions.encoding)
    ap.add_argument("--recover-steps", type=int, default=SliceOptions.recover_steps)
    ap.add_argument("--focus", type=float, default=SliceOptions.focus)
    ap.add_argument("--balanced", action=argparse.BooleanOptionalAction, default=True,
                    help="class-balanced SAMME sample weights at the target")
    ap.add_argument("--expert", action=argparse.BooleanOptionalAction, default=True,
                    help="a helper votes only for the classes it was asked for")
    ap.add_argument("--context", action=argparse.BooleanOptionalAction, default=True,
                    help="rank helpers also by the target's other classes they know (cloud.canoe.context_share)")
    ap.add_argument("--boosted-classes", action=argparse.BooleanOptionalAction, default=True,
                    help="class-conditional vote weights from SAMME's reweighted errors")
    ap.add_argument("--soft", action=argparse.BooleanOptionalAction, default=True,
                    help="members vote with weight × softmax probability instead of their argmax")
    ap.add_argument("--slice-steps", type=int, default=CanoeTarget.slice_steps,
                    help="target's steps per tick on each helper slice it holds")
    ap.add_argument("--methods", default="isolation,canoe,full_transfer,fedavg")
    ap.add_argument("--out", type=Path, default=Path("results/canoe.json"))
    args = ap.parse_args(argv)

    bundle_path = args.bundle
    if bundle_path is None:
        from edgepatch.export.pipeline import ExportOptions, export_bundle
        bundle_path = Path(tempfile.mkdtemp(prefix="canoe-bench-")) / "digits"
        print(f"exporting a digits bundle to {bundle_path} ...", file=sys.stderr)
        export_bundle(ExportOptions(variants="1,0.5,0.25", runtimes=("litert",), pretrain_epochs=8, dse_steps=5,
                                    dse_seeds=(0,)), bundle_path)
    bundle = load_bundle(bundle_path)
    methods = tuple(args.methods.split(","))
    runs: list[dict[str, Any]] = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        setup = build(bundle, seed, args.peers, args.pretrain_steps, args.peer_steps)
        pre = [mixed_accuracy(setup.start.logits(setup.test_x).argmax(1), setup.test_y)[1]]
        threshold = args.recover_frac * pre[0]
        for method in methods:
            result = run_method(method, setup, args, seed)
            result.update(seed=seed, drift_index=setup.drift_index, threshold=threshold,
                          recover=time_to_recover(result["curve"], setup.drift_index, threshold))
            runs.append(result)
            print(f"seed {seed} {method:14s} recover={result['recover']} samples  bytes={result['bytes']:>9d}  "
                  f"final acc={result['curve'][-1]['acc']:.3f}  ({result['seconds']:.1f} s)", file=sys.stderr)

    costs = step_costs(setup.start, bundle_variants(bundle))
    for r in runs:  # the target's training work in full-weight-step equivalents
        r["compute_steps"] = r["own_steps"] + sum(n * costs[v] for v, n in r["slice_steps"].items())
    summary: dict[str, Any] = {"step_cost_vs_full": costs}
    horizon = max(len(r["curve"]) for r in runs)
    for method in methods:
        rs = [r for r in runs if r["method"] == method]
        rec = [r["recover"] for r in rs]
        # Not recovered within the stream: count it as the whole post-drift stream (a lower bound).
        rec_filled = [v if v is not None else r["curve"][-1]["samples"] - r["drift_index"]
                      for v, r in zip(rec, rs, strict=True)]
        summary[method] = {"recover_samples": rec, "recover_mean": float(np.mean(rec_filled)),
                           "recovered_runs": sum(v is not None for v in rec), "bytes_mean": float(np.mean(
                               [r["bytes"] for r in rs])), "final_acc_mean": float(np.mean(
                                   [r["curve"][-1]["acc"] for r in rs])), "horizon_ticks": horizon,
                           "compute_steps_mean": float(np.mean([r["compute_steps"] for r in rs]))}
    base = summary.get("isolation", {}).get("recover_mean", float("nan"))
    for method in methods:
        summary[method]["speedup_vs_isolation"] = base / max(summary[method]["recover_mean"], 1e-9)
        summary[method]["compute_vs_own"] = summary[method]["compute_steps_mean"] / (
            args.steps_per_chunk * summary[method]["horizon_ticks"])
    canoe_bytes = max(summary.get("canoe", {}).get("bytes_mean", 1.0), 1.0)
    for method in methods:
        summary[method]["bytes_vs_canoe"] = summary[method]["bytes_mean"] / canoe_bytes

    print(f"\n{'method':14s} {'recover (samples after drift)':>30s} {'mean':>6s} {'×isolation':>10s} "
          f"{'bytes moved':>12s} {'bytes/canoe':>11s} {'final acc':>9s} {'target compute':>14s}")
    for method in methods:
        m = summary[method]
        print(f"{method:14s} {str(m['recover_samples']):>30s} {m['recover_mean']:>6.1f} "
              f"{m['speedup_vs_isolation']:>10.2f} {m['bytes_mean']:>12.0f} {m['bytes_vs_canoe']:>11.1f} "
              f"{m['final_acc_mean']:>9.3f} {m['compute_vs_own']:>13.2f}×")
    print("target compute: the target's training work over the stream in full-weight steps, relative to its own "
          f"{args.steps_per_chunk} steps per tick (slice steps weighed by measured step cost: "
          + ", ".join(f"{k} {v:.2f}" for k, v in costs.items()) + "); FedAvg peers' work not counted")
    verdict = slice_report(runs, summary, args.encoding) if {"canoe", "full_transfer"} <= set(methods) else None

    out = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
           "new_classes": list(NEW), "summary": summary, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out, json.dumps(out, indent=1).encode())
    plot(runs, methods, args.out.with_suffix(".png"))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")
    if verdict is not None:
        print(verdict)
    return 0


def slice_report(runs: list[dict[str, Any]], summary: dict[str, Any], encoding: str) -> str:
    """Print the slice sizes against the helper's whole model; return the targets' verdict line (issue 13)."""
    shipped = [e for r in runs if r["method"] == "canoe" for e in r["requests"] if e.get("slice_bytes")]
    ratio = max(e["slice_bytes"] / e["full_bytes"] for e in shipped) if shipped else float("inf")
    ratio32 = max(e["slice_bytes"] / e["full_bytes_float32"] for e in shipped) if shipped else float("inf")
    variants = sorted({e["variant"] for e in shipped})
    print(f"\nslices shipped: {len(shipped)}, variants {variants}, {encoding}: "
          f"{np.mean([e['slice_bytes'] for e in shipped]) if shipped else 0:.0f} bytes mean; whole model in the "
          f"same file format: {np.mean([e['full_bytes'] for e in shipped]) if shipped else 0:.0f} bytes "
          f"({encoding}), {np.mean([e['full_bytes_float32'] for e in shipped]) if shipped else 0:.0f} (float32)")
    print(f"largest slice / whole model: {ratio:.3f}× (same encoding), {ratio32:.3f}× (whole model in float32)")
    canoe, full = summary["canoe"]["recover_mean"], summary["full_transfer"]["recover_mean"]
    small, fast = ratio <= 0.25, canoe <= full
    return (f"TARGETS {'MET' if small and fast else 'NOT MET'}: slice bytes {ratio:.3f}× the whole model "
            f"(target ≤ 0.25: {'met' if small else 'missed'}); recovery {canoe:.1f} samples after the drift "
            f"vs full-model transfer {full:.1f} (target no worse: {'met' if fast else 'missed'}), "
            f"{len({r['seed'] for r in runs})} seeds")


def plot(runs: list[dict[str, Any]], methods: tuple[str, ...], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = dict(zip(("isolation", "canoe", "full_transfer", "fedavg"), ("tab:gray", "tab:blue", "tab:orange", "tab:green"), strict=True))
    for method in methods:
        rs = [r for r in runs if r["method"] == method]
        n = min(len(r["curve"]) for r in rs)
        xs = [p["samples"] for p in rs[0]["curve"][:n]]
        acc = np.mean([[p["acc"] for p in r["curve"][:n]] for r in rs], axis=0)
        ax.plot(xs, acc, label=method, color=colors[method])
    drift = int(np.mean([r["drift_index"] for r in runs]))
    ax.axvline(drift, color="red", linestyle="--", label="drift (new classes 7-9)")
    ax.axhline(float(np.mean([r["threshold"] for r in runs])), color="black", linestyle=":", label="recovery level")
    ax.set_xlabel("samples seen by the target")
    ax.set_ylabel("test accuracy (post-drift label mix)")
    ax.set_title(f"Canoe around a drift (digits, mean of {len({r['seed'] for r in runs})} seeds)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
