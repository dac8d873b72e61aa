"""Messages of the device <-> cloud wire: JSON envelopes, strict decoding, content hashes (numpy + stdlib).

Envelope (UTF-8 JSON object, at most `MAX_MESSAGE_BYTES`):

    {"schema": 1, "kind": "patch_update", "device_id": "dev-1", "fleet": "lab", "base_version": "b3",
     "variant_id": "v50", "seq": 17, "sent_at": 1712345678.25, "payload": {...}, "content_hash": "<hex>"}

`content_hash` = sha256 (hex) of the canonical encoding of the envelope without `content_hash`:
`json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)` in UTF-8.
Receivers recompute it from the parsed object, so the hash doubles as an idempotency key (a message resent
after a lost PUBACK has the same hash) and catches corruption and half-edited payloads.

Arrays never travel as pickles: `{"dtype": "<f4", "shape": [k], "b64": base64(little-endian float32)}`.

`decode()` trusts nothing: every failure raises `MessageError(reason, text)` where `reason` is one of
`REASONS`, stable so a receiver can count rejects by reason.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from .topics import Channel, TopicError, bundle_topic, check_name, device_topic, parse_topic

SCHEMA_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024
ARRAY_DTYPE = "<f4"
MAX_TEXT = 256  # longest free-text field (versions, ids, references)

REASONS = frozenset({
    "oversize",        # payload larger than max_bytes
    "empty",           # zero-length payload (an MQTT retained-message delete, not a message)
    "bad_json",        # not UTF-8, not JSON, duplicate keys, or not a JSON object
    "schema",          # schema version missing or not one this code speaks
    "bad_topic",       # topic not in the edgepatch layout
    "unknown_kind",    # kind is not a known message type
    "topic_mismatch",  # kind/fleet/device id disagree with the topic
    "bad_field",       # a field is missing, of the wrong type, out of range, or unexpected
    "non_finite",      # NaN or infinity anywhere
    "bad_shape",       # array shape/dtype/byte length inconsistent
    "hash_mismatch",   # content_hash missing or does not match the content
})


class MessageError(ValueError):
    """A message that must not be used. `reason` is one of REASONS."""

    def __init__(self, reason: str, text: str) -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {text}")
        self.reason = reason
        self.text = text


# ---------------------------------------------------------------------------------------------- fields

def _require(obj: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in obj:
        raise MessageError("bad_field", f"{where}: missing field {key!r}")
    return obj[key]


def _only_keys(obj: Mapping[str, Any], allowed: set[str], where: str) -> None:
    extra = set(obj) - allowed
    if extra:
        raise MessageError("bad_field", f"{where}: unexpected field(s) {sorted(extra)}")


def _int(value: Any, what: str, minimum: int = 0, maximum: int = 2**53) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise MessageError("bad_field", f"{what} must be an integer, got {type(value).__name__}")
    if not minimum <= value <= maximum:
        raise MessageError("bad_field", f"{what}={value} outside [{minimum}, {maximum}]")
    return value


def _float(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MessageError("bad_field", f"{what} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise MessageError("non_finite", f"{what} is {value}")
    return float(value)


def _str(value: Any, what: str, max_len: int = MAX_TEXT, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise MessageError("bad_field", f"{what} must be a string, got {type(value).__name__}")
    if len(value) > max_len or (not allow_empty and not value):
        raise MessageError("bad_field", f"{what} must be {'1' if not allow_empty else '0'}..{max_len} characters")
    return value


def _name(value: Any, what: str) -> str:
    try:
        return check_name(value, what)
    except TopicError as exc:
        raise MessageError("bad_field", str(exc)) from None


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _sha256(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _SHA256.match(value):
        raise MessageError("bad_field", f"{what} must be 64 lowercase hex characters")
    return value


def _check_finite_floats(value: float, what: str) -> None:
    if not math.isfinite(value):
        raise MessageError("non_finite", f"{what} is {value}")


def encode_array(arr: np.ndarray) -> dict[str, Any]:
    """float32 array -> JSON-safe dict (little-endian bytes, base64). Rejects NaN/inf at the source."""
    a = np.ascontiguousarray(np.asarray(arr), dtype=ARRAY_DTYPE)
    if not np.all(np.isfinite(a)):
        raise MessageError("non_finite", "array holds NaN or infinity")
    return {"dtype": ARRAY_DTYPE, "shape": [int(d) for d in a.shape], "b64": base64.b64encode(a.tobytes()).decode()}


def decode_array(obj: Any, what: str, ndim: int | None = None) -> np.ndarray:
    if not isinstance(obj, dict):
        raise MessageError("bad_field", f"{what} must be an array object")
    _only_keys(obj, {"dtype", "shape", "b64"}, what)
    if _require(obj, "dtype", what) != ARRAY_DTYPE:
        raise MessageError("bad_shape", f"{what}: dtype must be {ARRAY_DTYPE!r}, got {obj['dtype']!r}")
    shape = _require(obj, "shape", what)
    if not isinstance(shape, list) or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape):
        raise MessageError("bad_shape", f"{what}: shape must be a list of non-negative integers")
    if ndim is not None and len(shape) != ndim:
        raise MessageError("bad_shape", f"{what}: expected {ndim} dimension(s), got shape {shape}")
    b64 = _require(obj, "b64", what)
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


# -------------------------------------------------------------------------------------------- payloads

@dataclass(frozen=True)
class PatchUpdate:
    """A device's trained patch coefficients phi for (base_version, variant_id) from the envelope."""

    KIND: ClassVar[str] = "patch_update"
    CHANNEL: ClassVar[Channel] = Channel.PATCH
    phi: np.ndarray = field(compare=False)
    steps: int
    samples: int
    holdout_acc: float
    loss: float

    def to_json(self) -> dict[str, Any]:
        for name in ("holdout_acc", "loss"):
            _check_finite_floats(getattr(self, name), name)
        phi = np.asarray(self.phi)
        if phi.ndim != 1 or phi.size == 0:
            raise MessageError("bad_shape", f"phi must be a non-empty 1-D array, got shape {phi.shape}")
        return {"phi": encode_array(phi), "steps": int(self.steps), "samples": int(self.samples),
                "holdout_acc": float(self.holdout_acc), "loss": float(self.loss)}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> PatchUpdate:
        w = "patch_update"
        _only_keys(obj, {"phi", "steps", "samples", "holdout_acc", "loss"}, w)
        phi = decode_array(_require(obj, "phi", w), "phi", ndim=1)
        if phi.size == 0:
            raise MessageError("bad_shape", "phi is empty")
        acc = _float(_require(obj, "holdout_acc", w), "holdout_acc")
        if not 0.0 <= acc <= 1.0:
            raise MessageError("bad_field", f"holdout_acc={acc} outside [0, 1]")
        return cls(phi=phi, steps=_int(_require(obj, "steps", w), "steps"),
                   samples=_int(_require(obj, "samples", w), "samples"),
                   holdout_acc=acc, loss=_float(_require(obj, "loss", w), "loss"))


