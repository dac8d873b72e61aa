"""The one wire codec: strict JSON, the validator kit, and the envelope every message family travels in.

Envelope (UTF-8 JSON object, at most `MAX_MESSAGE_BYTES`), the same for patches, metrics, presence,
bundle announcements, Canoe and federated rounds:

    {"schema": 1, "kind": "patch_update", "device_id": "dev-1", "fleet": "lab", "base_version": "b3",
     "variant_id": "v50", "seq": 17, "sent_at": 1712345678.25, "payload": {...}, "content_hash": "<hex>"}

`device_id` is the sender (the cloud's id for what the cloud sends); `base_version`/`variant_id` are the
bundle and variant the sender runs ("" when it has none, e.g. the FL server). `content_hash` = sha256 (hex)
of the canonical encoding of the envelope without `content_hash`:
`json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)` in UTF-8.
Receivers recompute it from the parsed object, so the hash doubles as an idempotency key (a message resent
after a lost PUBACK has the same hash) and catches corruption and half-edited payloads.

Strict JSON (`loads_strict`), for every family: duplicate keys, NaN/Infinity literals, NUL and other
control characters in any string (keys included), and integers outside signed 64 bits are refused.

Payload types register themselves with `@register` (messages.py, canoe.py, fl.py); each names the
channels it may travel on (`CHANNELS`, the first is its default). `decode()` trusts nothing: every
failure raises `MessageError(reason, text)` where `reason` is one of `REASONS`, stable so a receiver can
count rejects by reason.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from .topics import (
    FLEET_CHANNELS,
    RELAYED_CHANNELS,
    Channel,
    TopicError,
    check_name,
    device_topic,
    fleet_topic,
)
from .topics import parse_topic as _parse_topic

SCHEMA_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024
MAX_TEXT = 256  # longest free-text field (versions, ids, reasons)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

REASONS = frozenset({
    "oversize",        # payload larger than max_bytes
    "empty",           # zero-length payload (an MQTT retained-message delete, not a message)
    "bad_json",        # not UTF-8, not JSON, duplicate keys, or not a JSON object
    "schema",          # schema version missing or not one this code speaks
    "bad_topic",       # topic not in the edgepatch layout
    "unknown_kind",    # kind is not a known message type
    "topic_mismatch",  # kind/fleet/device id disagree with the topic
    "bad_field",       # a field is missing, of the wrong type, out of range, unexpected, or holds control chars
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


# ------------------------------------------------------------------------------------------ validator kit

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def need(obj: Mapping[str, Any], key: str, where: str) -> Any:
    if not isinstance(obj, Mapping) or key not in obj:
        raise MessageError("bad_field", f"{where}: missing field {key!r}")
    return obj[key]


def only(obj: Mapping[str, Any], allowed: set[str], where: str) -> None:
    extra = set(obj) - allowed
    if extra:
        raise MessageError("bad_field", f"{where}: unexpected field(s) {sorted(extra)}")


def obj_of(value: Any, what: str, max_items: int | None = None) -> dict[str, Any]:
    if not isinstance(value, dict) or (max_items is not None and len(value) > max_items):
        limit = f" of at most {max_items} entries" if max_items is not None else ""
        raise MessageError("bad_field", f"{what} must be a JSON object{limit}")
    return value


def integer(value: Any, what: str, lo: int = 0, hi: int = INT64_MAX) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise MessageError("bad_field", f"{what} must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise MessageError("bad_field", f"{what}={value} outside [{lo}, {hi}]")
    return value


def number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MessageError("bad_field", f"{what} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise MessageError("non_finite", f"{what} is {value}")
    return float(value)


def opt_number(value: Any, what: str) -> float | None:
    return None if value is None else number(value, what)


def boolean(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise MessageError("bad_field", f"{what} must be true or false")
    return value


def text(value: Any, what: str, max_len: int = MAX_TEXT, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise MessageError("bad_field", f"{what} must be a string, got {type(value).__name__}")
    if len(value) > max_len or (not allow_empty and not value):
        raise MessageError("bad_field", f"{what} must be {'0' if allow_empty else '1'}..{max_len} characters")
    if _CONTROL.search(value):
        raise MessageError("bad_field", f"{what} holds a control character")
    return value


def name(value: Any, what: str) -> str:
    """One topic level (fleet, device id, request id)."""
    try:
        return check_name(value, what)
    except TopicError as exc:
        raise MessageError("bad_field", str(exc)) from None


def sha256_hex(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _SHA256.match(value):
        raise MessageError("bad_field", f"{what} must be 64 lowercase hex characters")
    return value


def int_list(value: Any, what: str, max_len: int = 4096, lo: int = INT64_MIN, hi: int = INT64_MAX) -> list[int]:
    if not isinstance(value, list) or len(value) > max_len:
        raise MessageError("bad_field", f"{what} must be a list of at most {max_len} integers")
    return [integer(v, f"{what}[{i}]", lo, hi) for i, v in enumerate(value)]


def float_list(value: Any, what: str, max_len: int = 4096) -> list[float]:
    if not isinstance(value, list) or len(value) > max_len:
        raise MessageError("bad_field", f"{what} must be a list of at most {max_len} numbers")
    return [number(v, f"{what}[{i}]") for i, v in enumerate(value)]


def text_list(value: Any, what: str, max_items: int = 64) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > max_items:
        raise MessageError("bad_field", f"{what} must be a list of at most {max_items} strings")
    return tuple(text(v, f"{what}[{i}]", allow_empty=False) for i, v in enumerate(value))


def counts(value: Any, what: str, max_items: int = 256) -> dict[str, int]:
    raw = obj_of(value, what, max_items)
    return {text(k, f"{what} key", allow_empty=False): integer(v, f"{what}[{k!r}]") for k, v in raw.items()}


# ------------------------------------------------------------------------------------------- strict JSON

def canonical_bytes(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def content_hash_of(envelope: Mapping[str, Any]) -> str:
    """sha256 hex over the canonical encoding of everything but `content_hash`."""
    return hashlib.sha256(canonical_bytes({k: v for k, v in envelope.items() if k != "content_hash"})).hexdigest()


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise MessageError("bad_json", f"duplicate key {k!r}")
        out[k] = v
    return out


def _reject_constant(literal: str) -> Any:
    raise MessageError("non_finite", f"JSON constant {literal} is not allowed")


def _check_values(value: Any, where: str = "$") -> None:
    """Control characters in any string and integers beyond 64 bits, anywhere in the document."""
    stack = [(value, where)]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            if _CONTROL.search(item):
                raise MessageError("bad_field", f"{path} holds a control character")
        elif isinstance(item, bool) or item is None or isinstance(item, float):
            continue
        elif isinstance(item, int):
            if not INT64_MIN <= item <= INT64_MAX:
                raise MessageError("bad_field", f"{path}={item} does not fit in 64 bits")
        elif isinstance(item, dict):
            for k, v in item.items():
                if _CONTROL.search(k):
                    raise MessageError("bad_field", f"key {k!r} under {path} holds a control character")
                stack.append((v, f"{path}.{k}"))
        elif isinstance(item, list):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(item))


def loads_strict(data: bytes) -> Any:
    """UTF-8 JSON under the rules above, or MessageError('bad_json' / 'non_finite' / 'bad_field')."""
    try:
        value = json.loads(bytes(data).decode("utf-8"), object_pairs_hook=_no_duplicate_keys,
                           parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        raise MessageError("bad_json", f"not UTF-8: {exc}") from None
    except json.JSONDecodeError as exc:
        raise MessageError("bad_json", f"not JSON: {exc}") from None
    except RecursionError:
        raise MessageError("bad_json", "JSON nested too deeply") from None
    _check_values(value)
    return value


# ---------------------------------------------------------------------------------------------- registry

class Payload(Protocol):
    KIND: ClassVar[str]
    CHANNELS: ClassVar[tuple[Channel, ...]]

    def to_json(self) -> dict[str, Any]: ...

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Any: ...


KINDS: dict[str, Any] = {}  # kind -> payload class (filled by @register in the family modules)
CHANNEL_KINDS: dict[Channel, set[str]] = {}


def register(cls: Any) -> Any:
    """Class decorator: make a payload type known to `decode` on its channels."""
    if cls.KIND in KINDS:
        raise ValueError(f"payload kind {cls.KIND!r} registered twice")
    KINDS[cls.KIND] = cls
    for ch in cls.CHANNELS:
        CHANNEL_KINDS.setdefault(ch, set()).add(cls.KIND)
    return cls


def known_kinds() -> dict[str, Any]:
    """Every registered payload type (imports the families: they register themselves on import)."""
    from . import canoe, fl, messages  # noqa: F401 - lazy: the families import this module

    return KINDS


# ---------------------------------------------------------------------------------------------- envelope

@dataclass(frozen=True)
class Message:
    kind: str
    device_id: str  # sender (the cloud's id for what the cloud sends)
    fleet: str
    base_version: str  # bundle version the sender runs / announces ("" if none)
    variant_id: str
    seq: int  # monotonic per sender
    sent_at: float  # unix seconds
    payload: Any
    content_hash: str
    schema: int = SCHEMA_VERSION

    def topic(self, channel: Channel | None = None, to: str | None = None) -> str:
        """Where this message goes: its kind's default channel, or `channel` (e.g. Channel.LWT for a
        will); `to` is the addressee on a relayed channel (the cloud writing to a device)."""
        ch = channel or type(self.payload).CHANNELS[0]
        if self.kind not in CHANNEL_KINDS.get(ch, ()):
            raise MessageError("topic_mismatch", f"kind {self.kind!r} does not go on channel {ch.value!r}")
        if ch in FLEET_CHANNELS:
            return fleet_topic(self.fleet, ch)
        if ch in RELAYED_CHANNELS and to is None:
            raise MessageError("topic_mismatch", f"channel {ch.value!r} is relayed: name the addressee (to=...)")
        return device_topic(self.fleet, to or self.device_id, ch)


_HEADER_KEYS = {"schema", "kind", "device_id", "fleet", "base_version", "variant_id", "seq", "sent_at",
                "payload", "content_hash"}


def _header(kind: str, device_id: Any, fleet: Any, base_version: Any, variant_id: Any, seq: Any,
            sent_at: Any) -> dict[str, Any]:
    return {"kind": kind, "device_id": name(device_id, "device_id"), "fleet": name(fleet, "fleet"),
            "base_version": text(base_version, "base_version"), "variant_id": text(variant_id, "variant_id"),
            "seq": integer(seq, "seq"), "sent_at": number(sent_at, "sent_at")}


def make_message(payload: Payload, *, device_id: str, fleet: str, base_version: str = "", variant_id: str = "",
                 seq: int = 0, sent_at: float | None = None) -> Message:
    """Build a validated message and its content hash (rejects what decode() would reject)."""
    header = _header(payload.KIND, device_id, fleet, base_version, variant_id, seq,
                     time.time() if sent_at is None else sent_at)
    env = {"schema": SCHEMA_VERSION, **header, "payload": payload.to_json()}
    # Round-trip through the strict parser so the sender can never emit what receivers reject.
    checked = type(payload).from_json(loads_strict(canonical_bytes(env["payload"])))
    return Message(payload=checked, content_hash=content_hash_of(env), **header)


def to_json(msg: Message) -> dict[str, Any]:
    return {"schema": msg.schema, "kind": msg.kind, "device_id": msg.device_id, "fleet": msg.fleet,
            "base_version": msg.base_version, "variant_id": msg.variant_id, "seq": msg.seq,
            "sent_at": msg.sent_at, "payload": msg.payload.to_json(), "content_hash": msg.content_hash}


def encode(msg: Message, max_bytes: int = MAX_MESSAGE_BYTES) -> bytes:
    data = canonical_bytes(to_json(msg))
    if len(data) > max_bytes:
        raise MessageError("oversize", f"encoded message is {len(data)} bytes > limit {max_bytes}; "
                                       "send large content by reference")
    return data


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
        address = _parse_topic(topic)
    except TopicError as exc:
        raise MessageError("bad_topic", str(exc)) from None
    kinds = known_kinds()
    kind = env.get("kind")
    if kind not in kinds:
        raise MessageError("unknown_kind", f"kind {kind!r} is not one of {sorted(kinds)}")
    if kind not in CHANNEL_KINDS.get(address.channel, ()):
        raise MessageError("topic_mismatch", f"kind {kind!r} does not belong on channel {address.channel.value!r}")
    only(env, _HEADER_KEYS, "envelope")
    header = _header(kind, *(need(env, k, "envelope") for k in
                             ("device_id", "fleet", "base_version", "variant_id", "seq", "sent_at")))
    if header["fleet"] != address.fleet:
        raise MessageError("topic_mismatch", f"fleet {header['fleet']!r} != topic fleet {address.fleet!r}")
    sender_in_topic = address.device_id is not None and address.channel not in RELAYED_CHANNELS
    if sender_in_topic and header["device_id"] != address.device_id:
        raise MessageError("topic_mismatch",
                           f"device_id {header['device_id']!r} != topic device {address.device_id!r}")
    payload = kinds[kind].from_json(obj_of(need(env, "payload", "envelope"), "payload"))
    claimed = env.get("content_hash")
    if not isinstance(claimed, str):
        raise MessageError("hash_mismatch", "content_hash missing")
    actual = content_hash_of(env)
    if claimed != actual:
        raise MessageError("hash_mismatch", f"content_hash {claimed[:16]}... != computed {actual[:16]}...")
    return Message(payload=payload, content_hash=actual, **header)
