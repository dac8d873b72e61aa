"""Binary frames (protocol/frame.py, issue 13) of patches, metrics and acks: size on the wire, exact round trips,
canonical bytes, and every malformed frame refused with its stable reason before anything is trusted."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest

from edgepatch.protocol.frame import FORMAT_VERSION, HEADER, MAGIC, claimed_hash, is_frame
from edgepatch.protocol.messages import (
    REASONS,
    AckEntry,
    DeviceState,
    MessageError,
    Metrics,
    PatchAck,
    PatchUpdate,
    decode,
    encode,
    make_message,
)

# Ids as the fleet really uses them: a bundle's base version is a 64-hex manifest hash.
IDS = {"device_id": "dev-007", "fleet": "default", "base_version": "1f" * 32, "variant_id": "k100-100"}
TOPIC = "edgepatch/v1/default/dev-007/patch"
SCALARS = struct.Struct("<QQddI")  # steps, samples, holdout_acc, loss, k


def patch(k: int = 16, seq: int = 17, **kw) -> PatchUpdate:
    phi = np.random.default_rng(k).standard_normal(k).astype(np.float32)
    return PatchUpdate(phi=kw.pop("phi", phi), steps=kw.pop("steps", 400), samples=kw.pop("samples", 96),
                       holdout_acc=kw.pop("holdout_acc", 0.8125), loss=kw.pop("loss", 0.4137))


def frame(k: int = 16, seq: int = 17, **ids: str) -> bytes:
    return encode(make_message(patch(k), seq=seq, sent_at=1_796_025_025.408, **{**IDS, **ids}))


def reject(data: bytes, reason: str, topic: str = TOPIC, **kw) -> MessageError:
    with pytest.raises(MessageError) as info:
        decode(topic, data, **kw)
    assert info.value.reason == reason, str(info.value)
    return info.value


def build(*, version: int = FORMAT_VERSION, code: int = 1, ids: tuple[bytes, ...] | None = None,
          lengths: tuple[int, ...] | None = None, seq: int = 17, sent_at: float = 1.5,
          scalars: tuple = (400, 96, 0.8125, 0.4137), k: int | None = None, phi: bytes | None = None) -> bytes:
    """A frame written by hand from the documented layout (not by the codec), so edits reach each check."""
    ids = ids if ids is not None else tuple(IDS[k].encode() for k in ("device_id", "fleet", "base_version",
                                                                       "variant_id"))
    lengths = lengths if lengths is not None else tuple(len(i) for i in ids)
    phi = phi if phi is not None else np.arange(4, dtype="<f4").tobytes()
    k = len(phi) // 4 if k is None else k
    return (HEADER.pack(MAGIC, version, code, *lengths, seq, sent_at) + b"".join(ids)
            + SCALARS.pack(*scalars, k) + phi)


# ------------------------------------------------------------------------------------------------ size

@pytest.mark.parametrize("k", [16, 64, 1024])
def test_patch_payload_is_at_most_4k_plus_200_bytes(k):
    data = frame(k)
    ids = sum(len(v.encode()) for v in IDS.values())
    assert len(data) == HEADER.size + ids + SCALARS.size + 4 * k  # 63 bytes + ids + φ, nothing else
    assert len(data) <= 4 * k + 200, f"k={k}: {len(data)} bytes"
    as_json = encode(make_message(patch(k), seq=17, sent_at=1_796_025_025.408, binary=False, **IDS))
    assert len(data) < len(as_json)


def test_patches_metrics_and_acks_travel_as_frames_and_other_kinds_as_json():
    ack = PatchAck((AckEntry("ab" * 32, "stored"),))
    for payload, code in ((patch(), 1), (Metrics(values={"train_ms": 1.0}), 2), (ack, 3)):
        msg = make_message(payload, seq=1, **IDS)
        data = encode(msg)
        assert msg.binary and is_frame(data) and data[:3] == b"EPB" and data[3] == FORMAT_VERSION and data[4] == code
    other = make_message(DeviceState(state="online", last_seen=1.0), seq=2, **IDS)
    assert not other.binary and encode(other).startswith(b"{")
    with pytest.raises(AttributeError):  # a kind without a frame codec cannot be forced into one
        make_message(DeviceState(state="online", last_seen=1.0), seq=3, binary=True, **IDS)


# ------------------------------------------------------------------------------------------ round trips

def test_round_trip_is_exact_and_the_hash_is_the_frames_sha256():
    phi = np.array([0.1, -2.5e-8, 3.4e38, -0.0, 7.0, np.finfo(np.float32).tiny / 2], dtype=np.float32)
    msg = make_message(PatchUpdate(phi=phi, steps=2**63 - 1, samples=0, holdout_acc=1.0, loss=-1e300),
                       seq=2**63 - 1, sent_at=1_700_000_000.123456789, **IDS)
    data = encode(msg)
    assert msg.content_hash == hashlib.sha256(data).hexdigest()
    back = decode(TOPIC, data)
    assert back == msg and back.binary
    np.testing.assert_array_equal(back.payload.phi, phi)
    assert back.payload.phi.dtype == np.float32 and np.signbit(back.payload.phi[3])  # -0.0 kept
    assert not back.payload.phi.flags.writeable
    assert encode(back) == data
    assert frame(seq=18) != frame(seq=17) and frame() == frame()  # a resend is the same bytes, same hash


def test_unicode_ids_round_trip():
    data = frame(base_version="b\u00e9ta-\U0001f680" * 3, variant_id="")
    back = decode(TOPIC, data)
    assert back.base_version == "b\u00e9ta-\U0001f680" * 3 and back.variant_id == ""
    assert encode(back) == data


def test_json_patches_of_older_senders_still_decode():
    old = make_message(patch(), seq=3, binary=False, **IDS)
    data = encode(old)
    back = decode(TOPIC, data)
    assert back == old and not back.binary and data.startswith(b"{")
    assert back.content_hash != make_message(patch(), seq=3, **IDS).content_hash  # each form hashes its bytes


# ------------------------------------------------------------------------------------------- rejections

def test_the_hand_built_frame_is_accepted():
    """The documented layout is the real one: a frame written from it decodes."""
    msg = decode(TOPIC, build())
    assert msg.payload.steps == 400 and msg.payload.phi.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert (msg.device_id, msg.fleet, msg.base_version, msg.variant_id, msg.seq) == (*IDS.values(), 17)


def test_unknown_format_version_and_kind_code_are_refused_clearly():
    err = reject(build(version=2), "schema")
    assert "format version 2" in str(err) and f"speaks {FORMAT_VERSION}" in str(err)
    reject(build(version=0), "schema")
    assert "kind code 9" in str(reject(build(code=9), "unknown_kind"))


@pytest.mark.parametrize("cut", range(0, 200, 7))
def test_every_truncation_is_refused(cut):
    data = frame()
    if cut >= len(data):
        return
    with pytest.raises(MessageError) as info:
        decode(TOPIC, data[:cut])
    assert info.value.reason in ({"empty"} if cut == 0 else {"bad_shape", "bad_json"})


def test_lengths_are_checked_before_reading():
    reject(build(lengths=(7, 7, 64, 200)), "bad_shape")  # strings claim more bytes than the frame has
    reject(build(lengths=(7, 7, 64, 9)), "bad_field")  # shifted: variant id swallows a scalar byte (not UTF-8)
    reject(build(ids=(b"", b"default", b"b", b"v")), "bad_field")  # empty device id
    reject(build(lengths=(65, 7, 1, 1)), "bad_field")
    reject(build(lengths=(7, 7, 1025, 1)), "bad_field")
    reject(build(phi=b""), "bad_shape")  # k = 0
    reject(build(phi=b"\x00" * 6), "bad_shape")  # not whole float32s
    reject(build() + b"\x00", "bad_shape")  # trailing byte
    reject(build()[:-4], "bad_shape")  # one float cut off: k says 4
    reject(build(k=3), "bad_shape")
    reject(build(k=2**32 - 1), "bad_shape")
    reject(build(phi=b"")[:-8], "bad_shape")  # scalars cut short
    reject(build(), "oversize", max_bytes=100)


def test_bad_values_are_refused():
    reject(build(ids=(b"dev/007", b"default", b"b", b"v")), "bad_field")  # not a topic level
    reject(build(ids=(b"dev-007", b"default", b"b\xc0\xafad", b"v")), "bad_field")  # overlong UTF-8
    reject(build(ids=(b"dev-007", b"default", b"\xed\xa0\x80", b"v")), "bad_field")  # surrogate
    reject(build(ids=(b"dev-007", b"default", b"b\x00", b"v")), "bad_field")  # control characters
    reject(build(ids=(b"dev-007", b"default", b"b", "v\u009b".encode())), "bad_field")
    reject(build(seq=2**63), "bad_field")  # beyond signed 64 bits, as in JSON
    reject(build(scalars=(2**63, 1, 0.5, 0.1)), "bad_field")
    reject(build(scalars=(1, 2**64 - 1, 0.5, 0.1)), "bad_field")
    reject(build(scalars=(1, 1, 1.5, 0.1)), "bad_field")
    reject(build(scalars=(1, 1, float("nan"), 0.1)), "non_finite")
    reject(build(scalars=(1, 1, 0.5, float("inf"))), "non_finite")
    reject(build(sent_at=float("-inf")), "non_finite")
    reject(build(phi=np.array([1, np.nan], "<f4").tobytes()), "non_finite")
    reject(build(phi=np.array([np.inf], "<f4").tobytes()), "non_finite")


def test_topic_must_match_the_frame():
    data = frame()
    reject(data, "topic_mismatch", "edgepatch/v1/default/dev-008/patch")
    reject(data, "topic_mismatch", "edgepatch/v1/other/dev-007/patch")
    reject(data, "topic_mismatch", "edgepatch/v1/default/dev-007/metrics")
    reject(data, "bad_topic", "elsewhere/dev-007/patch")


def test_the_sender_refuses_what_receivers_refuse():
    for bad, reason in (({"phi": np.array([1.0, np.nan], np.float32)}, "non_finite"),
                        ({"phi": np.zeros((2, 2), np.float32)}, "bad_shape"), ({"holdout_acc": 2.0}, "bad_field"),
                        ({"steps": -1}, "bad_field"), ({"loss": float("inf")}, "non_finite")):
        with pytest.raises(MessageError) as info:
            make_message(patch(**bad), seq=1, **IDS)
        assert info.value.reason == reason


def test_fuzzed_frames_are_refused_or_canonical():
    """Random byte edits: decode raises MessageError, or accepts a message that re-encodes to exactly the bytes
    received (so sha256 of the frame is a sound idempotency key: one message, one byte string)."""
    rng = np.random.default_rng(0)
    data = frame(k=8)
    accepted = 0
    for _ in range(2000):
        mutated = bytearray(data)
        for pos in rng.integers(0, len(data), size=int(rng.integers(1, 4))):
            mutated[pos] = int(rng.integers(0, 256))
        if rng.random() < 0.2:
            mutated = mutated[:int(rng.integers(1, len(mutated)))]
        try:
            msg = decode(TOPIC, bytes(mutated))
        except MessageError as exc:
            assert exc.reason in REASONS
            continue
        accepted += 1
        assert encode(msg) == bytes(mutated) and msg.content_hash == hashlib.sha256(mutated).hexdigest()
    assert 0 < accepted < 2000  # φ and scalar edits are valid messages; header edits mostly are not


def test_claimed_hash_names_a_refused_frame_by_its_bytes():
    bad = build(scalars=(1, 1, 1.5, 0.1))  # refused (holdout_acc), yet the device hashed exactly these bytes
    assert claimed_hash(bad, 65536) == hashlib.sha256(bad).hexdigest()
    good = make_message(patch(), seq=1, binary=False, **IDS)
    assert claimed_hash(encode(good), 65536) == good.content_hash
    assert claimed_hash(b"\x00garbage", 65536) is None and claimed_hash(b"", 65536) is None
    assert claimed_hash(bad, 10) is None  # oversize: not even hashed


# ------------------------------------------------------------------------------------------ metrics frames

METRICS_TOPIC = "edgepatch/v1/default/dev-007/metrics"


def metrics_frame(entries: list[tuple[bytes, float]], count: int | None = None) -> bytes:
    """A metrics frame by hand: count, then (name length, name, float64) per entry, in the order given."""
    ids = tuple(IDS[k].encode() for k in ("device_id", "fleet", "base_version", "variant_id"))
    body = bytes([len(entries) if count is None else count])
    body += b"".join(bytes([len(n)]) + n + struct.pack("<d", v) for n, v in entries)
    return HEADER.pack(MAGIC, FORMAT_VERSION, 2, *(len(i) for i in ids), 5, 1.5) + b"".join(ids) + body


def test_metrics_frames_round_trip_and_are_half_the_json():
    values = {"steps": 20.0, "holdout_acc": 0.75, "round_seconds": 1.8234, "holdout_acc_base": -0.0}
    msg = make_message(Metrics(values=values), seq=4, **IDS)
    data = encode(msg)
    back = decode(METRICS_TOPIC, data)
    assert back == msg and back.binary and back.payload.values == values and encode(back) == data
    assert list(back.payload.values) == sorted(values)  # sent sorted: one byte string per set of values
    as_json = encode(make_message(Metrics(values=values), seq=4, binary=False, **IDS))
    assert len(data) <= len(as_json) / 2
    assert decode(METRICS_TOPIC, metrics_frame([])).payload.values == {}
    assert decode(METRICS_TOPIC, metrics_frame([(b"a", 1.0), (b"b", 2.0)])).payload.values == {"a": 1.0, "b": 2.0}


def test_bad_metrics_frames_are_refused():
    reject(metrics_frame([(b"b", 1.0), (b"a", 2.0)]), "bad_field", METRICS_TOPIC)  # not ascending
    reject(metrics_frame([(b"a", 1.0), (b"a", 2.0)]), "bad_field", METRICS_TOPIC)  # duplicate
    for name in (b"Upper", b"1st", b"a\n", b"a b", b"\xff", b"a" * 65):
        with pytest.raises(MessageError):
            decode(METRICS_TOPIC, metrics_frame([(name, 1.0)]))
    reject(metrics_frame([(b"a", float("nan"))]), "non_finite", METRICS_TOPIC)
    reject(metrics_frame([(b"a", float("inf"))]), "non_finite", METRICS_TOPIC)
    reject(metrics_frame([(b"a", 1.0)], count=2), "bad_shape", METRICS_TOPIC)  # count says more than there is
    reject(metrics_frame([], count=129), "bad_field", METRICS_TOPIC)
    reject(metrics_frame([(b"a", 1.0)]) + b"\x00", "bad_shape", METRICS_TOPIC)
    reject(metrics_frame([(b"a", 1.0)])[:-1], "bad_shape", METRICS_TOPIC)
    reject(metrics_frame([(b"a", 1.0)]), "topic_mismatch", TOPIC)  # a metrics frame on the patch topic
    with pytest.raises(MessageError):
        make_message(Metrics(values={"Bad": 1.0}), seq=1, **IDS)
    with pytest.raises(MessageError):
        make_message(Metrics(values={f"m{i:03d}": 1.0 for i in range(129)}), seq=1, **IDS)


def test_fuzzed_metrics_frames_are_refused_or_canonical():
    rng = np.random.default_rng(1)
    data = encode(make_message(Metrics(values={"holdout_acc": 0.75, "steps": 20.0}), seq=4, **IDS))
    accepted = 0
    for _ in range(2000):
        mutated = bytearray(data)
        for pos in rng.integers(0, len(data), size=int(rng.integers(1, 3))):
            mutated[pos] = int(rng.integers(0, 256))
        try:
            msg = decode(METRICS_TOPIC, bytes(mutated))
        except MessageError as exc:
            assert exc.reason in REASONS
            continue
        accepted += 1
        assert encode(msg) == bytes(mutated)
    assert 0 < accepted < 2000


# ---------------------------------------------------------------------------------------------- ack frames

ACK_TOPIC = "edgepatch/v1/default/dev-007/ack"
CLOUD = {"device_id": "cloud", "fleet": "default"}


def ack_frame(entries: list[tuple[bytes, int, bytes]], count: int | None = None,
              reason_len: int | None = None) -> bytes:
    """An ack frame by hand: count u16, then (32-byte hash, status u8, reason length u16, reason) per entry."""
    ids = (b"cloud", b"default", b"", b"")
    body = struct.pack("<H", len(entries) if count is None else count)
    body += b"".join(h + struct.pack("<BH", st, len(r) if reason_len is None else reason_len) + r
                     for h, st, r in entries)
    return HEADER.pack(MAGIC, FORMAT_VERSION, 3, *(len(i) for i in ids), 9, 1.5) + b"".join(ids) + body


H1, H2 = hashlib.sha256(b"1").digest(), hashlib.sha256(b"2").digest()


def test_ack_frames_round_trip_exactly_and_are_a_fifth_of_the_json():
    acks = (AckEntry(H1.hex(), "stored"), AckEntry(H2.hex(), "duplicate"), AckEntry(H1.hex(), "quarantined", "db"),
            AckEntry(H2.hex(), "rejected", "wrong_size: base '\u00e9' has k=16 \U0001f680"))
    msg = make_message(PatchAck(acks), seq=2**63 - 1, sent_at=1_796_025_025.408, **CLOUD)
    data = encode(msg)
    back = decode(ACK_TOPIC, data)
    assert back == msg and back.binary and back.payload.acks == acks and encode(back) == data
    assert msg.content_hash == hashlib.sha256(data).hexdigest()
    one = encode(make_message(PatchAck(acks[:1]), seq=1_796_025_025_408, sent_at=1_796_025_025.408, **CLOUD))
    as_json = encode(make_message(PatchAck(acks[:1]), seq=1_796_025_025_408, sent_at=1_796_025_025.408,
                                  binary=False, **CLOUD))
    assert len(one) == HEADER.size + len("clouddefault") + 2 + 32 + 1 + 2 == 76 and len(one) <= len(as_json) / 4
    assert decode(ACK_TOPIC, ack_frame([(H1, 3, "\u00e9".encode())])).payload.acks == (
        AckEntry(H1.hex(), "rejected", "\u00e9"),)


def test_bad_ack_frames_are_refused():
    reject(ack_frame([]), "bad_field", ACK_TOPIC)  # an ack of nothing
    reject(ack_frame([(H1, 0, b"")] * 2, count=257), "bad_field", ACK_TOPIC)  # more than MAX_ACKS
    reject(ack_frame([(H1, 0, b"")], count=2), "bad_shape", ACK_TOPIC)  # count says more than there is
    reject(ack_frame([(H1, 0, b""), (H2, 0, b"")], count=1), "bad_shape", ACK_TOPIC)  # trailing entry
    reject(ack_frame([(H1, 0, b"")]) + b"\x00", "bad_shape", ACK_TOPIC)
    reject(ack_frame([(H1, 0, b"")])[:-1], "bad_shape", ACK_TOPIC)  # cut inside the entry
    reject(ack_frame([(H1, 0, b"ab")], reason_len=3), "bad_shape", ACK_TOPIC)  # reason longer than the frame
    reject(ack_frame([(H1, 0, b"ab")], reason_len=1), "bad_shape", ACK_TOPIC)  # shorter: a byte left over
    reject(ack_frame([(H1, 0, b"x" * 1025)]), "bad_shape", ACK_TOPIC)  # beyond MAX_TEXT_BYTES, checked first
    reject(ack_frame([(H1, 0, b"x" * 257)]), "bad_field", ACK_TOPIC)  # > MAX_TEXT characters
    reject(ack_frame([(H1, 4, b"")]), "bad_field", ACK_TOPIC)  # no such status
    reject(ack_frame([(H1, 255, b"")]), "bad_field", ACK_TOPIC)
    for reason in (b"\xc0\xaf", b"\xed\xa0\x80", b"\xff", b"a\nb", "x\u009b".encode()):  # overlong, surrogate,
        reject(ack_frame([(H1, 3, reason)]), "bad_field", ACK_TOPIC)  # not UTF-8, control characters
    reject(ack_frame([(H1, 0, b"")]), "topic_mismatch", TOPIC)  # an ack on a device's patch topic
    reject(ack_frame([(H1, 0, b"")]), "topic_mismatch", "edgepatch/v1/other/dev-007/ack")
    with pytest.raises(MessageError):  # the sender refuses what receivers refuse
        make_message(PatchAck((AckEntry(H1.hex().upper(), "stored"),)), seq=1, **CLOUD)


def test_fuzzed_ack_frames_are_refused_or_canonical():
    rng = np.random.default_rng(2)
    data = ack_frame([(H1, 0, b""), (H2, 3, b"bad_field: x")])
    accepted = 0
    for _ in range(2000):
        mutated = bytearray(data)
        for pos in rng.integers(0, len(data), size=int(rng.integers(1, 3))):
            mutated[pos] = int(rng.integers(0, 256))
        if rng.random() < 0.2:
            mutated = mutated[:int(rng.integers(1, len(mutated)))]
        try:
            msg = decode(ACK_TOPIC, bytes(mutated))
        except MessageError as exc:
            assert exc.reason in REASONS
            continue
        accepted += 1
        assert encode(msg) == bytes(mutated) and msg.content_hash == hashlib.sha256(mutated).hexdigest()
    assert 0 < accepted < 2000  # hash and reason edits are valid acks; count and length edits are not
