"""Fleet security against a REAL Mosquitto started with the configuration `edgepatch cloud provision` writes.

The attacker is a provisioned device (dev-000) using plain paho, as in issue 11; every "blocked" assertion
has a positive control showing that the same path works for the legitimate sender.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from edgepatch.cloud.provision import ProvisionOptions, provision, revoke
from edgepatch.protocol.ports import free_port
from edgepatch.sim.brokers import MosquittoBroker, find_binary

pytestmark = pytest.mark.broker
FLEET = "f1"
PREFIX = f"edgepatch/v1/{FLEET}"
COMPANION_ID = f"edgepatch-companion-{FLEET}"


class ProvisionedBroker(MosquittoBroker):
    """The project's one Mosquitto launcher, started on the configuration `provision` wrote."""

    def __init__(self, out: Path, ports: tuple[int, int]) -> None:
        super().__init__(out / "launcher", listeners={p: [] for p in ports}, persistence=False)
        self.config_path = out / "broker" / "mosquitto.conf"
        self.log_path = out / "broker" / "mosquitto.log"


@dataclass
class Fleet:
    out: Path
    device_port: int
    companion_port: int
    broker: ProvisionedBroker


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    if find_binary() is None:
        pytest.fail("the mosquitto binary is missing: apt-get install -y mosquitto", pytrace=False)
    out = tmp_path_factory.mktemp("fleet")
    device_port = free_port()
    companion_port = free_port()
    while companion_port == device_port:
        companion_port = free_port()
    provision(ProvisionOptions(fleet=FLEET, devices=["dev-000", "dev-001", "dev-002"], out=out,
                               bind="127.0.0.1", port=device_port, companion_port=companion_port,
                               broker_user="root" if os.geteuid() == 0 else "mosquitto"))
    broker = ProvisionedBroker(out, (device_port, companion_port))
    with broker:
        yield Fleet(out, device_port, companion_port, broker)


@dataclass
class Peer:
    """A paho client that records what happens to it."""

    client: mqtt.Client
    connack: list[str] = field(default_factory=list)
    disconnects: list[str] = field(default_factory=list)
    messages: list[tuple[str, bytes, bool]] = field(default_factory=list)
    suback: list[str] = field(default_factory=list)
    puback: dict[int, str] = field(default_factory=dict)
    event: threading.Event = field(default_factory=threading.Event)

    def topics(self) -> list[str]:
        return [t for t, _, _ in self.messages]

    def subscribe(self, topic: str) -> str:
        before = len(self.suback)
        self.client.subscribe(topic, qos=1)
        wait_until(lambda: len(self.suback) > before, 5, f"SUBACK for {topic}")
        return self.suback[-1]

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> str:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        wait_until(lambda: info.mid in self.puback, 5, f"PUBACK for {topic}")
        return self.puback[info.mid]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def wait_until(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def connect(fleet: Fleet, user: str | None, *, client_id: str = "", companion: bool = False, tls: bool = True,
            password: str | None = None, wait: bool = True) -> Peer:
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv5)
    peer = Peer(client)
    if tls:
        client.tls_set(ca_certs=str(fleet.out / "ca" / "ca.crt"))
    if user is not None:
        folder = fleet.out / ("companion" if user == "companion" else f"devices/{user}")
        secret = password if password is not None else (folder / "password").read_text().strip()
        client.username_pw_set(user, secret)
    client.on_connect = lambda c, u, f, rc, p: (peer.connack.append(str(rc)), peer.event.set())
    client.on_disconnect = lambda c, u, f, rc, p: peer.disconnects.append(str(rc))
    client.on_message = lambda c, u, m: peer.messages.append((m.topic, m.payload, bool(m.retain)))
    client.on_subscribe = lambda c, u, mid, rcs, p: peer.suback.append(str(rcs[0]))
    client.on_publish = lambda c, u, mid, rc, p: peer.puback.__setitem__(mid, str(rc))
    client.connect("127.0.0.1", fleet.companion_port if companion else fleet.device_port)
    client.loop_start()
    if wait:
        wait_until(lambda: peer.event.is_set() or peer.disconnects, 10, f"CONNACK for {user}")
    return peer


def settle() -> None:
    time.sleep(0.4)  # long enough for a loopback broker to deliver anything it was going to deliver


# ------------------------------------------------------------------------------------- real broker

