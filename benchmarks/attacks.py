"""Replays the attacks of issue 11's first paragraph against a provisioned fleet; one row per attack.

Real parts: `edgepatch cloud provision` writes the configuration, Mosquitto runs on it (free loopback
ports), the companion side connects through the project's MQTT seam with its provisioned TLS login, the
attacker is a plain paho client holding one stolen device login (dev-000) or none. Announcements are
checked by the device's `AnnouncementGate` (what `DeviceRuntime.apply_announcement` runs before fetching)
and φ go through the cloud round's screen (`run_aggregator` → cloud/robust.py) on a tiny untrained model.

    python3 benchmarks/attacks.py [--out results/attacks.json]

Prints a table and, last, "blocked B of T attacks".
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt

from edgepatch.cloud.provision import ProvisionOptions, companion_mqtt_settings, provision
from edgepatch.protocol.messages import BundleAnnouncement, PatchUpdate, decode, encode, make_message
from edgepatch.protocol.mqtt import Incoming, MqttConfigError, MqttSettings, make_client
from edgepatch.protocol.ports import free_port
from edgepatch.protocol.signing import AnnouncementGate, BundleSigner, SignatureError, signed_bytes
from edgepatch.sim.brokers import MosquittoBroker

FLEET = "lab"
P = f"edgepatch/v1/{FLEET}"
DEVICES = ["dev-000", "dev-001", "dev-002"]


@dataclass
class Peer:
    client: mqtt.Client
    connack: list[str] = field(default_factory=list)
    disconnects: list[str] = field(default_factory=list)
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    suback: list[str] = field(default_factory=list)
    puback: dict[int, str] = field(default_factory=dict)

    def wait(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate() and time.monotonic() < deadline:
            time.sleep(0.02)
        return predicate()

    def subscribe(self, topic: str) -> str:
        n = len(self.suback)
        self.client.subscribe(topic, qos=1)
        return self.suback[-1] if self.wait(lambda: len(self.suback) > n) else "no SUBACK"

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> str:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        return self.puback[info.mid] if self.wait(lambda: info.mid in self.puback) else "no PUBACK"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Setup:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.port, self.companion_port = free_port(), free_port()
        provision(ProvisionOptions(fleet=FLEET, devices=list(DEVICES), out=out, bind="127.0.0.1", port=self.port,
                                   companion_port=self.companion_port,
                                   broker_user="root" if os.geteuid() == 0 else "mosquitto"))
        self.broker = MosquittoBroker(out / "launcher", listeners={self.port: [], self.companion_port: []},
                                      persistence=False)
        self.broker.config_path = out / "broker" / "mosquitto.conf"  # run the provisioned configuration
        self.broker.log_path = out / "broker" / "mosquitto.log"
        self.broker.start()
        self.companion_settings = companion_mqtt_settings(out / "companion", f"mqtts://127.0.0.1:{self.companion_port}")
        self.signer = BundleSigner.from_file(out / "companion" / "fleet-signing.key")

    def peer(self, user: str | None, client_id: str = "", password: str | None = None,
             companion: bool = False) -> Peer:
        client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=mqtt.MQTTv5)
        peer = Peer(client)
        client.tls_set(ca_certs=str(self.out / "ca" / "ca.crt"))
        if user is not None:
            folder = self.out / ("companion" if companion else f"devices/{user}")
            client.username_pw_set(user, password or (folder / "password").read_text().strip()
                                   if (folder / "password").exists() or password else "guess")
        client.on_connect = lambda c, u, f, rc, p: peer.connack.append(str(rc))
        client.on_disconnect = lambda c, u, f, rc, p: peer.disconnects.append(str(rc))
        client.on_message = lambda c, u, m: peer.messages.append((m.topic, m.payload))
        client.on_subscribe = lambda c, u, mid, rcs, p: peer.suback.append(str(rcs[0]))
        client.on_publish = lambda c, u, mid, rc, p: peer.puback.__setitem__(mid, str(rc))
        client.connect("127.0.0.1", self.companion_port if companion else self.port)
        client.loop_start()
        peer.wait(lambda: bool(peer.connack or peer.disconnects))
        return peer

    def watcher(self, client_id: str, topic_filter: str) -> tuple[Any, list[Incoming]]:
        """A companion client through the project's MQTT seam (TLS + provisioned login)."""
        got: list[Incoming] = []
        client = make_client(self.companion_settings.replace(client_id=client_id))
        client.subscribe(topic_filter, got.append)
        client.connect()
        if not (client.wait_connected(10) and client.wait_subscribed(10)):
            raise RuntimeError(f"companion client {client_id} could not connect/subscribe: {self.broker.log_text()[-800:]}")
        return client, got

    def announcement(self, sequence: int, reference: str = "http://127.0.0.1:8080/bundles/v2/",
                     signer: BundleSigner | None = None, forge: bool = False) -> BundleAnnouncement:
        ann = BundleAnnouncement(version="v2", reference=reference, manifest_sha256="ab" * 32, size=1000,
                                 artifacts={"params.npz": "cd" * 32}, sequence=sequence)
        if signer is None:
            return ann
        if forge:  # sign by hand what BundleSigner refuses to sign (a file:// reference)
            raw = signer._key.sign(signed_bytes(FLEET, sequence, ann.to_json()))
            return BundleAnnouncement(**{**ann.__dict__, "signature": f"ed25519:{signer.key_id}:{base64.b64encode(raw).decode()}"})
        return BundleAnnouncement(**{**ann.__dict__, "signature": signer.sign(FLEET, sequence, ann.to_json())})

    def gate_result(self, ann: BundleAnnouncement, active_sequence: int = 100) -> str:
        gate = AnnouncementGate(self.out / "devices" / "dev-001" / "fleet-signing.pub", FLEET,
                                self.out / "gate-seq")
        gate.sequence.accept(active_sequence)
        try:
            gate.check(ann.to_json())
        except SignatureError as exc:
            return exc.reason
        return "accepted"


