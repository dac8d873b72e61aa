"""A base update as float16 deltas: half the bytes of the parameters, reconstructed bit-exactly.

The cloud publishes, as the new weights, the parent's weights plus the float16-rounded change
(`quantize_update`): the published weights are then exactly what a device computes from its parent copy
and the delta file (float32 addition is deterministic), so the device rebuilds the new parameter files
byte for byte (`apply_delta`) and checks them against the manifest's sha256 — no trust in the delta
needed. The price is a bounded error against the distilled weights: at most half a float16 ulp of each
change (relative 2^-11 of the change, 2^-25 absolute near zero), reported by `quantize_update`.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np

from .params import Params, ParamsError, params_from_bytes, params_to_bytes

FP16_MAX = float(np.finfo(np.float16).max)


def quantize_update(parent: Mapping[str, np.ndarray], new: Mapping[str, np.ndarray]
                    ) -> tuple[Params, dict[str, np.ndarray], float]:
    """(weights to publish, float16 deltas of the changed parameters, max |published - new|).

    ParamsError when a change does not fit float16 (then publish `new` without a delta)."""
    if set(parent) != set(new):
        raise ParamsError("quantize_update: parent and new parameters name different tensors")
    published: Params = {}
    deltas: dict[str, np.ndarray] = {}
    worst = 0.0
    for name, value in new.items():
        value, base = np.asarray(value, np.float32), np.asarray(parent[name], np.float32)
        if value.shape != base.shape:
            raise ParamsError(f"quantize_update: {name!r} changed shape {base.shape} -> {value.shape}")
        change = value - base
        if not np.all(np.isfinite(change)) or np.abs(change).max(initial=0.0) > FP16_MAX:
            raise ParamsError(f"quantize_update: the change of {name!r} does not fit float16")
        if not change.any():
            published[name] = base
            continue
        deltas[name] = change.astype(np.float16)
        published[name] = base + deltas[name].astype(np.float32)
        worst = max(worst, float(np.abs(published[name] - value).max()))
    return published, deltas, worst


def delta_to_bytes(deltas: Mapping[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    arrays: dict[str, Any] = {k: np.asarray(v, np.float16) for k, v in deltas.items()}
    np.savez(buf, **arrays)
    return buf.getvalue()


def delta_from_bytes(data: bytes) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            out = {k: npz[k] for k in npz.files}
    except Exception as exc:  # numpy raises several types for corrupt archives
        raise ParamsError(f"unreadable delta archive: {exc}") from exc
    bad = [k for k, v in out.items() if v.dtype != np.float16]
    if bad:
        raise ParamsError(f"delta archive: {bad[:3]} are not float16")
    return out


def apply_delta(parent_file: bytes, deltas: Mapping[str, np.ndarray]) -> bytes:
    """The parameter file `parent_file` with its tensors moved by `deltas` (others unchanged), same order."""
    parent = params_from_bytes(parent_file)
    out = {}
    for name, value in parent.items():
        change = deltas.get(name)
        if change is not None and change.shape != value.shape:
            raise ParamsError(f"delta for {name!r} has shape {change.shape}, the parameter {value.shape}")
        out[name] = value if change is None else value + change.astype(np.float32)
    return params_to_bytes(out)
