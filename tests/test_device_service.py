"""The device as a system service: the run configuration file, the systemd unit rendered from the firmware
profiles, and a clean stop on SIGTERM mid-round against a real Mosquitto (state and outbox intact, exit 0
within the unit's TimeoutStopSec)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from edgepatch.device.config import ConfigError, load_config
from edgepatch.device.outbox import Outbox
from edgepatch.device.profile import list_profiles, load_profile
from edgepatch.device.service import render_unit
from edgepatch.device.state import DeviceStateStore
from edgepatch.protocol.messages import decode

REPO = Path(__file__).resolve().parents[1]
UNIT_FILE = REPO / "firmware_configs" / "edgepatch-device.service"
CLI = (sys.executable, "-m", "edgepatch.cli")


def unit_settings(text: str) -> dict[str, str]:
    """key=value lines of the [Service] section."""
    section = text.split("[Service]", 1)[1].split("\n[", 1)[0]
    return dict(line.split("=", 1) for line in section.splitlines() if "=" in line and not line.startswith("#"))


# -- the systemd unit -----------------------------------------------------------------------------------

def test_committed_unit_is_the_rendering_of_the_pi4_profile() -> None:
    rendered = render_unit(load_profile("raspberry_pi_4"))
    assert UNIT_FILE.read_text() == rendered, (
        "firmware_configs/edgepatch-device.service is stale: regenerate it with "
        "`edgepatch device unit --profile raspberry_pi_4 > firmware_configs/edgepatch-device.service`")


@pytest.mark.parametrize("name", list_profiles())
def test_unit_limits_come_from_each_profile(name: str) -> None:
    prof = load_profile(name)
    s = unit_settings(render_unit(prof))
    assert s["MemoryMax"] == f"{prof.budgets.memory_cap_mb}M"
    assert int(s["MemoryHigh"].rstrip("M")) < prof.budgets.memory_cap_mb
    assert s["CPUQuota"] == f"{prof.threads * 100}%"
    assert s["Restart"] == "on-failure"
    assert s["User"] == "edgepatch" and s["User"] != "root"
    assert s["KillSignal"] == "SIGTERM"
    assert s["ExecStart"].endswith("device run --config /etc/edgepatch/device.toml")
    assert "password" not in s["ExecStart"].lower()  # secrets never on the command line


def test_unit_command_prints_the_same_unit() -> None:
    out = subprocess.run([*CLI, "device", "unit", "--profile", "raspberry_pi_zero_2w"], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert out == render_unit(load_profile("raspberry_pi_zero_2w"))
    assert unit_settings(out)["MemoryMax"] == "96M"


def test_rendered_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    import shutil

    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    unit = tmp_path / "edgepatch-device.service"
    unit.write_text(render_unit(load_profile("raspberry_pi_4"), executable=shutil.which("true") or "/bin/true"))
    proc = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "edgepatch-device.service" not in proc.stderr, proc.stderr
    broken = tmp_path / "broken.service"
    broken.write_text(unit.read_text().replace("Restart=on-failure", "Restart=sometimes"))
    bad = subprocess.run([tool, "verify", str(broken)], capture_output=True, text=True, timeout=60)
    assert "broken.service" in bad.stderr and "sometimes" in bad.stderr  # the verifier really reads the file


# -- the configuration file -------------------------------------------------------------------------------

def write_config(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


BASE = 'device_id = "d1"\nprofile = "raspberry_pi_4"\ndata_dir = "data"\nstate_dir = "state"\n'


def test_config_resolves_paths_and_reads_the_password_file(tmp_path: Path) -> None:
    secret = tmp_path / "mqtt-password"
    secret.write_text("s3cret\n")
    secret.chmod(0o640)
    cfg = load_config(write_config(tmp_path / "device.toml", BASE + 'rounds = 3\n[broker]\nurl = "mqtts://b:8883"\n'
                                   'password_file = "mqtt-password"\nusername = "pi-7"\nca_file = "ca.crt"\n'))
    assert cfg.data_dir == tmp_path / "data" and cfg.state_dir == tmp_path / "state" and cfg.rounds == 3
    assert cfg.broker is not None and cfg.broker.password(cfg.profile) == "s3cret"
    prof = cfg.effective_profile()
    assert prof.mqtt.username == "pi-7" and prof.mqtt.tls is not None
    assert prof.mqtt.tls.ca_file == str(tmp_path / "ca.crt")
    assert prof.mqtt.tls.cert_file is None  # the device's TLS files replace the profile's client certificate
    assert cfg.profile.mqtt.tls is not None and cfg.profile.mqtt.tls.cert_file == "/etc/edgepatch/device.crt"


@pytest.mark.parametrize(("body", "error"), [
    (BASE + '[broker]\nurl = "mqtt://b:1883"\npassword = "hunter2"\n', "no secrets in this file"),
    (BASE + "stepz = 5\n", "stepz: unknown key"),
    (BASE + 'rounds = "3"\n', "rounds: expected int"),
    (BASE.replace('profile = "raspberry_pi_4"', 'profile = "pi9"'), "unknown device profile 'pi9'"),
    (BASE + '[broker]\nurl = "http://b"\n', "must start with mqtt:// or mqtts://"),
    ('profile = "raspberry_pi_4"\ndata_dir = "d"\nstate_dir = "s"\n', "device_id: missing required key"),
])
def test_bad_config_is_a_one_line_error_naming_the_key(tmp_path: Path, body: str, error: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(error)) as info:
        load_config(write_config(tmp_path / "device.toml", body))
    assert "\n" not in str(info.value) and "device.toml" in str(info.value)


def test_world_readable_password_file_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("x")
    secret.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by every user"):
        load_config(write_config(tmp_path / "device.toml", BASE + '[broker]\nurl = "mqtt://b:1"\npassword_file = "pw"\n'))


def test_run_refuses_options_beside_config(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "device.toml", BASE)
    proc = subprocess.run([*CLI, "device", "run", "--config", str(cfg), "--rounds", "2"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "--rounds cannot be combined with --config" in " ".join(proc.stderr.split())


# -- SIGTERM mid-round against a real Mosquitto -------------------------------------------------------------

class Listener:
    """Counts the device's distinct patch messages at the broker (a second, independent MQTT client);
    QoS 1 is at-least-once, so a redelivered duplicate (same content_hash) counts once, as for the companion."""

    def __init__(self, port: int, fleet: str) -> None:
        import paho.mqtt.client as mqtt

        self.hashes: set[str] = set()
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(f"edgepatch/v1/{fleet}/+/patch", qos=1)
        self.client.loop_start()

    def _on_message(self, _client: Any, _userdata: Any, message: Any) -> None:
        with self.lock:
            self.hashes.add(decode(message.topic, message.payload).content_hash)  # a binary frame (issue 13)

    @property
    def patches(self) -> int:
        with self.lock:
            return len(self.hashes)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _heartbeat(state: Path) -> dict[str, Any]:
    try:
        return json.loads((state / "service.json").read_text())
    except (OSError, ValueError):
        return {}


def _wait(cond: Any, timeout: float, proc: subprocess.Popen[bytes], log: Path, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"device exited {proc.returncode} before {what}: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} in {timeout} s: {log.read_text()[-3000:]}"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.broker
def test_sigterm_mid_round_keeps_state_and_outbox_and_exits_zero(
        digits_bundle: Path, shifted_digits_devices: dict[str, Path], mosquitto: Any, tmp_path: Path) -> None:
    steps = 150  # per round: long enough that the signal lands well inside round 3
    cfg = write_config(tmp_path / "device.toml", f"""
