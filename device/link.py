"""The device's MQTT link to the cloud, on the MQTT seam (`protocol/mqtt.py`: paho, or the in-memory twin).

Everything outgoing goes through the on-disk `Outbox`: `send()` builds a message (persistent `seq`,
content hash), commits it to disk, and publishes it at QoS 1 when connected. An entry leaves the outbox
only when the broker acknowledged it (the publish's `on_done`). While the broker is unreachable, messages
pile up on disk; the client reconnects with exponential backoff and the connect hook flushes the outbox.
Delivery is at-least-once: receivers drop duplicates by `content_hash`. (An application-level ack from
the companion, issue 12, would plug in at `_acked`: keep the entry until the companion's ack arrives.)

Presence: the last will is a retained DeviceState "offline" (reason "will") on `<device>/lwt`; every
(re)connect publishes a retained DeviceState "online" on `<device>/state` and clears the retained will
(zero-length retained publish), and a clean `stop()` publishes "offline" (reason "disconnected") on `state`.
A cloud therefore reads a device as offline when the lwt topic holds a will or the state says offline.

Incoming: the fleet's retained bundle topic. Each announcement is fully validated (`decode`); malformed
ones are logged with their reason, counted in `rejects`, and dropped; exceptions never reach the client.

MQTT 5 or 3.1.1 is one setting (`MqttVersion`); with 5 the session persists by expiry, metrics carry a
message expiry and every message the user properties `schema` and `kind`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from edgepatch.protocol.messages import (
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
from edgepatch.protocol.mqtt import (
    Incoming,
    MqttClient,
    MqttSettings,
    MqttVersion,
    Will,
    make_client,
    wait_on,
)
from edgepatch.protocol.topics import Channel, TopicError, bundle_topic, check_name, device_topic, parse_topic
from edgepatch.protocol.wire import CHANNEL_KINDS

from .outbox import Outbox, OutboxEntry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinkSettings:
    fleet: str
    device_id: str
    host: str = "127.0.0.1"
    port: int = 1883
    protocol: MqttVersion | str = MqttVersion.V5  # any spelling MqttVersion.parse accepts
    client_id: str | None = None  # default: edgepatch-<fleet>-<device>; stable so the broker session persists
    keepalive: int = 30
    tls: bool = False  # mqtts:// (implied by the TLS files)
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    reconnect_min_delay: int = 1
    reconnect_max_delay: int = 60
    session_expiry_s: int = 7 * 24 * 3600  # MQTT 5: broker keeps our subscription across outages
    metrics_expiry_s: int | None = 3600  # MQTT 5: stale metrics are worthless, let the broker drop them
    patch_expiry_s: int | None = None  # patches never expire
    # MQTT 5: the broker drops anything bigger for us (a 200 MiB retained "announcement" never reaches the
    # device); every valid message is far smaller (wire.MAX_MESSAGE_BYTES). 3.1.1 cannot say so: decode refuses.
    max_packet_bytes: int = 256 * 1024

    def __post_init__(self) -> None:
        check_name(self.fleet, "fleet")
        check_name(self.device_id, "device id")
        object.__setattr__(self, "protocol", MqttVersion.parse(self.protocol))
        self.mqtt()  # every connection rule (port, TLS pair, no password in clear) checked up front

    @property
    def resolved_client_id(self) -> str:
        return self.client_id or f"edgepatch-{self.fleet}-{self.device_id}"

    def mqtt(self) -> MqttSettings:
        return MqttSettings(host=self.host, port=self.port, client_id=self.resolved_client_id,
                            version=self.protocol, tls=self.tls, tls_ca=self.tls_ca, tls_cert=self.tls_cert,
                            tls_key=self.tls_key, username=self.username, password=self.password,
                            keepalive=self.keepalive, persistent=True, session_expiry_s=self.session_expiry_s,
                            max_packet_bytes=self.max_packet_bytes, reconnect_min_delay=self.reconnect_min_delay,
                            reconnect_max_delay=self.reconnect_max_delay)


BundleCallback = Callable[[Message], None]


class DeviceLink:
    def __init__(self, settings: LinkSettings, outbox: Outbox, *, base_version: str, variant_id: str,
                 on_bundle: BundleCallback | None = None, client: MqttClient | None = None) -> None:
        self.settings = settings
        self.outbox = outbox
        self.base_version = base_version
        self.variant_id = variant_id
        self.on_bundle = on_bundle
        self.rejects: Counter[str] = Counter()  # bundle announcements dropped, by MessageError reason
        self._connected = threading.Event()
        self._ack_event = threading.Condition()  # notified after every outbox ack (wait_drained)
        self._started = False
        self._lock = threading.Lock()  # guards the id sets below
        self._flush_lock = threading.Lock()  # one flush at a time, so no entry is handed over twice
        self._sent_ids: set[int] = set()  # handed to the client, not yet acknowledged
        self._held_ids: set[int] = set()  # refused: retried on the next connect only
        self.client = client or make_client(settings.mqtt())
        self.client.connect_hooks.append(self._on_connect)
        self.client.disconnect_hooks.append(self._on_disconnect)
        self.client.subscribe(bundle_topic(settings.fleet), self._on_bundle_message)

    def start(self) -> None:
        """Connect in the background (works while the broker is down: the client keeps retrying)."""
        if self._started:
            raise RuntimeError("DeviceLink already started")
        will = self._message(DeviceState(state="offline", last_seen=time.time(), reason="will"),
                             self.outbox.next_seq())
        self.client.connect(Will(will.topic(Channel.LWT), encode(will), qos=1, retain=True))
        self._started = True

    def stop(self, timeout: float = 5.0) -> None:
        """Say "offline" (if connected), wait up to `timeout` for the outbox to drain, disconnect cleanly."""
        if not self._started:
            return
        if self._connected.is_set():
            self.send(DeviceState(state="offline", last_seen=time.time(), reason="disconnected"), retain=True)
            self.wait_drained(timeout)
        self.client.disconnect()
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
        # Short slices (wait_on): entries can also leave by expiry or eviction, which do not notify.
        return wait_on(self._ack_event, lambda: not len(self.outbox), timeout)

    def send(self, payload: Payload, *, channel: Channel | None = None, retain: bool = False) -> Message:
        """Build a message (next persistent seq), commit it to the outbox, publish if connected."""
        ch = channel or type(payload).CHANNELS[0]
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
        """Whether TCP_NODELAY is set on the live socket (paho client only; diagnostics and tests)."""
        nodelay = getattr(self.client, "nodelay", None)
        return bool(nodelay is not None and nodelay())

    # ---------------------------------------------------------------------------------------- internals

    def _message(self, payload: Payload, seq: int) -> Message:
        return make_message(payload, device_id=self.settings.device_id, fleet=self.settings.fleet,
                            base_version=self.base_version, variant_id=self.variant_id, seq=seq)

    def _flush(self) -> None:
        with self._flush_lock:
            for entry in self.outbox.pending():
                with self._lock:
                    if entry.id in self._sent_ids or entry.id in self._held_ids:
                        continue
                expiry = None
                if entry.expiry_s is not None:
                    # Count the time spent waiting on disk, so an old message does not live longer than meant.
                    expiry = int(entry.expiry_s - (time.time() - entry.enqueued_at))
                    if expiry <= 0:
                        log.info("outbox entry %d on %s expired before it could be sent", entry.id, entry.topic)
                        self.outbox.ack(entry.id)
                        continue
                with self._lock:
                    self._sent_ids.add(entry.id)
                queued = self.client.publish(entry.topic, entry.payload, qos=entry.qos, retain=entry.retain,
                                             expiry_s=expiry, user_properties=self._properties(entry),
                                             on_done=lambda ok, why, eid=entry.id: self._acked(eid, ok, why))
                if not queued:  # refused outright (e.g. too big for the client): keep it, retry on reconnect
                    with self._lock:
                        self._sent_ids.discard(entry.id)
                        self._held_ids.add(entry.id)

    @staticmethod
    def _properties(entry: OutboxEntry) -> tuple[tuple[str, str], ...]:
        try:
            kinds = sorted(CHANNEL_KINDS.get(parse_topic(entry.topic).channel, ())) or ["unknown"]
        except TopicError:
            kinds = ["unknown"]
        return (("schema", str(SCHEMA_VERSION)), ("kind", kinds[0]))

    def _acked(self, entry_id: int, ok: bool, reason: str) -> None:
        with self._lock:
            self._sent_ids.discard(entry_id)
            if not ok:
                self._held_ids.add(entry_id)
        if not ok:
            log.error("broker refused outbox entry %d: %s (kept; retried after reconnect)", entry_id, reason)
            return
        self.outbox.ack(entry_id)
        with self._ack_event:
            self._ack_event.notify_all()

    # -------------------------------------------------------------------- client callbacks (its thread)

    def _on_connect(self, session_present: bool) -> None:
        with self._lock:
            self._held_ids.clear()
        self._connected.set()
        # Clear a will left by an earlier unclean drop, then announce presence.
        self.outbox.enqueue(device_topic(self.settings.fleet, self.settings.device_id, Channel.LWT), b"",
                            qos=1, retain=True)
        self.publish_state("online", "connected")  # flushes everything pending, oldest first

    def _on_disconnect(self, reason: str) -> None:
        self._connected.clear()
        log.info("disconnected from %s:%s: %s (queued on disk: %d)", self.settings.host, self.settings.port,
                 reason, len(self.outbox))

    def _on_bundle_message(self, message: Incoming) -> None:
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
