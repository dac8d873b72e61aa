"""The MQTT client seam (stdlib only): settings, the protocol version as ONE enum, and a small client interface.

Every MQTT client of edgepatch (device link, Canoe target and helper, federated client and server,
companion ingest, publisher and Canoe relay, the simulation) is an `MqttClient`:

    client = make_client(MqttSettings.from_url("mqtts://broker:8883", client_id="edgepatch-lab-dev-1",
                                               username="dev-1", password=secret, tls_ca="ca.pem"))
    client.subscribe("edgepatch/v1/lab/bundle", on_bundle)     # re-subscribed on every (re)connect
    client.connect(will=Will(topic, payload))                  # background; keeps retrying while down
    client.publish(topic, data, qos=1, retain=False, on_done=lambda ok, why: ...)
    client.disconnect()

Implementations: `mqtt_paho.PahoClient` (the only module that imports paho) and `mqtt_memory.MemoryClient`
on a `MemoryBroker` (an in-memory twin for unit tests: sessions, retained messages, wills, shared
subscriptions, manual acks and redelivery, outages). Handlers and `on_done` run on the client's own
thread (like paho's loop thread) and never propagate exceptions.

Security (issue 11): a password is never sent over plain `mqtt://` — `MqttSettings` refuses it with a
clear error; client ids are always explicit and stable (the broker's session and ACLs key on them).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .topics import topic_matches

if TYPE_CHECKING:
    from .mqtt_memory import MemoryBroker

log = logging.getLogger("edgepatch.mqtt")
MAX_ROUTES = 65536  # topics whose matching handlers a client remembers (then it starts over)


class MqttConfigError(ValueError):
    """Settings that must not be used to connect (the text says which and why)."""


class MqttVersion(Enum):
    V5 = "5"
    V311 = "3.1.1"

    @classmethod
    def parse(cls, value: MqttVersion | str | int) -> MqttVersion:
        """Accepts every spelling the project has used: 5, "5", "mqttv5", "3.1.1", "311", "mqttv311"."""
        if isinstance(value, MqttVersion):
            return value
        key = str(value).strip().lower().removeprefix("mqtt").removeprefix("v")
        found = {"5": cls.V5, "3.1.1": cls.V311, "311": cls.V311}.get(key)
        if found is None:
            raise MqttConfigError(f"MQTT version {value!r} is not supported: use 5 or 3.1.1")
        return found


def split_broker_url(url: str) -> tuple[str, int, bool]:
    """`mqtt://host:port` (plain, default 1883) or `mqtts://host:port` (TLS, default 8883) -> (host, port, tls)."""
    parsed = urllib.parse.urlparse(url if "://" in url else f"mqtt://{url}")
    try:
        port = parsed.port
    except ValueError:
        port = -1
    if parsed.scheme not in ("mqtt", "mqtts", "tcp") or not parsed.hostname or port == -1:
        raise MqttConfigError(f"broker {url!r}: expected mqtt://host:port or mqtts://host:port")
    tls = parsed.scheme == "mqtts"
    return parsed.hostname, port or (8883 if tls else 1883), tls


@dataclass(frozen=True)
class MqttSettings:
    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = ""  # stable and unique per client: the broker's session (and ACLs) key on it
    version: MqttVersion = MqttVersion.V5
    tls: bool = False  # implied by tls_ca / tls_cert; with none of them: the system's CAs
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    keepalive: int = 30
    persistent: bool = False  # keep the session (subscriptions, queued QoS 1) across disconnects
    session_expiry_s: int = 7 * 24 * 3600  # MQTT 5, persistent sessions only
    receive_maximum: int | None = None  # MQTT 5: unacked messages the broker may have in flight to us
    manual_ack: bool = False  # PUBACK only when the application calls ack() (e.g. after a commit)
    max_packet_bytes: int | None = None  # MQTT 5: the broker must not send us bigger packets (it drops them)
    reconnect_min_delay: float = 1.0
    reconnect_max_delay: float = 60.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "version", MqttVersion.parse(self.version))
        object.__setattr__(self, "tls", bool(self.tls or self.tls_ca or self.tls_cert))
        if not self.client_id:
            raise MqttConfigError("an MQTT client needs an explicit, stable client id")
        if not 0 < self.port < 65536:
            raise MqttConfigError(f"port {self.port} out of range")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise MqttConfigError("tls_cert and tls_key go together")
        if not 0 < self.reconnect_min_delay <= self.reconnect_max_delay:
            raise MqttConfigError("need 0 < reconnect_min_delay <= reconnect_max_delay")
        if self.max_packet_bytes is not None and not 1024 <= self.max_packet_bytes <= 268_435_455:
            raise MqttConfigError(f"max_packet_bytes {self.max_packet_bytes} outside [1024, 268435455]")
        if self.password is not None and not self.tls:
            raise MqttConfigError(
                f"refusing to send the MQTT password for {self.username!r} over plain mqtt:// to "
                f"{self.host}:{self.port}: use mqtts:// (TLS) or drop the password")

    @classmethod
    def from_url(cls, url: str, **kw: Any) -> MqttSettings:
        """`mqtt://host[:1883]` (plain) or `mqtts://host[:8883]` (TLS) plus any other field."""
        host, port, tls = split_broker_url(url)
        tls = tls or bool(kw.pop("tls", False))
        return cls(host=host, port=port, tls=tls, **kw)

    @classmethod
    def from_credentials(cls, folder: Path, client_id: str, broker: str | None = None, **kw: Any) -> MqttSettings:
        """A login from a credential folder `edgepatch cloud provision` wrote (username, password, ca.crt,
        broker.url): TLS with the fleet CA; the password is read from its file, never from a command line."""
        try:
            url = broker or (folder / "broker.url").read_text().strip()
            user = (folder / "username").read_text().strip()
            password = (folder / "password").read_text().strip()
        except OSError as exc:
            raise MqttConfigError(f"{folder} is not a credential folder: {exc.strerror}: {exc.filename}") from None
        return cls.from_url(url, client_id=client_id, username=user, password=password,
                            tls_ca=str(folder / "ca.crt"), **kw)

    def replace(self, **kw: Any) -> MqttSettings:
        return dataclasses.replace(self, **kw)

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


@dataclass(frozen=True)
class Will:
    """What the broker publishes for us when our connection drops uncleanly."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class Incoming:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    mid: int = 0  # packet id, for ack() under manual_ack
    connection: int = 0  # which connection brought it: an ack is only valid on that one


