"""docs/asyncapi.yaml against the codec: generated from it, and its schemas checked both ways on real messages."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import yaml
from jsonschema import Draft202012Validator

from edgepatch.protocol import asyncapi
from edgepatch.protocol.canoe import CanoeMeta, CanoeOffer, CanoeReply, CanoeRequest, CanoeTask
from edgepatch.protocol.fl import Assignment, BlobRef, FlJoin, FlRoundOpen, FlStop, FlUpdate
from edgepatch.protocol.messages import (
    AckEntry,
    BundleAnnouncement,
    DeviceState,
    Metrics,
    PatchAck,
    PatchUpdate,
)
from edgepatch.protocol.topics import FLEET_CHANNELS, Channel, device_topic, fleet_topic
from edgepatch.protocol.wire import CHANNEL_KINDS, REASONS, decode, encode, known_kinds, make_message

DOC_PATH = Path(__file__).resolve().parents[1] / "docs" / "asyncapi.yaml"
SHA = "ab" * 32
REF = BlobRef("https://cloud.example/g/r1.npz", 1234, SHA)
OFFER = CanoeOffer("r-1", "dev-t", "dev-h", SHA, 10, inline_b64="AAAA")
SAMPLES = [
    PatchUpdate(np.linspace(-1, 1, 4, dtype=np.float32), 10, 32, 0.75, 0.3),
    Metrics({"train_ms": 3.5, "canoe.alpha.own": 0.5}),
    DeviceState("offline", 1.0, "will"),
    BundleAnnouncement("b1", "https://cloud.example/b1/", SHA, 10, {"a.tflite": SHA}),
    BundleAnnouncement("b2", "https://cloud.example/b2/", SHA, 10, {"a.tflite": SHA}, 7, "c2lnbmF0dXJl"),
    CanoeMeta([1, 2, 3], [0.5, 0.5, 0.5]),
    CanoeRequest("r-1", [2], [1, 2, 3], 0.4, 0.9, "new labels"),
    CanoeTask("r-1", "dev-t", [2], "k50"),
    OFFER,
    CanoeReply("r-1", offer=OFFER),
    FlJoin("raspberry_pi_4", 1.5, 100, ("k100", "k50")),
    FlRoundOpen(1, "distreal", None, REF, 5, 0.05, {"dev-1": Assignment("k50", "fixed", 7)}, Assignment(), 0.0),
    FlStop("done"),
    PatchAck((AckEntry(SHA, "stored"), AckEntry("cd" * 32, "rejected", "bad_field"))),
    FlUpdate(1, "ok", "5 steps", 5, 5, 100, 0.4, REF, {"c1.weight": 3}, {"k50": 5}, ((0.0, "k50"),), 1.0, 0.5, 1234),
]


@pytest.fixture(scope="module")
def doc() -> dict:
    return yaml.safe_load(DOC_PATH.read_text())


def validator(doc: dict, kind: str) -> Draft202012Validator:
    """The JSON envelope's schema (a framed kind's JSON form is its `...Json` message)."""
    schema = {"$ref": f"#/components/messages/{asyncapi.message_names(kind)[-1]}/payload",
              "components": doc["components"]}
    return Draft202012Validator(schema)


def test_the_committed_document_is_what_the_codec_generates():
    assert DOC_PATH.read_text() == asyncapi.render(), \
        "docs/asyncapi.yaml drifted: run `python -m edgepatch.protocol.asyncapi > docs/asyncapi.yaml`"


def test_every_channel_and_kind_of_the_codec_is_documented_and_nothing_else(doc):
    def concrete(address: str) -> str:
        return address.replace("{fleet}", "lab").replace("{device}", "dev-7")

    documented = {concrete(a) for a in doc["channels"]}
    expected = {fleet_topic("lab", c) if c in FLEET_CHANNELS else device_topic("lab", "dev-7", c) for c in Channel}
    assert documented == expected
    assert not any("help" in a for a in doc["channels"])  # the dead placeholder topics are gone
    for address, channel in doc["channels"].items():
        op = channel.get("publish") or channel["subscribe"]
        refs = op["message"].get("oneOf", [op["message"]])
        names = {r["$ref"].rsplit("/", 1)[1] for r in refs}
        ch = Channel(address.split("{device}/")[-1] if "{device}" in address else address.split("{fleet}/")[1])
        assert names == {n for k in CHANNEL_KINDS[ch] for n in asyncapi.message_names(k)}, address
    assert set(doc["components"]["messages"]) == {n for k in known_kinds() for n in asyncapi.message_names(k)}
    assert asyncapi.message_names("patch_update") == ["PatchUpdate", "PatchUpdateJson"]
    assert all(reason in doc["info"]["description"] for reason in REASONS)


def test_samples_cover_every_kind():
    assert {s.KIND for s in SAMPLES} == set(known_kinds())


@pytest.mark.parametrize("payload", SAMPLES, ids=lambda p: p.KIND)
def test_the_schema_accepts_what_encode_emits_and_refuses_what_decode_refuses(doc, payload):
    msg = make_message(payload, device_id="dev-7", fleet="lab", base_version="b1", variant_id="k50", seq=3,
                       binary=False)  # the JSON form of every kind (frames: test_the_frame_layout_...)
    env = json.loads(encode(msg))
    v = validator(doc, payload.KIND)
    v.validate(env)
    schema_props = doc["components"]["schemas"][asyncapi._camel(payload.KIND) + "Payload"]["properties"]
    schema_required = doc["components"]["schemas"][asyncapi._camel(payload.KIND) + "Payload"]["required"]
    assert set(schema_required) <= set(env["payload"]) <= set(schema_props), "schema and codec disagree on fields"
    for edit in (lambda e: e["payload"].update(unexpected=1), lambda e: e.update(extra=1),
                 lambda e: e.update(seq=-1), lambda e: e.update(base_version="a\x00b"),
                 lambda e: e["payload"].pop(schema_required[0])):
        bad = json.loads(json.dumps(env))
        edit(bad)
        assert not v.is_valid(bad), f"{payload.KIND}: the schema accepts an envelope decode() refuses"
    topic = msg.topic(to="dev-9") if msg.kind in ("canoe_task", "canoe_reply", "patch_ack") else msg.topic()
    assert decode(topic, encode(msg)) == msg


PACK = {"uint8": "B", "uint16": "H", "uint32": "I", "uint64": "Q", "float64": "d"}


def frame_from_the_document(fields: list[dict], values: dict) -> bytes:
    """Write a frame following only the document's x-frame field list (little-endian)."""
    out = b""
    for f in fields:
        v = values[f["name"]]
        if f["type"] in PACK:
            out += struct.pack("<" + PACK[f["type"]], v)
            assert struct.calcsize("<" + PACK[f["type"]]) == f["bytes"], f
        elif f["type"] == "utf-8":
            out += v.encode()
        elif f["type"] == "float32[k]":
            out += np.asarray(v, "<f4").tobytes()
        else:
            assert f["type"] == 'b"EPB"' and f["bytes"] == 3
            out += b"EPB"
    return out


