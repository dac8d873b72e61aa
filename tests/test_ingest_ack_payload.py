"""The ingest's PatchAck shortcut (cloud/ingest_acks.ack_payload) writes exactly what the strict codec would:
same bytes as `encode(make_message(PatchAck(...)))` (a binary frame since issue 13), and a device's strict
`decode` reads it back; chunks stay under the message limit; JSON acks of older companions still decode."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from edgepatch.cloud.ingest_acks import SENDER, _chunks, ack_payload, patch_acks
from edgepatch.cloud.store_records import BatchResult, Quarantined, Received, Reject
from edgepatch.protocol.frame import is_frame
from edgepatch.protocol.messages import (
    MAX_ACKS,
    MAX_MESSAGE_BYTES,
    AckEntry,
    MessageError,
    PatchAck,
    PatchUpdate,
    decode,
    encode,
    make_message,
)
from edgepatch.protocol.mqtt import Incoming
from edgepatch.protocol.topics import Channel, device_topic


def _entries() -> tuple[AckEntry, ...]:
    h = [hashlib.sha256(bytes([i])).hexdigest() for i in range(4)]
    return (AckEntry(h[0], "stored"), AckEntry(h[1], "duplicate"), AckEntry(h[2], "quarantined", "DataError: x"),
            AckEntry(h[3], "rejected", "wrong_size: phi has 3 floats, bundle base 'é' has k=16"))


def test_ack_payload_equals_the_strict_codecs_bytes() -> None:
    entries = _entries()
    fast = ack_payload("fleet-a", entries, seq=1234567, sent_at=1.7e9 + 0.125)
    strict = encode(make_message(PatchAck(entries), device_id=SENDER, fleet="fleet-a", seq=1234567,
                                 sent_at=1.7e9 + 0.125))
    assert fast == strict


def test_ack_payload_decodes_strictly_on_the_device_topic() -> None:
    entries = _entries()
    data = ack_payload("fleet-a", entries, seq=7)
    msg = decode(device_topic("fleet-a", "dev-1", Channel.ACK), data)
    assert isinstance(msg.payload, PatchAck) and msg.payload.acks == entries
    assert msg.device_id == SENDER and msg.seq == 7


@pytest.mark.parametrize("sent_at", [1.7e9, 0.1, 1e-7, 1234567890.123456, 3.0e20])
def test_ack_payload_matches_with_awkward_text_and_floats(sent_at: float) -> None:
    h = hashlib.sha256(b"x").hexdigest()
    entries = (AckEntry(h, "rejected", 'bad_field: "quoted" \\ back\\slash, tab?, ünïcödé ✓ 🚀'),
               AckEntry(h, "stored"))
    fast = ack_payload("fleet_b-2.x", entries, seq=2**62, sent_at=sent_at)
    strict = encode(make_message(PatchAck(entries), device_id=SENDER, fleet="fleet_b-2.x", seq=2**62,
                                 sent_at=sent_at))
    assert fast == strict


def test_ack_is_a_small_frame_and_json_acks_of_older_companions_still_decode() -> None:
    entry = (AckEntry(hashlib.sha256(b"p").hexdigest(), "stored"),)
    topic = device_topic("default", "dev-007", Channel.ACK)
    frame = ack_payload("default", entry, seq=1_796_025_025_408, sent_at=1_796_025_025.408)
    # header 27 + "cloud" + "default" + count 2 + hash 32 + status 1 + reason length 2 (issue 13: <= ~150)
    assert is_frame(frame) and len(frame) == 27 + 5 + 7 + 2 + 35 == 76
    old = encode(make_message(PatchAck(entry), device_id=SENDER, fleet="default", seq=1_796_025_025_408,
                              sent_at=1_796_025_025.408, binary=False))
    assert old.startswith(b"{") and len(old) > 4 * len(frame)
    back = decode(topic, old)
    assert not back.binary and back.payload.acks == entry == decode(topic, frame).payload.acks


def test_the_frame_refuses_what_the_json_refuses() -> None:
    h = hashlib.sha256(b"x").hexdigest()
    for bad in ((AckEntry(h.upper(), "stored"),), (AckEntry(h[:-2], "stored"),), (AckEntry(h, "lost"),),
                (AckEntry(h, "rejected", "line\nbreak"),), (AckEntry(h, "rejected", "x" * 257),), (),
                (AckEntry(h, "stored"),) * (MAX_ACKS + 1)):
        with pytest.raises(MessageError) as info:
            ack_payload("fleet-a", bad, seq=1)
        assert info.value.reason == "bad_field"


def test_chunks_hold_at_most_max_acks_entries_and_fit_a_message() -> None:
    h = hashlib.sha256(b"x").hexdigest()
    short = [AckEntry(h, "stored")] * (2 * MAX_ACKS + 3)
    assert [len(c) for c in _chunks(short, MAX_ACKS)] == [MAX_ACKS, MAX_ACKS, 3]
    long = [AckEntry(h, "rejected", "\u00e9\u2713" * 100)] * MAX_ACKS  # 35 + 500 bytes each: ~137 KB in all
    chunks = list(_chunks(long, MAX_ACKS))
    assert [len(c) for c in chunks] == [122, 122, 12]  # (65,536 - 98 bytes of header, ids, count) // 535
    fleet = "f" * 64
    assert all(len(ack_payload(fleet, c, seq=2**62)) <= MAX_MESSAGE_BYTES for c in chunks)
    assert len(ack_payload(fleet, chunks[0], seq=1)) > MAX_MESSAGE_BYTES - 535  # filled, not split early


def test_a_refused_frame_and_a_quarantined_patch_are_acked_with_encodable_reasons() -> None:
    """A refused frame is named by the sha256 of its bytes (what its sender hashed); reasons never carry control
    characters into the ack (a database error may hold a newline)."""
    bad = b"EPB\x01\x01garbage"
    patch_topic = device_topic("lab", "dev-1", Channel.PATCH)
    good = make_message(PatchUpdate(np.ones(4, np.float32), 1, 1, 0.5, 0.1), device_id="dev-1", fleet="lab", seq=2)
    result = BatchResult(quarantined=[Quarantined(good, "DataError: value\nout of range", "")])
    batch = [(Incoming(patch_topic, bad), Reject.of("bad_shape", patch_topic, "line one\nline two", 0.0, bad)),
             (Incoming(patch_topic, encode(good)), Received(good, len(encode(good)), 0.0))]
    rejected, quarantined = patch_acks(batch, result, MAX_MESSAGE_BYTES)[("lab", "dev-1")]
    assert rejected == AckEntry(hashlib.sha256(bad).hexdigest(), "rejected", "bad_shape: line one?line two")
    assert quarantined == AckEntry(good.content_hash, "quarantined", "DataError: value?out of range")
    msg = decode(device_topic("lab", "dev-1", Channel.ACK), ack_payload("lab", [rejected, quarantined], seq=5))
    assert msg.payload.acks == (rejected, quarantined)
