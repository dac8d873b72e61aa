"""Objective 1 of the DSE: the cost of a variant's training step — measured in the real LiteRT
interpreter (`LiteRTTrainCost`) or modelled (`flops_cost`). See export/dse.py for the search."""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from edgepatch.protocol.model_spec import ModelSpec, PatchSpec, param_infos
from edgepatch.protocol.variants import (
    Variant,
    filter_flops,
    kept_count,
    sample_kept,
    slice_params,
    variant_id,
)


class CostFn(Protocol):
    """Cost of each variant's training step, one call per batch of new variants: {variant id: cost}.

    `runtime` names the runtime whose step time the cost is (e.g. "litert"), or None for a cost model
    that measures nothing; `unit` labels the axis ("ms", "FLOP ratio").
    """

    runtime: str | None
    unit: str

    def __call__(self, spec: ModelSpec, variants: Sequence[Variant], batch: int) -> dict[str, float]: ...


class _FlopsCost:
    """Cost model: forward multiply-accumulates of the variant relative to the full model."""

    runtime: str | None = None
    unit = "FLOP ratio"

    def __call__(self, spec: ModelSpec, variants: Sequence[Variant], batch: int) -> dict[str, float]:
        return {v.id: flops_ratio(spec, v) for v in variants}


flops_cost: CostFn = _FlopsCost()


def canonical_variant(spec: ModelSpec, keep: Mapping[str, float], rates: Sequence[float]) -> Variant:
    """The variant for `keep`, each ratio raised to the largest of `rates` giving the same width.

    Widths are rounded (to multiples of 8 where possible), so different rates can build the same
    physical network (16 filters at 75 % -> 12 -> 16). Those are one design point: evaluated once and
    named by the largest rate, which is the one that tells the truth about the width.
    """
    canon: dict[str, float] = {}
    for name in spec.droppable_layers():
        out, ratio = spec.layer(name).out, float(keep.get(name, 1.0))
        width = kept_count(out, ratio)
        canon[name] = max([r for r in rates if kept_count(out, r) == width] + [ratio])
    return Variant(variant_id(canon, spec.droppable_layers()), canon)


def flops_ratio(spec: ModelSpec, variant: Variant) -> float:
    return filter_flops(variant.spec(spec)) / filter_flops(spec)


class LiteRTTrainCost:
    """Measured median wall time (ms) of `train_full_<vid>` in the real LiteRT interpreter.

    All variants of one call go into one .tflite (one conversion per generation). Repetitions are
    interleaved across variants in a shuffled order, so a slow phase of the shared machine hits every
    variant alike instead of biasing one; the median of `repeats` calls is reported after `warmup`.
    Calls happen a generation apart and the machine's load may change in between, so `remeasure()`
    re-times every variant seen so far in one interleaved session (the interpreters are kept; no
    conversion): `explore` reports those consistent times.
    """

    runtime: str | None = "litert"
    unit = "ms"

    def __init__(self, base_params: Mapping[str, np.ndarray], *, patch: PatchSpec | None = None,
                 repeats: int = 15, warmup: int = 3, seed: int = 0, num_threads: int | None = None) -> None:
        if repeats < 1 or warmup < 0:
            raise ValueError(f"repeats must be >= 1 and warmup >= 0 (got {repeats}, {warmup})")
        self.base_params = {k: np.asarray(v, np.float32) for k, v in base_params.items()}
        self.patch, self.repeats, self.warmup, self.seed = patch, repeats, warmup, seed
        self.num_threads = num_threads
        self.build_seconds = 0.0  # conversion time, summed over calls
        self._jobs: dict[str, tuple[Any, dict[str, np.ndarray]]] = {}  # vid -> (program, sliced params)
        self._xy: tuple[np.ndarray, np.ndarray] | None = None

    def __call__(self, spec: ModelSpec, variants: Sequence[Variant], batch: int) -> dict[str, float]:
        # Imported here: TensorFlow takes seconds to import and only this cost function needs it.
        from edgepatch.device.backends.litert import LiteRTProgram
        from edgepatch.export.reference_models import default_patch
        from edgepatch.export.tflite_builder import build_trainable_tflite

        if not variants:
            return {}
        patch = self.patch or default_patch(spec)
        started = time.perf_counter()
        model = build_trainable_tflite(spec, patch, list(variants), batch)
        self.build_seconds += time.perf_counter() - started
        program = LiteRTProgram(model, num_threads=self.num_threads)
        rng = np.random.default_rng(self.seed)
        if self._xy is None or self._xy[0].shape[0] != batch:
            self._xy = (rng.normal(size=(batch, *spec.input_shape)).astype(np.float32),
                        rng.integers(0, spec.num_classes, size=batch).astype(np.int32))
        infos = param_infos(spec, None)
        for v in variants:
            self._jobs[v.id] = (program, slice_params(self.base_params, infos, sample_kept(spec, v, rng)))
        return self._time([v.id for v in variants])

    def remeasure(self) -> dict[str, float]:
        """Every variant timed so far, again, in one interleaved session."""
        return self._time(list(self._jobs))

    def _time(self, vids: list[str]) -> dict[str, float]:
        assert self._xy is not None
        x, y = self._xy
        rng = np.random.default_rng(self.seed + 1)
        times: dict[str, list[float]] = {vid: [] for vid in vids}
        for rep in range(self.warmup + self.repeats):
            for i in rng.permutation(len(vids)):
                vid = vids[int(i)]
                program, sliced = self._jobs[vid]
                t0 = time.perf_counter()
                program.train_full(vid, x, y, sliced)  # exactly the device's call, input checks included
                elapsed = (time.perf_counter() - t0) * 1e3
                if rep >= self.warmup:
                    times[vid].append(elapsed)
        return {vid: float(statistics.median(ts)) for vid, ts in times.items()}
