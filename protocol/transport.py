"""Broker addresses and socket settings shared by every MQTT client of the system (stdlib only)."""

from __future__ import annotations

import logging
import socket
import urllib.parse
from typing import Any

log = logging.getLogger("edgepatch.protocol.transport")


def parse_broker(url: str) -> tuple[str, int]:
    """`mqtt://host:port` (plain) or `mqtts://host:port` (TLS) → (host, port); default ports 1883/8883."""
    parsed = urllib.parse.urlparse(url if "://" in url else f"mqtt://{url}")
    if parsed.scheme not in ("mqtt", "mqtts", "tcp") or not parsed.hostname:
        raise ValueError(f"broker {url!r}: expected mqtt://host:port or mqtts://host:port")
    return parsed.hostname, parsed.port or (8883 if parsed.scheme == "mqtts" else 1883)


def broker_uses_tls(url: str) -> bool:
    """mqtts:// uses the profile's TLS files; mqtt:// is plain TCP (a local or test broker)."""
    return url.startswith("mqtts://")


def set_tcp_nodelay(client: Any, userdata: Any, sock: Any) -> None:
    """paho `on_socket_open` hook. QoS-1 round trips stall ~40 ms on Nagle + delayed ACK without it
    (measured with amqtt, RUNTIME_FACTS)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError) as exc:  # e.g. a websocket wrapper: not fatal
        log.warning("could not set TCP_NODELAY: %s", exc)
