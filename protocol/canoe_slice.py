"""The Canoe slice file: a helper's significant sub-network, pickle-free (numpy + stdlib).

One `.npz` written and read with allow_pickle=False holding `__header__` (UTF-8 JSON as uint8),
`kept__<layer>` (int64 kept filter indices), `phi` (the helper's φ) and the sliced base weights under their
dotted names. The header names the bundle base version, the variant whose widths the slice has (so it runs
in the lite runtime's `infer_<vid>` signature without a new export) and the sliced model description. The
patch's shared θ̄/Θ are NOT shipped: the target already holds them in its bundle and gathers them with the
kept indices. The sha256 of the whole file travels in the offer (`protocol/canoe.py`).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field

import numpy as np

from .model_spec import ModelSpec, PatchSpec, SpecError, param_infos
from .variants import KeptSets, Variant
from .wire import MessageError, int_list, loads_strict, text

SLICE_FORMAT = "canoe-slice/1"
MAX_SLICE_BYTES = 64 * 2**20


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

    def widths(self) -> dict[str, int]:
        return {name: len(idx) for name, idx in self.kept.items()}


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode_slice(s: CanoeSlice) -> bytes:
    header = {"format": SLICE_FORMAT, "base_version": s.base_version, "variant_id": s.variant_id,
              "helper": s.helper, "request_id": s.request_id, "classes": list(map(int, s.classes)),
              "spec": s.spec.to_dict(), "params": sorted(s.base), "layers": sorted(s.kept),
              "importance": {k: [round(float(v), 6) for v in vals] for k, vals in s.importance.items()}}
    arrays: dict[str, np.ndarray] = {"__header__": np.frombuffer(json.dumps(header, sort_keys=True).encode(),
                                                                 dtype=np.uint8)}
    arrays.update({f"kept__{k}": np.asarray(v, dtype=np.int64) for k, v in s.kept.items()})
    arrays["phi"] = np.asarray(s.phi, dtype=np.float32)
    arrays.update({k: np.asarray(v, dtype=np.float32) for k, v in s.base.items()})
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def decode_slice(data: bytes, *, expected_sha256: str | None = None) -> CanoeSlice:
    """Parse a slice file (no pickles). With `expected_sha256`, a different hash is refused first."""
    if expected_sha256 is not None and sha256_hex(data) != expected_sha256:
        raise CanoeError(f"slice sha256 {sha256_hex(data)[:16]}... != announced {expected_sha256[:16]}...: "
                         "refusing it")
    if len(data) > MAX_SLICE_BYTES:
        raise CanoeError(f"slice of {len(data)} bytes exceeds {MAX_SLICE_BYTES}")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (ValueError, OSError, EOFError) as exc:
        raise CanoeError(f"not a readable slice file: {exc}") from None
    if "__header__" not in arrays:
        raise CanoeError("slice file has no __header__")
    try:
        header = loads_strict(arrays.pop("__header__").tobytes())  # the wire's strict JSON, as every message
    except MessageError as exc:
        raise CanoeError(f"slice header: {exc}") from None
    if not isinstance(header, dict) or header.get("format") != SLICE_FORMAT:
        raise CanoeError(f"slice header format must be {SLICE_FORMAT!r}")
    try:
        spec = ModelSpec.from_dict(header["spec"])
    except (SpecError, KeyError) as exc:
        raise CanoeError(f"slice model description: {exc}") from None
    layers = header.get("layers", [])
    kept = {}
    for layer in layers:
        idx = arrays.pop(f"kept__{layer}", None)
        if idx is None or idx.ndim != 1 or idx.dtype.kind != "i":
            raise CanoeError(f"slice kept indices for layer {layer!r} missing or not 1-D integers")
        kept[layer] = idx.astype(np.int64)
    if "phi" not in arrays:
        raise CanoeError("slice has no phi")
    phi = arrays.pop("phi").astype(np.float32)
    names = header.get("params", [])
    if sorted(arrays) != sorted(names):
        raise CanoeError(f"slice arrays {sorted(arrays)} != header params {sorted(names)}")
    base = {k: v.astype(np.float32) for k, v in arrays.items()}
    for k, v in base.items():
        if not np.all(np.isfinite(v)):
            raise CanoeError(f"slice param {k!r} holds NaN or infinity")
    try:
        fields = (text(header.get("base_version"), "base_version"), text(header.get("variant_id"), "variant_id"),
                  text(header.get("helper"), "helper"), text(header.get("request_id"), "request_id"),
                  int_list(header.get("classes"), "classes"))
    except MessageError as exc:
        raise CanoeError(f"slice header: {exc.text}") from None
    return CanoeSlice(*fields, kept, base, phi, spec,
                      {k: [float(x) for x in v] for k, v in header.get("importance", {}).items()})


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
