"""The MQTT seam on its in-memory twin: settings rules, broker semantics, and the device link, Canoe relay and
federated round running on `MemoryBroker` in well under a second each.

Real-part twins of the same paths over Mosquitto: test_link_mosquitto.py (device link), test_mqtt_tls.py
(TLS and credentials), test_canoe_mqtt.py (Canoe), test_simulate.py (federated rounds), test_cloud_ingest.py.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edgepatch.cloud.canoe import CanoeCompanion
from edgepatch.cloud.ingest import IngestService, IngestSettings
from edgepatch.cloud.store import PatchStore
from edgepatch.device.canoe_link import CanoeLink
from edgepatch.device.link import DeviceLink, LinkSettings
from edgepatch.device.outbox import Outbox
from edgepatch.protocol.canoe import CanoeMeta, CanoeOffer, CanoeReply, CanoeRequest, CanoeTask, canoe_topic
from edgepatch.protocol.messages import (
    BundleAnnouncement,
    Message,
    PatchUpdate,
    decode,
    encode,
    make_message,
)
from edgepatch.protocol.mqtt import Incoming, MqttConfigError, MqttSettings, MqttVersion, Will, make_client
from edgepatch.protocol.mqtt_memory import MemoryBroker, MemoryClient
from edgepatch.protocol.topics import Channel, bundle_topic, device_topic, fleet_filter

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: tests/ is not on the path
from polling import wait_until  # noqa: E402

FLEET = "lab"
SHA = "ab" * 32


def client(broker: MemoryBroker, client_id: str, **kw) -> MemoryClient:
    c = make_client(MqttSettings(client_id=client_id, **kw), broker)
    assert isinstance(c, MemoryClient)
    return c


class Collector:
    def __init__(self) -> None:
        self.got: list[Incoming] = []
        self.lock = threading.Lock()

    def __call__(self, msg: Incoming) -> None:
        with self.lock:
            self.got.append(msg)

    def payloads(self) -> list[bytes]:
        with self.lock:
            return [m.payload for m in self.got]


# ------------------------------------------------------------------------------------------------ settings

@pytest.mark.parametrize("spelling,version", [
    ("5", MqttVersion.V5), ("mqttv5", MqttVersion.V5), (5, MqttVersion.V5), ("3.1.1", MqttVersion.V311),
    ("311", MqttVersion.V311), ("mqttv311", MqttVersion.V311), (MqttVersion.V311, MqttVersion.V311),
])
def test_every_spelling_of_the_version_is_one_enum(spelling, version):
    assert MqttVersion.parse(spelling) is version
    assert MqttSettings(client_id="c", version=spelling).version is version


def test_settings_refuse_a_password_over_plain_mqtt_and_name_the_fix():
    with pytest.raises(MqttConfigError, match=r"refusing to send the MQTT password .* plain mqtt:// .*mqtts://"):
        MqttSettings.from_url("mqtt://broker.example:1883", client_id="c", username="dev", password="s3cret")
    with pytest.raises(MqttConfigError, match="password"):
        LinkSettings(fleet=FLEET, device_id="d1", username="dev", password="s3cret")
    ok = MqttSettings.from_url("mqtts://broker.example", client_id="c", username="dev", password="s3cret")
    assert ok.tls and ok.port == 8883 and "s3cret" not in repr(ok)
    assert MqttSettings(client_id="c", tls_ca="/ca.pem", username="u", password="p").tls  # TLS files imply TLS
    for bad in (dict(client_id=""), dict(client_id="c", port=0), dict(client_id="c", tls_cert="x"),
                dict(client_id="c", version="4")):
        with pytest.raises(MqttConfigError):
            MqttSettings(**bad)
    with pytest.raises(MqttConfigError, match="expected mqtt://"):
        MqttSettings.from_url("http://x:1", client_id="c")


# ---------------------------------------------------------------------------------------- twin semantics

def test_twin_retained_will_shared_subscriptions_and_persistent_sessions():
    broker = MemoryBroker()
    pub, a, b, late = (client(broker, n, persistent=(n == "late")) for n in ("pub", "a", "b", "late"))
    got_a, got_b, got_late = Collector(), Collector(), Collector()
    a.subscribe("$share/g/t/+", got_a)
    b.subscribe("$share/g/t/+", got_b)
    late.subscribe("t/#", got_late)
    for c in (pub, a, b, late):
        c.connect(Will("wills/" + c.settings.client_id, b"gone") if c is pub else None)
        assert c.wait_connected(1) and c.wait_subscribed(1)
    for i in range(10):
        assert pub.publish(f"t/{i}", b"%d" % i)
    assert broker.settle()
    assert len(got_a.got) + len(got_b.got) == 10 and got_a.got and got_b.got  # the group split the stream
    late.disconnect()  # persistent session: QoS 1 queued while away
    pub.publish("t/x", b"queued")
    pub.publish("r/1", b"kept", retain=True)
    late2 = client(broker, "late", persistent=True)
    late2.subscribe("t/#", got_late)
    late2.subscribe("r/#", got_late)
    late2.connect()
    assert broker.settle()
    assert b"queued" in got_late.payloads() and b"kept" in got_late.payloads()  # backlog and retained
    broker.drop("pub")  # unclean: the will is published
    assert broker.settle()
    assert any(t == "wills/pub" for t, _, _ in broker.published)
    pub.publish("r/1", b"", retain=True)  # zero-length retained publish clears it
    assert broker.settle() and broker.retained("r/1") is None
    for c in (pub, a, b, late2):
        c.disconnect()


def test_twin_manual_ack_redelivers_after_a_dropped_connection_and_refuses_stale_acks():
    broker = MemoryBroker()
    sub = client(broker, "ingest", persistent=True, manual_ack=True)
    got = Collector()
    sub.subscribe("x/#", got)
    pub = client(broker, "pub")
    sub.connect()
    pub.connect()
    assert sub.wait_subscribed(1) and pub.wait_connected(1)
    pub.publish("x/1", b"one")
    pub.publish("x/2", b"two")
    assert broker.settle()
    first = list(got.got)
    assert sub.ack(first[0])  # committed: acknowledged
    sub.drop_connection()  # the second was never acknowledged
    assert broker.settle() and sub.wait_connected(1)
    assert not sub.ack(first[1])  # its packet id belongs to a dead connection
    assert got.payloads().count(b"two") == 2 and got.payloads().count(b"one") == 1
    sub.disconnect()
    pub.disconnect()


# ------------------------------------------------------------------------------------- device link (twin)

def make_link(broker: MemoryBroker, tmp_path: Path, device_id: str = "dev-1", **kw) -> DeviceLink:
    settings = LinkSettings(fleet=FLEET, device_id=device_id)
    return DeviceLink(settings, Outbox(tmp_path / f"{device_id}.sqlite"), base_version="b1", variant_id="v50",
                      client=make_client(settings.mqtt(), broker), **kw)


def patch(i: int) -> PatchUpdate:
    return PatchUpdate(phi=np.full(8, i, np.float32), steps=i, samples=4, holdout_acc=0.5, loss=0.1)


def test_device_link_on_the_twin_delivers_survives_an_outage_and_leaves_a_will(tmp_path):
    started = time.perf_counter()
    broker = MemoryBroker()
    cloud = client(broker, "cloud", persistent=True)  # like the ingest: nothing is lost while it reconnects
    seen = Collector()
    cloud.subscribe(fleet_filter(FLEET, Channel.PATCH), seen)
    cloud.connect()
    bundles: list[Message] = []
    link = make_link(broker, tmp_path, on_bundle=bundles.append)
    link.start()
    assert link.wait_connected(1)
    sent = link.publish_patch(patch(1))
    assert link.wait_drained(1) and broker.settle()
    assert [decode(m.topic, m.payload) for m in seen.got] == [sent]
    state = decode(device_topic(FLEET, "dev-1", Channel.STATE), broker.retained(device_topic(FLEET, "dev-1", "state")))
    assert state.payload.state == "online"
    broker.stop()  # outage: everything goes to disk, then out after the broker is back
    wait_until(lambda: not link.connected, 1, "the link to see the outage")
    queued = [link.publish_patch(patch(i)) for i in range(2, 5)]
    assert len(link.outbox) >= 3
    broker.start()
    assert link.wait_connected(1) and link.wait_drained(1) and broker.settle()
    hashes = [decode(m.topic, m.payload).content_hash for m in seen.got]
    assert all(q.content_hash in hashes for q in queued)
    # Announcements: a valid one reaches the callback; a broken one is counted by reason and dropped.
    ann = make_message(BundleAnnouncement("b2", "https://x/b2/", SHA, 10, {"a": SHA}), device_id="cloud",
                       fleet=FLEET, seq=1)
    cloud.publish(bundle_topic(FLEET), encode(ann), retain=True)
    cloud.publish(bundle_topic(FLEET), b'{"schema": 1, "schema": 1}')
    assert broker.settle()
    assert [b.payload for b in bundles] == [ann.payload] and link.rejects == {"bad_json": 1}
    broker.drop("edgepatch-lab-dev-1")  # unclean drop: the broker publishes the retained will
    assert broker.settle()
    will = broker.retained(device_topic(FLEET, "dev-1", Channel.LWT))
    assert will is None or decode(device_topic(FLEET, "dev-1", Channel.LWT), will).payload.reason == "will"
    assert any(t.endswith("/lwt") and p and json.loads(p)["payload"]["reason"] == "will"
               for t, p, _ in broker.published)
    assert link.wait_connected(1)
    link.stop()
    cloud.disconnect()
    assert time.perf_counter() - started < 1.0


# ------------------------------------------------------------------------------------- Canoe relay (twin)

def test_canoe_relay_on_the_twin_matches_times_out_and_relays_the_offer():
    started = time.perf_counter()
    broker = MemoryBroker()
    companion = CanoeCompanion(FLEET, "-", 0, num_classes=10, timeout_s=0.1,
                               client=make_client(MqttSettings(client_id="companion"), broker))
    target = CanoeLink(FLEET, "dev-t", broker=broker)
    silent = CanoeLink(FLEET, "dev-silent", broker=broker)  # the best candidate, but never answers
    helper = CanoeLink(FLEET, "dev-h", broker=broker)
    replies: list[CanoeReply] = []
    target.subscribe(canoe_topic(FLEET, "dev-t", "reply"), lambda m: replies.append(m.payload))

    def answer(msg: Message) -> None:
        task = msg.payload
        assert isinstance(task, CanoeTask) and msg.device_id == "cloud"
        helper.publish("offer", CanoeOffer(task.request_id, task.target, "dev-h", SHA, 3, inline_b64="AAAA"))

    helper.subscribe(canoe_topic(FLEET, "dev-h", "task"), answer)
    for link in (companion.link, target, silent, helper):
        link.start(1)
    silent.publish("meta", CanoeMeta([0] * 7 + [500, 0, 0]), retain=True)
    helper.publish("meta", CanoeMeta([0] * 7 + [50, 0, 0]), retain=True)
    assert broker.settle()
    target.publish("request", CanoeRequest("dev-t-r1", [7], [1] * 10, 0.3, 0.9, "new labels"))
    wait_until(lambda: replies, 1, "the relayed offer")
    (reply,) = replies
    assert reply.offer is not None and reply.offer.helper == "dev-h"
    snap = companion.snapshot()
    assert snap["requests"][0]["helpers_tried"] == ["dev-silent", "dev-h"] and snap["stats"]["timeouts"] == 1
    # A message that fails the wire codec never reaches a handler; it is counted by reason.
    companion.link.client.publish(canoe_topic(FLEET, "dev-x", "request"), b'{"kind": "canoe_request"}')
    assert broker.settle() and companion.link.rejects["schema"] == 1
    for link in (target, silent, helper):
        link.stop()
    companion.stop()
    assert time.perf_counter() - started < 1.0


# ------------------------------------------------------------------------------------ federated (twin)

def test_federated_round_on_the_twin(digits_bundle: Path, tmp_path: Path):
    from edgepatch.cloud.fl.server import Evaluator, FlServer
    from edgepatch.cloud.fl.strategies import make_strategy
    from edgepatch.device.fl_client import DeviceSpec, FlDevice
    from edgepatch.device.resources import ResourceTrace, TracePoint
    from edgepatch.protocol.bundle import load_bundle

    bundle = load_bundle(digits_bundle)
    spec = bundle.model_spec
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, *spec.input_shape)).astype(np.float32)
    y = rng.integers(0, spec.num_classes, 64)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    ResourceTrace((TracePoint(0.0, 1.0, 512.0),)).save(tmp_path / "trace.csv")
    dev_spec = DeviceSpec("dev-1", FLEET, str(digits_bundle), str(tmp_path / "d.npz"), "raspberry_pi_4", 1.0, 1.0,
                          str(tmp_path / "trace.csv"), time.time(), "-", 1, upload_dir=str(tmp_path))
    broker = MemoryBroker()
    device = FlDevice(dev_spec, broker=broker)
    server = FlServer(broker_host="-", broker_port=1, fleet=FLEET, bundle=bundle, strategy=make_strategy("fedavg-wait", spec, bundle.manifest.variants),
                      out_dir=tmp_path / "srv", expected_devices=["dev-1"], evaluator=Evaluator(bundle, x[:16], y[:16]),
                      init_params=bundle.base_params(), deadline_s=5.0, local_steps=2, lr=0.05,
                      clock_origin=time.time(), join_timeout_s=2, client=make_client(MqttSettings(client_id="srv"), broker))
    started = time.perf_counter()
    server.start()
    runner = threading.Thread(target=device.run, kwargs={"idle_timeout_s": 5}, daemon=True)
    runner.start()
    records = server.run(1)
    server.stop()
    runner.join(2)
    assert not runner.is_alive() and device.rounds_done == 1
    (record,) = records
    assert record.contributed == 1 and record.devices[0].outcome == "contributed", record.devices[0].reason
    assert record.bytes_up > 0 and not server.link.rejects
    assert time.perf_counter() - started < 1.0


# ------------------------------------------------------------------------------------------ ingest (twin)

def test_ingest_on_the_twin_acks_after_commit_and_gets_a_failed_batch_again(tmp_path: Path):
    store = PatchStore(tmp_path / "ingest.db")
    started = time.perf_counter()  # the ingest's work, not SQLAlchemy's import and schema creation
    broker = MemoryBroker()
    settings = IngestSettings(fleet=FLEET, max_delay_s=0.005, reconnect_min_delay=0.05)
    service = IngestService(store, settings, client=make_client(settings.mqtt(), broker))
    failures = {"left": 1}
    commit = store.commit_or_quarantine  # what the ingest calls per batch

    def flaky_commit(*args, **kw):
        if failures["left"]:
            failures["left"] -= 1
            raise OSError("database unreachable (simulated)")
        return commit(*args, **kw)

    store.commit_or_quarantine = flaky_commit  # type: ignore[method-assign]
    service.start()
    assert service.wait_subscribed(1)
    device = client(broker, "dev-1")
    device.connect()
    assert device.wait_connected(1)
    sent = [make_message(patch(i), device_id="dev-1", fleet=FLEET, base_version="b1", variant_id="v50", seq=i)
            for i in range(5)]
    for msg in sent:
        device.publish(msg.topic(), encode(msg))
    wait_until(lambda: store.count("patches") == 5, 2, "every patch stored after the failed commit")
    service.stop()
    device.disconnect()
    assert service.stats.commit_failures == 1 and service.stats.connects >= 2  # dropped, redelivered
    # Messages of the dropped connection that were committed anyway come again: stored once (by hash).
    assert service.stats.new_patches == 5 and store.count("patches") == 5 and service.stats.acked >= 5
    assert time.perf_counter() - started < 1.0


def test_twin_honours_the_mqtt5_maximum_packet_size_of_the_device_link(tmp_path):
    broker = MemoryBroker()
    publisher = client(broker, "cloud")
    publisher.connect()
    assert publisher.wait_connected(1)
    publisher.publish(bundle_topic(FLEET), b"x" * (1 << 20), retain=True)
    bundles: list[Message] = []
    link = make_link(broker, tmp_path, on_bundle=bundles.append)
    link.start()
    assert link.wait_connected(1) and broker.settle()
    ann = make_message(BundleAnnouncement("b2", "https://x/b2/", SHA, 10, {"a": SHA}), device_id="cloud",
                       fleet=FLEET, seq=1)
    publisher.publish(bundle_topic(FLEET), encode(ann), retain=True)
    assert broker.settle()
    assert [b.payload for b in bundles] == [ann.payload] and not link.rejects
    link.stop()
    publisher.disconnect()