_METRIC_NAME = re.compile(r"^[a-z][a-z0-9_.]{0,63}$")
MAX_METRICS = 128


@dataclass(frozen=True)
class Metrics:
    """Named scalar measurements (e.g. train_ms, infer_ms, rss_bytes, battery)."""

    KIND: ClassVar[str] = "metrics"
    CHANNEL: ClassVar[Channel] = Channel.METRICS
    values: Mapping[str, float]

    def to_json(self) -> dict[str, Any]:
        return {"values": {str(k): _float(float(v), f"values.{k}") for k, v in self.values.items()}}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Metrics:
        _only_keys(obj, {"values"}, "metrics")
        values = _require(obj, "values", "metrics")
        if not isinstance(values, dict) or len(values) > MAX_METRICS:
            raise MessageError("bad_field", f"metrics.values must be an object of at most {MAX_METRICS} entries")
        out: dict[str, float] = {}
        for k, v in values.items():
            if not _METRIC_NAME.match(k):
                raise MessageError("bad_field", f"metric name {k!r} must match {_METRIC_NAME.pattern}")
            out[k] = _float(v, f"values.{k}")
        return cls(values=out)


DEVICE_STATES = ("online", "offline")
STATE_REASONS = ("connected", "disconnected", "will")


@dataclass(frozen=True)
class DeviceState:
    """Retained presence; the envelope's base_version/variant_id are the bundle version and variant in use."""

    KIND: ClassVar[str] = "device_state"
    CHANNEL: ClassVar[Channel] = Channel.STATE  # the last will of the same kind goes to Channel.LWT
    state: str
    last_seen: float
    reason: str = "connected"

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state, "last_seen": _float(self.last_seen, "last_seen"), "reason": self.reason}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> DeviceState:
        w = "device_state"
        _only_keys(obj, {"state", "last_seen", "reason"}, w)
        state = _require(obj, "state", w)
        reason = _require(obj, "reason", w)
        if state not in DEVICE_STATES:
            raise MessageError("bad_field", f"state must be one of {DEVICE_STATES}, got {state!r}")
        if reason not in STATE_REASONS:
            raise MessageError("bad_field", f"reason must be one of {STATE_REASONS}, got {reason!r}")
        return cls(state=state, last_seen=_float(_require(obj, "last_seen", w), "last_seen"), reason=reason)


