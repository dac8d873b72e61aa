"""The ingest worker's settings (cloud/ingest.py): broker address, MQTT version, shared-subscription group,
batching and flow-control limits; every connection rule is checked when they are made."""

from __future__ import annotations

from dataclasses import dataclass, field

from edgepatch.protocol.messages import MAX_MESSAGE_BYTES
from edgepatch.protocol.mqtt import MqttSettings, MqttVersion
from edgepatch.protocol.topics import Channel, check_name, fleet_filter, shared_filter

INGEST_CHANNELS = (Channel.PATCH, Channel.METRICS, Channel.STATE, Channel.LWT)


@dataclass(frozen=True)
class IngestSettings:
    host: str = "127.0.0.1"
    port: int = 1883
    fleet: str = "+"  # one fleet, or '+' for every fleet
    protocol: MqttVersion | str = MqttVersion.V5  # any spelling MqttVersion.parse accepts
    group: str = "edgepatch-ingest"  # shared-subscription group
    # `$share/<group>/…` filters: default only with MQTT 5 (the standard's); True also with 3.1.1, which
    # Mosquitto honours: several 3.1.1 workers then split the stream (paho's 3.1.1 receive path skips MQTT 5
    # property parsing, ~40 µs a message less in benchmarks/ingest_drain.py); the PatchAcks keep no-loss.
    shared: bool | None = None
    worker: str = "0"  # distinguishes workers of one group; part of the default client id
    client_id: str | None = None  # default `<group>-<worker>`; must be stable for the session to persist
    # 60 s (paho's default): in a 10,000-device run on an overloaded 2-core machine each worker with 30 s
    # dropped its connection once (likely a PINGRESP queued behind the broker's window of publishes)
    keepalive: int = 60
    session_expiry_s: int = 7 * 24 * 3600
    receive_maximum: int = 1000  # MQTT 5: unacked messages the broker may have in flight to us
    inflight_window: int = 20  # what the broker really allows (mosquitto's max_inflight_messages default)
    max_batch: int = 500
    max_delay_s: float = 0.02
    linger_s: float = 0.002
    overlap_commit: bool = True  # commit batch N on the writer thread while receiving batch N+1
    max_message_bytes: int = MAX_MESSAGE_BYTES
    app_acks: bool = True  # issue 12: PatchAck to each device after commit (cloud/ingest_acks.py)
    reconnect_min_delay: float = 1.0
    reconnect_max_delay: float = 10.0
    tls: bool = False  # mqtts:// (implied by the TLS files)
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "protocol", MqttVersion.parse(self.protocol))
        if self.fleet != "+":
            check_name(self.fleet, "fleet")
        check_name(self.group, "share group")
        check_name(self.worker, "worker")
        if self.max_batch < 1 or self.inflight_window < 1 or not 1 <= self.receive_maximum <= 65535:
            raise ValueError("max_batch and inflight_window must be >= 1, receive_maximum in [1, 65535]")
        if self.max_delay_s < 0 or self.linger_s < 0:
            raise ValueError("max_delay_s and linger_s must be >= 0")
        self.mqtt()  # every connection rule (port, TLS pair, no password in clear) checked up front

    @classmethod
    def from_mqtt(cls, mqtt: MqttSettings, **kw: object) -> IngestSettings:
        """Broker address, version, TLS and credentials from `mqtt` (its client id is not reused)."""
        return cls(host=mqtt.host, port=mqtt.port, protocol=mqtt.version, tls=mqtt.tls, tls_ca=mqtt.tls_ca,
                   tls_cert=mqtt.tls_cert, tls_key=mqtt.tls_key, username=mqtt.username, password=mqtt.password,
                   **kw)  # type: ignore[arg-type]

    @property
    def max_packet_bytes(self) -> int:
        """MQTT 5 Maximum Packet Size asked of the broker: up to twice the message limit still reaches us
        (refused before decoding and counted, reason oversize); anything larger the broker drops, so one
        huge publish cannot take the companion's memory (issue 12). MQTT 3.1.1 has no such property."""
        return min(268_435_455, max(1024, 2 * self.max_message_bytes + 65536))

    @property
    def resolved_client_id(self) -> str:
        return self.client_id or f"{self.group}-{self.worker}"

    def mqtt(self) -> MqttSettings:
        return MqttSettings(host=self.host, port=self.port, client_id=self.resolved_client_id,
                            version=self.protocol, tls=self.tls, tls_ca=self.tls_ca, tls_cert=self.tls_cert,
                            tls_key=self.tls_key, username=self.username, password=self.password,
                            keepalive=self.keepalive, persistent=True, session_expiry_s=self.session_expiry_s,
                            receive_maximum=self.receive_maximum, manual_ack=True,
                            max_packet_bytes=self.max_packet_bytes,
                            reconnect_min_delay=self.reconnect_min_delay, reconnect_max_delay=self.reconnect_max_delay)

    def topic_filters(self) -> list[str]:
        filters = [fleet_filter(self.fleet, ch) for ch in INGEST_CHANNELS]
        if self.shared or (self.shared is None and self.protocol is MqttVersion.V5):
            return [shared_filter(self.group, f) for f in filters]
        return filters
