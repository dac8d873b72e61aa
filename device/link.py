"""The device's MQTT link to the cloud (paho-mqtt 2.x, callback API VERSION2).

Everything outgoing goes through the on-disk `Outbox`: `send()` builds a message (persistent `seq`,
content hash), commits it to disk, and publishes it at QoS 1 when connected. An entry leaves the outbox
only when the broker's PUBACK for its packet id arrives (`on_publish`). While the broker is unreachable,
messages pile up on disk; paho's loop thread reconnects with exponential backoff and `on_connect` flushes
the outbox. Delivery is at-least-once: receivers drop duplicates by `content_hash`.

Presence: the last will is a retained DeviceState "offline" (reason "will") on `<device>/lwt`; every
(re)connect publishes a retained DeviceState "online" on `<device>/state` and clears the retained will
(zero-length retained publish), and a clean `stop()` publishes "offline" (reason "disconnected") on `state`.
A cloud therefore reads a device as offline when the lwt topic holds a will or the state says offline.

Incoming: the fleet's retained bundle topic. Each announcement is fully validated (`decode`); malformed
ones are logged with their reason, counted in `rejects`, and dropped; exceptions never reach paho's loop.

MQTT 5 or 3.1.1 is a setting on one code path; with 5 the link adds a session expiry, message expiry
(per channel) and user properties (schema, kind).
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgepatch.protocol.messages import (
    CHANNEL_KINDS,
    SCHEMA_VERSION,
    DeviceState,
    Message,
    MessageError,
    Metrics,
    PatchUpdate,
    Payload,
    decode,
    encode,
    make_message,
)
from edgepatch.protocol.topics import Channel, TopicError, bundle_topic, check_name, device_topic, parse_topic
from edgepatch.protocol.transport import set_tcp_nodelay

from .outbox import Outbox, OutboxEntry

log = logging.getLogger(__name__)

Protocol = Literal["mqttv5", "mqttv311"]
_PAHO_PROTOCOL = {"mqttv5": mqtt.MQTTv5, "mqttv311": mqtt.MQTTv311}


@dataclass(frozen=True)
class LinkSettings:
    fleet: str
    device_id: str
    host: str = "127.0.0.1"
    port: int = 1883
    protocol: Protocol = "mqttv5"
    client_id: str | None = None  # default: edgepatch-<fleet>-<device>; stable so the broker session persists
    keepalive: int = 30
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    username: str | None = None
    password: str | None = None
    reconnect_min_delay: int = 1
    reconnect_max_delay: int = 60
    session_expiry_s: int = 7 * 24 * 3600  # MQTT 5: broker keeps our subscription across outages
    metrics_expiry_s: int | None = 3600  # MQTT 5: stale metrics are worthless, let the broker drop them
    patch_expiry_s: int | None = None  # patches never expire

    def __post_init__(self) -> None:
        check_name(self.fleet, "fleet")
        check_name(self.device_id, "device id")
        if self.protocol not in _PAHO_PROTOCOL:
            raise ValueError(f"protocol must be one of {sorted(_PAHO_PROTOCOL)}, got {self.protocol!r}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port {self.port} out of range")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if not 0 < self.reconnect_min_delay <= self.reconnect_max_delay:
            raise ValueError("need 0 < reconnect_min_delay <= reconnect_max_delay")

    @property
    def resolved_client_id(self) -> str:
        return self.client_id or f"edgepatch-{self.fleet}-{self.device_id}"


BundleCallback = Callable[[Message], None]


class DeviceLink:
    def __init__(self, settings: LinkSettings, outbox: Outbox, *, base_version: str, variant_id: str,
                 on_bundle: BundleCallback | None = None) -> None:
        self.settings = settings
        self.outbox = outbox
        self.base_version = base_version
        self.variant_id = variant_id
        self.on_bundle = on_bundle
        self.rejects: Counter[str] = Counter()  # bundle announcements dropped, by MessageError reason
        self._connected = threading.Event()
        self._ack_event = threading.Condition()  # notified after every outbox ack (wait_drained)
        self._started = False
        self._lock = threading.Lock()  # guards the maps below; never held while calling into paho
        self._flush_lock = threading.Lock()  # one flush at a time, so no entry is handed to paho twice
        self._by_mid: dict[int, int] = {}  # paho mid -> outbox id, for entries paho owns (sends/resends)
        self._sent_ids: set[int] = set()
        self._early_acks: dict[int, ReasonCode] = {}  # PUBACKs that beat publish() returning its mid
        self._held_ids: set[int] = set()  # refused by the broker: retried on the next connect only
        self._v5 = settings.protocol == "mqttv5"
        self._client = self._make_client()

    # ------------------------------------------------------------------------------------------ set-up

    def _make_client(self) -> mqtt.Client:
        s = self.settings
        client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=s.resolved_client_id,
            protocol=_PAHO_PROTOCOL[s.protocol],
            # 3.1.1: a persistent session keeps our bundle subscription; 5 uses clean_start + session expiry.
            clean_session=None if self._v5 else False,
        )
        if s.tls_ca or s.tls_cert:
            client.tls_set(ca_certs=s.tls_ca, certfile=s.tls_cert, keyfile=s.tls_key)
        if s.username is not None:
            client.username_pw_set(s.username, s.password)
        client.reconnect_delay_set(min_delay=s.reconnect_min_delay, max_delay=s.reconnect_max_delay)
        client.on_socket_open = set_tcp_nodelay
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_log = self._on_paho_log
        return client

    def start(self) -> None:
        """Connect in the background (works while the broker is down: paho keeps retrying)."""
        if self._started:
            raise RuntimeError("DeviceLink already started")
        s = self.settings
        will = self._message(DeviceState(state="offline", last_seen=time.time(), reason="will"),
                             self.outbox.next_seq())
        self._client.will_set(will.topic(Channel.LWT), encode(will), qos=1, retain=True)
        props = None
        if self._v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = s.session_expiry_s
        self._client.connect_async(s.host, s.port, keepalive=s.keepalive,
                                   clean_start=False if self._v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
                                   properties=props)
        self._client.loop_start()
        self._started = True

    def stop(self, timeout: float = 5.0) -> None:
        """Say "offline" (if connected), wait up to `timeout` for the outbox to drain, disconnect cleanly."""
        if not self._started:
            return
        if self._connected.is_set():
            self.send(DeviceState(state="offline", last_seen=time.time(), reason="disconnected"), retain=True)
            self.wait_drained(timeout)
        self._client.disconnect()
        self._client.loop_stop()
        self._connected.clear()
        self._started = False

    # ------------------------------------------------------------------------------------------ public

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def wait_drained(self, timeout: float) -> bool:
        """True once every outbox entry has been acknowledged by the broker."""
        deadline = time.monotonic() + timeout
        with self._ack_event:
            while len(self.outbox):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                # Short slices: entries can also leave by expiry or eviction, which do not notify.
                self._ack_event.wait(min(remaining, 0.1))
        return True

    def send(self, payload: Payload, *, channel: Channel | None = None, retain: bool = False) -> Message:
        """Build a message (next persistent seq), commit it to the outbox, publish if connected."""
        ch = channel or type(payload).CHANNEL
        expiry = {Channel.METRICS: self.settings.metrics_expiry_s,
                  Channel.PATCH: self.settings.patch_expiry_s}.get(ch)
        built: list[Message] = []

        def build(seq: int) -> tuple[str, bytes]:
            built.append(self._message(payload, seq))
            return built[0].topic(ch), encode(built[0])

        self.outbox.enqueue_numbered(build, qos=1, retain=retain, expiry_s=expiry)
        if self._connected.is_set():
            self._flush()
        return built[0]

    def publish_patch(self, update: PatchUpdate) -> Message:
        return self.send(update)

    def publish_metrics(self, values: Mapping[str, float]) -> Message:
        return self.send(Metrics(values=dict(values)))

    def publish_state(self, state: str = "online", reason: str = "connected") -> Message:
        return self.send(DeviceState(state=state, last_seen=time.time(), reason=reason), retain=True)

    def socket_nodelay(self) -> bool:
        """Whether TCP_NODELAY is set on the live socket (for tests and diagnostics)."""
        sock = self._client.socket()
        getsockopt = getattr(sock, "getsockopt", None)  # a TCP socket or an SSL socket wrapping one
        return bool(getsockopt is not None and getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    # ---------------------------------------------------------------------------------------- internals

    def _message(self, payload: Payload, seq: int) -> Message:
        return make_message(payload, device_id=self.settings.device_id, fleet=self.settings.fleet,
                            base_version=self.base_version, variant_id=self.variant_id, seq=seq)

    def _properties(self, entry: OutboxEntry) -> Properties | None:
        if not self._v5:
            return None
        props = Properties(PacketTypes.PUBLISH)
        props.PayloadFormatIndicator = 1  # UTF-8
        props.ContentType = "application/json"
        try:
            kind = CHANNEL_KINDS[parse_topic(entry.topic).channel]
        except TopicError:
            kind = "unknown"
        props.UserProperty = [("schema", str(SCHEMA_VERSION)), ("kind", kind)]
        if entry.expiry_s is not None:
            # Count the time spent waiting on disk, so an old message does not live longer than meant.
            props.MessageExpiryInterval = max(1, int(entry.expiry_s - (time.time() - entry.enqueued_at)))
        return props

    def _flush(self) -> None:
        with self._flush_lock:
            for entry in self.outbox.pending():
                with self._lock:
                    if entry.id in self._sent_ids or entry.id in self._held_ids:
                        continue
                if entry.expiry_s is not None and time.time() - entry.enqueued_at > entry.expiry_s:
                    log.info("outbox entry %d on %s expired before it could be sent", entry.id, entry.topic)
                    self.outbox.ack(entry.id)
                    continue
                try:
                    info = self._client.publish(entry.topic, entry.payload, qos=entry.qos, retain=entry.retain,
                                                properties=self._properties(entry))
                except (ValueError, TypeError) as exc:  # paho refuses it outright: keep it, say why
                    log.error("cannot publish outbox entry %d on %s: %s", entry.id, entry.topic, exc)
                    with self._lock:
                        self._held_ids.add(entry.id)
                    continue
                if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                    # Not queued by paho (e.g. queue full): leave it on disk for the next flush.
                    log.warning("publish of outbox entry %d failed: %s", entry.id, mqtt.error_string(info.rc))
                    continue
                # NO_CONN still queues a QoS>0 message inside paho, which sends it on reconnect.
                with self._lock:
                    self._sent_ids.add(entry.id)
                    early = self._early_acks.pop(info.mid, None)
                    if early is None:
                        self._by_mid[info.mid] = entry.id
                if early is not None:
                    self._acked(entry.id, early)

    def _acked(self, entry_id: int, reason: ReasonCode) -> None:
        with self._lock:
            self._sent_ids.discard(entry_id)
            if reason.is_failure:
                self._held_ids.add(entry_id)
        if reason.is_failure:
            log.error("broker refused outbox entry %d: %s (kept; retried after reconnect)", entry_id, reason)
        else:
            self.outbox.ack(entry_id)
            with self._ack_event:
                self._ack_event.notify_all()

    # ------------------------------------------------------------------------------- paho callbacks
    # These run on paho's loop thread: they must never raise.

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
                    properties: Any) -> None:
        try:
            if reason.is_failure:
                log.error("broker %s:%s refused connection: %s", self.settings.host, self.settings.port, reason)
                return
            log.info("connected to %s:%s (session present: %s)", self.settings.host, self.settings.port,
                     getattr(flags, "session_present", None))
            with self._lock:
                self._held_ids.clear()
            client.subscribe(bundle_topic(self.settings.fleet), qos=1)
            self._connected.set()
            # Clear a will left by an earlier unclean drop, then announce presence.
            self.outbox.enqueue(device_topic(self.settings.fleet, self.settings.device_id, Channel.LWT), b"",
                                qos=1, retain=True)
            self.publish_state("online", "connected")  # flushes everything pending, oldest first
        except Exception:
            log.exception("error in on_connect")

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        # paho calls this from inside its `except OSError`, so the exception in flight is the reason
        # (connection refused, TLS handshake or certificate verification failure, ...).
        log.warning("cannot connect to broker %s:%s: %s (retrying)", self.settings.host, self.settings.port,
                    sys.exc_info()[1] or "unknown error")

    def _on_paho_log(self, client: mqtt.Client, userdata: Any, level: int, buf: str) -> None:
        # paho reports socket/TLS errors after the handshake (e.g. the broker's TLS 1.3 alert that a client
        # certificate is required) only through its log; on_disconnect just says "Unspecified error".
        if level == mqtt.MQTT_LOG_ERR:
            log.error("MQTT client error with broker %s:%s: %s", self.settings.host, self.settings.port, buf)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
                       properties: Any) -> None:
        self._connected.clear()
        log.info("disconnected from %s:%s: %s (queued on disk: %d)", self.settings.host, self.settings.port,
                 reason, len(self.outbox))

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode,
                    properties: Any) -> None:
        try:
            with self._lock:
                entry_id = self._by_mid.pop(mid, None)
                if entry_id is None:
                    self._early_acks[mid] = reason
                    return
            self._acked(entry_id, reason)
        except Exception:
            log.exception("error in on_publish")

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            if not message.payload:
                log.info("retained bundle announcement on %s was cleared", message.topic)
                return
            try:
                announcement = decode(message.topic, message.payload)
            except MessageError as exc:
                self.rejects[exc.reason] += 1
                log.warning("dropped bundle announcement on %s: %s", message.topic, exc)
                return
            if self.on_bundle is not None:
                self.on_bundle(announcement)
        except Exception:
            log.exception("error handling message on %s", getattr(message, "topic", "?"))
