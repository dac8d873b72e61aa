"""The device's MQTT link to the cloud, on the MQTT seam (`protocol/mqtt.py`: paho, or the in-memory twin).

Everything outgoing goes through the on-disk `Outbox`: `send()` builds a message (persistent `seq`,
content hash), commits it to disk, and publishes it at QoS 1 when connected. An entry leaves the outbox
when the broker acknowledged it (the publish's `on_done`) - except patches (with `app_ack`, the default):
a broker's PUBACK is no proof of storage (Mosquitto does not restore MQTT 5 shared subscriptions after a
restart, so it can drop what it acknowledged), so a patch stays until the companion's PatchAck for its
content hash arrives on `<device>/ack` (sent after the batch holding it committed). Unconfirmed patches
are resent on every reconnect, after a restart (they are on disk), and when no ack came within
`ack_timeout_s` (doubling per attempt up to `ack_max_backoff_s`). The store is idempotent by content
hash, so a resend never duplicates a stored patch. A patch the companion *rejected* is dropped too
(resending the same bytes cannot help), counted in `ack_status["rejected"]` and logged at ERROR.
While the broker is unreachable, messages pile up on disk; the client reconnects with exponential
backoff and the connect hook flushes the outbox. Delivery is at-least-once: receivers drop duplicates by
`content_hash`.

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
    PatchAck,
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
    # Issue 12: keep patches until the companion says they are stored (False: the broker's PUBACK suffices,
    # for a companion older than the ack channel). Resend unconfirmed ones after ack_timeout_s, doubling
    # per attempt up to ack_max_backoff_s.
    app_ack: bool = True
    ack_timeout_s: float = 30.0
    ack_max_backoff_s: float = 600.0
    # Issue 13: a reading goes out only when it changed since it was last sent, and all of them every
    # metrics_full_every-th report (0: every report in full), so a cloud that missed some (its store reset, a
    # metrics message expired or evicted from the outbox) has every value again within that many rounds.
    metrics_full_every: int = 10

    def __post_init__(self) -> None:
        check_name(self.fleet, "fleet")
        check_name(self.device_id, "device id")
        if self.metrics_full_every < 0:
            raise ValueError(f"metrics_full_every must be >= 0, got {self.metrics_full_every}")
        if not 0 < self.ack_timeout_s <= self.ack_max_backoff_s:
            raise ValueError(f"need 0 < ack_timeout_s <= ack_max_backoff_s, got {self.ack_timeout_s} and "
                             f"{self.ack_max_backoff_s}")
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
DeliveredCallback = Callable[[str, str], None]  # (content hash, status) when the companion acknowledges a patch


class DeviceLink:
    def __init__(self, settings: LinkSettings, outbox: Outbox, *, base_version: str, variant_id: str,
                 on_bundle: BundleCallback | None = None, client: MqttClient | None = None) -> None:
        self.settings = settings
        self.outbox = outbox
        self.base_version = base_version
        self.variant_id = variant_id
        self.on_bundle = on_bundle
        self.rejects: Counter[str] = Counter()  # bundle announcements dropped, by MessageError reason
        self.ack_status: Counter[str] = Counter()  # the companion's PatchAck entries that removed a patch
        self.resends = 0  # unconfirmed patches published again (reconnect, restart or ack timeout)
        self.on_delivered: list[DeliveredCallback] = []
        self.metrics_sent: dict[str, float] = {}  # the value last sent of each reading (publish_metrics)
        self._metric_reports = 0
        self._resend_all = True  # the first flush of a connection resends every unconfirmed patch
        self._ticker_stop = threading.Event()
        self._ticker: threading.Thread | None = None
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
        if settings.app_ack:
            self.client.subscribe(device_topic(settings.fleet, settings.device_id, Channel.ACK), self._on_ack_message)

    def start(self) -> None:
        """Connect in the background (works while the broker is down: the client keeps retrying)."""
        if self._started:
            raise RuntimeError("DeviceLink already started")
        will = self._message(DeviceState(state="offline", last_seen=time.time(), reason="will"),
                             self.outbox.next_seq())
        self.client.connect(Will(will.topic(Channel.LWT), encode(will), qos=1, retain=True))
        self._started = True
        if self.settings.app_ack:
            self._ticker_stop.clear()
            self._ticker = threading.Thread(target=self._resend_when_due, name="edgepatch-ack-timer", daemon=True)
            self._ticker.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Say "offline" (if connected), wait up to `timeout` for the outbox to drain, disconnect cleanly."""
        if not self._started:
            return
        if self._connected.is_set():
            self.send(DeviceState(state="offline", last_seen=time.time(), reason="disconnected"), retain=True)
            self.wait_drained(timeout)
        self._ticker_stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout)
            self._ticker = None
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
        """True once the broker has taken every outbox entry (patches may still wait for the companion:
        `wait_delivered`)."""
        # Short slices (wait_on): entries can also leave by expiry or eviction, which do not notify.
        return wait_on(self._ack_event, lambda: not self.outbox.unsent(), timeout)

    def wait_delivered(self, timeout: float) -> bool:
        """True once the outbox is empty: every patch acknowledged by the companion, the rest by the broker."""
        return wait_on(self._ack_event, lambda: not len(self.outbox), timeout)

    def send(self, payload: Payload, *, channel: Channel | None = None, retain: bool = False) -> Message:
        """Build a message (next persistent seq), commit it to the outbox, publish if connected."""
        ch = channel or type(payload).CHANNELS[0]
        expiry = {Channel.METRICS: self.settings.metrics_expiry_s,
                  Channel.PATCH: self.settings.patch_expiry_s}.get(ch)
        built: list[Message] = []
        confirm = self.settings.app_ack and ch is Channel.PATCH

        def build(seq: int) -> tuple[str, bytes, str | None]:
            built.append(self._message(payload, seq))
            return built[0].topic(ch), encode(built[0]), built[0].content_hash if confirm else None

        self.outbox.enqueue_numbered(build, qos=1, retain=retain, expiry_s=expiry)
        if self._connected.is_set():
            self._flush()
        return built[0]

    def publish_patch(self, update: PatchUpdate) -> Message:
        return self.send(update)

    def publish_metrics(self, values: Mapping[str, float], *, events: Mapping[str, float] | None = None
                        ) -> Message | None:
        """Report `values` (readings: accuracies, timings) where they changed since last sent, all of them every
        `metrics_full_every`-th report (the first report is always full), and `events` (e.g. an adoption gate's
        decision: each one counts, even when it repeats the last) always. None when nothing is left to send."""
        every = self.settings.metrics_full_every
        with self._lock:
            full = every == 0 or self._metric_reports % every == 0
            readings = {k: float(v) for k, v in values.items() if full or self.metrics_sent.get(k) != float(v)}
        out = {**readings, **{k: float(v) for k, v in (events or {}).items()}}
        msg = self.send(Metrics(values=out)) if out else None
        with self._lock:  # after a successful send: a refused report (NaN) changes nothing
            self.metrics_sent.update(readings)
            self._metric_reports += bool(values)
        return msg

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
            with self._lock:
                resend_all, self._resend_all = self._resend_all, False
            now = time.time()
            for entry in self.outbox.pending():
                with self._lock:
                    if entry.id in self._sent_ids or entry.id in self._held_ids:
                        continue
                if entry.handed:  # the broker took it once; the companion has not confirmed it yet
                    if not resend_all and entry.next_try is not None and now < entry.next_try:
                        continue
                    self.resends += 1
                    log.debug("resending patch %s (attempt %d): no ack from the companion yet",
                             (entry.content_hash or "")[:12], entry.attempts + 1)
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
                                             on_done=lambda ok, why, e=entry: self._acked(e, ok, why))
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

    def _acked(self, entry: OutboxEntry, ok: bool, reason: str) -> None:
        # The outbox is updated before the id leaves `_sent_ids`: a flush in between would otherwise read
        # the entry as never sent and publish it a second time.
        if ok and entry.content_hash is not None:  # the broker took it; keep it until the companion confirms
            backoff = min(self.settings.ack_max_backoff_s, self.settings.ack_timeout_s * 2 ** min(entry.attempts, 30))
            self.outbox.mark_handed(entry.id, backoff)
        elif ok:
            self.outbox.ack(entry.id)
        with self._lock:
            self._sent_ids.discard(entry.id)
            if not ok:
                self._held_ids.add(entry.id)
        if not ok:
            log.error("broker refused outbox entry %d: %s (kept; retried after reconnect)", entry.id, reason)
            return
        with self._ack_event:
            self._ack_event.notify_all()

    def _resend_when_due(self) -> None:
        """Timer thread: resend patches the companion has not confirmed within their backoff."""
        tick = min(1.0, self.settings.ack_timeout_s / 4)
        while not self._ticker_stop.wait(tick):
            if self._connected.is_set():
                try:
                    self._flush()
                except Exception:  # noqa: BLE001 - the timer must survive (e.g. outbox busy); next tick retries
                    log.exception("resending unconfirmed patches failed")

    def _on_ack_message(self, message: Incoming) -> None:
        try:
            ack = decode(message.topic, message.payload)
            if not isinstance(ack.payload, PatchAck):
                raise MessageError("topic_mismatch", f"kind {ack.kind!r} on the ack topic")
        except MessageError as exc:
            self.rejects[exc.reason] += 1
            log.warning("dropped ack on %s: %s", message.topic, exc)
            return
        for entry in ack.payload.acks:
            if not self.outbox.confirm(entry.content_hash):
                continue  # an ack for a resend we had already confirmed
            self.ack_status[entry.status] += 1
            if entry.status == "rejected":
                log.error("the companion rejected patch %s (%s): dropped from the outbox, not resent",
                          entry.content_hash[:12], entry.reason)
            for hook in list(self.on_delivered):
                try:
                    hook(entry.content_hash, entry.status)
                except Exception:  # noqa: BLE001 - an application hook must not break the link
                    log.exception("on_delivered hook failed")
        with self._ack_event:
            self._ack_event.notify_all()

    # -------------------------------------------------------------------- client callbacks (its thread)

    def _on_connect(self, session_present: bool) -> None:
        with self._lock:
            self._held_ids.clear()
            self._resend_all = True  # the broker may have lost what it took (restart, shared subscriptions)
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
