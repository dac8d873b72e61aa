"""DeviceLink and IngestService over TLS against a real Mosquitto: password auth and client certificates.

A throwaway CA, a server certificate for 127.0.0.1/localhost and a client certificate are made with the
`openssl` CLI; one Mosquitto (per module) serves two TLS listeners on free loopback ports:
  * `password`: TLS, anonymous refused, users from a `mosquitto_passwd` file;
  * `client_cert`: TLS with `require_certificate true` (the certificate's CN becomes the username).
"""

from __future__ import annotations

import logging
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from edgepatch.cloud.ingest import IngestService, IngestSettings
from edgepatch.cloud.store import PatchStore
from edgepatch.device.link import DeviceLink, LinkSettings
from edgepatch.device.outbox import Outbox
from edgepatch.protocol.messages import Message, PatchUpdate, decode
from edgepatch.protocol.ports import free_port
from edgepatch.protocol.topics import Channel, device_topic
from edgepatch.sim.brokers import MosquittoBroker, find_binary

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: tests/ is not on the path
from polling import wait_until  # noqa: E402

pytestmark = pytest.mark.broker

FLEET = "lab"
USER, PASSWORD = "device-1", "s3cret-for-tests"
HOST = "127.0.0.1"


# ------------------------------------------------------------------------------------ certificates

@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _run(*args: str | Path, cwd: Path) -> None:
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} failed ({done.returncode}): {done.stderr.strip()}")


def _need(binary: str) -> str:
    found = find_binary(binary)
    if found is None:
        pytest.fail(f"the `{binary}` binary is missing (apt-get install -y mosquitto mosquitto-clients openssl)",
                    pytrace=False)
    return found


