"""End to end: a fleet of device processes over a real Mosquitto, the FL server, results and plots."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from edgepatch.cloud.fl.simulate import SimConfigError, load_config, parse_config, run_simulation


def _config(bundle: Path, strategies: list[str]) -> dict:
    return {"simulation": {"rounds": 2, "deadline_s": 2.0, "local_steps": 8, "strategies": strategies,
                           "processes": 3, "grace_s": 2.0, "target_accuracy": 0.3},
            "bundle": {"path": str(bundle)},
            "data": {"n_devices": 6, "alpha": 0.5},
            "devices": {"classes": ["raspberry_pi_zero_2w", "raspberry_pi_4", "raspberry_pi_5"],
                        "markov_tick_s": 0.5}}


def _check_every_device_accounted(results: dict, n_devices: int) -> None:
    for name, run in results["strategies"].items():
        assert len(run["rounds"]) == 2, name
        assert len(set(run["device_classes"].values())) == 3
        for rnd in run["rounds"]:
            ids = [d["device_id"] for d in rnd["devices"]]
            assert sorted(ids) == [f"dev-{i:03d}" for i in range(n_devices)]
            for d in rnd["devices"]:
                assert d["outcome"] in ("contributed", "dropped")
                assert d["reason"], f"{name} r{rnd['round']} {d['device_id']}: no reason recorded"
                if d["outcome"] == "contributed":
                    assert d["steps"] == d["steps_planned"] and d["bytes_up"] > 0
            assert rnd["contributed"] + rnd["dropped"] == n_devices
            assert 0.0 <= rnd["accuracy"] <= 1.0
        assert sum(r["contributed"] for r in run["rounds"]) > 0, f"{name}: nobody contributed"
        assert run["worker_problems"] == [], run["worker_problems"]


@pytest.mark.slow
@pytest.mark.broker
def test_small_simulation_over_real_mosquitto(mosquitto, digits_bundle: Path, tmp_path: Path) -> None:
    cfg = parse_config(_config(digits_bundle, ["distreal", "fedavg-drop"]))
    results = run_simulation(cfg, tmp_path, broker_url=f"mqtt://{mosquitto.host}:{mosquitto.port}", quiet=True)
    _check_every_device_accounted(results, 6)
    distreal = results["strategies"]["distreal"]
    decisions = [v for r in distreal["rounds"] for d in r["devices"] for _, v in d["timeline"]]
    assert decisions, "distreal devices recorded no variant decision"
    for name in ("results.json", "rounds.csv", "devices.csv", "accuracy_vs_time.png", "variants_over_time.png",
                 "bytes_moved.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert json.loads((tmp_path / "results.json").read_text())["broker"]["port"] == mosquitto.port


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(SimConfigError, match="unknown key"):
        parse_config({"simulation": {"roundz": 3}})
    with pytest.raises(SimConfigError, match="fedprox"):
        parse_config({"simulation": {"strategies": ["fedprox"]}})
    with pytest.raises(SimConfigError, match="devices.classes"):
        parse_config({"devices": {"classes": ["toaster"]}})
    with pytest.raises(SimConfigError, match="deadline_s"):
        parse_config({"simulation": {"deadline_s": 0}})
    bad = tmp_path / "sim.toml"
    bad.write_text("[simulation\n")
    with pytest.raises(SimConfigError, match="not valid TOML"):
        load_config(bad)


@pytest.mark.slow
@pytest.mark.broker
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed (optional extra)")
def test_simulation_on_a_local_ray_cluster(mosquitto, digits_bundle: Path, tmp_path: Path) -> None:
    cfg = parse_config(_config(digits_bundle, ["fedavg-drop"]))
    results = run_simulation(cfg, tmp_path, broker_url=f"mqtt://{mosquitto.host}:{mosquitto.port}",
                             ray_address="local", quiet=True)
    assert results["broker"]["workers"] == "ray"
    _check_every_device_accounted(results, 6)
