"""DISTREAL design-space exploration: Pareto-optimal per-layer keep rates (cost vs convergence).

NSGA-II (pymoo) searches integer-coded genes, one per droppable conv layer, each an index into the
discrete `rates`. Two objectives, both minimized:

1. cost — the training-step time of the variant's full-weight step (`train_full_<vid>`) measured in the
   real LiteRT interpreter (`LiteRTTrainCost`, the default), or any `CostFn`, e.g. the FLOP cost model
   `flops_cost`. When the cost is measured, the result also reports how well the FLOP model predicts it
   (Pearson and Spearman correlation over every evaluated variant): a cost model validated against
   measurement.
2. convergence — held-out loss of the FULL model after `step_budget` DISTREAL steps from the common
   checkpoint `base_params`, averaged over `seeds`. Each step draws a fresh kept set, gathers the small
   network's weights, runs forward/backward on the physically smaller network and scatters the update
   back into the full weights. This runs in torch: the torch forward is the reference that the LiteRT
   and ExecuTorch programs are parity-tested against, and on a CPU it is the fastest way to train the
   same maths many times.

Every distinct variant is evaluated once (a cache keyed by variant id); the cost function gets all of
a generation's new variants in one call, so LiteRT builds one .tflite per generation, not per variant.
The full variant (all rates 1.0) is always evaluated and always shipped: it is the device's fallback.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgepatch.protocol.model_spec import ModelSpec, SpecError, param_infos
from edgepatch.protocol.params import check_params
from edgepatch.protocol.variants import (
    Variant,
    full_variant,
    variant_id,
)

from .dse_convergence import (
    TrainConfig,
    _check_data,
    _convergence,
    _Data,
    convergence,
    distreal_train,
    heldout_loss,
    seed_spread,
)
from .dse_cost import CostFn, LiteRTTrainCost, canonical_variant, flops_cost, flops_ratio

__all__ = [  # the objectives live in dse_cost.py and dse_convergence.py; callers import them from here
    "DEFAULT_RATES", "CostFn", "DSEPoint", "DSEResult", "GenerationReport", "LiteRTTrainCost", "TrainConfig",
    "canonical_variant", "convergence", "distreal_train", "explore", "flops_cost", "flops_ratio",
    "heldout_loss", "non_dominated", "param_bytes", "plot_front", "seed_spread", "validate_row",
]

DEFAULT_RATES = (0.25, 0.5, 0.75, 1.0)


# -- results ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DSEPoint:
    """One evaluated variant."""

    variant: Variant
    widths: dict[str, int]
    flops_ratio: float
    cost: float  # objective 1, in the cost function's unit
    convergence: float  # objective 2: mean held-out loss after the budget (lower is better)
    convergence_per_seed: tuple[float, ...]
    generation: int  # first generation that asked for it (0 = the initial population)

    @property
    def id(self) -> str:
        return self.variant.id

    @property
    def convergence_std(self) -> float | None:
        return seed_spread(self.convergence_per_seed)


@dataclass
class DSEResult:
    spec: ModelSpec
    rates: tuple[float, ...]
    points: list[DSEPoint]  # every distinct evaluated variant, in evaluation order
    front_ids: list[str]  # strictly non-dominated variants
    pareto_ids: list[str]  # what ships: the front plus the full variant (the fallback)
    full_id: str
    cost_runtime: str | None
    cost_unit: str
    cost_flops_pearson: float | None  # measured cost vs FLOP model; None when the cost IS the model
    cost_flops_spearman: float | None
    evaluations: int
    cache_hits: int
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)

    def point(self, vid: str) -> DSEPoint:
        for p in self.points:
            if p.id == vid:
                return p
        raise KeyError(vid)

    def rows(self) -> list[dict[str, Any]]:
        """Variant-table rows (docs/CONTRACTS.md) for every evaluated point."""
        return [self._row(p) for p in self.points]

    def pareto_rows(self) -> list[dict[str, Any]]:
        """The variant table to ship, cheapest first."""
        rows = [self._row(self.point(vid)) for vid in self.pareto_ids]
        return sorted(rows, key=lambda r: (r["flops_ratio"], r["id"]))

    def _row(self, p: DSEPoint) -> dict[str, Any]:
        return {
            "id": p.id,
            "keep": dict(p.variant.keep),
            "widths": dict(p.widths),
            "flops_ratio": p.flops_ratio,
            "train_ms": {self.cost_runtime: p.cost} if self.cost_runtime else {},
            "infer_ms": {},
            "memory_bytes": param_bytes(self.spec, p.variant),
            "convergence": p.convergence,
            "convergence_std": p.convergence_std,  # the selector trusts a quality gap only beyond it
            "pareto": p.id in self.pareto_ids,
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (rows plus how the search ran)."""
        return {
            "model": self.spec.name, "rates": list(self.rates), "cost_runtime": self.cost_runtime,
            "cost_unit": self.cost_unit, "cost_flops_pearson": self.cost_flops_pearson,
            "cost_flops_spearman": self.cost_flops_spearman, "evaluations": self.evaluations,
            "cache_hits": self.cache_hits, "seconds": self.seconds, "settings": self.settings,
            "front": self.front_ids, "pareto": self.pareto_ids, "rows": self.rows(),
        }


