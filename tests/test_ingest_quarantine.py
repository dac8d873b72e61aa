"""Poison messages never stall the ingest (issue 12 item 2), on SQLite and PostgreSQL with a real Mosquitto:
64-bit counters stored, control characters refused by the validator, a row the database refuses quarantined
and acknowledged, reject records truncated and expired."""

from __future__ import annotations

import hashlib
import json
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import text

from edgepatch.cloud.ingest import IngestService, IngestSettings
from edgepatch.cloud.ingest_policy import IngestPolicy
from edgepatch.cloud.metrics import CloudMetrics
from edgepatch.cloud.store import PatchStore, Received, Reject
from edgepatch.cloud.store_schema import PAYLOAD_PREFIX_BYTES
from edgepatch.protocol.messages import (
    Message,
    MessageError,
    PatchUpdate,
    canonical_bytes,
    content_hash_of,
    decode,
    encode,
    make_message,
    to_json,
)
from edgepatch.protocol.topics import Channel, device_topic

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: tests/ is not on the path
from polling import wait_until  # noqa: E402
from test_cloud_ingest import Publisher  # noqa: E402
from test_cloud_store import PG_URL, _pg_available  # noqa: E402

FLEET = "lab"
K = 16


def patch_msg(device: str, seq: int, *, k: int = K, base: str = "b1") -> Message:
    return make_message(PatchUpdate(phi=np.full(k, 0.5, dtype=np.float32), steps=seq, samples=seq, holdout_acc=0.5,
                                    loss=0.1), device_id=device, fleet=FLEET, base_version=base, variant_id="v50",
                        seq=seq, sent_at=1_700_000_000.0)


def nul_base_payload(device: str) -> bytes:
    """A patch whose base version holds NUL, with a correct content hash (what an attacker can send)."""
    env = to_json(patch_msg(device, 7))
    env["base_version"] = "b1\x00evil"
    env["content_hash"] = content_hash_of(env)
    return canonical_bytes(env)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PatchStore]:
    if request.param == "sqlite":
        s = PatchStore(tmp_path / "store.db")
    else:
        if not _pg_available():
            pytest.fail("PostgreSQL is not reachable at 127.0.0.1:5432 (user postgres, db test)", pytrace=False)
        s = PatchStore(PG_URL, table_prefix=f"q{uuid.uuid4().hex[:12]}_")
    s.add_bundle("m1", "ab" * 32, "http://x/bundles/m1/", base_version="b1", k=K)
    try:
        yield s
    finally:
        if s.dialect == "postgresql":
            s.drop_all()
        s.close()


def narrow_seq_column(store: PatchStore) -> None:
    """Make the database refuse what the validator accepts (seq >= 2^31), as the old 32-bit schema did: the
    rows the quarantine path exists for."""
    table = store.t["patches"].name
    with store.engine.begin() as conn:
        if store.dialect == "postgresql":
            conn.execute(text(f'ALTER TABLE "{table}" ALTER COLUMN seq TYPE integer'))
        else:
            conn.execute(text(f'CREATE TRIGGER "{table}_seq32" BEFORE INSERT ON "{table}" '
                              "WHEN NEW.seq > 2147483647 BEGIN SELECT RAISE(ABORT, 'seq out of range'); END"))


def start_ingest(store: PatchStore, broker: Any, **kw: Any) -> IngestService:
    settings = IngestSettings(host=broker.host, port=broker.port, fleet=FLEET, client_id="ingest-q",
                              max_delay_s=0.5, linger_s=0.3, **kw)  # one batch for the burst below
    service = IngestService(store, settings, metrics=CloudMetrics(), policy=IngestPolicy(store))
    service.start()
    assert service.wait_subscribed(10), "ingest did not subscribe"
    return service


def assert_nothing_redelivered(store: PatchStore, broker: Any) -> None:
    """A new ingest on the same persistent session gets nothing: every message was acknowledged."""
    again = start_ingest(store, broker)
    try:
        time.sleep(1.5)
    finally:
        again.stop()
    s = again.stats
    assert s.accepted == 0 and s.rejected == 0 and s.commit_failures == 0, s


# ---------------------------------------------------------------------------------------- real Mosquitto

