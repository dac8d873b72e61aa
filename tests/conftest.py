"""Shared fixtures. `mosquitto`: a real Mosquitto broker on a free loopback port, restartable on that port."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

MOSQUITTO_HINT = "install it with `apt-get install -y mosquitto` (CI does this in .ci/run)"


def free_loopback_port() -> int:
    """A TCP port nobody listens on right now (never assumes 1883)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class MosquittoBroker:
    """One mosquitto process; `stop()` then `start()` brings it back on the SAME port with its persisted
    state (sessions, retained and queued QoS 1 messages are saved on a clean stop)."""

    host = "127.0.0.1"

    def __init__(self, workdir: Path, binary: str) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = free_loopback_port()
        self.log_path = workdir / "mosquitto.log"
        self.config_path = workdir / "mosquitto.conf"
        data = workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        lines = [
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {data}/",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "max_queued_messages 100000",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # otherwise mosquitto drops to user 'mosquitto', who cannot write here
        self.config_path.write_text("\n".join(lines) + "\n")
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        if self.running:
            return
        self._proc = subprocess.Popen([self.binary, "-c", str(self.config_path)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                raise RuntimeError(f"mosquitto exited with {self._proc.returncode} on port {self.port}: "
                                   f"{err.strip()} {self.log_text()[-2000:]}")
            if _accepts(self.host, self.port):
                return
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"mosquitto did not accept connections on {self.host}:{self.port} in {timeout} s: "
                           f"{self.log_text()[-2000:]}")

    def stop(self, timeout: float = 10.0) -> None:
        """Clean stop (SIGTERM): mosquitto saves its persistence file; the port is then closed."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._close()

    def kill(self) -> None:
        """Hard stop (SIGKILL): nothing saved."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
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


def _mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None)
    if found is None:
        pytest.fail(f"the mosquitto binary is missing: {MOSQUITTO_HINT}", pytrace=False)
    return found


@pytest.fixture
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    """A fresh broker per test (outage tests stop/start it); killed at teardown."""
    broker = MosquittoBroker(tmp_path_factory.mktemp("mosquitto"), _mosquitto_binary())
    broker.start()
    try:
        yield broker
    finally:
        broker.kill()


@pytest.fixture(scope="session")
def mosquitto_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    """One broker shared by a whole run, for tests that neither stop it nor depend on its being empty."""
    broker = MosquittoBroker(tmp_path_factory.mktemp("mosquitto-session"), _mosquitto_binary())
    broker.start()
    try:
        yield broker
    finally:
        broker.kill()


# -- bundles and device data shared by the device, cloud and end-to-end tests -------------------------

@pytest.fixture(scope="session")
def digits_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real exported bundle (LiteRT programs, a full and a 50 % variant) of the digits reference CNN."""
    from edgepatch.export.pipeline import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "digits"
    export_bundle(ExportOptions(variants="1,0.5", runtimes=("litert",), pretrain_epochs=8, dse_steps=5,
                                dse_seeds=(0,)), out)
    return out


@pytest.fixture(scope="session")
def shifted_digits_devices(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Shard directories of 3 devices whose digits carry a per-device gain/offset and pixel permutation."""
    from edgepatch.data.datasets import load_digits
    from edgepatch.data.fleet import base_split, make_fleet, write_device_timeline

    root = tmp_path_factory.mktemp("devices")
    _, device_part = base_split(load_digits(), fraction=0.5, seed=0)
    fleet = make_fleet(device_part, 3, alpha=1.0, shift="gain_offset", tail="uniform", seed=3,
                       shift_strength=2.0)
    dirs = {}
    for device in fleet:
        dirs[device.device_id] = root / device.device_id
        write_device_timeline(device, dirs[device.device_id])
    return dirs
