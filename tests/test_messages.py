"""Wire codec: round trips, and every malformed input rejected with its stable reason code, for every family."""

from __future__ import annotations

import base64
import json
import os

import numpy as np
import pytest

from edgepatch.protocol.messages import (
    MAX_MESSAGE_BYTES,
    REASONS,
    BundleAnnouncement,
    DeviceState,
    MessageError,
    Metrics,
    PatchUpdate,
    canonical_bytes,
    content_hash_of,
    decode,
    encode,
    make_message,
)
from edgepatch.protocol.topics import (
    Channel,
    TopicError,
    bundle_topic,
    device_topic,
    fleet_filter,
    parse_topic,
    shared_filter,
)

HEADER = {"device_id": "dev-7", "fleet": "lab", "base_version": "b3", "variant_id": "v50"}
SHA = "ab" * 32


def patch_msg(phi: np.ndarray | None = None, seq: int = 5, binary: bool = False):
    """A patch in the JSON envelope (still accepted: older devices, the Android guide). The binary frame
    patches travel in by default has its own tests: tests/test_frame.py."""
    phi = np.linspace(-1, 1, 8, dtype=np.float32) if phi is None else phi
    return make_message(PatchUpdate(phi=phi, steps=40, samples=320, holdout_acc=0.8125, loss=0.42),
                        seq=seq, sent_at=1_700_000_000.5, binary=binary, **HEADER)


def resign(env: dict) -> bytes:
    """Re-hash an edited envelope, so a test reaches the check it targets rather than hash_mismatch."""
    env = dict(env)
    env["content_hash"] = content_hash_of(env)
    return canonical_bytes(env)


def reject(topic: str, data: bytes, reason: str, **kw) -> MessageError:
    with pytest.raises(MessageError) as info:
        decode(topic, data, **kw)
    assert info.value.reason == reason, str(info.value)
    assert info.value.reason in REASONS
    return info.value


# ------------------------------------------------------------------------------------------------ topics

def test_topics_round_trip_and_reject_wildcards():
    t = device_topic("lab", "dev-7", Channel.CANOE_REQUEST)
    assert t == "edgepatch/v1/lab/dev-7/canoe/request"
    a = parse_topic(t)
    assert (a.fleet, a.device_id, a.channel) == ("lab", "dev-7", Channel.CANOE_REQUEST)
    b = parse_topic(bundle_topic("lab"))
    assert (b.fleet, b.device_id, b.channel) == ("lab", None, Channel.BUNDLE)
    r = parse_topic("edgepatch/v1/lab/fl/round")
    assert (r.fleet, r.device_id, r.channel) == ("lab", None, Channel.FL_ROUND)
    f = parse_topic("edgepatch/v1/lab/fl/fl/join")  # a device may be called "fl"
    assert (f.device_id, f.channel) == ("fl", Channel.FL_JOIN)
    assert fleet_filter("lab", "patch") == "edgepatch/v1/lab/+/patch"
    assert shared_filter("ingest", fleet_filter("lab", "patch")) == "$share/ingest/edgepatch/v1/lab/+/patch"
    for bad in ("a/b", "+", "#", "$SYS", "", "x" * 65):
        with pytest.raises(TopicError):
            device_topic("lab", bad, Channel.PATCH)
    for bad in ("edgepatch/v1/lab", "other/v1/lab/d/patch", "edgepatch/v1/lab/d/nope", "edgepatch/v1/lab/d/bundle",
                "edgepatch/v1/lab/d/help/request", "edgepatch/v1/lab/d/fl/round"):
        with pytest.raises(TopicError):
            parse_topic(bad)


# ------------------------------------------------------------------------------------------- round trips

def test_patch_update_round_trip_is_exact():
    phi = np.array([0.1, -2.5e-8, 3.4e38, -0.0, 7.0], dtype=np.float32)
    msg = patch_msg(phi)
    data = encode(msg)
    assert b"pickle" not in data and data.decode("utf-8")
    env = json.loads(data)
    assert env["schema"] == 1 and env["kind"] == "patch_update" and env["seq"] == 5
    assert base64.b64decode(env["payload"]["phi"]["b64"]) == phi.astype("<f4").tobytes()
    back = decode(msg.topic(), data)
    assert back == msg  # every header field, the content hash and the scalars
    np.testing.assert_array_equal(back.payload.phi, phi)
    assert back.payload.phi.dtype == np.float32
    assert encode(back) == data  # canonical: re-encoding is byte-identical


@pytest.mark.parametrize("payload", [
    Metrics(values={"train_ms": 12.5, "rss_bytes": 1.5e7, "battery": 0.9}),
    DeviceState(state="online", last_seen=1_700_000_001.25, reason="connected"),
])
def test_other_payloads_round_trip(payload):
    msg = make_message(payload, seq=1, **HEADER)
    back = decode(msg.topic(), encode(msg))
    assert back == msg
    assert back.payload == payload


