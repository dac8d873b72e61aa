"""ExecuTorch programs (.pte) for the device: frozen inference, φ training and full-weight training.

Programs (see docs/CONTRACTS.md "ExecuTorch programs"):
- `build_inference_pte`: XNNPACK-delegated; W, Θ, θ̄ baked as constants; inputs `x` f32[B, …] and
  `phi` f32[k] → logits f32[B, classes].
- `build_train_phi_pte`: the only parameter is φ. Inputs `x` f32[B, …], `y` **int64**[B], then every
  sliced parameter of the variant (roles base, bar, basis) in `param_infos` order. Outputs: loss f32[]
  (first), logits, then the runtime's training tail (grad φ, φ). The input names are stored in the
  program (constant method `edgepatch_param_input_names`). The device writes φ into the program's
  parameter, runs, reads the gradient and applies `protocol.optim.adam_step` in numpy.
- `build_train_full_pte`: parameters = the variant's sliced base params (no patch). Inputs `x`, `y`
  int64. The device copies freshly sliced weights into the parameters, runs, reads the gradients.
- `build_infer_variant_pte`: per-variant inference for benchmarks, sliced params **baked** (first_kept
  or a given kept set), XNNPACK-delegated, so its time is the variant's real inference cost.

Training programs are not delegated: every weight is a runtime input there, which XNNPACK cannot take
as a convolution filter (measured: delegation gave no speed-up and a 5–10× slower export), and the
partitioner would bake a trainable matmul weight as a constant (RUNTIME_FACTS). Convolutions in training
programs are written as shifted slices + one 2-D matmul on channel-major activations (C, N, …)
because the portable `convolution_backward` kernel was ≈ 3× slower (mnist_cnn, batch 32: ≈ 1.2 s vs
≈ 0.35 s per φ step) and the batch-first form spent ≈ 45 % of a step in transposes and broadcasts that
do not shrink with the kept filters. Average pooling is a sum of strided slices because the portable
runtime has no `avg_pool2d_backward` kernel. The frozen inference export keeps `norm` and `dense` in
forms XNNPACK delegates (`inference_forward`), so no portable op sits between delegate islands. All
rewrites are checked against `export/torch_model.py::forward` in the tests.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgepatch.export import torch_model
from edgepatch.protocol.model_spec import LayerSpec, ModelSpec, PatchSpec, param_infos
from edgepatch.protocol.variants import KeptSets, Variant, first_kept, slice_params

DEFAULT_BATCH = 32
LABEL_DTYPE = np.int64  # `y` of every training program
INPUT_NAMES_METHOD = "edgepatch_param_input_names"  # constant method of train_phi programs


class ExecuTorchExportError(RuntimeError):
    """An ExecuTorch program that does not have the structure the device relies on."""


def et_name(name: str) -> str:
    """Parameter name inside a program ('.' is not allowed in torch attribute names)."""
    return name.replace(".", "__")


# -- export-friendly forward ----------------------------------------------------------------------


def _pad(h: Tensor, pad: int) -> Tensor:
    """Zero padding by concatenation: the backward of `constant_pad_nd` is a negative pad, which the
    portable kernel rejects."""
    if pad == 0:
        return h
    if h.dim() == 3:
        z = h.new_zeros(h.shape[0], h.shape[1], pad)
        return torch.cat([z, h, z], dim=2)
    n, c, height, width = h.shape
    z = h.new_zeros(n, c, pad, width)
    h = torch.cat([z, h, z], dim=2)
    z = h.new_zeros(n, c, height + 2 * pad, pad)
    return torch.cat([z, h, z], dim=3)


def _conv_channel_major(layer: LayerSpec, h: Tensor, params: Mapping[str, Tensor]) -> Tensor:
    """conv1d/conv2d (symmetric padding kernel//2) on a channel-major activation (C, N, …) as shifted
    strided slices + one plain 2-D matmul W (O, C·k·k) @ cols (C·k·k, N·spatial).

    Channel-major keeps the batch inside the matmul's columns, so the product needs no broadcast of W
    over the batch (expand_copy) and no transposes around it (permute_copy): in the batch-first form
    those copies were ≈ 45 % of a training step and scale only with activations, not with FLOPs."""
    w, b = params[f"{layer.name}.weight"], params[f"{layer.name}.bias"]
    k, s, p = layer.kernel, layer.stride, layer.kernel // 2
    out_ch = w.shape[0]
    hp = _pad(h, p)
    if h.dim() == 4:
        c, n, height, width = h.shape
        ho, wo = (height + 2 * p - k) // s + 1, (width + 2 * p - k) // s + 1
        taps = [hp[:, :, i:i + s * (ho - 1) + 1:s, j:j + s * (wo - 1) + 1:s] for i in range(k) for j in range(k)]
        cols = torch.stack(taps, dim=1).reshape(c * k * k, n * ho * wo)  # (c, i, j) rows = weight layout
        out = torch.matmul(w.reshape(out_ch, -1), cols) + b.reshape(out_ch, 1)
        return out.reshape(out_ch, n, ho, wo)
    c, n, length = h.shape
    lo = (length + 2 * p - k) // s + 1
    cols = torch.stack([hp[:, :, i:i + s * (lo - 1) + 1:s] for i in range(k)], dim=1).reshape(c * k, n * lo)
    return (torch.matmul(w.reshape(out_ch, -1), cols) + b.reshape(out_ch, 1)).reshape(out_ch, n, lo)


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


def _patch_channel_major(h: Tensor, patch: PatchSpec, params: Mapping[str, Tensor], layer: str,
                         phi: Tensor) -> Tensor:
    """`torch_model.apply_patch` for a channel-major activation (same θ = θ̄ + Θ·φ maths)."""
    if patch.kind == "film":
        extra = (1,) * (h.dim() - 1)
        scale = torch_model.patch_theta(params, layer, "scale", phi).reshape(-1, *extra)
        shift = torch_model.patch_theta(params, layer, "shift", phi).reshape(-1, *extra)
        return h * (1.0 + scale) + shift
    down = torch_model.patch_theta(params, layer, "down", phi)  # (r, C)
    up = torch_model.patch_theta(params, layer, "up", phi)  # (C, r)
    flat = h.reshape(h.shape[0], -1)  # (C, N·spatial): the patch is a per-position channel mix
    z = torch.clamp_min(down @ flat, 0.0)
    return h + (up @ z).reshape(h.shape)


def _avgpool_slices(layer: LayerSpec, h: Tensor) -> Tensor:
    """Non-overlapping average pooling (kernel == stride, floor) over every dim after the first two, as a
    sum of strided slices. The portable runtime has no `avg_pool2d_backward`; a reshape + mean form
    works but its backward is a 6-D `expand_copy`, the slowest portable copy (≈ 14 ns per element,
    profiled), while a slice's backward is a cheap `slice_scatter`. Layout-agnostic in dims 0 and 1."""
    k = layer.kernel
    for dim in range(2, h.dim()):
        size = h.shape[dim] // k
        lead = (slice(None),) * dim
        taps = [h[(*lead, slice(i, i + k * (size - 1) + 1, k))] for i in range(k)]
        h = taps[0]
        for tap in taps[1:]:
            h = h + tap
    return h * (1.0 / k ** (h.dim() - 2))


def trainable_forward(spec: ModelSpec, patch: PatchSpec | None, params: Mapping[str, Tensor], x: Tensor,
                      phi: Tensor | None = None) -> Tensor:
    """`torch_model.forward` rewritten for the portable training kernels, same maths.

    Activations stay channel-major (C, N, …) from the input up to `flatten` (see `_conv_channel_major`);
    convs are slices + matmul, average pooling a sum of strided slices (`_avgpool_slices`). Layers without a channel-major form (dwconv2d) run the reference code in
    batch-first layout; after `flatten` every layer and patch is the reference code itself.
    """
    h = x.transpose(0, 1)
    channel_major = True
    for layer in spec.layers:
        if channel_major and layer.kind == "flatten":
            h = h.transpose(0, 1).reshape(h.shape[1], -1)
            channel_major = False
        elif channel_major and layer.kind in ("conv2d", "conv1d"):
            h = _conv_channel_major(layer, h, params)
        elif channel_major and layer.kind == "avgpool":
            h = _avgpool_slices(layer, h)
        elif channel_major and layer.kind == "norm":
            h = _norm_channel_major(layer, h, params)
        elif channel_major and layer.kind != "relu":
            h = torch_model.layer_forward(layer, h.transpose(0, 1), params).transpose(0, 1)
        else:
            h = torch_model.layer_forward(layer, h, params)
        if patch is not None and phi is not None and layer.name in patch.layers:
            h = (_patch_channel_major(h, patch, params, layer.name, phi) if channel_major
                 else torch_model.apply_patch(h, patch, params, layer.name, phi))
    return h.transpose(0, 1) if channel_major else h


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
    """`torch_model.forward` with norm and dense in the forms XNNPACK delegates (frozen inference only)."""
    h = x
    for layer in spec.layers:
        if layer.kind == "norm":
            h = _norm_xnnpack(layer, h, params)
        elif layer.kind == "dense":  # linear with a constant weight -> XNNPACK fully connected
            h = F.linear(h, params[f"{layer.name}.weight"], params[f"{layer.name}.bias"])
        else:
            h = torch_model.layer_forward(layer, h, params)
        if patch is not None and phi is not None and layer.name in patch.layers:
            h = torch_model.apply_patch(h, patch, params, layer.name, phi)
    return h


# -- modules that get exported --------------------------------------------------------------------


class _FrozenInference(nn.Module):
    """Inference with every weight a buffer (baked as a constant); φ is an input."""

    def __init__(self, spec: ModelSpec, patch: PatchSpec | None, params: Mapping[str, np.ndarray]) -> None:
        super().__init__()
        self.spec, self.patch = spec, patch
        self.names = list(param_infos(spec, patch))
        for name in self.names:
            self.register_buffer(et_name(name), torch.tensor(np.asarray(params[name], dtype=np.float32)))

    def forward(self, x: Tensor, phi: Tensor) -> Tensor:
        params = {name: getattr(self, et_name(name)) for name in self.names}
        return inference_forward(self.spec, self.patch, params, x, phi if self.patch is not None else None)


class _PhiTraining(nn.Module):
    """φ is the only parameter; the variant's sliced params arrive as inputs in `names` order."""

    def __init__(self, spec: ModelSpec, patch: PatchSpec) -> None:
        super().__init__()
        self.spec, self.patch = spec, patch
        self.names = list(param_infos(spec, patch))
        self.phi = nn.Parameter(torch.zeros(patch.k))

    def forward(self, x: Tensor, y: Tensor, *sliced: Tensor) -> tuple[Tensor, Tensor]:
        logits = trainable_forward(self.spec, self.patch, dict(zip(self.names, sliced, strict=True)), x, self.phi)
        return F.cross_entropy(logits, y), logits.detach()


class _FullTraining(nn.Module):
    """The variant's sliced base params are the parameters; no patch."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.names = list(param_infos(spec, None))
        for name, info in param_infos(spec, None).items():
            self.register_parameter(et_name(name), nn.Parameter(torch.zeros(info.shape)))

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        params = {name: getattr(self, et_name(name)) for name in self.names}
        logits = trainable_forward(self.spec, None, params, x)
        return F.cross_entropy(logits, y), logits.detach()


# -- export helpers -------------------------------------------------------------------------------


def _check_batch(batch: int) -> None:
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int (the program's fixed batch), got {batch!r}")


def _example_x(spec: ModelSpec, batch: int) -> Tensor:
    return torch.zeros(batch, *spec.input_shape)


def _example_y(spec: ModelSpec, batch: int) -> Tensor:
    return torch.arange(batch, dtype=torch.int64) % spec.num_classes


def _lower_xnnpack(module: nn.Module, example: tuple[Tensor, ...]) -> bytes:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    ep = torch.export.export(module.eval(), example, strict=False)
    program = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch()
    return bytes(program.buffer)


def _trainable_targets(graph_signature: Any) -> set[str]:
    from torch.export.graph_signature import OutputKind

    return {spec.target for spec in graph_signature.output_specs if spec.kind == OutputKind.GRADIENT_TO_PARAMETER}


def _export_training(module: nn.Module, example: tuple[Tensor, ...], intended: set[str],
                     input_names: Sequence[str] = ()) -> bytes:
    """Joint forward-backward export; raises unless exactly `intended` parameters get gradients.

    `input_names` (the sliced-param inputs after x and y) are stored in the program as the constant
    method `INPUT_NAMES_METHOD`, so the runner can order a name → array mapping itself."""
    from executorch.exir import EdgeCompileConfig, to_edge
    from torch.export.experimental import _export_forward_backward

    ep = torch.export.export(module, example, strict=False)
    joint = _export_forward_backward(ep, joint_loss_index=0)
    constants = {INPUT_NAMES_METHOD: list(input_names)} if input_names else None
    program = to_edge(joint, constant_methods=constants,
                      compile_config=EdgeCompileConfig(_check_ir_validity=False)).to_executorch()
    trained = _trainable_targets(program.exported_program().graph_signature)
    if trained != intended:
        raise ExecuTorchExportError(
            f"trainable parameter set after export is {sorted(trained)}, intended {sorted(intended)} "
            "(a partitioner or decomposition baked or added a parameter)")
    return bytes(program.buffer)


# -- public builders ------------------------------------------------------------------------------


def build_inference_pte(spec: ModelSpec, patch: PatchSpec | None, params: Mapping[str, np.ndarray],
                        batch: int = DEFAULT_BATCH) -> bytes:
    """Frozen, XNNPACK-delegated inference: inputs x f32[batch, …], phi f32[k] → logits."""
    _check_batch(batch)
    missing = [n for n in param_infos(spec, patch) if n not in params]
    if missing:
        raise ValueError(f"params miss {missing[:5]} for model {spec.name!r}")
    k = patch.k if patch is not None else 1
    return _lower_xnnpack(_FrozenInference(spec, patch, params), (_example_x(spec, batch), torch.zeros(k)))


def build_infer_variant_pte(spec: ModelSpec, patch: PatchSpec | None, variant: Variant,
                            params: Mapping[str, np.ndarray], batch: int = DEFAULT_BATCH,
                            kept: KeptSets | None = None) -> bytes:
    """A variant's inference program with its sliced params **baked** (XNNPACK), for timing it.

    `kept` defaults to `first_kept` (nested widths). Inputs x, phi → logits, like `build_inference_pte`.
    """
    small = variant.spec(spec)
    kept = first_kept(spec, variant) if kept is None else kept
    sliced = slice_params(params, param_infos(spec, patch), kept)
    return build_inference_pte(small, patch, sliced, batch)


def build_train_phi_pte(spec: ModelSpec, patch: PatchSpec, variant: Variant, batch: int = DEFAULT_BATCH) -> bytes:
    """φ training program of one variant: inputs x, y (int64), sliced params → loss first; grad φ out."""
    _check_batch(batch)
    small = variant.spec(spec)
    infos = param_infos(small, patch)
    example_params = tuple(torch.zeros(info.shape) for info in infos.values())
    example = (_example_x(small, batch), _example_y(small, batch), *example_params)
    return _export_training(_PhiTraining(small, patch), example, {"phi"}, list(infos))


def build_train_full_pte(spec: ModelSpec, variant: Variant, batch: int = DEFAULT_BATCH) -> bytes:
    """Full-weight training program of one variant: parameters = sliced base params; inputs x, y (int64)."""
    _check_batch(batch)
    small = variant.spec(spec)
    intended = {et_name(n) for n in param_infos(small, None)}
    return _export_training(_FullTraining(small), (_example_x(small, batch), _example_y(small, batch)), intended)


def phi_input_names(spec: ModelSpec, patch: PatchSpec, variant: Variant) -> list[str]:
    """Order of the sliced-param inputs of `build_train_phi_pte` (after x and y)."""
    return list(param_infos(variant.spec(spec), patch))


# -- benchmark ------------------------------------------------------------------------------------


def benchmark_tasks(spec: ModelSpec, patch: PatchSpec, variants: Sequence[Variant],
                    params: Mapping[str, np.ndarray], batch: int, rng: np.random.Generator
                    ) -> dict[tuple[str, str], Callable[[], object]]:
    """One step of train_full / train_phi / infer per variant, as callables for benchmarks/variant_cost.py
    (which times them interleaved with the LiteRT ones). Exports three programs per variant; inference
    uses the baked `build_infer_variant_pte` on the first filters."""
    from edgepatch.device.backends.executorch import (
        ExecuTorchFullTrainer,
        ExecuTorchInference,
        ExecuTorchPhiTrainer,
    )

    x = rng.normal(size=(batch, *spec.input_shape)).astype(np.float32)
    y = rng.integers(0, spec.num_classes, size=batch).astype(LABEL_DTYPE)
    phi = np.zeros(patch.k, np.float32)
    tasks: dict[tuple[str, str], Callable[[], object]] = {}
    for variant in variants:
        kept = first_kept(spec, variant)
        sliced = slice_params(params, param_infos(spec, patch), kept)
        sliced_base = slice_params(params, param_infos(spec, None), kept)
        full = ExecuTorchFullTrainer(build_train_full_pte(spec, variant, batch))
        train_phi = ExecuTorchPhiTrainer(build_train_phi_pte(spec, patch, variant, batch))
        infer = ExecuTorchInference(build_infer_variant_pte(spec, patch, variant, params, batch, kept))
        tasks[(variant.id, "train_full")] = partial(full.grads, x, y, sliced_base)
        tasks[(variant.id, "train_phi")] = partial(train_phi.grad, x, y, phi, sliced)
        tasks[(variant.id, "infer")] = partial(infer.infer, x, phi)
    return tasks
