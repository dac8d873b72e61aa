"""The provisioned broker (cloud/provision.py, real Mosquitto with TLS and dynamic security) lets the companion
acknowledge a device's patches on `<device>/ack` and only that device read them; a device cannot forge acks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: tests/ is not on the path
from test_security import PREFIX, connect, fleet, settle, wait_until  # noqa: E402, F401 - fleet is a fixture

pytestmark = pytest.mark.broker


def test_companion_acks_reach_only_their_device_and_devices_cannot_forge_them(fleet) -> None:  # noqa: F811
    victim, attacker = connect(fleet, "dev-001"), connect(fleet, "dev-000")
    assert victim.subscribe(f"{PREFIX}/dev-001/ack") == "Granted QoS 1"
    assert attacker.subscribe(f"{PREFIX}/dev-001/ack") == "Not authorized"
    assert attacker.subscribe(f"{PREFIX}/+/ack") == "Not authorized"
    # A forged "stored" ack would make the victim drop a patch the companion never stored.
    assert attacker.publish(f"{PREFIX}/dev-001/ack", b"forged") == "Not authorized"
    assert attacker.publish(f"{PREFIX}/dev-000/ack", b"self-ack") == "Not authorized"
    cloud = connect(fleet, "companion", client_id="test-cloud-acks", companion=True)
    assert cloud.publish(f"{PREFIX}/dev-001/ack", b"ack") == "Success"
    wait_until(lambda: victim.messages, 5, "the companion's ack at its device")
    settle()
    assert len(victim.messages) == 1 and attacker.messages == []
    for peer in (victim, attacker, cloud):
        peer.close()
