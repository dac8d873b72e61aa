"""The export tool as a chain of stages: model → base weights → variants (DSE) → programs → bundle.

Each stage is a plain function so the CLI, the cloud companion (re-export after MoMoDistill) and the
tests can run any part of it; `export_bundle` runs them all.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from edgepatch.data.byo import LabelledData
from edgepatch.protocol.manifest import LabelSpec, Manifest, TrainConfig, VariantRow
from edgepatch.protocol.model_spec import ModelSpec, PatchSpec, param_infos
from edgepatch.protocol.optim import AdamConfig
from edgepatch.protocol.params import Params, ParamsError, check_params, init_params, load_params
from edgepatch.protocol.variants import Variant, sample_kept, slice_params

from .reference_models import REFERENCE_MODELS, default_patch
from .resolve import load_model, parse_variants

Log = Callable[[str], None]
RUNTIMES = ("litert", "executorch")


@dataclass
class ExportOptions:
    """Everything `edgepatch export` accepts; the defaults export the default reference model."""

    model: str = "digits_cnn"
    weights: Path | None = None  # base weights file; else the source's own, else pretrained on `data`
    data: Path | None = None  # --data: shard directory or .npz (x, y); reference models default to theirs
    holdout: float = 0.2  # fraction of `data` held out to report the pretrained model's accuracy
    pretrain: bool = False  # pretrain on `data` even when the source carries weights (a fresh torch module)
    shared: Path | None = None  # θ̄/Θ (.npz, e.g. from MoMoDistill); initialized when absent
    patch_kind: str = "film"
    patch_layers: tuple[str, ...] | None = None  # default: every conv layer
    k: int = 16
    rank: int = 4
    head_bias: bool = True  # φ also shifts the head's logits (+ num_classes coefficients): a label prior
    variants: str = "auto"  # "auto" = DSE, or "1,0.5" / "conv1=1:conv2=0.5,…" (see resolve.parse_variants)
    runtimes: tuple[str, ...] = RUNTIMES
    batch: int = 32
    infer_batch: int = 32
    phi_lr: float = 0.05
    seed: int = 0
    pretrain_epochs: int = 15
    dse_generations: int = 3
    dse_population: int = 8
    dse_steps: int = 30
    dse_seeds: tuple[int, ...] = (0, 1, 2)
    meta: dict[str, Any] = field(default_factory=dict)


def _quiet(_: str) -> None:
    pass


class NoDataError(ParamsError):
    """A model with neither weights nor data: nothing to pretrain on and nothing to measure variants with."""


def export_data(spec: ModelSpec, opts: ExportOptions) -> LabelledData | None:
    """The exporter's data: `--data` (checked against the model's input), else a reference model's own
    offline dataset, else None (a user's model without `--data`)."""
    from edgepatch.data.byo import load_labelled, reference_data

    if opts.data is not None:
        return load_labelled(opts.data, spec.input_shape, spec.num_classes)
    if opts.model in REFERENCE_MODELS:
        return reference_data(opts.model, opts.seed)
    return None


def no_data_error(spec: ModelSpec, what: str) -> NoDataError:
    return NoDataError(
        f"model {spec.name!r} needs data {what}: pass --data PATH (a shard directory or an .npz with x of "
        f"shape (N, {', '.join(map(str, spec.input_shape))}) and y in [0, {spec.num_classes})), or --weights "
        "FILE and explicit --variants (e.g. 1,0.5) to export it without data")


def load_source(opts: ExportOptions) -> tuple[ModelSpec, Params | None]:
    """The model description and its base weights: `--weights`, else a torch/Keras model's own (unless
    `opts.pretrain`), else None (a `ModelSpec` without `--weights`: pretrained on the data)."""
    if opts.pretrain and opts.weights is not None:
        raise ParamsError("--pretrain trains the model from scratch on --data: drop --weights, or drop --pretrain")
    spec, params = load_model(opts.model, opts.weights, use_source_weights=not opts.pretrain)
    if params is not None:
        check_params(params, spec, None, roles=("base",))
        params = {n: params[n] for n in param_infos(spec, None)}
    return spec, params


def base_weights(spec: ModelSpec, opts: ExportOptions, data: LabelledData | None, log: Log = _quiet,
                 given: Params | None = None) -> Params:
    """The source's weights (`given`, or `opts.weights`), else pretrained on `data`'s training split;
    accuracy is reported on data the weights were not trained on."""
    from .pretrain import accuracy, pretrain_base

    if given is not None:
        log(f"base weights from {opts.weights or opts.model}")
        if data is not None:
            log(f"base accuracy on {data.source}: {accuracy(spec, given, data.x, data.y):.3f}")
        return given
    if data is None:
        raise no_data_error(spec, "to pretrain (it has no weights)")
    train, held = data.split(opts.holdout, opts.seed)
    log(f"pretraining {spec.name} on {len(train)} samples of {data.source} ({opts.pretrain_epochs} epochs)")
    params = pretrain_base(spec, train.x, train.y, epochs=opts.pretrain_epochs, seed=opts.seed,
                           progress=lambda e, loss: log(f"  epoch {e}/{opts.pretrain_epochs}: loss {loss:.3f}"))
    opts.meta.setdefault("pretrain_holdout_accuracy", round(accuracy(spec, params, held.x, held.y), 4))
    log(f"base accuracy on {len(held)} held-out samples (not trained on): "
        f"{opts.meta['pretrain_holdout_accuracy']:.3f}")
    return params


def shared_patch_params(spec: ModelSpec, patch: PatchSpec, opts: ExportOptions) -> Params:
    """θ̄ and Θ: loaded (e.g. distilled by the cloud) or initialized so φ = 0 changes nothing."""
    infos = param_infos(spec, patch)
    if opts.shared is not None:
        params = load_params(opts.shared)
        check_params(params, spec, patch, roles=("bar", "basis"))
    else:
        params = init_params(spec, patch, opts.seed + 1)
    return {n: params[n] for n, info in infos.items() if info.role != "base"}


def choose_variants(spec: ModelSpec, base: Params, opts: ExportOptions, data: LabelledData | None,
                    log: Log = _quiet) -> tuple[list[VariantRow], dict[str, Any]]:
    """The variant table: the DSE's Pareto set (`auto`, needs data) or the given variants (their
    convergence measured when there is data, left empty when not)."""
    from . import dse

    if opts.variants == "auto":
        if data is None:
            raise no_data_error(spec, "for the variant search (--variants auto)")
        log(f"DSE: NSGA-II, population {opts.dse_population}, {opts.dse_generations} generations, "
            f"{opts.dse_steps} steps x {len(opts.dse_seeds)} seeds per point, on {data.source}")
        result = dse.explore(
            spec, base, data.x, data.y, pop_size=opts.dse_population, generations=opts.dse_generations,
            seeds=opts.dse_seeds, step_budget=opts.dse_steps, batch=opts.batch, search_seed=opts.seed,
            progress=lambda rep: log(f"  {rep}"))
        png = Path(tempfile.mkdtemp(prefix="edgepatch-dse-")) / "dse-front.png"  # copied into the bundle
        dse.plot_front(result, png)
        rows = [VariantRow(**row) for row in result.pareto_rows()]
        return rows, {"dse": result.to_dict(), "dse_png": str(png)}
    rows = []
    for variant in parse_variants(opts.variants, spec):
        convergence = spread = None
        if data is not None:
            losses = dse.convergence(spec, base, variant, data.x, data.y, seeds=opts.dse_seeds,
                                     step_budget=opts.dse_steps, batch=opts.batch)
            convergence, spread = float(np.mean(losses)), dse.seed_spread(losses)
            log(f"  variant {variant.id}: convergence loss {convergence:.3f}")
        rows.append(VariantRow.for_variant(spec, variant, convergence=convergence, convergence_std=spread,
                                           pareto=True, memory_bytes=dse.param_bytes(spec, variant)))
    return rows, {}


def build_programs(spec: ModelSpec, patch: PatchSpec, params: Params, variants: Sequence[Variant],
                   opts: ExportOptions, log: Log = _quiet, layouts: dict[str, Any] | None = None
                   ) -> dict[str, bytes]:
    """Artifact kind → bytes for every runtime asked for; `layouts` receives each frozen program's weight
    layout (export/frozen.py), so republishing writes new weights into it instead of reconverting."""
    from .frozen import build_frozen

    artifacts: dict[str, bytes] = {}
    layouts = {} if layouts is None else layouts
    adam = AdamConfig(lr=opts.phi_lr)
    if "litert" in opts.runtimes:
        from .tflite_builder import build_inference_tflite, build_phi_const_tflite, build_trainable_tflite

        t0 = time.perf_counter()
        artifacts["litert_trainable"] = build_trainable_tflite(spec, patch, list(variants), opts.batch, adam)
        artifacts["litert_infer"], layouts["litert_infer"] = build_frozen(
            build_inference_tflite, spec, patch, params, opts.infer_batch)
        # The full variant's φ step with the weights baked in (XNNPACK packs them once: the fast path of
        # the device's φ step). Only the full variant: the others take a fresh kept set every step.
        artifacts["litert_phi_const"], layouts["litert_phi_const"] = build_frozen(
            partial(build_phi_const_tflite, adam=adam), spec, patch, params, opts.batch)
        log(f"LiteRT: {len(variants)} variants x 3 signatures + frozen inference + baked φ step "
            f"({time.perf_counter() - t0:.1f} s)")
    if "executorch" in opts.runtimes:
        from .executorch_builder import build_inference_pte, build_train_full_pte, build_train_phi_pte

        t0 = time.perf_counter()
        artifacts["executorch_infer"], layouts["executorch_infer"] = build_frozen(
            build_inference_pte, spec, patch, params, opts.infer_batch)
        for variant in variants:
            artifacts[f"executorch_train_phi:{variant.id}"] = build_train_phi_pte(spec, patch, variant, opts.batch)
            artifacts[f"executorch_train_full:{variant.id}"] = build_train_full_pte(spec, variant, opts.batch)
        log(f"ExecuTorch: inference + {2 * len(variants)} training programs ({time.perf_counter() - t0:.1f} s)")
    return artifacts


def measure_programs(spec: ModelSpec, patch: PatchSpec, params: Params, artifacts: Mapping[str, bytes],
                     rows: Sequence[VariantRow], batch: int, infer_batch: int, repeats: int = 7
                     ) -> list[VariantRow]:
    """Fill each row's train_ms/infer_ms per runtime by timing the shipped programs (medians)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, *spec.input_shape)).astype(np.float32)
    y = rng.integers(0, spec.num_classes, size=batch).astype(np.int32)
    phi = np.zeros(patch.k, np.float32)
    infos_all, infos_base = param_infos(spec, patch), param_infos(spec, None)
    timers: dict[str, dict[str, Callable[[], object]]] = {row.id: {} for row in rows}
    if "litert_trainable" in artifacts:
        from edgepatch.device.backends.litert import LiteRTProgram

        program = LiteRTProgram(artifacts["litert_trainable"])
        for row in rows:
            kept = sample_kept(spec, row.variant, rng)
            sliced, sliced_base = slice_params(params, infos_all, kept), slice_params(params, infos_base, kept)
            timers[row.id]["litert_train"] = partial(program.train_full, row.id, x, y, sliced_base)
            timers[row.id]["litert_infer"] = partial(program.infer_variant, row.id, x, phi, sliced)
    for row in rows:  # ExecuTorch devices' selector needs the variant's train time on that runtime too
        kind = f"executorch_train_full:{row.id}"
        if kind in artifacts:
            from edgepatch.device.backends.executorch import ExecuTorchFullTrainer

            base = slice_params(params, infos_base, sample_kept(spec, row.variant, rng))
            timers[row.id]["executorch_train"] = partial(ExecuTorchFullTrainer(artifacts[kind]).grads, x, y, base)
    samples: dict[tuple[str, str], list[float]] = {}
    for _ in range(repeats):  # interleaved, so machine noise hits every variant alike
        for vid, fns in timers.items():
            for key, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                samples.setdefault((vid, key), []).append((time.perf_counter() - t0) * 1e3)
    out = []
    for row in rows:
        train_ms, infer_ms = dict(row.train_ms), dict(row.infer_ms)
        for (vid, key), values in samples.items():
            if vid == row.id:
                runtime, what = key.split("_")
                (train_ms if what == "train" else infer_ms)[runtime] = float(statistics.median(values))
        out.append(VariantRow(row.id, row.keep, row.widths, row.flops_ratio, train_ms, infer_ms,
                              row.memory_bytes, row.convergence, row.pareto))
    return out


def export_bundle(opts: ExportOptions, out: Path, log: Log = _quiet) -> Manifest:
    """Run every stage and write a verified bundle to `out`."""
    from .bundle_writer import BundleWriter

    started = time.perf_counter()
    spec, given = load_source(opts)
    patch = (PatchSpec(opts.patch_kind, opts.patch_layers, opts.k, opts.rank) if opts.patch_layers
             else default_patch(spec, opts.patch_kind, opts.k, opts.rank))
    if opts.head_bias:
        patch = patch.with_head_bias(spec)
    patch.validate_against(spec)
    bad = set(opts.runtimes) - set(RUNTIMES)
    if bad:
        raise ValueError(f"unknown runtimes {sorted(bad)}; choose from {', '.join(RUNTIMES)}")
    log(f"model {spec.name}: input {spec.input_shape}, {len(spec.layers)} layers; "
        f"{patch.kind} patches on {', '.join(patch.layers)} (k={patch.k}"
        f"{f', the last {spec.num_classes} a head bias' if patch.head_bias else ''})")
    if opts.data is None and opts.model not in REFERENCE_MODELS:  # say so before any work
        if given is None:
            raise no_data_error(spec, "to pretrain (it has no weights)")
        if opts.variants == "auto":
            raise no_data_error(spec, "for the variant search (--variants auto)")
    data = export_data(spec, opts) if (given is None or opts.variants == "auto" or opts.data) else None
    base = base_weights(spec, opts, data, log, given)
    params = {**base, **shared_patch_params(spec, patch, opts)}
    rows, dse_info = choose_variants(spec, base, opts, data, log)
    variants = [row.variant for row in rows]
    layouts: dict[str, Any] = {}
    artifacts = build_programs(spec, patch, params, variants, opts, log, layouts)
    rows = measure_programs(spec, patch, params, artifacts, rows, opts.batch, opts.infer_batch)
    writer = BundleWriter(out, spec.name).set_model(spec, patch).add_params(params)
    writer.set_labels(LabelSpec(spec.num_classes))
    writer.set_train(TrainConfig(batch=opts.batch, infer_batch=opts.infer_batch, adam=AdamConfig(lr=opts.phi_lr),
                                 phi_lr=opts.phi_lr))
    writer.set_variants(rows)
    for kind, blob in artifacts.items():
        writer.add_bytes(kind, blob, weights=layouts.get(kind))
    if dse_info:
        writer.add_file("dse_front_png", dse_info.pop("dse_png"))
        writer.add_bytes("dse_table_json", json.dumps(dse_info["dse"], indent=1).encode())
    writer.set_meta(exporter="edgepatch", seconds=round(time.perf_counter() - started, 1), **opts.meta)
    manifest = writer.finish()
    log(f"bundle written to {out} (base version {manifest.base_version[:12]})")
    return manifest

