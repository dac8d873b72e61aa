"""Payloads of federated full-weight rounds (DISTREAL setting), beside the patch loop (numpy-free).

They travel in the one envelope of `wire.py` (the sender in `device_id`) on the fl channels of `topics.py`:

    edgepatch/v1/<fleet>/fl/round                 FlRoundOpen / FlStop      server -> every device
    edgepatch/v1/<fleet>/<device>/fl/join         FlJoin                    device -> server
    edgepatch/v1/<fleet>/<device>/fl/update       FlUpdate                  device -> server

Weights never travel inside a message: the round opens with a `BlobRef` to the global weights (an .npz by
URI, with its size and sha256) and every update points at the device's own .npz the same way
(`blobs.py` fetches and checks them), so messages stay far below `MAX_MESSAGE_BYTES` whatever the model size.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .topics import Channel, TopicError, device_topic, fleet_filter, fleet_topic, parse_topic
from .wire import (  # noqa: F401 - MessageError re-exported for the fl callers
    MAX_MESSAGE_BYTES,
    Message,
    MessageError,
    counts,
    decode,
    encode,
    integer,
    make_message,
    name,
    need,
    number,
    only,
    opt_number,
    register,
    sha256_hex,
    text,
    text_list,
)

STATUSES = ("ok", "missed_deadline", "error")
MAX_TIMELINE = 256  # variant decisions reported per round (the rest is summarized in variant_steps)
MAX_ASSIGNMENTS = 2000
FlMessage = Message  # one envelope for every family; the sender is `device_id`
_LEAVES = {"round": Channel.FL_ROUND, "join": Channel.FL_JOIN, "update": Channel.FL_UPDATE}


# ------------------------------------------------------------------------------------------------ topics

def round_topic(fleet: str) -> str:
    return fleet_topic(fleet, Channel.FL_ROUND)


def join_topic(fleet: str, device_id: str) -> str:
    return device_topic(fleet, device_id, Channel.FL_JOIN)


def update_topic(fleet: str, device_id: str) -> str:
    return device_topic(fleet, device_id, Channel.FL_UPDATE)


def fleet_fl_filter(fleet: str, leaf: str) -> str:
    if leaf not in ("join", "update"):
        raise TopicError(f"unknown fl channel {leaf!r}")
    return fleet_filter(fleet, _LEAVES[leaf])


def parse_fl_topic(topic: str) -> tuple[str, str | None, str]:
    """(fleet, device or None, leaf) of an fl topic, or TopicError."""
    address = parse_topic(topic)
    leaf = {v: k for k, v in _LEAVES.items()}.get(address.channel)
    if leaf is None:
        raise TopicError(f"topic {topic!r} is not an fl topic")
    return address.fleet, address.device_id, leaf


def make_fl_message(payload: Any, *, fleet: str, sender: str, seq: int, sent_at: float | None = None) -> Message:
    return make_message(payload, device_id=sender, fleet=fleet, seq=seq, sent_at=sent_at)


def encode_fl(msg: Message, max_bytes: int = MAX_MESSAGE_BYTES) -> bytes:
    return encode(msg, max_bytes)


def decode_fl(topic: str, data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """A received fl message, validated by the wire codec (MessageError with its stable reason)."""
    return decode(topic, data, max_bytes)


# ---------------------------------------------------------------------------------------------- payloads

@dataclass(frozen=True)
class BlobRef:
    """Content by reference: where to fetch it (file:// or http(s):// URI), its size and sha256."""

    uri: str
    bytes: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"uri": self.uri, "bytes": self.bytes, "sha256": self.sha256}

    @classmethod
    def from_json(cls, obj: Any, what: str = "ref") -> BlobRef:
        if not isinstance(obj, dict):
            raise MessageError("bad_field", f"{what} must be an object")
        only(obj, {"uri", "bytes", "sha256"}, what)
        uri = text(need(obj, "uri", what), f"{what}.uri", max_len=1024, allow_empty=False)
        if not uri.startswith(("file://", "http://", "https://")):
            raise MessageError("bad_field", f"{what}.uri must be file://, http:// or https://, got {uri[:40]!r}")
        return cls(uri, integer(need(obj, "bytes", what), f"{what}.bytes", 1),
                   sha256_hex(need(obj, "sha256", what), f"{what}.sha256"))


KEPT_MODES = ("random", "first", "fixed")