def row(attack: str, blocked: bool, by: str, lost: str) -> dict[str, Any]:
    return {"attack": attack, "blocked": blocked, "by": by, "lost": lost}


def attacks(s: Setup) -> list[dict[str, Any]]:
    rows = []
    other = BundleSigner(__import__("cryptography.hazmat.primitives.asymmetric.ed25519",
                                    fromlist=["Ed25519PrivateKey"]).Ed25519PrivateKey.generate())

    # 1. anonymous client pushes a retained (backdoored) announcement
    anon = s.peer(None)
    rows.append(row("anonymous retained bundle announcement", anon.connack[:1] != ["Success"],
                    "broker: allow_anonymous false", f"connect: {anon.connack[:1] or anon.disconnects[:1]}"))
    anon.close()

    # 2. a device login pushes a retained announcement
    dev0 = s.peer("dev-000")
    msg = make_message(s.announcement(1), device_id="cloud", fleet=FLEET, base_version="x", variant_id="-", seq=1)
    reason = dev0.publish(f"{P}/bundle", encode(msg), retain=True)
    late = s.peer("dev-001")
    late.subscribe(f"{P}/bundle")
    late.wait(lambda: bool(late.messages), 0.5)
    rows.append(row("device announces a bundle (retained)", not late.messages, "broker ACL (dynamic security)",
                    f"PUBACK {reason}; retained copies at devices: {len(late.messages)}"))
    late.close()

    # 3-6. announcements that reach a device anyway (e.g. a compromised relay): the device's gate
    for name, ann in [("announcement with its own sha256 but no signature", s.announcement(200)),
                      ("announcement signed with another key", s.announcement(200, signer=other)),
                      ("file:// reference (validly signed)", s.announcement(200, "file:///tmp/evil/", s.signer, True)),
                      ("re-announcing an old version (replay)", s.announcement(50, signer=s.signer))]:
        verdict = s.gate_result(ann)
        rows.append(row(name, verdict != "accepted", "device: fleet-key signature gate",
                        f"refused before fetching ({verdict})"))
    genuine = s.gate_result(s.announcement(200, signer=s.signer))
    assert genuine == "accepted", genuine  # the control: a genuine newer one passes

    # 7. patches as another device with seq = 2^53
    cloud, got = s.watcher("edgepatch-ingest-0", f"$share/edgepatch-ingest/{P}/+/patch")
    forged = make_message(PatchUpdate(phi=np.zeros(8, np.float32), steps=1, samples=1, holdout_acc=1.0, loss=0.0),
                          device_id="dev-001", fleet=FLEET, base_version="b", variant_id="v", seq=2**53)
    reason = dev0.publish(forged.topic(), encode(forged))
    time.sleep(0.3)
    rows.append(row("patch as another device with seq 2^53", not got, "broker ACL",
                    f"PUBACK {reason}; reached the companion: {len(got)}"))

    # 8. 50 made-up devices
    fakes = [s.peer(f"fake-{i:02d}", password="x" * 43) for i in range(50)]
    admitted = sum(p.connack[:1] == ["Success"] for p in fakes)
    for p in fakes:
        p.close()
    rows.append(row("50 made-up devices register", admitted == 0, "broker: per-device logins",
                    f"{admitted} of 50 connected"))

    # 9. join the companion's shared subscription
    sub = dev0.subscribe(f"$share/edgepatch-ingest/{P}/+/patch")
    sender = s.peer("dev-002")
    n0 = len(got)
    for i in range(20):
        m = make_message(PatchUpdate(phi=np.full(8, i, np.float32), steps=i, samples=1, holdout_acc=0.5, loss=0.1),
                         device_id="dev-002", fleet=FLEET, base_version="b", variant_id="v", seq=i + 1)
        sender.publish(m.topic(), encode(m))
    deadline = time.monotonic() + 5
    while len(got) - n0 < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    rows.append(row("device joins the companion's shared subscription", len(got) - n0 == 20 and not dev0.messages,
                    "broker: subscribe ACL", f"SUBACK {sub}; patches lost: {20 - (len(got) - n0)} of 20"))
    sender.close()

    # 10. connect with the companion's client id
    drops: list[str] = []
    cloud.disconnect_hooks.append(drops.append)
    thief = s.peer("dev-000", client_id="edgepatch-ingest-0")
    time.sleep(0.5)
    rows.append(row("device connects with the companion's client id", not drops and cloud.connected,
                    "broker: use_username_as_clientid", f"companion disconnects: {len(drops)}"))
    thief.close()
    cloud.disconnect()

    # 11. unrequested Canoe slice to a target
    target = s.peer("dev-001")
    target.subscribe(f"{P}/dev-001/canoe/reply")
    reason = s.peer("dev-002").publish(f"{P}/dev-001/canoe/reply", b'{"slice": "unrequested"}')
    target.wait(lambda: bool(target.messages), 0.5)
    rows.append(row("unrequested Canoe slice to a target", not target.messages,
                    "broker ACL (only the companion relays)",
                    f"PUBACK {reason}; a target also ignores replies to no pending request of its own"))
    target.close()

    # 12. fake helper histogram: the attacker claims every class and never answers
    rows.append(fake_histogram(s, dev0))
    dev0.close()

    # 13-14. poisoned φ in a round
    rows += phi_rows()

    # 15. password over plain mqtt://
    try:
        MqttSettings(host="broker", port=1883, client_id="d", username="dev-000", password="secret")
        verdict = False
    except MqttConfigError:
        verdict = True
    rows.append(row("device password over plain mqtt://", verdict, "MqttSettings refuses; no plain listener",
                    "nothing sent"))
    return rows


