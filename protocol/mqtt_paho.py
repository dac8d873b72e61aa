"""The paho-mqtt 2.x implementation of the MQTT seam (`mqtt.MqttClient`): the only module importing paho.

paho's loop thread (`loop_start`) reconnects with exponential backoff between the settings' delays;
handlers and publish acknowledgements run on it. TCP_NODELAY is set on every socket: QoS-1 round trips
stall ~40 ms on Nagle + delayed ACK without it (measured with amqtt, RUNTIME_FACTS).
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
from collections.abc import Sequence
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from .mqtt import Incoming, MqttClient, MqttSettings, MqttVersion, PublishDone, Will

log = logging.getLogger("edgepatch.mqtt")
_PROTOCOL = {MqttVersion.V5: paho.MQTTv5, MqttVersion.V311: paho.MQTTv311}
MAX_INFLIGHT_OUT = 1000  # QoS-1 publishes awaiting the broker's PUBACK (MQTT 5: at most what it grants)


def _nodelay(client: Any, userdata: Any, sock: Any) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError) as exc:  # e.g. a websocket wrapper: not fatal
        log.warning("could not set TCP_NODELAY: %s", exc)


class _PackedOnce(Properties):
    """Properties that never change after set-up, packed once: paho packs a publish's properties on every
    send, probing each of ~27 property names (~25 µs a publish at ingest rates)."""

    def pack(self) -> bytes:
        packed = self.__dict__.get("_packed_once")
        if packed is None:
            packed = super().pack()
            object.__setattr__(self, "_packed_once", packed)  # paho's __setattr__ takes property names only
        return packed


class _PahoErrors(logging.LoggerAdapter):  # type: ignore[type-arg]
    """paho's log, errors only. paho reports socket/TLS errors after the handshake (e.g. the broker's TLS 1.3
    alert that a client certificate is required) only through its log; on_disconnect just says "Unspecified
    error". Its "not connected" errors while we close on purpose are noise, not errors."""

    def __init__(self, client: PahoClient) -> None:
        super().__init__(log, {})
        self.client = client

    def isEnabledFor(self, level: int) -> bool:  # noqa: N802 - logging's name
        return level >= logging.ERROR and not self.client._closing

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if self.isEnabledFor(level):
            log.error("MQTT client error with broker %s: %s", self.client.settings.url, str(msg) % args)


