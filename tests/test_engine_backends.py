"""The Engine seam on both runtimes, with the real programs of one exported bundle (LiteRT + ExecuTorch).

Per primitive (φ step, full-weight step of the 50 % variant, variant inference, Taylor importance) the two
runtimes must agree with each other and do their job (lower a loss, match the frozen program, score a
dead filter 0). Then Canoe (helper slice + target boosting), a federated client round and the variant
selector run end to end on ExecuTorch, and the LiteRT versions of the same paths run in a process
where torch and TensorFlow cannot be imported.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
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
from edgepatch.device.fl_client import FullWeightTrainer
from edgepatch.device.profile import load_profile
from edgepatch.device.resources import ResourceSnapshot
from edgepatch.device.selector import VariantSelector
from edgepatch.device.state import DeviceStateStore
from edgepatch.device.trainer import LocalData, PatchTrainer
from edgepatch.protocol.bundle import Bundle, load_bundle
from edgepatch.protocol.canoe import CanoeTask, decode_slice
from edgepatch.protocol.fl import Assignment, BlobRef, FlRoundOpen
from edgepatch.protocol.manifest import BundleError
from edgepatch.protocol.model_spec import param_infos
from edgepatch.protocol.params import init_params
from edgepatch.protocol.variants import first_kept, sample_kept, slice_params

pytestmark = pytest.mark.slow

RUNTIMES = ("litert", "executorch")
FULL, HALF = "k100-100", "k50-50"
NEW = [7, 8, 9]


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits_cnn exported for both runtimes, a full and a 50 % variant (≈ 30 s)."""
    from edgepatch.export.pipeline import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "digits-both"
    export_bundle(ExportOptions(variants="1,0.5", runtimes=RUNTIMES, pretrain_epochs=8, dse_steps=5,
                                dse_seeds=(0,)), out)
    return out


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


# ------------------------------------------------------------------- federated round and selector

def _round(steps: int, deadline_at: float | None) -> FlRoundOpen:
    return FlRoundOpen(round=1, strategy="distreal", deadline_at=deadline_at,
                       global_ref=BlobRef("file:///unused.npz", 1, "a" * 64), local_steps=steps, lr=0.05)


def test_federated_round_on_executorch_matches_litert(bundle: Bundle) -> None:
    spec = bundle.model_spec
    x, y = _batch(bundle, 20, n=96)
    params = init_params(spec, None, 0)
    results = {}
    for runtime in RUNTIMES:
        trainer = FullWeightTrainer(bundle, x, y, seed=0, runtime=runtime)
        assert trainer.engine.runtime == runtime
        results[runtime] = trainer.train_round(params, _round(3, None), Assignment(HALF, "first"))
    et, lite = results["executorch"], results["litert"]
    assert et.status == "ok" and et.steps == 3 and et.variant_steps == {HALF: 3}
    width = bundle.variant(HALF).widths(spec)["conv1"]
    assert et.touched["conv1.weight"][:width].all() and not et.touched["conv1.weight"][width:].any()
    assert np.abs(et.delta["conv1.weight"][:width]).max() > 0 and np.abs(et.delta["conv1.weight"][width:]).max() == 0
    for name in et.delta:  # the same batches and kept sets: the same update on both runtimes
        np.testing.assert_allclose(et.delta[name], lite.delta[name], atol=1e-5)
        np.testing.assert_array_equal(et.touched[name], lite.touched[name])