@dataclass(frozen=True)
class BundleAnnouncement:
    """The fleet's current bundle, by reference (claim check): devices fetch `reference` and verify hashes."""

    KIND: ClassVar[str] = "bundle_announcement"
    CHANNEL: ClassVar[Channel] = Channel.BUNDLE
    version: str
    reference: str  # URL or storage key of the bundle
    manifest_sha256: str
    size: int  # bytes of the whole bundle
    artifacts: Mapping[str, str]  # artifact file name -> sha256 hex

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "reference": self.reference, "manifest_sha256": self.manifest_sha256,
                "size": int(self.size), "artifacts": dict(self.artifacts)}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> BundleAnnouncement:
        w = "bundle_announcement"
        _only_keys(obj, {"version", "reference", "manifest_sha256", "size", "artifacts"}, w)
        artifacts = _require(obj, "artifacts", w)
        if not isinstance(artifacts, dict) or len(artifacts) > 256:
            raise MessageError("bad_field", "artifacts must be an object of at most 256 entries")
        checked = {_str(k, "artifact name", allow_empty=False): _sha256(v, f"artifacts[{k!r}]")
                   for k, v in artifacts.items()}
        return cls(version=_str(_require(obj, "version", w), "version", allow_empty=False),
                   reference=_str(_require(obj, "reference", w), "reference", max_len=2048, allow_empty=False),
                   manifest_sha256=_sha256(_require(obj, "manifest_sha256", w), "manifest_sha256"),
                   size=_int(_require(obj, "size", w), "size"), artifacts=checked)


@dataclass(frozen=True)
class HelpRequest:
    """Placeholder (metadata only): a device asks peers for help (e.g. a patch or a model slice)."""

    KIND: ClassVar[str] = "help_request"
    CHANNEL: ClassVar[Channel] = Channel.HELP_REQUEST
    request_id: str
    want: str
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "want": self.want, "note": self.note}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> HelpRequest:
        w = "help_request"
        _only_keys(obj, {"request_id", "want", "note"}, w)
        return cls(request_id=_name(_require(obj, "request_id", w), "request_id"),
                   want=_str(_require(obj, "want", w), "want", max_len=64, allow_empty=False),
                   note=_str(_require(obj, "note", w), "note"))


@dataclass(frozen=True)
class HelpOffer:
    """Placeholder (metadata only): an answer to a HelpRequest; the content travels by reference."""

    KIND: ClassVar[str] = "help_offer"
    CHANNEL: ClassVar[Channel] = Channel.HELP_OFFER
    request_id: str
    to_device: str
    reference: str
    size: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "to_device": self.to_device, "reference": self.reference,
                "size": int(self.size), "sha256": self.sha256}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> HelpOffer:
        w = "help_offer"
        _only_keys(obj, {"request_id", "to_device", "reference", "size", "sha256"}, w)
        return cls(request_id=_name(_require(obj, "request_id", w), "request_id"),
                   to_device=_name(_require(obj, "to_device", w), "to_device"),
                   reference=_str(_require(obj, "reference", w), "reference", max_len=2048, allow_empty=False),
                   size=_int(_require(obj, "size", w), "size"),
                   sha256=_sha256(_require(obj, "sha256", w), "sha256"))