@dataclass(frozen=True)
class Assignment:
    """How one device trains this round.

    `variant`: the variant to train, or None = the device chooses (DISTREAL's selector, or FjORD's
    per-batch sampling when `max_keep` is set). `kept`: "random" = a fresh random kept set per batch,
    "first" = the first filters (nested widths, ordered dropout), "fixed" = one kept set for the whole
    round drawn from `kept_seed` (Federated Dropout's server-assigned sub-model). `max_keep`: FjORD's
    widest uniform keep ratio this device may sample."""

    variant: str | None = None
    kept: str = "random"
    kept_seed: int | None = None
    max_keep: float | None = None

    def __post_init__(self) -> None:
        if self.kept not in KEPT_MODES:
            raise MessageError("bad_field", f"kept must be one of {KEPT_MODES}, got {self.kept!r}")
        if (self.kept == "fixed") != (self.kept_seed is not None):
            raise MessageError("bad_field", "kept_seed is required exactly when kept is 'fixed'")
        if self.kept == "fixed" and self.variant is None:
            raise MessageError("bad_field", "a fixed kept set needs an assigned variant")

    def to_json(self) -> dict[str, Any]:
        return {"variant": self.variant, "kept": self.kept, "kept_seed": self.kept_seed, "max_keep": self.max_keep}

    @classmethod
    def from_json(cls, obj: Any, what: str) -> Assignment:
        if not isinstance(obj, dict):
            raise MessageError("bad_field", f"{what} must be an object")
        only(obj, {"variant", "kept", "kept_seed", "max_keep"}, what)
        variant = obj.get("variant")
        seed = obj.get("kept_seed")
        max_keep = opt_number(obj.get("max_keep"), f"{what}.max_keep")
        if max_keep is not None and not 0.0 < max_keep <= 1.0:
            raise MessageError("bad_field", f"{what}.max_keep must be in (0, 1], got {max_keep}")
        return cls(None if variant is None else text(variant, f"{what}.variant", allow_empty=False),
                   text(need(obj, "kept", what), f"{what}.kept"),
                   None if seed is None else integer(seed, f"{what}.kept_seed"), max_keep)


@register
@dataclass(frozen=True)
class FlJoin:
    KIND: ClassVar[str] = "fl_join"
    CHANNELS: ClassVar[tuple[Channel, ...]] = (Channel.FL_JOIN,)
    profile: str
    relative_speed: float  # static speed vs the reference device (class speed × log-normal factor)
    num_samples: int
    variants: tuple[str, ...]  # variant ids this device can run

    def to_json(self) -> dict[str, Any]:
        return {"profile": self.profile, "relative_speed": self.relative_speed, "num_samples": self.num_samples,
                "variants": list(self.variants)}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> FlJoin:
        only(obj, {"profile", "relative_speed", "num_samples", "variants"}, "fl_join")
        speed = number(need(obj, "relative_speed", "fl_join"), "relative_speed")
        if speed <= 0:
            raise MessageError("bad_field", f"relative_speed must be positive, got {speed}")
        return cls(text(need(obj, "profile", "fl_join"), "profile", allow_empty=False), speed,
                   integer(need(obj, "num_samples", "fl_join"), "num_samples"),
                   text_list(need(obj, "variants", "fl_join"), "variants"))


@register
@dataclass(frozen=True)
class FlRoundOpen:
    KIND: ClassVar[str] = "fl_round_open"
    CHANNELS: ClassVar[tuple[Channel, ...]] = (Channel.FL_ROUND,)
    round: int
    strategy: str
    deadline_at: float | None  # unix seconds; None = the server waits for every device
    global_ref: BlobRef
    local_steps: int
    lr: float
    assignments: dict[str, Assignment] = field(default_factory=dict)  # per device (server-assigned)
    default: Assignment = field(default_factory=Assignment)  # for devices not named in `assignments`
    clock_origin: float | None = None  # unix time where the devices' load traces start (same for all)

    def to_json(self) -> dict[str, Any]:
        return {"round": self.round, "strategy": self.strategy, "deadline_at": self.deadline_at,
                "global_ref": self.global_ref.to_json(), "local_steps": self.local_steps, "lr": self.lr,
                "assignments": {k: v.to_json() for k, v in self.assignments.items()},
                "default": self.default.to_json(), "clock_origin": self.clock_origin}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> FlRoundOpen:
        w = "fl_round_open"
        only(obj, {"round", "strategy", "deadline_at", "global_ref", "local_steps", "lr", "assignments",
                         "default", "clock_origin"}, w)
        lr = number(need(obj, "lr", w), "lr")
        if lr <= 0:
            raise MessageError("bad_field", f"lr must be positive, got {lr}")
        raw = need(obj, "assignments", w)
        if not isinstance(raw, dict) or len(raw) > MAX_ASSIGNMENTS:
            raise MessageError("bad_field", f"assignments must be an object of at most {MAX_ASSIGNMENTS} devices")
        assignments = {name(k, "assignment device"): Assignment.from_json(v, f"assignments[{k!r}]")
                       for k, v in raw.items()}
        return cls(integer(need(obj, "round", w), "round"),
                   text(need(obj, "strategy", w), "strategy", allow_empty=False),
                   opt_number(obj.get("deadline_at"), "deadline_at"),
                   BlobRef.from_json(need(obj, "global_ref", w), "global_ref"),
                   integer(need(obj, "local_steps", w), "local_steps", 1, 1_000_000), lr, assignments,
                   Assignment.from_json(need(obj, "default", w), "default"),
                   opt_number(obj.get("clock_origin"), "clock_origin"))

    def assignment_for(self, device_id: str) -> Assignment:
        return self.assignments.get(device_id, self.default)


