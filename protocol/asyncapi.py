"""docs/asyncapi.yaml, generated from the codec: `python -m edgepatch.protocol.asyncapi > docs/asyncapi.yaml`.

Channels, which kinds travel on each, who sends them, the envelope, the limits and the reject reasons come
from `topics.py` and `wire.py`, binary frame layouts from `frame.py` (an `x-frame` extension: JSON Schema
cannot describe bytes); the payload JSON schemas are written here, beside the registry, and
tests/test_asyncapi.py checks both ways that they describe what `encode()` emits and `decode()` accepts
(and that this file's output is the committed document). PyYAML (the dev extra) renders it.
"""

from __future__ import annotations

import sys
from typing import Any

from .frame import FORMAT_VERSION, FRAME_KINDS, MAGIC, layout
from .messages import MAX_METRICS, METRIC_NAME
from .topics import FLEET_CHANNELS, PREFIX, RELAYED_CHANNELS, Channel
from .wire import CHANNEL_KINDS, INT64_MAX, MAX_MESSAGE_BYTES, MAX_TEXT, REASONS, SCHEMA_VERSION, known_kinds

NAME_RE = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
NO_CONTROL = "^[^\\u0000-\\u001f\\u007f-\\u009f]*$"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _text(max_len: int = MAX_TEXT, min_len: int = 0) -> dict[str, Any]:
    return {"type": "string", "minLength": min_len, "maxLength": max_len, "pattern": NO_CONTROL}


def _int(minimum: int = 0, maximum: int = INT64_MAX) -> dict[str, Any]:
    return {"type": "integer", "minimum": minimum, "maximum": maximum}


NUM: dict[str, Any] = {"type": "number"}
BOOL: dict[str, Any] = {"type": "boolean"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"oneOf": [{"type": "null"}, schema]}


def _list(items: dict[str, Any], max_items: int = 4096) -> dict[str, Any]:
    return {"type": "array", "items": items, "maxItems": max_items}


def _map(values: dict[str, Any], max_props: int) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": values, "maxProperties": max_props}


def _obj(description: str, optional: dict[str, dict[str, Any]] | None = None, **props: dict[str, Any]
         ) -> dict[str, Any]:
    return {"type": "object", "description": description, "additionalProperties": False,
            "required": sorted(props), "properties": {**props, **(optional or {})}}


CLASSES = _list(_int(-(2**31), 2**31))
SHARED: dict[str, dict[str, Any]] = {
    "Name": {"type": "string", "pattern": NAME_RE},
    "Sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
    "Float32Array": _obj("Little-endian float32 bytes, base64; never a pickle.", dtype={"const": "<f4"},
                         shape=_list(_int()), b64={"type": "string"}),
    "BlobRef": _obj("Content by reference: an .npz at `uri` with its size and sha256.",
                    uri={**_text(1024, 1), "pattern": "^(file|https?)://"}, bytes=_int(1), sha256=_ref("Sha256")),
    "Assignment": _obj("How one device trains this round (variant None = the device chooses).",
                       variant=_nullable(_text(min_len=1)), kept={"enum": ["random", "first", "fixed"]},
                       kept_seed=_nullable(_int()), max_keep=_nullable({"type": "number", "exclusiveMinimum": 0,
                                                                         "maximum": 1})),
}
OFFER = _obj("A helper's answer: the slice inline (base64) or by reference, with sha256 and size; or an error.",
             request_id=_ref("Name"), target=_ref("Name"), helper=_ref("Name"), sha256=_text(64), size=_int(),
             inline_b64=_text(MAX_MESSAGE_BYTES), reference=_text(2048), error=_text(512))
