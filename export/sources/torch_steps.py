"""Build steps of the torch converter: each checks one fx node and returns what to add to the description.

A step is a closure run later over the `SpecBuilder` (after every node was classified, so that every
unsupported layer is reported before anything is built); `refs` maps fx node names to description tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from .builder import HINTS, INPUT, Ref, SpecBuilder, refuse

Step = Callable[[SpecBuilder, dict[str, Ref]], None]


def node_shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def as_tuple(value: Any) -> tuple[int, ...]:
    return tuple(int(v) for v in value) if isinstance(value, (tuple, list)) else (int(value),)



def alias(node: fx.Node, src: Any, name: str | None = None) -> Step:
    def step(b: SpecBuilder, refs: dict[str, Ref]) -> None:
        refs[name or node.name] = refs[src.name] if src is not None else INPUT

    return step


def simple(node: fx.Node, src: Any, kind: str, label: str, flat: bool = False, **fields: Any) -> Step:
    def step(b: SpecBuilder, refs: dict[str, Ref]) -> None:
        refs[node.name] = b.add(kind, label, refs[src.name], flat=flat, **fields)

    return step


def weighted(node: fx.Node, src: Any, kind: str, label: str, weight: torch.Tensor, bias: torch.Tensor | None,
              **fields: object) -> Step:
    w = weight.detach().numpy().copy()
    b = None if bias is None else bias.detach().numpy().copy()

    def step(builder: SpecBuilder, refs: dict[str, Ref]) -> None:
        refs[node.name] = builder.weighted(kind, label, refs[src.name], w, b, **fields)

    return step


def conv_step(node: fx.Node, mod: nn.Conv1d | nn.Conv2d, label: str, type_name: str) -> Step:
    dims = 2 if isinstance(mod, nn.Conv2d) else 1
    if mod.padding_mode != "zeros":
        raise refuse(label, type_name, f"only zero padding (padding_mode {mod.padding_mode!r})")
    if set(as_tuple(mod.dilation)) != {1}:
        raise refuse(label, type_name, "dilated convolutions are not supported: use dilation=1")
    strides = as_tuple(mod.stride)
    if len(set(strides)) != 1:
        raise refuse(label, type_name, f"stride {strides} differs per axis: use one stride for every axis")
    kind = "conv2d" if dims == 2 else "conv1d"
    if mod.groups != 1:
        if dims == 2 and mod.groups == mod.in_channels == mod.out_channels:
            kind = "dwconv2d"
        else:
            raise refuse(label, type_name, "grouped convs are supported only as depthwise Conv2d "
                         "(groups = in_channels = out_channels)")
    kernel = as_tuple(mod.kernel_size)
    if mod.padding == "same":
        pads = [((k - 1) // 2, k - 1 - (k - 1) // 2) for k in kernel]
    elif mod.padding == "valid":
        pads = [(0, 0)] * dims
    else:
        pads = [(p, p) for p in as_tuple(mod.padding)]
    w = mod.weight.detach().numpy().copy()
    bias = None if mod.bias is None else mod.bias.detach().numpy().copy()

    src_name = str(getattr(node.args[0], "name", node.args[0]))

    def step(b: SpecBuilder, refs: dict[str, Ref]) -> None:
        src = refs[src_name]
        refs[node.name] = b.conv(kind, label, src, w, bias, strides[0], pads)

    return step


def norm_step(node: fx.Node, mod: nn.BatchNorm1d | nn.BatchNorm2d, label: str, type_name: str,
               modules: Mapping[str, nn.Module]) -> Step:
    prev = node.args[0]
    if mod.running_mean is None or mod.running_var is None:
        raise refuse(label, type_name, "BatchNorm without running statistics cannot be folded "
                     "(use track_running_stats=True)")
    if not (isinstance(prev, fx.Node) and prev.op == "call_module" and len(prev.users) == 1
            and isinstance(modules[str(prev.target)], (nn.Conv1d, nn.Conv2d, nn.Linear))):
        raise refuse(label, type_name, HINTS["norm"] + "; here it follows "
                     f"{getattr(prev, 'name', prev)!r}, or that layer's output is also used elsewhere")
    gamma = None if mod.weight is None else mod.weight.detach().numpy().copy()
    beta = None if mod.bias is None else mod.bias.detach().numpy().copy()
    mean, var = mod.running_mean.numpy().copy(), mod.running_var.numpy().copy()

    def step(b: SpecBuilder, refs: dict[str, Ref]) -> None:
        refs[node.name] = b.fold_norm(refs[prev.name], gamma, beta, mean, var, float(mod.eps))

    return step


def pool_step(node: fx.Node, src: Any, label: str, kernel: tuple[int, ...]) -> Step:
    fields: dict[str, Any] = {"kernel": kernel[0]}
    if len(kernel) == 2 and kernel[1] != kernel[0]:
        fields["kernel_w"] = kernel[1]
    return simple(node, src, "avgpool", label, **fields)


def flatten_step(node: fx.Node, src: Any, label: str, type_name: str) -> Step:
    before, after = node_shape(src) or (), node_shape(node) or ()
    if len(after) != 2 or after[0] != before[0] or after[1] != int(np.prod(before[1:])):
        raise refuse(label, type_name, HINTS["reshape"] + f" (this one reshapes {before} to {after})")

    def step(b: SpecBuilder, refs: dict[str, Ref]) -> None:
        ref = refs[src.name]
        # After global pooling (or already flat) the description's tensor is (C,): nothing to flatten.
        refs[node.name] = ref if ref.flat else b.add("flatten", label, ref, flat=True)

    return step


def mean_step(node: fx.Node, src: Any, label: str) -> Step:
    rank = len(node_shape(src) or ())
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
    wanted = set(range(2, rank))
    got = {d % rank for d in as_tuple(dims)} if dims is not None else set()
    if rank < 3 or got != wanted:
        raise refuse(label, "mean", "only a mean over every spatial axis (global average pooling)")
    del keepdim  # (N, C) or (N, C, 1, 1): both are the description's flat (C,) after gap
    return simple(node, src, "gap", label, flat=True)


def add_step(node: fx.Node, a: fx.Node, c: fx.Node, label: str) -> Step:
    def step(b: SpecBuilder, refs: dict[str, Ref]) -> None:
        first, second = refs[a.name], refs[c.name]
        # `input` reads the later-built operand where possible, so the layer usually follows it.
        last = b.layers[-1].name if b.layers else "input"
        if second.name == last:
            first, second = second, first
        refs[node.name] = b.add("add", label, first, source=second.name)

    return step


def pad_step(node: fx.Node, src: Any, label: str, type_name: str, padding: Any) -> Step:
    rank = len(node_shape(src) or ())
    spatial = rank - 2
    pads = as_tuple(padding)
    if len(pads) == 1:
        pads = pads * (2 * spatial)
    if len(pads) % 2 or len(pads) > 2 * spatial or min(pads) < 0:
        raise refuse(label, type_name, "only non-negative zero padding of the spatial axes")
    pads = pads + (0,) * (2 * spatial - len(pads))  # F.pad(x, (l, r)) on an image pads the width only
    # torch lists the last axis first: (left, right[, top, bottom]); the description lists axes in order.
    pairs = [pads[i:i + 2] for i in range(0, len(pads), 2)][::-1]
    flat = tuple(int(v) for pair in pairs for v in pair)
    return simple(node, src, "pad", label, pads=flat)


def softmax_step(node: fx.Node, src: Any, label: str, type_name: str) -> Step:
    if [u.op for u in node.users] != ["output"] or len(node_shape(node) or ()) != 2:
        raise refuse(label, type_name, HINTS["softmax"])
    return alias(node, src)  # a softmax on the logits changes no prediction: dropped