def make_pki(d: Path) -> Pki:
    """CA -> server cert (SAN IP:127.0.0.1, DNS:localhost) and client cert, EC P-256 keys, valid 2 days."""
    openssl = _need("openssl")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _run(openssl, "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
         "-subj", "/CN=edgepatch-test-ca", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    leaf = {"server": ("/CN=localhost", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"),
            "client": ("/CN=device-cert-1", "extendedKeyUsage=clientAuth\n")}
    for name, (subject, ext) in leaf.items():
        (d / f"{name}.ext").write_text("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n" + ext)
        _run(openssl, "req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=d)
        _run(openssl, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=d)
    return Pki(d / "ca.crt", d / "server.crt", d / "server.key", d / "client.crt", d / "client.key")


# ------------------------------------------------------------------------------------------ broker

@dataclass
class TlsBroker:
    pki: Pki
    password_port: int
    cert_port: int
    process: MosquittoBroker

    def log_text(self) -> str:
        return self.process.log_text()


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    d = tmp_path_factory.mktemp("mqtt-tls")
    pki = make_pki(d)
    passwd = d / "passwd"
    _run(_need("mosquitto_passwd"), "-b", "-c", passwd, USER, PASSWORD, cwd=d)
    password_port, cert_port = free_port(), free_port()
    while cert_port == password_port:
        cert_port = free_port()
    tls = [f"cafile {pki.ca}", f"certfile {pki.server_cert}", f"keyfile {pki.server_key}"]
    broker = MosquittoBroker(d, binary=_need("mosquitto"), persistence=False,
                             log_types=("error", "warning", "notice", "information"), listeners={
                                 password_port: [*tls, "allow_anonymous false", f"password_file {passwd}"],
                                 cert_port: [*tls, "require_certificate true", "use_identity_as_username true",
                                             "allow_anonymous false"]})
    with broker:
        yield TlsBroker(pki, password_port, cert_port, broker)


# ------------------------------------------------------------------------------------------ helpers

def patch(i: int) -> PatchUpdate:
    return PatchUpdate(phi=np.arange(16, dtype=np.float32) * i, steps=i, samples=32 * i, holdout_acc=0.75,
                       loss=1.0 / (i + 1))


class TlsSubscriber:
    """A cloud-side paho client over TLS + password that decodes everything on one topic."""

    def __init__(self, broker: TlsBroker, topic: str) -> None:
        self.messages: list[Message] = []
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"tls-sub-{time.monotonic_ns()}")
        self.client.tls_set(ca_certs=str(broker.pki.ca))
        self.client.username_pw_set(USER, PASSWORD)
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = lambda _c, _u, msg: self.messages.append(decode(msg.topic, msg.payload))
        self.client.connect(HOST, broker.password_port, keepalive=10)
        self.client.loop_start()
        assert self._subscribed.wait(5), f"TLS subscriber got no SUBACK; broker log: {broker.log_text()[-1500:]}"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def make_link(broker: TlsBroker, tmp_path: Path, *, port: int, device_id: str = "dev-1",
              outbox: Outbox | None = None, **tls: str | None) -> DeviceLink:
    settings = LinkSettings(fleet=FLEET, device_id=device_id, host=HOST, port=port, keepalive=10,
                            reconnect_min_delay=1, reconnect_max_delay=2, tls_ca=str(broker.pki.ca), **tls)
    box = outbox if outbox is not None else Outbox(tmp_path / f"{device_id}-outbox.sqlite")
    return DeviceLink(settings, box, base_version="b1", variant_id="v50")


def patch_topic(device_id: str) -> str:
    return device_topic(FLEET, device_id, Channel.PATCH)


# ------------------------------------------------------------------------------------ the broker itself

def test_server_certificate_verifies_for_127_0_0_1_against_the_test_ca(tls_broker: TlsBroker) -> None:
    """Guards the fixture: hostname checking is on (paho's default), so the SAN must name the IP."""
    ctx = ssl.create_default_context(cafile=str(tls_broker.pki.ca))
    with socket.create_connection((HOST, tls_broker.password_port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname=HOST) as tls_sock:
        assert tls_sock.version() in ("TLSv1.2", "TLSv1.3")
        cert = tls_sock.getpeercert()
    assert ("IP Address", HOST) in cert["subjectAltName"]


# --------------------------------------------------------------------------------- TLS + password

def test_link_publishes_patch_over_tls_with_password(tls_broker: TlsBroker, tmp_path: Path) -> None:
    sub = TlsSubscriber(tls_broker, patch_topic("dev-1"))
    link = make_link(tls_broker, tmp_path, port=tls_broker.password_port, username=USER, password=PASSWORD)
    try:
        link.start()
        assert link.wait_connected(10), f"link did not connect over TLS: {tls_broker.log_text()[-1500:]}"
        sent = link.publish_patch(patch(3))
        assert link.wait_drained(10), f"outbox not drained ({len(link.outbox)} left)"
        wait_until(lambda: len(sub.messages) == 1, 5, "the subscriber to receive the patch")
        got = sub.messages[0]
        assert got.content_hash == sent.content_hash
        assert isinstance(got.payload, PatchUpdate)
        np.testing.assert_array_equal(got.payload.phi, patch(3).phi)
        assert link.socket_nodelay(), "TCP_NODELAY must reach the socket under the TLS wrapper too"
    finally:
        link.stop()
        sub.close()


def test_wrong_password_is_refused_logged_and_loses_nothing(tls_broker: TlsBroker, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edgepatch.device.link")
    box = Outbox(tmp_path / "dev-2-outbox.sqlite")
    bad = make_link(tls_broker, tmp_path, port=tls_broker.password_port, device_id="dev-2", outbox=box,
                    username=USER, password="not-the-password")
    sent = bad.publish_patch(patch(5))  # queued on disk before any connection exists
    bad.start()
    try:
        wait_until(lambda: any("refused" in r.getMessage() for r in caplog.records), 10,
                   "the link to log the refused connection")
        assert not bad.wait_connected(0.5)
    finally:
        bad.stop()
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert refusals[0].levelno == logging.ERROR
    reason = refusals[0].getMessage()
    assert str(tls_broker.password_port) in reason
    assert "user name or password" in reason.lower() or "not authorized" in reason.lower(), reason
    assert len(box) == 1 and box.pending()[0].topic == patch_topic("dev-2"), "the patch must stay in the outbox"

    # Nothing lost: the same outbox with the right password delivers the very same message.
    sub = TlsSubscriber(tls_broker, patch_topic("dev-2"))
    good = make_link(tls_broker, tmp_path, port=tls_broker.password_port, device_id="dev-2", outbox=box,
                     username=USER, password=PASSWORD)
    try:
        good.start()
        assert good.wait_connected(10)
        assert good.wait_drained(10)
        wait_until(lambda: len(sub.messages) == 1, 5, "the queued patch to arrive")
        assert sub.messages[0].content_hash == sent.content_hash
    finally:
        good.stop()
        sub.close()


# ----------------------------------------------------------------------------- client certificates

def test_link_with_client_certificate_connects_and_publishes(tls_broker: TlsBroker, tmp_path: Path) -> None:
    sub = TlsSubscriber(tls_broker, patch_topic("dev-3"))  # same broker, other listener: topics are shared
    pki = tls_broker.pki
    link = make_link(tls_broker, tmp_path, port=tls_broker.cert_port, device_id="dev-3",
                     tls_cert=str(pki.client_cert), tls_key=str(pki.client_key))
    try:
        link.start()
        assert link.wait_connected(10), f"client-cert link did not connect: {tls_broker.log_text()[-1500:]}"
        sent = link.publish_patch(patch(7))
        assert link.wait_drained(10)
        wait_until(lambda: len(sub.messages) == 1, 5, "the subscriber to receive the patch")
        assert sub.messages[0].content_hash == sent.content_hash
    finally:
        link.stop()
        sub.close()
    # use_identity_as_username: the broker saw the certificate's CN, proof the cert was what authenticated us.
    assert "u'device-cert-1'" in tls_broker.log_text()


def test_link_without_client_certificate_is_refused(tls_broker: TlsBroker, tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edgepatch.device.link")
    port = str(tls_broker.cert_port)

    def tls_failures() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and port in r.getMessage()
                and ("ssl" in r.getMessage().lower() or "certificate" in r.getMessage().lower())]

    link = make_link(tls_broker, tmp_path, port=tls_broker.cert_port, device_id="dev-4")
    link.publish_patch(patch(1))
    link.start()
    try:
        wait_until(lambda: bool(tls_failures()), 10, "the link to log why the broker refused it")
        assert not link.connected, "a link without a client certificate must not connect"
    finally:
        link.stop()
    assert "certificate" in tls_failures()[0].lower(), tls_failures()
    assert len(link.outbox) == 1, "the unsent patch must stay in the outbox"


def test_link_rejects_a_broker_its_ca_did_not_sign(tls_broker: TlsBroker, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """The handshake itself fails (in paho's connect, not on a later read): the reason is still logged."""
    caplog.set_level(logging.INFO, logger="edgepatch.device.link")
    _run(_need("openssl"), "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", "other.key", "-out", "other-ca.crt", "-days", "2", "-subj", "/CN=some-other-ca", cwd=tmp_path)
    settings = LinkSettings(fleet=FLEET, device_id="dev-6", host=HOST, port=tls_broker.password_port,
                            reconnect_min_delay=1, reconnect_max_delay=2, tls_ca=str(tmp_path / "other-ca.crt"),
                            username=USER, password=PASSWORD)
    link = DeviceLink(settings, Outbox(tmp_path / "dev-6-outbox.sqlite"), base_version="b1", variant_id="v50")
    link.start()
    try:
        wait_until(lambda: any("CERTIFICATE_VERIFY_FAILED" in r.getMessage() for r in caplog.records), 10,
                   "the link to log the failed server verification")
        assert not link.connected
    finally:
        link.stop()
    failure = next(r for r in caplog.records if "CERTIFICATE_VERIFY_FAILED" in r.getMessage())
    assert failure.levelno == logging.WARNING and str(tls_broker.password_port) in failure.getMessage()


# ------------------------------------------------------------------------------------------- ingest

def test_ingest_over_tls_with_password_stores_the_patch(tls_broker: TlsBroker, tmp_path: Path) -> None:
    store = PatchStore(tmp_path / "store.sqlite")
    service = IngestService(store, IngestSettings(host=HOST, port=tls_broker.password_port, fleet=FLEET,
                                                  tls_ca=str(tls_broker.pki.ca), username=USER,
                                                  password=PASSWORD, client_id="ingest-tls",
                                                  session_expiry_s=0))
    link = make_link(tls_broker, tmp_path, port=tls_broker.password_port, device_id="dev-5",
                     username=USER, password=PASSWORD)
    service.start()
    try:
        assert service.wait_subscribed(10), f"ingest did not subscribe over TLS: {tls_broker.log_text()[-1500:]}"
        link.start()
        assert link.wait_connected(10)
        sent = link.publish_patch(patch(9))
        assert link.wait_drained(10)
        wait_until(lambda: sent.content_hash in store.patch_hashes(), 10, "the patch to be committed")
        phi, meta = store.latest_patches(fleet=FLEET)["dev-5"]
        np.testing.assert_array_equal(phi, patch(9).phi)
        assert meta["seq"] == sent.seq and meta["variant_id"] == "v50"
        wait_until(lambda: service.stats.acked >= 1, 5, "the ingest to acknowledge after commit")
    finally:
        link.stop()
        service.stop()
        store.close()


# ------------------------------------------------------------------------------ no password in clear text

def test_a_password_is_never_sent_over_plain_mqtt() -> None:
    """Device link, ingest, Canoe link and companion settings refuse credentials on a plain mqtt:// link
    before any socket is opened (issue 11): the listener below never sees a connection."""
    from edgepatch.device.canoe_link import CanoeLink
    from edgepatch.protocol.mqtt import MqttConfigError, MqttSettings

    with socket.socket() as server:
        server.bind((HOST, 0))
        server.listen()
        server.settimeout(0.3)
        port = server.getsockname()[1]
        attempts = [
            lambda: LinkSettings(fleet=FLEET, device_id="d", host=HOST, port=port, username=USER, password=PASSWORD),
            lambda: IngestSettings(host=HOST, port=port, username=USER, password=PASSWORD),
            lambda: CanoeLink(FLEET, "d", settings=MqttSettings.from_url(f"mqtt://{HOST}:{port}", client_id="c",
                                                                         username=USER, password=PASSWORD)),
        ]
        for attempt in attempts:
            with pytest.raises(MqttConfigError, match=r"refusing to send the MQTT password .* plain mqtt://"):
                attempt()
        with pytest.raises(TimeoutError):
            server.accept()
    # The same credentials over TLS are accepted (the settings only; the broker tests above connect).
    assert LinkSettings(fleet=FLEET, device_id="d", host=HOST, port=port, tls=True, username=USER,
                        password=PASSWORD).mqtt().tls
