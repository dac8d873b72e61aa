"""PatchTrainer: trains φ (and only φ) on the device's own data, resource-aware and crash-safe.

Per step: re-decide the variant every few steps (DISTREAL selector), draw a fresh kept filter set and
gather the small network's frozen weights, take one Adam step on φ on the engine, then commit φ,
the Adam slots and the step counter atomically — a power cut loses at most the step in flight.
Data is split by time: the newest `holdout_fraction` is held out (train on older, test on newer), and
batches come from a replay window of the most recent `replay_window` training samples.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgepatch.protocol.bundle import Bundle
from edgepatch.protocol.model_spec import param_infos
from edgepatch.protocol.variants import sample_kept, slice_params

from .engine import Engine, predict_logits
from .resources import Clock, RealClock, ResourceSource
from .selector import Decision, VariantSelector
from .state import DeviceState, DeviceStateStore

log = logging.getLogger("edgepatch.device.trainer")


class DataError(ValueError):
    """Local data that cannot train this bundle's model."""


@dataclass(frozen=True)
class LocalData:
    """The device's samples, time-ordered, split into older training data and a newer holdout."""

    train_x: np.ndarray
    train_y: np.ndarray
    holdout_x: np.ndarray
    holdout_y: np.ndarray

    @classmethod
    def split(cls, x: np.ndarray, y: np.ndarray, t: np.ndarray, holdout_fraction: float = 0.25) -> LocalData:
        if len(x) != len(y) or len(x) != len(t):
            raise DataError(f"x, y, t lengths differ: {len(x)}, {len(y)}, {len(t)}")
        if len(x) < 2:
            raise DataError(f"need at least 2 samples, got {len(x)}")
        order = np.argsort(t, kind="stable")
        n_hold = min(len(x) - 1, max(1, int(round(holdout_fraction * len(x)))))
        train, hold = order[:-n_hold], order[-n_hold:]
        return cls(x[train].astype(np.float32), y[train].astype(np.int32),
                   x[hold].astype(np.float32), y[hold].astype(np.int32))


@dataclass
class RoundReport:
    steps: int = 0
    seconds: float = 0.0
    deadline_s: float | None = None
    met_deadline: bool = True
    losses: list[float] = field(default_factory=list)
    variants: list[str] = field(default_factory=list)  # variant of each step
    decisions: list[Decision] = field(default_factory=list)
    holdout_acc_before: float | None = None
    holdout_acc_after: float | None = None

    def summary(self) -> dict[str, Any]:
        return {"steps": self.steps, "seconds": round(self.seconds, 3), "met_deadline": self.met_deadline,
                "loss_first": self.losses[0] if self.losses else None,
                "loss_last": self.losses[-1] if self.losses else None,
                "variants": sorted(set(self.variants)), "holdout_acc_before": self.holdout_acc_before,
                "holdout_acc_after": self.holdout_acc_after}