PAYLOADS: dict[str, dict[str, Any]] = {
    "patch_update": _obj("A device's trained patch coefficients phi for (base_version, variant_id).",
                         phi=_ref("Float32Array"), steps=_int(), samples=_int(),
                         holdout_acc={"type": "number", "minimum": 0, "maximum": 1}, loss=NUM),
    "metrics": _obj("Named scalar measurements (train_ms, rss_bytes, canoe.alpha.<member>, ...).",
                    values={"type": "object", "maxProperties": MAX_METRICS, "additionalProperties": False,
                            "patternProperties": {METRIC_NAME.pattern: NUM}}),
    "device_state": _obj("Presence; the last will is the same kind with reason \"will\" on lwt.",
                         state={"enum": ["online", "offline"]}, last_seen=NUM,
                         reason={"enum": ["connected", "disconnected", "will"]}),
    "bundle_announcement": _obj("The fleet's current bundle, by reference; devices verify the hashes. Signed "
                                "announcements (protocol/signing.py) add the fleet key's signature and a "
                                "sequence that must grow; unsigned ones carry neither. `targets` (staged "
                                "rollout): only the named canary devices act on it.",
                                {"sequence": _int(), "signature": _text(), "targets": _list(_ref("Name"))},
                                version=_text(min_len=1), reference=_text(2048, 1), manifest_sha256=_ref("Sha256"),
                                size=_int(), artifacts=_map(_ref("Sha256"), 256)),
    "canoe_meta": _obj("What the cloud matches helpers on: label histogram, per-class accuracy.",
                       label_histogram=_list(_int()), class_accuracy=_list(NUM), online=BOOL),
    "canoe_request": _obj("A target's help request: metadata only, never samples.",
                          request_id=_ref("Name"), classes=CLASSES, label_histogram=_list(_int()),
                          window_accuracy=NUM, reference_accuracy=NUM, reason=_text()),
    "canoe_task": _obj("The cloud's relay of a request to one helper.", request_id=_ref("Name"),
                       target=_ref("Name"), classes=CLASSES, variant_id=_text(64)),
    "canoe_offer": OFFER,
    "canoe_reply": _obj("The cloud's answer to a target: the offer relayed, or an error.",
                        request_id=_ref("Name"), offer=_nullable(OFFER), error=_text(512)),
    "fl_join": _obj("A device joins federated rounds.", profile=_text(min_len=1),
                    relative_speed={"type": "number", "exclusiveMinimum": 0}, num_samples=_int(),
                    variants=_list(_text(min_len=1), 64)),
    "fl_round_open": _obj("A round opens: global weights by reference, deadline, per-device assignments.",
                          round=_int(), strategy=_text(min_len=1), deadline_at=_nullable(NUM),
                          global_ref=_ref("BlobRef"), local_steps=_int(1, 1_000_000),
                          lr={"type": "number", "exclusiveMinimum": 0},
                          assignments=_map(_ref("Assignment"), 2000), default=_ref("Assignment"),
                          clock_origin=_nullable(NUM)),
    "fl_stop": _obj("The server ends the rounds.", reason=_text()),
    "patch_ack": _obj("The companion's application-level ack of patches, by content hash, after their batch "
                      "committed: stored/duplicate (in the store), quarantined, or rejected (with the reason; "
                      "the device stops resending it).",
                      acks={**_list(_obj("One patch's fate.", hash=_ref("Sha256"),
                                         status={"enum": ["stored", "duplicate", "quarantined", "rejected"]},
                                         reason=_text()), 256), "minItems": 1}),
    "fl_update": _obj("A device's round result; status ok carries the update .npz by reference.",
                      round=_int(), status={"enum": ["ok", "missed_deadline", "error"]}, reason=_text(),
                      steps=_int(), steps_planned=_int(), num_samples=_int(), loss=_nullable(NUM),
                      update_ref=_nullable(_ref("BlobRef")), touched=_map(_int(), 256),
                      variant_steps=_map(_int(), 256),
                      timeline=_list({"type": "array", "prefixItems": [NUM, _text()], "minItems": 2, "maxItems": 2},
                                     256),
                      train_s=NUM, throttle_s=NUM, bytes_down=_int()),
}
CHANNEL_NOTES = {
    Channel.STATE: "Presence, retained: \"online\" on every (re)connect, \"offline\" on a clean stop.",
    Channel.LWT: "The device's last will (DeviceState, reason \"will\"), retained; cleared (zero-length retained "
                 "publish) on every reconnect, so a message here means \"dropped and not back\".",
    Channel.PATCH: "Trained patch coefficients. Cloud workers may split them with `$share/<group>/...`.",
    Channel.METRICS: "Measurements; under MQTT 5 they expire after an hour.",
    Channel.BUNDLE: "The fleet's current bundle, retained. Malformed announcements are logged and dropped.",
    Channel.CANOE_META: "A device's label histogram for helper matching, retained.",
    Channel.CANOE_REQUEST: "A drifting target asks for help (metadata only).",
    Channel.CANOE_TASK: "Relayed by the cloud to the helper named in the topic.",
    Channel.CANOE_OFFER: "The helper's slice (inline or by reference) or an error.",
    Channel.CANOE_REPLY: "Relayed by the cloud to the target named in the topic.",
    Channel.FL_ROUND: "The FL server opens (or stops) rounds for every device of the fleet.",
    Channel.FL_JOIN: "A device joins (on every connect).",
    Channel.FL_UPDATE: "A device's round result.",
    Channel.ACK: "Relayed by the cloud to the device in the topic: which of its patches are stored; the device "
                 "keeps each patch in its outbox (and resends it) until then.",
}
RETAINED = {Channel.STATE, Channel.LWT, Channel.BUNDLE, Channel.CANOE_META}
# Sent at QoS 0 (cloud/ingest_acks.ACK_QOS; the cloud layer is out of this module's reach, tests/test_asyncapi.py
# checks the two agree): a lost ack costs a resend, which the store dedupes and the next ack answers.
QOS0 = {Channel.ACK}


