"""Device link against a real Mosquitto, and the on-disk outbox under SIGKILL."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from edgepatch.device.link import DeviceLink, LinkSettings
from edgepatch.device.outbox import Outbox
from edgepatch.protocol.messages import (
    BundleAnnouncement,
    Message,
    MessageError,
    PatchUpdate,
    canonical_bytes,
    decode,
    encode,
    make_message,
)
from edgepatch.protocol.topics import Channel, bundle_topic, device_topic, fleet_filter

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: tests/ is not on the path
from polling import wait_until  # noqa: E402

FLEET = "lab"
SHA = "ab" * 32


def patch(i: int) -> PatchUpdate:
    return PatchUpdate(phi=np.full(16, i, dtype=np.float32), steps=i, samples=32 * i, holdout_acc=0.5, loss=1.0 / (i + 1))


class Receiver:
    """A cloud-side paho subscriber that validates with decode() and drops duplicates by content_hash."""

    def __init__(self, broker, topics: list[str], client_id: str, persistent: bool = False) -> None:
        self.messages: list[Message] = []
        self.raw: list[mqtt.MQTTMessage] = []
        self.duplicates = 0
        self.rejects: list[str] = []
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
                                  clean_session=not persistent)
        self.client.reconnect_delay_set(1, 2)
        self._topics = topics

        def on_connect(client, userdata, flags, reason, properties):
            client.subscribe([(t, 1) for t in topics])

        def on_subscribe(client, userdata, mid, reasons, properties):
            self._subscribed.set()

        def on_message(client, userdata, msg):
            with self._lock:
                self.raw.append(msg)
                try:
                    decoded = decode(msg.topic, msg.payload)
                except MessageError as exc:
                    self.rejects.append(exc.reason)
                    return
                if decoded.content_hash in self._seen:
                    self.duplicates += 1
                    return
                self._seen.add(decoded.content_hash)
                self.messages.append(decoded)

        self.client.on_connect = on_connect
        self.client.on_subscribe = on_subscribe
        self.client.on_message = on_message
        self.client.connect(broker.host, broker.port, keepalive=10)
        self.client.loop_start()
        assert self._subscribed.wait(5), "receiver did not get its SUBACK"

    def kinds(self, kind: str) -> list[Message]:
        with self._lock:
            return [m for m in self.messages if m.kind == kind]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def make_link(broker, tmp_path: Path, device_id: str = "dev-1", protocol: str = "mqttv5", **kw) -> DeviceLink:
    settings = LinkSettings(fleet=FLEET, device_id=device_id, host=broker.host, port=broker.port,
                            protocol=protocol, reconnect_min_delay=1, reconnect_max_delay=2, keepalive=10)
    return DeviceLink(settings, Outbox(tmp_path / f"{device_id}-outbox.sqlite"), base_version="b1",
                      variant_id="v50", **kw)


def raw_publish(broker, topic: str, payload: bytes, retain: bool = False) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"raw-{time.monotonic_ns()}")
    client.connect(broker.host, broker.port)
    client.loop_start()
    client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)
    client.disconnect()
    client.loop_stop()


# ------------------------------------------------------------------------------------------------ outbox

def test_outbox_enqueue_pending_ack_and_persistence(tmp_path):
    path = tmp_path / "ob.sqlite"
    with Outbox(path) as ob:
        a = ob.enqueue(device_topic(FLEET, "d", Channel.PATCH), b"p1")
        b = ob.enqueue(device_topic(FLEET, "d", Channel.METRICS), b"m1", expiry_s=60)
        assert [e.id for e in ob.pending()] == [a, b]
        assert ob.ack(a) and not ob.ack(a)
        assert [ob.next_seq() for _ in range(3)] == [0, 1, 2]
    with Outbox(path) as ob:  # reopened: what was not acked is still there, seq keeps counting
        (entry,) = ob.pending()
        assert (entry.id, entry.payload, entry.expiry_s, entry.qos) == (b, b"m1", 60, 1)
        assert ob.next_seq() == 3


def test_outbox_retained_message_replaces_older_one(tmp_path):
    with Outbox(tmp_path / "ob.sqlite") as ob:
        state = device_topic(FLEET, "d", Channel.STATE)
        ob.enqueue(state, b"online", retain=True)
        ob.enqueue(device_topic(FLEET, "d", Channel.PATCH), b"p")
        newest = ob.enqueue(state, b"offline", retain=True)
        assert [(e.topic.rsplit("/", 1)[1], e.payload) for e in ob.pending()] == [("patch", b"p"), ("state", b"offline")]
        assert ob.pending()[-1].id == newest


def test_outbox_bound_drops_oldest_metrics_first_and_logs_patch_drops(tmp_path, caplog):
    metrics, patch_t = device_topic(FLEET, "d", Channel.METRICS), device_topic(FLEET, "d", Channel.PATCH)
    with Outbox(tmp_path / "ob.sqlite", max_entries=4) as ob:
        p1 = ob.enqueue(patch_t, b"p1")
        ob.enqueue(metrics, b"m1")
        ob.enqueue(metrics, b"m2")
        p2 = ob.enqueue(patch_t, b"p2")
        with caplog.at_level(logging.WARNING, logger="edgepatch.device.outbox"):
            p3 = ob.enqueue(patch_t, b"p3")  # evicts m1 (oldest metrics), not a patch
            assert [e.payload for e in ob.pending()] == [b"p1", b"m2", b"p2", b"p3"]
            p4 = ob.enqueue(patch_t, b"p4")  # evicts m2
            assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
            ob.enqueue(patch_t, b"p5")  # only patches left: the oldest patch goes, loudly
        assert [e.id for e in ob.pending()][:3] == [p2, p3, p4] and p1 not in [e.id for e in ob.pending()]
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "patch" in errors[0].getMessage()
        assert ob.evicted == {0: 2, 2: 1}


WRITER = textwrap.dedent("""
    import sys
    from edgepatch.device.outbox import Outbox
    ob = Outbox(sys.argv[1])
    i = 0
    while True:
        topic = "edgepatch/v1/lab/d/" + ("patch" if i % 2 else "metrics")
        entry = ob.enqueue(topic, b"x" * 200 + str(i).encode())
        print("enq", entry, flush=True)
        if i % 3 == 0:
            ob.ack(entry)
            print("ack", entry, flush=True)
        i += 1
