"""Cloud ingest against a real Mosquitto: store, dedupe, fuzzed rejects, shared subscriptions, SIGKILL restart."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from edgepatch.cloud.ingest import IngestService, IngestSettings
from edgepatch.cloud.metrics import CloudMetrics
from edgepatch.cloud.store import PatchStore
from edgepatch.protocol.messages import (
    DeviceState,
    Message,
    Metrics,
    PatchUpdate,
    canonical_bytes,
    content_hash_of,
    encode,
    make_message,
    to_json,
)
from edgepatch.protocol.topics import Channel, device_topic

pytestmark = pytest.mark.broker
FLEET = "lab"


def patch_msg(device: str, seq: int, k: int = 16) -> Message:
    return make_message(PatchUpdate(phi=np.full(k, seq, dtype=np.float32), steps=seq, samples=32, holdout_acc=0.5,
                                    loss=0.1), device_id=device, fleet=FLEET, base_version="b1", variant_id="v50",
                        seq=seq, sent_at=1_700_000_000.0 + seq)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


class Publisher:
    """A device-side paho client publishing raw payloads at QoS 1 and waiting for PUBACKs."""

    def __init__(self, broker: Any, client_id: str = "test-publisher") -> None:
        self.client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(100)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(min_delay=0.1, max_delay=1)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> mqtt.MQTTMessageInfo:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, info.rc
        return info

    def send(self, msg: Message) -> mqtt.MQTTMessageInfo:
        return self.publish(msg.topic(), encode(msg))

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[PatchStore]:
    s = PatchStore(tmp_path / "ingest.db")
    yield s
    s.close()


def run_service(store: PatchStore, broker: Any, **kw: Any) -> IngestService:
    service = IngestService(store, IngestSettings(host=broker.host, port=broker.port, **kw), metrics=CloudMetrics())
    service.start()
    assert service.wait_subscribed(10), "ingest did not subscribe"
    return service


@pytest.mark.parametrize("protocol", ["mqttv5", "mqttv311"])
def test_patches_metrics_state_stored_once(mosquitto: Any, store: PatchStore, protocol: str) -> None:
    service = run_service(store, mosquitto, protocol=protocol, fleet=FLEET)
    seen: list[str] = []
    service.add_patch_hook(lambda m: seen.append(m.content_hash))
    pub = Publisher(mosquitto)
    try:
        msgs = [patch_msg(f"dev-{d}", s) for d in range(2) for s in range(10)]
        infos = [pub.send(m) for m in msgs]
        infos.append(pub.send(msgs[3]))  # a resend after a "lost PUBACK": same content hash
        infos.append(pub.send(make_message(Metrics(values={"train_ms": 4.5}), device_id="dev-0", fleet=FLEET,
                                           base_version="b1", variant_id="v50", seq=100)))
        infos.append(pub.send(make_message(DeviceState(state="online", last_seen=time.time()), device_id="dev-1",
                                           fleet=FLEET, base_version="b1", variant_id="v50", seq=101)))
        # A device clearing its retained will: zero bytes on lwt is not an error.
        infos.append(pub.publish(device_topic(FLEET, "dev-1", Channel.LWT), b"", retain=True))
        for info in infos:
            info.wait_for_publish(5)
        wait_until(lambda: service.stats.accepted + service.stats.cleared >= len(infos), 10, "all messages")
    finally:
        pub.close()
        service.stop()
    assert store.count("patches") == 20
    assert sorted(store.patch_hashes()) == sorted(m.content_hash for m in msgs)
    assert sorted(seen) == sorted(m.content_hash for m in msgs)  # hook fires once per NEW patch
    assert service.stats.duplicates == 1 and service.stats.rejected == 0 and service.stats.cleared == 1
    assert service.metrics.value("edgepatch_ingest_duplicates_total") == 1
    assert service.metrics.value("edgepatch_ingest_messages_total", {"kind": "patch_update"}) == 21
    assert service.metrics.value("edgepatch_devices_seen") == 2
    assert store.metric_values("dev-0", "train_ms")[0][1] == 4.5
    devs = {d["device_id"]: d for d in store.devices()}
    assert devs["dev-1"]["last_state"] == "online" and devs["dev-0"]["patches"] == 10
    latest = store.latest_patches("b1")
    np.testing.assert_array_equal(latest["dev-1"][0], np.full(16, 9, dtype=np.float32))


def _rehashed(env: dict[str, Any]) -> bytes:
    env = dict(env)
    env.pop("content_hash", None)
    env["content_hash"] = content_hash_of(env)
    return canonical_bytes(env)


def fuzz_cases() -> list[tuple[str, str, bytes, str]]:
    """(name, topic, payload, expected reason)."""
    good = patch_msg("dev-1", 1)
    topic = good.topic()
    env = to_json(good)
    rng = np.random.default_rng(7)

    def with_payload(**changes: Any) -> dict[str, Any]:
        e = json.loads(json.dumps(env))
        e["payload"].update(changes)
        return e

    nan_phi = {"dtype": "<f4", "shape": [16],
               "b64": base64.b64encode(np.array([np.nan] + [0.0] * 15, dtype="<f4").tobytes()).decode()}
    wrong_shape = dict(env["payload"]["phi"], shape=[17])
    tampered = json.loads(json.dumps(env))
    tampered["payload"]["loss"] = 0.0  # hash no longer matches
    return [
        ("random bytes", topic, bytes(rng.integers(128, 256, 300, dtype=np.uint8)), "bad_json"),
        ("not an object", topic, b"[1, 2, 3]", "bad_json"),
        ("empty patch", topic, b"", "empty"),
        ("wrong schema version", topic, _rehashed({**env, "schema": 2}), "schema"),
        ("oversize", topic, b'{"pad": "' + b"x" * 70_000 + b'"}', "oversize"),
        ("device id != topic", device_topic(FLEET, "dev-2", Channel.PATCH), encode(good), "topic_mismatch"),
        ("kind != channel", device_topic(FLEET, "dev-1", Channel.METRICS), encode(good), "topic_mismatch"),
        ("NaN literal", topic, canonical_bytes(env).replace(b'"loss":0.1', b'"loss":NaN'), "non_finite"),
        ("NaN in phi", topic, _rehashed(with_payload(phi=nan_phi)), "non_finite"),
        ("wrong shape", topic, _rehashed(with_payload(phi=wrong_shape)), "bad_shape"),
        ("missing field", topic, _rehashed({k: v for k, v in env.items() if k != "seq"}), "bad_field"),
        ("hash mismatch", topic, canonical_bytes(tampered), "hash_mismatch"),
    ]


def test_fuzzed_messages_rejected_with_reason_and_ingest_goes_on(mosquitto: Any, store: PatchStore) -> None:
    cases = fuzz_cases()
    service = run_service(store, mosquitto)
    pub = Publisher(mosquitto)
    try:
        for _, topic, payload, _ in cases:
            pub.publish(topic, payload).wait_for_publish(5)
        valid = patch_msg("dev-1", 2)
        pub.send(valid).wait_for_publish(5)
        wait_until(lambda: store.count("patches") == 1, 10, "the valid patch after the bad ones")
        wait_until(lambda: service.stats.rejected == len(cases), 5, "every reject accounted")
    finally:
        pub.close()
        service.stop()
    assert store.patch_hashes() == [valid.content_hash]
    stored = [(r["topic"], r["reason"]) for r in store.rejects()]
    assert sorted(stored) == sorted((topic, reason) for _, topic, _, reason in cases)
    expected: dict[str, int] = {}
    for _name, _, _, reason in cases:
        expected[reason] = expected.get(reason, 0) + 1
    for reason, n in expected.items():
        assert service.metrics.value("edgepatch_ingest_rejects_total", {"reason": reason}) == n, reason
    assert service.stats.reject_reasons == expected


def test_bad_messages_are_acked_not_redelivered(mosquitto: Any, store: PatchStore) -> None:
    """A rejected message is acknowledged: a restarted worker with the same session does not see it again."""
    service = run_service(store, mosquitto, client_id="ingest-acks")
    pub = Publisher(mosquitto)
    pub.publish(patch_msg("dev-1", 1).topic(), b"not json").wait_for_publish(5)
    wait_until(lambda: service.stats.rejected == 1, 5, "the reject")
    service.stop()
    again = run_service(store, mosquitto, client_id="ingest-acks")
    try:
        pub.send(patch_msg("dev-1", 2)).wait_for_publish(5)
        wait_until(lambda: again.stats.accepted == 1, 5, "the next valid message")
    finally:
        pub.close()
        again.stop()
    assert again.stats.rejected == 0 and store.count("rejects") == 1


def test_shared_subscription_splits_work_between_workers(mosquitto: Any, tmp_path: Path) -> None:
    store = PatchStore(tmp_path / "shared.db")
    workers = [run_service(store, mosquitto, worker=f"w{i}") for i in range(2)]
    pub = Publisher(mosquitto)
    try:
        msgs = [patch_msg(f"dev-{i % 7}", i) for i in range(200)]
        for info in [pub.send(m) for m in msgs]:
            info.wait_for_publish(5)
        wait_until(lambda: store.count("patches") == len(msgs), 15, "all patches from two workers")
    finally:
        pub.close()
        for w in workers:
            w.stop()
    shares = [w.stats.accepted for w in workers]
    assert sum(shares) == len(msgs) and min(shares) > 0, shares  # each message went to exactly one worker


# ------------------------------------------------------------------------------------------ SIGKILL

def _spawn_ingest(db: Path, broker: Any, protocol: str, ready: Path, log_path: Path) -> subprocess.Popen[bytes]:
    ready.unlink(missing_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgepatch.cloud.ingest", "--store", str(db), "--host", broker.host,
             "--port", str(broker.port), "--protocol", protocol, "--client-id", "ingest-crash-test",
             "--fleet", FLEET, "--ready-file", str(ready), "--log-level", "WARNING"],
            stdout=subprocess.DEVNULL, stderr=log)
    wait_until(lambda: ready.exists() or proc.poll() is not None, 30, "ingest subprocess to subscribe")
    assert proc.poll() is None, log_path.read_text()[-3000:]
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["mqttv5", "mqttv311"])
def test_sigkill_mid_stream_loses_nothing_and_duplicates_nothing(mosquitto: Any, tmp_path: Path,
                                                                 protocol: str) -> None:
    db, ready, log_path = tmp_path / "crash.db", tmp_path / "ready", tmp_path / "ingest.log"
    n = 1500
    msgs = [patch_msg(f"dev-{i % 5}", i) for i in range(n)]
    store = PatchStore(db)
    proc = _spawn_ingest(db, mosquitto, protocol, ready, log_path)
    pub = Publisher(mosquitto)
    published = threading.Event()

    def publish_all() -> None:
        for i, m in enumerate(msgs):
            pub.send(m)
            if i % 50 == 49:
                time.sleep(0.01)  # a stream, not one burst: the kill lands mid-stream
        published.set()

    publisher = threading.Thread(target=publish_all)
    publisher.start()
    try:
        wait_until(lambda: store.count("patches") >= 200, 30, "ingest to store a first part")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        at_kill = store.count("patches")
        assert at_kill < n, "the kill came too late to test anything"
        publisher.join(60)
        assert published.is_set()
        proc = _spawn_ingest(db, mosquitto, protocol, ready, log_path)
        wait_until(lambda: store.count("patches") >= n, 60, f"all {n} patches after restart")
        time.sleep(0.3)  # any late redelivery would land now - and must not add rows
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
        pub.close()
    assert store.count("patches") == n
    assert sorted(store.patch_hashes()) == sorted(m.content_hash for m in msgs)
    seqs = sorted(s for d in range(5) for s in store.patch_seqs(f"dev-{d}"))
    assert seqs == list(range(n))
    assert sum(d["patches"] for d in store.devices()) == n  # device counters did not double count
    store.close()


def test_broker_restart_reconnects_and_resumes(mosquitto: Any, store: PatchStore) -> None:
    service = run_service(store, mosquitto, client_id="ingest-reconnect", reconnect_min_delay=0.05)
    pub = Publisher(mosquitto)
    try:
        for info in [pub.send(patch_msg("dev-1", i)) for i in range(10)]:
            info.wait_for_publish(5)
        wait_until(lambda: store.count("patches") == 10, 5, "patches before the outage")
        mosquitto.stop()
        wait_until(lambda: not service.connected, 5, "ingest to notice the outage")
        mosquitto.start()
        wait_until(lambda: service.connected and service.wait_subscribed(0), 15, "ingest to reconnect")
        wait_until(lambda: pub.client.is_connected(), 15, "publisher to reconnect")
        for info in [pub.send(patch_msg("dev-1", i)) for i in range(10, 20)]:
            info.wait_for_publish(5)
        wait_until(lambda: store.count("patches") == 20, 10, "patches after the outage")
    finally:
        pub.close()
        service.stop()
    assert store.patch_seqs("dev-1") == list(range(20))
    assert service.stats.connects >= 2


@pytest.mark.postgres
def test_two_workers_into_postgresql(mosquitto: Any) -> None:
    """The production shape: shared-subscription workers writing one PostgreSQL store."""
    import uuid

    store = PatchStore("postgresql+psycopg2://postgres@127.0.0.1:5432/test", table_prefix=f"t{uuid.uuid4().hex[:12]}_")
    workers = [run_service(PatchStore(store.url, table_prefix=store.table_prefix), mosquitto, worker=f"pg{i}")
               for i in range(2)]
    pub = Publisher(mosquitto)
    try:
        msgs = [patch_msg(f"dev-{i % 3}", i) for i in range(150)]
        infos = [pub.send(m) for m in msgs] + [pub.send(msgs[0])]  # plus one redelivery-like duplicate
        for info in infos:
            info.wait_for_publish(5)
        wait_until(lambda: sum(w.stats.accepted for w in workers) == len(infos), 15, "both workers to drain")
        assert store.count("patches") == len(msgs)
        assert sum(d["patches"] for d in store.devices()) == len(msgs)
        assert sum(w.stats.duplicates for w in workers) == 1
    finally:
        pub.close()
        for w in workers:
            w.stop()
            w.store.close()
        store.drop_all()
        store.close()
