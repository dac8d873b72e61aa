"""Broker URLs for callers that only need the address (stdlib only); the rules live in `mqtt.py`."""

from __future__ import annotations

from .mqtt import split_broker_url


def parse_broker(url: str) -> tuple[str, int]:
    """`mqtt://host:port` (plain) or `mqtts://host:port` (TLS) → (host, port); default ports 1883/8883."""
    host, port, _ = split_broker_url(url)
    return host, port


def broker_uses_tls(url: str) -> bool:
    """mqtts:// uses TLS; mqtt:// is plain TCP (a local or test broker; never with a password)."""
    return split_broker_url(url)[2]
