"""DISTREAL run-time variant choice: accuracy first — the largest variant that fits the time and memory left.

The bundle's variant table gives, per variant, the measured train-step time on each runtime class
(on the export machine), its memory footprint, its convergence score (loss after the DSE's budget;
lower is better) and, from a DSE run over several seeds, that score's spread (`convergence_std`). On the
device:

    expected step time = train_ms[runtime] / 1000 × factor[variant] / cpu_share

`cpu_share` is the currently available compute (from a `ResourceSource`); `factor` maps the export
machine's time to this device's full-speed time and is learned from observed steps
(`observe`), so neither the table nor the profile's relative_speed has to be exact. Among the Pareto
variants whose `steps_left × expected step time` fits the time left (with a safety margin) and whose
memory fits the free memory and the profile's cap, the largest wins; a smaller one only when its
convergence beats the largest's by more than both spreads (issue 10: filters are dropped when the deadline
requires it, not on a noisy estimate). If none fits, the cheapest, and the decision says so. The trainer
calls `select` every `reselect_every` steps.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .profile import DeviceProfile
from .resources import ResourceSnapshot

log = logging.getLogger("edgepatch.device.selector")


class SelectorError(ValueError):
    """A malformed variant table or an impossible request."""


@dataclass(frozen=True)
class VariantCost:
    id: str
    train_ms: dict[str, float]
    memory_bytes: int
    convergence: float
    pareto: bool
    size: float = 1.0  # flops_ratio (1 = the full model); ranks variants by expected quality
    convergence_std: float | None = None  # spread of `convergence` over DSE seeds; None = unknown


@dataclass(frozen=True)
class CandidateCost:
    """One candidate's expected cost at decision time (logged with every decision)."""

    id: str
    expected_step_s: float
    total_s: float
    memory_mb: float
    convergence: float
    factor: float


@dataclass(frozen=True)
class Decision:
    variant_id: str
    reason: str
    fits: bool  # False when no variant met the deadline/memory and the cheapest was taken instead
    expected_step_s: float
    inputs: dict[str, Any] = field(default_factory=dict)


def parse_variant_rows(rows: Sequence[Mapping[str, Any]]) -> list[VariantCost]:
    """Validate manifest variant-table rows; errors name the row and the field."""
    if not rows:
        raise SelectorError("the variant table is empty")
    parsed: list[VariantCost] = []
    seen: set[str] = set()
    for i, row in enumerate(rows):
        where = f"variant row {i} ({row.get('id', '?')!r})"
        try:
            vid = row["id"]
            train_ms = row["train_ms"]
            memory = row["memory_bytes"]
            convergence = row["convergence"]
        except KeyError as exc:
            raise SelectorError(f"{where}: missing field {exc.args[0]!r}") from None
        if not isinstance(vid, str) or not vid:
            raise SelectorError(f"{where}: id must be a non-empty string")
        if vid in seen:
            raise SelectorError(f"{where}: duplicate id")
        seen.add(vid)
        if not isinstance(train_ms, Mapping) or not train_ms:
            raise SelectorError(f"{where}: train_ms must be a non-empty {{runtime: ms}} mapping")
        for runtime, ms in train_ms.items():
            if isinstance(ms, bool) or not isinstance(ms, int | float) or not (ms > 0 and math.isfinite(ms)):
                raise SelectorError(f"{where}: train_ms[{runtime!r}] must be a positive number, got {ms!r}")
        if isinstance(memory, bool) or not isinstance(memory, int) or memory < 0:
            raise SelectorError(f"{where}: memory_bytes must be a non-negative integer, got {memory!r}")
        if convergence is None:  # exported without data (explicit --variants): no loss was measured, so
            convergence = -float(row.get("flops_ratio", 1.0))  # rank by size: the largest that fits first
        if isinstance(convergence, bool) or not isinstance(convergence, int | float) \
                or not math.isfinite(convergence):
            raise SelectorError(f"{where}: convergence must be a finite number, got {convergence!r}")
        pareto = row.get("pareto", True)
        if not isinstance(pareto, bool):
            raise SelectorError(f"{where}: pareto must be a boolean, got {pareto!r}")
        std = row.get("convergence_std")
        if std is not None and (isinstance(std, bool) or not isinstance(std, int | float)
                                or not (std >= 0 and math.isfinite(std))):
            raise SelectorError(f"{where}: convergence_std must be a non-negative number, got {std!r}")
        size = row.get("flops_ratio", 1.0)
        if isinstance(size, bool) or not isinstance(size, int | float) or not math.isfinite(size):
            raise SelectorError(f"{where}: flops_ratio must be a finite number, got {size!r}")
        parsed.append(VariantCost(vid, {str(k): float(v) for k, v in train_ms.items()}, int(memory),
                                  float(convergence), pareto, float(size), None if std is None else float(std)))
    return parsed


