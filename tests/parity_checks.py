"""Parity checks shared by the export tests: a runtime program against the torch reference.

Imported by test_tflite_export.py, test_executorch_export.py and test_mlperf_models.py (the tests folder
is put on sys.path by them). Each check runs the real runtime (LiteRT interpreter / ExecuTorch) and
compares logits, one φ Adam step and full-weight gradients with torch autograd on the same sliced params.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from edgepatch.export import torch_model
from edgepatch.protocol.model_spec import LayerSpec as L
from edgepatch.protocol.model_spec import ModelSpec, PatchSpec, param_infos
from edgepatch.protocol.optim import AdamConfig, adam_step
from edgepatch.protocol.params import Params, init_params
from edgepatch.protocol.variants import Variant, sample_kept, slice_params


def dag_probe() -> ModelSpec:
    """Every DAG feature in one small graph: explicit pad + valid rectangular strided conv, relu6, strided
    depthwise convs with ragged edges (stride 3), a branch from an earlier layer, a residual add coupling
    two pointwise convs into one slicing group, a stride-2 depthwise, rectangular pooling, gap, flatten."""
    return ModelSpec("dag_probe", (3, 23, 20), 4, (
        L("pad", "p0", pads=(1, 2, 0, 1)),
        L("conv2d", "c0", out=16, kernel=4, kernel_w=3, stride=2, padding="valid"), L("relu6", "a0"),
        L("dwconv2d", "dw", kernel=3, stride=3), L("relu", "a1"),
        L("conv2d", "pw", out=16, kernel=1),
        L("dwconv2d", "dwr", kernel=2, kernel_w=1, stride=3, padding="valid", input="a0"),
        L("conv2d", "pw2", out=16, kernel=1),
        L("add", "sum", input="pw", source="pw2"), L("relu", "a2"),
        L("dwconv2d", "dw4", kernel=3, stride=2),
        L("avgpool", "ap", kernel=2, kernel_w=1),
        L("gap", "g"), L("flatten", "f"), L("dense", "head", out=4),
    ))


def live_params(spec: ModelSpec, patch: PatchSpec | None, seed: int, scale: float = 0.2) -> Params:
    """init_params with θ̄ and biases perturbed (init makes patches no-ops) so every patch path is exercised.

    Deep models need a small `scale` (and φ): untrained low-rank patches compound layer after layer, and
    logits in the hundreds make a 1e-4 tolerance smaller than float32's resolution."""
    rng = np.random.default_rng(seed)
    params = init_params(spec, patch, seed)
    for name, info in param_infos(spec, patch).items():
        if info.role == "bar" or (info.role == "base" and name.endswith(".bias")):
            params[name] = (params[name] + rng.normal(0.0, scale, info.shape)).astype(np.float32)
    return params


def batch(spec: ModelSpec, n: int, rng: np.random.Generator, label_dtype: type = np.int32
          ) -> tuple[np.ndarray, np.ndarray]:
    x = rng.normal(size=(n, *spec.input_shape)).astype(np.float32)
    return x, rng.integers(0, spec.num_classes, n).astype(label_dtype)


def torch_reference(spec: ModelSpec, patch: PatchSpec, variant: Variant, sliced: Params, x: np.ndarray,
                    y: np.ndarray, phi: np.ndarray) -> dict:
    """Logits, loss and φ gradient of the patched variant; loss and base gradients of the unpatched one."""
    small = variant.spec(spec)
    t_phi = torch.tensor(phi, requires_grad=True)
    logits = torch_model.forward(small, patch, torch_model.to_tensors(sliced), torch.tensor(x), t_phi)
    loss = F.cross_entropy(logits, torch.tensor(y, dtype=torch.long))
    loss.backward()
    infos = param_infos(spec, patch)
    base = {n: p for n, p in sliced.items() if infos[n].role == "base"}
    t_base = torch_model.to_tensors(base, requires_grad=True)
    full = F.cross_entropy(torch_model.forward(small, None, t_base, torch.tensor(x)),
                           torch.tensor(y, dtype=torch.long))
    full.backward()
    assert t_phi.grad is not None
    return {"logits": logits.detach().numpy(), "loss": loss.item(), "grad_phi": t_phi.grad.numpy(),
            "base": base, "full_loss": full.item(),
            "base_grads": {n: t.grad.numpy() for n, t in t_base.items() if t.grad is not None}}