def test_framed_kinds_are_patches_metrics_and_acks():
    assert sorted(asyncapi.framed_kinds()) == ["metrics", "patch_ack", "patch_update"]
    assert asyncapi.message_names("patch_ack") == ["PatchAck", "PatchAckJson"]


def test_the_ack_channel_is_documented_at_the_qos_the_companion_sends_it(doc):
    from edgepatch.cloud.ingest_acks import ACK_QOS

    qos = {a.rsplit("/", 1)[1]: (c.get("publish") or c["subscribe"])["bindings"]["mqtt"]["qos"]
           for a, c in doc["channels"].items()}
    assert qos["ack"] == ACK_QOS == 0 and qos["patch"] == 1


def test_the_ack_frame_layout_in_the_document_is_what_the_codec_writes(doc):
    message = doc["components"]["messages"]["PatchAck"]
    spec = message["x-frame"]
    assert spec["kind_code"] == PatchAck.FRAME_CODE and "the companion sends" in message["description"]
    entry_doc = spec["fields"][-1]["type"]
    codes = {s: i for i, s in enumerate(("stored", "duplicate", "quarantined", "rejected"))}
    assert all(f"{i} {s}" in entry_doc for s, i in codes.items()) and "32 raw bytes" in entry_doc
    ids = {"device_id": "cloud", "fleet": "lab", "base_version": "", "variant_id": ""}
    values = {"magic": b"EPB", "format_version": spec["format_version"], "kind_code": spec["kind_code"],
              **{f"{k}_bytes": len(v.encode()) for k, v in ids.items()}, **ids, "seq": 3, "sent_at": 1.25,
              "count": 2}
    entries = ((SHA, "stored", ""), ("cd" * 32, "rejected", "bad_field: \u00e9"))
    data = frame_from_the_document(spec["fields"][:-1], values) + b"".join(
        bytes.fromhex(h) + struct.pack("<BH", codes[s], len(r.encode())) + r.encode() for h, s, r in entries)
    msg = decode(device_topic("lab", "dev-7", Channel.ACK), data)
    assert msg.binary and msg.payload.acks == tuple(AckEntry(*e) for e in entries)
    assert encode(make_message(PatchAck(msg.payload.acks), seq=3, sent_at=1.25, **ids)) == data
    fixed = sum(f["bytes"] for f in spec["fields"] if isinstance(f["bytes"], int))
    assert f"Size: {fixed} bytes" in message["description"]


