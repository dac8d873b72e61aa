"""Brokers the simulator, the tests and the benchmarks start for themselves: the one Mosquitto launcher
(`MosquittoBroker`), and `local_broker`, which falls back to the cloud's embedded amqtt broker when the
Mosquitto binary is missing."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from edgepatch.protocol.ports import accepts, free_port

MOSQUITTO_HINT = "install it with `apt-get install -y mosquitto`"
_SEARCH = ("/usr/sbin", "/usr/local/sbin")


def find_binary(name: str = "mosquitto") -> str | None:
    """`mosquitto` (or `mosquitto_passwd`) on PATH or in the sbin folders Debian installs it to."""
    return shutil.which(name) or next(
        (p for p in (f"{d}/{name}" for d in _SEARCH) if os.access(p, os.X_OK)), None)


class MosquittoBroker:
    """One `mosquitto -c conf` process on free loopback port(s). `stop()` then `start()` brings it back on
    the SAME port with its persisted state (sessions, retained and queued QoS 1 messages are saved on a
    clean stop) when `persistence` is on.

    `settings` override the general options (e.g. `max_inflight_messages`). `listeners` replaces the one
    anonymous plain listener: {port: lines after its `listener` line} (TLS, passwords); with it,
    `per_listener_settings true` makes those lines apply to their own listener only.
    """

    host = "127.0.0.1"
    protocol = "5"

    def __init__(self, workdir: Path, *, binary: str | None = None, persistence: bool = True,
                 settings: Mapping[str, str] | None = None,
                 listeners: Mapping[int, Sequence[str]] | None = None,
                 log_types: Sequence[str] = ("error", "warning", "notice")) -> None:
        found = binary or find_binary()
        if found is None:
            raise FileNotFoundError(f"the mosquitto binary is missing: {MOSQUITTO_HINT}")
        self.binary, self.workdir = found, Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.listeners = dict(listeners) if listeners else {free_port(self.host): ["allow_anonymous true"]}
        self.port = next(iter(self.listeners))
        self.log_path = self.workdir / "mosquitto.log"
        self.config_path = self.workdir / "mosquitto.conf"
        lines = ["per_listener_settings true"] if listeners else []
        lines += [f"log_dest file {self.log_path}", *(f"log_type {t}" for t in log_types)]
        if persistence:
            (self.workdir / "data").mkdir(exist_ok=True)
            lines += ["persistence true", f"persistence_location {self.workdir / 'data'}/"]
        options = {"max_queued_messages": "100000", **(settings or {})}
        lines += [f"{key} {value}" for key, value in options.items()]
        if os.geteuid() == 0:
            lines.append("user root")  # otherwise mosquitto drops to user 'mosquitto', who cannot write here
        for port, extra in self.listeners.items():
            lines += [f"listener {port} {self.host}", *extra]
        self.config_path.write_text("\n".join(lines) + "\n")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> MosquittoBroker:
        if self.running:
            return self
        self._proc = subprocess.Popen([self.binary, "-c", str(self.config_path)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                self._close()
                raise RuntimeError(f"mosquitto exited on port {self.port}: {err.strip()} {self.log_text()[-2000:]}")
            if all(accepts(self.host, port) for port in self.listeners):
                return self
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"mosquitto did not accept connections on {self.host}:{list(self.listeners)} in "
                           f"{timeout} s: {self.log_text()[-2000:]}")

    def stop(self, timeout: float = 10.0) -> None:
        """Clean stop (SIGTERM): mosquitto saves its persistence file; the port is then closed."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._close()

    def kill(self) -> None:
        """Hard stop (SIGKILL): nothing saved."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._close()

    def _close(self) -> None:
        if self._proc is not None and self._proc.stderr is not None:
            self._proc.stderr.close()
        self._proc = None

    def log_text(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return ""

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def local_broker(workdir: Path) -> Iterator[tuple[str, int, str]]:
    """Mosquitto on a free port if the binary exists, else the embedded amqtt broker (MQTT 3.1.1 only).
    Yields (host, port, MQTT protocol "5" or "311")."""
    if find_binary() is not None:
        with MosquittoBroker(workdir, persistence=False) as broker:
            yield broker.host, broker.port, broker.protocol
        return
    from edgepatch.cloud.broker import EmbeddedBroker

    embedded = EmbeddedBroker().start()
    try:
        yield embedded.host, embedded.port, "311"
    finally:
        embedded.stop()