def test_bundle_announcement_round_trip_on_fleet_topic():
    ann = BundleAnnouncement(version="b4", reference="https://cdn.example/b4.tar", manifest_sha256=SHA,
                             size=123456, artifacts={"trainable.tflite": SHA, "infer.pte": "cd" * 32})
    msg = make_message(ann, device_id="cloud", fleet="lab", base_version="b4", variant_id="", seq=9)
    assert msg.topic() == "edgepatch/v1/lab/bundle"
    back = decode(msg.topic(), encode(msg))
    assert back.payload == ann and back.content_hash == msg.content_hash


def test_last_will_state_goes_on_lwt_channel():
    msg = make_message(DeviceState(state="offline", last_seen=1.0, reason="will"), seq=0, **HEADER)
    topic = msg.topic(Channel.LWT)
    assert topic.endswith("/dev-7/lwt")
    assert decode(topic, encode(msg)).payload.reason == "will"
    with pytest.raises(MessageError):
        msg.topic(Channel.PATCH)


def test_sender_refuses_what_receivers_would_reject():
    with pytest.raises(MessageError) as info:
        patch_msg(np.array([1.0, np.nan], dtype=np.float32))
    assert info.value.reason == "non_finite"
    for binary in (False, True):
        with pytest.raises(MessageError) as info:
            encode(patch_msg(np.zeros(20_000, dtype=np.float32), binary=binary))
        assert info.value.reason == "oversize"


def test_content_hash_is_stable_and_content_sensitive():
    a, b = patch_msg(seq=5), patch_msg(seq=5)
    assert a.content_hash == b.content_hash  # a resend is recognisable as the same message
    assert patch_msg(seq=6).content_hash != a.content_hash


# -------------------------------------------------------------------------------------------- rejections

TOPIC = "edgepatch/v1/lab/dev-7/patch"


def good_env() -> dict:
    return json.loads(encode(patch_msg()))


def test_random_bytes_rejected():
    reject(TOPIC, os.urandom(512) + b"\xff", "bad_json")
    reject(TOPIC, b"\x00\x01garbage", "bad_json")
    reject(TOPIC, b"[1, 2, 3]", "bad_json")
    reject(TOPIC, b'{"a": 1, "a": 2}', "bad_json")  # duplicate keys would make the hash ambiguous
    reject(TOPIC, b"", "empty")


def test_oversize_rejected_before_parsing():
    reject(TOPIC, b"{" + b" " * MAX_MESSAGE_BYTES + b"}", "oversize")
    reject(TOPIC, encode(patch_msg()), "oversize", max_bytes=100)


@pytest.mark.parametrize("schema", [2, 0, "1", None, True])
def test_wrong_schema_rejected(schema):
    env = good_env()
    env["schema"] = schema
    reject(TOPIC, resign(env), "schema")
    del env["schema"]
    reject(TOPIC, resign(env), "schema")


def test_topic_and_identity_mismatches_rejected():
    data = encode(patch_msg())
    reject("edgepatch/v1/lab/dev-8/patch", data, "topic_mismatch")  # device id != topic's device
    reject("edgepatch/v1/other/dev-7/patch", data, "topic_mismatch")  # fleet != topic's fleet
    reject("edgepatch/v1/lab/dev-7/metrics", data, "topic_mismatch")  # kind != channel
    reject("edgepatch/v1/lab/bundle", data, "topic_mismatch")
    reject("elsewhere/dev-7/patch", data, "bad_topic")
    env = good_env()
    env["kind"] = "firmware_update"
    reject(TOPIC, resign(env), "unknown_kind")


def test_non_finite_values_rejected():
    env = good_env()
    env["payload"]["phi"]["b64"] = base64.b64encode(np.array([1, np.inf, 0, 0, 0, 0, 0, np.nan], "<f4")
                                                     .tobytes()).decode()
    reject(TOPIC, resign(env), "non_finite")
    raw = canonical_bytes(good_env()).replace(b'"loss":0.42', b'"loss":NaN')
    reject(TOPIC, raw, "non_finite")
    raw = canonical_bytes(good_env()).replace(b'"loss":0.42', b'"loss":-Infinity')
    reject(TOPIC, raw, "non_finite")
    raw = canonical_bytes(good_env()).replace(b'"loss":0.42', b'"loss":1e999')  # parses to inf
    reject(TOPIC, raw, "non_finite")


@pytest.mark.parametrize("edit", [
    lambda phi: phi.update(shape=[9]),  # 8 floats of data, shape claims 9
    lambda phi: phi.update(shape=[2, 4]),  # phi must be 1-D
    lambda phi: phi.update(dtype="<f8"),
    lambda phi: phi.update(b64=base64.b64encode(b"\x00" * 30).decode()),  # not a whole number of floats
    lambda phi: phi.update(shape=[0], b64=""),
])
def test_wrong_shape_rejected(edit):
    env = good_env()
    edit(env["payload"]["phi"])
    reject(TOPIC, resign(env), "bad_shape")


def test_bad_fields_rejected():
    cases = [
        lambda e: e.update(seq=-1), lambda e: e.update(seq=1.5), lambda e: e.update(seq=True),
        lambda e: e.pop("device_id"), lambda e: e.update(extra=1), lambda e: e["payload"].pop("steps"),
        lambda e: e["payload"].update(holdout_acc=1.5), lambda e: e["payload"]["phi"].update(b64="!!!!"),
        lambda e: e.update(payload=[1]),
    ]
    for edit in cases:
        env = good_env()
        edit(env)
        reject(TOPIC, resign(env), "bad_field")


