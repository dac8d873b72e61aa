"""Application-level acks (issue 12): after a batch commits, tell each device which of its patches are stored.

Why: a broker's PUBACK is no proof of storage. Mosquitto does not restore MQTT 5 shared subscriptions from
its persistence, so after a restart it acknowledges patches that no ingest session receives; a device
that trusted the PUBACK lost them. The device therefore keeps a patch until a `PatchAck` naming its
content hash arrives on `edgepatch/v1/<fleet>/<device>/ack`, and resends it otherwise.

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

import hashlib
import itertools
import json
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

# A refused binary patch frame's hash is its sha256, a JSON envelope's the hash it claims (protocol/frame.py).
from edgepatch.protocol.frame import claimed_hash
from edgepatch.protocol.messages import (
    MAX_ACKS,
    SCHEMA_VERSION,
    AckEntry,
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
                entry = AckEntry(h, "quarantined", quarantined[h][:200])
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
            if client.publish(topic, ack_payload(fleet, chunk, next(_SEQ)), qos=ACK_QOS):
                handed += len(chunk)
            else:
                log.warning("could not publish %d ack(s) to %s/%s; the device will resend", len(chunk), fleet,
                            device)
    return handed


def ack_payload(fleet: str, entries: Sequence[AckEntry], seq: int, sent_at: float | None = None) -> bytes:
    """The encoded PatchAck: what `encode(make_message(PatchAck(entries), …))` gives, without its strict
    round trip (3 JSON encodings, 1 parse and every field check: ~55 µs per device per batch at fleet load);
    the canonical JSON is written directly. Safe because every value is already checked: the fleet and device come from a topic the
    ingest parsed, hashes are sha256 hex, statuses fixed, reasons printable (tests/test_ingest_ack_payload.py
    decodes the result strictly and compares it with the make_message form)."""
    # The canonical form written directly (sorted keys, no spaces, strings as json.dumps writes them with
    # ensure_ascii=False, floats as repr): one JSON encoding was ~half of an ack's CPU at fleet load.
    acks = ",".join(f'{{"hash":{_s(a.content_hash)},"reason":{_s(a.reason)},"status":{_s(a.status)}}}'
                    for a in entries)
    sent = float(time.time() if sent_at is None else sent_at)
    tail = (f'"device_id":{_s(SENDER)},"fleet":{_s(fleet)},"kind":{_s(PatchAck.KIND)},"payload":{{"acks":[{acks}]}},'
            f'"schema":{int(SCHEMA_VERSION)},"sent_at":{sent!r},"seq":{int(seq)},"variant_id":""}}').encode()
    # The hash covers everything but content_hash, which sorts right after base_version (always "").
    digest = hashlib.sha256(_ACK_PREFIX + tail).hexdigest().encode()
    return b"".join((_ACK_PREFIX, b'"content_hash":"', digest, b'",', tail))


_ACK_PREFIX = b'{"base_version":"",'
_s = json.encoder.encode_basestring  # type: ignore[attr-defined] - what json.dumps(ensure_ascii=False) uses


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _printable(value: str) -> str:
    """The ack travels through the strict codec: no control characters in its reason."""
    return "".join(c if c.isprintable() else "?" for c in value)