def test_anonymous_plain_and_wrong_password_are_refused(fleet: Fleet) -> None:
    anon = connect(fleet, None)
    assert anon.connack and anon.connack[0] == "Not authorized"
    anon.close()
    wrong = connect(fleet, "dev-000", password="guess")
    assert wrong.connack and wrong.connack[0] in ("Not authorized", "Bad user name or password")
    wrong.close()
    device_on_companion_port = connect(fleet, "dev-000", companion=True)
    assert device_on_companion_port.connack[0] != "Success"
    device_on_companion_port.close()
    plain = connect(fleet, "dev-000", tls=False, wait=False)  # the TLS listener drops a plain CONNECT
    wait_until(lambda: plain.disconnects or plain.connack, 10, "the plain connection to end")
    assert "Success" not in plain.connack
    plain.close()
    good = connect(fleet, "dev-000")
    assert good.connack == ["Success"]
    good.close()


def test_device_cannot_publish_as_another_device_nor_announce(fleet: Fleet) -> None:
    cloud = connect(fleet, "companion", client_id="test-cloud-watch", companion=True)
    assert cloud.subscribe(f"{PREFIX}/#") == "Granted QoS 1"
    attacker = connect(fleet, "dev-000")
    forged = attacker.publish(f"{PREFIX}/dev-001/patch", b"forged")
    announced = attacker.publish(f"{PREFIX}/bundle", b"evil", retain=True)
    relayed = attacker.publish(f"{PREFIX}/dev-001/canoe/reply", b"slice")
    own = attacker.publish(f"{PREFIX}/dev-000/patch", b"mine")  # positive control
    wait_until(lambda: f"{PREFIX}/dev-000/patch" in cloud.topics(), 5, "the attacker's own patch")
    settle()
    assert own == "Success"
    assert {forged, announced, relayed} == {"Not authorized"}  # MQTT 5 PUBACK 0x87
    assert cloud.topics() == [f"{PREFIX}/dev-000/patch"]
    late = connect(fleet, "dev-001")  # no retained announcement was stored either
    assert late.subscribe(f"{PREFIX}/bundle") == "Granted QoS 1"
    settle()
    assert late.messages == []
    for peer in (cloud, attacker, late):
        peer.close()


def test_device_cannot_subscribe_to_another_devices_replies(fleet: Fleet) -> None:
    attacker, victim = connect(fleet, "dev-000"), connect(fleet, "dev-001")
    assert attacker.subscribe(f"{PREFIX}/dev-001/canoe/reply") == "Not authorized"
    assert attacker.subscribe(f"{PREFIX}/+/canoe/reply") == "Not authorized"
    assert attacker.subscribe("#") == "Not authorized"
    assert victim.subscribe(f"{PREFIX}/dev-001/canoe/reply") == "Granted QoS 1"
    cloud = connect(fleet, "companion", client_id="test-cloud-relay", companion=True)
    assert cloud.publish(f"{PREFIX}/dev-001/canoe/reply", b"slice") == "Success"
    wait_until(lambda: victim.messages, 5, "the victim's reply")
    settle()
    assert attacker.messages == []
    for peer in (attacker, victim, cloud):
        peer.close()


def test_device_cannot_join_the_companions_shared_subscription(fleet: Fleet) -> None:
    shared = f"$share/edgepatch-ingest/{PREFIX}/+/patch"
    ingest = connect(fleet, "companion", client_id="edgepatch-ingest-0", companion=True)
    assert ingest.subscribe(shared) == "Granted QoS 1"
    attacker = connect(fleet, "dev-000")
    assert attacker.subscribe(shared) == "Not authorized"
    sender = connect(fleet, "dev-002")
    for i in range(20):
        assert sender.publish(f"{PREFIX}/dev-002/patch", b"p%d" % i) == "Success"
    wait_until(lambda: len(ingest.messages) >= 20, 5, "all 20 patches at the companion")
    settle()
    assert len(ingest.messages) == 20 and attacker.messages == []
    for peer in (ingest, attacker, sender):
        peer.close()


def test_stolen_client_id_cannot_knock_the_companion_off(fleet: Fleet) -> None:
    cloud = connect(fleet, "companion", client_id=COMPANION_ID, companion=True)
    assert cloud.subscribe(f"{PREFIX}/+/patch") == "Granted QoS 1"
    victim = connect(fleet, "dev-001")
    thief = connect(fleet, "dev-000", client_id=COMPANION_ID)  # asks for the companion's id ...
    assert thief.connack == ["Success"]
    impostor = connect(fleet, "dev-000", client_id="dev-001")  # ... and for another device's
    settle()
    # Mosquitto replaced the requested ids by the username: it logs the connection as dev-000.
    log = fleet.broker.log_text()
    assert "as dev-000 (p5, c1, k60, u'dev-000')" in log
    assert f"as {COMPANION_ID} (p5, c1, k60, u'dev-000')" not in log
    assert cloud.disconnects == [] and victim.disconnects == []  # nobody was knocked off
    assert victim.publish(f"{PREFIX}/dev-001/patch", b"still here") == "Success"
    wait_until(lambda: f"{PREFIX}/dev-001/patch" in cloud.topics(), 5, "the companion still receiving")
    # Two connections under one login share one client id: the second one (impostor) took over the first.
    assert thief.disconnects
    for peer in (cloud, victim, thief, impostor):
        peer.close()