def param_bytes(spec: ModelSpec, variant: Variant) -> int:
    """float32 bytes of the variant's sliced base parameters (what one step reads and writes)."""
    vspec = variant.spec(spec)
    return 4 * sum(int(np.prod(info.shape)) for info in param_infos(vspec, None).values())


ROW_KEYS = ("id", "keep", "widths", "flops_ratio", "train_ms", "infer_ms", "memory_bytes", "convergence", "pareto")


def validate_row(row: Mapping[str, Any], spec: ModelSpec) -> None:
    """Raise ValueError naming the first field of a variant-table row that breaks the contract.

    The bundle's own check (protocol.manifest.VariantRow) first, then what the DSE promises on top:
    every key present, a ratio for every droppable layer, the id derived from the keep rates,
    measured times > 0, a convergence value and a bool pareto flag (a negative convergence_std fails the
    bundle's check).
    """
    from edgepatch.protocol.manifest import VariantRow

    missing = [k for k in ROW_KEYS if k not in row]
    if missing:
        raise ValueError(f"variant row misses {missing}")
    ctx = f"variant {row['id']!r}"
    VariantRow.from_dict(dict(row), ctx).validate_against(spec, ctx)
    layers = spec.droppable_layers()
    if set(row["keep"]) != set(layers):
        raise ValueError(f"{ctx}: keep names {sorted(row['keep'])}, the DSE sets all of {layers}")
    if row["id"] != variant_id(row["keep"], layers):
        raise ValueError(f"{ctx}: id does not match its keep rates ({variant_id(row['keep'], layers)})")
    for key in ("train_ms", "infer_ms"):
        for runtime, ms in row[key].items():
            if not float(ms) > 0:
                raise ValueError(f"{ctx}: {key}[{runtime!r}] = {ms} is not a positive time")
    if row["convergence"] is None or not math.isfinite(float(row["convergence"])):
        raise ValueError(f"{ctx}: convergence {row['convergence']} is not finite")
    if not isinstance(row["pareto"], bool):
        raise ValueError(f"{ctx}: pareto must be a bool")


def non_dominated(objectives: np.ndarray) -> np.ndarray:
    """Boolean mask of rows that no other row dominates (all objectives minimized)."""
    f = np.asarray(objectives, dtype=np.float64)
    le = (f[:, None, :] <= f[None, :, :]).all(axis=2)  # le[i, j]: i is no worse than j everywhere
    lt = (f[:, None, :] < f[None, :, :]).any(axis=2)
    dominated_by = le & lt  # [i, j]: i dominates j
    return np.asarray(~dominated_by.any(axis=0), dtype=bool)


def _correlations(xs: Sequence[float], ys: Sequence[float]) -> tuple[float | None, float | None]:
    a, b = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
    if len(a) < 3 or a.std() == 0 or b.std() == 0:
        return None, None
    from scipy.stats import rankdata  # scipy comes with scikit-learn (export extra)

    pearson = float(np.corrcoef(a, b)[0, 1])
    spearman = float(np.corrcoef(rankdata(a), rankdata(b))[0, 1])  # average ranks: ties count fairly
    return pearson, spearman


# -- the search -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationReport:
    """What the progress callback receives after each generation."""

    generation: int  # 1-based
    generations: int
    new_variants: int  # evaluated for the first time in this generation
    cache_hits: int  # this generation's candidates that were already evaluated
    evaluated: int  # distinct variants so far
    front: list[tuple[str, float, float]]  # (id, cost, convergence) of the current front, cheapest first
    seconds: float

    def __str__(self) -> str:
        front = ", ".join(f"{vid} ({cost:.3g}, {loss:.3f})" for vid, cost, loss in self.front)
        return (f"generation {self.generation}/{self.generations}: {self.new_variants} new, "
                f"{self.cache_hits} cached, {self.evaluated} evaluated, {self.seconds:.1f} s; front: {front}")


