"""The patch loop's payloads: PatchUpdate, Metrics, DeviceState, BundleAnnouncement (numpy + stdlib), and
PatchAck (acks.py, re-exported here).

They travel in the one envelope of `wire.py` (schema, kind, sender, seq, content hash, strict JSON); this
module only defines what is inside `payload`, and re-exports the codec so `messages.decode` keeps working.
PatchUpdate, Metrics and PatchAck also have binary frames (frame.py, the default on the wire): φ as raw
little-endian float32, metrics as (name, float64) pairs, acks as (raw sha256, status code, reason).

Arrays never travel as pickles: `{"dtype": "<f4", "shape": [k], "b64": base64(little-endian float32)}`.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from .acks import ACK_STATUSES, MAX_ACKS, AckEntry, PatchAck  # noqa: F401 - re-exported (its own module)
from .frame import register_frame
from .topics import Channel
from .wire import (  # noqa: F401 - the codec, re-exported for the callers of messages.decode & co.
    MAX_MESSAGE_BYTES,
    MAX_TEXT,
    REASONS,
    SCHEMA_VERSION,
    Message,
    MessageError,
    Payload,
    canonical_bytes,
    content_hash_of,
    decode,
    encode,
    integer,
    known_kinds,
    loads_strict,
    make_message,
    need,
    number,
    obj_of,
    only,
    register,
    sha256_hex,
    text,
    text_list,
    to_json,
)

ARRAY_DTYPE = "<f4"


def encode_array(arr: np.ndarray) -> dict[str, Any]:
    """float32 array -> JSON-safe dict (little-endian bytes, base64). Rejects NaN/inf at the source."""
    a = np.ascontiguousarray(np.asarray(arr), dtype=ARRAY_DTYPE)
    if not np.all(np.isfinite(a)):
        raise MessageError("non_finite", "array holds NaN or infinity")
    return {"dtype": ARRAY_DTYPE, "shape": [int(d) for d in a.shape], "b64": base64.b64encode(a.tobytes()).decode()}


def decode_array(obj: Any, what: str, ndim: int | None = None) -> np.ndarray:
    obj = obj_of(obj, what)
    only(obj, {"dtype", "shape", "b64"}, what)
    if need(obj, "dtype", what) != ARRAY_DTYPE:
        raise MessageError("bad_shape", f"{what}: dtype must be {ARRAY_DTYPE!r}, got {obj['dtype']!r}")
    shape = need(obj, "shape", what)
    if not isinstance(shape, list) or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape):
        raise MessageError("bad_shape", f"{what}: shape must be a list of non-negative integers")
    if ndim is not None and len(shape) != ndim:
        raise MessageError("bad_shape", f"{what}: expected {ndim} dimension(s), got shape {shape}")
    b64 = need(obj, "b64", what)
    if not isinstance(b64, str):
        raise MessageError("bad_field", f"{what}: b64 must be a string")
    try:
        raw = base64.b64decode(b64.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise MessageError("bad_field", f"{what}: b64 is not valid base64") from None
    count = math.prod(shape)
    if len(raw) != 4 * count:
        raise MessageError("bad_shape", f"{what}: shape {shape} needs {4 * count} bytes, data has {len(raw)}")
    arr = np.frombuffer(raw, dtype=ARRAY_DTYPE).reshape(shape).astype(np.float32)
    if not np.all(np.isfinite(arr)):
        raise MessageError("non_finite", f"{what} holds NaN or infinity")
    arr.flags.writeable = False
    return arr


# steps, samples, holdout_acc, loss, k; then φ float32 × k. k is explicit (4 bytes) so a cut frame is
# refused, never read as a shorter φ.
_PATCH_HEAD = struct.Struct("<QQddI")


@register_frame
@register
@dataclass(frozen=True)
class PatchUpdate:
    """A device's trained patch coefficients phi for (base_version, variant_id) from the envelope.
    Travels as a binary frame by default (frame.py: 36 bytes of scalars and k, then φ as little-endian float32)."""

    KIND: ClassVar[str] = "patch_update"
    CHANNELS: ClassVar[tuple[Channel, ...]] = (Channel.PATCH,)
    FRAME_CODE: ClassVar[int] = 1
    FRAME_FIELDS: ClassVar[tuple[dict[str, Any], ...]] = (
        {"name": "steps", "bytes": 8, "type": "uint64"}, {"name": "samples", "bytes": 8, "type": "uint64"},
        {"name": "holdout_acc", "bytes": 8, "type": "float64"}, {"name": "loss", "bytes": 8, "type": "float64"},
        {"name": "k", "bytes": 4, "type": "uint32"},
        {"name": "phi", "bytes": "4·k (exactly the rest of the frame, k >= 1)", "type": "float32[k]"})
    phi: np.ndarray = field(compare=False)
    steps: int
    samples: int
    holdout_acc: float
    loss: float

    def to_json(self) -> dict[str, Any]:
        return {"phi": encode_array(self._phi_checked()), "steps": int(self.steps), "samples": int(self.samples),
                "holdout_acc": number(self.holdout_acc, "holdout_acc"), "loss": number(self.loss, "loss")}

    def to_frame(self) -> bytes:
        phi = self._phi_checked()
        return _PATCH_HEAD.pack(integer(self.steps, "steps"), integer(self.samples, "samples"),
                                _acc(self.holdout_acc), number(self.loss, "loss"), phi.size) + phi.tobytes()

    @classmethod
    def from_frame(cls, data: memoryview) -> PatchUpdate:
        if len(data) < _PATCH_HEAD.size:
            raise MessageError("bad_shape", f"patch_update frame payload of {len(data)} bytes is shorter than "
                                            f"its {_PATCH_HEAD.size} bytes of scalars")
        steps, samples, acc, loss, k = _PATCH_HEAD.unpack_from(data)
        if k < 1 or len(data) != _PATCH_HEAD.size + 4 * k:
            raise MessageError("bad_shape", f"phi of k={k} floats needs {4 * k} bytes, the frame has "
                                            f"{len(data) - _PATCH_HEAD.size} (k >= 1)")
        phi = np.frombuffer(data, dtype=ARRAY_DTYPE, offset=_PATCH_HEAD.size).astype(np.float32)
        if not np.isfinite(phi).all():  # the method: np.all()'s dispatch costs ~4 µs a frame
            raise MessageError("non_finite", "phi holds NaN or infinity")
        phi.flags.writeable = False
        return cls(phi=phi, steps=integer(steps, "steps"), samples=integer(samples, "samples"), holdout_acc=_acc(acc),
                   loss=number(loss, "loss"))

    def _phi_checked(self) -> np.ndarray:
        phi = np.ascontiguousarray(np.asarray(self.phi), dtype=ARRAY_DTYPE)
        if phi.ndim != 1 or phi.size == 0:
            raise MessageError("bad_shape", f"phi must be a non-empty 1-D array, got shape {phi.shape}")
        if not np.all(np.isfinite(phi)):
            raise MessageError("non_finite", "phi holds NaN or infinity")
        return phi

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> PatchUpdate:
        w = "patch_update"
        only(obj, {"phi", "steps", "samples", "holdout_acc", "loss"}, w)
        phi = decode_array(need(obj, "phi", w), "phi", ndim=1)
        if phi.size == 0:
            raise MessageError("bad_shape", "phi is empty")
        return cls(phi=phi, steps=integer(need(obj, "steps", w), "steps"),
                   samples=integer(need(obj, "samples", w), "samples"),
                   holdout_acc=_acc(need(obj, "holdout_acc", w)), loss=number(need(obj, "loss", w), "loss"))


def _acc(value: Any) -> float:
    acc = number(value, "holdout_acc")
    if not 0.0 <= acc <= 1.0:
        raise MessageError("bad_field", f"holdout_acc={acc} outside [0, 1]")
    return acc


METRIC_NAME = re.compile(r"^[a-z][a-z0-9_.]{0,63}$")
MAX_METRICS = 128


_F64 = struct.Struct("<d")


@register_frame
@register
@dataclass(frozen=True)
class Metrics:
    """Named scalar measurements (e.g. train_ms, infer_ms, rss_bytes, battery). Travels as a binary frame by
    default: a count, then (name length, ASCII name, float64) per value, names strictly ascending so one set
    of values has one byte string (the content hash is the frame's sha256)."""

    KIND: ClassVar[str] = "metrics"
    CHANNELS: ClassVar[tuple[Channel, ...]] = (Channel.METRICS,)
    FRAME_CODE: ClassVar[int] = 2
    FRAME_FIELDS: ClassVar[tuple[dict[str, Any], ...]] = (
        {"name": "count", "bytes": 1, "type": "uint8"},
        {"name": "values", "bytes": "count × (1 + name_bytes + 8)",
         "type": "count × (name_bytes uint8, name ascii, value float64), names strictly ascending"})
    values: Mapping[str, float]

    def to_json(self) -> dict[str, Any]:
        return {"values": {str(k): number(float(v), f"values.{k}") for k, v in self.values.items()}}

    def to_frame(self) -> bytes:
        items = sorted((str(k), number(float(v), f"values.{k}")) for k, v in self.values.items())
        if len(items) > MAX_METRICS:
            raise MessageError("bad_field", f"{len(items)} metrics in one message > {MAX_METRICS}")
        for k, _ in items:
            if not METRIC_NAME.fullmatch(k):
                raise MessageError("bad_field", f"metric name {k!r} must match {METRIC_NAME.pattern}")
        return bytes([len(items)]) + b"".join(bytes([len(k)]) + k.encode("ascii") + _F64.pack(v) for k, v in items)

    @classmethod
    def from_frame(cls, data: memoryview) -> Metrics:
        if len(data) < 1 or data[0] > MAX_METRICS:
            raise MessageError("bad_shape" if len(data) < 1 else "bad_field",
                               f"metrics frame needs a count of 0..{MAX_METRICS} values")
        out: dict[str, float] = {}
        at, prev = 1, ""
        for i in range(data[0]):
            n = data[at] if at < len(data) else 0
            if not 1 <= n <= 64 or at + 1 + n + _F64.size > len(data):
                raise MessageError("bad_shape", f"metrics value {i}: name of {n} bytes does not fit the frame")
            name = bytes(data[at + 1:at + 1 + n]).decode("ascii", errors="replace")
            if not METRIC_NAME.fullmatch(name) or name <= prev:
                raise MessageError("bad_field", f"metric name {name!r} must match {METRIC_NAME.pattern} and come "
                                                f"after {prev!r} (names strictly ascending)")
            out[name] = number(_F64.unpack_from(data, at + 1 + n)[0], f"values.{name}")
            at, prev = at + 1 + n + _F64.size, name
        if at != len(data):
            raise MessageError("bad_shape", f"{len(data) - at} bytes after the last metrics value")
        return cls(values=out)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Metrics:
        only(obj, {"values"}, "metrics")
        values = obj_of(need(obj, "values", "metrics"), "metrics.values", MAX_METRICS)
        out: dict[str, float] = {}
        for k, v in values.items():
            if not METRIC_NAME.fullmatch(k):
                raise MessageError("bad_field", f"metric name {k!r} must match {METRIC_NAME.pattern}")
            out[k] = number(v, f"values.{k}")
        return cls(values=out)


DEVICE_STATES = ("online", "offline")
STATE_REASONS = ("connected", "disconnected", "will")


@register
@dataclass(frozen=True)
class DeviceState:
    """Retained presence; the envelope's base_version/variant_id are the bundle version and variant in use.
    The last will is the same kind on the lwt channel."""

    KIND: ClassVar[str] = "device_state"
    CHANNELS: ClassVar[tuple[Channel, ...]] = (Channel.STATE, Channel.LWT)
    state: str
    last_seen: float
    reason: str = "connected"

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state, "last_seen": number(self.last_seen, "last_seen"), "reason": self.reason}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> DeviceState:
        w = "device_state"
        only(obj, {"state", "last_seen", "reason"}, w)
        state = need(obj, "state", w)
        reason = need(obj, "reason", w)
        if state not in DEVICE_STATES:
            raise MessageError("bad_field", f"state must be one of {DEVICE_STATES}, got {state!r}")
        if reason not in STATE_REASONS:
            raise MessageError("bad_field", f"reason must be one of {STATE_REASONS}, got {reason!r}")
        return cls(state=state, last_seen=number(need(obj, "last_seen", w), "last_seen"), reason=reason)


