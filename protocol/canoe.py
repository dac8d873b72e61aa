"""Canoe wire formats (numpy + stdlib): help-request metadata, relayed tasks, offers, and the slice file.

Canoe messages live on their own topics under the device level, because the cloud relays a target's
request to a helper (and an offer back to the target): the generic envelope in `messages.py` requires
the sender to be the device named in the topic, which a relay is not.

    edgepatch/v1/<fleet>/<device>/canoe/meta      device -> cloud   CanoeMeta (label histogram), retained
    edgepatch/v1/<fleet>/<device>/canoe/request   target -> cloud   CanoeRequest (metadata only)
    edgepatch/v1/<fleet>/<helper>/canoe/task      cloud  -> helper  CanoeTask (the request + target id)
    edgepatch/v1/<fleet>/<helper>/canoe/offer     helper -> cloud   CanoeOffer (slice inline or by reference)
    edgepatch/v1/<fleet>/<target>/canoe/reply     cloud  -> target  CanoeReply (the offer, or an error)

Envelope: `{"schema": 1, "kind", "fleet", "device_id" (sender), "sent_at", "payload", "content_hash"}` with the
same canonical-JSON sha256 as `messages.py`. Requests carry metadata only (classes, a label histogram,
per-class accuracy): never samples.

Slice file (`encode_slice` / `decode_slice`): one `.npz` written and read with allow_pickle=False holding
`__header__` (UTF-8 JSON as uint8), `kept__<layer>` (int64 kept filter indices), `phi` (the helper's φ) and
the sliced base weights under their dotted names. The header names the bundle base version, the variant
whose widths the slice has (so it runs in the lite runtime's `infer_<vid>` signature without a new export)
and the sliced model description. The patch's shared θ̄/Θ are NOT shipped: the target already holds them
in its bundle and gathers them with the kept indices. The sha256 of the whole file travels in the offer.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from .messages import canonical_bytes, content_hash_of
from .model_spec import ModelSpec, PatchSpec, SpecError, param_infos
from .topics import PREFIX, TopicError, check_name
from .variants import KeptSets, Variant

CANOE_SCHEMA = 1
SLICE_FORMAT = "canoe-slice/1"
MAX_CANOE_MESSAGE_BYTES = 64 * 1024
INLINE_LIMIT_BYTES = 40 * 1024  # slice bytes shipped inline; base64 (4/3) + envelope stays under 64 KiB
MAX_SLICE_BYTES = 64 * 2**20
CHANNELS = ("meta", "request", "task", "offer", "reply")
ERROR_CODES = frozenset({"unknown_classes", "no_helper", "no_data", "helper_failed", "bad_request"})


class CanoeError(ValueError):
    """A Canoe message or slice that must not be used; the text names the problem."""


# ------------------------------------------------------------------------------------------- topics

def canoe_topic(fleet: str, device_id: str, channel: str) -> str:
    if channel not in CHANNELS:
        raise CanoeError(f"unknown canoe channel {channel!r}; known: {CHANNELS}")
    try:
        return f"{PREFIX}/{check_name(fleet, 'fleet')}/{check_name(device_id, 'device id')}/canoe/{channel}"
    except TopicError as exc:
        raise CanoeError(str(exc)) from None


def canoe_filter(fleet: str, channel: str) -> str:
    """Every device's `channel` in a fleet (the cloud's subscription)."""
    if channel not in CHANNELS:
        raise CanoeError(f"unknown canoe channel {channel!r}")
    return f"{PREFIX}/{check_name(fleet, 'fleet')}/+/canoe/{channel}"


def parse_canoe_topic(topic: str) -> tuple[str, str, str]:
    """(fleet, device, channel) of a concrete Canoe topic, or CanoeError."""
    levels = topic.split("/") if isinstance(topic, str) else []
    if len(levels) != 6 or "/".join(levels[:2]) != PREFIX or levels[4] != "canoe" or levels[5] not in CHANNELS:
        raise CanoeError(f"topic {topic!r} is not a canoe topic ({PREFIX}/<fleet>/<device>/canoe/<channel>)")
    try:
        return check_name(levels[2], "fleet"), check_name(levels[3], "device id"), levels[5]
    except TopicError as exc:
        raise CanoeError(str(exc)) from None


# ----------------------------------------------------------------------------------------- validators

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SHA = re.compile(r"^[0-9a-f]{64}$")


def _get(obj: Mapping[str, Any], key: str, where: str) -> Any:
    if not isinstance(obj, Mapping) or key not in obj:
        raise CanoeError(f"{where}: missing field {key!r}")
    return obj[key]


def _only(obj: Mapping[str, Any], keys: set[str], where: str) -> None:
    extra = set(obj) - keys
    if extra:
        raise CanoeError(f"{where}: unexpected field(s) {sorted(extra)}")


def _int(value: Any, what: str, lo: int = 0, hi: int = 2**53) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise CanoeError(f"{what} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _num(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise CanoeError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _text(value: Any, what: str, max_len: int = 256) -> str:
    if not isinstance(value, str) or len(value) > max_len:
        raise CanoeError(f"{what} must be a string of at most {max_len} characters")
    return value


def _ident(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _ID.match(value):
        raise CanoeError(f"{what} {value!r} must be 1-64 characters from [A-Za-z0-9._-]")
    return value


def _int_list(value: Any, what: str, max_len: int = 4096) -> list[int]:
    if not isinstance(value, list) or len(value) > max_len:
        raise CanoeError(f"{what} must be a list of at most {max_len} integers")
    return [_int(v, f"{what}[{i}]", -(2**31), 2**53) for i, v in enumerate(value)]


def _float_list(value: Any, what: str, max_len: int = 4096) -> list[float]:
    if not isinstance(value, list) or len(value) > max_len:
        raise CanoeError(f"{what} must be a list of at most {max_len} numbers")
    return [_num(v, f"{what}[{i}]") for i, v in enumerate(value)]


def check_classes(classes: list[int], num_classes: int) -> list[int]:
    """The requested classes, or CanoeError("unknown classes ...") naming those outside [0, num_classes)."""
    unknown = sorted({c for c in classes if not 0 <= c < num_classes})
    if unknown:
        raise CanoeError(f"unknown classes {unknown}: the model has classes 0..{num_classes - 1}")
    if not classes:
        raise CanoeError("a help request must name at least one class")
    return sorted(set(classes))


# ------------------------------------------------------------------------------------------ payloads

@dataclass(frozen=True)
class CanoeMeta:
    """What the cloud knows about a device for matching: its label histogram and per-class accuracy."""

    KIND: ClassVar[str] = "canoe_meta"
    label_histogram: list[int]
    class_accuracy: list[float] = field(default_factory=list)  # empty = unknown
    online: bool = True

    def to_json(self) -> dict[str, Any]:
        return {"label_histogram": list(map(int, self.label_histogram)),
                "class_accuracy": [float(a) for a in self.class_accuracy], "online": bool(self.online)}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> CanoeMeta:
        w = "canoe_meta"
        _only(obj, {"label_histogram", "class_accuracy", "online"}, w)
        hist = _int_list(_get(obj, "label_histogram", w), "label_histogram")
        if any(h < 0 for h in hist):
            raise CanoeError("label_histogram counts must be >= 0")
        online = _get(obj, "online", w)
        if not isinstance(online, bool):
            raise CanoeError("online must be true or false")
        return cls(hist, _float_list(_get(obj, "class_accuracy", w), "class_accuracy"), online)


@dataclass(frozen=True)
class CanoeRequest:
    """A target's help request: metadata only (never samples)."""

    KIND: ClassVar[str] = "canoe_request"
    request_id: str
    classes: list[int]  # under-performing or new classes
    label_histogram: list[int]  # the target's recent window
    window_accuracy: float
    reference_accuracy: float
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "classes": list(map(int, self.classes)),
                "label_histogram": list(map(int, self.label_histogram)),
                "window_accuracy": float(self.window_accuracy),
                "reference_accuracy": float(self.reference_accuracy), "reason": self.reason}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> CanoeRequest:
        w = "canoe_request"
        _only(obj, {"request_id", "classes", "label_histogram", "window_accuracy", "reference_accuracy",
                    "reason"}, w)
        return cls(_ident(_get(obj, "request_id", w), "request_id"), _int_list(_get(obj, "classes", w), "classes"),
                   _int_list(_get(obj, "label_histogram", w), "label_histogram"),
                   _num(_get(obj, "window_accuracy", w), "window_accuracy"),
                   _num(_get(obj, "reference_accuracy", w), "reference_accuracy"),
                   _text(_get(obj, "reason", w), "reason"))