def fake_histogram(s: Setup, attacker: Peer, requests: int = 5) -> dict[str, Any]:
    """The companion's Canoe matcher on the provisioned broker; dev-001 is an honest helper, dev-002 asks."""
    from edgepatch.cloud.canoe import CanoeCompanion
    from edgepatch.protocol.canoe import CanoeMeta, CanoeOffer, CanoeRequest, CanoeTask

    def send(peer: Peer, device: str, payload: Any, seq: int) -> str:
        m = make_message(payload, device_id=device, fleet=FLEET, base_version="", variant_id="", seq=seq)
        return peer.publish(m.topic(), encode(m))

    comp = CanoeCompanion(FLEET, "127.0.0.1", s.companion_port, 10, timeout_s=0.5,
                          settings=s.companion_settings.replace(client_id=f"edgepatch-canoe-companion-{FLEET}"))
    comp.start()
    honest, target = s.peer("dev-001"), s.peer("dev-002")
    attacker.subscribe(f"{P}/dev-000/canoe/task")
    honest.subscribe(f"{P}/dev-001/canoe/task")
    blob = b"slice"
    answered: set[str] = set()

    def answer(c: Any, u: Any, m: Any) -> None:
        task = decode(m.topic, m.payload).payload
        if isinstance(task, CanoeTask) and task.request_id not in answered:
            answered.add(task.request_id)
            offer = CanoeOffer(task.request_id, task.target, "dev-001", __import__("hashlib").sha256(blob).hexdigest(),
                               len(blob), inline_b64=base64.b64encode(blob).decode())
            msg = make_message(offer, device_id="dev-001", fleet=FLEET, base_version="", variant_id="", seq=100)
            c.publish(msg.topic(), encode(msg), qos=1)

    honest.client.on_message = answer
    try:
        send(attacker, "dev-000", CanoeMeta([10**6] * 10, [1.0] * 10), 1)
        send(honest, "dev-001", CanoeMeta([0] * 7 + [40, 40, 40], [0.9] * 10), 1)
        attacker.wait(lambda: len(comp.metas) >= 2)
        for i in range(requests):
            send(target, "dev-002", CanoeRequest(f"dev-002-r{i}", [7, 8, 9], [1] * 10, 0.2, 0.9, "bench"), i + 1)
            attacker.wait(lambda i=i: f"dev-002-r{i}" in answered, 5.0)
        first = len(attacker.messages)
    finally:
        honest.close()
        target.close()
        comp.stop()
    return row("fake helper histogram (attacker first helper)", first <= 1 and len(answered) == requests,
               "companion: strikes for failed helpers",
               f"attacker tried first in {first} of {requests} requests (one {comp.timeout_s} s timeout); "
               f"honest slices relayed: {comp.stats['offers_relayed']}")


