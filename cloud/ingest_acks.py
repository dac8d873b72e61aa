"""Application-level acks (issue 12): after a batch commits, tell each device which of its patches are stored.

Why: a broker's PUBACK is no proof of storage. Mosquitto does not restore MQTT 5 shared subscriptions from
its persistence, so after a restart it acknowledges patches that no ingest session receives; a device
that trusted the PUBACK lost them. The device therefore keeps a patch until a `PatchAck` naming its
content hash arrives on `edgepatch/v1/<fleet>/<device>/ack`, and resends it otherwise.

The ack is a binary frame (protocol/acks.py, issue 13: ~75 bytes for one patch where the JSON envelope took
~360); devices still decode a JSON one from an older companion.

Order: commit -> these acks (QoS 0, ACK_QOS) -> the MQTT PUBACKs of the batch. A crash between the commit and the
acks loses nothing: the broker (no PUBACK yet) or the device (no PatchAck, timeout) sends the patch again,
the store dedupes it by content hash, and the ack goes out then, with status "duplicate".

Statuses: stored (new row), duplicate (already stored: a resend), quarantined (the database refused the row;
it is in the quarantine table with the reason), rejected (validation or admission refused it: resending
the same bytes cannot help, so the device drops it and logs the reason). A rejected message's hash is the
one it claims (protocol/frame.claimed_hash: a binary frame's sha256, or the hash a JSON envelope names,
read leniently since the message failed validation); one that has none cannot be acknowledged and the
device resends it with backoff until its outbox bound evicts it.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable, Sequence

from edgepatch.protocol.acks import ENTRY_BYTES

# A refused binary patch frame's hash is its sha256, a JSON envelope's the hash it claims (protocol/frame.py).
from edgepatch.protocol.frame import HEADER, claimed_hash, encode_frame
from edgepatch.protocol.messages import (
    MAX_ACKS,
    MAX_MESSAGE_BYTES,
    AckEntry,
    MessageError,
    PatchAck,
    PatchUpdate,
)
from edgepatch.protocol.mqtt import Incoming, MqttClient
from edgepatch.protocol.topics import Channel, TopicError, device_topic, parse_topic

from .store import BatchResult, Received, Reject

log = logging.getLogger(__name__)
PATCH_KIND = PatchUpdate.KIND

# QoS 0: an ack lost on the way costs a resend (the device keeps the patch until an ack arrives; the store
# dedupes it and the next ack says "duplicate"), never a patch. At QoS 1 every ack also held a slot in the
# client's in-flight window until the broker's PUBACK: at fleet load (one ack per device per batch) they
# queued inside paho faster than they drained (14,553 waiting after a 30,000-message burst), growing the
# ingest's memory and delaying the devices' acks by tens of seconds.
ACK_QOS = 0
SENDER = "cloud"  # the companion's id as a sender (the same as companion.CLOUD_ID; not imported: heavy module)
# seq only has to grow per sender; starting from the clock keeps it growing across restarts.
_SEQ = itertools.count(time.time_ns() // 1_000_000)

Address = tuple[str, str]  # (fleet, device)


def patch_acks(batch: Iterable[tuple[Incoming, Received | Reject | None]], result: BatchResult,
               max_bytes: int) -> dict[Address, list[AckEntry]]:
    """Every patch of a committed batch and its fate, grouped by the device to tell."""
    new = {m.content_hash for m in result.new_patches}
    quarantined = {q.message.content_hash: q.reason for q in result.quarantined}
    out: dict[Address, list[AckEntry]] = {}
    for incoming, item in batch:
        if isinstance(item, Received):  # decode() checked its topic: the sender's own patch channel
            m = item.message
            if m.kind != PATCH_KIND:
                continue
            key = (m.fleet, m.device_id)
            h = m.content_hash
            if h in quarantined:
                entry = AckEntry(h, "quarantined", _printable(quarantined[h])[:200])  # a database error may hold \n
            else:
                entry = AckEntry(h, "stored" if h in new else "duplicate")
        elif isinstance(item, Reject):
            try:
                address = parse_topic(incoming.topic)
            except TopicError:
                continue
            if address.channel is not Channel.PATCH or address.device_id is None:
                continue
            key = (address.fleet, address.device_id)
            claimed = claimed_hash(incoming.payload, max_bytes)
            if claimed is None:
                continue
            entry = AckEntry(claimed, "rejected", _printable(f"{item.reason}: {item.detail}")[:200])
        else:
            continue
        out.setdefault(key, []).append(entry)
    return out


def publish_acks(client: MqttClient, acks: dict[Address, list[AckEntry]]) -> int:
    """Publish the acks (ACK_QOS, chunks of MAX_ACKS); returns the number of ack entries handed to the client.
    A refused publish is logged, not raised: the device resends and the next batch acknowledges it."""
    handed = 0
    for (fleet, device), entries in acks.items():
        topic = device_topic(fleet, device, Channel.ACK)
        for chunk in _chunks(entries, MAX_ACKS):
            try:
                data = ack_payload(fleet, chunk, next(_SEQ))
            except MessageError as exc:  # entries are built valid; if one is not, the rest still go out
                log.error("could not encode %d ack(s) to %s/%s (%s); the device will resend", len(chunk), fleet,
                          device, exc)
                continue
            if client.publish(topic, data, qos=ACK_QOS):
                handed += len(chunk)
            else:
                log.warning("could not publish %d ack(s) to %s/%s; the device will resend", len(chunk), fleet,
                            device)
    return handed


def ack_payload(fleet: str, entries: Sequence[AckEntry], seq: int, sent_at: float | None = None) -> bytes:
    """The encoded PatchAck, a binary frame (protocol/acks.py: ~75 bytes for one patch, the JSON form was ~360):
    the bytes of `encode(make_message(PatchAck(entries), device_id=SENDER, …))` without make_message's
    strict round trip (a parse of the frame it just wrote, per device per batch at fleet load). The entries
    are still checked (PatchAck.to_frame); the header needs no check: the fleet comes from a topic the ingest
    parsed. tests/test_ingest_ack_payload.py compares the bytes with the make_message form and decodes them."""
    header = {"device_id": SENDER, "fleet": fleet, "base_version": "", "variant_id": "", "seq": int(seq),
              "sent_at": float(time.time() if sent_at is None else sent_at)}
    return encode_frame(header, PatchAck(tuple(entries)))


def _chunks(entries: Sequence[AckEntry], size: int, max_bytes: int = MAX_MESSAGE_BYTES
            ) -> Iterable[Sequence[AckEntry]]:
    """Runs of at most `size` entries whose frame stays under `max_bytes` (what a device's decode accepts):
    256 rejections with long non-ASCII reasons would not fit one message."""
    budget = max_bytes - _FRAME_OVERHEAD
    start, used = 0, 0
    for i, entry in enumerate(entries):
        cost = ENTRY_BYTES + len(entry.reason.encode())
        if i > start and (i - start == size or used + cost > budget):
            yield entries[start:i]
            start, used = i, 0
        used += cost
    if start < len(entries):
        yield entries[start:]


# Header, the longest ids (sender, a 64-byte fleet) and the entry count: what a frame holds besides entries.
_FRAME_OVERHEAD = HEADER.size + len(SENDER) + 64 + 2


def _printable(value: str) -> str:
    """The ack travels through the strict codec: no control characters in its reason."""
    return "".join(c if c.isprintable() else "?" for c in value)