device_id = "svc-1"
fleet = "svc"
profile = "linux_x86_64"
data_dir = "{next(iter(shifted_digits_devices.values()))}"
state_dir = "state"
bundle = "{digits_bundle}"
rounds = 0
steps = {steps}
deadline_s = 600.0
adaptive = false
[broker]
url = "mqtt://127.0.0.1:{mosquitto.port}"
""")
    stop_timeout = float(unit_settings(UNIT_FILE.read_text())["TimeoutStopSec"].rstrip("s"))
    state = tmp_path / "state"
    store = DeviceStateStore(state / "state")
    listener = Listener(mosquitto.port, "svc")
    log = tmp_path / "device.log"
    try:
        with open(log, "wb") as fh:
            proc = subprocess.Popen([*CLI, "device", "run", "--config", str(cfg)], stdout=fh, stderr=subprocess.STDOUT)
        try:
            _wait(lambda: _heartbeat(state).get("rounds_done", 0) >= 2, 300, proc, log, "two finished rounds")
            # Mid-round 3: some steps of it are committed, most are still to come.
            _wait(lambda: (s := store.load()) is not None and s.step >= 2 * steps + 10, 120, proc, log,
                  "steps of round 3")
            proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            code = proc.wait(timeout=stop_timeout)
            took = time.monotonic() - t0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        text = log.read_text()
        assert code == 0, text[-3000:]
        assert took < stop_timeout
        m = re.search(r"round 3: stopped by SIGTERM after (\d+) committed steps", " ".join(text.split()))
        assert m, text[-3000:]
        partial = int(m.group(1))
        assert 10 <= partial < steps  # really mid-round
        # State: the newest generation decodes and is exactly the steps that were committed, none torn.
        final = store.load()
        assert final is not None and store.problems == []
        assert final.step == 2 * steps + partial
        # Outbox: passes SQLite's integrity check (Outbox() runs quick_check) and was flushed to the broker;
        # the two patches stay on disk until a companion acknowledges them (none runs here).
        with Outbox(state / "outbox.sqlite") as outbox:
            assert outbox.unsent() == 0
            kept = outbox.pending()
        assert [e.topic for e in kept] == ["edgepatch/v1/svc/svc-1/patch"] * 2
        _wait_for(lambda: listener.patches >= 2, 10)
        assert listener.patches == 2  # rounds 1 and 2; the abandoned round publishes nothing
        beat = _heartbeat(state)
        assert beat["state"] == "stopped" and beat["reason"] == "SIGTERM" and beat["outbox_drained"] is True
        assert beat["step"] == final.step
    finally:
        listener.close()

    # The operator's view, then a restart resumes from the committed step.
    status = subprocess.run([*CLI, "device", "status", "--config", str(cfg), "--text"], capture_output=True,
                            text=True, timeout=60, check=True).stdout
    assert f"steps          {final.step}" in status and "stopped" in status
    assert "0 not yet taken by the broker, 2 awaiting the companion's ack" in status
    cfg.write_text(cfg.read_text().replace("rounds = 0", "rounds = 1").replace(f"steps = {steps}", "steps = 5"))
    again = subprocess.run([*CLI, "device", "run", "--config", str(cfg)], capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = store.load()
    assert resumed is not None and resumed.step == final.step + 5


def _wait_for(cond: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.broker
def test_sigterm_with_the_broker_down_keeps_unsent_patches_for_the_next_start(
        digits_bundle: Path, shifted_digits_devices: dict[str, Path], mosquitto: Any, tmp_path: Path) -> None:
    """The flush is bounded: with no broker the service still exits 0 in time and the patch stays on disk."""
    cfg = write_config(tmp_path / "device.toml", f"""