def phi_rows() -> list[dict[str, Any]]:
    from edgepatch.cloud.momodistill import CloudData, DeviceContribution, DistillConfig, run_aggregator
    from edgepatch.export.reference_models import default_patch, digits_cnn
    from edgepatch.protocol.params import init_params

    spec = digits_cnn()
    patch = default_patch(spec, k=8)
    rng = np.random.default_rng(0)
    x = rng.random((32, *spec.input_shape), dtype=np.float32)
    y = np.arange(32) % spec.num_classes
    honest = [DeviceContribution(f"h{i}", rng.normal(size=8).astype(np.float32)) for i in range(8)]
    cfg = DistillConfig(mode="proxy", phi_source="device", step1_epochs=1, step2_epochs=1)
    out = []
    for name, bad in [("phi of 3e38 in a distillation", np.full(8, 3e38, np.float32)),
                      ("phi of the wrong size in a round", np.zeros(11, np.float32))]:
        try:
            result = run_aggregator("momodistill", spec, patch, init_params(spec, patch, 0),
                                    [*honest, DeviceContribution("attacker", bad)], CloudData(x, y, x), cfg)
            finite = all(np.all(np.isfinite(v)) for v in result.params.values())
            out.append(row(name, finite, "cloud round: robust screen",
                           f"round ran, params finite: {finite}, dropped: {int(result.metrics.get('devices_dropped', 0))}"))
        except Exception as exc:  # an aborted round is the attack succeeding
            out.append(row(name, False, "-", f"round aborted: {exc}"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgepatch-attacks-") as tmp:
        setup = Setup(Path(tmp))
        try:
            rows = attacks(setup)
        finally:
            setup.broker.stop()
    width = max(len(r["attack"]) for r in rows)
    print(f"{'attack':<{width}}  {'blocked':<7}  {'by':<38}  what was lost / seen")
    for r in rows:
        print(f"{r['attack']:<{width}}  {'yes' if r['blocked'] else 'NO':<7}  {r['by']:<38}  {r['lost']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    print(f"blocked {sum(r['blocked'] for r in rows)} of {len(rows)} attacks")


if __name__ == "__main__":
    threading.excepthook = lambda info: None  # paho threads of killed peers must not clutter the table
    main()
