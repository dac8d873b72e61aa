"""The one wire codec: the envelope every message family travels in, as strict JSON or as a binary frame.

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

Binary frames (frame.py, issue 13): kinds that register a frame code (patch_update, metrics, patch_ack) travel as the
same envelope packed little-endian with the payload's numbers raw (φ as float32: 4·k bytes plus a header
of 63 bytes and the ids), and `content_hash` = sha256 of the frame. `make_message` picks the frame for
those kinds; `decode` tells the forms apart by the frame's magic and still accepts their JSON form (older
devices, the Android guide's sender).

Strict JSON and the validator kit live in validate.py (re-exported here). Payload types register
themselves with `@register` (messages.py, canoe.py, fl.py); each names the channels it may travel on
(`CHANNELS`, the first is its default). `decode()` trusts nothing: every failure raises
`MessageError(reason, text)` where `reason` is one of `REASONS`, stable so a receiver can count rejects by
reason.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from .topics import (
    FLEET_CHANNELS,
    RELAYED_CHANNELS,
    Channel,
    TopicError,
    device_topic,
    fleet_topic,
)
from .topics import parse_topic as _parse_topic
from .validate import (  # noqa: F401 - the validator kit, re-exported: the families import it from here
    INT64_MAX,
    INT64_MIN,
    MAX_MESSAGE_BYTES,
    MAX_TEXT,
    REASONS,
    SCHEMA_VERSION,
    MessageError,
    boolean,
    canonical_bytes,
    content_hash_of,
    counts,
    float_list,
    int_list,
    integer,
    loads_strict,
    name,
    need,
    number,
    obj_of,
    only,
    opt_number,
    sha256_hex,
    text,
    text_list,
)

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
    global _FAMILIES_LOADED
    if not _FAMILIES_LOADED:  # the import statement costs ~5 µs even when done (called twice per decode)
        from . import canoe, fl, messages  # noqa: F401 - lazy: the families import this module

        _FAMILIES_LOADED = True
    return KINDS


_FAMILIES_LOADED = False
_BYTES = (bytes, bytearray, memoryview)


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
    binary: bool = False  # travels as a binary frame (frame.py; content_hash = sha256 of the frame)

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
                 seq: int = 0, sent_at: float | None = None, binary: bool | None = None) -> Message:
    """Build a validated message and its content hash (rejects what decode() would reject). `binary`:
    as a frame (frame.py); default: a frame for the kinds that have one (patch_update), JSON otherwise."""
    header = _header(payload.KIND, device_id, fleet, base_version, variant_id, seq,
                     time.time() if sent_at is None else sent_at)
    if binary is None:
        binary = hasattr(type(payload), "FRAME_CODE")
    if binary:
        from .frame import encode_frame, frame_hash, parse_frame

        data = encode_frame(header, payload)
        checked = parse_frame(data)[2]  # as for JSON: the sender never emits what receivers reject
        return Message(payload=checked, content_hash=frame_hash(data), binary=True, **header)
    env = {"schema": SCHEMA_VERSION, **header, "payload": payload.to_json()}
    # Round-trip through the strict parser so the sender can never emit what receivers reject.
    checked = type(payload).from_json(loads_strict(canonical_bytes(env["payload"])))
    return Message(payload=checked, content_hash=content_hash_of(env), **header)


def to_json(msg: Message) -> dict[str, Any]:
    """The JSON envelope of `msg`, valid as it stands: for a message made as a frame, `content_hash` is
    recomputed for the JSON form (each form hashes its own canonical bytes)."""
    env = {"schema": msg.schema, "kind": msg.kind, "device_id": msg.device_id, "fleet": msg.fleet,
           "base_version": msg.base_version, "variant_id": msg.variant_id, "seq": msg.seq,
           "sent_at": msg.sent_at, "payload": msg.payload.to_json()}
    return {**env, "content_hash": content_hash_of(env) if msg.binary else msg.content_hash}


def encode(msg: Message, max_bytes: int = MAX_MESSAGE_BYTES) -> bytes:
    if msg.binary:
        from .frame import encode_frame

        data = encode_frame({"device_id": msg.device_id, "fleet": msg.fleet, "base_version": msg.base_version,
                             "variant_id": msg.variant_id, "seq": msg.seq, "sent_at": msg.sent_at}, msg.payload)
    else:
        data = canonical_bytes(to_json(msg))
    if len(data) > max_bytes:
        raise MessageError("oversize", f"encoded message is {len(data)} bytes > limit {max_bytes}; "
                                       "send large content by reference")
    return data


def _check_address(kind: Any, header_of: Any, topic: str) -> dict[str, Any]:
    """The kind must be known and belong on the topic's channel, the fleet and sender match the topic;
    `header_of(kind)` validates the header fields (after the kind, so errors name the right problem)."""
    try:
        address = _parse_topic(topic)
    except TopicError as exc:
        raise MessageError("bad_topic", str(exc)) from None
    kinds = known_kinds()
    if not isinstance(kind, str) or kind not in kinds:
        raise MessageError("unknown_kind", f"kind {kind!r} is not one of {sorted(kinds)}")
    if kind not in CHANNEL_KINDS.get(address.channel, ()):
        raise MessageError("topic_mismatch", f"kind {kind!r} does not belong on channel {address.channel.value!r}")
    header = header_of(kind)
    if header["fleet"] != address.fleet:
        raise MessageError("topic_mismatch", f"fleet {header['fleet']!r} != topic fleet {address.fleet!r}")
    sender_in_topic = address.device_id is not None and address.channel not in RELAYED_CHANNELS
    if sender_in_topic and header["device_id"] != address.device_id:
        raise MessageError("topic_mismatch",
                           f"device_id {header['device_id']!r} != topic device {address.device_id!r}")
    return header


def decode(topic: str, data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """Validate everything about a received (topic, payload) pair and return the Message, or raise MessageError.
    A payload starting with the frame magic is a binary frame (frame.py), anything else a JSON envelope."""
    if not isinstance(data, _BYTES):  # a tuple: `bytes | bytearray | …` builds a union object every call
        raise MessageError("bad_json", f"payload must be bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise MessageError("oversize", f"{len(data)} bytes > limit {max_bytes}")
    if len(data) == 0:
        raise MessageError("empty", "zero-length payload (retained message cleared)")
    from .frame import MAGIC, frame_hash, parse_frame

    if bytes(data[:len(MAGIC)]) == MAGIC:
        known_kinds()  # the families register their frame codes on import
        frame_kind, raw, payload = parse_frame(data)
        header = _check_address(frame_kind, lambda k: _header(k, *raw), topic)
        return Message(payload=payload, content_hash=frame_hash(data), binary=True, **header)
    env = loads_strict(data)
    if not isinstance(env, dict):
        raise MessageError("bad_json", f"top level must be a JSON object, got {type(env).__name__}")
    schema = env.get("schema")
    if isinstance(schema, bool) or not isinstance(schema, int) or schema != SCHEMA_VERSION:
        raise MessageError("schema", f"schema {schema!r} is not supported (this code speaks {SCHEMA_VERSION})")

    def header_of(kind: str) -> dict[str, Any]:
        only(env, _HEADER_KEYS, "envelope")
        return _header(kind, *(need(env, k, "envelope") for k in
                               ("device_id", "fleet", "base_version", "variant_id", "seq", "sent_at")))

    header = _check_address(env.get("kind"), header_of, topic)
    payload = known_kinds()[header["kind"]].from_json(obj_of(need(env, "payload", "envelope"), "payload"))
    claimed = env.get("content_hash")
    if not isinstance(claimed, str):
        raise MessageError("hash_mismatch", "content_hash missing")
    actual = content_hash_of(env)
    if claimed != actual:
        raise MessageError("hash_mismatch", f"content_hash {claimed[:16]}... != computed {actual[:16]}...")
    return Message(payload=payload, content_hash=actual, **header)
