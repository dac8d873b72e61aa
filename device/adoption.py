"""Adoption gate: a new bundle replaces the active one only when it does not make this device worse.

A verified candidate is staged beside the active bundle (never switched to directly). φ is shadow-fitted
on it — from the device's current φ, a bounded number of steps — in its own state directory, while the
active bundle, its trainer and its φ stay untouched and keep serving predictions. Then three options are
scored on the device's own holdout, each as it would be served (φ only where it beats φ = 0):

    active bundle + φ      new bundle + old φ      new bundle + re-fitted φ

The device switches only when the best new option is not worse than the active one by more than the
tolerance (default: one holdout sample); otherwise it keeps the active bundle and reports
`update_rejected` with the three numbers.

Crash safety: everything lives under `state_dir/adoption/`. The staged candidate has its own
ActiveBundleStore, the shadow φ its own DeviceStateStore (one atomic commit per step; the step counter is
the resume point), and a decision is written atomically to `decision.json` *before* it is applied. Applying
is idempotent (install the candidate, commit the chosen φ, clear the staging area), so a SIGKILL at any
moment resumes either the shadow fit or the application of a decision, never a half-switched device.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from edgepatch.protocol.bundle import ActiveBundleStore, Bundle
from edgepatch.protocol.params import write_atomic

from .engine import open_engine
from .state import DeviceState, DeviceStateStore
from .trainer import LocalData, PatchTrainer

log = logging.getLogger("edgepatch.device.adoption")


@dataclass(frozen=True)
class GateSettings:
    enabled: bool = True
    shadow_steps: int = 60  # bounded shadow fit of φ on a candidate bundle
    tolerance_samples: float = 1.0  # a new option may be worse by at most this many holdout samples
    rollback_keep_s: float = 24 * 3600.0  # the previous bundle stays on disk this long after a switch


@dataclass(frozen=True)
class GateDecision:
    version: str
    adopt: bool
    phi_choice: str  # "refit" | "old" (which φ goes with the new bundle); "" when rejected
    acc_active: float
    acc_new_old_phi: float
    acc_new_refit: float
    holdout_n: int
    shadow_steps: int

    def metrics(self) -> dict[str, float]:
        """The metrics message a device publishes after a gate decision (names match METRIC_NAME)."""
        return {"update_adopted": float(self.adopt), "update_rejected": float(not self.adopt),
                "gate_acc_active": self.acc_active, "gate_acc_new_old_phi": self.acc_new_old_phi,
                "gate_acc_new_refit": self.acc_new_refit, "gate_holdout_n": float(self.holdout_n)}


def served_accuracy(trainer: PatchTrainer, phi: np.ndarray | None) -> float:
    """Holdout accuracy as served: φ is used only while it beats φ = 0 (see `served_phi`)."""
    zero = trainer.holdout_accuracy(np.zeros(trainer.patch.k, np.float32))
    if phi is None or phi.shape != (trainer.patch.k,):
        return _nan_to_zero(zero)
    return _nan_to_zero(max(trainer.holdout_accuracy(phi), zero))


def served_phi(trainer: PatchTrainer) -> np.ndarray:
    """The φ predictions use: the trained one only while it beats φ = 0 on the holdout (ties keep φ)."""
    zero = np.zeros_like(trainer.phi)
    if len(trainer.data.holdout_x) == 0:
        return trainer.phi
    return trainer.phi if trainer.holdout_accuracy() >= trainer.holdout_accuracy(zero) else zero


def _nan_to_zero(x: float) -> float:
    return 0.0 if np.isnan(x) else float(x)


class AdoptionGate:
    """Stages, shadow-fits, scores and (maybe) applies candidate bundles for one device."""

    def __init__(self, state_dir: Path, settings: GateSettings, runtime: str, threads: int | None,
                 seed: int = 0) -> None:
        self.dir = Path(state_dir) / "adoption"
        self.settings, self.runtime, self.threads, self.seed = settings, runtime, threads, seed
        self.candidates = ActiveBundleStore(self.dir / "candidate", keep=1)
        self.shadow_store = DeviceStateStore(self.dir / "shadow")
        self.last: GateDecision | None = None
        self.decided = 0  # decisions applied by this process (callers notice a new one)

    # -- bookkeeping files --------------------------------------------------------------------------
    def _read_json(self, name: str) -> Any:
        path = self.dir / name
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            log.warning("%s unreadable (%s); ignoring it", path, exc)
            return None

    def _write_json(self, name: str, obj: Any) -> None:
        write_atomic(self.dir / name, (json.dumps(obj, indent=2) + "\n").encode())

    def rejected_versions(self) -> list[str]:
        data = self._read_json("rejected.json")
        return [v for v in data if isinstance(v, str)] if isinstance(data, list) else []

    def pending_version(self) -> str | None:
        return self.candidates.current_version()

    def _clear_staging(self) -> None:
        shutil.rmtree(self.dir / "candidate", ignore_errors=True)
        shutil.rmtree(self.dir / "shadow", ignore_errors=True)
        (self.dir / "decision.json").unlink(missing_ok=True)

    # -- the gate -----------------------------------------------------------------------------------
    def stage(self, candidate_path: Path, expected_version: str) -> Bundle:
        """Verify and copy a fetched candidate into the staging store (a new one replaces an older one)."""
        if self.pending_version() not in (None, expected_version):
            self._clear_staging()
        return self.candidates.install(candidate_path, expected_version=expected_version)

    def evaluate(self, active: PatchTrainer, data_for: Any) -> GateDecision:
        """Shadow-fit φ on the staged candidate (resuming a fit a crash cut short), score the three options,
        and record the decision atomically. `data_for(bundle)` loads this device's data for a bundle."""
        candidate = self.candidates.current()
        if candidate is None:
            raise RuntimeError("no staged candidate to evaluate")
        data: LocalData = data_for(candidate)
        engine = open_engine(candidate, self.runtime, self.threads)
        shadow = PatchTrainer(candidate, engine, self.shadow_store, data, seed=self.seed + 7919)
        old_phi = active.phi if active.phi.shape == (candidate.manifest.patch.k,) else None
        if self.shadow_store.load() is None:  # a fresh fit starts from the device's current φ
            start = np.zeros(candidate.manifest.patch.k, np.float32) if old_phi is None else old_phi.copy()
            shadow.state = DeviceState(start, np.zeros_like(start), np.zeros_like(start), 0,
                                       candidate.base_version, shadow.state.variant_id)
            self.shadow_store.commit(shadow.state)
        left = max(0, self.settings.shadow_steps - shadow.state.step)
        for _ in range(left):  # one atomic commit per step: a kill resumes from the last one
            shadow.step(shadow.state.variant_id)
        n = len(data.holdout_x)
        acc_active = served_accuracy(active, active.phi)
        acc_old = served_accuracy(shadow, old_phi)
        acc_refit = served_accuracy(shadow, shadow.phi)
        tolerance = self.settings.tolerance_samples / max(1, n)
        best = max(acc_old, acc_refit)
        adopt = best >= acc_active - tolerance - 1e-9
        choice = ("refit" if acc_refit >= acc_old else "old") if adopt else ""
        decision = GateDecision(candidate.version, adopt, choice, acc_active, acc_old, acc_refit, n,
                                shadow.state.step)
        self._write_json("decision.json", asdict(decision))  # durable before anything is switched
        engine_close = getattr(engine, "close", None)
        if callable(engine_close):
            engine_close()
        log.info("gate %s bundle %s: active %.3f, new+old φ %.3f, new+refit φ %.3f (holdout %d, tol %.3f)",
                 "adopts" if adopt else "rejects", candidate.version[:12], acc_active, acc_old, acc_refit, n,
                 tolerance)
        return decision

    def apply(self, bundles: ActiveBundleStore, main_store: DeviceStateStore) -> GateDecision | None:
        """Carry out a recorded decision (idempotent; also the crash-recovery path). None = nothing pending."""
        raw = self._read_json("decision.json")
        if not isinstance(raw, dict):
            return None
        decision = GateDecision(**raw)
        if decision.adopt:
            candidate = self.candidates.current()
            if candidate is not None and bundles.current_version() != decision.version:
                bundles.install(candidate.root, expected_version=decision.version)
            new = bundles.current()
            assert new is not None and new.version == decision.version
            self._commit_phi(decision, new, main_store)
        else:
            rejected = self.rejected_versions()
            if decision.version not in rejected:
                self._write_json("rejected.json", (rejected + [decision.version])[-32:])
        self._clear_staging()
        self.last = decision
        self.decided += 1
        return decision

    def _commit_phi(self, decision: GateDecision, new: Bundle, main_store: DeviceStateStore) -> None:
        current = main_store.load()
        if current is not None and current.metrics.get("adopted_bundle") == decision.version:
            return  # already committed before a crash (a same-weights bundle shares the base version)
        k = new.manifest.patch.k
        if decision.phi_choice == "refit" and (shadow := self.shadow_store.load()) is not None:
            phi = shadow.phi
        elif current is not None and current.phi.shape == (k,):
            phi = current.phi
        else:
            phi = np.zeros(k, np.float32)
        zeros = np.zeros_like(phi)
        step = current.step if current is not None else 0
        variant = current.variant_id if current is not None else ""
        main_store.commit(DeviceState(phi, zeros, zeros.copy(), step, new.base_version, variant,
                                      current.replay_cursor if current is not None else 0,
                                      {**(current.metrics if current is not None else {}),
                                       "adopted_bundle": decision.version}))

    # -- rollback retention ---------------------------------------------------------------------------
    def prune_rollback(self, bundles: ActiveBundleStore, now: float | None = None) -> bool:
        """Drop older bundles once the active one has been active for `rollback_keep_s`. True = pruned."""
        pointer = bundles._pointer()  # the store's own pointer file: when the active bundle was installed
        history, installed = pointer.get("history", []), pointer.get("installed")
        if len(history) < 2 or not isinstance(installed, str):
            return False
        age = (now if now is not None else time.time()) - datetime.fromisoformat(installed).timestamp()
        if age < self.settings.rollback_keep_s:
            return False
        bundles._prune({history[0]})
        pointer["history"] = history[:1]
        write_atomic(bundles.root / bundles.POINTER, (json.dumps(pointer, indent=2) + "\n").encode())
        return True

