"""Robust aggregation: what keeps a few bad devices from steering (or aborting) a cloud round.

Issue 11 measured it: one φ of 3e38 turned a distillation into NaN and one φ of the wrong size aborted
every round, because the round validated every upload and raised on the first bad one. Here:

- `screen_contributions` validates each device on its own (the round's own validator,
  distill/contributions.validate_device) and DROPS the bad ones with a logged reason instead of aborting:
  wrong size, NaN/inf, missing fields, and "oversized" φ (norm above `max_norm`). Finite φ whose norm is
  above `clip_factor` × the median norm of the round are CLIPPED to that norm (direction kept).
- `trimmed_mean` is the per-coordinate trimmed mean (trim = 0.5 → the median) used where the round
  averages across devices: the proxy-mode teacher of step 1 and the φ̄ of fedavg_patches.
- `clipped_device_weights` caps any one device's share of a weighted sum (sample-weighted KD), so a
  device claiming a huge sample count cannot outvote the fleet.

Norm scale: φ is trained on-device from zero with a small learning rate; honest norms are O(1–10)
(digits fleet: median ≈ 2). `max_norm` 1e4 is far above anything honest and far below float32 overflow.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from edgepatch.protocol.model_spec import ModelSpec, PatchSpec

from .distill.contributions import DeviceContribution, DistillError, validate_device

log = logging.getLogger("edgepatch.cloud.robust")


@dataclass(frozen=True)
class RobustConfig:
    clip_factor: float = 3.0  # clip φ norms above this multiple of the round's median norm
    min_clip_norm: float = 1.0  # ... but never clip below this norm (a fleet of near-zero φ)
    max_norm: float = 1e4  # drop φ with a larger norm ("oversized")
    trim: float = 0.2  # fraction trimmed from EACH end per coordinate (0.5 = median)
    max_weight_factor: float = 4.0  # one device's share of a weighted KD sum is at most this / N

    def __post_init__(self) -> None:
        if not (self.clip_factor >= 1 and self.min_clip_norm > 0 and self.max_norm > self.min_clip_norm):
            raise ValueError("need clip_factor >= 1, min_clip_norm > 0 and max_norm > min_clip_norm")
        if not 0 <= self.trim <= 0.5:
            raise ValueError(f"trim must be in [0, 0.5], got {self.trim}")
        if self.max_weight_factor < 1:
            raise ValueError("max_weight_factor must be >= 1")


@dataclass
class Screened:
    devices: list[DeviceContribution]
    dropped: dict[str, str] = field(default_factory=dict)  # device id -> reason
    clipped: dict[str, float] = field(default_factory=dict)  # device id -> norm before clipping
    clip_norm: float = 0.0


def screen_contributions(devices: Sequence[DeviceContribution], spec: ModelSpec, patch: PatchSpec, mode: str,
                         cfg: RobustConfig | None = None) -> Screened:
    """Keep the devices a round can use; drop or clip the others, logging why. Raises DistillError only
    when nothing usable is left (with every reason), so a round aborts only if it has no input at all."""
    cfg = cfg or RobustConfig()
    ids = [d.device_id for d in devices]
    if not devices or len(set(ids)) != len(ids):
        return Screened(list(devices))  # the round's own validation reports these (caller bugs, not devices)
    kept: list[DeviceContribution] = []
    out = Screened(kept)
    for dev in devices:
        try:
            checked = validate_device(dev, spec, patch, mode, need_profile=False)
        except DistillError as exc:
            out.dropped[dev.device_id] = str(exc)
            continue
        if checked.phi is not None and float(np.linalg.norm(checked.phi.astype(np.float64))) > cfg.max_norm:
            out.dropped[dev.device_id] = (f"device {dev.device_id!r}: phi norm "
                                          f"{np.linalg.norm(checked.phi.astype(np.float64)):.3g} is above "
                                          f"{cfg.max_norm:g} (oversized)")
            continue
        kept.append(dev)
    norms = [float(np.linalg.norm(np.asarray(d.phi, np.float64))) for d in kept if d.phi is not None]
    if norms:
        out.clip_norm = max(cfg.min_clip_norm, cfg.clip_factor * float(np.median(norms)))
        for i, dev in enumerate(kept):
            if dev.phi is None:
                continue
            norm = float(np.linalg.norm(np.asarray(dev.phi, np.float64)))
            if norm > out.clip_norm:
                out.clipped[dev.device_id] = norm
                phi = (np.asarray(dev.phi, np.float64) * (out.clip_norm / norm)).astype(np.float32)
                kept[i] = replace(dev, phi=phi)
    for device_id, reason in out.dropped.items():
        log.warning("round: dropped %s: %s", device_id, reason)
    for device_id, norm in out.clipped.items():
        log.info("round: clipped phi of %s from norm %.3g to %.3g", device_id, norm, out.clip_norm)
    if not kept:
        raise DistillError("every device contribution was refused: " + "; ".join(out.dropped.values()))
    return out


def trimmed_mean(stacked: np.ndarray, trim: float, weights: np.ndarray | None = None) -> np.ndarray:
    """Per-coordinate mean over axis 0 after dropping the `trim` fraction of lowest and highest values of
    each coordinate (trim 0.5 gives the median; with fewer than 3 rows nothing is trimmed). `weights`
    (one per row) weigh the rows that remain."""
    stacked = np.asarray(stacked, np.float64)
    n = stacked.shape[0]
    if n == 0:
        raise ValueError("trimmed_mean of nothing")
    if trim >= 0.5:
        return np.median(stacked, axis=0) if weights is None else _weighted_median(stacked, weights)
    cut = int(np.floor(trim * n)) if n >= 3 else 0
    order = np.argsort(stacked, axis=0)
    keep = order[cut:n - cut]
    values = np.take_along_axis(stacked, keep, axis=0)
    if weights is None:
        return values.mean(axis=0)
    w = np.asarray(weights, np.float64)[keep]
    return (values * w).sum(axis=0) / np.maximum(w.sum(axis=0), 1e-300)


def _weighted_median(stacked: np.ndarray, weights: np.ndarray) -> np.ndarray:
    order = np.argsort(stacked, axis=0)
    values = np.take_along_axis(stacked, order, axis=0)
    w = np.asarray(weights, np.float64)[order]
    cum = np.cumsum(w, axis=0)
    idx = (cum >= cum[-1:] / 2).argmax(axis=0)
    return np.take_along_axis(values, idx[None], axis=0)[0]


def clipped_device_weights(sizes: Sequence[float], max_weight_factor: float) -> np.ndarray:
    """Shares proportional to `sizes` (e.g. claimed sample counts), none above max_weight_factor / N;
    the excess is handed to the others in proportion (water-filling), so shares still sum to 1."""
    s = np.asarray(sizes, np.float64)
    if len(s) == 0 or np.any(~np.isfinite(s)) or np.any(s < 0) or s.sum() <= 0:
        raise ValueError("device sizes must be finite, >= 0 and not all zero")
    cap = min(1.0, max_weight_factor / len(s))
    shares = s / s.sum()
    for _ in range(len(s)):
        over = shares > cap + 1e-12
        if not over.any():
            break
        excess = float((shares[over] - cap).sum())
        shares[over] = cap
        free = ~over & (shares < cap)
        if not free.any():
            break
        room = shares[free].sum()
        shares[free] += excess * (shares[free] / room if room > 0 else 1.0 / free.sum())
    return shares
