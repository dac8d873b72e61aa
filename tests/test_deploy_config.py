"""deploy/mosquitto-dev.conf (issue 12, item 3) on the real Mosquitto: it starts, passes every message the wire
allows, refuses a packet over its limit, and persists its state on a clean stop."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from edgepatch.protocol.ports import accepts, free_port
from edgepatch.protocol.wire import MAX_MESSAGE_BYTES
from edgepatch.sim.brokers import find_binary

pytestmark = pytest.mark.broker
CONF = Path(__file__).resolve().parents[1] / "deploy" / "mosquitto-dev.conf"


def settings(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            out[key] = value
    return out


def test_the_limits_are_set_and_fit_the_wire():
    s = settings(CONF.read_text())
    assert int(s["max_packet_size"]) >= MAX_MESSAGE_BYTES + 1024  # every valid message passes
    assert int(s["max_packet_size"]) <= 4 * MAX_MESSAGE_BYTES  # and nothing much bigger
    assert int(s["max_queued_messages"]) > 0 and int(s["max_queued_bytes"]) > 0
    assert s["persistence"] == "true" and int(s["autosave_interval"]) > 0
    assert "message_size_limit" not in s  # deprecated in Mosquitto 2: max_packet_size replaces it


def _client(port: int, client_id: str) -> mqtt.Client:
    c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                    protocol=mqtt.MQTTv5)
    c.connect("127.0.0.1", port)
    c.loop_start()
    return c


def test_the_dev_config_runs_passes_valid_messages_and_refuses_oversized_ones(tmp_path):
    binary = find_binary("mosquitto")
    assert binary is not None, "the mosquitto binary is missing"
    port = free_port()
    text = CONF.read_text().replace("listener 1883 127.0.0.1", f"listener {port} 127.0.0.1")
    text = text.replace("persistence_location .mosquitto-data/", f"persistence_location {tmp_path}/data/")
    if os.geteuid() == 0:
        text += "user root\n"  # otherwise mosquitto drops to user 'mosquitto', who cannot write in tmp_path
    (tmp_path / "data").mkdir()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(text)
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not accepts("127.0.0.1", port):
            assert proc.poll() is None and time.monotonic() < deadline, "mosquitto did not start with the dev config"
            time.sleep(0.05)
        got: list[int] = []
        arrived = threading.Event()
        sub = _client(port, "sub")
        sub.on_message = lambda c, u, m: (got.append(len(m.payload)), arrived.set())
        sub.subscribe("t/#", qos=1)
        time.sleep(0.3)
        pub = _client(port, "pub")
        assert pub.publish("t/ok", b"x" * MAX_MESSAGE_BYTES, qos=1).wait_for_publish(5) is None
        assert arrived.wait(5) and got == [MAX_MESSAGE_BYTES]
        pub.publish("t/big", b"x" * (1024 * 1024), qos=1)
        time.sleep(1.0)
        assert got == [MAX_MESSAGE_BYTES], "the oversized packet must not be delivered"
        for c in (sub, pub):
            c.disconnect()
            c.loop_stop()
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        assert (tmp_path / "data" / "mosquitto.db").exists(), "a clean stop must save the persistence file"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
