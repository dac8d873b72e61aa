"""Per-device feature shifts a patch can learn (sensor gain/offset, miscalibration, a permutation of input
positions, noise, small rotation + shift of images): `DeviceTransform` and how a fleet draws them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

SHIFT_KINDS = ("none", "gain_offset", "miscalibration", "permutation", "noise", "rotation")


class FleetError(ValueError):
    """Fleet parameters that cannot be satisfied by the dataset."""


@dataclass(frozen=True)
class DeviceTransform:
    """A deterministic per-device input transform (applied in the order the fields are listed).

    `gain`/`offset` have one entry per channel; `permutation` maps flattened spatial positions
    (shared by all channels): output position i takes input position permutation[i].
    """

    kinds: tuple[str, ...] = ()
    rotation_deg: float = 0.0
    shift_px: tuple[int, int] = (0, 0)
    permutation: np.ndarray | None = None
    gain: np.ndarray | None = None
    offset: np.ndarray | None = None
    noise_std: float = 0.0
    noise_seed: int = 0

    def apply(self, x: np.ndarray) -> np.ndarray:
        out = np.asarray(x, dtype=np.float32)
        if self.rotation_deg or self.shift_px != (0, 0):
            out = rotate_shift_images(out, self.rotation_deg, self.shift_px)
        if self.permutation is not None:
            flat = out.reshape(out.shape[0], out.shape[1], -1)
            out = flat[:, :, self.permutation].reshape(out.shape)
        if self.gain is not None:
            out = out * _per_channel(self.gain, out.ndim)
        if self.offset is not None:
            out = out + _per_channel(self.offset, out.ndim)
        if self.noise_std:
            noise = np.random.default_rng(self.noise_seed).normal(0.0, self.noise_std, size=out.shape)
            out = (out + noise).astype(np.float32)
        return np.ascontiguousarray(out, dtype=np.float32)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly description (for run metadata and figures)."""
        return {
            "kinds": list(self.kinds),
            "rotation_deg": self.rotation_deg,
            "shift_px": list(self.shift_px),
            "permutation": None if self.permutation is None else self.permutation.tolist(),
            "gain": None if self.gain is None else self.gain.tolist(),
            "offset": None if self.offset is None else self.offset.tolist(),
            "noise_std": self.noise_std,
            "noise_seed": self.noise_seed,
        }


def _per_channel(values: np.ndarray, ndim: int) -> np.ndarray:
    return values.astype(np.float32).reshape((1, -1) + (1,) * (ndim - 2))


def rotate_shift_images(x: np.ndarray, degrees: float, shift_px: tuple[int, int]) -> np.ndarray:
    """Rotate (N, C, H, W) images about their centre and translate them; bilinear, zero outside."""
    if x.ndim != 4:
        raise FleetError(f"rotation/shift needs (N, C, H, W) images, got shape {x.shape}")
    _, _, height, width = x.shape
    theta = np.deg2rad(degrees)
    cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
    yy, xx = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64),
                         indexing="ij")
    # Inverse map: where in the source does each output pixel come from.
    dy, dx = yy - cy - shift_px[0], xx - cx - shift_px[1]
    src_y = np.cos(theta) * dy + np.sin(theta) * dx + cy
    src_x = -np.sin(theta) * dy + np.cos(theta) * dx + cx
    y0, x0 = np.floor(src_y).astype(np.int64), np.floor(src_x).astype(np.int64)
    fy, fx = src_y - y0, src_x - x0
    out = np.zeros(x.shape, dtype=np.float64)
    for oy, ox, weight in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx),
                           (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
        sy, sx = y0 + oy, x0 + ox
        inside = (sy >= 0) & (sy < height) & (sx >= 0) & (sx < width)
        gathered = x[:, :, np.clip(sy, 0, height - 1), np.clip(sx, 0, width - 1)]
        out += gathered * (weight * inside)
    return out.astype(np.float32)


def parse_shift(shift: str | Sequence[str]) -> tuple[str, ...]:
    """'gain_offset+noise' or ['gain_offset', 'noise'] → ('gain_offset', 'noise'); 'none' → ()."""
    kinds = tuple(k for k in (shift.split("+") if isinstance(shift, str) else shift) if k)
    unknown = [k for k in kinds if k not in SHIFT_KINDS]
    if unknown:
        raise FleetError(f"unknown shift kind(s) {unknown}; known: {list(SHIFT_KINDS)}")
    return tuple(k for k in kinds if k != "none")


def draw_transform(kinds: Sequence[str], input_shape: Sequence[int], rng: np.random.Generator,
                   strength: float = 1.0) -> DeviceTransform:
    """A random transform of the given kinds; `strength` scales every magnitude (0 = identity)."""
    channels = int(input_shape[0])
    spatial = int(np.prod(input_shape[1:]))
    fields: dict[str, Any] = {"kinds": tuple(kinds)}
    if "rotation" in kinds:
        if len(input_shape) != 3:
            raise FleetError(f"rotation needs (C, H, W) images, input shape is {tuple(input_shape)}")
        fields["rotation_deg"] = float(rng.uniform(-15.0, 15.0) * strength)
        fields["shift_px"] = tuple(int(v) for v in np.round(rng.uniform(-1.0, 1.0, 2) * strength))
    if "permutation" in kinds:
        # A fixed swap of ~10% of the positions: a local wiring/layout difference, not a scramble.
        count = min(spatial, max(2, int(round(0.1 * spatial * strength))))
        chosen = rng.choice(spatial, size=count, replace=False)
        perm = np.arange(spatial)
        perm[chosen] = chosen[np.roll(np.arange(count), 1)]  # cyclic shift: every chosen one moves
        fields["permutation"] = perm
    if "gain_offset" in kinds:
        fields["gain"] = np.exp(rng.normal(0.0, 0.3 * strength, channels)).astype(np.float32)
        fields["offset"] = rng.normal(0.0, 0.3 * strength, channels).astype(np.float32)
    if "miscalibration" in kinds:
        # Like gain_offset but never mild: |log gain| and |offset| each in [0.3, 0.6]·strength, random
        # sign, so every device really is off (personalization experiments need that).
        def magnitude() -> np.ndarray:
            return rng.choice([-1.0, 1.0], channels) * rng.uniform(0.3, 0.6, channels) * strength
        fields["gain"] = np.exp(magnitude()).astype(np.float32)
        fields["offset"] = magnitude().astype(np.float32)
    if "noise" in kinds:
        fields["noise_std"] = float(0.1 * strength)
        fields["noise_seed"] = int(rng.integers(2**31))
    return DeviceTransform(**fields)
