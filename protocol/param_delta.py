"""A base update as a quantized change: a quarter (int8) or half (float16) of the parameter bytes,
reconstructed bit-exactly on the device.

The cloud publishes, as the new weights, the parent's weights plus the decoded quantized change
(`quantize_update`): the published weights are then exactly what a device computes from its parent copy
and the delta file (`decode_change` is one float32 multiply and one float32 add per element, both
IEEE-rounded, the same code on both sides), so the device rebuilds the new parameter files byte for byte
(`apply_delta`) and checks them against the manifest's sha256 — no trust in the delta needed; a device that
cannot rebuild them downloads the parameters instead.

Encodings (`DELTA_ENCODINGS`), chosen by the cloud per update:
- "int8" (default): per row (the first axis; a vector is one row) a float32 scale s = max|change| / 127 and
  the change rounded to s·q with q in [-127, 127]. Error per element at most s/2 = max|change of its row|/254.
  Why rows: one output channel that moved a lot must not flatten the change of every other channel.
- "float16": the change rounded to float16. Error at most half a float16 ulp of each change.
The file (`delta_to_bytes`) is a flat binary list of the changed tensors, parsed strictly (lengths before
reading, no trailing bytes, nothing unpickled); float16 `.npz` deltas of older bundles are still read. The largest error against the distilled weights is
returned by `quantize_update` and recorded in the manifest (`delta_max_abs_error`); the cloud's gate
evaluates the published (rounded) weights, never the unrounded ones.
"""

from __future__ import annotations

import io
import math
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from .params import Params, ParamsError, params_from_bytes, params_to_bytes

FP16_MAX = float(np.finfo(np.float16).max)
DELTA_ENCODINGS = ("int8", "float16")
DEFAULT_DELTA_ENCODING = "int8"
INT8_LEVELS = 127
Delta = dict[str, dict[str, np.ndarray]]  # parameter name -> {"values": int8 or float16, "scale": float32 rows}


def _rows(shape: tuple[int, ...]) -> int:
    return shape[0] if len(shape) >= 2 else 1


def _row_view(a: np.ndarray) -> np.ndarray:
    return a.reshape(_rows(a.shape), -1)


def encode_change(change: np.ndarray, encoding: str) -> dict[str, np.ndarray]:
    """The arrays that carry `change` under `encoding`: "values" (int8 or float16) and, for int8, "scale"."""
    if encoding == "float16":
        if np.abs(change).max(initial=0.0) > FP16_MAX:
            raise ParamsError("the change does not fit float16")
        return {"values": change.astype(np.float16)}
    if encoding != "int8":
        raise ValueError(f"unknown delta encoding {encoding!r}; choose from {', '.join(DELTA_ENCODINGS)}")
    rows = _row_view(change)
    scale = (np.abs(rows).max(axis=1) / np.float32(INT8_LEVELS)).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1.0))[:, None]
    q = np.clip(np.rint(rows / safe), -INT8_LEVELS, INT8_LEVELS).astype(np.int8)
    return {"values": q.reshape(change.shape), "scale": scale}


def decode_change(parts: Mapping[str, np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """The float32 change `encode_change` carried (the one expression both the cloud and the device use)."""
    value = parts["values"]
    if value.shape != shape:
        raise ParamsError(f"delta has shape {value.shape}, the parameter {shape}")
    if value.dtype == np.float16:
        return value.astype(np.float32)
    scale = parts.get("scale")
    if scale is None or scale.dtype != np.float32 or scale.shape != (_rows(shape),):
        raise ParamsError(f"int8 delta needs a float32 scale per row ({_rows(shape)}), got "
                          f"{None if scale is None else (scale.dtype, scale.shape)}")
    if not np.all(np.isfinite(scale)) or np.any(scale < 0):
        raise ParamsError("int8 delta scale holds NaN, inf or a negative value")
    return (_row_view(value).astype(np.float32) * scale[:, None]).reshape(shape)


def quantize_update(parent: Mapping[str, np.ndarray], new: Mapping[str, np.ndarray],
                    encoding: str = DEFAULT_DELTA_ENCODING) -> tuple[Params, Delta, float]:
    """(weights to publish, the encoded change of each changed parameter, max |published - new|).

    ParamsError when a change is not finite or does not fit float16 (then publish `new` without a delta)."""
    if set(parent) != set(new):
        raise ParamsError("quantize_update: parent and new parameters name different tensors")
    published: Params = {}
    delta: Delta = {}
    worst = 0.0
    for name, value in new.items():
        value, base = np.asarray(value, np.float32), np.asarray(parent[name], np.float32)
        if value.shape != base.shape:
            raise ParamsError(f"quantize_update: {name!r} changed shape {base.shape} -> {value.shape}")
        change = value - base
        if not np.all(np.isfinite(change)):
            raise ParamsError(f"quantize_update: the change of {name!r} is not finite")
        if not change.any():
            published[name] = base
            continue
        try:
            parts = encode_change(change, encoding)
        except ParamsError as exc:
            raise ParamsError(f"quantize_update: {name!r}: {exc}") from exc
        delta[name] = parts
        published[name] = base + decode_change(parts, change.shape)
        worst = max(worst, float(np.abs(published[name] - value).max()))
    return published, delta, worst


# The delta file: a small header per tensor, then its bytes; all little-endian. npz costs ~250 bytes of zip
# and npy headers per array, more than a bias's change itself.
#   magic b"EPD", version u8, tensor count u32, then per tensor:
#   name length u16, UTF-8 name, encoding u8 (1 int8, 2 float16), ndim u8, dims u32 × ndim,
#   int8: scales float32 × rows, then int8 × size; float16: float16 × size.
MAGIC = b"EPD"
FORMAT_VERSION = 1
_CODES = {np.dtype(np.int8): 1, np.dtype(np.float16): 2}
_DTYPES = {code: dtype for dtype, code in _CODES.items()}
MAX_NDIM = 8


def delta_to_bytes(delta: Mapping[str, Mapping[str, np.ndarray]]) -> bytes:
    """The delta file for `quantize_update`'s encoded changes."""
    out = [MAGIC, struct.pack("<BI", FORMAT_VERSION, len(delta))]
    for name, parts in delta.items():
        value = np.ascontiguousarray(parts["values"])
        raw = name.encode()
        out.append(struct.pack(f"<H{len(raw)}sBB{value.ndim}I", len(raw), raw, _CODES[value.dtype], value.ndim,
                               *value.shape))
        if value.dtype == np.int8:
            out.append(np.asarray(parts["scale"], "<f4").tobytes())
        out.append(value.astype(value.dtype.newbyteorder("<")).tobytes())
    return b"".join(out)


class _Reader:
    """Reads a delta file front to back; every length is checked before anything is read."""

    def __init__(self, data: bytes) -> None:
        self.view, self.at = memoryview(data), 0

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.at + n > len(self.view):
            raise ParamsError(f"delta file ends inside {what}")
        self.at += n
        return self.view[self.at - n:self.at]

    def unpack(self, fmt: str, what: str) -> tuple[Any, ...]:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))


