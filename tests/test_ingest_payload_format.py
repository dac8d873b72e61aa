"""MQTT 5 publishes say "UTF-8 JSON" (PayloadFormatIndicator 1, ContentType application/json) only for JSON
envelopes: a binary frame (protocol/frame.py) is not UTF-8, and a receiver may refuse a payload that breaks
its format indicator. Checked at a real Mosquitto with a plain paho subscriber reading the properties."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt

from edgepatch.protocol.messages import Metrics, PatchUpdate, encode, make_message
from edgepatch.protocol.mqtt import MqttSettings, MqttVersion, make_client


def test_only_json_payloads_claim_utf8_json(mosquitto: Any) -> None:
    got: dict[str, Any] = {}
    done = threading.Event()
    sub = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id="fmt-sub",
                      protocol=mqtt.MQTTv5)
    sub.on_connect = lambda c, *_: c.subscribe("fmt/#", qos=1)

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        got[msg.topic] = msg.properties
        if len(got) == 3:
            done.set()
    sub.on_message = on_message
    sub.connect(mosquitto.host, mosquitto.port)
    sub.loop_start()
    pub = make_client(MqttSettings(host=mosquitto.host, port=mosquitto.port, client_id="fmt-pub",
                                   version=MqttVersion.V5))
    try:
        pub.connect()
        assert pub.wait_connected(5)
        time.sleep(0.3)  # let the subscription settle
        frame = encode(make_message(PatchUpdate(phi=np.ones(4, np.float32), steps=1, samples=2, holdout_acc=0.5,
                                                loss=0.1), device_id="d1", fleet="lab"))
        js = encode(make_message(Metrics({"battery": 0.5}), device_id="d1", fleet="lab", binary=False))
        assert frame[:3] == b"EPB" and js[:1] == b"{"
        assert pub.publish("fmt/frame", frame) and pub.publish("fmt/json", js)
        assert pub.publish("fmt/frame-expiring", frame, expiry_s=60)  # the per-publish Properties path
        assert done.wait(10), f"got only {sorted(got)}"
    finally:
        pub.disconnect()
        sub.loop_stop()
        sub.disconnect()
    for topic in ("fmt/frame", "fmt/frame-expiring"):
        assert not hasattr(got[topic], "PayloadFormatIndicator") and not hasattr(got[topic], "ContentType"), topic
    assert got["fmt/json"].PayloadFormatIndicator == 1 and got["fmt/json"].ContentType == "application/json"