def test_revoked_device_is_refused_after_restart(fleet: Fleet, tmp_path: Path) -> None:
    revoke(fleet.out, "dev-002")
    fleet.broker.stop()
    fleet.broker.start()
    try:
        revoked = connect(fleet, "dev-002", password="x" * 43)
        assert revoked.connack and revoked.connack[0] != "Success"
        revoked.close()
        still = connect(fleet, "dev-001")
        assert still.connack == ["Success"]
        still.close()
    finally:
        provision(ProvisionOptions(fleet=FLEET, devices=["dev-002"], out=fleet.out, bind="127.0.0.1",
                                   port=fleet.device_port, companion_port=fleet.companion_port,
                                   broker_user="root" if os.geteuid() == 0 else "mosquitto"))
        fleet.broker.stop()
        fleet.broker.start()
    back = connect(fleet, "dev-002")
    assert back.connack == ["Success"]  # re-provisioned with a new password
    back.close()


@pytest.mark.slow
def test_companion_signs_its_announcements_over_the_provisioned_broker(fleet: Fleet, digits_bundle: Path,
                                                                       tmp_path: Path) -> None:
    from edgepatch.cloud.companion import Companion, CompanionConfig
    from edgepatch.cloud.provision import companion_mqtt_settings
    from edgepatch.protocol.messages import BundleAnnouncement, decode
    from edgepatch.protocol.signing import BundleVerifier

    creds = fleet.out / "companion"
    mqtt_settings = companion_mqtt_settings(creds, f"mqtts://127.0.0.1:{fleet.companion_port}")
    device = connect(fleet, "dev-001")
    assert device.subscribe(f"{PREFIX}/bundle") == "Granted QoS 1"
    companion = Companion(CompanionConfig(bundle=digits_bundle, work_dir=tmp_path / "cloud", fleet=FLEET,
                                          mqtt=mqtt_settings, signing_key=creds / "fleet-signing.key"))
    companion.start()
    try:
        wait_until(lambda: device.messages, 20, "the companion's announcement at the device")
        topic, payload, _ = device.messages[-1]
        ann = decode(topic, payload).payload
        assert isinstance(ann, BundleAnnouncement) and ann.signature.startswith("ed25519:")
        verifier = BundleVerifier.from_file(fleet.out / "devices" / "dev-001" / "fleet-signing.pub")
        assert verifier.verify(FLEET, ann.to_json(), active_sequence=0) == ann.sequence
        second = companion.publish(digits_bundle)  # a re-announcement gets a strictly newer sequence
        assert second.sequence > ann.sequence
    finally:
        companion.stop()
        device.close()