def test_hash_mismatch_rejected():
    env = good_env()
    env["payload"]["steps"] = 41  # tampered, hash not updated
    reject(TOPIC, canonical_bytes(env), "hash_mismatch")
    env = good_env()
    del env["content_hash"]
    reject(TOPIC, canonical_bytes(env), "hash_mismatch")
    env = good_env()
    env["payload"]["phi"]["b64"] = base64.b64encode(np.ones(8, "<f4").tobytes()).decode()
    reject(TOPIC, canonical_bytes(env), "hash_mismatch")


def test_fuzzed_mutations_only_raise_message_error():
    """Random byte flips of a valid message: decode either succeeds identically or raises MessageError."""
    rng = np.random.default_rng(0)
    data = bytearray(encode(patch_msg()))
    accepted = 0
    for _ in range(400):
        mutated = bytearray(data)
        for pos in rng.integers(0, len(data), size=int(rng.integers(1, 4))):
            mutated[pos] = int(rng.integers(0, 256))
        try:
            decode(TOPIC, bytes(mutated))
            accepted += 1
        except MessageError as exc:
            assert exc.reason in REASONS
    assert accepted <= 5  # the content hash catches virtually every corruption


# -------------------------------------------------------------------------- one codec for every family

def family_samples() -> dict[str, tuple[str, bytes]]:
    """(topic, encoded message) of one message per family, all from the one envelope."""
    from edgepatch.protocol.canoe import CanoeRequest, CanoeTask
    from edgepatch.protocol.fl import BlobRef, FlJoin, FlStop

    out = {"patch": (TOPIC, encode(patch_msg()))}
    req = make_message(CanoeRequest("r-1", [3], [1, 2, 3, 4], 0.5, 0.9, "drop"), seq=2, **HEADER)
    out["canoe_request"] = (req.topic(), encode(req))
    task = make_message(CanoeTask("r-1", "dev-7", [3]), device_id="cloud", fleet="lab", seq=3)
    out["canoe_task"] = (task.topic(to="dev-9"), encode(task))
    join = make_message(FlJoin("pi4", 1.0, 10, ("k100",)), seq=4, **HEADER)
    out["fl_join"] = (join.topic(), encode(join))
    stop = make_message(FlStop("done"), device_id="fl-server", fleet="lab", seq=5)
    out["fl_stop"] = (stop.topic(), encode(stop))
    assert BlobRef("https://x/y.npz", 1, SHA).to_json()["bytes"] == 1
    return out


@pytest.mark.parametrize("family", ["patch", "canoe_request", "canoe_task", "fl_join", "fl_stop"])
def test_every_family_shares_the_strict_envelope(family):
    topic, data = family_samples()[family]
    back = decode(topic, data)
    assert encode(back) == data
    env = json.loads(data)
    # Duplicate keys are refused in every family (Canoe's parser used to accept them).
    dup = data.replace(b'{"base_version"', b'{"base_version":"x","base_version"', 1)
    assert dup != data
    reject(topic, dup, "bad_json")
    # NUL and other control characters in any string are refused, wherever they are.
    for bad in ("a\\u0000b", "tab\\there", "\\u009b"):
        edited = dict(env, base_version=json.loads(f'"{bad}"'))
        reject(topic, resign(edited), "bad_field")
    # Integers beyond 64 bits are refused anywhere in the document, before any field check.
    reject(topic, resign(dict(env, seq=2**63)), "bad_field")
    reject(topic, resign(dict(env, payload={**env["payload"], "zz": -(2**63) - 1})), "bad_field")
    assert decode(topic, resign(dict(env, seq=2**63 - 1))).seq == 2**63 - 1


def test_relayed_channels_name_the_addressee_not_the_sender():
    topic, data = family_samples()["canoe_task"]
    assert topic == "edgepatch/v1/lab/dev-9/canoe/task" and decode(topic, data).device_id == "cloud"
    _, request = family_samples()["canoe_request"]
    reject("edgepatch/v1/lab/dev-9/canoe/request", request, "topic_mismatch")  # sender must be the topic's


def test_dead_message_types_are_gone():
    from edgepatch.protocol import messages
    from edgepatch.protocol.wire import known_kinds

    assert not hasattr(messages, "HelpRequest") and not hasattr(messages, "HelpOffer")
    assert not any(k.startswith("help") for k in known_kinds())
    assert not any("help" in c.value for c in Channel)


def test_slice_file_header_uses_the_same_strict_json():
    import io

    from edgepatch.protocol.canoe import CanoeError, decode_slice

    header = b'{"format": "canoe-slice/1", "format": "canoe-slice/1"}'
    buf = io.BytesIO()
    np.savez(buf, __header__=np.frombuffer(header, dtype=np.uint8))
    with pytest.raises(CanoeError, match="duplicate key"):
        decode_slice(buf.getvalue())
