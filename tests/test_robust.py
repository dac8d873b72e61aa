"""cloud/robust.py: bad φ are dropped or clipped, the round goes on, and the cloud model stays where the
honest fleet puts it (issue 11: "one φ of 3e38 turned a distillation into NaN; one φ of the wrong size
aborted every round")."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgepatch.cloud.momodistill import (
    AGGREGATORS,
    CloudData,
    DeviceContribution,
    DistillConfig,
    cloud_logits,
    run_aggregator,
)
from edgepatch.cloud.robust import RobustConfig, clipped_device_weights, screen_contributions, trimmed_mean
from edgepatch.data.datasets import load_digits
from edgepatch.data.fleet import base_split, make_fleet
from edgepatch.export.pretrain import pretrain_base
from edgepatch.export.reference_models import default_patch, digits_cnn
from edgepatch.export.torch_model import forward, to_tensors
from edgepatch.protocol.params import init_params

SPEC = digits_cnn()
PATCH = default_patch(SPEC, k=8)
N_DEVICES = 15  # 3 attackers = 20 %


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


# -- a real round on the digits fleet ---------------------------------------------------------------------

def _train_phi(params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, steps: int = 40) -> np.ndarray:
    tensors = to_tensors(params)
    phi = torch.zeros(PATCH.k, requires_grad=True)
    opt = torch.optim.Adam([phi], lr=0.05)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(steps):
        loss = F.cross_entropy(forward(SPEC, PATCH, tensors, xt, phi), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return phi.detach().numpy().astype(np.float32)


@pytest.fixture(scope="module")
def world() -> dict:
    torch.set_num_threads(1)
    cloud, rest = base_split(load_digits(), 0.2, seed=0)
    fleet = make_fleet(rest, N_DEVICES, alpha=0.5, shift="gain_offset", seed=0, samples_per_device=50,
                       shift_strength=2.0)
    params = init_params(SPEC, PATCH, 0)
    params.update(pretrain_base(SPEC, cloud.x, cloud.y, epochs=8, seed=0))
    honest = [DeviceContribution(d.device_id, _train_phi(params, d.train.x, d.train.y)) for d in fleet]
    test_x = np.concatenate([d.holdout.x for d in fleet])
    test_y = np.concatenate([d.holdout.y for d in fleet])
    return {"cloud": CloudData(cloud.x, cloud.y, cloud.x), "params": params, "honest": honest,
            "test": (test_x, test_y)}


CFG = DistillConfig(mode="proxy", phi_source="device", step1_epochs=3, step2_epochs=3, beta=0.5)


def _accuracy(world: dict, devices: list[DeviceContribution]) -> tuple[float, dict[str, float]]:
    result = run_aggregator("momodistill", SPEC, PATCH, world["params"], devices, world["cloud"], CFG)
    assert all(np.all(np.isfinite(v)) for v in result.params.values())
    x, y = world["test"]
    return float((cloud_logits(SPEC, PATCH, result, x).argmax(1) == y).mean()), result.metrics


@pytest.mark.slow
def test_twenty_percent_adversarial_phi_neither_abort_nor_move_the_round(world: dict) -> None:
    honest: list[DeviceContribution] = world["honest"]
    k = PATCH.k
    broken = {0: np.full(k, 3e38, np.float32), 1: np.full(k, np.nan, np.float32), 2: np.zeros(k + 5, np.float32)}
    attacked = [DeviceContribution(d.device_id, broken[i]) if i in broken else d for i, d in enumerate(honest)]
    # without the screen, the 3e38 φ alone poisons the round (what issue 11 saw)
    poisoned = AGGREGATORS["momodistill"].run(SPEC, PATCH, world["params"], [attacked[0], *honest[3:]],
                                              world["cloud"], CFG)
    assert not all(np.all(np.isfinite(v)) for v in poisoned.params.values())

    base, _ = _accuracy(world, honest[3:])  # the honest 80 % alone
    acc, metrics = _accuracy(world, attacked)
    print(f"cloud accuracy honest-only {base:.4f}, with 20 % broken φ {acc:.4f}")
    assert metrics["devices_dropped"] == 3.0
    assert abs(acc - base) <= 0.01

    # finite but large: 20 % send 1000× their φ (norm far above the fleet's, below the oversized limit)
    scaled = [DeviceContribution(d.device_id, d.phi * 1000.0) if i < 3 else d for i, d in enumerate(honest)]
    acc_scaled, metrics = _accuracy(world, scaled)
    full, _ = _accuracy(world, honest)
    print(f"cloud accuracy honest {full:.4f}, with 20 % scaled φ {acc_scaled:.4f}")
    assert metrics["devices_clipped"] >= 3.0
    assert abs(acc_scaled - full) <= 0.01