""")


def test_outbox_survives_sigkilled_writer(tmp_path):
    path = tmp_path / "ob.sqlite"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    enqueued: set[int] = set()
    acked: set[int] = set()
    assert proc.stdout is not None
    try:
        while len(enqueued) < 150:
            line = proc.stdout.readline()
            assert line, f"writer died early with {proc.poll()}"
            verb, num = line.split()
            (enqueued if verb == "enq" else acked).add(int(num))
    finally:
        proc.send_signal(signal.SIGKILL)  # mid-loop, likely inside a transaction
        proc.wait()
        proc.stdout.close()
    with Outbox(path) as ob:  # opening runs SQLite's integrity check
        present = {e.id for e in ob.pending()}
        for e in ob.pending():
            assert e.payload.startswith(b"x" * 200), "torn entry"
    assert enqueued - acked <= present, f"lost {sorted((enqueued - acked) - present)[:5]}"
    assert not (acked & present), "an acknowledged entry came back"


# ------------------------------------------------------------------------------------------------ broker

@pytest.mark.broker
@pytest.mark.parametrize("protocol", ["mqttv5", "mqttv311"])
def test_publish_reaches_subscriber_and_leaves_outbox(mosquitto, tmp_path, protocol):
    rx = Receiver(mosquitto, [fleet_filter(FLEET, "patch"), fleet_filter(FLEET, "state")], "rx-basic")
    link = make_link(mosquitto, tmp_path, protocol=protocol)
    try:
        link.start()
        assert link.wait_connected(5)
        assert link.socket_nodelay()
        sent = link.publish_patch(patch(3))
        wait_until(lambda: len(rx.kinds("patch_update")) == 1, 5, "the patch update")
        got = rx.kinds("patch_update")[0]
        assert got.content_hash == sent.content_hash and got.device_id == "dev-1"
        np.testing.assert_array_equal(got.payload.phi, np.full(16, 3, np.float32))
        wait_until(lambda: any(m.payload.state == "online" for m in rx.kinds("device_state")), 5, "online state")
        assert link.wait_drained(5), f"outbox still holds {len(link.outbox)}"
        raw = next(m for m in rx.raw if m.topic.endswith("/patch"))
        assert raw.qos == 1
    finally:
        link.stop()
        rx.close()


@pytest.mark.broker
def test_mqtt5_user_properties_and_expiry(mosquitto, tmp_path):
    got: list[mqtt.MQTTMessage] = []
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="rx-v5", protocol=mqtt.MQTTv5)
    sub.on_message = lambda c, u, m: got.append(m)
    sub.connect(mosquitto.host, mosquitto.port)
    sub.subscribe(fleet_filter(FLEET, "metrics"), qos=1)
    sub.loop_start()
    link = make_link(mosquitto, tmp_path)
    try:
        link.start()
        assert link.wait_connected(5)
        time.sleep(0.2)  # let the SUBACK land
        link.publish_metrics({"train_ms": 12.0})
        wait_until(lambda: len(got) == 1, 5, "metrics")
        props = got[0].properties
        assert ("kind", "metrics") in props.UserProperty and ("schema", "1") in props.UserProperty
        assert 3500 <= props.MessageExpiryInterval <= 3600
        assert decode(got[0].topic, got[0].payload).payload.values == {"train_ms": 12.0}
    finally:
        link.stop()
        sub.disconnect()
        sub.loop_stop()


@pytest.mark.broker
def test_offline_updates_queue_on_disk_and_all_arrive_after_restart(mosquitto, tmp_path):
    # A persistent-session receiver: the broker keeps its subscription and queue across the restart.
    rx = Receiver(mosquitto, [fleet_filter(FLEET, "patch")], "rx-persistent", persistent=True)
    link = make_link(mosquitto, tmp_path)
    n = 25
    try:
        link.start()
        assert link.wait_connected(5)
        mosquitto.stop()
        wait_until(lambda: not link.connected, 5, "the link to notice the outage")
        sent = [link.publish_patch(patch(i)) for i in range(n)]
        assert len(link.outbox) >= n  # on disk, not in memory
        with Outbox(link.outbox.path) as second_view:  # visible to another connection = committed
            assert sum(e.topic.endswith("/patch") for e in second_view.pending()) == n
        mosquitto.start()  # same port
        assert link.wait_connected(15), "link did not reconnect"
        wait_until(lambda: len(rx.kinds("patch_update")) == n, 20, f"{n} queued updates")
        assert link.wait_drained(10)
        # A resend after a lost PUBACK looks like this: same bytes again. The receiver drops it.
        raw_publish(mosquitto, sent[0].topic(), encode(sent[0]))
        wait_until(lambda: rx.duplicates == 1, 5, "the duplicate to arrive")
        got = rx.kinds("patch_update")
        assert sorted(m.seq for m in got) == sorted(m.seq for m in sent)
        assert {m.content_hash for m in got} == {m.content_hash for m in sent}
    finally:
        link.stop()
        rx.close()


DEVICE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from edgepatch.device.link import DeviceLink, LinkSettings
    from edgepatch.device.outbox import Outbox
    s = LinkSettings(fleet="lab", device_id="dev-doomed", host=sys.argv[1], port=int(sys.argv[2]), keepalive=10)
    link = DeviceLink(s, Outbox(Path(sys.argv[3])), base_version="b1", variant_id="v25")
    link.start()
    assert link.wait_connected(10)
    assert link.wait_drained(10)
    print("ready", flush=True)
    time.sleep(60)
""")