@register
@dataclass(frozen=True)
class FlStop:
    KIND: ClassVar[str] = "fl_stop"
    CHANNELS: ClassVar[tuple[Channel, ...]] = (Channel.FL_ROUND,)
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"reason": self.reason}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> FlStop:
        only(obj, {"reason"}, "fl_stop")
        return cls(text(need(obj, "reason", "fl_stop"), "reason"))


@register
@dataclass(frozen=True)
class FlUpdate:
    """A device's round result. status "ok" carries `update_ref` (an .npz of the touched entries of
    new − global, plus packed touched masks); otherwise `reason` says why nothing is contributed."""

    KIND: ClassVar[str] = "fl_update"
    CHANNELS: ClassVar[tuple[Channel, ...]] = (Channel.FL_UPDATE,)
    round: int
    status: str
    reason: str
    steps: int
    steps_planned: int
    num_samples: int
    loss: float | None
    update_ref: BlobRef | None
    touched: dict[str, int]  # parameter -> number of entries touched this round
    variant_steps: dict[str, int]  # variant id -> steps trained with it
    timeline: tuple[tuple[float, str], ...]  # (seconds since round open, variant) at each decision
    train_s: float  # wall seconds of the round on the device (compute + enforced slowness)
    throttle_s: float  # of which: sleep that enforces the device's compute share
    bytes_down: int

    def to_json(self) -> dict[str, Any]:
        return {"round": self.round, "status": self.status, "reason": self.reason, "steps": self.steps,
                "steps_planned": self.steps_planned, "num_samples": self.num_samples, "loss": self.loss,
                "update_ref": None if self.update_ref is None else self.update_ref.to_json(),
                "touched": self.touched, "variant_steps": self.variant_steps,
                "timeline": [[t, v] for t, v in self.timeline], "train_s": self.train_s,
                "throttle_s": self.throttle_s, "bytes_down": self.bytes_down}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> FlUpdate:
        w = "fl_update"
        only(obj, {"round", "status", "reason", "steps", "steps_planned", "num_samples", "loss", "update_ref",
                         "touched", "variant_steps", "timeline", "train_s", "throttle_s", "bytes_down"}, w)
        status = need(obj, "status", w)
        if status not in STATUSES:
            raise MessageError("bad_field", f"status must be one of {STATUSES}, got {status!r}")
        ref_raw = obj.get("update_ref")
        ref = None if ref_raw is None else BlobRef.from_json(ref_raw, "update_ref")
        if (status == "ok") != (ref is not None):
            raise MessageError("bad_field", "update_ref must be present exactly when status is 'ok'")
        raw_timeline = need(obj, "timeline", w)
        if not isinstance(raw_timeline, list) or len(raw_timeline) > MAX_TIMELINE:
            raise MessageError("bad_field", f"timeline must be a list of at most {MAX_TIMELINE} entries")
        timeline = []
        for i, item in enumerate(raw_timeline):
            if not isinstance(item, list) or len(item) != 2:
                raise MessageError("bad_field", f"timeline[{i}] must be [seconds, variant]")
            timeline.append((number(item[0], f"timeline[{i}][0]"), text(item[1], f"timeline[{i}][1]")))
        loss = opt_number(obj.get("loss"), "loss")
        steps = integer(need(obj, "steps", w), "steps")
        planned = integer(need(obj, "steps_planned", w), "steps_planned")
        if steps > planned:
            raise MessageError("bad_field", f"steps {steps} > steps_planned {planned}")
        return cls(integer(need(obj, "round", w), "round"), status, text(need(obj, "reason", w), "reason"),
                   steps, planned, integer(need(obj, "num_samples", w), "num_samples"), loss, ref,
                   counts(need(obj, "touched", w), "touched"),
                   counts(need(obj, "variant_steps", w), "variant_steps"), tuple(timeline),
                   number(need(obj, "train_s", w), "train_s"),
                   number(need(obj, "throttle_s", w), "throttle_s"),
                   integer(need(obj, "bytes_down", w), "bytes_down"))


FlPayload = FlJoin | FlRoundOpen | FlStop | FlUpdate
FL_PAYLOAD_TYPES: dict[str, Any] = {t.KIND: t for t in (FlJoin, FlRoundOpen, FlStop, FlUpdate)}


def counts_of(mapping: Mapping[str, int]) -> dict[str, int]:
    """Plain-int copy (numpy ints do not serialize)."""
    return {str(k): int(v) for k, v in mapping.items()}