@pytest.mark.broker
def test_big_counters_stored_and_bad_ones_rejected_in_one_batch(store: PatchStore, mosquitto: Any) -> None:
    service = start_ingest(store, mosquitto)
    pub = Publisher(mosquitto, client_id="pub-q1")
    valid = [patch_msg(f"dev-{i}", i + 1) for i in range(6)] + [patch_msg("dev-big", 2**31),
                                                                patch_msg("dev-huge", 2**53)]
    try:
        infos = [pub.send(m) for m in valid[:3]]
        infos.append(pub.publish(device_topic(FLEET, "dev-nul", Channel.PATCH), nul_base_payload("dev-nul")))
        infos.append(pub.send(patch_msg("dev-k", 1, k=K + 1)))  # wrong φ size for base b1
        infos.append(pub.send(patch_msg("dev-base", 1, base="b-unknown")))  # no bundle has this base
        infos += [pub.send(m) for m in valid[3:]]
        for info in infos:
            info.wait_for_publish(5)
        wait_until(lambda: service.stats.acked >= len(infos), 15, "every message acknowledged")
    finally:
        pub.close()
        service.stop()
    s = service.stats
    assert s.commit_failures == 0 and s.quarantined == 0
    assert sorted(store.patch_hashes()) == sorted(m.content_hash for m in valid)
    seqs = {d: meta["seq"] for d, (_, meta) in store.latest_patches("b1").items()}
    assert seqs["dev-big"] == 2**31 and seqs["dev-huge"] == 2**53
    reasons = {r["topic"].split("/")[-2]: r["reason"] for r in store.rejects()}
    assert reasons == {"dev-nul": "bad_field", "dev-k": "wrong_size", "dev-base": "unknown_base"}
    assert service.metrics.value("edgepatch_ingest_rejects_total", {"reason": "wrong_size"}) == 1
    assert_nothing_redelivered(store, mosquitto)


@pytest.mark.broker
def test_rows_the_database_refuses_are_quarantined_and_acknowledged(store: PatchStore, mosquitto: Any) -> None:
    narrow_seq_column(store)
    service = start_ingest(store, mosquitto)
    pub = Publisher(mosquitto, client_id="pub-q2")
    good = [patch_msg(f"dev-{i}", i + 1) for i in range(8)]
    poison = [patch_msg("dev-big", 2**31), patch_msg("dev-huge", 2**53)]
    try:
        infos = [pub.send(m) for m in good[:4] + poison[:1] + good[4:] + poison[1:]]
        for info in infos:
            info.wait_for_publish(5)
        wait_until(lambda: service.stats.acked >= len(infos), 15, "every message acknowledged")
    finally:
        pub.close()
        service.stop()
    assert service.stats.commit_failures == 0 and service.stats.quarantined == 2
    assert sorted(store.patch_hashes()) == sorted(m.content_hash for m in good)
    rows = {r["content_hash"]: r for r in store.quarantined()}
    assert set(rows) == {m.content_hash for m in poison}
    for m in poison:
        row, raw = rows[m.content_hash], encode(m)
        assert row["device_id"] == m.device_id and row["kind"] == "patch_update"
        assert row["reason"] in ("DataError", "IntegrityError", "NumericValueOutOfRange"), row["reason"]
        assert row["payload_size"] == len(raw) and row["payload_sha256"] == hashlib.sha256(raw).hexdigest()
        assert bytes(row["payload_prefix"]) == raw[:PAYLOAD_PREFIX_BYTES]
    assert service.metrics.value("edgepatch_ingest_rejects_total", {"reason": "quarantined"}) == 2
    assert_nothing_redelivered(store, mosquitto)


# ------------------------------------------------------------------------------------------ store only

def test_validator_refuses_control_characters_and_over_64_bit_integers() -> None:
    topic = device_topic(FLEET, "dev-nul", Channel.PATCH)
    with pytest.raises(MessageError) as nul:
        decode(topic, nul_base_payload("dev-nul"))
    assert nul.value.reason == "bad_field" and "control character" in nul.value.text
    for bad in ("b1\x01", "b1\x1f", "b1\x7f", "b1\x9f"):
        env = to_json(patch_msg("dev-nul", 1))
        env["base_version"] = bad
        env["content_hash"] = content_hash_of(env)
        with pytest.raises(MessageError, match="control character"):
            decode(topic, canonical_bytes(env))
    env = to_json(patch_msg("dev-nul", 1))
    env["seq"] = 2**63
    env["content_hash"] = content_hash_of(env)
    with pytest.raises(MessageError, match="64 bits"):
        decode(topic, canonical_bytes(env))
    assert decode(topic, encode(patch_msg("dev-nul", 2**63 - 1))).seq == 2**63 - 1  # the largest accepted


