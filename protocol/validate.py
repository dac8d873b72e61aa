"""The wire's validator kit and strict JSON (numpy-free, stdlib only); `wire.py` re-exports all of it.

Strict JSON (`loads_strict`), for every family: duplicate keys, NaN/Infinity literals, NUL and other
control characters in any string (keys included), and integers outside signed 64 bits are refused.
Every check raises `MessageError(reason, text)` with `reason` one of `REASONS`, stable so a receiver can
count rejects by reason.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from typing import Any

from .topics import TopicError, check_name

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
