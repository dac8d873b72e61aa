"""Staged rollout over a real Mosquitto with real device runtimes (LiteRT): a bundle with shuffled head weights
is rejected by every device's adoption gate and withdrawn at the canary stage while the fleet keeps the old
bundle; a harmless one is promoted and adopted fleet-wide; the cloud gate stops a bad base before any device
sees it."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edgepatch.cloud.companion import Companion, CompanionConfig
from edgepatch.cloud.rollout import RolloutSettings, base_logits, choose_canaries, cloud_gate, split_heldout
from edgepatch.device.adoption import GateSettings
from edgepatch.device.profile import load_profile
from edgepatch.device.runtime import DeviceConfig, DeviceRuntime
from edgepatch.protocol.bundle import load_bundle

sys.path.insert(0, str(Path(__file__).parent))
from adoption_common import same_weights_bundle, shuffled_head_bundle  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.broker]


def test_canary_choice_is_ten_percent_and_at_least_two() -> None:
    assert len(choose_canaries([f"d{i}" for i in range(50)])) == 5
    assert len(choose_canaries([f"d{i}" for i in range(5)])) == 2
    assert choose_canaries(["a"]) == ("a",)
    assert choose_canaries([f"d{i}" for i in range(50)], seed=1) == choose_canaries([f"d{i}" for i in range(50)],
                                                                                   seed=1)


def _bundle_info(path: Path) -> tuple[str, dict[str, np.ndarray], object]:
    with load_bundle(path) as b:
        return b.version, {k: np.array(v) for k, v in b.all_params().items()}, b.model_spec


def test_cloud_gate_rejects_a_shuffled_head_on_held_out_data(digits_bundle: Path, tmp_path: Path) -> None:
    from edgepatch.data.byo import reference_data

    cloud = reference_data("digits_cnn", 0)
    assert cloud is not None
    _, heldout = split_heldout(cloud.x, cloud.y, 0.2)
    _, good, spec = _bundle_info(digits_bundle)
    _, bad, _ = _bundle_info(shuffled_head_bundle(digits_bundle, tmp_path / "bad"))
    current = base_logits(spec, good, heldout[0])
    rejected = cloud_gate(current, base_logits(spec, bad, heldout[0]), heldout[1])
    assert not rejected.passed and rejected.acc_candidate < rejected.acc_current - 0.3, rejected
    assert cloud_gate(current, current, heldout[1]).passed


def test_bad_bundle_withdrawn_at_canaries_good_bundle_promoted(mosquitto, digits_bundle: Path,
                                                               shifted_digits_devices: dict, tmp_path: Path) -> None:
    bad_dir = shuffled_head_bundle(digits_bundle, tmp_path / "bad")
    good_dir = same_weights_bundle(digits_bundle, tmp_path / "good")
    first, first_params, spec = _bundle_info(digits_bundle)
    companion = Companion(CompanionConfig(bundle=digits_bundle, work_dir=tmp_path / "cloud", broker_host=mosquitto.host,
                                          broker_port=mosquitto.port, fleet="ro",
                                          rollout=RolloutSettings(canary_timeout_s=240)))
    companion.start()
    devices: dict[str, DeviceRuntime] = {}
    stop = threading.Event()
    threads = []
    try:
        for device_id, data in shifted_digits_devices.items():
            cfg = DeviceConfig(device_id=device_id, profile=load_profile("linux_x86_64"),
                               state_dir=tmp_path / device_id, data_dir=data, fleet="ro", adaptive=False,
                               broker=f"mqtt://{mosquitto.host}:{mosquitto.port}", gate=GateSettings(shadow_steps=20))
            devices[device_id] = DeviceRuntime(cfg, digits_bundle)
            devices[device_id].run_round(20)  # a patch upload makes the device known to the companion
        _wait(lambda: len(companion.store.devices("ro")) == len(devices), 60, "devices never reached the store")

        def serve(device: DeviceRuntime) -> None:  # each device's main loop: act on announcements
            while not stop.is_set():
                device.poll_announcements()
                time.sleep(0.1)

        threads = [threading.Thread(target=serve, args=(d,), daemon=True) for d in devices.values()]
        for t in threads:
            t.start()
        assert companion.rollout is not None
        bad_version, bad_params, _ = _bundle_info(bad_dir)
        entry = companion.rollout.release(digits_bundle, first_params, bad_dir, bad_params, spec, bad_version)
        canaries = entry["canaries"]
        assert entry["stage"] == "canary" and entry["decision"] == "withdraw", entry
        assert len(canaries) == 2 and entry["rejected_by"] == sorted(canaries)
        for device_id in canaries:  # three numbers per canary, the new options clearly worse
            numbers = entry["gate"][device_id]
            assert not numbers["adopted"] and numbers["best_new"] < numbers["active"]
        assert companion.current is not None and companion.current.version == first  # the old one stays
        # The cloud gate had nothing to hold out here (no --data): it says so.
        assert companion.rollout.log.entries[0]["decision"] == "skipped"
        time.sleep(1.0)
        assert all(d.bundle.version == first for d in devices.values())
        # The device outside the canary group rejects it too when it is offered to it directly.
        stop.set()
        for t in threads:
            t.join()
        (outsider,) = [d for name, d in devices.items() if name not in canaries]
        outsider.adoption.stage(bad_dir, bad_version)
        decision = outsider._gate_pending()
        assert decision is not None and not decision.adopt and outsider.bundle.version == first

        stop.clear()
        threads = [threading.Thread(target=serve, args=(d,), daemon=True) for d in devices.values()]
        for t in threads:
            t.start()
        good_version, good_params, _ = _bundle_info(good_dir)
        entry = companion.rollout.release(digits_bundle, first_params, good_dir, good_params, spec, good_version)
        assert entry["decision"] == "promote" and entry["rejected_by"] == [], entry
        assert companion.current.version == good_version
        _wait(lambda: all(d.bundle.version == good_version for d in devices.values()), 180,
              "not every device adopted the promoted bundle")
        value = companion.metrics.value
        assert value("edgepatch_rollout_decisions_total", {"stage": "canary", "decision": "withdraw"}) == 1
        assert value("edgepatch_rollout_decisions_total", {"stage": "canary", "decision": "promote"}) == 1
        assert value("edgepatch_rollout_canary_rejections_total") == 2
        # A device switches first and reports after, over MQTT: wait for every report (a loaded machine
        # delivered the last one after the switch was visible; asserting at once failed there).
        _wait(lambda: all(g["decision"] == "adopted"
                          for g in companion.web.fleet_json()["rollout"]["device_gates"].values()), 60,
              "not every device reported adopting the promoted bundle")
        page = companion.web.fleet_json()
        assert [e["decision"] for e in page["rollout"]["decisions"]] == ["skipped", "withdraw", "skipped", "promote"]
        assert set(page["rollout"]["device_gates"]) == set(devices)  # every device's last gate report
        assert "Device adoption gates" in companion.web.fleet_html()
        rejected = companion.store.metric_values(canaries[0], "update_rejected")
        assert rejected and rejected[0][1] == 1.0  # the gate report reached the store
    finally:
        stop.set()
        for t in threads:
            t.join()
        for d in devices.values():
            d.stop()
        companion.stop()


def _wait(cond, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)
