"""Cloud gate and staged rollout of distilled bundles: never ship an update that makes the fleet worse.

1. Cloud gate: a distilled base is scored against the current base on a held-out split of the companion's
   own labelled data (`cloud serve --data`; that split is never used for distillation). A new base worse by
   more than one held-out sample is not announced at all.
2. Canary stage: the bundle is announced only to a canary group (default 10 % of the known devices, at
   least 2) — the announcement's `targets` names them; every other device ignores it.
3. Verdict: each canary's adoption gate (device/adoption.py) reports `update_adopted`/`update_rejected` and
   its three holdout accuracies on the metrics channel. The bundle is promoted to the fleet (announced with
   no targets) only when every canary reported and none saw a regression; otherwise it is withdrawn: the
   current base is announced again and stays the fleet's bundle.
Every decision is kept in `RolloutLog` with its numbers (the fleet page shows it) and counted on /metrics.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger("edgepatch.cloud.rollout")

GATE_METRICS = ("update_adopted", "update_rejected", "gate_acc_active", "gate_acc_new_old_phi",
                "gate_acc_new_refit")


@dataclass(frozen=True)
class RolloutSettings:
    heldout_fraction: float = 0.2  # of the companion's labelled data, kept out of distillation for the gate
    tolerance_samples: float = 1.0  # a new base may be worse by at most this many held-out samples
    canary_fraction: float = 0.1
    canary_min: int = 2
    canary_timeout_s: float = 300.0  # canaries that have not reported by then count as a regression
    seed: int = 0


def split_heldout(x: np.ndarray, y: np.ndarray, fraction: float, seed: int = 0
                  ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """(train, held-out), stratified by nothing but a seeded permutation; at least one held-out sample."""
    if len(x) != len(y):
        raise ValueError(f"x and y lengths differ: {len(x)} vs {len(y)}")
    if len(x) < 2:
        raise ValueError(f"need at least 2 labelled samples to hold some out, got {len(x)}")
    order = np.random.default_rng(seed).permutation(len(x))
    n_hold = min(len(x) - 1, max(1, int(round(fraction * len(x)))))
    hold, train = order[:n_hold], order[n_hold:]
    return (x[train], y[train]), (x[hold], y[hold])


@dataclass(frozen=True)
class CloudGateResult:
    acc_current: float
    acc_candidate: float
    heldout_n: int
    passed: bool

    def numbers(self) -> dict[str, Any]:
        return {"acc_current": round(self.acc_current, 4), "acc_candidate": round(self.acc_candidate, 4),
                "heldout_n": self.heldout_n}


def cloud_gate(logits_current: np.ndarray, logits_candidate: np.ndarray, y: np.ndarray,
               tolerance_samples: float = 1.0) -> CloudGateResult:
    """Pass when the candidate's held-out accuracy is not below the current one by more than the tolerance."""
    n = len(y)
    if n == 0:
        raise ValueError("the cloud gate needs held-out samples")
    acc_cur = float((logits_current.argmax(1) == y).mean())
    acc_new = float((logits_candidate.argmax(1) == y).mean())
    return CloudGateResult(acc_cur, acc_new, n, acc_new >= acc_cur - tolerance_samples / n - 1e-9)