@pytest.mark.broker
def test_last_will_when_device_is_killed(mosquitto, tmp_path):
    lwt = device_topic(FLEET, "dev-doomed", Channel.LWT)
    rx = Receiver(mosquitto, [lwt, device_topic(FLEET, "dev-doomed", Channel.STATE)], "rx-lwt")
    proc = subprocess.Popen([sys.executable, "-c", DEVICE, mosquitto.host, str(mosquitto.port),
                             str(tmp_path / "doomed.sqlite")], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        wait_until(lambda: any(m.payload.state == "online" for m in rx.kinds("device_state")), 5, "online")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        wait_until(lambda: any(m.payload.reason == "will" for m in rx.kinds("device_state")), 10, "the will")
        will = next(m for m in rx.kinds("device_state") if m.payload.reason == "will")
        assert (will.payload.state, will.device_id, will.variant_id) == ("offline", "dev-doomed", "v25")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        rx.close()
    late = Receiver(mosquitto, [lwt], "rx-late")  # retained: a cloud worker starting later sees it too
    try:
        wait_until(lambda: len(late.kinds("device_state")) == 1, 5, "the retained will")
    finally:
        late.close()


@pytest.mark.broker
def test_malformed_bundle_announcements_are_dropped_and_link_keeps_working(mosquitto, tmp_path, caplog):
    received: list[Message] = []

    def on_bundle(msg: Message) -> None:
        received.append(msg)

    rx = Receiver(mosquitto, [fleet_filter(FLEET, "patch")], "rx-bundle")
    link = make_link(mosquitto, tmp_path, on_bundle=on_bundle)
    topic = bundle_topic(FLEET)
    good = make_message(BundleAnnouncement(version="b2", reference="file:///bundles/b2", manifest_sha256=SHA,
                                           size=4096, artifacts={"infer.tflite": SHA}),
                        device_id="cloud", fleet=FLEET, base_version="b2", variant_id="", seq=1)
    tampered = json.loads(encode(good))
    tampered["payload"]["size"] = 1
    try:
        with caplog.at_level(logging.WARNING, logger="edgepatch.device.link"):
            link.start()
            assert link.wait_connected(5)
            time.sleep(0.3)  # subscription in place
            raw_publish(mosquitto, topic, os.urandom(64) + b"\xff")
            raw_publish(mosquitto, topic, canonical_bytes(tampered))
            raw_publish(mosquitto, topic, encode(good), retain=True)
            wait_until(lambda: len(received) == 1, 5, "the valid announcement")
        assert received[0].payload.version == "b2" and received[0].content_hash == good.content_hash
        assert link.rejects == {"bad_json": 1, "hash_mismatch": 1}
        assert sum("dropped bundle announcement" in r.getMessage() for r in caplog.records) == 2
        link.publish_patch(patch(1))  # the loop thread survived: traffic still flows both ways
        wait_until(lambda: len(rx.kinds("patch_update")) == 1, 5, "a patch after the bad announcements")
    finally:
        link.stop()
        rx.close()


@pytest.mark.broker
def test_link_started_while_broker_is_down_delivers_once_it_is_up(mosquitto, tmp_path):
    rx = Receiver(mosquitto, [fleet_filter(FLEET, "patch")], "rx-late-broker", persistent=True)
    mosquitto.stop()
    link = make_link(mosquitto, tmp_path, device_id="dev-early")
    try:
        link.start()  # must not raise: paho keeps retrying the first connection
        sent = [link.publish_patch(patch(i)) for i in range(3)]
        assert not link.wait_connected(0.5) and len(link.outbox) == 3
        mosquitto.start()
        assert link.wait_connected(15)
        wait_until(lambda: len(rx.kinds("patch_update")) == 3, 15, "the updates queued before the first connect")
        assert [m.seq for m in sorted(rx.kinds("patch_update"), key=lambda m: m.seq)] == [m.seq for m in sent]
    finally:
        link.stop()
        rx.close()


def test_mqtt5_link_is_never_sent_an_oversized_retained_announcement(mosquitto, tmp_path):
    """MQTT 5 Maximum Packet Size: Mosquitto drops a 1 MiB retained payload for the device instead of sending
    it (issue 12: a huge retained "announcement" took every device's memory); the next valid one arrives."""
    raw_publish(mosquitto, bundle_topic(FLEET), b"x" * (1 << 20), retain=True)
    bundles: list[Message] = []
    link = make_link(mosquitto, tmp_path, on_bundle=bundles.append)
    try:
        link.start()
        assert link.wait_connected(5)
        ann = make_message(BundleAnnouncement("b2", "https://x/b2/", SHA, 10, {"a": SHA}), device_id="cloud",
                           fleet=FLEET, seq=1)
        raw_publish(mosquitto, bundle_topic(FLEET), encode(ann), retain=True)
        wait_until(lambda: bundles, 5, "the valid announcement")
        assert [b.payload for b in bundles] == [ann.payload]
        assert not link.rejects  # the big one was never delivered (not received and then refused)
    finally:
        link.stop()