Payload = PatchUpdate | Metrics | DeviceState | BundleAnnouncement | HelpRequest | HelpOffer
PAYLOAD_TYPES: dict[str, type[Payload]] = {
    t.KIND: t for t in (PatchUpdate, Metrics, DeviceState, BundleAnnouncement, HelpRequest, HelpOffer)
}
# Which kinds may appear on which channel (the last will is a DeviceState on the lwt channel).
CHANNEL_KINDS: dict[Channel, str] = {
    Channel.STATE: DeviceState.KIND, Channel.LWT: DeviceState.KIND, Channel.PATCH: PatchUpdate.KIND,
    Channel.METRICS: Metrics.KIND, Channel.HELP_REQUEST: HelpRequest.KIND, Channel.HELP_OFFER: HelpOffer.KIND,
    Channel.BUNDLE: BundleAnnouncement.KIND,
}


# -------------------------------------------------------------------------------------------- envelope

@dataclass(frozen=True)
class Message:
    kind: str
    device_id: str  # sender (for bundle announcements: the cloud's id)
    fleet: str
    base_version: str  # bundle version the sender runs / announces
    variant_id: str
    seq: int  # monotonic per sender
    sent_at: float  # unix seconds
    payload: Payload
    content_hash: str
    schema: int = SCHEMA_VERSION

    def topic(self, channel: Channel | None = None) -> str:
        """Where this message goes; `channel` only to pick Channel.LWT for a will."""
        ch = channel or type(self.payload).CHANNEL
        if CHANNEL_KINDS[ch] != self.kind:
            raise MessageError("topic_mismatch", f"kind {self.kind!r} does not go on channel {ch.value!r}")
        if ch is Channel.BUNDLE:
            return bundle_topic(self.fleet)
        return device_topic(self.fleet, self.device_id, ch)