def delta_from_bytes(data: bytes) -> Delta:
    """Per parameter name, its encoded change ("values" and, for int8, "scale"); ParamsError for anything else."""
    if bytes(data[:2]) == b"PK":
        return _legacy_npz(data)
    r = _Reader(data)
    if bytes(r.take(3, "the magic")) != MAGIC:
        raise ParamsError("not a delta file (bad magic)")
    version, count = r.unpack("<BI", "the header")
    if version != FORMAT_VERSION:
        raise ParamsError(f"delta file format {version} is not {FORMAT_VERSION}")
    out: Delta = {}
    for _ in range(count):
        (n_name,) = r.unpack("<H", "a name length")
        try:
            name = bytes(r.take(n_name, "a name")).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ParamsError(f"delta file: a tensor name is not UTF-8: {exc}") from None
        if not name or name in out:
            raise ParamsError(f"delta file: empty or repeated tensor name {name!r}")
        code, ndim = r.unpack("<BB", f"{name!r}'s header")
        if code not in _DTYPES or ndim > MAX_NDIM:
            raise ParamsError(f"delta file: {name!r} has encoding {code} and {ndim} dims (known 1, 2; <= {MAX_NDIM})")
        shape = tuple(int(d) for d in r.unpack(f"<{ndim}I", f"{name!r}'s shape"))
        size = math.prod(shape)  # Python ints: a forged shape cannot overflow into a small size
        parts: dict[str, np.ndarray] = {}
        if _DTYPES[code] == np.int8:
            rows = _rows(shape)
            parts["scale"] = np.frombuffer(r.take(4 * rows, f"{name!r}'s scales"), "<f4").astype(np.float32)
        dtype = _DTYPES[code].newbyteorder("<")
        raw = r.take(size * dtype.itemsize, f"{name!r}'s values")
        parts["values"] = np.frombuffer(raw, dtype).astype(_DTYPES[code]).reshape(shape)
        out[name] = parts
    if r.at != len(r.view):
        raise ParamsError(f"delta file: {len(r.view) - r.at} bytes after the last tensor")
    return out


def _legacy_npz(data: bytes) -> Delta:
    """A float16 `.npz` delta (bundles published before the delta file format)."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            raw = {k: npz[k] for k in npz.files}
    except Exception as exc:  # numpy raises several types for corrupt archives
        raise ParamsError(f"unreadable delta archive: {exc}") from exc
    bad = [k for k, v in raw.items() if v.dtype != np.float16]
    if bad:
        raise ParamsError(f"delta archive: {bad[:3]} are not float16")
    return {k: {"values": v} for k, v in raw.items()}


def apply_delta(parent_file: bytes, deltas: Mapping[str, Mapping[str, np.ndarray]]) -> bytes:
    """The parameter file `parent_file` with its tensors moved by `deltas` (others unchanged), same order."""
    parent = params_from_bytes(parent_file)
    out = {}
    for name, value in parent.items():
        parts = deltas.get(name)
        out[name] = value if parts is None else value + decode_change(parts, value.shape)
    return params_to_bytes(out)
