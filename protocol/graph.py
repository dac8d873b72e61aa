"""Shape inference and channel slicing groups of a layer DAG (the maths behind `ModelSpec`).

Layers are listed in topological order; a layer reads the previous layer's output unless `input`
names another layer (or "input", the model input); an `add` also reads `source`. This module works on
the layer list alone, so `model_spec.py` stays a thin, readable contract.

Slicing groups (DISTREAL): every conv2d/conv1d output channel is a "channel source". Layers that keep
channels one-to-one (dwconv2d, relu, relu6, avgpool, pad, norm, gap) pass their input's source on. A
residual `add` makes its two operands' channels the same channels, so their sources are merged into one
group that shares one kept set (union-find). A group touching the model input, or an add whose operands
are flattened differently, cannot be sliced at all. A group is named after its first conv in layer order,
so a plain sequential model has one group per conv, named like the conv, exactly as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .model_spec import LayerSpec

MODEL_INPUT = "input"  # the reserved operand name of the model input
_FIXED = "\0fixed"  # union-find element for channels that may never be sliced
CONV_KINDS = ("conv2d", "conv1d")
SPATIAL_KINDS = ("conv2d", "dwconv2d", "conv1d", "avgpool", "pad", "gap")
CHANNEL_PRESERVING = ("dwconv2d", "relu", "relu6", "avgpool", "pad", "norm", "gap")


class GraphError(ValueError):
    """A layer graph that cannot be built (wrapped into SpecError by model_spec)."""


def kernel_size(layer: LayerSpec, dims: int) -> tuple[int, ...]:
    """(kh, kw) for 2-D layers (kw = kernel when kernel_w is 0), (k,) for 1-D ones."""
    if dims == 1:
        return (layer.kernel,)
    return (layer.kernel, layer.kernel_w or layer.kernel)


def conv_padding(layer: LayerSpec, dims: int) -> tuple[int, ...]:
    """Symmetric zero padding per spatial dim: kernel // 2 for "same", 0 for "valid"."""
    if layer.padding == "valid":
        return (0,) * dims
    return tuple(k // 2 for k in kernel_size(layer, dims))


def operands(layers: tuple[LayerSpec, ...]) -> dict[str, tuple[str, ...]]:
    """Resolved operand names per layer ("input" or an earlier layer's name); raises on bad references."""
    seen: list[str] = []
    result: dict[str, tuple[str, ...]] = {}
    for layer in layers:
        main = layer.input or (seen[-1] if seen else MODEL_INPUT)
        names = (main, layer.source) if layer.kind == "add" else (main,)
        for field, ref in zip(("input", "source"), names, strict=False):
            if ref != MODEL_INPUT and ref not in seen:
                where = "a later layer" if any(other.name == ref for other in layers) else "no layer"
                raise GraphError(f"layer {layer.name!r}: {field} {ref!r} is {where}; operands must be "
                                 "'input' or an earlier layer (layers are listed in topological order)")
        result[layer.name] = names
        seen.append(layer.name)
    return result


def infer_shapes(layers: tuple[LayerSpec, ...], input_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Output shape (without batch) of every layer; raises GraphError naming the first mismatch."""
    dims = len(input_shape) - 1
    ops = operands(layers)
    shapes: dict[str, tuple[int, ...]] = {MODEL_INPUT: tuple(input_shape)}
    for layer in layers:
        shape = shapes[ops[layer.name][0]]
        if layer.kind == "add":
            other = shapes[ops[layer.name][1]]
            if other != shape:
                raise GraphError(f"layer {layer.name!r}: add of {ops[layer.name][0]!r} {shape} and "
                                 f"{ops[layer.name][1]!r} {other}: shapes must match")
        shapes[layer.name] = _output_shape(layer, shape, dims)
    del shapes[MODEL_INPUT]
    return shapes


def _output_shape(layer: LayerSpec, shape: tuple[int, ...], dims: int) -> tuple[int, ...]:
    flat = len(shape) == 1
    if layer.kind in SPATIAL_KINDS and flat:
        raise GraphError(f"layer {layer.name!r}: {layer.kind} needs a spatial input, got flat {shape}")
    if layer.kind in ("conv2d", "dwconv2d") and dims != 2:
        raise GraphError(f"layer {layer.name!r}: {layer.kind} needs a (C, H, W) input")
    if layer.kind == "conv1d" and dims != 1:
        raise GraphError(f"layer {layer.name!r}: conv1d needs a (C, L) input")
    if layer.kind == "avgpool" and dims == 1 and layer.kernel_w:
        raise GraphError(f"layer {layer.name!r}: kernel_w is for 2-D inputs only")
    if layer.kind in ("conv2d", "conv1d", "dwconv2d"):
        ks, pads = kernel_size(layer, dims), conv_padding(layer, dims)
        spatial = tuple((s + 2 * p - k) // layer.stride + 1 if s + 2 * p >= k else 0
                        for s, p, k in zip(shape[1:], pads, ks, strict=True))
        if min(spatial) < 1:
            raise GraphError(f"layer {layer.name!r}: kernel {ks} is larger than its padded input {shape}")
        return (shape[0] if layer.kind == "dwconv2d" else layer.out, *spatial)
    if layer.kind == "avgpool":
        spatial = tuple(s // k for s, k in zip(shape[1:], kernel_size(layer, dims), strict=True))
        if min(spatial) < 1:
            raise GraphError(f"layer {layer.name!r}: pooling {kernel_size(layer, dims)} shrinks {shape} to nothing")
        return (shape[0], *spatial)
    if layer.kind == "pad":
        if len(layer.pads) != 2 * dims:
            raise GraphError(f"layer {layer.name!r}: pads needs {2 * dims} values (before, after per spatial "
                             f"dim) for a {dims}-D input, got {list(layer.pads)}")
        return (shape[0], *(s + layer.pads[2 * i] + layer.pads[2 * i + 1] for i, s in enumerate(shape[1:])))
    if layer.kind == "gap":
        return (shape[0],)
    if layer.kind == "flatten":
        size = 1
        for s in shape:
            size *= s
        return (size,)
    if layer.kind == "dense":
        if not flat:
            raise GraphError(f"layer {layer.name!r}: dense needs a flat input (flatten or gap before it), "
                             f"got {shape}")
        return (layer.out,)
    return shape  # relu, relu6, norm, add


@dataclass(frozen=True)
class ChannelSource:
    """Which slicing group indexes a tensor's channels: `group` None = never sliced; `spatial` is set for a
    flattened tensor (channel-major blocks of `spatial` features per channel)."""

    group: str | None
    spatial: int | None = None

    def axis(self) -> str | None:
        """The `ParamInfo.axis_sources` entry for an axis indexing this tensor's features."""
        if self.group is None:
            return None
        return self.group if self.spatial is None else f"flat:{self.group}:{self.spatial}"


@dataclass(frozen=True)
class Slicing:
    groups: dict[str, tuple[str, ...]]  # group name -> its convs, in layer order (droppable groups only)
    conv_group: dict[str, str | None]  # conv name -> its group (None: the conv can never be sliced)
    sources: dict[str, ChannelSource]  # layer output (and "input") -> channel source


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, a: str) -> str:
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: str, b: str) -> None:
        self.parent[self.find(a)] = self.find(b)