@dataclass(frozen=True)
class CanoeTask:
    """The cloud's relay of a request to one helper."""

    KIND: ClassVar[str] = "canoe_task"
    request_id: str
    target: str
    classes: list[int]
    variant_id: str = ""  # the slice width the target's runtime runs ("" = the helper picks the smallest)

    def to_json(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "target": self.target, "classes": list(map(int, self.classes)),
                "variant_id": self.variant_id}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> CanoeTask:
        w = "canoe_task"
        _only(obj, {"request_id", "target", "classes", "variant_id"}, w)
        vid = _text(_get(obj, "variant_id", w), "variant_id", 64)
        return cls(_ident(_get(obj, "request_id", w), "request_id"), _ident(_get(obj, "target", w), "target"),
                   _int_list(_get(obj, "classes", w), "classes"), vid)


@dataclass(frozen=True)
class CanoeOffer:
    """A helper's answer: the slice inline (base64) or by reference, with its sha256 and size; or an error."""

    KIND: ClassVar[str] = "canoe_offer"
    request_id: str
    target: str
    helper: str
    sha256: str = ""
    size: int = 0
    inline_b64: str = ""
    reference: str = ""
    error: str = ""  # one of ERROR_CODES, then ": details"

    @property
    def ok(self) -> bool:
        return not self.error

    def to_json(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "target": self.target, "helper": self.helper, "sha256": self.sha256,
                "size": int(self.size), "inline_b64": self.inline_b64, "reference": self.reference,
                "error": self.error}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> CanoeOffer:
        w = "canoe_offer"
        _only(obj, {"request_id", "target", "helper", "sha256", "size", "inline_b64", "reference", "error"}, w)
        offer = cls(_ident(_get(obj, "request_id", w), "request_id"), _ident(_get(obj, "target", w), "target"),
                    _ident(_get(obj, "helper", w), "helper"), _text(_get(obj, "sha256", w), "sha256", 64),
                    _int(_get(obj, "size", w), "size", 0, MAX_SLICE_BYTES),
                    _text(_get(obj, "inline_b64", w), "inline_b64", MAX_CANOE_MESSAGE_BYTES),
                    _text(_get(obj, "reference", w), "reference", 2048), _text(_get(obj, "error", w), "error", 512))
        if offer.error:
            if offer.error.split(":", 1)[0] not in ERROR_CODES:
                raise CanoeError(f"offer error code must be one of {sorted(ERROR_CODES)}: {offer.error!r}")
        else:
            if not _SHA.match(offer.sha256):
                raise CanoeError("offer sha256 must be 64 lowercase hex characters")
            if bool(offer.inline_b64) == bool(offer.reference):
                raise CanoeError("an offer carries the slice either inline or by reference (exactly one)")
        return offer

    def slice_bytes(self) -> bytes:
        """The inline slice (base64-decoded); CanoeError when the offer is by reference or malformed."""
        if not self.inline_b64:
            raise CanoeError("the offer ships its slice by reference, not inline")
        try:
            return base64.b64decode(self.inline_b64.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise CanoeError("inline slice is not valid base64") from None


@dataclass(frozen=True)
class CanoeReply:
    """The cloud's answer to a target: the offer relayed, or an error (unknown classes, no helper)."""

    KIND: ClassVar[str] = "canoe_reply"
    request_id: str
    offer: CanoeOffer | None = None
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "offer": self.offer.to_json() if self.offer else None,
                "error": self.error}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> CanoeReply:
        w = "canoe_reply"
        _only(obj, {"request_id", "offer", "error"}, w)
        raw = _get(obj, "offer", w)
        offer = CanoeOffer.from_json(raw) if raw is not None else None
        error = _text(_get(obj, "error", w), "error", 512)
        if (offer is None) == (not error):
            raise CanoeError("a reply carries either an offer or an error")
        return cls(_ident(_get(obj, "request_id", w), "request_id"), offer, error)


