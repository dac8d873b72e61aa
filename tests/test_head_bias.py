"""The head-bias patch (issue 10 item 3): φ's last `num_classes` coefficients shift the logits, so a device's
φ can express its label prior. Checked in every builder against the torch reference, learned in real
LiteRT on a label-skewed device, carried through MoMoDistill and republication; specs and bundles
without it load and serialize as before.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgepatch.device.backends.executorch import ExecuTorchInference, ExecuTorchPhiTrainer
from edgepatch.device.backends.litert import LiteRTProgram
from edgepatch.export import executorch_builder as eb
from edgepatch.export import tflite_builder
from edgepatch.export import torch_model as tm
from edgepatch.export.frozen import build_frozen
from edgepatch.export.reference_models import REFERENCE_MODELS, default_patch
from edgepatch.protocol.manifest import ManifestError, _parse_patch
from edgepatch.protocol.model_spec import PatchSpec, SpecError, dumps, param_infos
from edgepatch.protocol.optim import AdamConfig, adam_step
from edgepatch.protocol.params import init_params, params_to_bytes
from edgepatch.protocol.variants import full_variant, sample_kept, slice_params, uniform_variant

sys.path.insert(0, str(Path(__file__).parent))
from parity_checks import check_litert_variant, dag_probe, live_params  # noqa: E402

BATCH = 8
ADAM = AdamConfig(lr=0.05)


def _spec_patch(model: str = "digits_cnn", kind: str = "film", k: int = 6):
    spec = dag_probe() if model == "dag_probe" else REFERENCE_MODELS[model]()
    return spec, default_patch(spec, kind, k=k).with_head_bias(spec)


def _phi(patch: PatchSpec, seed: int, scale: float = 0.3) -> np.ndarray:
    """A φ whose head-bias coefficients are clearly non-zero (logit shifts of about ±1)."""
    rng = np.random.default_rng(seed)
    phi = rng.normal(0.0, scale, patch.k).astype(np.float32)
    phi[-3:] = (1.0, -1.0, 0.7)
    return phi


# -- description ----------------------------------------------------------------------------------


def test_spec_adds_classes_to_phi_and_serializes_only_when_on() -> None:
    spec = REFERENCE_MODELS["digits_cnn"]()
    plain = default_patch(spec, "film", k=16)
    assert dumps(plain) == '{"k": 16, "kind": "film", "layers": ["conv1", "conv2"], "rank": 4}'
    patched = plain.with_head_bias(spec)
    assert (patched.k, patched.head_bias) == (16 + spec.num_classes, True)
    assert patched.with_head_bias(spec) == patched
    assert PatchSpec.from_dict(json.loads(dumps(patched))) == patched
    assert PatchSpec.from_dict(json.loads(dumps(plain))) == plain
    assert _parse_patch(patched.to_dict()) == patched and _parse_patch(plain.to_dict()) == plain
    infos = param_infos(spec, patched)
    assert infos["head.patch.bias"].shape == (spec.num_classes,)
    assert infos["head.patch.bias_basis"].shape == (spec.num_classes, patched.k)
    assert list(infos)[:-2] == list(param_infos(spec, plain))
    assert infos["conv1.patch.scale_basis"].shape == (16, patched.k)
    with pytest.raises(SpecError, match="head_bias must be true or false"):
        PatchSpec("film", ("conv1",), 20, 4, "yes")  # type: ignore[arg-type]
    with pytest.raises(ManifestError, match="head_bias"):
        _parse_patch({**patched.to_dict(), "head_bias": 1})
    with pytest.raises(SpecError, match="leaves none for the layer patches"):
        PatchSpec("film", ("conv1",), spec.num_classes, 4, True).validate_against(spec)


def test_old_specs_keep_their_parameters_byte_for_byte() -> None:
    """sha256 of init_params for patches without a head bias, recorded with the code before it existed."""
    spec = REFERENCE_MODELS["digits_cnn"]()
    for kind, want in OLD_PARAM_SHA.items():
        got = hashlib.sha256(params_to_bytes(init_params(spec, default_patch(spec, kind), 1))).hexdigest()
        assert got == want, kind


OLD_PARAM_SHA = {"film": "3ff924a2d162212318fa163901fd129fc5c771ddaea72748649ed0c0433a3f31",
                 "lowrank": "b44d727116ac13b10f573fba5770419304d7dead3849f60d1d23c9b98e3bdc9b"}


def test_init_head_bias_is_a_plain_logit_offset() -> None:
    """φ = 0 changes nothing; the last coefficients shift the logits by exactly themselves and nothing else."""
    spec, patch = _spec_patch("sensor_cnn", "lowrank")
    params = tm.to_tensors(init_params(spec, patch, 3))
    x = torch.tensor(np.random.default_rng(0).normal(size=(5, *spec.input_shape)).astype(np.float32))
    base = tm.forward(spec, None, params, x)
    torch.testing.assert_close(tm.forward(spec, patch, params, x, torch.zeros(patch.k)), base)
    offset = torch.zeros(patch.k)
    offset[-spec.num_classes:] = torch.arange(spec.num_classes, dtype=torch.float32) - 2.0
    torch.testing.assert_close(tm.forward(spec, patch, params, x, offset),
                               base + offset[-spec.num_classes:], atol=1e-5, rtol=0)


# -- parity: every builder against the torch reference ----------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("model", "kind"), [("digits_cnn", "film"), ("dag_probe", "lowrank")])
def test_litert_programs_match_torch(model: str, kind: str) -> None:
    spec, patch = _spec_patch(model, kind)
    params = live_params(spec, patch, 1, scale=0.1)
    variants = [full_variant(spec), uniform_variant(spec, 0.5)]
    program = LiteRTProgram(tflite_builder.build_trainable_tflite(spec, patch, variants, batch=BATCH, adam=ADAM))
    for i, variant in enumerate(variants):
        check_litert_variant(program, spec, patch, variant, params, BATCH, seed=10 + i, adam=ADAM)
    frozen, _ = build_frozen(tflite_builder.build_inference_tflite, spec, patch, params, BATCH)
    x = np.random.default_rng(2).normal(size=(BATCH, *spec.input_shape)).astype(np.float32)
    phi = _phi(patch, 3)
    want = tm.forward(spec, patch, tm.to_tensors(params), torch.tensor(x), torch.tensor(phi)).numpy()
    got = LiteRTProgram(frozen).infer(x, phi)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    bias_only = np.zeros_like(phi)
    bias_only[-spec.num_classes:] = phi[-spec.num_classes:]
    assert np.abs(LiteRTProgram(frozen).infer(x, bias_only) - LiteRTProgram(frozen).infer(x, 0 * phi)).max() > 0.5


@pytest.mark.slow
@pytest.mark.parametrize(("model", "kind", "ratio"), [("digits_cnn", "film", 1.0), ("dag_probe", "lowrank", 0.5)])
def test_executorch_programs_match_torch(model: str, kind: str, ratio: float) -> None:
    spec, patch = _spec_patch(model, kind)
    params = live_params(spec, patch, 1, scale=0.1)
    x = np.random.default_rng(2).normal(size=(BATCH, *spec.input_shape)).astype(np.float32)
    y = np.random.default_rng(3).integers(0, spec.num_classes, BATCH).astype(np.int64)
    phi = _phi(patch, 4)
    frozen, _ = build_frozen(eb.build_inference_pte, spec, patch, params, BATCH)
    want = tm.forward(spec, patch, tm.to_tensors(params), torch.tensor(x), torch.tensor(phi)).numpy()
    np.testing.assert_allclose(ExecuTorchInference(frozen).infer(x, phi), want, atol=1e-4, rtol=0)

    variant = full_variant(spec) if ratio == 1.0 else uniform_variant(spec, ratio)
    sliced = slice_params(params, param_infos(spec, patch), sample_kept(spec, variant, np.random.default_rng(5)))
    trainer = ExecuTorchPhiTrainer(eb.build_train_phi_pte(spec, patch, variant, BATCH))
    m, v = np.zeros_like(phi), np.zeros_like(phi)
    loss, new_phi, _, _ = trainer.step(x, y, phi, m, v, 0.0, sliced)
    phi_t = torch.tensor(phi, requires_grad=True)
    logits = tm.forward(variant.spec(spec), patch, tm.to_tensors(sliced), torch.tensor(x), phi_t)
    ref = torch.nn.functional.cross_entropy(logits, torch.tensor(y))
    ref.backward()
    assert phi_t.grad is not None and float(phi_t.grad[-spec.num_classes:].abs().max()) > 1e-3
    np.testing.assert_allclose(trainer.last_logits, logits.detach().numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(loss, ref.item(), rtol=1e-4)
    np.testing.assert_allclose(new_phi, adam_step(phi, phi_t.grad.numpy(), m, v, 0.0, AdamConfig(lr=0.05))[0],
                               rtol=1e-4, atol=1e-6)
