"""ExecuTorch programs vs the torch reference, run in the real ExecuTorch runtime.

Programs are exported once per module (exports take seconds each) and shared across tests.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgepatch.device.backends.executorch import (
    ExecuTorchFullTrainer,
    ExecuTorchInference,
    ExecuTorchPhiTrainer,
    ExecuTorchRunError,
)
from edgepatch.export import executorch_builder as eb
from edgepatch.export import torch_model as tm
from edgepatch.export.reference_models import REFERENCE_MODELS, default_patch
from edgepatch.protocol.model_spec import ModelSpec, PatchSpec, param_infos
from edgepatch.protocol.optim import AdamConfig, adam_step
from edgepatch.protocol.params import Params, init_params
from edgepatch.protocol.variants import (
    Variant,
    full_variant,
    sample_kept,
    scatter_add,
    slice_params,
    uniform_variant,
)

sys.path.insert(0, str(Path(__file__).parent))
from parity_checks import assert_grads_close, dag_probe, live_params, torch_reference  # noqa: E402

pytestmark = pytest.mark.slow

BATCH = 8
MODELS = sorted(REFERENCE_MODELS)
KINDS = ("film", "lowrank")
RATIOS = (1.0, 0.5)


def _variant(spec: ModelSpec, ratio: float) -> Variant:
    return full_variant(spec) if ratio == 1.0 else uniform_variant(spec, ratio)


def _setup(model: str, kind: str) -> tuple[ModelSpec, PatchSpec, Params]:
    spec = dag_probe() if model == "dag_probe" else REFERENCE_MODELS[model]()
    patch = default_patch(spec, kind, k=8)
    params = init_params(spec, patch, seed=1)
    rng = np.random.default_rng(2)
    for name, info in param_infos(spec, patch).items():  # non-zero θ̄ so every patch path matters
        if info.role == "bar":
            params[name] = (params[name] + 0.1 * rng.normal(size=info.shape)).astype(np.float32)
    return spec, patch, params


def _batch(spec: ModelSpec, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(BATCH, *spec.input_shape)).astype(np.float32)
    return x, rng.integers(0, spec.num_classes, size=BATCH).astype(np.int64)


class _Cache:
    """Builds each program once per test module."""

    def __init__(self) -> None:
        self._items: dict[tuple[object, ...], object] = {}

    def get(self, key: tuple[object, ...], build: Callable[[], object]) -> object:
        if key not in self._items:
            self._items[key] = build()
        return self._items[key]


@pytest.fixture(scope="module")
def cache() -> _Cache:
    return _Cache()


def _phi_trainer(cache: _Cache, model: str, kind: str, ratio: float) -> ExecuTorchPhiTrainer:
    spec, patch, _ = _setup(model, kind)
    trainer = cache.get(("phi", model, kind, ratio), lambda: ExecuTorchPhiTrainer(
        eb.build_train_phi_pte(spec, patch, _variant(spec, ratio), BATCH)))
    assert isinstance(trainer, ExecuTorchPhiTrainer)
    return trainer


# -- inference ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("model", MODELS)
def test_inference_program_matches_eager(cache: _Cache, model: str, kind: str) -> None:
    spec, patch, params = _setup(model, kind)
    runner = cache.get(("infer", model, kind), lambda: ExecuTorchInference(
        eb.build_inference_pte(spec, patch, params, BATCH)))
    assert isinstance(runner, ExecuTorchInference)
    x, _ = _batch(spec)
    phi = np.random.default_rng(4).normal(0, 0.5, patch.k).astype(np.float32)
    got = runner.infer(x, phi)
    want = tm.forward(spec, patch, tm.to_tensors(params), torch.tensor(x), torch.tensor(phi)).numpy()
    assert got.shape == (BATCH, spec.num_classes)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    # φ is a real input, not a baked constant
    assert np.abs(runner.infer(x, np.zeros_like(phi)) - got).max() > 1e-3


# -- φ training -----------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("model", MODELS)
def test_phi_step_matches_torch_autograd(cache: _Cache, model: str, kind: str, ratio: float) -> None:
    spec, patch, params = _setup(model, kind)
    variant = _variant(spec, ratio)
    trainer = _phi_trainer(cache, model, kind, ratio)
    assert trainer.trainable == ["phi"]
    kept = sample_kept(spec, variant, np.random.default_rng(5))
    sliced = slice_params(params, param_infos(spec, patch), kept)
    small = variant.spec(spec)
    x, y = _batch(spec)
    phi = np.random.default_rng(6).normal(0, 0.3, patch.k).astype(np.float32)
    m, v = np.zeros_like(phi), np.zeros_like(phi)
    cfg = AdamConfig(lr=0.05)

    loss, new_phi, new_m, new_v = trainer.step(x, y, phi, m, v, 0.0, sliced)

    phi_t = torch.tensor(phi, requires_grad=True)
    logits = tm.forward(small, patch, tm.to_tensors(sliced), torch.tensor(x), phi_t)
    ref_loss = F.cross_entropy(logits, torch.tensor(y))
    ref_loss.backward()
    assert phi_t.grad is not None
    ref_phi, ref_m, ref_v = adam_step(phi, phi_t.grad.numpy(), m, v, 0.0, cfg)
    np.testing.assert_allclose(loss, ref_loss.item(), rtol=1e-4)
    np.testing.assert_allclose(trainer.last_logits, logits.detach().numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(new_m, ref_m, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(new_v, ref_v, rtol=1e-3, atol=1e-10)
    np.testing.assert_allclose(new_phi, ref_phi, rtol=1e-4, atol=1e-6)
    assert not np.allclose(new_phi, phi)


def test_phi_training_fits_a_learnable_task(cache: _Cache) -> None:
    """50 Adam steps on φ (full variant): labels come from the patched model with a hidden φ*, so φ
    alone can fit them; the loss must stay finite and fall. (A 50 % sub-network cannot fit labels of the
    full teacher this quickly, so the variants' parity is covered by the one-step tests.)"""
    spec, patch, params = _setup("digits_cnn", "film")
    variant = _variant(spec, 1.0)
    trainer = _phi_trainer(cache, "digits_cnn", "film", 1.0)
    rng = np.random.default_rng(7)
    pool = rng.normal(size=(256, *spec.input_shape)).astype(np.float32)
    phi_star = rng.normal(0, 1.5, patch.k).astype(np.float32)
    with torch.no_grad():
        teacher = tm.forward(spec, patch, tm.to_tensors(params), torch.tensor(pool), torch.tensor(phi_star))
    labels = teacher.argmax(1).numpy().astype(np.int64)
    infos = param_infos(spec, patch)
    phi, m, v = np.zeros(patch.k, np.float32), np.zeros(patch.k, np.float32), np.zeros(patch.k, np.float32)
    losses = []
    for step in range(50):
        idx = rng.choice(len(pool), size=BATCH, replace=False)
        sliced = slice_params(params, infos, sample_kept(spec, variant, rng))
        loss, phi, m, v = trainer.step(pool[idx], labels[idx], phi, m, v, float(step), sliced)
        losses.append(loss)
    assert np.isfinite(losses).all() and np.isfinite(phi).all()
    assert np.mean(losses[-10:]) < 0.75 * np.mean(losses[:10]), losses


# -- full-weight training -------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("model", MODELS)
def test_train_full_grads_match_torch_autograd(cache: _Cache, model: str, ratio: float) -> None:
    spec, _, params = _setup(model, "film")
    variant = _variant(spec, ratio)
    small = variant.spec(spec)
    trainer = cache.get(("full", model, ratio), lambda: ExecuTorchFullTrainer(
        eb.build_train_full_pte(spec, variant, BATCH)))
    assert isinstance(trainer, ExecuTorchFullTrainer)
    infos = param_infos(spec, None)
    assert sorted(trainer.param_names) == sorted(param_infos(small, None))
    x, y = _batch(spec)
    rng = np.random.default_rng(8)
    for _ in range(2):  # two kept sets: the second run must use the freshly copied weights
        kept = sample_kept(spec, variant, rng)
        sliced = slice_params(params, infos, kept)
        loss, grads = trainer.grads(x, y, sliced)
        tensors = tm.to_tensors(sliced, requires_grad=True)
        ref = F.cross_entropy(tm.forward(small, None, tensors, torch.tensor(x)), torch.tensor(y))
        ref.backward()
        np.testing.assert_allclose(loss, ref.item(), rtol=1e-4)
        for name, grad in grads.items():
            ref_grad = tensors[name].grad
            assert ref_grad is not None
            np.testing.assert_allclose(grad, ref_grad.numpy(), atol=1e-5, rtol=1e-4, err_msg=name)
    # gradients scatter back into the full-size parameters (the device's update path)
    full = np.zeros(infos["conv1.weight"].shape, np.float32)
    scatter_add(full, grads["conv1.weight"], infos["conv1.weight"], kept)
    assert np.count_nonzero(np.abs(full).sum(axis=tuple(range(1, full.ndim)))) <= len(kept["conv1"])


# -- the guards -----------------------------------------------------------------------------------


def test_export_refuses_an_unintended_trainable_set() -> None:
    spec = REFERENCE_MODELS["digits_cnn"]()
    small = uniform_variant(spec, 0.5).spec(spec)
    module = eb._FullTraining(small)
    example = (torch.zeros(2, *small.input_shape), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(eb.ExecuTorchExportError, match="trainable parameter set"):
        eb._export_training(module, example, {"phi"})


def test_trainable_forward_matches_reference() -> None:
    for model in MODELS:
        spec, patch, params = _setup(model, "lowrank")
        x, _ = _batch(spec)
        phi = torch.randn(patch.k, generator=torch.Generator().manual_seed(0))
        ref = tm.forward(spec, patch, tm.to_tensors(params), torch.tensor(x), phi)
        got = eb.trainable_forward(spec, patch, tm.to_tensors(params), torch.tensor(x), phi)
        # Same maths in another summation order (slices + matmul vs conv): float32 round-off only.
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_runner_rejects_bad_input(cache: _Cache) -> None:
    spec, patch, params = _setup("digits_cnn", "film")
    trainer = _phi_trainer(cache, "digits_cnn", "film", 1.0)
    sliced = slice_params(params, param_infos(spec, patch), sample_kept(spec, full_variant(spec),
                                                                        np.random.default_rng(0)))
    x, y = _batch(spec)
    phi = np.zeros(patch.k, np.float32)
    with pytest.raises(ExecuTorchRunError, match="'x' has shape"):
        trainer.grad(x[:2], y[:2], phi, sliced)
    with pytest.raises(ExecuTorchRunError, match="integers"):
        trainer.grad(x, y.astype(np.float32), phi, sliced)
    assert trainer.param_names == list(sliced)  # input names travel inside the program
    # a mapping is ordered by the program's names, not by the dict's order
    reordered = dict(reversed(list(sliced.items())))
    np.testing.assert_array_equal(trainer.grad(x, y, phi, reordered)[1], trainer.grad(x, y, phi, sliced)[1])
    incomplete = {k: v for k, v in sliced.items() if k != "conv1.bias"}
    with pytest.raises(ExecuTorchRunError, match="miss.*conv1.bias"):
        trainer.grad(x, y, phi, incomplete)
    with pytest.raises(ExecuTorchRunError, match=f"takes {len(sliced)} sliced params, got {len(sliced) - 1}"):
        trainer.grad(x, y, phi, list(incomplete.values()))
    swapped = dict(sliced)
    swapped["conv1.bias"] = np.zeros(3, np.float32)
    with pytest.raises(ExecuTorchRunError, match="conv1.bias' has shape"):
        trainer.grad(x, y, phi, swapped)
    with pytest.raises(ExecuTorchRunError, match="differ from the program"):
        ExecuTorchPhiTrainer(trainer.program._data, param_names=list(reordered))
    with pytest.raises(ExecuTorchRunError, match="ET12"):
        ExecuTorchInference(b"not a program at all")
    with pytest.raises(ExecuTorchRunError, match="exactly"):
        spec_ = REFERENCE_MODELS["digits_cnn"]()
        ExecuTorchPhiTrainer(eb.build_train_full_pte(spec_, uniform_variant(spec_, 0.25), BATCH))


def test_benchmark_tasks_cover_every_variant_and_run() -> None:
    spec, patch, params = _setup("digits_cnn", "film")
    variants = [full_variant(spec), uniform_variant(spec, 0.5)]
    tasks = eb.benchmark_tasks(spec, patch, variants, params, BATCH, np.random.default_rng(0))
    assert set(tasks) == {(v.id, kind) for v in variants for kind in ("train_full", "train_phi", "infer")}
    loss, grads = tasks[(variants[1].id, "train_full")]()
    assert np.isfinite(loss) and all(np.all(np.isfinite(g)) for g in grads.values())
    logits = tasks[(variants[0].id, "infer")]()
    assert np.asarray(logits).shape == (BATCH, spec.num_classes)


def test_export_forms_match_reference_on_variants() -> None:
    """The XNNPACK-friendly inference form and the channel-major training form, on full and 50 % specs
    with both patch kinds (float32 round-off only: same maths, another summation order)."""
    for model in [*MODELS, "dag_probe"]:
        for kind in KINDS:
            spec, patch, params = _setup(model, kind)
            for ratio in RATIOS:
                variant = _variant(spec, ratio)
                small = variant.spec(spec)
                sliced = tm.to_tensors(slice_params(params, param_infos(spec, patch),
                                                    sample_kept(spec, variant, np.random.default_rng(9))))
                x = torch.tensor(_batch(spec)[0])
                phi = torch.randn(patch.k, generator=torch.Generator().manual_seed(1))
                ref = tm.forward(small, patch, sliced, x, phi)
                for form in (eb.inference_forward, eb.trainable_forward):
                    got = form(small, patch, sliced, x, phi)
                    worst = float((got - ref).abs().max())
                    tol = max(1e-4, 1e-6 * float(ref.abs().max()))  # dag_probe's logits reach ~700
                    assert got.shape == ref.shape and worst <= tol, f"{form.__name__} {model} {kind} {ratio}: {worst}"


@pytest.mark.parametrize("size", [(7, 9), (8, 8), (13,)])
def test_avgpool_slices_matches_torch_pooling_with_floor_crop(size: tuple[int, ...]) -> None:
    from edgepatch.protocol.model_spec import LayerSpec

    h = torch.randn(3, 5, *size, generator=torch.Generator().manual_seed(0))
    layer = LayerSpec("avgpool", "pool", kernel=2)
    want = F.avg_pool2d(h, 2, 2) if len(size) == 2 else F.avg_pool1d(h, 2, 2)
    got = eb._avgpool_slices(layer, h)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize(("kind", "ratio"), [("film", 1.0), ("lowrank", 0.5)])
def test_dag_ops_match_torch_in_the_runtime(kind: str, ratio: float) -> None:
    """pad, valid rectangular strided conv, relu6, stride-3/stride-2 depthwise with ragged edges, a branch,
    a residual add (one slicing group), rectangular pooling and gap in the ExecuTorch runtime: frozen
    inference, one φ gradient and every full-weight gradient vs torch autograd."""
    spec = dag_probe()
    patch = PatchSpec(kind, ("c0", "dw", "pw2", "dw4"), k=4, rank=2)
    params = live_params(spec, patch, 1)
    variant = _variant(spec, ratio)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, *spec.input_shape)).astype(np.float32)
    y = rng.integers(0, spec.num_classes, 4).astype(np.int64)
    phi = rng.normal(0.0, 0.5, patch.k).astype(np.float32)
    inference = ExecuTorchInference(eb.build_inference_pte(spec, patch, params, 4))
    want = tm.forward(spec, patch, tm.to_tensors(params), torch.tensor(x), torch.tensor(phi)).numpy()
    np.testing.assert_allclose(inference.infer(x, phi), want, atol=1e-4, rtol=0)

    sliced = slice_params(params, param_infos(spec, patch), sample_kept(spec, variant, rng))
    ref = torch_reference(spec, patch, variant, sliced, x, y, phi)
    trainer = ExecuTorchPhiTrainer(eb.build_train_phi_pte(spec, patch, variant, 4))
    loss, grad = trainer.grad(x, y, phi, sliced)
    np.testing.assert_allclose(loss, ref["loss"], rtol=1e-4)
    np.testing.assert_allclose(trainer.last_logits, ref["logits"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(grad, ref["grad_phi"], rtol=1e-3, atol=1e-6)
    full = ExecuTorchFullTrainer(eb.build_train_full_pte(spec, variant, 4))
    loss, grads = full.grads(x, y, ref["base"])
    np.testing.assert_allclose(loss, ref["full_loss"], rtol=1e-4)
    assert_grads_close(grads, ref["base_grads"])
