"""End to end: a fleet of device processes over a real Mosquitto, the FL server, results and plots."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgepatch.protocol.ports import free_port
from edgepatch.sim.config import SimConfigError, load_config, parse_config
from edgepatch.sim.hosts import DeviceHosts
from edgepatch.sim.runner import run_simulation


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


RAY_TEST_RESOURCE = "edgepatch_test_head"  # only the fixture's cluster has it


@pytest.fixture
def ray_head(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A real single-node Ray cluster (`ray start --head --block`: 2 CPUs, 200 MB object store) in its own
    process group, so teardown stops exactly this cluster (never `ray stop`, which stops every Ray on the
    machine). Token auth with a token of our own. Yields the cluster's address."""
    token = tmp_path / "ray_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    port = free_port()
    log = open(tmp_path / "ray_head.log", "wb")  # noqa: SIM115 - closed at teardown
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={port}",
         "--num-cpus=2", f"--object-store-memory={200 * 2**20}", "--include-dashboard=false",
         "--disable-usage-stats", f"--ray-client-server-port={free_port()}",
         f"--dashboard-agent-listen-port={free_port()}", f"--resources={json.dumps({RAY_TEST_RESOURCE: 1})}"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=dict(os.environ))
    try:
        end = time.monotonic() + 60
        while time.monotonic() < end:
            assert head.poll() is None, (tmp_path / "ray_head.log").read_text(errors="replace")[-3000:]
            if "Ray runtime started" in (tmp_path / "ray_head.log").read_text(errors="replace"):
                break
            time.sleep(0.2)
        else:
            pytest.fail("the Ray head did not start within 60 s")
        yield f"127.0.0.1:{port}"
    finally:
        # SIGTERM makes Ray drain for up to 30 s; give it a few seconds, then kill our group outright.
        os.killpg(head.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        head.wait(10)
        log.close()


@pytest.mark.slow
@pytest.mark.broker
def test_simulation_runs_its_device_hosts_on_a_ray_cluster(mosquitto, digits_bundle: Path, tmp_path: Path,
                                                          ray_head: str) -> None:
    import ray  # a hard requirement here: ray is in the `sim` extra, which `all` includes

    cfg = parse_config(_config(digits_bundle, ["fedavg-drop"]))
    results = run_simulation(cfg, tmp_path / "out", broker_url=f"mqtt://{mosquitto.host}:{mosquitto.port}",
                             ray_address=ray_head, quiet=True)
    assert results["broker"]["workers"] == "ray"
    # The driver joined the fixture's cluster (its custom resource), not a fresh local one.
    assert results["ray"]["resources"].get(RAY_TEST_RESOURCE) == 1.0, results["ray"]
    _check_every_device_accounted(results, 6)
    hosts = results["strategies"]["fedavg-drop"]["worker_hosts"]
    assert len(hosts) == 3, hosts  # processes = 3 groups of 2 devices, one Ray task each
    driver_pid = results["driver"]["pid"]
    for host in hosts:
        # Each host ran inside a Ray worker process of the cluster's node, not in the driver.
        assert host["pid"] != driver_pid and host["worker_id"], host
        assert host["node_id"] == results["ray"]["driver_node_id"], host
    assert len({h["pid"] for h in hosts}) == 3, "the three hosts should run concurrently in three Ray workers"
    ran = {dev: n for h in hosts for dev, n in h["rounds"].items()}
    assert sorted(ran) == [f"dev-{i:03d}" for i in range(6)]
    assert sum(ran.values()) > 0
    assert not ray.is_initialized(), "run_simulation must disconnect from a cluster it connected to"


def test_ray_is_a_required_extra_not_an_optional_skip() -> None:
    # CI installs `.[all,dev]`, which includes the `sim` extra: the Ray test above must never be skipped.
    assert importlib.util.find_spec("ray") is not None
    with pytest.raises(SimConfigError, match="not connected"):
        DeviceHosts([], 1, "local")


@pytest.mark.broker
def test_local_broker_is_mosquitto_else_the_embedded_amqtt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgepatch.protocol.ports import accepts
    from edgepatch.sim import brokers

    with brokers.local_broker(tmp_path / "mosquitto") as (host, port, protocol):
        assert protocol == "5" and accepts(host, port)
    assert not accepts(host, port), "the Mosquitto it started must stop on exit"

    monkeypatch.setattr(brokers, "find_binary", lambda name="mosquitto": None)
    with brokers.local_broker(tmp_path / "amqtt") as (host, port, protocol):
        assert protocol == "311" and accepts(host, port)
    assert not accepts(host, port), "the embedded broker must stop on exit"


def test_fleet_load_is_seeded_and_covers_every_class_and_traces_follow_the_markov_chain(tmp_path: Path) -> None:
    from edgepatch.device.resources import ResourceTrace
    from edgepatch.sim.load import MARKOV_TICKS, availability_trace, fleet_load

    cfg = parse_config({"data": {"n_devices": 12}, "devices": {"busy_slowdown": 4.0, "markov_tick_s": 0.5}})
    loads, reference = fleet_load(cfg)
    again, _ = fleet_load(cfg)
    assert loads == again, "the same seed must give the same fleet for every strategy"
    assert {load.device_class for load in loads} == set(cfg.devices.classes)
    assert reference == max(load.relative_speed for load in loads)  # default: the fastest device
    trace = ResourceTrace.load(availability_trace(loads[0], cfg, tmp_path))
    busy = loads[0].resources.busy_trace(MARKOV_TICKS)
    assert len(trace.points) == MARKOV_TICKS and trace.points[1].t == 0.5
    assert [p.cpu_share for p in trace.points] == [0.25 if b else 1.0 for b in busy]

    with pytest.raises(SimConfigError, match="devices.trace"):
        availability_trace(loads[0], parse_config({"devices": {"trace": str(tmp_path / "missing.csv")}}), tmp_path)
