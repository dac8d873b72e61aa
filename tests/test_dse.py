"""DISTREAL design-space exploration: NSGA-II over per-layer keep rates, on digits_cnn with sklearn digits."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from edgepatch.export.dse import (
    DSEResult,
    GenerationReport,
    TrainConfig,
    canonical_variant,
    convergence,
    distreal_train,
    explore,
    flops_cost,
    non_dominated,
    plot_front,
    validate_row,
)
from edgepatch.export.reference_models import digits_cnn
from edgepatch.protocol.manifest import VariantRow
from edgepatch.protocol.model_spec import ModelSpec
from edgepatch.protocol.params import init_params
from edgepatch.protocol.variants import Variant, full_variant, uniform_variant

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.images[:, None] / 16.0).astype(np.float32), data.target.astype(np.int64)


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    return digits_cnn()


@pytest.fixture(scope="module")
def base(spec: ModelSpec) -> dict[str, np.ndarray]:
    return init_params(spec, None, seed=0)


class CountingCost:
    """flops_cost (the real cost model) that records every batch it was asked for."""

    runtime = flops_cost.runtime
    unit = flops_cost.unit

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, spec: ModelSpec, variants: Sequence[Variant], batch: int) -> dict[str, float]:
        self.calls.append([v.id for v in variants])
        return flops_cost(spec, variants, batch)


@pytest.fixture(scope="module")
def flops_run(spec, base, digits) -> tuple[DSEResult, CountingCost, list[GenerationReport]]:
    cost, reports = CountingCost(), []
    result = explore(spec, base, *digits, pop_size=8, generations=3, seeds=(0, 1), step_budget=4,
                     cost_fn=cost, progress=reports.append)
    return result, cost, reports


def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(x < y for x, y in zip(a, b, strict=True))


def test_front_is_non_dominated_and_ships_the_full_variant(flops_run, spec):
    result, _, _ = flops_run
    objectives = {p.id: (p.cost, p.convergence) for p in result.points}
    assert result.front_ids, "an empty front"
    for fid in result.front_ids:
        for other, obj in objectives.items():
            assert not dominates(obj, objectives[fid]), f"{other} dominates front member {fid}"
    # Every evaluated point that nothing dominates is on the front (the front is complete).
    for vid, obj in objectives.items():
        if not any(dominates(o, obj) for o in objectives.values()):
            assert vid in result.front_ids
    full = full_variant(spec).id
    assert result.full_id == full and full in result.pareto_ids
    shipped = result.pareto_rows()
    assert full in [r["id"] for r in shipped] and all(r["pareto"] for r in shipped)
    # Only the fallback may ship without being on the front.
    assert set(result.pareto_ids) - set(result.front_ids) <= {full}


def test_rows_validate_and_are_json(flops_run, spec):
    result, _, _ = flops_run
    rows = result.rows()
    assert len(rows) == result.evaluations == len({r["id"] for r in rows})
    for row in rows:
        validate_row(row, spec)
        assert row["train_ms"] == {}, "a cost model must not claim a measured time"
    decoded = json.loads(json.dumps(result.to_dict()))
    assert decoded["rows"][0]["id"] == rows[0]["id"] and decoded["cost_flops_pearson"] is None
    for row in result.pareto_rows():  # what the bundle writer does with them
        shipped = VariantRow(**row)
        shipped.validate_against(spec, row["id"])
        assert shipped.to_dict() == row
    with pytest.raises(ValueError, match="widths"):
        validate_row(dict(rows[0], widths={"conv1": 3, "conv2": 5}), spec)
    with pytest.raises(ValueError, match="id"):
        validate_row(dict(rows[0], id="k1-2"), spec)
    with pytest.raises(ValueError, match="convergence"):
        validate_row(dict(rows[0], convergence=float("nan")), spec)


def test_cheaper_variants_cost_less(flops_run, spec):
    result, _, _ = flops_run
    points = result.points
    full = result.point(result.full_id)
    assert all(p.cost < full.cost for p in points if p.id != full.id)
    for a in points:
        for b in points:
            wa, wb = a.widths, b.widths
            if a.id != b.id and all(wa[n] <= wb[n] for n in wa):
                assert a.cost < b.cost, f"{a.id} is a sub-network of {b.id} but not cheaper"


def test_search_caches_batches_and_reports_progress(flops_run, spec):
    result, cost, reports = flops_run
    asked = [vid for call in cost.calls for vid in call]
    assert len(asked) == len(set(asked)) == result.evaluations, "a variant was costed twice"
    assert len(cost.calls) <= 3, "the cost function must get one batch per generation"
    # 16 filters at 75 % round to 16: only 3 x 4 physically different networks exist.
    assert result.evaluations <= 12
    assert [r.generation for r in reports] == list(range(1, len(reports) + 1)) and reports
    assert reports[-1].evaluated == result.evaluations
    assert str(reports[-1]).startswith(f"generation {reports[-1].generation}/3")
    assert sum(r.new_variants for r in reports) == result.evaluations
    assert sum(r.cache_hits for r in reports) == result.cache_hits


def test_same_seeds_give_the_same_result(flops_run, spec, base, digits):
    result, _, _ = flops_run
    again = explore(spec, base, *digits, pop_size=8, generations=3, seeds=(0, 1), step_budget=4, cost_fn=flops_cost)
    assert [p.id for p in again.points] == [p.id for p in result.points]
    assert [p.convergence for p in again.points] == pytest.approx([p.convergence for p in result.points], abs=1e-6)


def test_plot_front_writes_a_png(flops_run, tmp_path: Path):
    result, _, _ = flops_run
    path = plot_front(result, tmp_path / "sub" / "front.png")
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5_000

    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300


def test_convergence_is_finite_and_depends_on_the_keep_rate(spec, base, digits):
    quarter = convergence(spec, base, uniform_variant(spec, 0.25), *digits, seeds=(0, 1), step_budget=10)
    full = convergence(spec, base, full_variant(spec), *digits, seeds=(0, 1), step_budget=10)
    assert all(math.isfinite(v) for v in quarter + full)
    assert abs(np.mean(quarter) - np.mean(full)) > 1e-3
    # The budget trains: the full model's loss is below the untrained model's (~ln 10).
    assert np.mean(full) < math.log(10)


def test_distreal_step_updates_only_the_kept_filters(spec, base, digits):
    x, y = digits
    variant = uniform_variant(spec, 0.5)  # conv2: 16 of 32 filters
    for optimizer in ("sgd", "adam"):
        trained = distreal_train(spec, base, variant, x, y, steps=1, batch=32, seed=3,
                                 cfg=TrainConfig(optimizer=optimizer, lr=0.05))
        changed = np.any(trained["conv2.weight"] != base["conv2.weight"], axis=(1, 2, 3))
        assert changed.sum() == 16, f"{optimizer}: {changed.sum()} filters changed, 16 were kept"
        assert np.all(np.isfinite(trained["head.weight"]))


def test_canonical_variant_names_equal_widths_once(spec):
    v = canonical_variant(spec, {"conv1": 0.75, "conv2": 0.5}, (0.25, 0.5, 0.75, 1.0))
    assert v.id == "k100-50" and v.widths(spec) == {"conv1": 16, "conv2": 16}
    assert canonical_variant(spec, {"conv1": 0.25, "conv2": 0.75}, (0.25, 0.5, 0.75, 1.0)).id == "k25-75"


def test_non_dominated_mask():
    f = np.array([[1.0, 5.0], [2.0, 2.0], [3.0, 3.0], [4.0, 1.0], [2.0, 2.0]])
    assert non_dominated(f).tolist() == [True, True, False, True, True]


def test_bad_inputs_are_named(spec, base, digits):
    x, y = digits
    with pytest.raises(ValueError, match="data_x"):
        explore(spec, base, x[:, 0], y, cost_fn=flops_cost)
    with pytest.raises(ValueError, match="data_y"):
        explore(spec, base, x, y + 5, cost_fn=flops_cost)
    with pytest.raises(ValueError, match="1.0"):
        explore(spec, base, x, y, rates=(0.25, 0.5), cost_fn=flops_cost)
    with pytest.raises(ValueError, match="conv2.weight"):
        explore(spec, {k: v for k, v in base.items() if k != "conv2.weight"}, x, y, cost_fn=flops_cost)

    with pytest.raises(ValueError, match="diverged"):
        explore(spec, base, x, y, cost_fn=flops_cost, step_budget=20, seeds=(0,), train=TrainConfig(lr=1e4))

    def broken_cost(spec, variants, batch):
        return {v.id: float("nan") for v in variants}

    broken_cost.runtime, broken_cost.unit = None, "?"  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="cost function returned"):
        explore(spec, base, x, y, cost_fn=broken_cost, step_budget=1, seeds=(0,))


@pytest.mark.slow
def test_real_litert_cost(spec, base, digits, tmp_path: Path):
    pytest.importorskip("edgepatch.export.tflite_builder", reason="export/tflite_builder.py is not there yet")
    from edgepatch.export.dse import LiteRTTrainCost

    cost = LiteRTTrainCost(base, repeats=5, warmup=1)
    result = explore(spec, base, *digits, pop_size=4, generations=2, seeds=(0,), step_budget=3, cost_fn=cost)
    assert result.cost_runtime == "litert" and result.cost_unit == "ms"
    rows = result.rows()
    for row in rows:
        validate_row(row, spec)
        assert set(row["train_ms"]) == {"litert"} and row["train_ms"]["litert"] > 0
    assert result.full_id in result.pareto_ids
    assert cost.build_seconds > 0
    # Measured against the FLOP model: reported whenever at least 3 variants were timed.
    if result.evaluations >= 3:
        assert result.cost_flops_pearson is not None and -1.0 <= result.cost_flops_pearson <= 1.0
    assert plot_front(result, tmp_path / "front.png").read_bytes()[:8] == PNG_MAGIC
