"""The Canoe link of a target or helper: a `WireEndpoint` on the Canoe topics (any `MqttClient`).

It keeps Canoe off `DeviceLink`, whose only subscription is the bundle: a device publishes on its own
canoe channels (`meta`, `request`, `offer`) and subscribes to its `task`/`reply` channels; it also carries
the generic `metrics` message by which a target reports its ensemble. Handlers run on the MQTT client's
thread and receive only messages the wire codec accepted (`rejects` counts the others by reason).
"""

from __future__ import annotations

from collections.abc import Callable

from edgepatch.protocol.canoe import canoe_topic
from edgepatch.protocol.endpoint import WireEndpoint
from edgepatch.protocol.messages import Message, Metrics
from edgepatch.protocol.mqtt import MqttClient, MqttSettings, MqttVersion, make_client
from edgepatch.protocol.mqtt_memory import MemoryBroker

Handler = Callable[[Message], None]


class CanoeLink(WireEndpoint):
    """QoS 1 on the Canoe topics. Give `settings` (TLS, credentials) or `client` (e.g. the in-memory
    twin); host/port/protocol build a plain local connection."""

    def __init__(self, fleet: str, device_id: str, host: str = "127.0.0.1", port: int = 1883,
                 client_id: str | None = None, protocol: MqttVersion | str = MqttVersion.V5, *,
                 settings: MqttSettings | None = None, client: MqttClient | None = None,
                 broker: MemoryBroker | None = None) -> None:
        if client is None:
            settings = settings or MqttSettings(host=host, port=port, version=MqttVersion.parse(protocol),
                                                client_id=client_id or f"edgepatch-canoe-{fleet}-{device_id}")
            client = make_client(settings, broker)
        super().__init__(client, fleet=fleet, device_id=device_id)

    def publish(self, channel: str, payload: object, retain: bool = False) -> int:
        """Publish on this device's own canoe channel; returns the bytes queued (0 if not queued)."""
        return self.publish_to(canoe_topic(self.fleet, self.device_id, channel), payload, retain)

    def publish_to(self, topic: str, payload: object, retain: bool = False) -> int:
        return self.send(payload, topic=topic, retain=retain)

    def publish_metrics(self, values: dict[str, float], *, base_version: str, variant_id: str) -> int:
        """A generic `metrics` message on this device's metrics topic; returns the bytes queued."""
        return self.send(Metrics(values), base_version=base_version, variant_id=variant_id)

    def subscribe_messages(self, topic_filter: str, handler: Handler) -> None:
        """Same as `subscribe` (every family shares one envelope); kept for existing callers."""
        self.subscribe(topic_filter, handler)
