"""Local TCP ports: a free one for a broker or web server we start, and waiting until one listens
(stdlib only; used by the cloud's embedded broker, the simulator, the tests and the benchmarks)."""

from __future__ import annotations

import socket
import time


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (never assumes 1883). Another process may take it before
    the caller binds it; the launchers fail loudly when that happens."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def accepts(host: str, port: int, timeout: float = 0.2) -> bool:
    """Whether something accepts TCP connections on host:port right now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_listening(host: str, port: int, timeout: float) -> bool:
    """Poll until host:port accepts a connection; False when `timeout` seconds pass first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if accepts(host, port):
            return True
        time.sleep(0.02)
    return False
