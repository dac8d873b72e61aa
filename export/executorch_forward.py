"""Export-friendly forms of `torch_model.forward` for the ExecuTorch programs (same maths, other ops).

Training programs run on the portable kernels, so every layer is written in ops whose backward exists
there and is cheap (see executorch_builder's docstring for the measurements behind each choice):
- activations stay channel-major (C, N, …) from the input up to `flatten` or `gap`, so convolutions are
  shifted strided slices + one plain 2-D matmul (no `convolution_backward`, no broadcasts over the batch);
- depthwise convolutions are strided slices (one per kernel tap) stacked, times the per-channel weight,
  summed over the taps (their backward is `slice_scatter` + mul), any stride, any kernel shape;
- zero padding is a concatenation with zeros (`constant_pad_nd`'s backward is a negative pad, which the
  portable kernel rejects); average pooling a sum of strided slices (no `avg_pool2d_backward` kernel);
- residual adds, relu and relu6 are elementwise and work in either layout.
The frozen inference form keeps `norm` and `dense` in shapes XNNPACK delegates. Both walk the layer DAG.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from edgepatch.export import torch_model
from edgepatch.protocol import graph
from edgepatch.protocol.graph import MODEL_INPUT
from edgepatch.protocol.model_spec import LayerSpec, ModelSpec, PatchSpec
from edgepatch.protocol.patch_kinds import PatchBuilders

_ELEMENTWISE = ("relu", "relu6")


def _pad(h: Tensor, pads: tuple[int, ...]) -> Tensor:
    """Zero padding by concatenation along dims 2.. with (before, after) per spatial dim, any layout in
    dims 0 and 1."""
    for i in range(len(pads) // 2):
        before, after = pads[2 * i], pads[2 * i + 1]
        dim = 2 + i
        parts = []
        for size in (before, None, after):
            if size is None:
                parts.append(h)
            elif size > 0:
                shape = list(h.shape)
                shape[dim] = size
                parts.append(h.new_zeros(shape))
        if len(parts) > 1:
            h = torch.cat(parts, dim=dim)
    return h


def _conv_pads(layer: LayerSpec, dims: int) -> tuple[int, ...]:
    return tuple(p for p in graph.conv_padding(layer, dims) for _ in range(2))


def _taps(hp: Tensor, ks: tuple[int, ...], stride: int, out: tuple[int, ...]) -> list[Tensor]:
    """Strided slices of a padded activation, one per kernel tap in row-major (weight) order. Slices that
    would cover a whole dim are skipped: export time grows with the joint graph's node count."""

    def cut(t: Tensor, dim: int, start: int, size: int) -> Tensor:
        stop = start + stride * (size - 1) + 1
        if start == 0 and stride == 1 and stop == t.shape[dim]:
            return t
        index = (slice(None),) * dim + (slice(start, stop, stride),)
        return t[index]

    if len(ks) == 1:
        return [cut(hp, 2, i, out[0]) for i in range(ks[0])]
    rows = [cut(hp, 2, i, out[0]) for i in range(ks[0])]
    return [cut(row, 3, j, out[1]) for row in rows for j in range(ks[1])]


