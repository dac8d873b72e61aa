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
rewrites (in `executorch_forward.py`) are checked against `export/torch_model.py::forward` in the tests.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgepatch.export.executorch_forward import _avgpool_slices, inference_forward, trainable_forward  # noqa: F401
from edgepatch.protocol.model_spec import ModelSpec, PatchSpec, param_infos
from edgepatch.protocol.variants import KeptSets, Variant, first_kept, slice_params

DEFAULT_BATCH = 32
LABEL_DTYPE = np.int64  # `y` of every training program
INPUT_NAMES_METHOD = "edgepatch_param_input_names"  # constant method of train_phi programs


class ExecuTorchExportError(RuntimeError):
    """An ExecuTorch program that does not have the structure the device relies on."""


def et_name(name: str) -> str:
    """Parameter name inside a program ('.' is not allowed in torch attribute names)."""
    return name.replace(".", "__")


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