class PahoClient(MqttClient):
    def __init__(self, settings: MqttSettings) -> None:
        super().__init__(settings)
        s = settings
        self._v5 = s.version is MqttVersion.V5
        self._client = paho.Client(
            callback_api_version=paho.CallbackAPIVersion.VERSION2, client_id=s.client_id,
            protocol=_PROTOCOL[s.version], manual_ack=s.manual_ack,
            # 3.1.1 keeps the session with clean_session=False; 5 uses clean_start + session expiry.
            clean_session=None if self._v5 else not s.persistent)
        if s.tls:
            self._client.tls_set(ca_certs=s.tls_ca, certfile=s.tls_cert, keyfile=s.tls_key)
        if s.username is not None:
            self._client.username_pw_set(s.username, s.password)
        self._client.reconnect_delay_set(min_delay=max(1, round(s.reconnect_min_delay)),
                                         max_delay=max(1, round(s.reconnect_max_delay)))
        c = self._client
        c.on_socket_open = _nodelay
        c.on_connect, c.on_connect_fail, c.on_disconnect = self._paho_connect, self._paho_connect_fail, self._paho_gone
        c.on_publish, c.on_message, c.on_subscribe = self._paho_published, self._paho_message, self._paho_subscribed
        # Errors only, through a logger: with an on_log callback paho formats a debug line (properties
        # included) for every packet, ~20 µs each at ingest rates; a logger below ERROR skips the formatting.
        c.enable_logger(_PahoErrors(self))
        self._lock = threading.Lock()  # never held while calling into paho (its callbacks hold its own locks)
        self._waiting: dict[int, PublishDone] = {}
        self._early: dict[int, tuple[bool, str]] = {}  # PUBACKs that beat publish() returning its mid
        self._plain_props = _PackedOnce(PacketTypes.PUBLISH)
        self._plain_props.PayloadFormatIndicator = 1  # UTF-8 JSON
        self._plain_props.ContentType = "application/json"
        self._started = False
        self._closing = False  # set while we close on purpose: paho's "not connected" errors then are noise

    # -- interface ----------------------------------------------------------------------------------
    def connect(self, will: Will | None = None) -> None:
        if self._started:
            raise RuntimeError(f"MQTT client {self.settings.client_id} already connected")
        if will is not None:
            self._client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        self._connect_async()
        self._client.loop_start()
        self._started = True

    def _close_socket(self) -> None:
        self._closing = True  # paho logs "not connected" errors while we close on purpose: not errors
        try:
            self._client.disconnect()
            self._client.loop_stop()
        finally:
            self._closing = False

    def _connect_async(self) -> None:
        s = self.settings
        props = None
        if self._v5:
            props = Properties(PacketTypes.CONNECT)
            if s.persistent:
                props.SessionExpiryInterval = s.session_expiry_s
            if s.receive_maximum is not None:
                props.ReceiveMaximum = s.receive_maximum
            if s.max_packet_bytes is not None:
                props.MaximumPacketSize = s.max_packet_bytes
        clean_start: Any = (not s.persistent) if self._v5 else paho.MQTT_CLEAN_START_FIRST_ONLY
        self._client.connect_async(s.host, s.port, keepalive=s.keepalive, clean_start=clean_start, properties=props)

    def disconnect(self) -> None:
        if not self._started:
            return
        self._close_socket()
        self._started = False
        if self._connected.is_set():  # paho's own on_disconnect may already have said so
            self._on_disconnected("disconnected")

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                expiry_s: int | None = None, user_properties: Sequence[tuple[str, str]] = (),
                on_done: PublishDone | None = None) -> bool:
        props = None
        # Only a JSON envelope ("{...}") claims UTF-8 JSON: binary frames (protocol/frame.py, "EPB...") are not
        # UTF-8, and MQTT 5 lets a receiver refuse a payload that breaks its format indicator.
        is_json = payload[:1] == b"{"
        if self._v5 and payload and not user_properties and expiry_s is None:
            props = self._plain_props if is_json else None  # shared, never-mutated object (~30 µs a publish)
        elif self._v5:
            props = Properties(PacketTypes.PUBLISH)
            if is_json:
                props.PayloadFormatIndicator = 1  # UTF-8 JSON
                props.ContentType = "application/json"
            if user_properties:
                props.UserProperty = list(user_properties)
            if expiry_s is not None:
                props.MessageExpiryInterval = max(1, int(expiry_s))
        try:
            info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        except (ValueError, TypeError) as exc:  # paho refuses it outright (topic, size): say why
            log.error("cannot publish on %s: %s", topic, exc)
            return False
        # NO_CONN still queues a QoS>0 message inside paho, which sends it on reconnect.
        if info.rc != paho.MQTT_ERR_SUCCESS and not (info.rc == paho.MQTT_ERR_NO_CONN and qos > 0):
            log.warning("publish on %s not queued: %s", topic, paho.error_string(info.rc))
            return False
        done = self._track(on_done)
        with self._lock:
            early = self._early.pop(info.mid, None)
            if early is None:
                self._waiting[info.mid] = done
        if early is not None:
            done(*early)
        return True

    def ack(self, message: Incoming) -> bool:
        if not self.settings.manual_ack:
            return True
        if message.connection != self.connection or not self.connected or message.qos == 0:
            return message.qos == 0
        return self._client.ack(message.mid, message.qos) == paho.MQTT_ERR_SUCCESS

    def drop_connection(self) -> None:
        # paho has no "reconnect now" for a running loop thread: stop it, and start over on the same
        # session (clean_start False / clean_session False keeps the unacked messages at the broker).
        self._close_socket()
        self._on_disconnected("dropped by the application")
        self._connect_async()
        self._client.loop_start()

    def _send_subscribe(self, filters: list[tuple[str, int]]) -> None:
        self._client.subscribe(filters)

    def nodelay(self) -> bool:
        """Whether TCP_NODELAY is set on the live socket (diagnostics and tests)."""
        sock = self._client.socket()
        getsockopt = getattr(sock, "getsockopt", None)  # a TCP socket or an SSL socket wrapping one
        return bool(getsockopt is not None and getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    # -- paho callbacks (loop thread) ------------------------------------------------------------------
    def _paho_connect(self, client: Any, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        if reason.is_failure:
            log.error("broker %s refused %s: %s", self.settings.url, self.settings.client_id, reason)
            return
        log.info("%s connected to %s (session present: %s)", self.settings.client_id, self.settings.url,
                 getattr(flags, "session_present", None))
        if self._v5:
            # Use the in-flight window the broker grants (CONNACK Receive Maximum; 65535 when absent), up
            # to MAX_INFLIGHT_OUT. paho keeps its own 20 otherwise: the ingest's PatchAcks (one per device
            # per batch) then queued inside paho behind broker round trips, growing its memory under load.
            # paho refuses its setter once connected, hence the attribute (it is read per publish).
            granted = getattr(props, "ReceiveMaximum", 65535) if props is not None else 65535
            self._client._max_inflight_messages = max(1, min(MAX_INFLIGHT_OUT, int(granted)))
        self.connection += 1
        self._on_connected(bool(getattr(flags, "session_present", False)))

    def _paho_connect_fail(self, client: Any, userdata: Any) -> None:
        # paho calls this from inside its `except OSError`, so the exception in flight is the reason
        # (connection refused, TLS handshake or certificate verification failure, ...).
        log.warning("cannot connect to broker %s: %s (retrying)", self.settings.url,
                    sys.exc_info()[1] or "unknown error")

    def _paho_gone(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if self._connected.is_set():
            log.info("%s disconnected from %s: %s", self.settings.client_id, self.settings.url, reason)
        self._on_disconnected(str(reason))

    def _paho_subscribed(self, client: Any, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        bad = [str(r) for r in reasons if r.is_failure]
        if bad:
            log.error("%s: subscription refused: %s", self.settings.client_id, bad)
            return
        self._subscribed.set()

    def _paho_published(self, client: Any, userdata: Any, mid: int, reason: ReasonCode, props: Any) -> None:
        result = (not reason.is_failure, str(reason))
        with self._lock:
            done = self._waiting.pop(mid, None)
            if done is None:
                self._early[mid] = result
                return
        done(*result)

    def _paho_message(self, client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        self._on_message(Incoming(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain), msg.mid,
                                  self.connection))