@register
@dataclass(frozen=True)
class BundleAnnouncement:
    """The fleet's current bundle, by reference (claim check): devices fetch `reference` and verify hashes."""

    KIND: ClassVar[str] = "bundle_announcement"
    CHANNELS: ClassVar[tuple[Channel, ...]] = (Channel.BUNDLE,)
    version: str
    reference: str  # URL or storage key of the bundle
    manifest_sha256: str
    size: int  # bytes of the whole bundle
    artifacts: Mapping[str, str]  # artifact file name -> sha256 hex
    # protocol/signing.py: the fleet key's signature over every field above plus the fleet and `sequence`
    # (strictly increasing per fleet: devices refuse a bundle not newer than the active one). 0/"": unsigned.
    sequence: int = 0
    signature: str = ""
    # Staged rollout (cloud/rollout.py): non-empty = only these devices act on it (the canary group);
    # every other device ignores the announcement. Signed with the rest when present.
    targets: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": self.version, "reference": self.reference,
                               "manifest_sha256": self.manifest_sha256, "size": int(self.size),
                               "artifacts": dict(self.artifacts)}
        if self.targets:  # fleet-wide announcements keep their old encoding
            out["targets"] = list(self.targets)
        if self.sequence or self.signature:  # unsigned announcements keep their old encoding
            out.update(sequence=int(self.sequence), signature=self.signature)
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> BundleAnnouncement:
        w = "bundle_announcement"
        only(obj, {"version", "reference", "manifest_sha256", "size", "artifacts", "sequence", "signature",
                   "targets"}, w)
        artifacts = obj_of(need(obj, "artifacts", w), "artifacts", 256)
        checked = {text(k, "artifact name", allow_empty=False): sha256_hex(v, f"artifacts[{k!r}]")
                   for k, v in artifacts.items()}
        return cls(version=text(need(obj, "version", w), "version", allow_empty=False),
                   reference=text(need(obj, "reference", w), "reference", max_len=2048, allow_empty=False),
                   manifest_sha256=sha256_hex(need(obj, "manifest_sha256", w), "manifest_sha256"),
                   size=integer(need(obj, "size", w), "size"), artifacts=checked,
                   sequence=integer(obj.get("sequence", 0), "sequence"),
                   signature=text(obj.get("signature", ""), "signature"),
                   targets=text_list(obj.get("targets", []), "targets", MAX_TARGETS))


MAX_TARGETS = 4096  # devices one staged announcement can name

PAYLOAD_TYPES: dict[str, Any] = {t.KIND: t for t in (PatchUpdate, Metrics, DeviceState, BundleAnnouncement,
                                                     PatchAck)}