class VariantSelector:
    def __init__(self, variant_rows: Sequence[Mapping[str, Any]], profile: DeviceProfile,
                 reselect_every: int = 5, safety_margin: float = 0.05, factor_alpha: float = 0.3,
                 table_relative_speed: float | None = None) -> None:
        """`table_relative_speed`: speed of the machine that measured train_ms (Pi 4 = 1.0); when
        given, unobserved variants start at factor = table_relative_speed / profile.relative_speed,
        else at 1.0 until a step is observed."""
        if reselect_every < 1:
            raise SelectorError(f"reselect_every must be >= 1, got {reselect_every}")
        if not 0.0 <= safety_margin < 1.0:
            raise SelectorError(f"safety_margin must be in [0, 1), got {safety_margin}")
        if not 0.0 < factor_alpha <= 1.0:
            raise SelectorError(f"factor_alpha must be in (0, 1], got {factor_alpha}")
        self.variants = {v.id: v for v in parse_variant_rows(variant_rows)}
        pareto = [v for v in self.variants.values() if v.pareto]
        # A table without Pareto flags (e.g. hand-written) still works: every row is a candidate.
        self.candidates = pareto or list(self.variants.values())
        self.profile = profile
        self.reselect_every = reselect_every
        self.safety_margin = safety_margin
        self.factor_alpha = factor_alpha
        self.prior_factor = (table_relative_speed / profile.relative_speed) if table_relative_speed else 1.0
        self.factors: dict[str, float] = {}
        self.history: list[Decision] = []
        self._last_share: float | None = None
        self._steps_since_decision = 0

    # --- calibration ----------------------------------------------------------------------------------

    def factor(self, variant_id: str) -> float:
        """This device's full-speed time / the table's time; unobserved variants borrow the median
        of observed ones (device speed is mostly common to all variants)."""
        if variant_id in self.factors:
            return self.factors[variant_id]
        if self.factors:
            values = sorted(self.factors.values())
            return values[len(values) // 2]
        return self.prior_factor

    def observe(self, variant_id: str, seconds: float, runtime: str | None = None,
                cpu_share: float | None = None) -> None:
        """Feed one measured step time; `cpu_share` defaults to the share of the last decision."""
        if variant_id not in self.variants:
            raise SelectorError(f"observe: unknown variant {variant_id!r}")
        if not (seconds > 0 and math.isfinite(seconds)):
            raise SelectorError(f"observe: step time must be a positive number, got {seconds}")
        runtime = runtime or self.profile.runtime
        table_s = self._table_s(self.variants[variant_id], runtime)
        share = cpu_share if cpu_share is not None else (self._last_share or 1.0)
        ratio = seconds * share / table_s
        old = self.factors.get(variant_id)
        self.factors[variant_id] = ratio if old is None else \
            (1 - self.factor_alpha) * old + self.factor_alpha * ratio
        self._steps_since_decision += 1

    def due(self) -> bool:
        """True when no decision exists yet or `reselect_every` steps were observed since the last."""
        return not self.history or self._steps_since_decision >= self.reselect_every

    # --- the choice -----------------------------------------------------------------------------------

    def _accuracy_first(self, fitting: list[CandidateCost]) -> tuple[CandidateCost, str]:
        """Among variants that fit: the largest (the best expected quality) — a smaller one only when its
        convergence is clearly better, i.e. better by more than both spreads over seeds. A single noisy
        estimate (no spread in the table) never wins on quality grounds: filters are dropped only when
        the deadline requires it (issue 10)."""
        # Ties on size (a table without flops_ratio): the better-converging, then the dearer (larger) one.
        largest = max(fitting, key=lambda r: (self.variants[r.id].size, -r.convergence, r.expected_step_s))
        ref = self.variants[largest.id]

        def clearly_better(r: CandidateCost) -> bool:
            v = self.variants[r.id]
            if v.convergence_std is None or ref.convergence_std is None:
                return False
            return v.convergence + v.convergence_std < ref.convergence - ref.convergence_std

        better = [r for r in fitting if r.id != largest.id and clearly_better(r)]
        if better:
            return min(better, key=lambda r: (r.convergence, r.expected_step_s)), \
                "clearly better-converging variant (beyond the spread over seeds) that fits"
        return largest, "largest variant that fits (accuracy first)"

    @staticmethod
    def _table_s(v: VariantCost, runtime: str) -> float:
        if runtime not in v.train_ms:
            raise SelectorError(f"variant {v.id!r} has no train_ms for runtime {runtime!r} "
                                f"(has {sorted(v.train_ms)})")
        return v.train_ms[runtime] / 1000.0

    def expected_step_s(self, variant_id: str, cpu_share: float, runtime: str) -> float:
        v = self.variants[variant_id]
        return self._table_s(v, runtime) * self.factor(variant_id) / max(cpu_share, 1e-6)

    def select(self, time_left_s: float, steps_left: int, snapshot: ResourceSnapshot,
               runtime: str | None = None) -> Decision:
        runtime = runtime or self.profile.runtime
        if steps_left < 0:
            raise SelectorError(f"steps_left must be >= 0, got {steps_left}")
        budgets = self.profile.budgets
        memory_limit_mb = min(snapshot.free_memory_mb, float(budgets.memory_cap_mb))
        usable_s = max(0.0, time_left_s) * (1.0 - self.safety_margin)
        rows: list[CandidateCost] = []
        for v in self.candidates:
            step_s = self.expected_step_s(v.id, snapshot.cpu_share, runtime)
            rows.append(CandidateCost(v.id, step_s, step_s * steps_left, v.memory_bytes / 2**20,
                                      v.convergence, self.factor(v.id)))

        def cost(r: CandidateCost) -> tuple[float, float]:
            return (r.expected_step_s, r.memory_mb)

        cheapest = min(rows, key=cost)
        memory_ok = [r for r in rows if r.memory_mb <= memory_limit_mb]
        fitting = [r for r in memory_ok if r.total_s <= usable_s]

        battery_low = snapshot.battery_pct is not None and snapshot.battery_pct < budgets.min_battery_pct
        too_hot = snapshot.temp_c is not None and snapshot.temp_c > budgets.max_temp_c
        if battery_low or too_hot:
            choice = min(memory_ok or rows, key=cost)
            what = (f"battery {snapshot.battery_pct:.0f}% < {budgets.min_battery_pct:.0f}%" if battery_low
                    else f"temperature {snapshot.temp_c:.1f} °C > {budgets.max_temp_c:.1f} °C")
            reason, fits = f"{what}: cheapest variant to save energy and heat", choice in fitting
        elif fitting:
            choice, why = self._accuracy_first(fitting)
            reason, fits = (f"{why}: {steps_left} steps × "
                            f"{choice.expected_step_s * 1000:.1f} ms = {choice.total_s:.2f} s "
                            f"<= {usable_s:.2f} s usable, {choice.memory_mb:.1f} MB <= "
                            f"{memory_limit_mb:.1f} MB"), True
        elif memory_ok:
            choice = min(memory_ok, key=cost)
            reason, fits = (f"no variant fits the deadline ({steps_left} steps in {usable_s:.2f} s usable); "
                            f"taking the cheapest, expected {choice.total_s:.2f} s"), False
        else:
            choice = min(rows, key=lambda r: r.memory_mb)
            reason, fits = (f"no variant fits in memory ({memory_limit_mb:.1f} MB available); "
                            f"taking the smallest ({choice.memory_mb:.1f} MB)"), False

        inputs: dict[str, Any] = {
            "time_left_s": time_left_s, "steps_left": steps_left, "runtime": runtime,
            "cpu_share": snapshot.cpu_share, "free_memory_mb": snapshot.free_memory_mb,
            "memory_limit_mb": memory_limit_mb, "battery_pct": snapshot.battery_pct,
            "temp_c": snapshot.temp_c, "snapshot_time": snapshot.time, "safety_margin": self.safety_margin,
            "candidates": [asdict(r) for r in rows], "cheapest": cheapest.id,
        }
        decision = Decision(choice.id, reason, fits, choice.expected_step_s, inputs)
        self.history.append(decision)
        self._last_share = snapshot.cpu_share
        self._steps_since_decision = 0
        record = {"event": "variant_decision", "variant": decision.variant_id, "fits": fits,
                  "reason": reason, "inputs": inputs}
        # DEBUG: a decision is multi-kB and taken every few steps; the round summary says what was chosen.
        log.log(logging.DEBUG, "selector decision %s",
                json.dumps(record, default=str), extra={"decision": record})
        return decision