CanoePayload = CanoeMeta | CanoeRequest | CanoeTask | CanoeOffer | CanoeReply
KINDS: dict[str, type[CanoePayload]] = {t.KIND: t for t in (CanoeMeta, CanoeRequest, CanoeTask, CanoeOffer,
                                                            CanoeReply)}
CHANNEL_OF_KIND = {"canoe_meta": "meta", "canoe_request": "request", "canoe_task": "task",
                   "canoe_offer": "offer", "canoe_reply": "reply"}


@dataclass(frozen=True)
class CanoeMessage:
    kind: str
    fleet: str
    device_id: str  # sender
    sent_at: float
    payload: CanoePayload
    content_hash: str


def encode_message(payload: CanoePayload, *, fleet: str, device_id: str, sent_at: float | None = None) -> bytes:
    body = payload.to_json()
    type(payload).from_json(json.loads(canonical_bytes(body)))  # never send what receivers reject
    env: dict[str, Any] = {"schema": CANOE_SCHEMA, "kind": payload.KIND, "fleet": check_name(fleet, "fleet"),
           "device_id": check_name(device_id, "device id"),
           "sent_at": time.time() if sent_at is None else float(sent_at), "payload": body}
    env["content_hash"] = content_hash_of(env)
    data = canonical_bytes(env)
    if len(data) > MAX_CANOE_MESSAGE_BYTES:
        raise CanoeError(f"canoe message is {len(data)} bytes > {MAX_CANOE_MESSAGE_BYTES}: ship by reference")
    return data


