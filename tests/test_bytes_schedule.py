"""The base-update period (issue 13 item 4): devices send φ every round, the companion updates the base only
once `distill_after` devices have each sent `base_every` patches for the current base — counted from the
store, so a redelivered patch is one round, and patches a round already used never trigger another.
Real Mosquitto, a real exported bundle, the companion's own loop."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgepatch.cloud.companion import Companion, CompanionConfig, CompanionError
from edgepatch.protocol.messages import PatchUpdate, make_message

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: tests/ is not on the path
from polling import wait_until  # noqa: E402
from test_cloud_ingest import Publisher  # noqa: E402

pytestmark = pytest.mark.broker
FLEET = "sched"


def test_base_every_must_be_a_positive_number_of_rounds(digits_bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(CompanionError, match="base_every must be at least 1"):
        Companion(CompanionConfig(bundle=digits_bundle, work_dir=tmp_path / "c", base_every=0))


def test_companion_updates_the_base_every_r_device_rounds(mosquitto: Any, digits_bundle: Path,
                                                         tmp_path: Path) -> None:
    # fedavg_patches keeps the base version (W unchanged): the second period must count only new patches.
    comp = Companion(CompanionConfig(bundle=digits_bundle, work_dir=tmp_path / "cloud", broker_host=mosquitto.host,
                                     broker_port=mosquitto.port, fleet=FLEET, aggregator="fedavg_patches",
                                     distill_after=2, base_every=3, rollout=None))
    assert "once 2 devices each sent 3 patches" in comp.startup_note()
    comp.start_background()
    pub = Publisher(mosquitto, client_id="pub-schedule")
    seqs = {"dev-a": 0, "dev-b": 0}
    stored = [0]
    last: dict[str, Any] = {}

    def round_of(device: str, resend: bool = False) -> None:
        """One device round: one patch for the current base (resend: the same message again, a redelivery)."""
        assert comp.current is not None
        if resend:  # the very same message (its bytes), as a broker redelivers it
            msg = last[device]
        else:
            seqs[device] += 1
            phi = np.full(comp.current.patch_spec.k, 0.01 * seqs[device], np.float32)
            msg = last[device] = make_message(
                PatchUpdate(phi=phi, steps=5, samples=8, holdout_acc=0.5, loss=0.5), device_id=device,
                fleet=FLEET, base_version=comp.current.base_version, variant_id="v100", seq=seqs[device])
        pub.send(msg).wait_for_publish(10)
        if not resend:
            stored[0] += 1
        wait_until(lambda: comp.store.count("patches") == stored[0], 30, f"{device}'s patch {seqs[device]} stored")

    def settle() -> None:
        time.sleep(2.5)  # the loop wakes on every patch and at least once a second

    try:
        base = comp.current.base_version if comp.current else None
        for _ in range(2):
            round_of("dev-a")
            round_of("dev-b")
        round_of("dev-a")
        round_of("dev-a", resend=True)  # stored once: still dev-a's third round, not a fourth
        time.sleep(1.0)
        assert comp.store.count("patches") == stored[0]  # the redelivery was not stored again
        settle()
        assert comp.history == []  # dev-b has 2 rounds on this base: not yet
        round_of("dev-b")
        wait_until(lambda: len(comp.history) == 1, 60, "the first base update after 3 rounds of both devices")
        assert comp.history[0]["devices"] == 2
        assert comp.current is not None and comp.current.base_version == base  # fedavg_patches keeps W
        # The same base version: the 3 used rounds do not count again, only new ones do.
        for _ in range(2):
            round_of("dev-a")
            round_of("dev-b")
        settle()
        assert len(comp.history) == 1
        round_of("dev-a")
        round_of("dev-b")
        wait_until(lambda: len(comp.history) == 2, 60, "the second base update after 3 more rounds")
        status = comp.distill_status()
        assert status["base_every"] == 3 and status["rounds"] == 2
    finally:
        pub.close()
        comp.stop()


@pytest.mark.slow
def test_bytes_benchmark_quick_counts_real_messages(tmp_path: Path) -> None:
    """`benchmarks/bytes.py --quick`: both systems ran, bytes come from the wire and the FL server's blobs, and
    the report ends with the targets line."""
    import json
    import subprocess

    out = tmp_path / "bytes.json"
    proc = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "benchmarks" / "bytes.py"), "--quick",
                           "--out", str(out)], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("targets: >= 20x fewer bytes than FedAvg")
    (row,) = json.loads(out.read_text())["rows"]
    ep, fa, day = row["edgepatch"], row["fedavg"], row["per_day"]
    assert ep["base_updates"] == 1 and all(d["bundle_http"] > 0 for d in ep["devices"])  # each device fetched it
    # A device's update is the float16 delta and manifest of its runtime, less than the fp32 parameters.
    assert 0 < ep["update_down"] < row["fp32_param_bytes"]
    assert all(d["up_patch"] > 0 and d["down_ack"] > 0 for d in ep["devices"])  # counted on the wire
    # FedAvg moves the full fp32 weights down and a full update up every round: at least twice the base weights.
    assert fa["down_per_round"] + fa["up_per_round"] == pytest.approx(fa["per_round"])
    assert fa["down_per_round"] > row["fp32_base_bytes"] and fa["up_per_round"] > row["fp32_base_bytes"]
    assert fa["contributed"] == [2, 2]
    assert day["fedavg_over_edgepatch"] == pytest.approx(day["fedavg_per_day"] / day["edgepatch_per_day"], rel=1e-2)
    assert 0.0 <= ep["accuracy"] <= 1.0 and 0.0 <= fa["accuracy"] <= 1.0
