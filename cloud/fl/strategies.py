"""FL strategies behind one Flower-style interface: `configure_round` says how each device trains,
`aggregate` folds the updates into the new global weights. Adding a strategy = one class + `register`.

Every strategy aggregates the same way (PAPERS.md §2): a sample-weighted average of the devices'
deltas, normalized per parameter entry by the weight of the devices that touched it (count-normalized
masked averaging), so entries a sub-network never trained keep their global value instead of being
pulled towards zero. For full-model strategies this is exactly FedAvg.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from edgepatch.protocol.fl import Assignment, FlJoin
from edgepatch.protocol.manifest import VariantRow
from edgepatch.protocol.model_spec import ModelSpec
from edgepatch.protocol.params import Params


class StrategyError(ValueError):
    """An unknown strategy or options that do not fit the bundle's variants."""


@dataclass(frozen=True)
class ClientUpdate:
    device_id: str
    num_samples: int
    delta: Params  # new − global, zero where untouched
    touched: Mapping[str, np.ndarray]  # 1.0 where touched


@dataclass(frozen=True)
class RoundPlan:
    default: Assignment
    assignments: dict[str, Assignment]
    uses_deadline: bool  # False: the server waits for every device (no deadline in the round-open)


def count_normalized_average(global_params: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate]) -> Params:
    """global + Σ nᵢ·Δᵢ / Σ nᵢ·maskᵢ per entry (entries nobody touched keep the global value)."""
    new: Params = {}
    for name, value in global_params.items():
        num = np.zeros(value.shape, np.float64)
        den = np.zeros(value.shape, np.float64)
        for u in updates:
            num += u.num_samples * u.delta[name]
            den += u.num_samples * u.touched[name]
        step = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
        new[name] = (value + step).astype(np.float32)
    return new


class Strategy:
    """Base: a full model for everyone, deadline on; subclasses override what differs."""

    name = "base"
    uses_deadline = True
    kept = "first"

    def __init__(self, spec: ModelSpec, rows: Sequence[VariantRow], seed: int = 0,
                 small_keep: float = 0.5, dropout_keep: float = 0.5) -> None:
        if not rows:
            raise StrategyError("the bundle has no variants")
        self.spec = spec
        self.rows = list(rows)
        self.rng = np.random.default_rng([seed, 0xF1])
        full_id = next((r.id for r in rows if r.variant.is_full(spec)), None)
        if full_id is None:
            raise StrategyError("the bundle has no full-width variant (keep ratio 1 everywhere)")
        self.full_id: str = full_id
        self.uniform_keep = {r.id: min(r.keep.values()) if r.keep else 1.0 for r in rows}
        self.small_keep = small_keep
        self.dropout_keep = dropout_keep

    def closest_variant(self, keep: float, what: str) -> str:
        best = min(self.rows, key=lambda r: abs(self.uniform_keep[r.id] - keep))
        if abs(self.uniform_keep[best.id] - keep) > 0.13:
            raise StrategyError(f"{what}={keep}: no variant near it in {sorted(self.uniform_keep.values())}; "
                                "export the bundle with that keep ratio")
        return best.id

    def configure_round(self, rnd: int, devices: Mapping[str, FlJoin]) -> RoundPlan:
        return RoundPlan(Assignment(self.full_id, "first"), {}, self.uses_deadline)

    def aggregate(self, rnd: int, global_params: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate]
                  ) -> Params:
        if not updates:
            return {k: np.array(v) for k, v in global_params.items()}
        return count_normalized_average(global_params, updates)

    def eval_variant(self) -> str:
        """The (first-kept) variant the global model is evaluated as."""
        return self.full_id


class Distreal(Strategy):
    """Each device picks its Pareto variant itself (selector, re-decided as load changes); random kept
    sets per batch; deadline on."""

    name = "distreal"

    def configure_round(self, rnd: int, devices: Mapping[str, FlJoin]) -> RoundPlan:
        return RoundPlan(Assignment(None, "random"), {}, True)


class FedAvgWait(Strategy):
    name = "fedavg-wait"
    uses_deadline = False


class FedAvgDrop(Strategy):
    name = "fedavg-drop"


class SmallModel(Strategy):
    """The same smaller sub-network (first filters) on every device; the global model is that small model."""

    name = "small-model"

    def configure_round(self, rnd: int, devices: Mapping[str, FlJoin]) -> RoundPlan:
        return RoundPlan(Assignment(self.closest_variant(self.small_keep, "small_keep"), "first"), {}, True)

    def eval_variant(self) -> str:
        return self.closest_variant(self.small_keep, "small_keep")


class FederatedDropout(Strategy):
    """Caldas et al.: the server assigns each device a random sub-model (one kept set per round)."""

    name = "federated-dropout"

    def configure_round(self, rnd: int, devices: Mapping[str, FlJoin]) -> RoundPlan:
        vid = self.closest_variant(self.dropout_keep, "dropout_keep")
        assignments = {d: Assignment(vid, "fixed", int(self.rng.integers(2**31))) for d in sorted(devices)}
        return RoundPlan(Assignment(self.full_id, "first"), assignments, True)


class FjORD(Strategy):
    """Ordered dropout (FjORD / HeteroFL): nested widths (first filters); each device samples a width per
    batch up to its tier's maximum, tiers by the devices' advertised speed (slowest → narrowest)."""

    name = "fjord"

    def configure_round(self, rnd: int, devices: Mapping[str, FlJoin]) -> RoundPlan:
        levels = sorted(set(self.uniform_keep.values()))
        order = sorted(devices, key=lambda d: devices[d].relative_speed)
        assignments = {}
        for rank, dev in enumerate(order):
            tier = min(len(levels) - 1, rank * len(levels) // max(1, len(order)))
            assignments[dev] = Assignment(None, "first", None, levels[tier])
        return RoundPlan(Assignment(None, "first", None, 1.0), assignments, True)


STRATEGIES: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    STRATEGIES[cls.name] = cls
    return cls


for _cls in (Distreal, FedAvgWait, FedAvgDrop, SmallModel, FederatedDropout, FjORD):
    register(_cls)


def make_strategy(name: str, spec: ModelSpec, rows: Sequence[VariantRow], seed: int = 0, **options: float
                  ) -> Strategy:
    if name not in STRATEGIES:
        raise StrategyError(f"unknown strategy {name!r}; choose from {', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[name](spec, rows, seed, **options)
