"""PatchAck: the companion's application-level acknowledgement of patches (issue 12), as a binary frame (issue 13).

An ack was strict JSON (~360 bytes for one patch, as much as the φ it acknowledges); it now travels as a frame
(frame.py, kind code 3): the envelope's header and ids, then

    count u16 (1..MAX_ACKS), then per entry: hash 32 raw bytes (the sha256, not 64 hex characters),
    status u8 (index in ACK_STATUSES), reason_bytes u16 (0..MAX_TEXT_BYTES), reason UTF-8

so a one-patch ack is 27 + 5 ("cloud") + the fleet's bytes + 2 + 35 bytes. The JSON form still decodes
(companions older than the frame). Canonical like every frame: lowercase hex out of raw bytes, strict UTF-8,
the count exact, no trailing bytes, so an accepted frame re-encodes to itself (tests/test_frame.py).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, ClassVar

from .frame import MAX_TEXT_BYTES, register_frame
from .topics import Channel
from .wire import MessageError, need, obj_of, only, register, sha256_hex, text

ACK_STATUSES = ("stored", "duplicate", "quarantined", "rejected")  # a frame's status code is the index
MAX_ACKS = 256  # entries per PatchAck message (35 bytes + reason each in a frame)
_STATUS_CODE = {s: i for i, s in enumerate(ACK_STATUSES)}
_COUNT = struct.Struct("<H")
_ENTRY = struct.Struct("<32sBH")  # sha256, status code, reason bytes; then the reason
ENTRY_BYTES = _ENTRY.size  # 35: a frame entry before its reason (cloud/ingest_acks.py sizes its chunks by it)


@dataclass(frozen=True)
class AckEntry:
    """One patch's fate, keyed by its content hash. stored / duplicate: in the store (the device counts it
    delivered); quarantined: kept in the quarantine table (the database refused the row); rejected: refused
    by validation or admission, `reason` says why (resending the same bytes cannot help: the device drops it)."""

    content_hash: str
    status: str
    reason: str = ""


@register_frame
@register
@dataclass(frozen=True)
class PatchAck:
    """The companion's application-level acknowledgement, sent on the device's `ack` topic after the
    batch holding the patches committed (issue 12): a device keeps a patch in its outbox until this arrives."""

    KIND: ClassVar[str] = "patch_ack"
    CHANNELS: ClassVar[tuple[Channel, ...]] = (Channel.ACK,)
    FRAME_CODE: ClassVar[int] = 3
    FRAME_FIELDS: ClassVar[tuple[dict[str, Any], ...]] = (
        {"name": "count", "bytes": 2, "type": "uint16"},
        {"name": "acks", "bytes": "count × (35 + reason_bytes)",
         "type": "count × (hash 32 raw bytes (sha256), status uint8 (" +
                 ", ".join(f"{i} {s}" for i, s in enumerate(ACK_STATUSES)) +
                 f"), reason_bytes uint16 (0..{MAX_TEXT_BYTES}), reason utf-8)"})
    acks: tuple[AckEntry, ...]

    def to_json(self) -> dict[str, Any]:
        return {"acks": [{"hash": a.content_hash, "status": a.status, "reason": a.reason} for a in self.acks]}

    def to_frame(self) -> bytes:
        # Every value checked as from_frame checks it: the sender never emits what receivers refuse.
        if not 1 <= len(self.acks) <= MAX_ACKS:
            raise MessageError("bad_field", f"acks must be 1..{MAX_ACKS} entries, got {len(self.acks)}")
        parts = [_COUNT.pack(len(self.acks))]
        for i, a in enumerate(self.acks):
            code = _STATUS_CODE.get(a.status)
            if code is None:
                raise MessageError("bad_field", f"acks[{i}].status must be one of {ACK_STATUSES}, got {a.status!r}")
            reason = text(a.reason, f"acks[{i}].reason").encode()
            parts.append(_ENTRY.pack(bytes.fromhex(sha256_hex(a.content_hash, f"acks[{i}].hash")), code,
                                     len(reason)))
            parts.append(reason)
        return b"".join(parts)

    @classmethod
    def from_frame(cls, data: memoryview) -> PatchAck:
        if len(data) < _COUNT.size:
            raise MessageError("bad_shape", f"patch_ack frame payload of {len(data)} bytes has no entry count")
        (count,) = _COUNT.unpack_from(data)
        if not 1 <= count <= MAX_ACKS:
            raise MessageError("bad_field", f"patch_ack frame holds {count} entries, not 1..{MAX_ACKS}")
        out, at = [], _COUNT.size
        for i in range(count):
            if at + _ENTRY.size > len(data):
                raise MessageError("bad_shape", f"acks[{i}]: the frame ends inside the entry")
            digest, code, n_reason = _ENTRY.unpack_from(data, at)
            at += _ENTRY.size
            if code >= len(ACK_STATUSES):
                raise MessageError("bad_field", f"acks[{i}].status code {code} is not one of 0..{len(ACK_STATUSES) - 1}")
            if n_reason > MAX_TEXT_BYTES or at + n_reason > len(data):
                raise MessageError("bad_shape", f"acks[{i}].reason of {n_reason} bytes does not fit the frame "
                                                f"(at most {MAX_TEXT_BYTES})")
            try:  # strict: no overlong forms, no surrogates, so the reason re-encodes to these bytes
                reason = bytes(data[at:at + n_reason]).decode("utf-8")
            except UnicodeDecodeError:
                raise MessageError("bad_field", f"acks[{i}].reason is not valid UTF-8") from None
            at += n_reason
            out.append(AckEntry(digest.hex(), ACK_STATUSES[code], text(reason, f"acks[{i}].reason")))
        if at != len(data):
            raise MessageError("bad_shape", f"{len(data) - at} bytes after the last ack entry")
        return cls(acks=tuple(out))

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> PatchAck:
        only(obj, {"acks"}, "patch_ack")
        raw = need(obj, "acks", "patch_ack")
        if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_ACKS:
            raise MessageError("bad_field", f"acks must be a list of 1..{MAX_ACKS} entries")
        out = []
        for i, item in enumerate(raw):
            w = f"acks[{i}]"
            item = obj_of(item, w)
            only(item, {"hash", "status", "reason"}, w)
            status = need(item, "status", w)
            if status not in ACK_STATUSES:
                raise MessageError("bad_field", f"{w}.status must be one of {ACK_STATUSES}, got {status!r}")
            out.append(AckEntry(sha256_hex(need(item, "hash", w), f"{w}.hash"), status,
                                text(need(item, "reason", w), f"{w}.reason")))
        return cls(acks=tuple(out))
