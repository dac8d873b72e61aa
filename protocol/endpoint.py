"""A participant on the wire: wire messages (`wire.py`) over an MQTT client (`mqtt.py`).

`WireEndpoint` stamps every payload it sends with its sender id, fleet, bundle version and a monotonic
`seq`, encodes it in the one envelope and publishes it (QoS 1; MQTT 5 user properties `schema`/`kind`);
what it subscribes to is decoded strictly, and a message that fails validation is logged with its
reason, counted in `rejects` and dropped, so a handler only ever sees valid `Message`s. The Canoe
target/helper link, the Canoe relay, the federated client and server and the companion's bundle
publisher are all endpoints; the device link and the ingest add their own delivery rules on the same
`MqttClient`.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable

from .mqtt import Incoming, MqttClient, Will
from .topics import Channel
from .wire import SCHEMA_VERSION, Message, MessageError, Payload, decode, encode, make_message

log = logging.getLogger("edgepatch.wire")
MessageHandler = Callable[[Message], None]


class WireEndpoint:
    def __init__(self, client: MqttClient, *, fleet: str, device_id: str, base_version: str = "",
                 variant_id: str = "", first_seq: int | None = None) -> None:
        self.client = client
        self.fleet, self.device_id = fleet, device_id
        self.base_version, self.variant_id = base_version, variant_id
        self.rejects: Counter[str] = Counter()
        # Monotonic per sender, also across restarts (milliseconds of the start time).
        self._seq = itertools.count(int(time.time() * 1000) if first_seq is None else first_seq)

    def start(self, timeout: float = 10.0, will: Will | None = None) -> None:
        """Connect and wait for the broker; ConnectionError naming the broker if it does not answer."""
        self.client.connect(will)
        if not self.client.wait_connected(timeout):
            self.client.disconnect()
            s = self.client.settings
            raise ConnectionError(f"{s.client_id}: no broker at {s.host}:{s.port} ({s.url}) within {timeout:.0f} s")

    def stop(self) -> None:
        self.client.disconnect()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until the broker acknowledged everything sent so far (call before `stop`)."""
        return self.client.flush(timeout)

    def message(self, payload: Payload, *, base_version: str | None = None, variant_id: str | None = None
                ) -> Message:
        return make_message(payload, device_id=self.device_id, fleet=self.fleet,
                            base_version=self.base_version if base_version is None else base_version,
                            variant_id=self.variant_id if variant_id is None else variant_id, seq=next(self._seq))

    def send(self, payload: Payload, *, channel: Channel | None = None, to: str | None = None,
             topic: str | None = None, retain: bool = False, base_version: str | None = None,
             variant_id: str | None = None) -> int:
        """Publish `payload` on its channel (of this sender, or of `to` on a relayed channel, or `topic`);
        returns the bytes queued (0 when the client refused to queue it)."""
        msg = self.message(payload, base_version=base_version, variant_id=variant_id)
        data = encode(msg)
        where = topic or msg.topic(channel, to)
        queued = self.client.publish(where, data, qos=1, retain=retain,
                                     user_properties=(("schema", str(SCHEMA_VERSION)), ("kind", msg.kind)))
        return len(data) if queued else 0

    def subscribe(self, topic_filter: str, handler: MessageHandler) -> None:
        """Deliver every valid message matching `topic_filter` to `handler` (on the client's thread)."""
        def on_incoming(incoming: Incoming) -> None:
            if not incoming.payload:
                log.debug("%s: retained message on %s cleared", self.device_id, incoming.topic)
                return
            try:
                msg = decode(incoming.topic, incoming.payload)
            except MessageError as exc:
                self.rejects[exc.reason] += 1
                log.warning("%s dropped a message on %s: %s", self.device_id, incoming.topic, exc)
                return
            handler(msg)

        self.client.subscribe(topic_filter, on_incoming)
