"""Canoe payloads (help-request metadata, relayed tasks, offers, replies) and the ensemble's metric names.

They travel in the one envelope of `wire.py` on the Canoe channels of `topics.py`: `canoe/meta`,
`canoe/request` and `canoe/offer` are written by the device named in the topic; `canoe/task` (to a
helper) and `canoe/reply` (to a target) are written by the cloud's relay to the device named in the
topic. Requests carry metadata only (classes, a label histogram, per-class accuracy): never samples.
The slice itself is a file (`canoe_slice.py`), shipped inline (base64) or by reference with its sha256.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .canoe_slice import (  # noqa: F401 - the slice file, re-exported for the Canoe callers
    MAX_SLICE_BYTES,
    SLICE_FORMAT,
    CanoeError,
    CanoeSlice,
    check_slice_fits,
    decode_slice,
    encode_slice,
    sha256_hex,
)
from .topics import PREFIX, Channel, TopicError, check_name, device_topic, fleet_filter
from .wire import (
    MAX_MESSAGE_BYTES,
    Message,
    MessageError,
    boolean,
    decode,
    encode,
    float_list,
    int_list,
    integer,
    make_message,
    name,
    need,
    number,
    obj_of,
    only,
    register,
    text,
)

MAX_CANOE_MESSAGE_BYTES = MAX_MESSAGE_BYTES
INLINE_LIMIT_BYTES = 40 * 1024  # slice bytes shipped inline; base64 (4/3) + envelope stays under 64 KiB
CHANNELS = ("meta", "request", "task", "offer", "reply")
ERROR_CODES = frozenset({"unknown_classes", "no_helper", "no_data", "helper_failed", "bad_request"})
_SHA = re.compile(r"^[0-9a-f]{64}$")
CanoeMessage = Message  # one envelope for every family


class CanoeFieldError(MessageError, CanoeError):
    """A Canoe payload that must not be used: a MessageError (with its reason) for the codec, and a
    CanoeError for the Canoe code that catches those."""


def _canoe_errors(from_json: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(from_json)
    def checked(cls: Any, obj: dict[str, Any]) -> Any:
        try:
            return from_json(cls, obj)
        except CanoeFieldError:
            raise
        except MessageError as exc:
            raise CanoeFieldError(exc.reason, exc.text) from None
    return checked


# ------------------------------------------------------------------------------------------- topics

def _channel(channel: str) -> Channel:
    if channel not in CHANNELS:
        raise CanoeError(f"unknown canoe channel {channel!r}; known: {CHANNELS}")
    return Channel(f"canoe/{channel}")


def canoe_topic(fleet: str, device_id: str, channel: str) -> str:
    try:
        return device_topic(fleet, device_id, _channel(channel))
    except TopicError as exc:
        raise CanoeError(str(exc)) from None


def canoe_filter(fleet: str, channel: str) -> str:
    """Every device's `channel` in a fleet (the cloud's subscription)."""
    return fleet_filter(fleet, _channel(channel))


def parse_canoe_topic(topic: str) -> tuple[str, str, str]:
    """(fleet, device, channel) of a concrete Canoe topic, or CanoeError."""
    levels = topic.split("/") if isinstance(topic, str) else []
    if len(levels) != 6 or "/".join(levels[:2]) != PREFIX or levels[4] != "canoe" or levels[5] not in CHANNELS:
        raise CanoeError(f"topic {topic!r} is not a canoe topic ({PREFIX}/<fleet>/<device>/canoe/<channel>)")
    try:
        return check_name(levels[2], "fleet"), check_name(levels[3], "device id"), levels[5]
    except TopicError as exc:
        raise CanoeError(str(exc)) from None


def encode_message(payload: Any, *, fleet: str, device_id: str, sent_at: float | None = None, seq: int = 0) -> bytes:
    """A Canoe payload in the wire envelope (benchmarks and tests; links use `WireEndpoint`)."""
    try:
        return encode(make_message(payload, device_id=device_id, fleet=fleet, seq=seq, sent_at=sent_at))
    except MessageError as exc:
        raise CanoeError(str(exc)) from None


def decode_message(topic: str, data: bytes) -> Message:
    """A received Canoe message, fully validated by the wire codec; CanoeError naming the problem."""
    parse_canoe_topic(topic)
    try:
        return decode(topic, data)
    except MessageError as exc:
        raise CanoeError(str(exc)) from None


def check_classes(classes: list[int], num_classes: int) -> list[int]:
    """The requested classes, or CanoeError("unknown classes ...") naming those outside [0, num_classes)."""
    unknown = sorted({c for c in classes if not 0 <= c < num_classes})
    if unknown:
        raise CanoeError(f"unknown classes {unknown}: the model has classes 0..{num_classes - 1}")
    if not classes:
        raise CanoeError("a help request must name at least one class")
    return sorted(set(classes))


# ------------------------------------------------------------------------------------ ensemble metrics

WEIGHT_PREFIX = "canoe.alpha."
_METRIC_UNSAFE = re.compile(r"[^a-z0-9_]+")


def weight_metric_name(member: str) -> str:
    """The metric name of an ensemble member's α: `canoe.alpha.own`, or for a helper slice named
    `<helper>/<request_id>` e.g. `canoe.alpha.dev_h.dev_t_r0_208` (metric names allow only [a-z0-9_.], 64
    characters; longer ones end in 8 hex of the name's sha256). Deterministic, so the companion maps a
    reported name back to the relay it made."""
    token = ".".join(_METRIC_UNSAFE.sub("_", part.lower()) for part in member.split("/"))
    metric = WEIGHT_PREFIX + token
    if len(metric) > 64:
        metric = metric[:55] + "." + hashlib.sha256(member.encode()).hexdigest()[:8]
    return metric


# ------------------------------------------------------------------------------------------ payloads

def _classes(value: Any, what: str) -> list[int]:
    return int_list(value, what, lo=-(2**31), hi=2**31)


@register
@dataclass(frozen=True)
class CanoeMeta:
    """What the cloud knows about a device for matching: its label histogram and per-class accuracy."""

    KIND: ClassVar[str] = "canoe_meta"
    CHANNELS: ClassVar[tuple[Channel, ...]] = (Channel.CANOE_META,)
    label_histogram: list[int]
    class_accuracy: list[float] = field(default_factory=list)  # empty = unknown
    online: bool = True

    def to_json(self) -> dict[str, Any]:
        return {"label_histogram": list(map(int, self.label_histogram)),
                "class_accuracy": [float(a) for a in self.class_accuracy], "online": bool(self.online)}

    @classmethod
    @_canoe_errors
    def from_json(cls, obj: dict[str, Any]) -> CanoeMeta:
        w = "canoe_meta"
        only(obj, {"label_histogram", "class_accuracy", "online"}, w)
        hist = int_list(need(obj, "label_histogram", w), "label_histogram", lo=0)
        return cls(hist, float_list(need(obj, "class_accuracy", w), "class_accuracy"),
                   boolean(need(obj, "online", w), "online"))


@register
@dataclass(frozen=True)
class CanoeRequest:
    """A target's help request: metadata only (never samples)."""

    KIND: ClassVar[str] = "canoe_request"
    CHANNELS: ClassVar[tuple[Channel, ...]] = (Channel.CANOE_REQUEST,)
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
    @_canoe_errors
    def from_json(cls, obj: dict[str, Any]) -> CanoeRequest:
        w = "canoe_request"
        only(obj, {"request_id", "classes", "label_histogram", "window_accuracy", "reference_accuracy", "reason"}, w)
        return cls(name(need(obj, "request_id", w), "request_id"), _classes(need(obj, "classes", w), "classes"),
                   int_list(need(obj, "label_histogram", w), "label_histogram", lo=0),
                   number(need(obj, "window_accuracy", w), "window_accuracy"),
                   number(need(obj, "reference_accuracy", w), "reference_accuracy"),
                   text(need(obj, "reason", w), "reason"))


@register
@dataclass(frozen=True)
class CanoeTask:
    """The cloud's relay of a request to one helper (on the helper's `canoe/task`)."""

    KIND: ClassVar[str] = "canoe_task"
    CHANNELS: ClassVar[tuple[Channel, ...]] = (Channel.CANOE_TASK,)
    request_id: str
    target: str
    classes: list[int]
    variant_id: str = ""  # the slice width the target's runtime runs ("" = the helper picks by importance mass)

    def to_json(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "target": self.target, "classes": list(map(int, self.classes)),
                "variant_id": self.variant_id}

    @classmethod
    @_canoe_errors
    def from_json(cls, obj: dict[str, Any]) -> CanoeTask:
        w = "canoe_task"
        only(obj, {"request_id", "target", "classes", "variant_id"}, w)
        return cls(name(need(obj, "request_id", w), "request_id"), name(need(obj, "target", w), "target"),
                   _classes(need(obj, "classes", w), "classes"), text(need(obj, "variant_id", w), "variant_id", 64))


@register
@dataclass(frozen=True)
class CanoeOffer:
    """A helper's answer: the slice inline (base64) or by reference, with its sha256 and size; or an error."""

    KIND: ClassVar[str] = "canoe_offer"
    CHANNELS: ClassVar[tuple[Channel, ...]] = (Channel.CANOE_OFFER,)
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
    @_canoe_errors
    def from_json(cls, obj: dict[str, Any]) -> CanoeOffer:
        w = "canoe_offer"
        only(obj, {"request_id", "target", "helper", "sha256", "size", "inline_b64", "reference", "error"}, w)
        offer = cls(name(need(obj, "request_id", w), "request_id"), name(need(obj, "target", w), "target"),
                    name(need(obj, "helper", w), "helper"), text(need(obj, "sha256", w), "sha256", 64),
                    integer(need(obj, "size", w), "size", 0, MAX_SLICE_BYTES),
                    text(need(obj, "inline_b64", w), "inline_b64", MAX_CANOE_MESSAGE_BYTES),
                    text(need(obj, "reference", w), "reference", 2048), text(need(obj, "error", w), "error", 512))
        if offer.error:
            if offer.error.split(":", 1)[0] not in ERROR_CODES:
                raise MessageError("bad_field", f"offer error code must be one of {sorted(ERROR_CODES)}: "
                                                f"{offer.error!r}")
        else:
            if not _SHA.match(offer.sha256):
                raise MessageError("bad_field", "offer sha256 must be 64 lowercase hex characters")
            if bool(offer.inline_b64) == bool(offer.reference):
                raise MessageError("bad_field", "an offer carries the slice either inline or by reference "
                                                "(exactly one)")
        return offer

    def slice_bytes(self) -> bytes:
        """The inline slice (base64-decoded); CanoeError when the offer is by reference or malformed."""
        if not self.inline_b64:
            raise CanoeError("the offer ships its slice by reference, not inline")
        try:
            return base64.b64decode(self.inline_b64.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise CanoeError("inline slice is not valid base64") from None


@register
@dataclass(frozen=True)
class CanoeReply:
    """The cloud's answer to a target (on the target's `canoe/reply`): the offer relayed, or an error."""

    KIND: ClassVar[str] = "canoe_reply"
    CHANNELS: ClassVar[tuple[Channel, ...]] = (Channel.CANOE_REPLY,)
    request_id: str
    offer: CanoeOffer | None = None
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "offer": self.offer.to_json() if self.offer else None,
                "error": self.error}

    @classmethod
    @_canoe_errors
    def from_json(cls, obj: dict[str, Any]) -> CanoeReply:
        w = "canoe_reply"
        only(obj, {"request_id", "offer", "error"}, w)
        raw = need(obj, "offer", w)
        offer = CanoeOffer.from_json(obj_of(raw, "offer")) if raw is not None else None
        error = text(need(obj, "error", w), "error", 512)
        if (offer is None) == (not error):
            raise MessageError("bad_field", "a reply carries either an offer or an error")
        return cls(name(need(obj, "request_id", w), "request_id"), offer, error)


CanoePayload = CanoeMeta | CanoeRequest | CanoeTask | CanoeOffer | CanoeReply
KINDS: dict[str, Any] = {t.KIND: t for t in (CanoeMeta, CanoeRequest, CanoeTask, CanoeOffer, CanoeReply)}
