"""The paho side of the MQTT seam over a real Mosquitto: the real-part twins of test_mqtt_twin.py's broker
semantics (publish acknowledgements, retained messages, shared subscriptions, manual acks tied to their
connection) and of its ingest test (a failed commit drops the connection and the broker redelivers)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np

from edgepatch.cloud.ingest import IngestService, IngestSettings
from edgepatch.cloud.store import PatchStore
from edgepatch.protocol.messages import PatchUpdate, encode, make_message
from edgepatch.protocol.mqtt import Incoming, MqttSettings, MqttVersion, make_client
from edgepatch.protocol.mqtt_paho import PahoClient

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: tests/ is not on the path
from polling import wait_until  # noqa: E402

FLEET = "lab"


class Collector:
    def __init__(self) -> None:
        self.got: list[Incoming] = []
        self.lock = threading.Lock()

    def __call__(self, msg: Incoming) -> None:
        with self.lock:
            self.got.append(msg)


def paho(broker: Any, client_id: str, **kw: Any) -> PahoClient:
    c = make_client(MqttSettings(host=broker.host, port=broker.port, client_id=client_id, **kw))
    assert isinstance(c, PahoClient)
    return c


def test_paho_client_acks_publishes_keeps_retained_and_splits_a_shared_group(mosquitto: Any) -> None:
    pub, a, b = paho(mosquitto, "pub"), paho(mosquitto, "a"), paho(mosquitto, "b")
    got_a, got_b, retained = Collector(), Collector(), Collector()
    a.subscribe("$share/g/t/+", got_a)
    b.subscribe("$share/g/t/+", got_b)
    for c in (pub, a, b):
        c.connect()
        assert c.wait_connected(5) and c.wait_subscribed(5)
    assert a.nodelay()  # TCP_NODELAY on the real socket
    done: list[tuple[bool, str]] = []
    for i in range(20):
        assert pub.publish(f"t/{i}", b"%d" % i, on_done=lambda ok, why: done.append((ok, why)))
    assert pub.publish("r/1", b"kept", retain=True)
    assert pub.flush(5) and len(done) == 20 and all(ok for ok, _ in done)
    wait_until(lambda: len(got_a.got) + len(got_b.got) == 20, 5, "the shared group to get every message")
    assert got_a.got and got_b.got  # split between the two members
    late = paho(mosquitto, "late", version=MqttVersion.V311)
    late.subscribe("r/#", retained)
    late.connect()
    wait_until(lambda: retained.got, 5, "the retained message")
    assert retained.got[0].payload == b"kept" and retained.got[0].retain
    for c in (pub, a, b, late):
        c.disconnect()


def test_manual_ack_is_refused_on_a_later_connection_and_the_broker_redelivers(mosquitto: Any) -> None:
    sub = paho(mosquitto, "ingest-like", persistent=True, manual_ack=True)
    got = Collector()
    sub.subscribe("x/#", got)
    pub = paho(mosquitto, "pub")
    sub.connect()
    pub.connect()
    assert sub.wait_subscribed(5) and pub.wait_connected(5)
    pub.publish("x/1", b"one")
    wait_until(lambda: got.got, 5, "the message")
    first = got.got[0]
    sub.drop_connection()  # not acknowledged: the broker must send it again on the new connection
    wait_until(lambda: len(got.got) >= 2, 10, "the redelivery")
    assert not sub.ack(first)  # its packet id belongs to the dropped connection
    assert got.got[1].payload == b"one" and sub.ack(got.got[1])
    sub.disconnect()
    pub.disconnect()


def test_ingest_commit_failure_over_mosquitto_redelivers_and_loses_nothing(mosquitto: Any, tmp_path: Path) -> None:
    store = PatchStore(tmp_path / "ingest.db")
    settings = IngestSettings(host=mosquitto.host, port=mosquitto.port, fleet=FLEET, max_delay_s=0.005)
    service = IngestService(store, settings)
    failures = {"left": 1}
    commit = store.commit_or_quarantine  # what the ingest calls per batch

    def flaky_commit(*args: Any, **kw: Any) -> Any:
        if failures["left"]:
            failures["left"] -= 1
            raise OSError("database unreachable (simulated)")
        return commit(*args, **kw)

    store.commit_or_quarantine = flaky_commit  # type: ignore[method-assign]
    service.start()
    assert service.wait_subscribed(10)
    device = paho(mosquitto, "dev-1")
    device.connect()
    assert device.wait_connected(5)
    for i in range(5):
        msg = make_message(PatchUpdate(np.full(4, i, np.float32), i, 4, 0.5, 0.1), device_id="dev-1", fleet=FLEET,
                           base_version="b1", variant_id="v50", seq=i)
        device.publish(msg.topic(), encode(msg))
    assert device.flush(5)
    wait_until(lambda: store.count("patches") == 5, 20, "every patch stored after the failed commit")
    service.stop()
    device.disconnect()
    assert service.stats.commit_failures == 1 and service.stats.connects >= 2
    # Messages of the dropped connection that were committed anyway come again: stored once (by hash).
    assert service.stats.new_patches == 5 and store.count("patches") == 5
