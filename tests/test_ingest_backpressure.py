"""Ingest under a backlog (issue 12, fleet load): batches never exceed `max_batch`, the arrival queue is bounded,
and everything queued at the broker is stored and acknowledged — real Mosquitto, the local PostgreSQL (its
one-statement-per-table bulk write, cloud/store_bulk.py) with a commit slowed down so the backlog builds."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from edgepatch.cloud.ingest import IngestService, IngestSettings
from edgepatch.cloud.metrics import CloudMetrics
from edgepatch.cloud.store import PatchStore
from edgepatch.protocol.messages import Metrics, encode, make_message
from tests.test_cloud_ingest import FLEET, Publisher, patch_msg, wait_until

pytestmark = [pytest.mark.broker, pytest.mark.postgres]
PG_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"


@pytest.fixture
def pg_store() -> Iterator[PatchStore]:
    s = PatchStore(PG_URL, table_prefix=f"bp{uuid.uuid4().hex[:10]}_")
    yield s
    s.drop_all()
    s.close()


def test_backlog_is_drained_in_bounded_batches(mosquitto: Any, pg_store: PatchStore) -> None:
    settings = IngestSettings(host=mosquitto.host, port=mosquitto.port, fleet=FLEET, max_batch=40,
                              receive_maximum=200, inflight_window=200, client_id="ingest-bp")
    first = IngestService(pg_store, settings, metrics=CloudMetrics())
    first.start()
    assert first.wait_subscribed(10)
    first.stop()  # the persistent session now queues everything at the broker
    patches = [patch_msg(f"dev-{i % 50}", i) for i in range(1000)]
    metrics = [make_message(Metrics({"loss": float(i)}), device_id=f"dev-{i}", fleet=FLEET, seq=i) for i in range(100)]
    pub = Publisher(mosquitto)
    try:
        for info in [pub.send(m) for m in patches + metrics]:
            info.wait_for_publish(30)
    finally:
        pub.close()

    sizes: list[int] = []
    queued: list[int] = []
    service = IngestService(pg_store, settings, metrics=CloudMetrics())
    commit = pg_store.commit_or_quarantine

    def slow_commit(accepted: Any, rejects: Any = ()) -> Any:
        sizes.append(len(accepted) + len(rejects))
        queued.append(service._arrivals.qsize())
        time.sleep(0.05)  # a slow database: the backlog waits at the broker, not in the ingest
        return commit(accepted, rejects)

    pg_store.commit_or_quarantine = slow_commit  # type: ignore[method-assign]
    assert service.arrival_bound == 200 + 4 * 40  # the broker's window + four batches
    service.start()
    try:
        wait_until(lambda: pg_store.count("patches") == 1000 and service.stats.acked == 1100, 60, "the backlog")
    finally:
        service.stop()
    assert max(sizes) <= 40 and sum(sizes) == 1100, (max(sizes), sum(sizes))
    assert max(queued) <= service.arrival_bound
    assert set(pg_store.patch_hashes()) == {m.content_hash for m in patches}
    assert pg_store.count("metrics") == 100
    assert service.stats.new_patches == 1000 and service.stats.commit_failures == 0
    devices = {d["device_id"]: d for d in pg_store.devices()}
    assert sum(devices[f"dev-{i}"]["patches"] for i in range(50)) == 1000  # the bulk upsert counted each once


def test_replayed_batch_stores_nothing_new_on_postgres(pg_store: PatchStore) -> None:
    from edgepatch.cloud.store import Received

    batch = [Received(patch_msg(f"dev-{i % 3}", i), 200, 1.7e9 + i) for i in range(30)]
    batch.append(batch[0])  # a repeat inside the batch
    first = pg_store.commit_batch(batch)
    again = pg_store.commit_batch(batch)
    assert len(first.new_patches) == 30 and first.duplicates == 1
    assert again.new_patches == [] and again.duplicates == 31
    assert pg_store.count("patches") == 30
    assert {d["device_id"]: d["patches"] for d in pg_store.devices()} == {"dev-0": 10, "dev-1": 10, "dev-2": 10}
    assert encode(batch[0].message)  # the stored message still encodes (nothing mutated by the bulk path)
