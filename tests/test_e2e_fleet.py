"""End to end over a real Mosquitto: 8 device processes, 2 rounds of train φ → upload → MoMoDistill →
new bundle → devices adopt it (the `edgepatch demo` loop, pointed at the test broker)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgepatch.cloud.store import PatchStore, sqlite_url
from edgepatch.demo import DemoOptions, run_demo
from edgepatch.device.state import DeviceStateStore

pytestmark = [pytest.mark.slow, pytest.mark.broker]


def test_fleet_of_eight_devices_two_rounds(mosquitto, tmp_path: Path) -> None:
    out = tmp_path / "demo"
    report = run_demo(DemoOptions(out=out, devices=8, rounds=2, steps=20, variants="1,0.5", base_every=1,
                                  broker=f"mqtt://{mosquitto.host}:{mosquitto.port}"))
    devices = [row["device"] for row in report["devices"]]
    assert len(devices) == 8
    # Every round of every device reached the store, on the base version it trained on.
    distilled = report["distillations"]
    assert len(distilled) >= 1
    first_base, second_base = distilled[0]["parent_base"], distilled[0]["base_version"]
    store = PatchStore(sqlite_url(out / "cloud" / "companion.sqlite"))
    try:
        assert set(store.latest_patches(first_base, "demo")) == set(devices)
        adopted = {d for d in devices if any(v == 1.0 for _, v in store.metric_values(d, "update_adopted"))}
        rejected = {d for d in devices if any(v == 1.0 for _, v in store.metric_values(d, "update_rejected"))}
        # Issue 10: each device's adoption gate decided (or the canaries' verdict withheld the bundle from it).
        assert adopted <= set(store.latest_patches(second_base, "demo"))
        assert adopted or rejected, "no device's adoption gate reported a decision"
        for device in devices:
            # Readings go out only when they change (issue 13): round 1's always, round 2's if it differs; the
            # newest stored value is the one the device's newest patch carries.
            accuracies = [acc for _, acc in store.metric_values(device, "holdout_acc")]
            assert 1 <= len(accuracies) <= 2 and all(0.0 <= acc <= 1.0 for acc in accuracies)
            assert len(set(accuracies)) == len(accuracies)  # an unchanged value is not sent again
            newest = max((p[1] for p in (store.latest_patches(b, "demo").get(device) for b in (first_base, second_base))
                          if p is not None), key=lambda meta: meta["id"])
            assert accuracies[-1] == newest["holdout_acc"]
    finally:
        store.close()
    # A device that adopted the distilled bundle trained its second round on it; one that rejected it kept
    # the first base; both kept their φ state (40 steps).
    for row in report["devices"]:
        state = DeviceStateStore(out / "devices" / row["device"] / "state" / "state").load()
        assert state is not None
        assert state.base_version == (second_base if row["device"] in adopted else first_base)
        assert state.step == 40
        assert len(row["updates"]) == (row["device"] in adopted) + (row["device"] in rejected)
    # The report compares bytes against FedAvg of the full model and covers both long-tail buckets.
    assert report["bytes"]["patches_and_metrics_up"] < report["bytes"]["fedavg_full_model"]
    assert set(report["buckets"]) == {"head", "tail"}
    assert (out / "report.png").stat().st_size > 0
