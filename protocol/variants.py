"""DISTREAL dropout variants as physically smaller networks (numpy only: the device slices per step).

A variant is a keep ratio per slicing group (`ModelSpec.slicing_groups`: a conv, or the convs a residual
add couples, named after the first). Dropping filter j of a group removes output channel j of each of
its convs, everything indexed by it (bias, depthwise, norm and patch parts on those channels) and input
channel j of every conv reading it, or its block of columns in the dense layer after a flatten. The kept set is
drawn anew for each mini-batch: `sample_kept` draws it, `slice_params` gathers the small network's
weights, `scatter_add` puts its gradients (or updates) back. Never masks: the sliced tensors are smaller.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .graph import kernel_size
from .model_spec import ModelSpec, ParamInfo, SpecError

KeptSets = dict[str, np.ndarray]  # slicing group name -> sorted int indices of kept filters


def kept_count(out: int, ratio: float) -> int:
    """Filters kept at `ratio`; multiples of 8 where the layer allows it (odd widths vectorize badly)."""
    if not 0.0 < ratio <= 1.0:
        raise SpecError(f"keep ratio must be in (0, 1], got {ratio}")
    n = max(1, int(round(ratio * out)))
    if out % 8 == 0 and n >= 8:
        n = max(8, 8 * int(round(n / 8)))
    return min(n, out)


@dataclass(frozen=True)
class Variant:
    """A named per-layer keep-ratio vector; ratio 1.0 for layers it does not name."""

    id: str
    keep: dict[str, float]

    def widths(self, spec: ModelSpec) -> dict[str, int]:
        return {g: kept_count(spec.group_width(g), self.keep.get(g, 1.0)) for g in spec.droppable_layers()}

    def spec(self, spec: ModelSpec) -> ModelSpec:
        return spec.with_widths(self.widths(spec))

    def is_full(self, spec: ModelSpec) -> bool:
        return all(w == spec.layer(n).out for n, w in self.widths(spec).items())


def variant_id(keep: Mapping[str, float], layers: list[str]) -> str:
    """A stable, readable id: 'k100-50' = 100 % of the first conv's filters kept, 50 % of the second."""
    return "k" + "-".join(str(int(round(100 * keep.get(n, 1.0)))) for n in layers)


def full_variant(spec: ModelSpec) -> Variant:
    keep = {n: 1.0 for n in spec.droppable_layers()}
    return Variant(variant_id(keep, spec.droppable_layers()), keep)


def uniform_variant(spec: ModelSpec, ratio: float) -> Variant:
    keep = {n: ratio for n in spec.droppable_layers()}
    return Variant(variant_id(keep, spec.droppable_layers()), keep)


def sample_kept(spec: ModelSpec, variant: Variant, rng: np.random.Generator) -> KeptSets:
    """A fresh random kept set per droppable layer (sorted, so order-preserving slices)."""
    kept: KeptSets = {}
    for name, width in variant.widths(spec).items():
        out = spec.group_width(name)
        idx = np.arange(out) if width == out else np.sort(rng.choice(out, size=width, replace=False))
        kept[name] = idx.astype(np.int64)
    return kept


def first_kept(spec: ModelSpec, variant: Variant) -> KeptSets:
    """The deterministic kept set (the first filters): nested widths, as in ordered dropout."""
    return {n: np.arange(w, dtype=np.int64) for n, w in variant.widths(spec).items()}


def axis_index(source: str | None, kept: KeptSets) -> np.ndarray | None:
    """Indices along one axis for `source` (see ParamInfo), or None when the axis is not sliced."""
    if source is None:
        return None
    if source.startswith("flat:"):
        _, layer, spatial = source.split(":")
        if layer not in kept:
            return None
        block = int(spatial)
        return (kept[layer][:, None] * block + np.arange(block)[None, :]).reshape(-1)
    return kept.get(source)


def slice_params(params: Mapping[str, np.ndarray], infos: Mapping[str, ParamInfo], kept: KeptSets
                 ) -> dict[str, np.ndarray]:
    """The small network's parameters: a gather along every sliced axis (a copy, never a mask)."""
    out: dict[str, np.ndarray] = {}
    for name, info in infos.items():
        value = np.asarray(params[name])
        for axis, source in enumerate(info.axis_sources):
            idx = axis_index(source, kept)
            if idx is not None and len(idx) != value.shape[axis]:
                value = np.take(value, idx, axis=axis)
        out[name] = np.ascontiguousarray(value)
    return out


def scatter_add(full: np.ndarray, small: np.ndarray, info: ParamInfo, kept: KeptSets, alpha: float = 1.0
                ) -> None:
    """full[kept…] += alpha · small, in place: the inverse of `slice_params` for one parameter."""
    index: list[np.ndarray | slice] = []
    for axis, source in enumerate(info.axis_sources):
        idx = axis_index(source, kept)
        index.append(slice(None) if idx is None or len(idx) == full.shape[axis] else idx)
    if all(isinstance(i, slice) for i in index):
        full += alpha * small
        return
    grids = np.ix_(*[np.arange(full.shape[a]) if isinstance(i, slice) else i for a, i in enumerate(index)])
    full[grids] += alpha * small


def touched_mask(info: ParamInfo, kept: KeptSets, shape: tuple[int, ...]) -> np.ndarray:
    """1 where a sliced training step touched the parameter (for count-normalized averaging)."""
    mask = np.zeros(shape, dtype=np.float32)
    sizes = []
    for axis, source in enumerate(info.axis_sources):
        idx = axis_index(source, kept)
        sizes.append(shape[axis] if idx is None else len(idx))
    ones = np.ones(tuple(sizes), dtype=np.float32)
    scatter_add(mask, ones, info, kept)
    return mask


def filter_flops(spec: ModelSpec, batch: int = 1) -> int:
    """Multiply-accumulates of one forward pass (convs and dense), for cost ratios of variants."""
    shapes = spec.activation_shapes()
    macs = 0
    for layer in spec.layers:
        out_shape = shapes[layer.name]
        channels = spec.shape_of(spec.operands(layer.name)[0])[0]
        spatial = int(np.prod(out_shape[1:])) if len(out_shape) > 1 else 1
        taps = int(np.prod(kernel_size(layer, spec.dims)))
        if layer.kind in ("conv2d", "conv1d"):
            macs += spatial * layer.out * channels * taps
        elif layer.kind == "dwconv2d":
            macs += spatial * channels * taps
        elif layer.kind == "dense":
            macs += layer.out * channels
    return macs * batch