def test_the_metrics_frame_layout_in_the_document_is_what_the_codec_writes(doc):
    message = doc["components"]["messages"]["Metrics"]
    spec = message["x-frame"]
    assert spec["kind_code"] == Metrics.FRAME_CODE and "strictly ascending" in spec["fields"][-1]["type"]
    ids = {"device_id": "dev-7", "fleet": "lab", "base_version": "b1", "variant_id": "k50"}
    values = {"magic": b"EPB", "format_version": spec["format_version"], "kind_code": spec["kind_code"],
              **{f"{k}_bytes": len(v.encode()) for k, v in ids.items()}, **ids, "seq": 3, "sent_at": 1.25,
              "count": 2}
    head = frame_from_the_document(spec["fields"][:-1], values)
    data = head + b"".join(bytes([len(n)]) + n.encode() + struct.pack("<d", v) for n, v in (("a.b", 1.5), ("c", 2.0)))
    msg = decode(device_topic("lab", "dev-7", Channel.METRICS), data)
    assert msg.payload.values == {"a.b": 1.5, "c": 2.0}
    assert encode(make_message(Metrics({"c": 2.0, "a.b": 1.5}), seq=3, sent_at=1.25, **ids)) == data


def test_the_patch_frame_layout_in_the_document_is_what_decode_reads_and_encode_writes(doc):
    kind = "patch_update"
    message = doc["components"]["messages"][asyncapi._camel(kind)]
    spec = message["x-frame"]
    assert message["contentType"] == "application/octet-stream" and spec["byte_order"] == "little-endian"
    ids = {"device_id": "dev-7", "fleet": "lab", "base_version": "b\u00e9ta", "variant_id": "k50"}
    phi = np.linspace(-1, 1, 5, dtype=np.float32)
    values = {"magic": b"EPB", "format_version": spec["format_version"], "kind_code": spec["kind_code"],
              **{f"{k}_bytes": len(v.encode()) for k, v in ids.items()}, **ids, "seq": 3, "sent_at": 1.25,
              "steps": 10, "samples": 32, "holdout_acc": 0.75, "loss": 0.3, "k": 5, "phi": phi}
    data = frame_from_the_document(spec["fields"], values)
    msg = decode(device_topic("lab", "dev-7", Channel.PATCH), data)
    assert isinstance(msg.payload, PatchUpdate) and msg.binary and msg.base_version == "b\u00e9ta"
    np.testing.assert_array_equal(msg.payload.phi, phi)
    assert msg.content_hash == hashlib.sha256(data).hexdigest() and spec["content_hash"].startswith("sha256")
    made = make_message(PatchUpdate(phi, 10, 32, 0.75, 0.3), seq=3, sent_at=1.25, **ids)
    assert encode(made) == data  # the codec writes exactly the documented bytes
    fixed = sum(f["bytes"] for f in spec["fields"] if isinstance(f["bytes"], int))
    assert f"Size: {fixed} bytes" in message["description"]
    assert len(data) == fixed + sum(len(v.encode()) for v in ids.values()) + 4 * phi.size