def _camel(kind: str) -> str:
    return "".join(part.capitalize() for part in kind.split("_"))


def framed_kinds() -> dict[str, int]:
    """kind -> frame code of the kinds that travel as binary frames (frame.py)."""
    known_kinds()
    return {cls.KIND: code for code, cls in FRAME_KINDS.items()}


def message_names(kind: str) -> list[str]:
    """The documented messages of a kind: a framed kind has its frame (the default) and its JSON form."""
    return [_camel(kind), _camel(kind) + "Json"] if kind in framed_kinds() else [_camel(kind)]


def _message(kind: str) -> dict[str, Any]:
    header = {"schema": {"const": SCHEMA_VERSION}, "kind": {"const": kind}, "device_id": _ref("Name"),
              "fleet": _ref("Name"), "base_version": _text(), "variant_id": _text(), "seq": _int(),
              "sent_at": NUM, "payload": _ref(_camel(kind) + "Payload"), "content_hash": _ref("Sha256")}
    out = {"name": kind, "title": _camel(kind), "contentType": "application/json",
           "payload": {"type": "object", "additionalProperties": False, "required": sorted(header),
                       "properties": header}}
    if kind in framed_kinds():
        older = "older companions" if _from_cloud(kind) else "older devices, docs/android.md"
        out.update(title=_camel(kind) + "Json", description=f"The JSON envelope of this kind: still accepted "
                   f"({older}), no longer what edgepatch devices and the companion send.")
    return out


def _from_cloud(kind: str) -> bool:
    """The cloud sends this kind to the devices (its channels are fleet-wide or relayed)."""
    return all(ch in FLEET_CHANNELS or ch in RELAYED_CHANNELS for ch in known_kinds()[kind].CHANNELS)


def _frame_message(kind: str) -> dict[str, Any]:
    """A binary frame: its byte layout as an `x-frame` extension (JSON Schema cannot describe bytes)."""
    fixed = sum(f["bytes"] for f in layout(kind) if isinstance(f["bytes"], int))
    sender = "the companion sends" if _from_cloud(kind) else "devices send"
    return {"name": kind, "title": _camel(kind), "contentType": "application/octet-stream",
            "description": (f"Binary frame (protocol/frame.py), the form {sender}: the envelope's fields packed "
                            "little-endian, then the payload's (numbers raw, "
                            "hashes as 32 raw bytes). Each field obeys the rules of the JSON form "
                            f"({_camel(kind)}Json); content_hash is the sha256 of the frame bytes (no hash field). "
                            f"Size: {fixed} bytes, plus the four ids' UTF-8 bytes and the variable-length fields of "
                            "x-frame."),
            "payload": {"type": "string", "format": "binary", "maxLength": MAX_MESSAGE_BYTES},
            "x-frame": {"magic": MAGIC.decode(), "format_version": FORMAT_VERSION, "kind_code": framed_kinds()[kind],
                        "byte_order": "little-endian", "content_hash": "sha256 of the frame bytes",
                        "fields": layout(kind)}}


