"""The torch reference of a model description: a functional forward over a name → tensor dict.

Every other builder (TensorFlow twin, ExecuTorch) is checked against this forward in the parity tests.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgepatch.protocol import graph
from edgepatch.protocol.graph import MODEL_INPUT
from edgepatch.protocol.model_spec import LayerSpec, ModelSpec, PatchSpec, param_infos, patch_parts
from edgepatch.protocol.patch_kinds import HEAD_BIAS_PART, PatchBuilders

NORM_EPS = 1e-5


def patch_theta(params: Mapping[str, Tensor], layer: str, part: str, phi: Tensor) -> Tensor:
    """MetaPatch: θ = θ̄ + Θ·φ for one part of one layer's patch."""
    return params[f"{layer}.patch.{part}"] + params[f"{layer}.patch.{part}_basis"] @ phi


APPLY_PATCH: PatchBuilders[Callable[..., Tensor]] = PatchBuilders("torch")


@APPLY_PATCH.register("film")
def _film(h: Tensor, params: Mapping[str, Tensor], layer: str, phi: Tensor) -> Tensor:
    extra = (1,) * (h.dim() - 2)  # broadcast per-channel vectors over spatial axes
    scale = patch_theta(params, layer, "scale", phi).reshape(1, -1, *extra)
    shift = patch_theta(params, layer, "shift", phi).reshape(1, -1, *extra)
    return h * (1.0 + scale) + shift


@APPLY_PATCH.register("lowrank")
def _lowrank(h: Tensor, params: Mapping[str, Tensor], layer: str, phi: Tensor) -> Tensor:
    down = patch_theta(params, layer, "down", phi)  # (r, C)
    up = patch_theta(params, layer, "up", phi)  # (C, r)
    hc = h.movedim(1, -1)  # channels last for the matmuls
    z = torch.clamp_min(hc @ down.t(), 0.0)
    return h + (z @ up.t()).movedim(-1, 1)


def apply_patch(h: Tensor, patch: PatchSpec, params: Mapping[str, Tensor], layer: str, phi: Tensor) -> Tensor:
    """The patch of `layer` on a batch-first activation, by the kind's registered torch builder."""
    return APPLY_PATCH.get(patch.kind)(h, params, layer, phi)


def add_head_bias(logits: Tensor, spec: ModelSpec, patch: PatchSpec | None, params: Mapping[str, Tensor],
                  phi: Tensor | None) -> Tensor:
    """Batch-first logits plus the patch's head bias θ̄_hb + Θ_hb·φ (unchanged without one)."""
    if patch is None or phi is None or not patch.head_bias:
        return logits
    return logits + patch_theta(params, spec.layers[-1].name, HEAD_BIAS_PART, phi)


def pad_spatial(h: Tensor, pads: tuple[int, ...]) -> Tensor:
    """Zero padding with pads (before, after) per spatial dim in spec order (rows first)."""
    if not any(pads):
        return h
    pairs = [pads[i:i + 2] for i in range(0, len(pads), 2)]
    return F.pad(h, [p for pair in reversed(pairs) for p in pair])  # F.pad lists the last dim first


def layer_forward(layer: LayerSpec, h: Tensor, params: Mapping[str, Tensor], other: Tensor | None = None) -> Tensor:
    """One layer on a batch-first activation; `other` is an add's second operand."""
    n = layer.name
    if layer.kind in ("conv2d", "conv1d", "dwconv2d"):
        pad = graph.conv_padding(layer, h.dim() - 2)
        conv = F.conv1d if layer.kind == "conv1d" else F.conv2d
        groups = h.shape[1] if layer.kind == "dwconv2d" else 1
        return conv(h, params[f"{n}.weight"], params[f"{n}.bias"], stride=layer.stride, padding=pad,
                    groups=groups)
    if layer.kind == "dense":
        return h @ params[f"{n}.weight"].t() + params[f"{n}.bias"]
    if layer.kind == "relu":
        return torch.clamp_min(h, 0.0)
    if layer.kind == "relu6":
        return torch.clamp(h, 0.0, 6.0)
    if layer.kind == "avgpool":
        kernel = graph.kernel_size(layer, h.dim() - 2)
        pool = F.avg_pool2d if h.dim() == 4 else F.avg_pool1d
        return pool(h, kernel, kernel)
    if layer.kind == "gap":
        return h.mean(dim=tuple(range(2, h.dim())))
    if layer.kind == "pad":
        return pad_spatial(h, layer.pads)
    if layer.kind == "add":
        assert other is not None
        return h + other
    if layer.kind == "flatten":
        return h.reshape(h.shape[0], -1)
    if layer.kind == "norm":  # per-sample normalization over (C, spatial), per-channel affine
        dims = tuple(range(1, h.dim()))
        mean = h.mean(dim=dims, keepdim=True)
        var = ((h - mean) ** 2).mean(dim=dims, keepdim=True)
        extra = (1,) * (h.dim() - 2)
        w = params[f"{n}.weight"].reshape(1, -1, *extra)
        b = params[f"{n}.bias"].reshape(1, -1, *extra)
        return (h - mean) * torch.rsqrt(var + NORM_EPS) * w + b
    raise ValueError(layer.kind)


def forward(spec: ModelSpec, patch: PatchSpec | None, params: Mapping[str, Tensor], x: Tensor,
            phi: Tensor | None = None) -> Tensor:
    """Logits of the (patched) model. `spec` may be a variant's smaller spec with sliced params.

    Walks the layer DAG in order; a patched layer's consumers read its patched output."""
    acts: dict[str, Tensor] = {MODEL_INPUT: x}
    for layer in spec.layers:
        ins = [acts[name] for name in spec.operands(layer.name)]
        h = layer_forward(layer, ins[0], params, ins[1] if len(ins) > 1 else None)
        if patch is not None and phi is not None and layer.name in patch.layers:
            h = apply_patch(h, patch, params, layer.name, phi)
        acts[layer.name] = h
    return add_head_bias(acts[spec.layers[-1].name], spec, patch, params, phi)


def to_tensors(params: Mapping[str, np.ndarray], requires_grad: bool = False) -> dict[str, Tensor]:
    return {k: torch.tensor(np.asarray(v, dtype=np.float32), requires_grad=requires_grad)
            for k, v in params.items()}


class PatchedNet(nn.Module):
    """An nn.Module over the functional forward; parameter names use '__' for '.' (torch forbids dots)."""

    def __init__(self, spec: ModelSpec, patch: PatchSpec | None, params: Mapping[str, np.ndarray],
                 phi: np.ndarray | None = None) -> None:
        super().__init__()
        self.spec, self.patch = spec, patch
        self.names = list(param_infos(spec, patch))
        for name in self.names:
            self.register_parameter(name.replace(".", "__"),
                                    nn.Parameter(torch.tensor(np.asarray(params[name], dtype=np.float32))))
        k = patch.k if patch is not None else 1
        self.phi = nn.Parameter(torch.tensor(phi if phi is not None else np.zeros(k, np.float32)))

    def param_dict(self) -> dict[str, Tensor]:
        return {name: getattr(self, name.replace(".", "__")) for name in self.names}

    def forward(self, x: Tensor) -> Tensor:
        return forward(self.spec, self.patch, self.param_dict(), x, self.phi if self.patch else None)


def patch_channels(spec: ModelSpec, patch: PatchSpec) -> dict[str, dict[str, tuple[int, ...]]]:
    """Shapes of every patch's parts (for docs and inspection)."""
    shapes = spec.activation_shapes()
    return {n: patch_parts(patch.kind, shapes[n][0], patch.rank) for n in patch.layers}