def test_federated_device_round_on_executorch_over_the_twin(bundle: Bundle, bundle_dir: Path, tmp_path: Path) -> None:
    """An FlDevice with `runtime: executorch` joins, trains a DISTREAL round (its own selector choosing on
    ExecuTorch times) and contributes; the server aggregates its update (in-memory MQTT twin)."""
    import threading

    from edgepatch.cloud.fl.server import Evaluator, FlServer
    from edgepatch.cloud.fl.strategies import make_strategy
    from edgepatch.device.fl_client import DeviceSpec, FlDevice
    from edgepatch.device.resources import ResourceTrace, TracePoint
    from edgepatch.protocol.mqtt import MqttSettings, make_client
    from edgepatch.protocol.mqtt_memory import MemoryBroker

    spec = bundle.model_spec
    x, y = _batch(bundle, 30, n=64)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    ResourceTrace((TracePoint(0.0, 1.0, 512.0),)).save(tmp_path / "trace.csv")
    device_spec = DeviceSpec("dev-et", "engine", str(bundle_dir), str(tmp_path / "d.npz"), "raspberry_pi_4", 1.0,
                             1.0, str(tmp_path / "trace.csv"), time.time(), "-", 1, upload_dir=str(tmp_path),
                             runtime="executorch")
    assert DeviceSpec.from_json(device_spec.to_json()).runtime == "executorch"
    broker = MemoryBroker()
    device = FlDevice(device_spec, broker=broker)
    assert device.trainer.engine.runtime == "executorch"
    server = FlServer(broker_host="-", broker_port=1, fleet="engine", bundle=bundle,
                      strategy=make_strategy("distreal", spec, bundle.manifest.variants), out_dir=tmp_path / "srv",
                      expected_devices=["dev-et"], evaluator=Evaluator(bundle, x[:16], y[:16]),
                      init_params=bundle.base_params(), deadline_s=30.0, local_steps=3, lr=0.05,
                      clock_origin=time.time(), join_timeout_s=10,
                      client=make_client(MqttSettings(client_id="srv"), broker))
    server.start()
    runner = threading.Thread(target=device.run, kwargs={"idle_timeout_s": 10}, daemon=True)
    runner.start()
    (record,) = server.run(1)
    server.stop()
    runner.join(10)
    assert not runner.is_alive() and device.rounds_done == 1
    (dev,) = record.devices
    assert dev.outcome == "contributed" and dev.steps == 3, dev.reason
    assert sum(dev.variant_steps.values()) == 3 and set(dev.variant_steps) <= {FULL, HALF}
    assert record.bytes_up > 0
    assert device.trainer.selector is not None
    assert device.trainer.selector.history[-1].inputs["runtime"] == "executorch"


class _Steady:
    """All compute and memory free, always (the selector then trades only time against convergence)."""

    def snapshot(self) -> ResourceSnapshot:
        return ResourceSnapshot(1.0, 4096.0, None, None, 0.0, time.time())

    def record_step(self, key: str, seconds: float) -> None:
        pass


def _selector(bundle: Bundle) -> VariantSelector:
    # Convergence as if the DSE ranked the full model first (its real ranking on 5 steps is noise), so the
    # two decisions below differ only by the deadline.
    rows = [{"id": r.id, "train_ms": r.train_ms, "memory_bytes": r.memory_bytes or 0,
             "convergence": 1.0 - r.flops_ratio, "pareto": True} for r in bundle.manifest.variants]
    return VariantSelector(rows, load_profile("linux_x86_64"), reselect_every=100)


def test_selector_chooses_among_variants_on_executorch(bundle: Bundle) -> None:
    x, y = _batch(bundle, 21, n=96)
    params = init_params(bundle.model_spec, None, 0)
    selector = _selector(bundle)
    trainer = FullWeightTrainer(bundle, x, y, seed=0, resources=_Steady(), selector=selector,  # type: ignore[arg-type]
                                runtime="executorch")
    assert set(selector.factors) == {FULL, HALF}  # calibrated by timed ExecuTorch steps at start
    free = trainer.train_round(params, _round(4, None), Assignment(None, "random"))
    assert free.status == "ok" and free.timeline[0][1] == FULL  # no deadline: the best-converging
    # A deadline between the two variants' expected totals (as the selector expects them now: measured
    # ExecuTorch steps on this loaded machine, so we do not assume which one is cheaper).
    expected = {vid: selector.expected_step_s(vid, 1.0, "executorch") for vid in (FULL, HALF)}
    cheap, dear = sorted(expected, key=expected.__getitem__)
    steps = 200
    middle = steps * (expected[cheap] + expected[dear]) / 2 / (1 - selector.safety_margin)
    tight = trainer.train_round(params, _round(steps, time.time() + middle), Assignment(None, "random"))
    assert tight.timeline[0][1] == cheap, (expected, tight.timeline)
    decision = selector.history[-1]
    assert decision.fits and decision.variant_id == cheap and decision.inputs["runtime"] == "executorch"


def test_phi_training_with_the_selector_on_executorch(bundle: Bundle, engines: dict[str, Engine],
                                                      tmp_path: Path) -> None:
    from edgepatch.data.datasets import load_digits

    data = load_digits()
    t = np.arange(len(data.y), dtype=np.float64)
    local = LocalData.split(data.x[:300] * 0.5 + 0.3, data.y[:300], t[:300])
    selector = _selector(bundle)
    trainer = PatchTrainer(bundle, engines["executorch"], DeviceStateStore(tmp_path / "state"), local,
                           selector=selector, resources=_Steady())  # type: ignore[arg-type]
    before = trainer.holdout_accuracy()
    report = trainer.train_round(40)
    assert report.decisions and report.decisions[0].inputs["runtime"] == "executorch"
    assert report.variants[0] == FULL and np.isfinite(report.losses).all()
    assert np.mean(report.losses[-10:]) < np.mean(report.losses[:10])
    assert trainer.holdout_accuracy() >= before


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
