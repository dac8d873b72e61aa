"""The broker the companion can start for itself: embedded amqtt (zero install, MQTT 3.1.1 only, in-memory
queues) for demos and `cloud serve --broker embedded`. The Mosquitto launcher is edgepatch.sim.brokers."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

from edgepatch.protocol.mqtt import MqttVersion
from edgepatch.protocol.ports import free_port, wait_listening

log = logging.getLogger("edgepatch.cloud.broker")


class EmbeddedBroker:
    """amqtt in a background thread with its own event loop. Speak MQTT 3.1.1 to it."""

    protocol = MqttVersion.V311

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self.port = host, port or free_port(host)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker: Any = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 15.0) -> EmbeddedBroker:
        from amqtt.broker import Broker

        config = {"listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
                  "sys_interval": 0, "auth": {"allow-anonymous": True, "plugins": ["auth_anonymous"]},
                  "topic-check": {"enabled": False}}
        ready, failure = threading.Event(), []
        loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                self._broker = Broker(config, loop=loop)
                loop.run_until_complete(self._broker.start())
            except Exception as exc:  # reported to the caller below
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()

        for name in ("amqtt", "transitions"):  # amqtt logs every packet, and config notes, as warnings
            logging.getLogger(name).setLevel(logging.CRITICAL)
        self._loop = loop
        self._thread = threading.Thread(target=run, name="amqtt-broker", daemon=True)
        self._thread.start()
        ready.wait(timeout)
        if failure or not wait_listening(self.host, self.port, timeout):
            raise RuntimeError(f"embedded broker did not start on {self.host}:{self.port}: {failure}")
        return self

    def stop(self) -> None:
        if self._loop is None or self._broker is None:
            return
        future = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop)
        try:
            future.result(10)
        except Exception as exc:  # shutting down anyway
            log.warning("embedded broker shutdown: %s", exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"