def _messages(kinds: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in sorted(kinds):
        if k in framed_kinds():
            out[_camel(k)] = _frame_message(k)
            out[_camel(k) + "Json"] = _message(k)
        else:
            out[_camel(k)] = _message(k)
    return out


def document() -> dict[str, Any]:
    kinds = known_kinds()
    channels: dict[str, Any] = {}
    for ch in Channel:
        address = f"{PREFIX}/{{fleet}}/{ch.value}" if ch in FLEET_CHANNELS else f"{PREFIX}/{{fleet}}/{{device}}/{ch.value}"
        params = {"fleet": {"$ref": "#/components/parameters/fleet"}}
        if ch not in FLEET_CHANNELS:
            params["device"] = {"$ref": "#/components/parameters/device"}
        names = sorted(n for k in CHANNEL_KINDS[ch] for n in message_names(k))
        refs = [{"$ref": f"#/components/messages/{n}"} for n in names]
        cloud_sends = ch in FLEET_CHANNELS or ch in RELAYED_CHANNELS
        op = {"operationId": ch.value.replace("/", "_"), "bindings": {"mqtt": {"qos": 0 if ch in QOS0 else 1,
                                                                   "retain": ch in RETAINED}},
              "message": refs[0] if len(refs) == 1 else {"oneOf": refs}}
        channels[address] = {"description": CHANNEL_NOTES[ch], "parameters": params,
                             ("subscribe" if cloud_sends else "publish"): op}
    schemas = dict(SHARED)
    schemas.update({_camel(k) + "Payload": PAYLOADS[k] for k in sorted(kinds)})
    reasons = ", ".join(sorted(REASONS))
    return {
        "asyncapi": "2.6.0",
        "info": {"title": "edgepatch wire (devices, cloud companion, Canoe relay, federated rounds)",
                 "version": str(SCHEMA_VERSION),
                 "description": (
                     "GENERATED by `python -m edgepatch.protocol.asyncapi` from protocol/topics.py and "
                     "protocol/wire.py; tests/test_asyncapi.py fails when they drift.\n\n"
                     f"* Every message is one envelope of at most {MAX_MESSAGE_BYTES} bytes: schema, "
                     "kind, device_id (the sender; the cloud's id for what the cloud sends), fleet, base_version, "
                     "variant_id, seq, sent_at, payload, content_hash; as UTF-8 JSON, or, for "
                     f"{', '.join(sorted(framed_kinds()))}, as a binary frame (payload starts with "
                     f"\"{MAGIC.decode()}\", layout in the message's x-frame; receivers accept both forms).\n"
                     "* content_hash = sha256 (hex) of the canonical JSON of the envelope without content_hash "
                     "(keys sorted, separators \",\" and \":\", no ASCII escaping), or of a frame's bytes; it is "
                     "the idempotency key.\n"
                     "* Strict JSON for every family: duplicate keys, NaN/Infinity, control characters in any "
                     "string and integers beyond signed 64 bits are refused.\n"
                     "* On device channels the sender is the device in the topic, except the relayed channels "
                     "(canoe/task, canoe/reply, ack) where the cloud writes to the device in the topic.\n"
                     f"* Reject reasons: {reasons}.\n"
                     "* Large content (bundles, slices, weights) travels by reference with its sha256.")},
        "defaultContentType": "application/json",
        "channels": channels,
        "components": {
            "parameters": {"fleet": {"schema": _ref("Name")}, "device": {"schema": _ref("Name")}},
            "messages": _messages(kinds),
            "schemas": schemas,
        },
    }


def render() -> str:
    import json

    import yaml  # the dev extra: only documentation needs it

    class _NoAliases(yaml.SafeDumper):  # shared schema objects are written out, not as &id anchors
        def ignore_aliases(self, data: Any) -> bool:
            return True

    plain = json.loads(json.dumps(document()))
    return yaml.dump(plain, Dumper=_NoAliases, sort_keys=False, width=110, allow_unicode=True)


if __name__ == "__main__":
    sys.stdout.write(render())
