"""The store's record types and the helpers that keep every value a column can hold (cloud/store.py)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import exc as sa_exc

from edgepatch.protocol.messages import Message

from .store_schema import PAYLOAD_PREFIX_BYTES

DEFAULT_RETENTION_S = 7 * 24 * 3600.0
MAX_DETAIL = 2000
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str, limit: int = MAX_DETAIL) -> str:
    """Text a database column always holds: control characters (NUL included, which PostgreSQL refuses in
    text) escaped, at most `limit` characters."""
    return _UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))[:limit]


def payload_record(payload: bytes) -> dict[str, Any]:
    """What a reject or quarantine row keeps of a payload: a prefix, its sha256 and its size."""
    data = bytes(payload)
    return {"payload_prefix": data[:PAYLOAD_PREFIX_BYTES], "payload_sha256": hashlib.sha256(data).hexdigest(),
            "payload_size": len(data)}


def is_transient(exc: BaseException) -> bool:
    """A failure of the database, not of the rows: retrying the batch later (after redelivery) may succeed.
    Anything else (a value a column refuses, a constraint) is the rows' fault: quarantine, never retry."""
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError | sa_exc.DisconnectionError
                      | sa_exc.TimeoutError)


@dataclass(frozen=True)
class Received:
    """A validated message plus what the transport told us about it."""

    message: Message
    nbytes: int
    received_at: float
    raw: bytes | None = field(default=None, repr=False)  # the payload as received (for a quarantine record)


@dataclass(frozen=True)
class Reject:
    """A refused message. Build it with `Reject.of(…, payload)`: only a prefix, hash and size are kept."""

    reason: str
    topic: str
    detail: str
    t: float
    payload_prefix: bytes = field(default=b"", repr=False)
    payload_sha256: str = ""
    payload_size: int = 0

    @classmethod
    def of(cls, reason: str, topic: str, detail: str, t: float, payload: bytes = b"") -> Reject:
        return cls(reason, topic, detail, t, **payload_record(payload))


@dataclass(frozen=True)
class Quarantined:
    """An accepted message the database refused to store (its reason is the database's error)."""

    message: Message
    reason: str
    detail: str


@dataclass
class BatchResult:
    new_patches: list[Message] = field(default_factory=list)
    duplicates: int = 0
    stored: int = 0  # accepted messages of any kind written (patch/metrics/state)
    quarantined: list[Quarantined] = field(default_factory=list)
    rows_retried: int = 0  # > 0 when the batch failed as a whole and was retried row by row


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:MAX_DETAIL]
