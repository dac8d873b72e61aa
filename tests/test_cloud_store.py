"""Patch store on SQLite and PostgreSQL (dedupe by content hash, concurrent writers), and the web face."""

from __future__ import annotations

import hashlib
import http.client
import json
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgepatch.cloud.metrics import CloudMetrics
from edgepatch.cloud.store import PatchStore, Received, Reject
from edgepatch.cloud.web import FleetWeb
from edgepatch.protocol.messages import DeviceState, Message, Metrics, PatchUpdate, make_message

PG_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
T0 = 1_700_000_000.0


def patch_msg(device: str, seq: int, *, k: int = 16, base: str = "b1", acc: float = 0.5) -> Message:
    phi = np.arange(k, dtype=np.float32) * seq
    return make_message(PatchUpdate(phi=phi, steps=seq, samples=32 * seq, holdout_acc=acc, loss=1.0 / (seq + 1)),
                        device_id=device, fleet="lab", base_version=base, variant_id="v50", seq=seq,
                        sent_at=T0 + seq)


def other_msg(device: str, seq: int, payload: Metrics | DeviceState) -> Message:
    return make_message(payload, device_id=device, fleet="lab", base_version="b1", variant_id="v50", seq=seq,
                        sent_at=T0 + seq)


def _pg_available() -> bool:
    try:
        import psycopg2

        psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="test", connect_timeout=2).close()
        return True
    except Exception:  # noqa: BLE001
        return False


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PatchStore]:
    if request.param == "sqlite":
        s = PatchStore(tmp_path / "store.db")
        yield s
        s.close()
        return
    if not _pg_available():
        pytest.fail("PostgreSQL is not reachable at 127.0.0.1:5432 (user postgres, db test)", pytrace=False)
    # A unique table prefix per test: runs on the shared server never see each other's rows.
    s = PatchStore(PG_URL, table_prefix=f"t{uuid.uuid4().hex[:12]}_")
    try:
        yield s
    finally:
        s.drop_all()
        s.close()


def test_add_patch_dedupes_by_content_hash(store: PatchStore) -> None:
    m1, m2 = patch_msg("dev-1", 1), patch_msg("dev-1", 2)
    assert store.add_patch(m1, nbytes=100) is True
    assert store.add_patch(m1, nbytes=100) is False  # redelivery: same hash
    assert store.add_patch(m2, nbytes=100) is True
    assert store.count("patches") == 2
    assert sorted(store.patch_hashes()) == sorted([m1.content_hash, m2.content_hash])
    dev = store.devices()
    assert len(dev) == 1 and dev[0]["patches"] == 2 and dev[0]["bytes_in"] == 300


def test_latest_patches_per_device_and_base_version(store: PatchStore) -> None:
    # Arrival order differs from seq order: latest means last ARRIVED (the store's id), not the highest
    # claimed seq - a device claiming seq = 2^53 once must not pin its "latest" forever (issue 11).
    for seq in (1, 2**53, 2):
        store.add_patch(patch_msg("dev-1", seq))
    store.add_patch(patch_msg("dev-2", 5, k=8, acc=0.9))
    store.add_patch(patch_msg("dev-2", 9, base="b2"))
    latest = store.latest_patches(base_version="b1")
    assert set(latest) == {"dev-1", "dev-2"}
    phi, meta = latest["dev-1"]
    assert meta["seq"] == 2 and phi.dtype == np.float32
    np.testing.assert_array_equal(phi, np.arange(16, dtype=np.float32) * 2)
    assert latest["dev-2"][0].shape == (8,) and latest["dev-2"][1]["holdout_acc"] == pytest.approx(0.9)
    assert store.latest_patches(base_version="b2")["dev-2"][1]["seq"] == 9
    assert store.latest_patches()["dev-2"][1]["base_version"] == "b2"
    assert store.latest_patches(base_version="nope") == {}


def test_batch_mixes_kinds_and_is_idempotent(store: PatchStore) -> None:
    batch = [Received(patch_msg("dev-1", 1), 200, T0 + 10),
             Received(patch_msg("dev-1", 1), 200, T0 + 11),  # duplicate inside one batch
             Received(other_msg("dev-1", 2, Metrics(values={"train_ms": 12.5, "rss_bytes": 1e6})), 80, T0 + 12),
             Received(other_msg("dev-2", 1, DeviceState(state="online", last_seen=T0)), 60, T0 + 13)]
    first = store.commit_batch(batch, [Reject("bad_json", "edgepatch/v1/lab/x/patch", "not JSON", T0)])
    assert len(first.new_patches) == 1 and first.duplicates == 1
    again = store.commit_batch(batch)  # a redelivered batch adds no patch and no metric rows
    assert again.new_patches == [] and again.duplicates == 2
    counts = store.counts()
    assert counts["patches"] == 1 and counts["metrics"] == 2 and counts["rejects"] == 1 and counts["devices"] == 2
    assert store.metric_values("dev-1", "train_ms") == [(T0 + 2, 12.5)]
    devs = {d["device_id"]: d for d in store.devices()}
    assert devs["dev-2"]["last_state"] == "online"
    assert devs["dev-1"]["last_state"] is None and devs["dev-1"]["holdout_acc"] == pytest.approx(0.5)
    assert devs["dev-1"]["last_seen"] == pytest.approx(T0 + 12)
    assert store.rejects()[0]["reason"] == "bad_json"