def decode_message(topic: str, data: bytes) -> CanoeMessage:
    """Validate a received Canoe message completely (topic, size, JSON, schema, kind, fields, hash)."""
    fleet, _, channel = parse_canoe_topic(topic)
    if len(data) > MAX_CANOE_MESSAGE_BYTES:
        raise CanoeError(f"message of {len(data)} bytes exceeds {MAX_CANOE_MESSAGE_BYTES}")
    try:
        env = json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CanoeError(f"not UTF-8 JSON: {exc}") from None
    if not isinstance(env, dict) or env.get("schema") != CANOE_SCHEMA:
        raise CanoeError(f"not a canoe envelope of schema {CANOE_SCHEMA}")
    _only(env, {"schema", "kind", "fleet", "device_id", "sent_at", "payload", "content_hash"}, "envelope")
    kind = _get(env, "kind", "envelope")
    if kind not in KINDS:
        raise CanoeError(f"unknown canoe kind {kind!r}")
    if CHANNEL_OF_KIND[kind] != channel:
        raise CanoeError(f"kind {kind!r} does not belong on channel {channel!r}")
    if _get(env, "fleet", "envelope") != fleet:
        raise CanoeError(f"fleet {env['fleet']!r} != topic fleet {fleet!r}")
    if env.get("content_hash") != content_hash_of(env):
        raise CanoeError("content_hash missing or does not match the content")
    payload_json = _get(env, "payload", "envelope")
    if not isinstance(payload_json, dict):
        raise CanoeError("payload must be a JSON object")
    payload = KINDS[kind].from_json(payload_json)
    return CanoeMessage(kind, fleet, _ident(_get(env, "device_id", "envelope"), "device_id"),
                        _num(_get(env, "sent_at", "envelope"), "sent_at"), payload, env["content_hash"])


# --------------------------------------------------------------------------------------- slice file

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
        header = json.loads(arrays.pop("__header__").tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CanoeError(f"slice header is not JSON: {exc}") from None
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
    return CanoeSlice(_text(header.get("base_version"), "base_version"), _text(header.get("variant_id"), "variant_id"),
                      _text(header.get("helper"), "helper"), _text(header.get("request_id"), "request_id"),
                      _int_list(header.get("classes"), "classes"), kept, base, phi, spec,
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