def base_logits(spec: Any, params: Mapping[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """f(x; W) of a base without any patch (φ = 0 is the fleet's common ground)."""
    import torch

    from edgepatch.export.torch_model import forward, to_tensors

    with torch.no_grad():
        return forward(spec, None, to_tensors(params), torch.from_numpy(np.asarray(x, np.float32))).numpy()


def choose_canaries(device_ids: Sequence[str], fraction: float = 0.1, minimum: int = 2, seed: int = 0
                    ) -> tuple[str, ...]:
    """A seeded sample of ceil(fraction · n) devices, at least `minimum` (all of them in a tiny fleet)."""
    ids = sorted(set(device_ids))
    count = min(len(ids), max(minimum, math.ceil(fraction * len(ids))))
    order = np.random.default_rng(seed).permutation(len(ids))
    return tuple(sorted(ids[i] for i in order[:count]))


@dataclass(frozen=True)
class CanaryReport:
    device_id: str
    adopted: bool
    acc_active: float
    acc_best_new: float


def canary_reports(metric_values: Callable[[str, str], list[tuple[float, float]]], canaries: Sequence[str],
                   since: float) -> dict[str, CanaryReport]:
    """The newest gate report of each canary sent after `since` (store.metric_values(device, name))."""
    out: dict[str, CanaryReport] = {}
    for device in canaries:
        latest: dict[str, float] = {}
        for name in GATE_METRICS:
            values = [v for t, v in metric_values(device, name) if t >= since]
            if values:
                latest[name] = values[-1]
        if "update_adopted" in latest and "update_rejected" in latest:
            out[device] = CanaryReport(device, latest["update_adopted"] >= 0.5, latest.get("gate_acc_active", 0.0),
                                       max(latest.get("gate_acc_new_old_phi", 0.0),
                                           latest.get("gate_acc_new_refit", 0.0)))
    return out


def canary_verdict(reports: Mapping[str, CanaryReport], canaries: Sequence[str], timed_out: bool) -> str:
    """'promote' (all reported, none rejected), 'withdraw' (any rejected, or silence past the timeout),
    or 'waiting'."""
    if any(not r.adopted for r in reports.values()):
        return "withdraw"
    if all(c in reports for c in canaries):
        return "promote"
    return "withdraw" if timed_out else "waiting"


@dataclass
class RolloutLog:
    """Every rollout decision with its numbers, newest last (the fleet page and the tests read it)."""

    entries: list[dict[str, Any]] = field(default_factory=list)

    def record(self, stage: str, decision: str, version: str, **numbers: Any) -> dict[str, Any]:
        entry = {"t": round(time.time(), 3), "stage": stage, "decision": decision, "bundle": version, **numbers}
        self.entries.append(entry)
        log.info("rollout %s: %s bundle %s %s", stage, decision, version[:12], numbers)
        return entry

    def latest(self, version: str | None = None) -> dict[str, Any] | None:
        for entry in reversed(self.entries):
            if version is None or entry["bundle"] == version:
                return entry
        return None


def wait_for_canaries(metric_values: Callable[[str, str], list[tuple[float, float]]], canaries: Sequence[str],
                      since: float, timeout_s: float, stop: Callable[[], bool] = lambda: False,
                      poll_s: float = 0.5) -> tuple[str, dict[str, CanaryReport]]:
    """Poll the store until the canaries' verdict is in (or the timeout makes silence a regression)."""
    deadline = time.monotonic() + timeout_s
    while True:
        reports = canary_reports(metric_values, canaries, since)
        verdict = canary_verdict(reports, canaries, timed_out=time.monotonic() >= deadline or stop())
        if verdict != "waiting":
            return verdict, reports
        time.sleep(poll_s)


class RolloutMetrics:
    """Rollout counters on the companion's registry (/metrics): decisions by stage and outcome."""

    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter

        self.decisions = Counter("edgepatch_rollout_decisions", "Rollout decisions on distilled bundles, by stage "
                                 "(cloud_gate, canary) and decision (pass, reject, promote, withdraw)",
                                 ["stage", "decision"], registry=registry)
        self.device_rejections = Counter("edgepatch_rollout_canary_rejections", "Canary devices whose adoption "
                                         "gate rejected a bundle", registry=registry)


class StagedRollout:
    """Cloud gate -> canaries -> promote or withdraw, for one companion.

    `publish(bundle_dir, targets)` announces a bundle (targets = () for the whole fleet) and makes it the
    companion's current one; `devices()` lists the fleet's known device ids; `metric_values(device, name)`
    reads stored metrics as (t, value)."""

    def __init__(self, settings: RolloutSettings, publish: Callable[..., Any], devices: Callable[[], list[str]],
                 metric_values: Callable[[str, str], list[tuple[float, float]]], registry: Any,
                 heldout: tuple[np.ndarray, np.ndarray] | None, stop: Callable[[], bool] = lambda: False) -> None:
        self.settings, self.publish, self.devices, self.metric_values = settings, publish, devices, metric_values
        self.heldout, self.stop = heldout, stop
        self.log = RolloutLog()
        self.metrics = RolloutMetrics(registry)

    def _decide(self, stage: str, decision: str, version: str, **numbers: Any) -> dict[str, Any]:
        self.metrics.decisions.labels(stage=stage, decision=decision).inc()
        return self.log.record(stage, decision, version, **numbers)

    def release(self, current_dir: Any, current_params: Mapping[str, np.ndarray], candidate_dir: Any,
                candidate_params: Mapping[str, np.ndarray], spec: Any, version: str) -> dict[str, Any]:
        """Run the whole staged rollout of `candidate_dir`; returns the final decision entry."""
        if self.heldout is not None and len(self.heldout[1]):
            x, y = self.heldout
            gate = cloud_gate(base_logits(spec, current_params, x), base_logits(spec, candidate_params, x), y,
                              self.settings.tolerance_samples)
            entry = self._decide("cloud_gate", "pass" if gate.passed else "reject", version, **gate.numbers())
            if not gate.passed:
                return entry  # never announced: the current base stays the fleet's bundle
        else:
            self._decide("cloud_gate", "skipped", version, reason="no labelled data (--data) to hold out")
        known = self.devices()
        canaries = choose_canaries(known, self.settings.canary_fraction, self.settings.canary_min, self.settings.seed)
        if not canaries:
            self.publish(candidate_dir, ())
            return self._decide("canary", "promote", version, canaries=[], reason="no devices known yet")
        since = time.time()
        self.publish(candidate_dir, canaries)
        verdict, reports = wait_for_canaries(self.metric_values, canaries, since, self.settings.canary_timeout_s,
                                             self.stop)
        rejected = sorted(d for d, r in reports.items() if not r.adopted)
        self.metrics.device_rejections.inc(len(rejected))
        numbers = {"canaries": list(canaries), "reported": len(reports), "rejected_by": rejected,
                   "gate": {d: {"active": round(r.acc_active, 4), "best_new": round(r.acc_best_new, 4),
                                "adopted": r.adopted} for d, r in sorted(reports.items())}}
        if verdict == "promote":
            self.publish(candidate_dir, ())
        else:
            self.publish(current_dir, ())  # the current base is announced again and stays
        return self._decide("canary", verdict, version, **numbers)

    def section(self) -> dict[str, Any]:
        """The fleet page's rollout section: the decisions (newest last) and each device's last gate report."""
        gates = {}
        for device in self.devices():
            report = canary_reports(self.metric_values, [device], 0.0).get(device)
            if report is not None:
                gates[device] = {"decision": "adopted" if report.adopted else "update_rejected",
                                 "active": round(report.acc_active, 4), "best_new": round(report.acc_best_new, 4)}
        return {"decisions": self.log.entries[-50:], "device_gates": gates}


def rollout_html(data: Mapping[str, Any]) -> str:
    """The rollout section of /fleet (every shown value escaped)."""
    from html import escape

    rows = "".join(f"<tr><td>{escape(str(e['stage']))}</td><td>{escape(str(e['decision']))}</td>"
                   f"<td>{escape(str(e['bundle'])[:12])}</td>"
                   f"<td>{escape(json.dumps({k: v for k, v in e.items() if k not in ('stage', 'decision', 'bundle')}))}"
                   f"</td></tr>" for e in data.get("decisions", []))
    gates = "".join(f"<tr><td>{escape(d)}</td><td>{escape(g['decision'])}</td><td>{g['active']:.3f}</td>"
                    f"<td>{g['best_new']:.3f}</td></tr>" for d, g in sorted(data.get("device_gates", {}).items()))
    return ("<h2>Rollout</h2><table><tr><th>stage</th><th>decision</th><th>bundle</th><th>numbers</th></tr>"
            f"{rows}</table><h3>Device adoption gates (last report)</h3><table><tr><th>device</th>"
            f"<th>decision</th><th>active</th><th>best new</th></tr>{gates}</table>")
