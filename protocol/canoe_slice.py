"""The Canoe slice file: a helper's significant sub-network, pickle-free (numpy + stdlib).

One `.npz` (compressed, read with allow_pickle=False) of exactly three arrays:
- `__header__`: UTF-8 JSON as uint8, parsed with the wire's strict JSON: the bundle base version, the
  variant whose widths the slice has (so it runs in the lite runtime's `infer_<vid>` signature without a
  new export), the sliced model description, the weight encoding, the parameter names and shapes in file
  order, the kept-filter count of every layer and the helper's per-filter importance (3 significant digits);
- `kept`: the kept filter indices of every layer, concatenated in header order (int16 when they fit);
- `weights`: φ then every sliced base parameter, flattened and concatenated in header order, as float32 or
  float16 (`encoding`).
Two flat arrays instead of one array per tensor (format /1): each npz member costs ~200 bytes of zip and
.npy headers, a quarter of a small slice. float16 halves the weights at a bounded error: relative
≤ 2^-11 (absolute ≤ 2^-25 below 2^-14); a slice with a value outside float16's range is refused at
encoding (the helper then ships float32), and the largest rounding error is written in the header.
The patch's shared θ̄/Θ are NOT shipped: the target already holds them in its bundle and gathers them with
the kept indices. The sha256 of the whole file travels in the offer (`protocol/canoe.py`).
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .model_spec import ModelSpec, PatchSpec, SpecError, param_infos
from .variants import KeptSets, Variant
from .wire import MessageError, int_list, loads_strict, text

SLICE_FORMAT = "canoe-slice/2"
MAX_SLICE_BYTES = 64 * 2**20  # on the wire, and again for everything the file unpacks to
ENCODINGS: dict[str, np.dtype[Any]] = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}
FLOAT16_MAX = float(np.finfo(np.float16).max)
_MEMBERS = {"__header__", "kept", "weights"}


class CanoeError(ValueError):
    """A Canoe message or slice that must not be used; the text names the problem."""


@dataclass(frozen=True)
class CanoeSlice:
    """A helper's significant sub-network: sliced base weights + kept filter indices + the helper's φ."""

    base_version: str
    variant_id: str
    helper: str
    request_id: str
    classes: list[int]
    kept: KeptSets
    base: dict[str, np.ndarray]  # sliced base weights (dotted names)
    phi: np.ndarray
    spec: ModelSpec  # the sliced model description (framework neutral)
    importance: dict[str, list[float]] = field(default_factory=dict)  # per-filter score of every layer
    encoding: str = "float32"  # how the weights travel (ENCODINGS)

    def widths(self) -> dict[str, int]:
        return {name: len(idx) for name, idx in self.kept.items()}


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _flat_weights(s: CanoeSlice, names: list[str]) -> tuple[np.ndarray, float]:
    """(φ + params flattened in the slice's encoding, largest rounding error); CanoeError if it cannot hold them."""
    if s.encoding not in ENCODINGS:
        raise CanoeError(f"slice encoding must be one of {sorted(ENCODINGS)}, got {s.encoding!r}")
    flat = np.concatenate([np.asarray(s.phi, np.float32).ravel()]
                          + [np.asarray(s.base[k], np.float32).ravel() for k in names])
    if not np.all(np.isfinite(flat)):
        raise CanoeError("slice weights hold NaN or infinity")
    if s.encoding == "float16" and flat.size and float(np.abs(flat).max()) > FLOAT16_MAX:
        raise CanoeError(f"slice weights exceed float16's range ({FLOAT16_MAX}): ship float32")
    packed = flat.astype(ENCODINGS[s.encoding])
    err = float(np.abs(packed.astype(np.float32) - flat).max()) if flat.size else 0.0
    return packed, err


def encode_slice(s: CanoeSlice) -> bytes:
    names = sorted(s.base)
    weights, err = _flat_weights(s, names)
    layers = sorted(s.kept)
    kept = np.concatenate([np.asarray(s.kept[k], np.int64) for k in layers]) if layers else np.zeros(0, np.int64)
    kept = kept.astype("<i2" if not kept.size or kept.max() < 2**15 else "<i4")
    header = {"format": SLICE_FORMAT, "base_version": s.base_version, "variant_id": s.variant_id,
              "helper": s.helper, "request_id": s.request_id, "classes": list(map(int, s.classes)),
              "spec": s.spec.to_dict(), "encoding": s.encoding, "rounding_error": err, "phi": int(np.size(s.phi)),
              "params": [[k, list(np.shape(s.base[k]))] for k in names],
              "layers": [[k, len(s.kept[k])] for k in layers],
              "importance": {k: [float(f"{v:.3g}") for v in vals] for k, vals in s.importance.items()}}
    buf = io.BytesIO()
    np.savez_compressed(buf, __header__=np.frombuffer(json.dumps(header, sort_keys=True).encode(), np.uint8),
                        kept=kept, weights=weights)
    return buf.getvalue()


def _read_members(data: bytes) -> dict[str, np.ndarray]:
    """The npz's arrays, refusing unknown members and anything that would unpack beyond the bound."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
        names = [i.filename.removesuffix(".npy") for i in infos]
        if "__header__" not in names or not set(names) <= _MEMBERS or len(set(names)) != len(names):
            raise CanoeError(f"slice file must hold {sorted(_MEMBERS)} once each, it holds {sorted(names)}")
        unpacked = sum(i.file_size for i in infos)  # zipfile stops reading a member at its declared size
        if unpacked > MAX_SLICE_BYTES:
            raise CanoeError(f"slice file unpacks to {unpacked} bytes, more than {MAX_SLICE_BYTES}")
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        if isinstance(exc, CanoeError):
            raise
        raise CanoeError(f"not a readable slice file: {exc}") from None


def _layout(header: dict[str, Any], key: str, what: str) -> list[tuple[str, Any]]:
    rows = header.get(key)
    if not isinstance(rows, list) or not all(isinstance(r, list) and len(r) == 2 and isinstance(r[0], str)
                                             for r in rows):
        raise CanoeError(f"slice header {key!r} must list [name, {what}] pairs")
    if len({r[0] for r in rows}) != len(rows):
        raise CanoeError(f"slice header {key!r} repeats a name")
    return [(r[0], r[1]) for r in rows]


def _count(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_SLICE_BYTES:
        raise CanoeError(f"slice header: {what} must be an integer in [0, {MAX_SLICE_BYTES}], got {value!r}")
    return value


def decode_slice(data: bytes, *, expected_sha256: str | None = None) -> CanoeSlice:
    """Parse a slice file (no pickles). With `expected_sha256`, a different hash is refused first."""
    if expected_sha256 is not None and sha256_hex(data) != expected_sha256:
        raise CanoeError(f"slice sha256 {sha256_hex(data)[:16]}... != announced {expected_sha256[:16]}...: "
                         "refusing it")
    if len(data) > MAX_SLICE_BYTES:
        raise CanoeError(f"slice of {len(data)} bytes exceeds {MAX_SLICE_BYTES}")
    arrays = _read_members(data)
    try:
        header = loads_strict(arrays["__header__"].tobytes())  # the wire's strict JSON, as every message
    except MessageError as exc:
        raise CanoeError(f"slice header: {exc}") from None
    if not isinstance(header, dict) or header.get("format") != SLICE_FORMAT:
        got = header.get("format") if isinstance(header, dict) else None
        raise CanoeError(f"slice header format must be {SLICE_FORMAT!r}, got {got!r}")
    try:
        spec = ModelSpec.from_dict(header["spec"])
    except (SpecError, KeyError, TypeError) as exc:
        raise CanoeError(f"slice model description: {exc}") from None
    if set(arrays) != _MEMBERS:
        raise CanoeError(f"slice file lacks {sorted(_MEMBERS - set(arrays))}")
    encoding = header.get("encoding")
    weights, kept_flat = arrays["weights"], arrays["kept"]
    if encoding not in ENCODINGS or weights.dtype != ENCODINGS[encoding] or weights.ndim != 1:
        raise CanoeError(f"slice weights must be 1-D {encoding!r} (one of {sorted(ENCODINGS)}), got "
                         f"{weights.dtype} {weights.shape}")
    if kept_flat.ndim != 1 or kept_flat.dtype.kind != "i":
        raise CanoeError("slice kept indices must be 1-D integers")
    layers = [(k, _count(n, f"kept count of {k!r}")) for k, n in _layout(header, "layers", "count")]
    if sum(n for _, n in layers) != len(kept_flat):
        raise CanoeError(f"slice kept indices: {len(kept_flat)} values, the header counts {sum(n for _, n in layers)}")
    kept, at = {}, 0
    for name, n in layers:
        kept[name], at = kept_flat[at:at + n].astype(np.int64), at + n
    params = [(k, tuple(_count(d, f"dimension of {k!r}") for d in (shape if isinstance(shape, list) else [None])))
              for k, shape in _layout(header, "params", "shape")]
    sizes = [int(np.prod(shape)) for _, shape in params]
    k_phi = _count(header.get("phi"), "phi length")
    if k_phi + sum(sizes) != len(weights):
        raise CanoeError(f"slice weights: {len(weights)} values, the header describes {k_phi + sum(sizes)}")
    flat = weights.astype(np.float32)
    if not np.all(np.isfinite(flat)):
        raise CanoeError("slice weights hold NaN or infinity")
    phi, base, at = flat[:k_phi].copy(), {}, k_phi
    for (name, shape), size in zip(params, sizes, strict=True):
        base[name], at = flat[at:at + size].reshape(shape).copy(), at + size
    try:
        fields = (text(header.get("base_version"), "base_version"), text(header.get("variant_id"), "variant_id"),
                  text(header.get("helper"), "helper"), text(header.get("request_id"), "request_id"),
                  int_list(header.get("classes"), "classes"))
    except MessageError as exc:
        raise CanoeError(f"slice header: {exc.text}") from None
    importance = header.get("importance", {})
    if not isinstance(importance, dict) or not all(
            isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
            for v in importance.values()):
        raise CanoeError("slice header importance must map layer names to lists of numbers")
    return CanoeSlice(*fields, kept, base, phi, spec, {k: [float(x) for x in v] for k, v in importance.items()},
                      encoding)


def check_slice_fits(s: CanoeSlice, spec: ModelSpec, patch: PatchSpec, variant: Variant, base_version: str) -> None:
    """CanoeError unless the slice runs in `variant`'s lite-runtime signature of this bundle."""
    if s.base_version != base_version:
        raise CanoeError(f"slice is for base {s.base_version[:12]}, this device runs {base_version[:12]}")
    want = variant.widths(spec)
    if s.widths() != want:
        raise CanoeError(f"slice widths {s.widths()} != variant {variant.id} widths {want}")
    if s.spec != variant.spec(spec):
        raise CanoeError("slice model description differs from the variant's")
    for name, idx in s.kept.items():
        out = spec.layer(name).out
        if len(np.unique(idx)) != len(idx) or idx.min() < 0 or idx.max() >= out or np.any(np.diff(idx) <= 0):
            raise CanoeError(f"kept indices of {name!r} must be sorted, unique and in [0, {out})")
    shapes = {n: i.shape for n, i in param_infos(s.spec, None).items()}
    got = {n: tuple(v.shape) for n, v in s.base.items()}
    if got != shapes:
        raise CanoeError(f"slice params {got} do not match the sliced description {shapes}")
    if s.phi.shape != (patch.k,):
        raise CanoeError(f"slice phi has shape {s.phi.shape}, the patch needs ({patch.k},)")
