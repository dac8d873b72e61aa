"""The ingest's PatchAck shortcut (cloud/ingest_acks.ack_payload) writes exactly what the strict codec would:
same bytes as `encode(make_message(PatchAck(...)))`, and a device's strict `decode` reads it back."""

from __future__ import annotations

import hashlib

import pytest

from edgepatch.cloud.ingest_acks import SENDER, ack_payload
from edgepatch.protocol.messages import AckEntry, PatchAck, decode, encode, make_message
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
