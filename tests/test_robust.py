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