def test_batch_refused_by_the_database_is_retried_row_by_row(store: PatchStore) -> None:
    narrow_seq_column(store)
    batch = [Received(patch_msg(f"dev-{i}", s), 100, time.time()) for i, s in enumerate((1, 2**31, 3, 2**62))]
    result = store.commit_or_quarantine(batch, [Reject.of("bad_json", "edgepatch/v1/lab/x/patch", "x", time.time(),
                                                          b"{")])
    assert result.rows_retried == 5 and len(result.quarantined) == 2 and len(result.new_patches) == 2
    assert store.count("patches") == 2 and store.count("quarantine") == 2 and store.count("rejects") == 1
    dev = {d["device_id"]: d["patches"] for d in store.devices()}
    assert dev == {"dev-0": 1, "dev-2": 1}  # a quarantined row leaves no half-written device row


def test_reject_records_are_truncated_and_expire(store: PatchStore) -> None:
    big = json.dumps({"junk": "x" * 61_600}).encode()  # the 61.6 kB rejects of issue 12
    now = time.time()
    store.commit_batch([], [Reject.of("bad_json", "edgepatch/v1/lab/d/patch", "not JSON\x00" * 500, now - 10, big),
                            Reject.of("schema", "edgepatch/v1/lab/d/patch", "old", now - 3 * 86400, b"{}")])
    rows = store.rejects()
    assert len(rows[0]["payload_prefix"]) == PAYLOAD_PREFIX_BYTES and rows[0]["payload_size"] == len(big)
    assert rows[0]["payload_sha256"] == hashlib.sha256(big).hexdigest()
    assert len(rows[0]["detail"]) <= 2000 and "\x00" not in rows[0]["detail"]  # PostgreSQL text refuses NUL
    store.retention_s = 86400.0
    assert store.expire(now) == 1 and [r["reason"] for r in store.rejects()] == ["bad_json"]
    with pytest.raises(ValueError, match="retention"):
        PatchStore(store.url if store.dialect == "sqlite" else "x.db", retention_s=0)


def test_a_store_an_older_version_created_is_upgraded(store: PatchStore) -> None:
    """The pre-quarantine schema: no bundle base/k, no payload columns, and (PostgreSQL) a 32-bit seq."""
    p, r, b = (store.t[name].name for name in ("patches", "rejects", "bundles"))
    with store.engine.begin() as conn:
        for table, column in ((r, "payload_sha256"), (r, "payload_prefix"), (r, "payload_size"), (b, "k")):
            conn.execute(text(f'ALTER TABLE "{table}" DROP COLUMN "{column}"'))
        if store.dialect == "postgresql":
            conn.execute(text(f'ALTER TABLE "{p}" ALTER COLUMN seq TYPE integer'))
            conn.execute(text(f'ALTER TABLE "{p}" ALTER COLUMN id TYPE integer'))
            conn.execute(text(f"ALTER SEQUENCE \"{p}_id_seq\" AS integer"))
    reopened = PatchStore(store.url if store.dialect == "postgresql" else store.engine.url.database,
                          table_prefix=store.table_prefix)
    try:
        assert reopened.add_patch(patch_msg("dev-1", 2**53))  # fits after the upgrade
        reopened.commit_batch([], [Reject.of("bad_json", "edgepatch/v1/lab/d/patch", "x", time.time(), b"{")])
        assert reopened.rejects()[-1]["payload_size"] == 1
        assert reopened.bundle_bases() == {}  # the old bundle row has no k: no admission for it
        if store.dialect == "postgresql":  # the arrival id and its counter are 64-bit again
            with reopened.engine.connect() as conn:
                assert conn.execute(text(f"SELECT data_type FROM information_schema.columns WHERE table_name = '{p}' "
                                         "AND column_name = 'id'")).scalar() == "bigint"
                assert conn.execute(text(f"SELECT data_type FROM information_schema.sequences WHERE "
                                         f"sequence_name = '{p}_id_seq'")).scalar() == "bigint"
    finally:
        reopened.close()
