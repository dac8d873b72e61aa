"""`python -m edgepatch.device.canoe_cli helper|target` as real processes over a real Mosquitto, with the
companion's Canoe matching in this process: the drifting target asks, the helper answers, and the target's
accuracy on the new classes rises once the slice joins its ensemble."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner, Result

from edgepatch.cloud.companion import Companion, CompanionConfig
from edgepatch.device.canoe_cli import app
from edgepatch.device.canoe_target import weight_metric_name

FLEET = "canoecli"
NEW = (7, 8, 9)
OLD = tuple(c for c in range(10) if c not in NEW)


@dataclass(frozen=True)
class Devices:
    target_data: Path
    helper_data: Path
    target_model: Path  # the target's own model before the run: pretrained on the old classes only
    drift_sample: int  # index in the target's time-ordered stream of the first post-drift sample


@pytest.fixture(scope="module")
def devices(digits_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Devices:
    from edgepatch.data.datasets import load_digits
    from edgepatch.data.fleet import Drift, base_split, make_fleet, write_device_timeline
    from edgepatch.device.canoe_boost import tailored_from_bundle
    from edgepatch.protocol.bundle import load_bundle
    from edgepatch.protocol.params import init_params, save_params

    root = tmp_path_factory.mktemp("canoe-cli")
    cloud, rest = base_split(load_digits(), fraction=0.3, seed=0)
    order = np.random.default_rng(0).permutation(len(rest))
    drift = Drift(at=0.4, new_classes=NEW, new_class_share=0.5)
    [target] = make_fleet(rest.subset(order[:560]), 1, alpha=100.0, shift="none", tail="uniform", seed=0,
                          holdout_fraction=0.05, drift=drift)
    [helper] = make_fleet(rest.subset(order[560:1160]), 1, alpha=100.0, shift="none", tail="uniform", seed=1,
                          holdout_fraction=0.05)
    write_device_timeline(target, root / "target-data", shard_size=128)
    write_device_timeline(helper, root / "helper-data", shard_size=128)
    # The target's model so far has never seen the classes that appear at the drift: trained from scratch
    # (LiteRT gradients) on the cloud's samples of the old classes.
    model = tailored_from_bundle(load_bundle(digits_bundle))
    model.base = dict(init_params(model.spec, None, seed=1))
    rng = np.random.default_rng(1)
    old = np.flatnonzero(np.isin(cloud.y, OLD))
    for _ in range(250):
        idx = rng.choice(old, model.batch)
        model.train_step(cloud.x[idx], cloud.y[idx])
    save_params(root / "target-model.npz", model.base)
    times = np.sort(np.concatenate([target.train.t, target.holdout.t]))
    return Devices(root / "target-data", root / "helper-data", root / "target-model.npz",
                   int(np.searchsorted(times, target.drift_time or 0.0)))


def _wait(cond: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen[str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited with {proc.returncode}: {proc.stderr.read()[-3000:]}"
                                 if proc.stderr else f"{what}: the process exited with {proc.returncode}")
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _canoe_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgepatch.device.canoe_cli", *args]


@pytest.fixture
def companion(mosquitto: object, digits_bundle: Path, tmp_path: Path) -> Iterator[Companion]:
    comp = Companion(CompanionConfig(bundle=digits_bundle, work_dir=tmp_path / "cloud",
                                     broker_host=mosquitto.host, broker_port=mosquitto.port,  # type: ignore[attr-defined]
                                     fleet=FLEET, canoe=True, canoe_timeout_s=10.0))
    comp.start()
    try:
        yield comp
    finally:
        comp.stop()


@pytest.mark.slow
@pytest.mark.broker
def test_helper_and_target_processes_recover_the_drift(devices: Devices, digits_bundle: Path, mosquitto: object,
                                                       companion: Companion, tmp_path: Path) -> None:
    broker = f"mqtt://{mosquitto.host}:{mosquitto.port}"  # type: ignore[attr-defined]
    common = ["--bundle", str(digits_bundle), "--broker", broker, "--fleet", FLEET]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    helper = subprocess.Popen(_canoe_cli("helper", *common, "--data", str(devices.helper_data), "--device-id",
                                         "dev-helper", "--mqtt-protocol", "3.1.1", "--state-dir", str(tmp_path / "helper-state"),
                                         "--warmup-steps", "60", "--run-for", "120"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        canoe = companion.canoe
        assert canoe is not None
        _wait(lambda: "dev-helper" in canoe.metas, 60, "the helper's metadata at the companion", helper)
        assert sum(canoe.metas["dev-helper"].label_histogram[c] for c in NEW) > 0

        summary_path = tmp_path / "target.json"
        target = subprocess.run(_canoe_cli("target", *common, "--data", str(devices.target_data), "--device-id",
                                           "dev-target", "--model", str(devices.target_model),
                                           "--steps-per-tick", "2", "--ticks", "40", "--samples-per-tick", "16",
                                           "--wait-for-help", "30", "--state-dir", str(tmp_path / "target-state"),
                                           "--out", str(summary_path)),
                                capture_output=True, text=True, env=env, timeout=240)
        assert target.returncode == 0, target.stderr[-4000:]

        helper.send_signal(signal.SIGTERM)  # a clean stop on SIGTERM, well before --run-for
        _, helper_err = helper.communicate(timeout=30)
        assert helper.returncode == 0, helper_err[-3000:]
    finally:
        if helper.poll() is None:
            helper.kill()
            helper.wait()
    summary = json.loads(summary_path.read_text())
    print(target.stderr)
    print(json.dumps({k: v for k, v in summary.items() if k != "curve"}, indent=1))

    # A help request for the new classes, made after the drift and answered by the helper.
    assert summary["requests"], "the target never asked for help"
    first = summary["requests"][0]
    assert set(first["classes"]) <= set(NEW) and first["at_sample"] > devices.drift_sample, first
    assert summary["answered"] >= 1 and summary["helpers"] == ["dev-helper"], summary["slices"]
    assert summary["bytes_received"] > 0 and summary["bytes_received"] == sum(s["bytes"] for s in summary["slices"])
    assert summary["final_members"] >= 2, summary["final_weights"]  # own model + ≥ 1 helper slice
    assert all(np.isfinite(a) for a in summary["final_weights"].values())

    # Accuracy on the drifted classes: ~0 right after the drift (the own model never saw them), clearly
    # higher once the helper's slice votes.
    drifted = summary["drifted"]
    assert drifted["help_tick"] is not None and drifted["after_help_samples"] >= 30, drifted
    assert drifted["after_help"] >= drifted["before_help"] + 0.3, drifted
    # Prequential accuracy on every sample after the help beats what the own model alone scored on them.
    after = [p for p in summary["curve"] if p["tick"] > drifted["help_tick"]]
    n = [sum(p["class_total"]) for p in after]
    assert np.average([p["accuracy"] for p in after], weights=n) > np.average([p["own_accuracy"] for p in after],
                                                                              weights=n)
    # Progress lines on stderr, the helper's answer in its log, the model saved for the next run.
    assert "tick   0" in target.stderr and "members 2" in target.stderr
    assert f"answered request={first['request_id']}" in helper_err and "ok=True" in helper_err
    assert (tmp_path / "target-state" / "canoe-model.npz").is_file()
    assert (tmp_path / "helper-state" / "canoe-model.npz").is_file()

    # The companion matched it, relayed the slice and holds the target's reported ensemble.
    canoe = companion.canoe
    assert canoe is not None
    stats = canoe.stats
    assert stats["offers_relayed"] >= 1 and stats["slice_bytes"] == summary["bytes_received"]
    _wait(lambda: "dev-target" in canoe.ensembles, 10, "the target's weights")
    members = canoe.ensembles["dev-target"]["members"]
    assert members[0]["metric"] == weight_metric_name("own") and any(m["helper"] == "dev-helper" for m in members)


def _text(result: Result) -> str:
    """The command's output with rich's line wrapping undone."""
    return " ".join(result.output.split())


@pytest.mark.slow  # digits_bundle exports a bundle once per session
def test_bad_input_gives_clear_errors(digits_bundle: Path, tmp_path: Path) -> None:
    from edgepatch.protocol.params import save_params
    from edgepatch.protocol.shards import write_shard

    runner = CliRunner()
    base = ["--bundle", str(digits_bundle), "--broker", "mqtt://127.0.0.1:1", "--device-id", "d",
            "--connect-timeout", "1"]
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["target", *base, "--data", str(empty), "--ticks", "3"])
    assert result.exit_code == 2 and "holds no samples" in _text(result)
    result = runner.invoke(app, ["target", *base, "--data", str(tmp_path / "missing"), "--ticks", "3"])
    assert result.exit_code == 2 and "does not exist" in _text(result)
    result = runner.invoke(app, ["helper", *base, "--data", str(empty), "--mqtt-protocol", "4"])
    assert result.exit_code == 2 and "--mqtt-protocol must be one of" in _text(result)
    result = runner.invoke(app, ["target", *base, "--data", str(empty), "--ticks", "0"])
    assert result.exit_code == 2 and "--ticks must be >= 1" in _text(result)
    data = tmp_path / "data"
    write_shard(data / "s.npz", np.zeros((4, 1, 8, 8), np.float32), np.arange(4), np.arange(4.0))
    save_params(tmp_path / "wrong.npz", {"fc.weight": np.zeros((2, 2), np.float32)})
    result = runner.invoke(app, ["target", *base, "--data", str(data), "--ticks", "3", "--model",
                                 str(tmp_path / "wrong.npz")])
    assert result.exit_code == 2 and "do not match the bundle's model" in _text(result)
    result = runner.invoke(app, ["target", *base, "--data", str(data), "--ticks", "3", "--model",
                                 str(tmp_path / "absent.npz")])
    assert result.exit_code == 2 and "absent.npz does not exist" in _text(result)
    result = runner.invoke(app, ["target", *base, "--data", str(data), "--ticks", "3"])  # nobody on port 1
    assert result.exit_code == 2 and "no broker at 127.0.0.1:1" in _text(result)