class _Evaluator:
    """Evaluates variants once each; the cost function gets every new variant of a call together."""

    def __init__(self, spec: ModelSpec, base_params: Mapping[str, np.ndarray], data: _Data, rates: Sequence[float],
                 cost_fn: CostFn, *, seeds: Sequence[int], steps: int, batch: int, cfg: TrainConfig) -> None:
        self.spec, self.base_params, self.data, self.rates = spec, base_params, data, tuple(rates)
        self.cost_fn, self.seeds, self.steps, self.batch, self.cfg = cost_fn, tuple(seeds), steps, batch, cfg
        self.layers = spec.droppable_layers()
        self.points: dict[str, DSEPoint] = {}
        self.cache_hits = 0

    def variant(self, genes: Sequence[int]) -> Variant:
        keep = {n: float(self.rates[int(g)]) for n, g in zip(self.layers, genes, strict=True)}
        return canonical_variant(self.spec, keep, self.rates)

    def evaluate(self, variants: Sequence[Variant], generation: int) -> tuple[list[DSEPoint], int, int]:
        """Points for `variants` (in order); returns them with (new, cache hits) counts."""
        new: dict[str, Variant] = {}
        hits = 0
        for v in variants:
            if v.id in self.points or v.id in new:
                hits += 1
            else:
                new[v.id] = v
        if new:
            costs = self.cost_fn(self.spec, list(new.values()), self.batch)
            for vid, v in new.items():
                cost = costs.get(vid)
                if cost is None or not math.isfinite(cost) or cost <= 0:
                    raise ValueError(f"cost function returned {cost!r} for variant {vid!r}; need a positive number")
                losses = _convergence(self.spec, self.base_params, v, self.data, seeds=self.seeds,
                                      steps=self.steps, batch=self.batch, cfg=self.cfg)
                if not all(math.isfinite(loss) for loss in losses):
                    raise ValueError(f"training variant {vid!r} diverged (held-out losses {losses}); "
                                     f"lower the learning rate (now {self.cfg.optimizer} lr={self.cfg.lr})")
                self.points[vid] = DSEPoint(v, v.widths(self.spec), flops_ratio(self.spec, v), float(cost),
                                            float(np.mean(losses)), tuple(losses), generation)
        self.cache_hits += hits
        return [self.points[v.id] for v in variants], len(new), hits

    def replace_costs(self, costs: Mapping[str, float]) -> None:
        for vid, p in list(self.points.items()):
            if vid in costs:
                self.points[vid] = replace(p, cost=float(costs[vid]))

    def front(self) -> list[DSEPoint]:
        pts = list(self.points.values())
        mask = non_dominated(np.array([[p.cost, p.convergence] for p in pts]))
        return sorted((p for p, m in zip(pts, mask, strict=True) if m), key=lambda p: (p.cost, p.id))