device_id = "svc-2"
fleet = "svc"
profile = "linux_x86_64"
data_dir = "{next(iter(shifted_digits_devices.values()))}"
state_dir = "state"
bundle = "{digits_bundle}"
rounds = 0
steps = 400
interval_s = 0.0
adaptive = false
[broker]
url = "mqtt://127.0.0.1:{mosquitto.port}"
""")
    state = tmp_path / "state"
    stop_timeout = float(unit_settings(UNIT_FILE.read_text())["TimeoutStopSec"].rstrip("s"))
    log = tmp_path / "device.log"
    mosquitto.kill()  # the broker is down from the start: everything the device publishes waits on disk
    with open(log, "wb") as fh:
        proc = subprocess.Popen([*CLI, "device", "run", "--config", str(cfg)], stdout=fh, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        _wait(lambda: _heartbeat(state).get("rounds_done", 0) >= 1, 300, proc, log, "a finished round")
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        code = proc.wait(timeout=stop_timeout)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0, log.read_text()[-3000:]
    assert took < stop_timeout
    assert "outbox not fully delivered" in " ".join(log.read_text().split())
    with Outbox(state / "outbox.sqlite") as outbox:
        topics = [e.topic for e in outbox.pending()]
        assert outbox.unsent() >= 1
    assert "edgepatch/v1/svc/svc-2/patch" in topics, topics
    assert _heartbeat(state)["outbox_drained"] is False

    # Broker back: the next start delivers what the stopped service left behind.
    mosquitto.start()
    listener = Listener(mosquitto.port, "svc")
    try:
        cfg.write_text(cfg.read_text().replace("rounds = 0", "rounds = 1").replace("steps = 400", "steps = 3"))
        again = subprocess.run([*CLI, "device", "run", "--config", str(cfg)], capture_output=True, text=True,
                               timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
        _wait_for(lambda: listener.patches >= 2, 10)
        assert listener.patches >= 2  # the old round's patch and the new one
        with Outbox(state / "outbox.sqlite") as outbox:
            assert outbox.unsent() == 0  # the broker took everything the stopped service had left
    finally:
        listener.close()


@pytest.mark.slow
def test_running_device_picks_up_new_shards_between_rounds(
        digits_bundle: Path, shifted_digits_devices: dict[str, Path], tmp_path: Path) -> None:
    """A service runs for weeks while the sensor pipeline adds shards: each round sees the current data."""
    import shutil

    from edgepatch.device.runtime import DeviceConfig, DeviceRuntime

    source = next(iter(shifted_digits_devices.values()))
    shards = sorted(source.glob("*.npz"))
    assert len(shards) >= 2
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(shards[0], data / shards[0].name)
    device = DeviceRuntime(DeviceConfig(device_id="d1", profile=load_profile("linux_x86_64"), state_dir=tmp_path / "s",
                                        data_dir=data, adaptive=False), digits_bundle)
    device.run_round(2)
    before = len(device.data.train_x) + len(device.data.holdout_x)
    assert device.refresh_data() is False  # nothing changed: no re-read
    for shard in shards[1:]:
        shutil.copy(shard, data / shard.name)
    device.run_round(2)
    after = len(device.trainer.data.train_x) + len(device.trainer.data.holdout_x)
    assert after > before
    assert device.trainer.state.step == 4  # φ and the step count carried over the reload


def test_the_pi_guides_configuration_loads(tmp_path: Path) -> None:
    """docs/raspberry-pi.md's device.toml, with its folders moved under tmp_path, is a valid configuration."""
    guide = (REPO / "docs" / "raspberry-pi.md").read_text()
    block = re.search(r"```toml\n(.*?)```", guide, flags=re.S)
    assert block
    text = "\n".join(line.strip() for line in block.group(1).splitlines())
    etc, var = tmp_path / "etc", tmp_path / "var"
    etc.mkdir()
    (etc / "mqtt-password").write_text("pw\n")
    (etc / "mqtt-password").chmod(0o640)
    text = text.replace("/etc/edgepatch/", f"{etc}/").replace("/var/lib/edgepatch/", f"{var}/")
    cfg = load_config(write_config(tmp_path / "device.toml", text))
    assert cfg.profile.name == "raspberry_pi_4" and cfg.rounds == 0 and cfg.fleet_key == etc / "fleet-signing.pub"
    assert cfg.broker is not None and cfg.broker.password(cfg.profile) == "pw"
    tls = cfg.effective_profile().mqtt.tls
    assert tls is not None and tls.ca_file == str(etc / "ca.crt") and tls.cert_file is None
