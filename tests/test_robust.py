"""cloud/robust.py: bad φ are dropped or clipped, the round goes on, and the cloud model stays where the
honest fleet puts it (issue 11: "one φ of 3e38 turned a distillation into NaN; one φ of the wrong size
aborted every round")."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from edgepatch.cloud.momodistill import DeviceContribution
from edgepatch.cloud.robust import RobustConfig, clipped_device_weights, screen_contributions, trimmed_mean
from edgepatch.export.reference_models import default_patch, digits_cnn

SPEC = digits_cnn()
PATCH = default_patch(SPEC, k=8)


# -- unit -------------------------------------------------------------------------------------------------

def test_screen_drops_bad_phi_with_reasons_and_clips_large_ones(caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(0)
    honest = [DeviceContribution(f"h{i}", rng.normal(size=PATCH.k).astype(np.float32)) for i in range(6)]
    bad = [DeviceContribution("huge", np.full(PATCH.k, 3e38, np.float32)),
           DeviceContribution("nan", np.full(PATCH.k, np.nan, np.float32)),
           DeviceContribution("size", np.zeros(PATCH.k + 3, np.float32)),
           DeviceContribution("big", np.full(PATCH.k, 50.0, np.float32))]
    with caplog.at_level(logging.WARNING, logger="edgepatch.cloud.robust"):
        out = screen_contributions(honest + bad, SPEC, PATCH, "proxy")
    assert set(out.dropped) == {"huge", "nan", "size"}
    assert "oversized" in out.dropped["huge"] and "NaN" in out.dropped["nan"] and "shape" in out.dropped["size"]
    assert all(device in caplog.text for device in ("huge", "nan", "size"))
    assert set(out.clipped) == {"big"}
    clipped = next(d for d in out.devices if d.device_id == "big")
    assert np.linalg.norm(clipped.phi) == pytest.approx(out.clip_norm, rel=1e-5)
    assert [d.device_id for d in out.devices] == [f"h{i}" for i in range(6)] + ["big"]
    for before, after in zip(honest, out.devices, strict=False):
        assert np.array_equal(before.phi, after.phi)  # honest φ untouched


def test_screen_raises_only_when_nothing_is_left() -> None:
    with pytest.raises(ValueError, match="every device contribution was refused.*NaN"):
        screen_contributions([DeviceContribution("a", np.full(PATCH.k, np.nan, np.float32))], SPEC, PATCH, "proxy")


def test_trimmed_mean_and_median_ignore_outliers() -> None:
    rows = np.array([[1.0, 10.0], [2.0, 11.0], [3.0, 12.0], [4.0, 13.0], [1e30, -1e30]])
    np.testing.assert_allclose(trimmed_mean(rows, 0.2), [3.0, 11.0])  # drops 1 low and 1 high per coordinate
    np.testing.assert_allclose(trimmed_mean(rows, 0.5), [3.0, 11.0])
    np.testing.assert_allclose(trimmed_mean(rows[:4], 0.0), [2.5, 11.5])


def test_clipped_device_weights_cap_one_devices_share() -> None:
    shares = clipped_device_weights([1, 1, 1, 1, 1000], max_weight_factor=2.0)
    assert shares.sum() == pytest.approx(1.0)
    assert shares.max() <= 2.0 / 5 + 1e-9
    np.testing.assert_allclose(clipped_device_weights([1, 2, 3], 4.0), [1 / 6, 2 / 6, 3 / 6])
    with pytest.raises(ValueError):
        RobustConfig(trim=0.7)


# -- a real round on the digits fleet (benchmarks/robust_round.py, loaded by path: one implementation) ------

@pytest.mark.slow
def test_twenty_percent_adversarial_phi_neither_abort_nor_move_the_round() -> None:
    import importlib.util

    where = Path(__file__).parents[1] / "benchmarks" / "robust_round.py"
    spec = importlib.util.spec_from_file_location("_robust_round", where)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    r = bench.run(n_devices=15)
    print(json.dumps(r))
    assert r["adversarial"] == 3
    assert not r["unscreened_finite"]  # without the screen one 3e38 φ poisons the round (issue 11)
    assert r["broken"]["finite"] and r["broken"]["dropped"] == 3  # no abort, all three dropped
    assert abs(r["broken"]["accuracy"] - r["honest_only"]["accuracy"]) <= 0.01
    assert r["scaled"]["finite"] and r["scaled"]["clipped"] >= 3
    assert abs(r["scaled"]["accuracy"] - r["all_honest"]["accuracy"]) <= 0.01


# -- Canoe: a device claiming every class is the first helper at most once (in-memory broker twin; the
#    real-broker path of CanoeCompanion is tests/test_canoe_mqtt.py) -------------------------------------

def test_canoe_helper_claiming_everything_is_demoted_after_it_fails() -> None:
    import base64
    import hashlib
    import time

    from edgepatch.cloud.canoe import CanoeCompanion
    from edgepatch.protocol.canoe import CanoeMeta, CanoeOffer, CanoeRequest, CanoeTask, canoe_topic
    from edgepatch.protocol.endpoint import WireEndpoint
    from edgepatch.protocol.mqtt import MqttSettings, make_client
    from edgepatch.protocol.mqtt_memory import MemoryBroker

    broker = MemoryBroker()
    comp = CanoeCompanion("lab", "127.0.0.1", 1883, 10, timeout_s=0.3,
                          client=make_client(MqttSettings(client_id="comp"), broker))
    comp.start()
    peers = {d: WireEndpoint(make_client(MqttSettings(client_id=d), broker), fleet="lab", device_id=d)
             for d in ("dev-000", "dev-001", "dev-002")}
    tasks: dict[str, list[str]] = {"dev-000": [], "dev-001": []}
    blob = b"slice"

    def honest_answer(msg) -> None:  # type: ignore[no-untyped-def]
        task = msg.payload
        assert isinstance(task, CanoeTask)
        tasks["dev-001"].append(task.request_id)
        peers["dev-001"].send(CanoeOffer(task.request_id, task.target, "dev-001", hashlib.sha256(blob).hexdigest(),
                                         len(blob), inline_b64=base64.b64encode(blob).decode()))

    peers["dev-000"].subscribe(canoe_topic("lab", "dev-000", "task"),
                               lambda m: tasks["dev-000"].append(m.payload.request_id))  # never answers
    peers["dev-001"].subscribe(canoe_topic("lab", "dev-001", "task"), honest_answer)
    for peer in peers.values():
        peer.start()
    try:
        peers["dev-000"].send(CanoeMeta([10**6] * 10, [5.0] * 10))  # claims everything, accuracy "5"
        peers["dev-001"].send(CanoeMeta([0] * 7 + [40, 40, 40], [0.9] * 10))
        deadline = time.monotonic() + 5
        while len(comp.metas) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        for i in range(4):
            peers["dev-002"].send(CanoeRequest(f"r{i}", [7, 8, 9], [1] * 10, 0.2, 0.9, "test"))
            deadline = time.monotonic() + 5
            while f"r{i}" not in tasks["dev-001"] and time.monotonic() < deadline:
                time.sleep(0.01)
        assert tasks["dev-000"] == ["r0"]  # first helper once; after its timeout, never first again
        assert tasks["dev-001"] == ["r0", "r1", "r2", "r3"]
        assert comp.strikes == {"dev-000": 1} and comp.stats["offers_relayed"] == 4
    finally:
        for peer in peers.values():
            peer.stop()
        comp.stop()