def explore(spec: ModelSpec, base_params: Mapping[str, np.ndarray], data_x: np.ndarray, data_y: np.ndarray, *,
            rates: Sequence[float] = DEFAULT_RATES, pop_size: int = 8, generations: int = 3,
            seeds: Sequence[int] = (0, 1, 2), step_budget: int = 30, batch: int = 32,
            cost_fn: CostFn | None = None, progress: Callable[[GenerationReport], None] | None = None,
            search_seed: int = 0, train: TrainConfig = TrainConfig()) -> DSEResult:
    """NSGA-II over per-layer keep rates; returns every evaluated point and the Pareto set.

    `cost_fn` defaults to `LiteRTTrainCost(base_params)` (measured LiteRT step time); pass `flops_cost`
    for the FLOP model. `data_x` is (N, *spec.input_shape) float, `data_y` (N,) integer labels; a
    `train.holdout` fraction is held out for the convergence loss.
    """
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.core.evaluator import Evaluator
    from pymoo.core.problem import Problem
    from pymoo.operators.crossover.sbx import SBX
    from pymoo.operators.mutation.pm import PM
    from pymoo.operators.repair.rounding import RoundingRepair
    from pymoo.operators.sampling.rnd import IntegerRandomSampling
    from pymoo.problems.static import StaticProblem

    started = time.perf_counter()
    rates = tuple(float(r) for r in rates)
    if not rates or any(not 0.0 < r <= 1.0 for r in rates) or len(set(rates)) != len(rates):
        raise ValueError(f"rates {rates} must be distinct keep ratios in (0, 1]")
    if 1.0 not in rates:
        raise ValueError(f"rates {rates} must include 1.0: the full variant is the device's fallback")
    if pop_size < 2 or generations < 1 or step_budget < 1 or batch < 1 or not seeds:
        raise ValueError("need pop_size >= 2, generations >= 1, step_budget >= 1, batch >= 1 and at least one seed")
    layers = spec.droppable_layers()
    if not layers:
        raise SpecError(f"model {spec.name!r} has no droppable conv layer: nothing to explore")
    check_params(base_params, spec, None, roles=("base",))
    data = _check_data(spec, data_x, data_y, batch, train)
    if cost_fn is None:
        cost_fn = LiteRTTrainCost(base_params, seed=search_seed)
    ev = _Evaluator(spec, base_params, data, rates, cost_fn, seeds=seeds, steps=step_budget, batch=batch, cfg=train)

    problem = Problem(n_var=len(layers), n_obj=2, xl=0, xu=len(rates) - 1, vtype=int)
    algorithm = NSGA2(
        pop_size=pop_size,
        sampling=IntegerRandomSampling(),
        crossover=SBX(prob=0.9, eta=3.0, vtype=float, repair=RoundingRepair()),
        mutation=PM(prob=1.0, eta=3.0, vtype=float, repair=RoundingRepair()),
        eliminate_duplicates=True,
    )
    algorithm.setup(problem, termination=("n_gen", generations), seed=search_seed, verbose=False)
    full = full_variant(spec)
    gen = 0
    while algorithm.has_next():
        gen_started = time.perf_counter()
        pop = algorithm.ask()
        if pop is None or len(pop) == 0:  # duplicate elimination found nothing new: the space is exhausted
            break
        genes = np.rint(pop.get("X")).astype(int)
        variants = [ev.variant(g) for g in genes]
        # The fallback is evaluated with the first batch, so it shares that LiteRT build.
        extra = [full] if gen == 0 and full.id not in {v.id for v in variants} else []
        points, n_new, hits = ev.evaluate(variants + extra, gen)
        points = points[:len(variants)]
        objectives = np.array([[p.cost, p.convergence] for p in points])
        Evaluator().eval(StaticProblem(problem, F=objectives), pop)
        algorithm.tell(infills=pop)
        gen += 1
        if progress is not None:
            front = [(p.id, p.cost, p.convergence) for p in ev.front()]
            progress(GenerationReport(gen, generations, n_new, hits, len(ev.points), front,
                                      time.perf_counter() - gen_started))

    remeasure = getattr(cost_fn, "remeasure", None)
    if callable(remeasure):  # one consistent session for the reported costs (see LiteRTTrainCost)
        ev.replace_costs(remeasure())
    front_ids = [p.id for p in ev.front()]
    pareto_ids = front_ids + ([full.id] if full.id not in front_ids else [])
    pts = list(ev.points.values())
    pearson = spearman = None
    if cost_fn.runtime is not None:
        pearson, spearman = _correlations([p.cost for p in pts], [p.flops_ratio for p in pts])
    return DSEResult(
        spec=spec, rates=rates, points=pts, front_ids=front_ids, pareto_ids=pareto_ids, full_id=full.id,
        cost_runtime=cost_fn.runtime, cost_unit=cost_fn.unit, cost_flops_pearson=pearson,
        cost_flops_spearman=spearman, evaluations=len(pts), cache_hits=ev.cache_hits,
        seconds=time.perf_counter() - started,
        settings={"pop_size": pop_size, "generations": generations, "generations_run": gen, "seeds": list(seeds),
                  "step_budget": step_budget, "batch": batch, "search_seed": search_seed,
                  "optimizer": train.optimizer, "lr": train.lr, "holdout": train.holdout},
    )


# -- plot -------------------------------------------------------------------------------------------


def plot_front(result: DSEResult, path_png: str | Path) -> Path:
    """All evaluated variants vs the Pareto front (cost against convergence), labelled with ids."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a build machine
    import matplotlib.pyplot as plt

    path = Path(path_png)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    try:
        others = [p for p in result.points if p.id not in result.pareto_ids]
        ax.scatter([p.cost for p in others], [p.convergence for p in others], c="0.6", label="evaluated")
        front = sorted((result.point(v) for v in result.front_ids), key=lambda p: p.cost)
        ax.step([p.cost for p in front], [p.convergence for p in front], where="post", c="C3", lw=1.2)
        ax.scatter([p.cost for p in front], [p.convergence for p in front], c="C3", zorder=3,
                   label="Pareto front")
        if result.full_id not in result.front_ids:
            fp = result.point(result.full_id)
            ax.scatter([fp.cost], [fp.convergence], c="C0", marker="s", zorder=3, label="full (fallback)")
        for p in result.points:
            ax.annotate(p.id, (p.cost, p.convergence), textcoords="offset points", xytext=(4, 4), fontsize=7)
        runtime = f" ({result.cost_runtime})" if result.cost_runtime else ""
        ax.set_xlabel(f"training step cost{runtime} [{result.cost_unit}]")
        ax.set_ylabel(f"held-out loss after {result.settings.get('step_budget', '?')} steps")
        ax.set_title(f"DISTREAL DSE on {result.spec.name}: {result.evaluations} variants evaluated")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return path
