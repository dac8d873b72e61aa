"""Binary frames: the compact form of a message whose payload is mostly numbers or hashes (issue 13: a patch
of k float32 costs 4·k + a small header on the wire, not base64 inside JSON; metrics cost half their JSON,
a one-patch PatchAck a fifth: 76 bytes, not 361).

A frame carries the same envelope as the JSON form of `wire.py` (kind, sender, fleet, base_version,
variant_id, seq, sent_at), then the kind's payload. All integers and floats little-endian:

    offset  size  field
    0       3     magic b"EPB" (never the first byte of a JSON envelope, which is "{": `decode` dispatches on it)
    3       1     format version (FORMAT_VERSION; any other is refused, reason "schema")
    4       1     kind code (FRAME_KINDS: 1 = patch_update, 2 = metrics, 3 = patch_ack; unknown: "unknown_kind")
    5       1     n_dev   bytes of device_id     (1..64, topic-level rules)
    6       1     n_fleet bytes of fleet         (1..64, topic-level rules)
    7       2     n_base  bytes of base_version  (0..MAX_TEXT_BYTES, UTF-8, no control characters)
    9       2     n_var   bytes of variant_id    (0..MAX_TEXT_BYTES, UTF-8, no control characters)
    11      8     seq     uint64 (<= 2^63 - 1)
    19      8     sent_at float64 (finite)
    27      ...   device_id, fleet, base_version, variant_id (UTF-8, strict: no overlong or surrogate forms)
    ...     ...   payload (the kind's `to_frame`; patch_update: steps u64, samples u64, holdout_acc f64,
                  loss f64, k u32 (>= 1), then φ as float32 × k, exactly the rest of the frame; metrics:
                  count u8, then per value name length u8, ASCII name, float64, names strictly ascending;
                  patch_ack (acks.py): count u16, then per entry sha256 as 32 raw bytes, status u8,
                  reason length u16, UTF-8 reason)

There is no content_hash field: the frame is the canonical encoding (one byte string per message and back:
strict UTF-8, exact lengths, no padding, no trailing bytes, NaN refused, tests/test_frame.py checks that
every accepted frame re-encodes to itself), so `content_hash` = sha256 of the frame bytes. That keeps the
hash an idempotency key (a resend carries the same bytes) and lets the cloud name a refused frame's hash
in its PatchAck even when the frame cannot be parsed (`claimed_hash`). Corruption in transit is TCP's and
TLS's job; the device's outbox keeps the bytes it hashed.

Every length is checked against what is left before anything is read; nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from typing import Any

from .wire import MAX_TEXT, MessageError

MAGIC = b"EPB"
FORMAT_VERSION = 1
MAX_TEXT_BYTES = 4 * MAX_TEXT  # a MAX_TEXT-character string in UTF-8 takes at most this
HEADER = struct.Struct("<3sBBBBHHQd")  # magic, version, kind code, n_dev, n_fleet, n_base, n_var, seq, sent_at
HEADER_FIELDS = (("magic", 3, 'b"EPB"'), ("format_version", 1, "uint8"), ("kind_code", 1, "uint8"),
                 ("device_id_bytes", 1, "uint8"), ("fleet_bytes", 1, "uint8"), ("base_version_bytes", 2, "uint16"),
                 ("variant_id_bytes", 2, "uint16"), ("seq", 8, "uint64"), ("sent_at", 8, "float64"))
assert sum(size for _, size, _ in HEADER_FIELDS) == HEADER.size == 27
_HEADER_SIZE = HEADER.size


FRAME_KINDS: dict[int, Any] = {}  # kind code -> payload class
_SHA256 = re.compile(r"[0-9a-f]{64}")


def register_frame(cls: Any) -> Any:
    """Class decorator (after `@register`): the kind also travels as a binary frame, and `make_message`
    picks the frame by default. The class gives `FRAME_CODE` (1..255), `FRAME_FIELDS` (its documented
    layout), `to_frame() -> bytes` and `from_frame(memoryview)` (which must refuse any byte it does not use)."""
    code = int(cls.FRAME_CODE)
    if not 1 <= code <= 255 or code in FRAME_KINDS:
        raise ValueError(f"frame code {code} of {cls.KIND!r} is out of range or taken")
    FRAME_KINDS[code] = cls
    return cls


def is_frame(data: bytes | bytearray | memoryview) -> bool:
    return bytes(data[:len(MAGIC)]) == MAGIC


def frame_hash(data: bytes | bytearray | memoryview) -> str:
    """A frame's content hash: sha256 (hex) of its bytes."""
    return hashlib.sha256(data).hexdigest()


def _utf8(value: str, what: str, lo: int, hi: int) -> bytes:
    raw = value.encode("utf-8")
    if not lo <= len(raw) <= hi:
        raise MessageError("bad_field", f"{what} is {len(raw)} bytes in UTF-8, a frame holds {lo}..{hi}")
    return raw