def slicing(layers: tuple[LayerSpec, ...], input_shape: tuple[int, ...]) -> Slicing:
    """The slicing groups of a (valid) layer graph and the channel source of every tensor."""
    ops = operands(layers)
    shapes = infer_shapes(layers, input_shape)
    shapes_in = {MODEL_INPUT: tuple(input_shape), **shapes}
    uf = _UnionFind()
    raw: dict[str, tuple[str, int | None]] = {MODEL_INPUT: (_FIXED, None)}  # token, flat spatial
    for layer in layers:
        token, spatial = raw[ops[layer.name][0]]
        if layer.kind in CONV_KINDS:
            raw[layer.name] = (layer.name, None)
        elif layer.kind in CHANNEL_PRESERVING:
            raw[layer.name] = (token, spatial)
        elif layer.kind == "flatten":
            in_shape = shapes_in[ops[layer.name][0]]
            raw[layer.name] = (token, spatial) if len(in_shape) == 1 else (token, _prod(in_shape[1:]))
        elif layer.kind == "add":
            other_token, other_spatial = raw[ops[layer.name][1]]
            if other_spatial != spatial:  # equal sizes, differently flattened: no common kept set exists
                uf.union(token, _FIXED)
                uf.union(other_token, _FIXED)
                raw[layer.name] = (_FIXED, None)
            else:
                uf.union(token, other_token)
                raw[layer.name] = (token, spatial)
        else:  # dense: its features are never dropped
            raw[layer.name] = (_FIXED, None)
    fixed = uf.find(_FIXED)
    members: dict[str, list[str]] = {}
    for layer in layers:
        if layer.kind in CONV_KINDS and uf.find(layer.name) != fixed:
            members.setdefault(uf.find(layer.name), []).append(layer.name)
    name_of = {root: convs[0] for root, convs in members.items()}
    groups = {convs[0]: tuple(convs) for convs in members.values()}
    conv_group = {layer.name: name_of.get(uf.find(layer.name)) for layer in layers if layer.kind in CONV_KINDS}
    sources = {name: ChannelSource(name_of.get(uf.find(token)), spatial) for name, (token, spatial) in raw.items()}
    return Slicing(groups, conv_group, sources)


def unused_outputs(layers: tuple[LayerSpec, ...]) -> list[str]:
    """Layers (other than the last) whose output nothing reads: a dead branch is a description error."""
    ops = operands(layers)
    read = {name for names in ops.values() for name in names}
    return [layer.name for layer in layers[:-1] if layer.name not in read]


def _prod(values: tuple[int, ...]) -> int:
    size = 1
    for v in values:
        size *= v
    return size