def assert_grads_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray], rel: float = 1e-4) -> None:
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    for name, grad in got.items():
        scale = float(np.abs(want[name]).max()) + 1e-12
        assert grad.shape == want[name].shape, name
        np.testing.assert_allclose(grad, want[name], rtol=rel, atol=rel * scale, err_msg=name)


def check_litert_variant(program: object, spec: ModelSpec, patch: PatchSpec, variant: Variant, params: Params,
                         batch_size: int, seed: int, adam: AdamConfig, phi_scale: float = 0.3) -> None:
    """LiteRT trainable program: infer, train_phi (with in-graph Adam) and train_full vs torch."""
    rng = np.random.default_rng(seed)
    sliced = slice_params(params, param_infos(spec, patch), sample_kept(spec, variant, rng))
    x, y = batch(spec, batch_size, rng)
    phi = rng.normal(0.0, phi_scale, patch.k).astype(np.float32)
    m = rng.normal(0.0, 0.01, patch.k).astype(np.float32)
    v = rng.uniform(1e-4, 1e-3, patch.k).astype(np.float32)
    ref = torch_reference(spec, patch, variant, sliced, x, y, phi)
    logits = program.infer_variant(variant.id, x, phi, sliced)  # type: ignore[attr-defined]
    np.testing.assert_allclose(logits, ref["logits"], atol=1e-4, rtol=0)
    out = program.train_phi(variant.id, x, y, phi, m, v, 3.0, 0.02, sliced)  # type: ignore[attr-defined]
    want_phi, want_m, want_v = adam_step(phi, ref["grad_phi"], m, v, 3.0, adam, lr=0.02)
    np.testing.assert_allclose(out["loss"], ref["loss"], rtol=1e-4)
    np.testing.assert_allclose(out["grad"], ref["grad_phi"], rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(out["phi"], want_phi, rtol=1e-4, atol=1e-6)
    # m = β1·m + (1 − β1)·grad carries (1 − β1) of the gradient's error: the same tolerance as grad's, scaled
    np.testing.assert_allclose(out["m"], want_m, rtol=1e-4,
                               atol=1e-7 + (1 - adam.beta1) * (1e-6 + 1e-3 * float(np.abs(ref["grad_phi"]).max())))
    np.testing.assert_allclose(out["v"], want_v, rtol=1e-4, atol=1e-9)
    loss, grads = program.train_full(variant.id, x, y, ref["base"])  # type: ignore[attr-defined]
    np.testing.assert_allclose(loss, ref["full_loss"], rtol=1e-4)
    assert_grads_close(grads, ref["base_grads"])


def check_phi_const_step(program: object, spec: ModelSpec, patch: PatchSpec, params: Params, n: int, seed: int
                         ) -> None:
    """One weights-baked φ step (`train_phi_const`) on a batch of `n` equals the torch reference's Adam step."""
    from edgepatch.protocol.variants import full_variant

    rng = np.random.default_rng(seed)
    x, y = batch(spec, n, rng)
    phi = rng.normal(0.0, 0.3, patch.k).astype(np.float32)
    m = rng.normal(0.0, 0.01, patch.k).astype(np.float32)
    v = rng.uniform(1e-4, 1e-3, patch.k).astype(np.float32)
    ref = torch_reference(spec, patch, full_variant(spec), params, x, y, phi)
    out = program.train_phi_const(x, y, phi, m, v, 3.0, 0.02)  # type: ignore[attr-defined]
    want_phi, want_m, want_v = adam_step(phi, ref["grad_phi"], m, v, 3.0, AdamConfig(), lr=0.02)
    np.testing.assert_allclose(out["loss"], ref["loss"], rtol=1e-4)
    scale = float(np.abs(ref["grad_phi"]).max())
    np.testing.assert_allclose(out["grad"], ref["grad_phi"], rtol=1e-4, atol=1e-4 * scale)
    np.testing.assert_allclose(out["phi"], want_phi, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out["m"], want_m, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(out["v"], want_v, rtol=1e-4, atol=1e-9)