def encode_frame(header: dict[str, Any], payload: Any) -> bytes:
    """The frame of a validated header (wire._header) and payload."""
    dev = _utf8(header["device_id"], "device_id", 1, 64)
    fleet = _utf8(header["fleet"], "fleet", 1, 64)
    base = _utf8(header["base_version"], "base_version", 0, MAX_TEXT_BYTES)
    var = _utf8(header["variant_id"], "variant_id", 0, MAX_TEXT_BYTES)
    head = HEADER.pack(MAGIC, FORMAT_VERSION, type(payload).FRAME_CODE, len(dev), len(fleet), len(base), len(var),
                       header["seq"], header["sent_at"])
    return b"".join((head, dev, fleet, base, var, payload.to_frame()))


def parse_frame(data: bytes | bytearray | memoryview) -> tuple[str, tuple[Any, ...], Any]:
    """(kind, raw header values in wire._header order, payload) of a frame whose size the caller bounded.
    The header values are decoded but not yet validated (the caller runs them through wire._header)."""
    view = memoryview(data)
    if len(view) < HEADER.size:
        raise MessageError("bad_shape", f"frame of {len(view)} bytes is shorter than its {HEADER.size}-byte header")
    magic, version, code, n_dev, n_fleet, n_base, n_var, seq, sent_at = HEADER.unpack_from(view)
    if magic != MAGIC:
        raise MessageError("bad_json", "not a frame (no EPB magic) and not a JSON object")
    if version != FORMAT_VERSION:
        raise MessageError("schema", f"binary frame format version {version} is not supported "
                                     f"(this code speaks {FORMAT_VERSION})")
    cls = FRAME_KINDS.get(code)
    if cls is None:
        raise MessageError("unknown_kind", f"frame kind code {code} is not one of {sorted(FRAME_KINDS)}")
    end = _HEADER_SIZE + n_dev + n_fleet + n_base + n_var
    # Fast path (every valid frame): lengths in range, the four strings decoded from one copy. Any failure
    # falls back to the field-by-field checks, which name the field at fault.
    if 1 <= n_dev <= 64 and 1 <= n_fleet <= 64 and n_base <= MAX_TEXT_BYTES and n_var <= MAX_TEXT_BYTES \
            and end <= len(view):
        raw = bytes(view[_HEADER_SIZE:end])
        a, b, c = n_dev, n_dev + n_fleet, n_dev + n_fleet + n_base
        try:
            texts = [raw[:a].decode(), raw[a:b].decode(), raw[b:c].decode(), raw[c:].decode()]
        except UnicodeDecodeError:
            texts = _texts(view, n_dev, n_fleet, n_base, n_var)
    else:
        texts = _texts(view, n_dev, n_fleet, n_base, n_var)
    payload = cls.from_frame(view[end:])
    return cls.KIND, (*texts, seq, sent_at), payload


def _texts(view: memoryview, n_dev: int, n_fleet: int, n_base: int, n_var: int) -> list[str]:
    """The header strings, each length and encoding checked on its own (errors name the field)."""
    for n, what, lo, hi in ((n_dev, "device_id", 1, 64), (n_fleet, "fleet", 1, 64),
                            (n_base, "base_version", 0, MAX_TEXT_BYTES), (n_var, "variant_id", 0, MAX_TEXT_BYTES)):
        if not lo <= n <= hi:
            raise MessageError("bad_field", f"{what} length {n} outside [{lo}, {hi}]")
    end = HEADER.size + n_dev + n_fleet + n_base + n_var
    if end > len(view):
        raise MessageError("bad_shape", f"frame of {len(view)} bytes ends inside its header strings (need {end})")
    texts, at = [], HEADER.size
    for n, what in ((n_dev, "device_id"), (n_fleet, "fleet"), (n_base, "base_version"), (n_var, "variant_id")):
        try:
            texts.append(bytes(view[at:at + n]).decode("utf-8", errors="strict"))
        except UnicodeDecodeError:
            raise MessageError("bad_field", f"{what} is not valid UTF-8") from None
        at += n
    return texts


def claimed_hash(data: bytes | bytearray | memoryview, max_bytes: int) -> str | None:
    """The content hash a refused message claims: a frame's is its sha256, whatever is wrong inside (the
    sender hashed the same bytes); a JSON envelope's is its `content_hash` field, if well-formed."""
    if not data or len(data) > max_bytes:
        return None
    if is_frame(data):
        return frame_hash(data)
    try:
        env = json.loads(bytes(data))
    except (ValueError, RecursionError):
        return None
    value = env.get("content_hash") if isinstance(env, dict) else None
    return value if isinstance(value, str) and _SHA256.fullmatch(value) else None


def layout(kind: str) -> list[dict[str, Any]]:
    """The documented byte layout of one kind's frame (docs/asyncapi.yaml is generated from it)."""
    cls = next((c for c in FRAME_KINDS.values() if kind == c.KIND), None)
    if cls is None:
        raise KeyError(kind)
    fields = [{"name": n, "bytes": s, "type": t} for n, s, t in HEADER_FIELDS]
    fields += [{"name": n, "bytes": f"{n}_bytes", "type": "utf-8"} for n in ("device_id", "fleet", "base_version",
                                                                            "variant_id")]
    return fields + [dict(f) for f in cls.FRAME_FIELDS]