def test_concurrent_add_of_same_hash_stores_one_row(store: PatchStore) -> None:
    # Several store instances (like several ingest workers), many threads, the same messages.
    msgs = [patch_msg("dev-1", i) for i in range(20)]
    others = [PatchStore(store.url, table_prefix=store.table_prefix) for _ in range(3)]
    stores = [store, *others]
    wins: list[bool] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def worker(i: int) -> None:
        s = stores[i % len(stores)]
        try:
            barrier.wait()
            for m in msgs:
                won = s.add_patch(m)
                with lock:
                    wins.append(won)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for s in others:
        s.close()
    assert not errors, errors
    assert sum(wins) == len(msgs) and len(wins) == 8 * len(msgs)
    assert store.count("patches") == len(msgs)
    assert store.devices()[0]["patches"] == len(msgs)


def test_bundles_register_and_latest(store: PatchStore) -> None:
    assert store.latest_bundle() is None
    assert store.add_bundle("b1", "aa" * 32, "http://x/bundles/b1/", created_at=T0)
    assert not store.add_bundle("b1", "bb" * 32, "elsewhere", created_at=T0 + 1)  # versions are immutable
    store.add_bundle("b2", "cc" * 32, "http://x/bundles/b2/", created_at=T0 + 5)
    store.mark_announced("b2", T0 + 6)
    latest = store.latest_bundle()
    assert latest is not None and latest["version"] == "b2" and latest["announced_at"] == T0 + 6
    with pytest.raises(KeyError, match="nope"):
        store.mark_announced("nope")


def test_store_refuses_unusable_urls(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="in-memory"):
        PatchStore("sqlite://")
    with pytest.raises(ValueError, match="unsupported store URL"):
        PatchStore("mysql://u@h/db")
    with pytest.raises(ValueError, match="table_prefix"):
        PatchStore(tmp_path / "x.db", table_prefix="a;drop")


def test_sqlite_is_wal_and_synchronous_full(tmp_path: Path) -> None:
    s = PatchStore(tmp_path / "s.db")
    with s.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    s.close()


# ------------------------------------------------------------------------------------------------- web

@pytest.fixture
def web(tmp_path: Path) -> Iterator[FleetWeb]:
    s = PatchStore(tmp_path / "web.db")
    w = FleetWeb(s, CloudMetrics())
    w.start()
    yield w
    w.stop()
    s.close()


def _get(url: str) -> tuple[int, bytes, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def test_fleet_page_and_api_render_stored_devices(web: FleetWeb) -> None:
    web.store.add_patch(patch_msg("dev-1", 1, acc=0.75), nbytes=321)
    web.store.add_patch(patch_msg("dev-2", 4, acc=0.25), nbytes=100)
    web.store.add_bundle("b1", "ab" * 32, web.url + "/bundles/b1/")
    status, body, headers = _get(web.url + "/api/fleet")
    assert status == 200 and headers["Content-Type"] == "application/json"
    data = json.loads(body)
    assert [d["device_id"] for d in data["devices"]] == ["dev-1", "dev-2"]
    assert data["bundle"]["version"] == "b1" and data["bytes_in"] == 421
    status, body, _ = _get(web.url + "/fleet")
    page = body.decode()
    assert status == 200 and "<td>dev-1</td>" in page and "<td>0.750</td>" in page and "<td>321</td>" in page
    assert "Current bundle: b1" in page and "Quarantined: 0." in page


def test_metrics_endpoint_exposes_cloud_registry(web: FleetWeb) -> None:
    web.metrics.rejects.labels(reason="bad_json").inc(3)
    web.store.add_patch(patch_msg("dev-1", 1))
    status, body, headers = _get(web.url + "/metrics")
    text = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert 'edgepatch_ingest_rejects_total{reason="bad_json"} 3.0' in text
    assert "edgepatch_devices_seen 1.0" in text
    assert "python_gc" not in text  # a dedicated registry, not the process-global one


def test_bundle_files_served_with_sha256_etag_and_traversal_refused(web: FleetWeb, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle-b7"
    (bundle / "programs").mkdir(parents=True)
    payload = np.random.default_rng(0).bytes(50_000)
    (bundle / "programs" / "infer.tflite").write_bytes(payload)
    (bundle / "manifest.json").write_text('{"version": "b7"}')
    (tmp_path / "secret.txt").write_text("do not serve")
    base = web.serve_bundle("b7", bundle)
    assert base == f"{web.url}/bundles/b7/"

    status, body, headers = _get(base + "programs/infer.tflite")
    sha = hashlib.sha256(payload).hexdigest()
    assert status == 200 and body == payload and headers["ETag"] == f'"{sha}"'
    assert web.metrics.value("edgepatch_bytes_out_total") == len(payload)
    req = urllib.request.Request(base + "programs/infer.tflite", headers={"If-None-Match": f'"{sha}"'})
    with pytest.raises(urllib.error.HTTPError) as not_modified:
        urllib.request.urlopen(req, timeout=5)
    assert not_modified.value.code == 304

    # Raw requests: urllib would normalise '..' away before sending.
    for path in ("/bundles/b7/../secret.txt", "/bundles/b7/programs/../../secret.txt",
                 "/bundles/b7/%2e%2e/secret.txt", "/bundles/b7//etc/passwd", "/bundles/nope/manifest.json",
                 "/bundles/b7/programs"):
        conn = http.client.HTTPConnection(web.host, web.port, timeout=5)
        conn.request("GET", path)
        resp = conn.getresponse()
        assert resp.status == 404, path
        assert b"do not serve" not in resp.read()
        conn.close()
    with pytest.raises(FileNotFoundError):
        web.serve_bundle("b8", tmp_path / "missing")
    with pytest.raises(ValueError):
        web.serve_bundle("../b9", bundle)