def canonical_bytes(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def content_hash_of(envelope: Mapping[str, Any]) -> str:
    """sha256 hex over the canonical encoding of everything but `content_hash`."""
    return hashlib.sha256(canonical_bytes({k: v for k, v in envelope.items() if k != "content_hash"})).hexdigest()


def _envelope(msg_fields: Mapping[str, Any], payload_json: dict[str, Any]) -> dict[str, Any]:
    return {"schema": SCHEMA_VERSION, **msg_fields, "payload": payload_json}


def make_message(payload: Payload, *, device_id: str, fleet: str, base_version: str, variant_id: str,
                 seq: int, sent_at: float | None = None) -> Message:
    """Build a validated message and its content hash (rejects what decode() would reject)."""
    header = {"kind": payload.KIND, "device_id": _name(device_id, "device_id"), "fleet": _name(fleet, "fleet"),
              "base_version": _str(base_version, "base_version"), "variant_id": _str(variant_id, "variant_id"),
              "seq": _int(seq, "seq"), "sent_at": _float(time.time() if sent_at is None else sent_at, "sent_at")}
    env = _envelope(header, payload.to_json())
    # Round-trip through the strict parser so the sender can never emit what receivers reject.
    checked = type(payload).from_json(json.loads(canonical_bytes(env["payload"])))
    return Message(payload=checked, content_hash=content_hash_of(env), **header)  # type: ignore[arg-type]


def to_json(msg: Message) -> dict[str, Any]:
    header = {"kind": msg.kind, "device_id": msg.device_id, "fleet": msg.fleet, "base_version": msg.base_version,
              "variant_id": msg.variant_id, "seq": msg.seq, "sent_at": msg.sent_at}
    env = _envelope(header, msg.payload.to_json())
    env["content_hash"] = msg.content_hash
    return env


def encode(msg: Message, max_bytes: int = MAX_MESSAGE_BYTES) -> bytes:
    data = canonical_bytes(to_json(msg))
    if len(data) > max_bytes:
        raise MessageError("oversize", f"encoded message is {len(data)} bytes > limit {max_bytes}; "
                                       "send large content by reference")
    return data


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise MessageError("bad_json", f"duplicate key {k!r}")
        out[k] = v
    return out


def loads_strict(data: bytes) -> Any:
    """UTF-8 JSON with no duplicate keys and no NaN/Infinity literals, or MessageError('bad_json'/…)."""
    try:
        return json.loads(bytes(data).decode("utf-8"), object_pairs_hook=_no_duplicate_keys,
                          parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        raise MessageError("bad_json", f"not UTF-8: {exc}") from None
    except json.JSONDecodeError as exc:
        raise MessageError("bad_json", f"not JSON: {exc}") from None
    except RecursionError:
        raise MessageError("bad_json", "JSON nested too deeply") from None


def _reject_constant(name: str) -> Any:
    raise MessageError("non_finite", f"JSON constant {name} is not allowed")


_HEADER_KEYS = {"schema", "kind", "device_id", "fleet", "base_version", "variant_id", "seq", "sent_at",
                "payload", "content_hash"}


def decode(topic: str, data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """Validate everything about a received (topic, payload) pair and return the Message, or raise MessageError."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MessageError("bad_json", f"payload must be bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise MessageError("oversize", f"{len(data)} bytes > limit {max_bytes}")
    if len(data) == 0:
        raise MessageError("empty", "zero-length payload (retained message cleared)")
    env = loads_strict(data)
    if not isinstance(env, dict):
        raise MessageError("bad_json", f"top level must be a JSON object, got {type(env).__name__}")

    schema = env.get("schema")
    if isinstance(schema, bool) or not isinstance(schema, int) or schema != SCHEMA_VERSION:
        raise MessageError("schema", f"schema {schema!r} is not supported (this code speaks {SCHEMA_VERSION})")
    try:
        address = parse_topic(topic)
    except TopicError as exc:
        raise MessageError("bad_topic", str(exc)) from None
    kind = env.get("kind")
    if kind not in PAYLOAD_TYPES:
        raise MessageError("unknown_kind", f"kind {kind!r} is not one of {sorted(PAYLOAD_TYPES)}")
    if CHANNEL_KINDS[address.channel] != kind:
        raise MessageError("topic_mismatch", f"kind {kind!r} does not belong on channel {address.channel.value!r}")
    _only_keys(env, _HEADER_KEYS, "envelope")

    device_id = _name(_require(env, "device_id", "envelope"), "device_id")
    fleet = _name(_require(env, "fleet", "envelope"), "fleet")
    if fleet != address.fleet:
        raise MessageError("topic_mismatch", f"fleet {fleet!r} != topic fleet {address.fleet!r}")
    if address.device_id is not None and device_id != address.device_id:
        raise MessageError("topic_mismatch", f"device_id {device_id!r} != topic device {address.device_id!r}")
    header = {"kind": kind, "device_id": device_id, "fleet": fleet,
              "base_version": _str(_require(env, "base_version", "envelope"), "base_version"),
              "variant_id": _str(_require(env, "variant_id", "envelope"), "variant_id"),
              "seq": _int(_require(env, "seq", "envelope"), "seq"),
              "sent_at": _float(_require(env, "sent_at", "envelope"), "sent_at")}
    payload_json = _require(env, "payload", "envelope")
    if not isinstance(payload_json, dict):
        raise MessageError("bad_field", "payload must be a JSON object")
    payload = PAYLOAD_TYPES[kind].from_json(payload_json)

    claimed = env.get("content_hash")
    if not isinstance(claimed, str):
        raise MessageError("hash_mismatch", "content_hash missing")
    actual = content_hash_of(env)
    if claimed != actual:
        raise MessageError("hash_mismatch", f"content_hash {claimed[:16]}... != computed {actual[:16]}...")
    return Message(payload=payload, content_hash=actual, **header)
