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


# -- a label-skewed device learns its prior on the real LiteRT path ----------------------------------

NOISE = 1.5  # input noise (× the data's std) of the whole task: the base is unsure, so the prior matters


def _noisy(x: np.ndarray, rng: np.random.Generator, std: float) -> np.ndarray:
    return (x + rng.normal(0.0, NOISE * std, x.shape)).astype(np.float32)


def _skewed_device(majority: int, seed: int, n_major: int = 120, n_other: int = 40):
    """A device under pure label shift: the base's input distribution (noisy digits from the half the
    base never saw), 75 % of its labels one class; time order = draw order."""
    from edgepatch.data.datasets import load_digits
    from edgepatch.data.fleet import base_split

    digits = load_digits()
    _, part = base_split(digits, fraction=0.5, seed=0)
    rng = np.random.default_rng(seed)
    idx = np.concatenate([rng.choice(np.flatnonzero(part.y == majority), n_major),
                          rng.choice(np.flatnonzero(part.y != majority), n_other)])
    rng.shuffle(idx)
    return _noisy(part.x[idx], rng, float(digits.x.std())), part.y[idx].astype(np.int64)


@pytest.fixture(scope="module")
def shift_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits_cnn with a head bias, pretrained on noisy digits (the cloud half), LiteRT and ExecuTorch."""
    from edgepatch.data.datasets import load_digits
    from edgepatch.data.fleet import base_split
    from edgepatch.export.pipeline import ExportOptions, export_bundle

    root = tmp_path_factory.mktemp("head-bias")
    digits = load_digits()
    cloud, _ = base_split(digits, fraction=0.5, seed=0)
    np.savez(root / "noisy.npz", x=_noisy(cloud.x, np.random.default_rng(0), float(digits.x.std())), y=cloud.y)
    export_bundle(ExportOptions(data=root / "noisy.npz", head_bias=True, variants="1,0.5",
                                runtimes=("litert", "executorch"), dse_steps=5, dse_seeds=(0,)), root / "bundle")
    return root / "bundle"


def _effective_head_bias(params: dict[str, np.ndarray], phi: np.ndarray) -> np.ndarray:
    return params["head.patch.bias"] + params["head.patch.bias_basis"] @ phi


_TRAINED: dict[tuple[str, int], tuple[np.ndarray, float, float, float]] = {}


def _train_device(bundle_dir: Path, majority: int, tmp: Path, seed: int = 0):
    """φ after 60 steps of the device's own trainer on LiteRT, and holdout accuracies (base, personalized,
    always-the-majority). Cached: the MoMoDistill test reuses the same devices."""
    from edgepatch.device.engine import open_engine
    from edgepatch.device.state import DeviceStateStore
    from edgepatch.device.trainer import LocalData, PatchTrainer
    from edgepatch.protocol.bundle import load_bundle

    key = (str(bundle_dir), majority)
    if key not in _TRAINED:
        bundle = load_bundle(bundle_dir)
        x, y = _skewed_device(majority, seed + majority)
        data = LocalData.split(x, y, np.arange(len(x)))
        trainer = PatchTrainer(bundle, open_engine(bundle, "litert"), DeviceStateStore(tmp / f"dev{majority}"),
                               data, seed=seed, variant_id=bundle.manifest.variants[0].id)
        base = trainer.holdout_accuracy(np.zeros(bundle.manifest.patch.k, np.float32))
        trainer.train_round(60)
        _TRAINED[key] = (trainer.phi.copy(), base, trainer.holdout_accuracy(),
                         float((data.holdout_y == majority).mean()))
    return _TRAINED[key]


@pytest.mark.slow
def test_label_skewed_devices_learn_their_prior_in_litert(shift_bundle: Path, tmp_path: Path) -> None:
    """Ten devices, one per majority class, each trained by its own PatchTrainer on the LiteRT engine.

    Under pure label shift the optimal head bias is the log ratio of the device's label prior to the
    base's (Saerens et al. 2002), so the majority's coefficient should end on top; 60 Adam steps shared
    with the FiLM coefficients make that noisy (margins 0.02–1.09 on this machine, all ten on top), hence
    "at least 9 of 10". Personalization must beat both the base and always-the-majority on average."""
    from edgepatch.protocol.bundle import load_bundle

    bundle = load_bundle(shift_bundle)
    assert bundle.manifest.patch.head_bias and bundle.manifest.patch.k == 16 + 10
    params = bundle.all_params()
    on_top, base, personal, majority = 0, [], [], []
    for cls in range(10):
        phi, base_acc, personal_acc, majority_acc = _train_device(shift_bundle, cls, tmp_path)
        bias = _effective_head_bias(params, phi)
        on_top += int(bias[cls] > np.delete(bias, cls).max())
        base.append(base_acc)
        personal.append(personal_acc)
        majority.append(majority_acc)
    assert on_top >= 9, on_top
    assert np.mean(personal) > max(np.mean(base), np.mean(majority)), (personal, base, majority)


@pytest.mark.slow
def test_momodistill_and_republication_carry_the_head_bias(shift_bundle: Path, tmp_path: Path) -> None:
    """A proxy-mode round distils θ̄_hb and Θ_hb with the rest; each device's old φ still leans its model
    toward its own majority on the new base; the republished frozen programs (weights rewritten in place,
    no converter) compute the torch reference with the new head bias on both runtimes."""
    from edgepatch.cloud.momodistill import (
        CloudData,
        DeviceContribution,
        DistillConfig,
        momodistill,
        personalized_logits,
    )
    from edgepatch.cloud.republish import republish_bundle
    from edgepatch.data.datasets import load_digits
    from edgepatch.data.fleet import base_split
    from edgepatch.device.engine import open_engine, predict_logits
    from edgepatch.protocol.bundle import load_bundle

    bundle = load_bundle(shift_bundle)
    spec, patch, params = bundle.manifest.model, bundle.manifest.patch, bundle.all_params()
    phis = {cls: _train_device(shift_bundle, cls, tmp_path)[0] for cls in (3, 8)}
    digits = load_digits()
    cloud, _ = base_split(digits, fraction=0.5, seed=0)
    proxy = _noisy(cloud.x, np.random.default_rng(5), float(digits.x.std()))
    result = momodistill(spec, patch, params, [DeviceContribution(f"dev-{c}", phi) for c, phi in phis.items()],
                         CloudData(proxy_x=proxy), DistillConfig(phi_source="device", step1_epochs=2, step2_epochs=3))
    new = result.params
    for name in ("head.patch.bias", "head.patch.bias_basis"):
        assert new[name].shape == params[name].shape
        assert np.abs(new[name] - params[name]).max() > 1e-4, name  # step 2 trains the head bias too

    def share(p: dict[str, np.ndarray], phi: np.ndarray, cls: int) -> float:
        return float((personalized_logits(spec, patch, p, phi, proxy).argmax(axis=1) == cls).mean())

    for p in (params, new):  # φ keeps its meaning: device c's model predicts c more often than the other's
        assert share(p, phis[3], 3) > share(p, phis[8], 3) and share(p, phis[8], 8) > share(p, phis[3], 8)

    republish_bundle(shift_bundle, new, tmp_path / "republished")
    again = load_bundle(tmp_path / "republished")
    assert again.manifest.patch == patch
    published = again.all_params()
    np.testing.assert_allclose(published["head.patch.bias_basis"], new["head.patch.bias_basis"], atol=1e-3)
    phi = phis[8]
    want = personalized_logits(spec, patch, published, phi, proxy[:40])
    for runtime in ("litert", "executorch"):
        got = predict_logits(open_engine(again, runtime), proxy[:40], phi)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0, err_msg=runtime)


@pytest.mark.slow
def test_bundles_without_a_head_bias_load_as_before(tmp_path: Path) -> None:
    """`--no-head-bias` exports the old layout: the manifest's patch has exactly the old fields, no head
    parameters exist, φ keeps its old size, and devices run it (its artifacts are byte-identical to those
    of the code before the head bias existed: checked by exporting with both, see docs/DESIGN.md 20)."""
    from edgepatch.device.engine import open_engine, predict_logits
    from edgepatch.export.pipeline import ExportOptions, export_bundle
    from edgepatch.protocol.bundle import load_bundle

    export_bundle(ExportOptions(head_bias=False, variants="1", runtimes=("litert",), pretrain_epochs=2, dse_steps=2,
                                dse_seeds=(0,)), tmp_path / "old")
    bundle = load_bundle(tmp_path / "old")
    manifest = json.loads((tmp_path / "old" / "manifest.json").read_text())
    assert set(manifest["patch"]) == {"kind", "layers", "k", "rank"}
    assert not bundle.manifest.patch.head_bias and bundle.manifest.patch.k == 16
    assert not any(name.startswith("head.patch") for name in bundle.all_params())
    x = np.zeros((3, *bundle.manifest.model.input_shape), np.float32)
    assert predict_logits(open_engine(bundle, "litert"), x, np.zeros(16, np.float32)).shape == (3, 10)


def test_export_command_has_the_switch() -> None:
    import os
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "edgepatch.cli", "export", "--help"], capture_output=True, text=True,
                          timeout=120, check=False, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    assert "--head-bias" in proc.stdout and "--no-head-bias" in proc.stdout
