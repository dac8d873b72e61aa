"""Issue 10, item 5: the variant table carries the spread of each convergence estimate over the DSE's seeds,
and the device's selector never prefers a smaller variant on quality grounds while the spreads overlap."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgepatch.device.profile import load_profile
from edgepatch.device.resources import ResourceSnapshot
from edgepatch.device.selector import VariantSelector
from edgepatch.export.dse import explore, flops_cost, seed_spread, validate_row
from edgepatch.export.pipeline import ExportOptions, choose_variants, export_data
from edgepatch.export.reference_models import digits_cnn
from edgepatch.protocol.manifest import VariantRow
from edgepatch.protocol.params import init_params

SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def spec():
    return digits_cnn()


@pytest.fixture(scope="module")
def base(spec):
    return init_params(spec, None, seed=0)


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.images[:, None] / 16.0).astype(np.float32), data.target.astype(np.int64)


@pytest.fixture(scope="module")
def dse_rows(spec, base, digits):
    result = explore(spec, base, *digits, pop_size=6, generations=2, seeds=SEEDS, step_budget=10,
                     cost_fn=flops_cost)
    return result, result.pareto_rows()


def test_dse_rows_carry_a_nonzero_spread_over_seeds(dse_rows, spec):
    result, rows = dse_rows
    assert len(rows) >= 2
    for row in rows:
        per_seed = result.point(row["id"]).convergence_per_seed
        assert len(per_seed) == len(SEEDS)
        assert row["convergence"] == pytest.approx(float(np.mean(per_seed)))
        assert row["convergence_std"] == pytest.approx(float(np.std(per_seed, ddof=1)))
        assert row["convergence_std"] > 1e-4  # different batches and kept sets: the seeds disagree
        validate_row(row, spec)
        # what the bundle writer ships and a device reads back (strict JSON, the manifest's own parser)
        shipped = json.loads(json.dumps(VariantRow(**row).to_dict()))
        assert VariantRow.from_dict(shipped, "row").convergence_std == pytest.approx(row["convergence_std"])
    with pytest.raises(Exception, match="convergence_std"):
        validate_row(dict(rows[0], convergence_std=-0.1), spec)


def test_one_seed_leaves_the_spread_unknown_and_the_row_unchanged():
    assert seed_spread([0.7]) is None
    assert seed_spread([0.7, 0.9]) == pytest.approx(float(np.std([0.7, 0.9], ddof=1)))
    row = VariantRow("k100-100", {}, {}, 1.0, convergence=0.7)
    assert "convergence_std" not in row.to_dict()  # tables without it serialize as before


def test_exporter_variant_table_carries_the_spread(spec, base):
    """The exporter's explicit-variants path (what `edgepatch export --variants 1,0.25` writes)."""
    opts = ExportOptions(variants="1,0.25", dse_seeds=SEEDS, dse_steps=10)
    rows, _ = choose_variants(spec, base, opts, export_data(spec, opts))
    assert [r.id for r in rows] and all(r.convergence_std is not None and r.convergence_std > 1e-4 for r in rows)
    one_seed, _ = choose_variants(spec, base, ExportOptions(variants="1", dse_seeds=(0,), dse_steps=10),
                                  export_data(spec, opts))
    assert one_seed[0].convergence_std is None


def _selector_rows(rows):
    # train_ms proportional to FLOPs (the flops cost model has no runtime); every variant fits 30 s easily
    return [dict(r, train_ms={"litert": 10.0 * r["flops_ratio"]}) for r in rows]


SNAP = ResourceSnapshot(1.0, 4096.0, None, None, 0.1, 0.0)


def overlap(a, b):
    return a["convergence"] - a["convergence_std"] <= b["convergence"] + b["convergence_std"] and \
        b["convergence"] - b["convergence_std"] <= a["convergence"] + a["convergence_std"]


def test_selector_with_the_dse_table_keeps_the_largest_unless_a_gap_beats_both_spreads(dse_rows):
    _, rows = dse_rows
    table = _selector_rows(rows)
    largest = max(table, key=lambda r: r["flops_ratio"])
    choice = VariantSelector(table, load_profile("linux_x86_64")).select(30.0, 10, SNAP).variant_id
    chosen = next(r for r in table if r["id"] == choice)
    if choice != largest["id"]:
        assert chosen["convergence"] < largest["convergence"] and not overlap(chosen, largest)


def test_selector_never_prefers_a_smaller_variant_while_spreads_overlap(dse_rows):
    """Random tables built on the DSE's rows: every smaller variant has a better (lower) mean loss than the
    full model but an interval (mean ± spread) that overlaps the full model's; with slack, the full trains."""
    _, rows = dse_rows
    table = _selector_rows(rows)
    profile = load_profile("linux_x86_64")
    full = max(table, key=lambda r: r["flops_ratio"])
    rng = np.random.default_rng(0)
    for _ in range(200):
        ref_loss, ref_std = float(rng.uniform(0.2, 2.0)), float(rng.uniform(0.01, 0.3))
        trial = []
        for r in table:
            if r["id"] == full["id"]:
                trial.append(dict(r, convergence=ref_loss, convergence_std=ref_std))
                continue
            std = float(rng.uniform(0.0, 0.3))
            gap = float(rng.uniform(0.0, 1.0)) * (ref_std + std)  # lower mean, still within both spreads
            trial.append(dict(r, convergence=ref_loss - gap, convergence_std=std))
        assert all(overlap(t, trial[table.index(full)]) for t in trial)
        assert VariantSelector(trial, profile).select(30.0, 10, SNAP).variant_id == full["id"]
    # and the same smaller variant wins once its gap beats both spreads
    small = min(table, key=lambda r: r["flops_ratio"])
    clear = [dict(r, convergence=1.0, convergence_std=0.05) if r["id"] == full["id"] else
             dict(r, convergence=(0.5 if r["id"] == small["id"] else 1.2), convergence_std=0.05) for r in table]
    assert VariantSelector(clear, profile).select(30.0, 10, SNAP).variant_id == small["id"]
