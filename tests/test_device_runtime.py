"""Device runtime over real bundles: LiteRT training without torch/TF, crash safety, bad input."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from edgepatch.device.profile import load_profile
from edgepatch.device.runtime import DeviceConfig, DeviceRuntime, load_local_data
from edgepatch.device.state import DeviceStateStore
from edgepatch.device.trainer import DataError, LocalData
from edgepatch.protocol.bundle import load_bundle
from edgepatch.protocol.messages import BundleAnnouncement
from edgepatch.protocol.shards import write_shard

pytestmark = pytest.mark.slow

BLOCK_HEAVY = "import sys\nfor name in ('torch', 'tensorflow', 'keras', 'jax'):\n    sys.modules[name] = None\n"


def _config(tmp_path: Path, data: Path, **kw: object) -> DeviceConfig:
    return DeviceConfig(device_id="dev-t", profile=load_profile("linux_x86_64"), state_dir=tmp_path / "state",
                        data_dir=data, **kw)  # type: ignore[arg-type]


def test_litert_training_never_imports_torch_or_tensorflow(digits_bundle: Path, shifted_digits_devices: dict,
                                                           tmp_path: Path) -> None:
    data = next(iter(shifted_digits_devices.values()))
    script = BLOCK_HEAVY + textwrap.dedent(f"""
        import json, sys
        import numpy as np
        from edgepatch.device.profile import load_profile
        from edgepatch.device.runtime import DeviceConfig, DeviceRuntime
        cfg = DeviceConfig(device_id="dev-x", profile=load_profile("linux_x86_64"),
                           state_dir=__import__("pathlib").Path({str(tmp_path / 'st')!r}),
                           data_dir=__import__("pathlib").Path({str(data)!r}))
        device = DeviceRuntime(cfg, __import__("pathlib").Path({str(digits_bundle)!r}))
        report = device.run_round(20)
        logits = device.trainer.predict(device.data.holdout_x[:5])
        heavy = [m for m in ("torch", "tensorflow") if sys.modules.get(m) is not None]
        print(json.dumps({{"steps": report.steps, "pred": logits.argmax(1).tolist(), "heavy": heavy,
                           "loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "tensorflow")
                                            and sys.modules[m] is not None)}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["steps"] == 20
    assert len(result["pred"]) == 5
    assert result["heavy"] == [] and result["loaded"] == []


def test_phi_training_raises_holdout_accuracy_on_shifted_data(digits_bundle: Path, shifted_digits_devices: dict,
                                                              tmp_path: Path) -> None:
    gains = []
    for device_id, data in shifted_digits_devices.items():
        device = DeviceRuntime(_config(tmp_path / device_id, data, adaptive=False), digits_bundle)
        before = device.trainer.holdout_accuracy()
        device.run_round(150)
        after = device.trainer.holdout_accuracy()
        gains.append(after - before)
    assert np.mean(gains) > 0.0, gains
    assert sum(g >= 0 for g in gains) >= 2, gains


def test_state_resumes_and_bundle_with_wrong_hash_is_refused(digits_bundle: Path, shifted_digits_devices: dict,
                                                             tmp_path: Path) -> None:
    data = next(iter(shifted_digits_devices.values()))
    device = DeviceRuntime(_config(tmp_path, data), digits_bundle)
    device.run_round(5)
    version = device.bundle.version
    tampered = tmp_path / "tampered"
    shutil.copytree(digits_bundle, tampered)
    target = tampered / json.loads((tampered / "manifest.json").read_text())["artifacts"]["litert_trainable"]["path"]
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    target.write_bytes(bytes(raw))
    ann = BundleAnnouncement(version="v-bad", reference=str(tampered), manifest_sha256="0" * 64, size=10**6,
                             artifacts={})
    assert device.apply_announcement(ann) is False
    assert device.bundle.version == version  # kept the last good bundle
    device.run_round(3)  # and keeps training
    again = DeviceRuntime(_config(tmp_path, data))  # restart from the installed bundle
    assert again.trainer.state.step == 8


def test_bad_shards_are_skipped_and_wrong_shapes_refused(digits_bundle: Path, shifted_digits_devices: dict,
                                                        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "data"
    shutil.copytree(next(iter(shifted_digits_devices.values())), data)
    first = sorted(data.glob("*.npz"))[0]
    first.write_bytes(first.read_bytes()[: first.stat().st_size // 2])  # truncated shard
    with load_bundle(digits_bundle) as bundle:
        local = load_local_data(data, bundle, 0.25)
        assert len(local.train_x) > 0
        assert any("shard" in r.getMessage().lower() for r in caplog.records)
        wrong = tmp_path / "wrong"
        write_shard(wrong / "s.npz", np.zeros((4, 1, 28, 28), np.float32), np.zeros(4, np.int64),
                    np.arange(4, dtype=np.float64))
        x, y, t = np.zeros((4, 1, 28, 28), np.float32), np.zeros(4, np.int64), np.arange(4.0)
        with pytest.raises(DataError, match="expects"):
            from edgepatch.device.engine import open_engine
            from edgepatch.device.trainer import PatchTrainer

            PatchTrainer(bundle, open_engine(bundle, "litert"), DeviceStateStore(tmp_path / "s"),
                         LocalData.split(x, y, t))


CRASH_WORKER = BLOCK_HEAVY + textwrap.dedent("""
    import sys
    from pathlib import Path
    from edgepatch.device.profile import load_profile
    from edgepatch.device.runtime import DeviceConfig, DeviceRuntime
    state, data, bundle = map(Path, sys.argv[1:4])
    cfg = DeviceConfig(device_id="dev-c", profile=load_profile("linux_x86_64"), state_dir=state, data_dir=data,
                       adaptive=False)
    device = DeviceRuntime(cfg, bundle if not (state / "bundles").exists() else None)
    print("ready", device.trainer.state.step, flush=True)
    while True:
        device.trainer.step(device.trainer.state.variant_id)
        print("committed", device.trainer.state.step, flush=True)
""")


def test_sigkill_at_random_moments_never_corrupts_state(digits_bundle: Path, shifted_digits_devices: dict,
                                                        tmp_path: Path) -> None:
    data = next(iter(shifted_digits_devices.values()))
    state_dir = tmp_path / "crash"
    rng = random.Random(7)
    last_committed = 0
    for _ in range(20):
        proc = subprocess.Popen([sys.executable, "-c", CRASH_WORKER, str(state_dir), str(data), str(digits_bundle)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        ready = proc.stdout.readline().split()
        assert ready and ready[0] == "ready", proc.stderr.read() if proc.stderr else ""
        assert int(ready[1]) >= last_committed  # the restart resumed from what was committed
        time.sleep(rng.uniform(0.0, 0.4))
        os.kill(proc.pid, signal.SIGKILL)
        lines = proc.stdout.read().split("\n")
        proc.wait()
        steps = [int(line.split()[1]) for line in lines if line.startswith("committed")]
        if steps:
            last_committed = steps[-1]
        state = DeviceStateStore(state_dir / "state").load()
        assert state is not None
        assert np.all(np.isfinite(state.phi))
        # At most the step in flight is lost: what is on disk is the last reported commit or one newer.
        assert last_committed <= state.step <= last_committed + 1
        last_committed = state.step
    assert last_committed > 20