def _out_size(h: Tensor, layer: LayerSpec, ks: tuple[int, ...]) -> tuple[int, ...]:
    return tuple((s - k) // layer.stride + 1 for s, k in zip(h.shape[2:], ks, strict=True))


def _conv_channel_major(layer: LayerSpec, h: Tensor, params: Mapping[str, Tensor]) -> Tensor:
    """conv1d/conv2d on a channel-major activation (C, N, …) as shifted strided slices + one plain 2-D
    matmul W (O, C·kh·kw) @ cols (C·kh·kw, N·spatial). Channel-major keeps the batch inside the matmul's
    columns, so the product needs no broadcast of W over the batch and no transposes around it (in the
    batch-first form those copies were ≈ 45 % of a training step and did not shrink with the FLOPs)."""
    dims = h.dim() - 2
    w, b = params[f"{layer.name}.weight"], params[f"{layer.name}.bias"]
    ks = graph.kernel_size(layer, dims)
    hp = _pad(h, _conv_pads(layer, dims))
    out = _out_size(hp, layer, ks)
    c, n = h.shape[0], h.shape[1]
    taps = _taps(hp, ks, layer.stride, out)
    spatial = 1
    for s in out:
        spatial *= s
    stacked = taps[0] if len(taps) == 1 else torch.stack(taps, dim=1)
    cols = stacked.reshape(c * len(taps), n * spatial)  # (c, taps) rows = weight layout
    out_ch = w.shape[0]
    y = torch.matmul(w.reshape(out_ch, -1), cols) + b.reshape(out_ch, 1)
    return y.reshape(out_ch, n, *out)


def _dwconv_channel_major(layer: LayerSpec, h: Tensor, params: Mapping[str, Tensor]) -> Tensor:
    """Depthwise conv on (C, N, H, W): the taps stacked last, times the per-channel kernel, summed.

    One stack + mul + sum instead of a mul-add per tap: the joint graph is ≈ 3x smaller, and export time
    (to_edge) grows with the node count."""
    w, b = params[f"{layer.name}.weight"], params[f"{layer.name}.bias"]  # (C, 1, kh, kw), (C,)
    ks = graph.kernel_size(layer, 2)
    hp = _pad(h, _conv_pads(layer, 2))
    taps = torch.stack(_taps(hp, ks, layer.stride, _out_size(hp, layer, ks)), dim=-1)  # (C, N, Ho, Wo, T)
    return (taps * w.reshape(w.shape[0], 1, 1, 1, -1)).sum(dim=-1) + b.reshape(-1, 1, 1, 1)


def _norm_channel_major(layer: LayerSpec, h: Tensor, params: Mapping[str, Tensor]) -> Tensor:
    """`norm` (per sample over C and space, per-channel affine) on a channel-major activation."""
    dims = (0, *range(2, h.dim()))
    mean = h.mean(dim=dims, keepdim=True)
    centred = h - mean
    var = (centred * centred).mean(dim=dims, keepdim=True)
    extra = (1,) * (h.dim() - 1)
    w = params[f"{layer.name}.weight"].reshape(-1, *extra)
    b = params[f"{layer.name}.bias"].reshape(-1, *extra)
    return centred * torch.rsqrt(var + torch_model.NORM_EPS) * w + b


APPLY_PATCH_CHANNEL_MAJOR: PatchBuilders[Callable[..., Tensor]] = PatchBuilders("ExecuTorch channel-major")


@APPLY_PATCH_CHANNEL_MAJOR.register("film")
def _film(h: Tensor, params: Mapping[str, Tensor], layer: str, phi: Tensor) -> Tensor:
    extra = (1,) * (h.dim() - 1)
    scale = torch_model.patch_theta(params, layer, "scale", phi).reshape(-1, *extra)
    shift = torch_model.patch_theta(params, layer, "shift", phi).reshape(-1, *extra)
    return h * (1.0 + scale) + shift


@APPLY_PATCH_CHANNEL_MAJOR.register("lowrank")
def _lowrank(h: Tensor, params: Mapping[str, Tensor], layer: str, phi: Tensor) -> Tensor:
    down = torch_model.patch_theta(params, layer, "down", phi)  # (r, C)
    up = torch_model.patch_theta(params, layer, "up", phi)  # (C, r)
    flat = h.reshape(h.shape[0], -1)  # (C, N·spatial): the patch is a per-position channel mix
    z = torch.clamp_min(down @ flat, 0.0)
    return h + (up @ z).reshape(h.shape)


def _patch_channel_major(h: Tensor, patch: PatchSpec, params: Mapping[str, Tensor], layer: str,
                         phi: Tensor) -> Tensor:
    """`torch_model.apply_patch` for a channel-major activation (same θ = θ̄ + Θ·φ maths)."""
    return APPLY_PATCH_CHANNEL_MAJOR.get(patch.kind)(h, params, layer, phi)


def _avgpool_slices(layer: LayerSpec, h: Tensor) -> Tensor:
    """Non-overlapping average pooling (kernel == stride, floor) over every dim after the first two, as a
    sum of strided slices. A reshape + mean form's backward is a 6-D `expand_copy`, the slowest portable
    copy (≈ 14 ns per element, profiled), while a slice's backward is a cheap `slice_scatter`."""
    ks = graph.kernel_size(layer, h.dim() - 2)
    for dim, k in zip(range(2, h.dim()), ks, strict=True):
        size = h.shape[dim] // k
        lead = (slice(None),) * dim
        if size == 1:  # one window along this dim (a global pool): crop once and sum, not k slices
            h = h[(*lead, slice(0, k))].sum(dim=dim, keepdim=True) if h.shape[dim] != k else h.sum(dim, keepdim=True)
            continue
        taps = [h[(*lead, slice(i, i + k * (size - 1) + 1, k))] for i in range(k)]
        h = taps[0]
        for tap in taps[1:]:
            h = h + tap
    scale = 1
    for k in ks:
        scale *= k
    return h * (1.0 / scale)


def _channel_major_layer(layer: LayerSpec, h: Tensor, params: Mapping[str, Tensor]) -> tuple[Tensor, bool]:
    """One layer on a channel-major activation; returns the output and whether it is still channel-major."""
    if layer.kind in ("conv2d", "conv1d"):
        return _conv_channel_major(layer, h, params), True
    if layer.kind == "dwconv2d":
        return _dwconv_channel_major(layer, h, params), True
    if layer.kind == "avgpool":
        return _avgpool_slices(layer, h), True
    if layer.kind == "norm":
        return _norm_channel_major(layer, h, params), True
    if layer.kind == "pad":
        return _pad(h, layer.pads), True
    if layer.kind in _ELEMENTWISE:
        return torch_model.layer_forward(layer, h, params), True
    if layer.kind == "gap":
        return h.mean(dim=tuple(range(2, h.dim()))).transpose(0, 1), False
    if layer.kind == "flatten":
        return h.transpose(0, 1).reshape(h.shape[1], -1), False
    return torch_model.layer_forward(layer, h.transpose(0, 1), params).transpose(0, 1), True


def trainable_forward(spec: ModelSpec, patch: PatchSpec | None, params: Mapping[str, Tensor], x: Tensor,
                      phi: Tensor | None = None) -> Tensor:
    """`torch_model.forward` rewritten for the portable training kernels, same maths.

    Spatial activations are channel-major (C, N, …); after `flatten` or `gap` every layer and patch is
    the reference code itself. A residual add of two tensors in different layouts converts one."""
    acts: dict[str, tuple[Tensor, bool]] = {MODEL_INPUT: (x.transpose(0, 1), True)}
    for layer in spec.layers:
        ins = [acts[name] for name in spec.operands(layer.name)]
        h, channel_major = ins[0]
        if layer.kind == "add":
            other, other_major = ins[1]
            h = h + (other if other_major == channel_major else other.transpose(0, 1))
        elif channel_major:
            h, channel_major = _channel_major_layer(layer, h, params)
        else:
            h = torch_model.layer_forward(layer, h, params)
        if patch is not None and phi is not None and layer.name in patch.layers:
            h = (_patch_channel_major(h, patch, params, layer.name, phi) if channel_major
                 else torch_model.apply_patch(h, patch, params, layer.name, phi))
        acts[layer.name] = (h, channel_major)
    out, channel_major = acts[spec.layers[-1].name]
    return torch_model.add_head_bias(out.transpose(0, 1) if channel_major else out, spec, patch, params, phi)


def _norm_xnnpack(layer: LayerSpec, h: Tensor, params: Mapping[str, Tensor]) -> Tensor:
    """`norm` with its per-sample statistics as a spatial mean (XNNPACK's global average in its NHWC
    layout) followed by a mean over the channels of the tiny (N, C, 1, 1) result. The reference form
    (one mean over C and space) is not delegated: it fell back to portable kernels between delegate
    islands, ≈ 40 % of mnist_cnn's inference, and did not shrink with the variant (profiled)."""
    n, c = h.shape[0], h.shape[1]
    four = h if h.dim() == 4 else h.unsqueeze(-1)

    def per_sample_mean(t: Tensor) -> Tensor:
        spatial = t.mean(dim=(-2, -1), keepdim=True)  # (N, C, 1, 1); every channel has equal size
        return spatial.reshape(n, 1, c, 1).mean(dim=(-2, -1), keepdim=True).reshape(n, 1, 1, 1)

    centred = four - per_sample_mean(four)
    normed = centred * torch.rsqrt(per_sample_mean(centred * centred) + torch_model.NORM_EPS)
    normed = normed if h.dim() == 4 else normed.squeeze(-1)
    extra = (1,) * (h.dim() - 2)
    return normed * params[f"{layer.name}.weight"].reshape(1, -1, *extra) + params[f"{layer.name}.bias"].reshape(
        1, -1, *extra)


def inference_forward(spec: ModelSpec, patch: PatchSpec | None, params: Mapping[str, Tensor], x: Tensor,
                      phi: Tensor | None = None) -> Tensor:
    """`torch_model.forward` with norm, dense and gap in forms XNNPACK delegates (frozen inference only)."""
    acts: dict[str, Tensor] = {MODEL_INPUT: x}
    for layer in spec.layers:
        ins = [acts[name] for name in spec.operands(layer.name)]
        h = ins[0]
        if layer.kind == "norm":
            h = _norm_xnnpack(layer, h, params)
        elif layer.kind == "dense":  # linear with a constant weight -> XNNPACK fully connected
            h = F.linear(h, params[f"{layer.name}.weight"], params[f"{layer.name}.bias"])
        elif layer.kind == "gap" and h.dim() == 4:  # keepdim mean over H, W = XNNPACK global average pooling
            h = h.mean(dim=(-2, -1), keepdim=True).reshape(h.shape[0], h.shape[1])
        else:
            h = torch_model.layer_forward(layer, h, params, ins[1] if len(ins) > 1 else None)
        if patch is not None and phi is not None and layer.name in patch.layers:
            h = torch_model.apply_patch(h, patch, params, layer.name, phi)
        acts[layer.name] = h
    return torch_model.add_head_bias(acts[spec.layers[-1].name], spec, patch, params, phi)
