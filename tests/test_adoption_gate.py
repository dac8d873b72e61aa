"""Device adoption gate on real bundles (LiteRT engine): a bad update is rejected, a harmless one adopted,
a SIGKILL during the shadow fit resumes it without corrupt state, old bundles stay for rollback."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from edgepatch.device.adoption import GateSettings
from edgepatch.device.profile import load_profile
from edgepatch.device.runtime import DeviceConfig, DeviceRuntime
from edgepatch.device.state import DeviceStateStore
from edgepatch.protocol.bundle import load_bundle

sys.path.insert(0, str(Path(__file__).parent))
from adoption_common import same_weights_bundle, shuffled_head_bundle  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def update_bundles(digits_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("updates")
    return {"bad": shuffled_head_bundle(digits_bundle, root / "bad"),
            "good": same_weights_bundle(digits_bundle, root / "good")}


def _device(tmp: Path, data: Path, bundle: Path | None, **gate: object) -> DeviceRuntime:
    cfg = DeviceConfig(device_id="dev-g", profile=load_profile("linux_x86_64"), state_dir=tmp / "state",
                       data_dir=data, adaptive=False, gate=GateSettings(**gate))  # type: ignore[arg-type]
    return DeviceRuntime(cfg, bundle)


def _version(path: Path) -> str:
    with load_bundle(path) as b:
        return b.version


def test_bad_bundle_rejected_good_bundle_adopted(digits_bundle: Path, shifted_digits_devices: dict,
                                                 update_bundles: dict[str, Path], tmp_path: Path) -> None:
    data = next(iter(shifted_digits_devices.values()))
    device = _device(tmp_path, data, digits_bundle, shadow_steps=20)
    device.run_round(40)
    active, phi_before = device.bundle.version, device.trainer.phi.copy()

    device.adoption.stage(update_bundles["bad"], _version(update_bundles["bad"]))
    bad = device._gate_pending()
    assert bad is not None and not bad.adopt
    assert bad.acc_new_old_phi < bad.acc_active - 0.2 and bad.acc_new_refit < bad.acc_active - 0.2, bad
    assert device.bundle.version == active and np.array_equal(device.trainer.phi, phi_before)
    assert device.gate_report["update_rejected"] == 1.0
    assert device.gate_report["gate_acc_active"] == pytest.approx(bad.acc_active)
    assert _version(update_bundles["bad"]) in device.adoption.rejected_versions()
    assert device.adoption.pending_version() is None  # staging cleared

    device.adoption.stage(update_bundles["good"], _version(update_bundles["good"]))
    good = device._gate_pending()
    assert good is not None and good.adopt and good.phi_choice in ("refit", "old")
    assert max(good.acc_new_old_phi, good.acc_new_refit) >= good.acc_active - 1.0 / good.holdout_n - 1e-9
    assert device.bundle.version == _version(update_bundles["good"])
    state = DeviceStateStore(tmp_path / "state" / "state").load()
    assert state is not None and state.metrics["adopted_bundle"] == good.version
    # The previous bundle stays on disk for rollback until the new one has been active long enough.
    kept = {p.name for p in (tmp_path / "state" / "bundles" / "bundles").iterdir()}
    assert active in kept
    assert not device.adoption.prune_rollback(device.bundles)  # just switched: too young to prune
    assert device.adoption.prune_rollback(device.bundles, now=time.time() + 2 * 24 * 3600)
    kept = {p.name for p in (tmp_path / "state" / "bundles" / "bundles").iterdir()}
    assert kept == {good.version}

    # Served predictions use φ only while it beats φ = 0 on the holdout.
    zero = device.trainer.holdout_accuracy(np.zeros_like(device.trainer.phi))
    served = float((device.predict(device.data.holdout_x).argmax(1) == device.data.holdout_y).mean())
    assert served >= zero and served >= device.trainer.holdout_accuracy()


def test_gate_off_switches_blindly(digits_bundle: Path, shifted_digits_devices: dict,
                                   update_bundles: dict[str, Path], tmp_path: Path) -> None:
    data = next(iter(shifted_digits_devices.values()))
    device = _device(tmp_path, data, digits_bundle, enabled=False)
    device.bundles.install(update_bundles["bad"])
    device._activate(device.bundles.current())
    assert device.bundle.version == _version(update_bundles["bad"])  # without the gate the bad one lands


SHADOW_WORKER = textwrap.dedent("""
    import sys
    for name in ('torch', 'tensorflow', 'keras', 'jax'):
        sys.modules[name] = None
    from pathlib import Path
    from edgepatch.device.adoption import GateSettings
    from edgepatch.device.profile import load_profile
    from edgepatch.device.runtime import DeviceConfig, DeviceRuntime
    state, data, bundle, candidate, version = sys.argv[1:6]
    state, data = Path(state), Path(data)
    cfg = DeviceConfig(device_id="dev-k", profile=load_profile("linux_x86_64"), state_dir=state, data_dir=data,
                       adaptive=False, gate=GateSettings(shadow_steps=150))
    first = not (state / "bundles").exists()
    device = DeviceRuntime(cfg, Path(bundle) if first else None)  # a pending shadow fit resumes in here
    if first:
        print("ready", flush=True)
        device.adoption.stage(Path(candidate), version)
        device._gate_pending()
    print("done", device.bundle.version, flush=True)
""")


def test_sigkill_during_shadow_training_resumes_without_corrupt_state(
        digits_bundle: Path, shifted_digits_devices: dict, update_bundles: dict[str, Path], tmp_path: Path) -> None:
    data = next(iter(shifted_digits_devices.values()))
    state_dir, good = tmp_path / "crash", update_bundles["good"]
    args = [sys.executable, "-c", SHADOW_WORKER, str(state_dir), str(data), str(digits_bundle), str(good),
            _version(good)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready", proc.stderr
    shadow = DeviceStateStore(state_dir / "adoption" / "shadow")
    deadline = time.monotonic() + 120
    while (s := _safe_load(shadow)) is None or s.step < 5:  # kill it in the middle of the shadow fit
        assert time.monotonic() < deadline and proc.poll() is None, "shadow fit never started"
        time.sleep(0.05)
    time.sleep(random.Random(3).uniform(0.0, 0.3))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = shadow.load()
    assert killed_at is not None and 5 <= killed_at.step < 150 and np.all(np.isfinite(killed_at.phi))
    main_state = DeviceStateStore(state_dir / "state").load()
    assert main_state is None or "adopted_bundle" not in main_state.metrics  # nothing switched yet
    assert load_bundle(state_dir / "bundles" / "bundles" / _version(digits_bundle)).version

    out = subprocess.run(args, capture_output=True, text=True, timeout=600)  # restart: resumes, decides
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == f"done {_version(good)}"
    assert not (state_dir / "adoption" / "shadow").exists() and not (state_dir / "adoption" / "decision.json").exists()
    final = DeviceStateStore(state_dir / "state").load()
    assert final is not None and final.metrics["adopted_bundle"] == _version(good)
    assert np.all(np.isfinite(final.phi))


def _safe_load(store: DeviceStateStore):  # type: ignore[no-untyped-def]
    try:
        return store.load()
    except Exception:  # a generation being written right now; the test only polls
        return None
