"""Wire messages of federated full-weight rounds (DISTREAL setting), beside the patch loop (numpy-free).

Topics (same prefix as `topics.py`; one level per name, so a topic parses back into one address):

    edgepatch/v1/<fleet>/fl/round                 FlRoundOpen / FlStop      server -> every device
    edgepatch/v1/<fleet>/<device>/fl/join         FlJoin                    device -> server
    edgepatch/v1/<fleet>/<device>/fl/update       FlUpdate                  device -> server

Envelope: {"schema": 1, "kind", "fleet", "sender", "seq", "sent_at", "payload", "content_hash"}, hashed
like `messages.py` (sha256 of the canonical JSON without `content_hash`). Weights never travel inside a
message: the round opens with a `BlobRef` to the global weights (an .npz by URI, with its size and
sha256) and every update points at the device's own .npz the same way, so messages stay far below
`MAX_MESSAGE_BYTES` whatever the model size. `decode_fl` trusts nothing and raises `MessageError` with
the same stable reasons as `messages.decode`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .messages import (
    MAX_MESSAGE_BYTES,
    SCHEMA_VERSION,
    MessageError,
    _float,
    _int,
    _name,
    _only_keys,
    _require,
    _sha256,
    _str,
    canonical_bytes,
    content_hash_of,
    loads_strict,
)
from .topics import PREFIX, TopicError, check_name

FL_LEVEL = "fl"
STATUSES = ("ok", "missed_deadline", "error")
MAX_TIMELINE = 256  # variant decisions reported per round (the rest is summarized in variant_steps)
MAX_ASSIGNMENTS = 2000


# ------------------------------------------------------------------------------------------------ topics

def round_topic(fleet: str) -> str:
    return f"{PREFIX}/{check_name(fleet, 'fleet')}/{FL_LEVEL}/round"


def join_topic(fleet: str, device_id: str) -> str:
    return f"{PREFIX}/{check_name(fleet, 'fleet')}/{check_name(device_id, 'device id')}/{FL_LEVEL}/join"


def update_topic(fleet: str, device_id: str) -> str:
    return f"{PREFIX}/{check_name(fleet, 'fleet')}/{check_name(device_id, 'device id')}/{FL_LEVEL}/update"


def fleet_fl_filter(fleet: str, leaf: str) -> str:
    if leaf not in ("join", "update"):
        raise TopicError(f"unknown fl channel {leaf!r}")
    return f"{PREFIX}/{check_name(fleet, 'fleet')}/+/{FL_LEVEL}/{leaf}"


def parse_fl_topic(topic: str) -> tuple[str, str | None, str]:
    """(fleet, device or None, leaf) of an fl topic, or TopicError."""
    prefix = PREFIX + "/"
    if not isinstance(topic, str) or not topic.startswith(prefix):
        raise TopicError(f"topic {topic!r} is not under {PREFIX}/")
    levels = topic[len(prefix):].split("/")
    if len(levels) == 3 and levels[1] == FL_LEVEL and levels[2] == "round":
        return check_name(levels[0], "fleet"), None, "round"
    if len(levels) == 4 and levels[2] == FL_LEVEL and levels[3] in ("join", "update"):
        return check_name(levels[0], "fleet"), check_name(levels[1], "device id"), levels[3]
    raise TopicError(f"topic {topic!r} is not an fl topic")


# ---------------------------------------------------------------------------------------------- payloads

def _opt_float(value: Any, what: str) -> float | None:
    return None if value is None else _float(value, what)


def _str_list(value: Any, what: str, max_items: int = 64) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > max_items:
        raise MessageError("bad_field", f"{what} must be a list of at most {max_items} strings")
    return tuple(_str(v, f"{what}[{i}]", allow_empty=False) for i, v in enumerate(value))


def _counts(value: Any, what: str, max_items: int = 256) -> dict[str, int]:
    if not isinstance(value, dict) or len(value) > max_items:
        raise MessageError("bad_field", f"{what} must be an object of at most {max_items} counts")
    return {_str(k, f"{what} key", allow_empty=False): _int(v, f"{what}[{k!r}]") for k, v in value.items()}


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
        _only_keys(obj, {"uri", "bytes", "sha256"}, what)
        uri = _str(_require(obj, "uri", what), f"{what}.uri", max_len=1024, allow_empty=False)
        if not uri.startswith(("file://", "http://", "https://")):
            raise MessageError("bad_field", f"{what}.uri must be file://, http:// or https://, got {uri[:40]!r}")
        return cls(uri, _int(_require(obj, "bytes", what), f"{what}.bytes", 1),
                   _sha256(_require(obj, "sha256", what), f"{what}.sha256"))


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
        _only_keys(obj, {"variant", "kept", "kept_seed", "max_keep"}, what)
        variant = obj.get("variant")
        seed = obj.get("kept_seed")
        max_keep = _opt_float(obj.get("max_keep"), f"{what}.max_keep")
        if max_keep is not None and not 0.0 < max_keep <= 1.0:
            raise MessageError("bad_field", f"{what}.max_keep must be in (0, 1], got {max_keep}")
        return cls(None if variant is None else _str(variant, f"{what}.variant", allow_empty=False),
                   _str(_require(obj, "kept", what), f"{what}.kept"),
                   None if seed is None else _int(seed, f"{what}.kept_seed"), max_keep)


@dataclass(frozen=True)
class FlJoin:
    KIND: ClassVar[str] = "fl_join"
    profile: str
    relative_speed: float  # static speed vs the reference device (class speed × log-normal factor)
    num_samples: int
    variants: tuple[str, ...]  # variant ids this device can run

    def to_json(self) -> dict[str, Any]:
        return {"profile": self.profile, "relative_speed": self.relative_speed, "num_samples": self.num_samples,
                "variants": list(self.variants)}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> FlJoin:
        _only_keys(obj, {"profile", "relative_speed", "num_samples", "variants"}, "fl_join")
        speed = _float(_require(obj, "relative_speed", "fl_join"), "relative_speed")
        if speed <= 0:
            raise MessageError("bad_field", f"relative_speed must be positive, got {speed}")
        return cls(_str(_require(obj, "profile", "fl_join"), "profile", allow_empty=False), speed,
                   _int(_require(obj, "num_samples", "fl_join"), "num_samples"),
                   _str_list(_require(obj, "variants", "fl_join"), "variants"))


@dataclass(frozen=True)
class FlRoundOpen:
    KIND: ClassVar[str] = "fl_round_open"
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
        _only_keys(obj, {"round", "strategy", "deadline_at", "global_ref", "local_steps", "lr", "assignments",
                         "default", "clock_origin"}, w)
        lr = _float(_require(obj, "lr", w), "lr")
        if lr <= 0:
            raise MessageError("bad_field", f"lr must be positive, got {lr}")
        raw = _require(obj, "assignments", w)
        if not isinstance(raw, dict) or len(raw) > MAX_ASSIGNMENTS:
            raise MessageError("bad_field", f"assignments must be an object of at most {MAX_ASSIGNMENTS} devices")
        assignments = {_name(k, "assignment device"): Assignment.from_json(v, f"assignments[{k!r}]")
                       for k, v in raw.items()}
        return cls(_int(_require(obj, "round", w), "round"),
                   _str(_require(obj, "strategy", w), "strategy", allow_empty=False),
                   _opt_float(obj.get("deadline_at"), "deadline_at"),
                   BlobRef.from_json(_require(obj, "global_ref", w), "global_ref"),
                   _int(_require(obj, "local_steps", w), "local_steps", 1, 1_000_000), lr, assignments,
                   Assignment.from_json(_require(obj, "default", w), "default"),
                   _opt_float(obj.get("clock_origin"), "clock_origin"))

    def assignment_for(self, device_id: str) -> Assignment:
        return self.assignments.get(device_id, self.default)


@dataclass(frozen=True)
class FlStop:
    KIND: ClassVar[str] = "fl_stop"
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"reason": self.reason}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> FlStop:
        _only_keys(obj, {"reason"}, "fl_stop")
        return cls(_str(_require(obj, "reason", "fl_stop"), "reason"))


@dataclass(frozen=True)
class FlUpdate:
    """A device's round result. status "ok" carries `update_ref` (an .npz of the touched entries of
    new − global, plus packed touched masks); otherwise `reason` says why nothing is contributed."""

    KIND: ClassVar[str] = "fl_update"
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
        _only_keys(obj, {"round", "status", "reason", "steps", "steps_planned", "num_samples", "loss", "update_ref",
                         "touched", "variant_steps", "timeline", "train_s", "throttle_s", "bytes_down"}, w)
        status = _require(obj, "status", w)
        if status not in STATUSES:
            raise MessageError("bad_field", f"status must be one of {STATUSES}, got {status!r}")
        ref_raw = obj.get("update_ref")
        ref = None if ref_raw is None else BlobRef.from_json(ref_raw, "update_ref")
        if (status == "ok") != (ref is not None):
            raise MessageError("bad_field", "update_ref must be present exactly when status is 'ok'")
        raw_timeline = _require(obj, "timeline", w)
        if not isinstance(raw_timeline, list) or len(raw_timeline) > MAX_TIMELINE:
            raise MessageError("bad_field", f"timeline must be a list of at most {MAX_TIMELINE} entries")
        timeline = []
        for i, item in enumerate(raw_timeline):
            if not isinstance(item, list) or len(item) != 2:
                raise MessageError("bad_field", f"timeline[{i}] must be [seconds, variant]")
            timeline.append((_float(item[0], f"timeline[{i}][0]"), _str(item[1], f"timeline[{i}][1]")))
        loss = _opt_float(obj.get("loss"), "loss")
        steps = _int(_require(obj, "steps", w), "steps")
        planned = _int(_require(obj, "steps_planned", w), "steps_planned")
        if steps > planned:
            raise MessageError("bad_field", f"steps {steps} > steps_planned {planned}")
        return cls(_int(_require(obj, "round", w), "round"), status, _str(_require(obj, "reason", w), "reason"),
                   steps, planned, _int(_require(obj, "num_samples", w), "num_samples"), loss, ref,
                   _counts(_require(obj, "touched", w), "touched"),
                   _counts(_require(obj, "variant_steps", w), "variant_steps"), tuple(timeline),
                   _float(_require(obj, "train_s", w), "train_s"),
                   _float(_require(obj, "throttle_s", w), "throttle_s"),
                   _int(_require(obj, "bytes_down", w), "bytes_down"))


FlPayload = FlJoin | FlRoundOpen | FlStop | FlUpdate
FL_PAYLOAD_TYPES: dict[str, type[FlJoin] | type[FlRoundOpen] | type[FlStop] | type[FlUpdate]] = {
    t.KIND: t for t in (FlJoin, FlRoundOpen, FlStop, FlUpdate)}
LEAF_KINDS = {"round": {FlRoundOpen.KIND, FlStop.KIND}, "join": {FlJoin.KIND}, "update": {FlUpdate.KIND}}


@dataclass(frozen=True)
class FlMessage:
    kind: str
    fleet: str
    sender: str
    seq: int
    sent_at: float
    payload: FlPayload
    content_hash: str


def make_fl_message(payload: FlPayload, *, fleet: str, sender: str, seq: int,
                    sent_at: float | None = None) -> FlMessage:
    header = {"kind": payload.KIND, "fleet": _name(fleet, "fleet"), "sender": _name(sender, "sender"),
              "seq": _int(seq, "seq"), "sent_at": _float(time.time() if sent_at is None else sent_at, "sent_at")}
    env = {"schema": SCHEMA_VERSION, **header, "payload": payload.to_json()}
    checked = type(payload).from_json(json.loads(canonical_bytes(payload.to_json())))  # never emit what we reject
    return FlMessage(payload=checked, content_hash=content_hash_of(env), **header)  # type: ignore[arg-type]


def encode_fl(msg: FlMessage, max_bytes: int = MAX_MESSAGE_BYTES) -> bytes:
    env = {"schema": SCHEMA_VERSION, "kind": msg.kind, "fleet": msg.fleet, "sender": msg.sender, "seq": msg.seq,
           "sent_at": msg.sent_at, "payload": msg.payload.to_json(), "content_hash": msg.content_hash}
    data = canonical_bytes(env)
    if len(data) > max_bytes:
        raise MessageError("oversize", f"encoded fl message is {len(data)} bytes > limit {max_bytes}")
    return data


def decode_fl(topic: str, data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> FlMessage:
    """Validate a received fl (topic, payload) pair, or raise MessageError."""
    if len(data) > max_bytes:
        raise MessageError("oversize", f"{len(data)} bytes > limit {max_bytes}")
    if len(data) == 0:
        raise MessageError("empty", "zero-length payload")
    try:
        fleet, device, leaf = parse_fl_topic(topic)
    except TopicError as exc:
        raise MessageError("bad_topic", str(exc)) from None
    env = loads_strict(data)
    if not isinstance(env, dict):
        raise MessageError("bad_json", "top level must be a JSON object")
    if env.get("schema") != SCHEMA_VERSION or isinstance(env.get("schema"), bool):
        raise MessageError("schema", f"schema {env.get('schema')!r} is not supported")
    _only_keys(env, {"schema", "kind", "fleet", "sender", "seq", "sent_at", "payload", "content_hash"}, "envelope")
    kind = env.get("kind")
    if kind not in FL_PAYLOAD_TYPES:
        raise MessageError("unknown_kind", f"kind {kind!r} is not one of {sorted(FL_PAYLOAD_TYPES)}")
    if kind not in LEAF_KINDS[leaf]:
        raise MessageError("topic_mismatch", f"kind {kind!r} does not belong on fl/{leaf}")
    msg_fleet = _name(_require(env, "fleet", "envelope"), "fleet")
    sender = _name(_require(env, "sender", "envelope"), "sender")
    if msg_fleet != fleet or (device is not None and sender != device):
        raise MessageError("topic_mismatch", f"fleet/sender {msg_fleet}/{sender} disagree with topic {topic}")
    payload_json = _require(env, "payload", "envelope")
    if not isinstance(payload_json, dict):
        raise MessageError("bad_field", "payload must be a JSON object")
    payload = FL_PAYLOAD_TYPES[kind].from_json(payload_json)
    claimed = env.get("content_hash")
    if not isinstance(claimed, str) or claimed != content_hash_of(env):
        raise MessageError("hash_mismatch", "content_hash missing or does not match the content")
    sent_at = _float(_require(env, "sent_at", "envelope"), "sent_at")
    if not math.isfinite(sent_at):
        raise MessageError("non_finite", "sent_at")
    return FlMessage(kind, msg_fleet, sender, _int(_require(env, "seq", "envelope"), "seq"), sent_at, payload,
                     claimed)


def counts_of(mapping: Mapping[str, int]) -> dict[str, int]:
    """Plain-int copy (numpy ints do not serialize)."""
    return {str(k): int(v) for k, v in mapping.items()}
