"""The Engine seam on both runtimes, with the real programs of one exported bundle (LiteRT + ExecuTorch).

Per primitive (φ step, full-weight step of the 50 % variant, variant inference, Taylor importance) the two
runtimes must agree with each other and do their job (lower a loss, match the frozen program, score a
dead filter 0). Then Canoe (helper slice + target boosting) runs end to end on ExecuTorch, and the LiteRT
Canoe and federated paths run in a process where torch and TensorFlow cannot be imported. Federated
rounds and the selector on ExecuTorch: test_engine_fl_selector.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgepatch.device.canoe_boost import SliceModel, bundle_variants
from edgepatch.device.canoe_helper import CanoeHelper
from edgepatch.device.canoe_target import CanoeTarget, DriftDetector
from edgepatch.device.engine import (
    Engine,
    open_engine,
    predict_logits,
    predict_variant,
    sgd_step,
    taylor_importance,
)
from edgepatch.protocol.bundle import Bundle, load_bundle
from edgepatch.protocol.canoe import CanoeTask, decode_slice
from edgepatch.protocol.manifest import BundleError
from edgepatch.protocol.model_spec import param_infos
from edgepatch.protocol.variants import first_kept, sample_kept, slice_params

pytestmark = pytest.mark.slow

RUNTIMES = ("litert", "executorch")
FULL, HALF = "k100-100", "k50-50"
NEW = [7, 8, 9]


@pytest.fixture(scope="module")
def bundle_dir(digits_bundle_both: Path) -> Path:
    return digits_bundle_both


@pytest.fixture(scope="module")
def bundle(bundle_dir: Path) -> Bundle:
    return load_bundle(bundle_dir)


@pytest.fixture(scope="module")
def engines(bundle: Bundle) -> dict[str, Engine]:
    return {runtime: open_engine(bundle, runtime) for runtime in RUNTIMES}


def _batch(bundle: Bundle, seed: int, n: int = 32) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    spec = bundle.model_spec
    return rng.normal(size=(n, *spec.input_shape)).astype(np.float32), rng.integers(0, spec.num_classes, n)


def _sliced(bundle: Bundle, vid: str, seed: int, patch: bool = True) -> dict[str, np.ndarray]:
    spec = bundle.model_spec
    kept = sample_kept(spec, bundle.variant(vid), np.random.default_rng(seed))
    return slice_params(bundle.all_params(), param_infos(spec, bundle.patch_spec if patch else None), kept)


# ------------------------------------------------------------------------------------ the primitives

def test_variant_table_times_both_runtimes(bundle: Bundle) -> None:
    for row in bundle.manifest.variants:
        assert set(row.train_ms) == set(RUNTIMES) and all(ms > 0 for ms in row.train_ms.values()), row.train_ms


def test_phi_step_agrees_across_runtimes_and_lowers_the_loss(bundle: Bundle, engines: dict[str, Engine]) -> None:
    k = bundle.patch_spec.k
    x, y = _batch(bundle, 0)
    sliced = _sliced(bundle, HALF, 1)
    phi0 = np.random.default_rng(2).normal(scale=0.1, size=k).astype(np.float32)
    zeros = np.zeros(k, np.float32)
    outs = {r: e.phi_step(HALF, x, y, phi0, zeros, zeros, 0.0, 0.05, sliced) for r, e in engines.items()}
    lite, et = outs["litert"], outs["executorch"]
    assert lite[0] == pytest.approx(et[0], abs=1e-4)
    for a, b in zip(lite[1:], et[1:], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert np.abs(lite[1] - phi0).max() > 1e-3  # φ moved
    for runtime, engine in engines.items():
        phi, m, v = phi0, zeros, zeros
        losses = []
        for step in range(30):
            loss, phi, m, v = engine.phi_step(HALF, x, y, phi, m, v, float(step), 0.05, sliced)
            losses.append(loss)
        assert losses[-1] < 0.8 * losses[0], (runtime, losses[0], losses[-1])


def test_full_step_of_the_half_variant(bundle: Bundle, engines: dict[str, Engine]) -> None:
    x, y = _batch(bundle, 3)
    base = _sliced(bundle, HALF, 4, patch=False)
    lite_loss, lite_grads = engines["litert"].full_grads(HALF, x, y, base)
    et_loss, et_grads = engines["executorch"].full_grads(HALF, x, y, base)
    assert lite_loss == pytest.approx(et_loss, rel=1e-4)
    assert set(lite_grads) == set(et_grads) == set(base)
    for name, grad in lite_grads.items():
        assert grad.shape == base[name].shape
        np.testing.assert_allclose(grad, et_grads[name], atol=1e-4 * max(1.0, float(np.abs(grad).max())))
    for runtime, engine in engines.items():
        weights = {n: w.copy() for n, w in base.items()}
        losses = [sgd_step(engine, HALF, x, y, weights, 0.05) for _ in range(20)]
        assert losses[-1] < 0.7 * losses[0], (runtime, losses[0], losses[-1])
        # A diverged step raises and leaves the weights as they were.
        broken = {**weights, "conv1.weight": np.full_like(weights["conv1.weight"], np.nan)}
        before = {n: w.copy() for n, w in broken.items()}
        with pytest.raises(FloatingPointError, match="loss nan"):
            sgd_step(engine, HALF, x, y, broken, 0.05)
        for name in before:
            np.testing.assert_array_equal(broken[name], before[name])


def test_variant_inference_any_batch_matches_the_frozen_program(bundle: Bundle, engines: dict[str, Engine]) -> None:
    spec, patch = bundle.model_spec, bundle.patch_spec
    x, _ = _batch(bundle, 5, n=50)  # one full batch of 32 and a padded one
    phi = np.random.default_rng(6).normal(scale=0.1, size=patch.k).astype(np.float32)
    everything = slice_params(bundle.all_params(), param_infos(spec, patch), first_kept(spec, bundle.variant(FULL)))
    half = _sliced(bundle, HALF, 7)
    halves = {}
    for runtime, engine in engines.items():
        full = predict_variant(engine, FULL, x, phi, everything)
        assert full.shape == (50, spec.num_classes)
        np.testing.assert_allclose(full, predict_logits(engine, x, phi), atol=1e-4)
        halves[runtime] = predict_variant(engine, HALF, x, phi, half)
        np.testing.assert_allclose(halves[runtime][:32], engine.variant_logits(HALF, x[:32], phi, half), atol=1e-5)
        assert predict_variant(engine, HALF, x[:0], phi, half).shape == (0, spec.num_classes)
    np.testing.assert_allclose(halves["litert"], halves["executorch"], atol=1e-4)
    assert np.abs(halves["litert"] - predict_logits(engines["litert"], x, phi)).max() > 1e-2  # a smaller net


def test_taylor_importance_agrees_and_scores_a_dead_filter_zero(bundle: Bundle, engines: dict[str, Engine]) -> None:
    spec = bundle.model_spec
    base = {n: w.copy() for n, w in bundle.base_params().items()}
    base["conv1.weight"][3] = 0.0
    base["conv1.bias"][3] = 0.0
    batches = [_batch(bundle, 10 + i) for i in range(3)]
    scores = {r: taylor_importance(e, FULL, base, spec.droppable_layers(), batches) for r, e in engines.items()}
    for runtime, per_layer in scores.items():
        assert set(per_layer) == set(spec.droppable_layers())
        for name, s in per_layer.items():
            assert s.shape == (spec.layer(name).out,) and (s >= 0).all() and s.sum() > 0, (runtime, name)
        assert per_layer["conv1"][3] == 0.0
    for name in spec.droppable_layers():
        np.testing.assert_allclose(scores["litert"][name], scores["executorch"][name], rtol=1e-3,
                                   atol=1e-6 * float(scores["litert"][name].max()))


def test_engine_errors_name_the_problem(bundle: Bundle, engines: dict[str, Engine]) -> None:
    with pytest.raises(ValueError, match="unknown runtime 'onnx'"):
        open_engine(bundle, "onnx")
    x, y = _batch(bundle, 0)
    with pytest.raises(BundleError, match="no ExecuTorch program 'executorch_train_full' for variant 'k25-25'"):
        engines["executorch"].full_grads("k25-25", x, y, {})
    with pytest.raises(ValueError, match="labels y must be integers"):
        engines["executorch"].full_grads(HALF, x, y.astype(np.float32), _sliced(bundle, HALF, 0, patch=False))


# ------------------------------------------------------------------------------ Canoe on ExecuTorch

def test_canoe_cli_opens_the_own_model_on_the_chosen_runtime(bundle: Bundle, bundle_dir: Path,
                                                             tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from edgepatch.device.canoe_cli import app, load_own_model
    from edgepatch.protocol.shards import write_shard

    assert load_own_model(bundle, None, "executorch").engine.runtime == "executorch"
    data = tmp_path / "data"
    write_shard(data / "s.npz", np.zeros((4, 1, 8, 8), np.float32), np.arange(4), np.arange(4.0))
    result = CliRunner().invoke(app, ["target", "--bundle", str(bundle_dir), "--data", str(data), "--broker",
                                      "mqtt://127.0.0.1:1", "--device-id", "d", "--ticks", "1",
                                      "--runtime", "onnx"])
    assert result.exit_code == 2 and "unknown runtime 'onnx'" in result.output, result.output


@pytest.fixture(scope="module")
def et_world(bundle_dir: Path, canoe_world_builder: Callable[[Path, str], Any]) -> Any:
    """The test_canoe scenario (conftest.CanoeWorld), every training step on the ExecuTorch engine."""
    return canoe_world_builder(bundle_dir, "executorch")


def _on_classes(pred: np.ndarray, y: np.ndarray, classes: list[int]) -> float:
    mask = np.isin(y, classes)
    return float((pred[mask] == y[mask]).mean())


def test_canoe_slice_and_boosting_on_executorch(et_world: Any, engines: dict[str, Engine]) -> None:
    w = et_world
    assert w.base.engine.runtime == "executorch"
    helper = CanoeHelper("dev-h", w.helper, w.helper_x, w.helper_y, bundle_variants(w.bundle), w.bundle.base_version)
    offer = helper.answer(CanoeTask("r-et", "dev-t", NEW))
    assert offer.ok, offer.error
    s = decode_slice(offer.slice_bytes(), expected_sha256=offer.sha256)
    assert s.variant_id == HALF and s.widths() == w.bundle.variant(HALF).widths(w.bundle.model_spec)
    member = SliceModel.from_slice(s, w.base.engine, w.base.spec, w.base.patch, w.base.shared)
    pred = member.logits(w.test_x).argmax(axis=1)
    assert _on_classes(pred, w.test_y, NEW) > 0.7
    own = w.base.logits(w.test_x).argmax(axis=1)
    assert _on_classes(own, w.test_y, NEW) < 0.1  # the base never saw them
    # A slice made on ExecuTorch runs unchanged on a LiteRT target (same variant, same maths).
    lite = SliceModel.from_slice(s, engines["litert"], w.base.spec, w.base.patch, w.base.shared)
    np.testing.assert_allclose(lite.logits(w.test_x[:40]), member.logits(w.test_x[:40]), atol=1e-4)

    target = CanoeTarget("dev-t", w.base.copy(), bundle_variants(w.bundle), w.bundle.base_version,
                         DriftDetector(10, reference=64, window=64))
    window = np.isin(w.test_y, NEW) | (np.arange(len(w.test_y)) % 2 == 0)
    target.observe(w.test_x[window][:128], w.test_y[window][:128])
    assert target.accept_offer(offer), target.events[-1]
    weights = target.refit()
    assert set(weights) == {"own", member.name} and weights[member.name] > 0
    held_x, held_y = w.test_x[window][128:], w.test_y[window][128:]
    assert target.accuracy(held_x, held_y) > target.accuracy(held_x, held_y, own_only=True) + 0.1
    losses = target.learn(3)  # the own model keeps learning on ExecuTorch
    assert len(losses) == 3 and all(np.isfinite(losses)) and target.model.steps == w.base.steps + 3


# ------------------------------------------------------------------ LiteRT paths stay torch-free

NO_TORCH = textwrap.dedent("""
    import sys
    for name in ("torch", "tensorflow", "keras", "jax"):
        sys.modules[name] = None
    import json
    import numpy as np
    from edgepatch.device.canoe_boost import bundle_variants, tailored_from_bundle
    from edgepatch.device.canoe_helper import CanoeHelper
    from edgepatch.device.fl_client import FullWeightTrainer
    from edgepatch.protocol.bundle import load_bundle
    from edgepatch.protocol.canoe import CanoeTask
    from edgepatch.protocol.fl import Assignment, BlobRef, FlRoundOpen
    from edgepatch.protocol.params import init_params

    bundle = load_bundle(sys.argv[1])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, *bundle.model_spec.input_shape)).astype(np.float32)
    y = np.arange(64) % bundle.model_spec.num_classes
    model = tailored_from_bundle(bundle)
    loss = model.train_step(x[:32], y[:32])
    helper = CanoeHelper("h", model, x, y, bundle_variants(bundle), bundle.base_version)
    offer = helper.answer(CanoeTask("r", "t", [7, 8, 9]))
    round_open = FlRoundOpen(round=1, strategy="distreal", deadline_at=None,
                             global_ref=BlobRef("file:///unused.npz", 1, "a" * 64), local_steps=2, lr=0.05)
    result = FullWeightTrainer(bundle, x, y, seed=0).train_round(init_params(bundle.model_spec, None, 0),
                                                                 round_open, Assignment(None, "random"))
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "tensorflow") and sys.modules[m])
    print(json.dumps({"loss": loss, "offer": offer.ok, "status": result.status, "loaded": loaded}))
""")


def test_litert_canoe_and_federated_paths_import_no_torch(bundle_dir: Path) -> None:
    out = subprocess.run([sys.executable, "-c", NO_TORCH, str(bundle_dir)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert np.isfinite(result["loss"]) and result["offer"] and result["status"] == "ok"
    assert result["loaded"] == []
