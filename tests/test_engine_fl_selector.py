"""Full-weight training and the variant selector on ExecuTorch, through the Engine (real programs).

A federated round gives the same update on ExecuTorch as on LiteRT; an ExecuTorch FlDevice joins, trains
a DISTREAL round and contributes (in-memory MQTT twin); its selector, calibrated by timed ExecuTorch
steps, takes the best-converging variant without a deadline and the cheaper one under a tight deadline;
φ training with the selector runs on ExecuTorch too. The primitives themselves: test_engine_backends.py.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from edgepatch.device.engine import open_engine
from edgepatch.device.fl_client import FullWeightTrainer
from edgepatch.device.profile import load_profile
from edgepatch.device.resources import ResourceSnapshot
from edgepatch.device.selector import VariantSelector
from edgepatch.device.state import DeviceStateStore
from edgepatch.device.trainer import LocalData, PatchTrainer
from edgepatch.protocol.bundle import Bundle, load_bundle
from edgepatch.protocol.fl import Assignment, BlobRef, FlRoundOpen
from edgepatch.protocol.params import init_params

pytestmark = pytest.mark.slow

RUNTIMES = ("litert", "executorch")
FULL, HALF = "k100-100", "k50-50"


@pytest.fixture(scope="module")
def bundle(digits_bundle_both: Path) -> Bundle:
    return load_bundle(digits_bundle_both)


def _batch(bundle: Bundle, seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    spec = bundle.model_spec
    return rng.normal(size=(n, *spec.input_shape)).astype(np.float32), rng.integers(0, spec.num_classes, n)


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


def test_federated_device_round_on_executorch_over_the_twin(bundle: Bundle, digits_bundle_both: Path, tmp_path: Path) -> None:
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
    device_spec = DeviceSpec("dev-et", "engine", str(digits_bundle_both), str(tmp_path / "d.npz"), "raspberry_pi_4", 1.0,
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
    decided_before = len(selector.history)
    tight = trainer.train_round(params, _round(steps, time.time() + middle), Assignment(None, "random"))
    assert tight.timeline[0][1] == cheap, (expected, tight.timeline)
    decision = selector.history[decided_before]  # later ones may buy the dearer variant back with the slack
    assert decision.fits and decision.variant_id == cheap and decision.inputs["runtime"] == "executorch"


def test_phi_training_with_the_selector_on_executorch(bundle: Bundle, tmp_path: Path) -> None:
    from edgepatch.data.datasets import load_digits

    data = load_digits()
    t = np.arange(len(data.y), dtype=np.float64)
    local = LocalData.split(data.x[:300] * 0.5 + 0.3, data.y[:300], t[:300])
    selector = _selector(bundle)
    trainer = PatchTrainer(bundle, open_engine(bundle, "executorch"), DeviceStateStore(tmp_path / "state"), local,
                           selector=selector, resources=_Steady())  # type: ignore[arg-type]
    before = trainer.holdout_accuracy()
    report = trainer.train_round(40)
    assert report.decisions and report.decisions[0].inputs["runtime"] == "executorch"
    assert report.variants[0] == FULL and np.isfinite(report.losses).all()
    assert np.mean(report.losses[-10:]) < np.mean(report.losses[:10])
    assert trainer.holdout_accuracy() >= before