@pytest.mark.slow
def test_device_run_and_companion_over_the_provisioned_broker_install_a_signed_round(
        fleet: Fleet, digits_bundle: Path, shifted_digits_devices: dict[str, Path], tmp_path: Path) -> None:
    """The whole loop on the provisioned broker: `device run --config` (TLS, password file, fleet key) sends
    its patch, the companion (TLS login, signing key) distils and announces a signed bundle, the device
    verifies and installs it."""
    import sys

    from edgepatch.cloud.companion import Companion, CompanionConfig
    from edgepatch.cloud.provision import companion_mqtt_settings
    from edgepatch.protocol.bundle import ActiveBundleStore, load_bundle

    creds, dev = fleet.out / "companion", fleet.out / "devices" / "dev-001"
    companion = Companion(CompanionConfig(
        bundle=digits_bundle, work_dir=tmp_path / "cloud", fleet=FLEET, aggregator="fedavg_patches",
        mqtt=companion_mqtt_settings(creds, f"mqtts://127.0.0.1:{fleet.companion_port}"),
        signing_key=creds / "fleet-signing.key"))
    config = tmp_path / "device.toml"
    config.write_text(f"""
device_id = "dev-001"
fleet = "{FLEET}"
profile = "linux_x86_64"
data_dir = "{next(iter(shifted_digits_devices.values()))}"
state_dir = "{tmp_path / 'state'}"
bundle = "{digits_bundle}"
rounds = 2
steps = 5
await_bundle_s = 120.0
fleet_key = "{dev / 'fleet-signing.pub'}"

[broker]
url = "mqtts://127.0.0.1:{fleet.device_port}"
username = "dev-001"
password_file = "{dev / 'password'}"
ca_file = "{dev / 'ca.crt'}"
""")
    companion.start()
    proc = subprocess.Popen([sys.executable, "-m", "edgepatch.cli", "device", "run", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not companion.store.latest_patches(companion.current.base_version, FLEET):  # type: ignore[union-attr]
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, f"no patch from the device: {fleet.broker.log_text()[-2000:]}"
            time.sleep(0.5)
        companion.distill_and_publish()  # fedavg round -> republished, signed announcement
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        companion.stop()
    assert proc.returncode == 0, out[-3000:]
    installed = ActiveBundleStore(tmp_path / "state" / "bundles").current_version()
    with load_bundle(digits_bundle) as first:
        assert installed != first.version  # the device moved on ...
    assert installed == companion.current.version, out[-3000:]  # type: ignore[union-attr]  ... to the signed one
    assert int((tmp_path / "state" / "bundle-sequence").read_text()) >= 1
    assert "refused" not in out, out[-3000:]


@pytest.mark.slow
def test_cloud_serve_with_credentials_announces_signed_bundles(fleet: Fleet, digits_bundle: Path,
                                                               tmp_path: Path) -> None:
    import signal
    import sys

    from edgepatch.protocol.messages import BundleAnnouncement, decode
    from edgepatch.protocol.signing import BundleVerifier

    device = connect(fleet, "dev-002")
    assert device.subscribe(f"{PREFIX}/bundle") == "Granted QoS 1"
    settle()
    retained = len(device.messages)  # an earlier test's companion may have left its announcement
    log = tmp_path / "serve.log"
    with open(log, "w") as sink:
        serve = subprocess.Popen(
            [sys.executable, "-m", "edgepatch.cli", "cloud", "serve", "--bundle", str(digits_bundle), "--fleet", FLEET,
             "--credentials", str(fleet.out / "companion"), "--broker", f"mqtts://127.0.0.1:{fleet.companion_port}",
             "--http-port", "0", "--work-dir", str(tmp_path / "cloud")], stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: len(device.messages) > retained or serve.poll() is not None, 120, "the announcement")
        assert serve.poll() is None, log.read_text()[-3000:]
        ann = decode(device.messages[-1][0], device.messages[-1][1]).payload
        assert isinstance(ann, BundleAnnouncement)
        verifier = BundleVerifier.from_file(fleet.out / "devices" / "dev-002" / "fleet-signing.pub")
        assert verifier.verify(FLEET, ann.to_json(), active_sequence=0) == ann.sequence
        # SIGTERM only once serve says it is serving (its handler is installed after start-up)
        wait_until(lambda: "companion serving" in log.read_text() or serve.poll() is not None, 60, "serve up")
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(60)
        except subprocess.TimeoutExpired:
            serve.kill()
        device.close()
    assert serve.returncode == 0, log.read_text()[-3000:]
    assert "password" not in " ".join(serve.args)  # the secret never was on the command line


def test_canoe_and_federated_clients_log_in_with_their_provisioned_credentials(fleet: Fleet) -> None:
    # Issue 11 item 2: every client, not only the device link and the companion, speaks TLS with a login.
    from edgepatch.device.canoe_cli import open_link
    from edgepatch.protocol.mqtt import MqttSettings, MqttVersion, make_client

    folder = fleet.out / "devices" / "dev-001"
    link = open_link(None, "5", FLEET, "dev-001", folder)
    assert link.client.settings.tls and link.client.settings.username == "dev-001"
    link.start(timeout=10)
    try:
        assert link.client.connected
    finally:
        link.stop()
    settings = MqttSettings.from_credentials(folder, f"fl-{FLEET}-dev-001", version=MqttVersion.V5)
    fl = make_client(settings)
    fl.connect()
    try:
        assert fl.wait_connected(10), "the federated client's provisioned login was refused"
    finally:
        fl.disconnect()
    # The same client without the fleet CA and login is refused by the TLS listener.
    anonymous = make_client(MqttSettings.from_url(settings.url, client_id="anon", tls_ca=settings.tls_ca))
    anonymous.connect()
    try:
        assert not anonymous.wait_connected(3)
    finally:
        anonymous.disconnect()