class PatchTrainer:
    def __init__(self, bundle: Bundle, engine: Engine, store: DeviceStateStore, data: LocalData, *,
                 selector: VariantSelector | None = None, resources: ResourceSource | None = None,
                 clock: Clock | None = None, replay_window: int = 512, seed: int = 0,
                 variant_id: str | None = None, emulate_share: bool = False) -> None:
        """`emulate_share`: sleep after each step so it lasts step_time / cpu_share — a traced
        resource source then really slows training (simulation and benchmarks, never on a device)."""
        manifest = bundle.manifest
        expected = tuple(manifest.input.shape)
        if tuple(data.train_x.shape[1:]) != expected:
            raise DataError(f"local data has sample shape {tuple(data.train_x.shape[1:])}; "
                            f"bundle {manifest.model_id} expects {expected}")
        for name, labels in (("train", data.train_y), ("holdout", data.holdout_y)):
            if len(labels) and (labels.min() < 0 or labels.max() >= manifest.labels.num_classes):
                raise DataError(f"{name} labels outside [0, {manifest.labels.num_classes})")
        self.bundle, self.engine, self.store, self.data = bundle, engine, store, data
        self.selector, self.resources = selector, resources
        self.clock = clock or RealClock()
        self.spec, self.patch = manifest.model, manifest.patch
        self.batch, self.lr = manifest.train.batch, manifest.train.phi_lr
        self.replay_window = max(self.batch, replay_window)
        self.params = bundle.all_params()
        self.infos = param_infos(self.spec, self.patch)
        self.rng = np.random.default_rng(seed)
        self.fixed_variant = variant_id
        self.emulate_share = emulate_share
        self.state = self._resume()

    # -- state -----------------------------------------------------------------------------------
    def _resume(self) -> DeviceState:
        """The last committed state if it belongs to this bundle's patch layout, else a fresh φ = 0."""
        k = self.patch.k
        state = self.store.load()
        if state is not None and state.phi.shape == (k,):
            if state.base_version != self.bundle.base_version:
                log.info("bundle changed (%s -> %s): keeping φ, resetting the optimizer",
                         state.base_version[:12], self.bundle.base_version[:12])
                zeros = np.zeros(k, np.float32)
                state = DeviceState(state.phi, zeros, zeros.copy(), state.step, self.bundle.base_version,
                                    state.variant_id, state.replay_cursor, state.metrics)
            return state
        if state is not None:
            log.warning("stored φ has shape %s, this bundle needs (%d,): starting from φ = 0", state.phi.shape, k)
        zeros = np.zeros(k, np.float32)
        return DeviceState(zeros, zeros.copy(), zeros.copy(), 0, self.bundle.base_version, self._full_id())

    def _full_id(self) -> str:
        for row in self.bundle.manifest.variants:
            if row.variant.is_full(self.spec):
                return row.id
        return self.bundle.manifest.variants[0].id

    @property
    def phi(self) -> np.ndarray:
        return self.state.phi

    # -- training --------------------------------------------------------------------------------
    def _batch(self) -> tuple[np.ndarray, np.ndarray]:
        n = len(self.data.train_x)
        if n == 0:
            raise DataError("no training samples")
        window = np.arange(max(0, n - self.replay_window), n)
        idx = self.rng.choice(window, size=self.batch, replace=len(window) < self.batch)
        return self.data.train_x[idx], self.data.train_y[idx]

    def _choose(self, report: RoundReport, deadline_at: float | None, steps_left: int) -> str:
        if self.fixed_variant is not None or self.selector is None or self.resources is None:
            return self.fixed_variant or self.state.variant_id or self._full_id()
        if not self.selector.due():
            return report.variants[-1] if report.variants else self.state.variant_id
        time_left = (deadline_at - self.clock.now()) if deadline_at is not None else float("inf")
        decision = self.selector.select(time_left, steps_left, self.resources.snapshot(), self.engine.runtime)
        report.decisions.append(decision)
        log.debug("variant %s (%s)", decision.variant_id, decision.reason)
        return decision.variant_id

    def step(self, variant_id: str) -> float:
        """One φ step on the engine (LiteRT or ExecuTorch) on a fresh kept set, committed atomically."""
        variant = self.bundle.variant(variant_id)
        kept = sample_kept(self.spec, variant, self.rng)
        sliced = slice_params(self.params, self.infos, kept)
        x, y = self._batch()
        s = self.state
        loss, phi, m, v = self.engine.phi_step(variant_id, x, y, s.phi, s.m, s.v, float(s.step), self.lr, sliced)
        if not np.isfinite(loss) or not np.all(np.isfinite(phi)):
            raise FloatingPointError(f"step {s.step}: loss {loss} — not committing a diverged φ")
        self.state = DeviceState(phi.astype(np.float32), m.astype(np.float32), v.astype(np.float32), s.step + 1,
                                 self.bundle.base_version, variant_id, s.replay_cursor,
                                 {**s.metrics, "loss": float(loss)})
        self.store.commit(self.state)
        return float(loss)

    def train_round(self, steps: int, deadline_s: float | None = None,
                    on_step: Callable[[int, float, str], None] | None = None) -> RoundReport:
        """Up to `steps` steps; with a deadline the selector keeps the round inside it."""
        report = RoundReport(deadline_s=deadline_s)
        start = self.clock.now()
        deadline_at = start + deadline_s if deadline_s is not None else None
        for i in range(steps):
            vid = self._choose(report, deadline_at, steps - i)
            t0 = time.perf_counter()
            loss = self.step(vid)
            elapsed = time.perf_counter() - t0
            if self.emulate_share and self.resources is not None:
                share = self.resources.snapshot().cpu_share
                self.clock.sleep(elapsed * (1.0 / max(share, 1e-3) - 1.0))
                elapsed = time.perf_counter() - t0
            if self.selector is not None and self.resources is not None:
                self.resources.record_step(vid, elapsed)
                self.selector.observe(vid, elapsed, self.engine.runtime)
            report.steps += 1
            report.losses.append(loss)
            report.variants.append(vid)
            if on_step is not None:
                on_step(i + 1, loss, vid)
        report.seconds = self.clock.now() - start
        report.met_deadline = deadline_s is None or report.seconds <= deadline_s
        return report

    # -- evaluation ------------------------------------------------------------------------------
    def predict(self, x: np.ndarray, phi: np.ndarray | None = None) -> np.ndarray:
        return predict_logits(self.engine, np.ascontiguousarray(x, dtype=np.float32),
                              self.state.phi if phi is None else phi)

    def holdout_accuracy(self, phi: np.ndarray | None = None) -> float:
        if len(self.data.holdout_x) == 0:
            return float("nan")
        pred = self.predict(self.data.holdout_x, phi).argmax(axis=1)
        return float((pred == self.data.holdout_y).mean())