Handler = Callable[[Incoming], None]
PublishDone = Callable[[bool, str], None]  # (accepted by the broker, reason text)


class MqttClient(ABC):
    """The seam. Subclasses implement the abstract methods and call the `_on_*` helpers below."""

    def __init__(self, settings: MqttSettings) -> None:
        self.settings = settings
        self.connect_hooks: list[Callable[[bool], None]] = []  # (session present), after re-subscribing
        self.disconnect_hooks: list[Callable[[str], None]] = []
        self._subs: dict[str, tuple[Handler, int]] = {}
        self._routes: dict[str, list[Handler]] = {}  # topic -> handlers of the filters it matches
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._pending = threading.Condition()
        self._pending_count = 0
        self.connection = 0  # bumped on every successful connect

    # -- the interface ------------------------------------------------------------------------------
    @abstractmethod
    def connect(self, will: Will | None = None) -> None:
        """Connect in the background; retries with backoff while the broker is unreachable."""

    @abstractmethod
    def disconnect(self) -> None:
        """Clean disconnect (the broker discards the will) and stop the client's thread."""

    @abstractmethod
    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                expiry_s: int | None = None, user_properties: Sequence[tuple[str, str]] = (),
                on_done: PublishDone | None = None) -> bool:
        """Queue a publish; False when it was not queued (then `on_done` is never called). QoS > 0
        publishes made while disconnected are queued and sent on reconnect. MQTT 5 adds the expiry and
        user properties; 3.1.1 drops them."""

    @abstractmethod
    def ack(self, message: Incoming) -> bool:
        """PUBACK a message under manual_ack; False (nothing sent) when its connection is gone."""

    @abstractmethod
    def drop_connection(self) -> None:
        """Close the connection and reconnect (unacked messages are redelivered). Not from a handler."""

    @abstractmethod
    def _send_subscribe(self, filters: list[tuple[str, int]]) -> None: ...

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        """Deliver messages matching `topic_filter` to `handler`; kept across reconnects."""
        self._subs[topic_filter] = (handler, qos)
        self._routes = {}  # after _subs changed: a route computed from the old filters lands in the old dict
        if self._connected.is_set():
            self._subscribed.clear()
            self._send_subscribe([(topic_filter, qos)])

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def wait_subscribed(self, timeout: float) -> bool:
        """True once the broker granted every subscription on the current connection."""
        return self._subscribed.wait(timeout)

    def flush(self, timeout: float) -> bool:
        """Wait until every queued publish was acknowledged (or refused); True when none is left."""
        return wait_on(self._pending, lambda: self._pending_count == 0, timeout)

    # -- helpers for implementations ----------------------------------------------------------------
    def _on_connected(self, session_present: bool) -> None:
        """Call after bumping `self.connection` (before any message of the new connection is handled)."""
        self._connected.set()
        if self._subs:
            self._subscribed.clear()
            self._send_subscribe([(f, q) for f, (_, q) in self._subs.items()])
        else:
            self._subscribed.set()
        for hook in list(self.connect_hooks):
            self._safely(hook, session_present)

    def _on_disconnected(self, reason: str) -> None:
        self._connected.clear()
        self._subscribed.clear()
        for hook in list(self.disconnect_hooks):
            self._safely(hook, reason)

    def _on_message(self, message: Incoming) -> None:
        # The handlers of a topic, matched once per topic (at ingest rates matching every filter against
        # every message cost ~15 µs a message); bounded, since topics are per device.
        routes = self._routes
        handlers = routes.get(message.topic)
        if handlers is None:
            handlers = [h for f, (h, _) in list(self._subs.items()) if topic_matches(f, message.topic)]
            if len(routes) >= MAX_ROUTES:
                routes.clear()
            routes[message.topic] = handlers
        for handler in handlers:
            self._safely(handler, message)

    def _track(self, on_done: PublishDone | None) -> PublishDone:
        with self._pending:
            self._pending_count += 1

        def done(ok: bool, reason: str) -> None:
            with self._pending:
                self._pending_count -= 1
                self._pending.notify_all()
            if on_done is not None:
                self._safely(on_done, ok, reason)
        return done

    def _safely(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:  # a handler's bug must not kill the client's thread
            log.exception("MQTT client %s: error in callback %r", self.settings.client_id, fn)


def wait_on(condition: threading.Condition, done: Callable[[], bool], timeout: float, slice_s: float = 0.1
            ) -> bool:
    """Wait on `condition` until `done()` (True) or `timeout` (False). Short slices: state can also change
    without a notify (e.g. an outbox entry expiring)."""
    deadline = time.monotonic() + timeout
    with condition:
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            condition.wait(min(left, slice_s))
    return True


def make_client(settings: MqttSettings, broker: MemoryBroker | None = None) -> MqttClient:
    """The paho client for `settings`, or the in-memory twin on `broker`."""
    if broker is not None:
        from .mqtt_memory import MemoryClient

        return MemoryClient(settings, broker)
    from .mqtt_paho import PahoClient  # lazy: paho is imported by that module only

    return PahoClient(settings)
