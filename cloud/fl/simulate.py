"""Fleet simulator: N device workers (processes, or Ray tasks) against a real MQTT broker and the FL server.

One config file (TOML or JSON; every key in docs/simulation.md) describes the dataset split, the device
classes (firmware_configs), each device's speed (class speed × log-normal factor) times its availability
(two-state Markov busy/idle, or a trace file), the rounds, the deadline, the seeds and the strategies.
Devices sleep in proportion to their measured step time (device/fl_client.py), so the wall-clock times
in the results are real. Output in `out_dir`: results.json, rounds.csv, devices.csv and PNG plots.
"""

from __future__ import annotations

import contextlib
import csv
import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from edgepatch.device.fl_client import DeviceSpec, run_device_host
from edgepatch.protocol.transport import parse_broker

from .strategies import STRATEGIES


class SimConfigError(ValueError):
    """A simulation config that cannot run; the message names the key."""


# ------------------------------------------------------------------------------------------------ config

@dataclass(frozen=True)
class SimulationSection:
    name: str = "simulation"
    seed: int = 0
    rounds: int = 5
    deadline_s: float = 5.0
    local_steps: int = 20
    lr: float = 0.05
    strategies: tuple[str, ...] = ("distreal",)
    target_accuracy: float = 0.8
    init: str = "random"  # "random" (He init, seed) or "bundle" (the bundle's pretrained base)
    grace_s: float = 2.0
    max_wait_s: float = 600.0
    processes: int = 0  # OS processes for the devices; 0 = one per device
    fleet: str = "sim"


@dataclass(frozen=True)
class BundleSection:
    path: str = ""  # an existing bundle directory; empty = export one into <out_dir>/bundle
    model: str = "digits_cnn"
    variants: str = "1,0.75,0.5,0.25"
    pretrain_epochs: int = 2
    dse_steps: int = 10


@dataclass(frozen=True)
class DataSection:
    n_devices: int = 8
    alpha: float = 0.5
    shift: str = "none"
    tail: str = "uniform"
    holdout_fraction: float = 0.25
    samples_per_device: int = 0  # 0 = the whole device half of the dataset
    shift_strength: float = 1.0
    device_fraction: float = 0.5  # share of the dataset given to devices (the rest pretrains the bundle)


@dataclass(frozen=True)
class DevicesSection:
    classes: tuple[str, ...] = ("raspberry_pi_zero_2w", "raspberry_pi_4", "raspberry_pi_5")
    class_weights: tuple[float, ...] = ()
    speed_sigma: float = 0.5
    reference_speed: float = 0.0  # 0 = the fastest device's static speed (share 1 = this machine)
    p_become_busy: float = 0.1
    p_become_idle: float = 0.3
    busy_slowdown: float = 3.0
    markov_tick_s: float = 1.0
    trace: str = ""  # a trace file for every device, or a directory of <device_id>.csv|.json
    reselect_every: int = 5


@dataclass(frozen=True)
class StrategyOptions:
    small_keep: float = 0.5
    dropout_keep: float = 0.5


@dataclass(frozen=True)
class SimConfig:
    simulation: SimulationSection = field(default_factory=SimulationSection)
    bundle: BundleSection = field(default_factory=BundleSection)
    data: DataSection = field(default_factory=DataSection)
    devices: DevicesSection = field(default_factory=DevicesSection)
    strategy_options: StrategyOptions = field(default_factory=StrategyOptions)
    broker_protocol: str = "5"
    ray_address: str = ""


def _section(cls: type, raw: Any, where: str) -> Any:
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise SimConfigError(f"[{where}] must be a table")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise SimConfigError(f"[{where}]: unknown key(s) {unknown}; known: {sorted(known)}")
    values: dict[str, Any] = {}
    defaults = cls()
    for key, value in raw.items():
        want = getattr(defaults, key)
        if isinstance(want, tuple):
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list):
                raise SimConfigError(f"[{where}] {key} must be a list")
            value = tuple(value)
        elif isinstance(want, bool) or isinstance(value, bool):
            raise SimConfigError(f"[{where}] {key} must be a {type(want).__name__}, got {value!r}")
        elif isinstance(want, float) and isinstance(value, int):
            value = float(value)
        elif not isinstance(value, type(want)):
            raise SimConfigError(f"[{where}] {key} must be a {type(want).__name__}, got {value!r}")
        values[key] = value
    return cls(**values)


def parse_config(data: Mapping[str, Any]) -> SimConfig:
    known = {"simulation", "bundle", "data", "devices", "strategy_options", "broker", "ray"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SimConfigError(f"unknown section(s) {unknown}; known: {sorted(known)}")
    broker = data.get("broker", {}) or {}
    ray = data.get("ray", {}) or {}
    if set(broker) - {"protocol"} or set(ray) - {"address"}:
        raise SimConfigError("[broker] takes only 'protocol'; [ray] takes only 'address'")
    cfg = SimConfig(_section(SimulationSection, data.get("simulation"), "simulation"),
                    _section(BundleSection, data.get("bundle"), "bundle"),
                    _section(DataSection, data.get("data"), "data"),
                    _section(DevicesSection, data.get("devices"), "devices"),
                    _section(StrategyOptions, data.get("strategy_options"), "strategy_options"),
                    str(broker.get("protocol", "5")), str(ray.get("address", "")))
    _validate(cfg)
    return cfg


def _validate(cfg: SimConfig) -> None:
    s, d, dv = cfg.simulation, cfg.data, cfg.devices
    checks = [
        (s.rounds >= 1, "simulation.rounds must be >= 1"),
        (s.deadline_s > 0, "simulation.deadline_s must be > 0"),
        (s.local_steps >= 1, "simulation.local_steps must be >= 1"),
        (s.lr > 0, "simulation.lr must be > 0"),
        (0 < s.target_accuracy <= 1, "simulation.target_accuracy must be in (0, 1]"),
        (s.init in ("random", "bundle"), "simulation.init must be 'random' or 'bundle'"),
        (s.processes >= 0, "simulation.processes must be >= 0"),
        (bool(s.strategies), "simulation.strategies must name at least one strategy"),
        (d.n_devices >= 1, "data.n_devices must be >= 1"),
        (0 < d.device_fraction < 1, "data.device_fraction must be in (0, 1)"),
        (bool(dv.classes), "devices.classes must name at least one firmware profile"),
        (not dv.class_weights or len(dv.class_weights) == len(dv.classes),
         "devices.class_weights must have one weight per class"),
        (dv.reference_speed >= 0, "devices.reference_speed must be >= 0"),
        (dv.markov_tick_s > 0, "devices.markov_tick_s must be > 0"),
        (cfg.broker_protocol in ("5", "311"), "broker.protocol must be '5' or '311'"),
    ]
    for ok, text in checks:
        if not ok:
            raise SimConfigError(text)
    bad = [n for n in s.strategies if n not in STRATEGIES]
    if bad:
        raise SimConfigError(f"simulation.strategies: unknown {bad}; choose from {sorted(STRATEGIES)}")
    from edgepatch.device.profile import ProfileError, load_profile
    for name in dv.classes:
        try:
            load_profile(name)
        except ProfileError as exc:
            raise SimConfigError(f"devices.classes: {exc}") from None


def load_config(path: str | Path) -> SimConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SimConfigError(f"{path}: unreadable: {exc}") from exc
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise SimConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {exc}") from exc
    return parse_config(data)


# ------------------------------------------------------------------------------------------------ broker

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the broker exited with code {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"the broker did not listen on 127.0.0.1:{port} within {timeout} s")


@contextlib.contextmanager
def local_broker(workdir: Path) -> Iterator[tuple[str, int, str]]:
    """Mosquitto on a free port if the binary exists, else the embedded amqtt (MQTT 3.1.1 only).
    Yields (host, port, protocol)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    binary = shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
                                                if os.access(p, os.X_OK)), None)
    if binary:
        conf = workdir / "mosquitto.conf"
        lines = [f"listener {port} 127.0.0.1", "allow_anonymous true", "max_queued_messages 100000"]
        if os.geteuid() == 0:
            lines.append("user root")
        conf.write_text("\n".join(lines) + "\n")
        cmd, protocol = [binary, "-c", str(conf)], "5"
    else:
        conf = workdir / "amqtt.yaml"
        conf.write_text(f"listeners:\n  default:\n    type: tcp\n    bind: 127.0.0.1:{port}\n"
                        "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n    allow_anonymous: true\n")
        cmd, protocol = [sys.executable, "-m", "amqtt.scripts.broker_script", "-c", str(conf)], "311"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(port, proc)
        yield "127.0.0.1", port, protocol
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------------------------- the fleet

@dataclass
class FleetSetup:
    bundle_dir: Path
    specs: list[DeviceSpec]
    classes: dict[str, str]
    eval_x: np.ndarray
    eval_y: np.ndarray


def prepare_bundle(cfg: SimConfig, out_dir: Path, log: Any = print) -> Path:
    if cfg.bundle.path:
        path = Path(cfg.bundle.path)
        if not (path / "manifest.json").is_file():
            raise SimConfigError(f"bundle.path {path} is not a bundle directory (no manifest.json)")
        return path
    path = out_dir / "bundle"
    if (path / "manifest.json").is_file():
        return path
    from edgepatch.export.pipeline import ExportOptions, export_bundle

    log(f"exporting a {cfg.bundle.model} bundle with variants {cfg.bundle.variants} to {path}")
    export_bundle(ExportOptions(model=cfg.bundle.model, variants=cfg.bundle.variants, runtimes=("litert",),
                                pretrain_epochs=cfg.bundle.pretrain_epochs, dse_steps=cfg.bundle.dse_steps,
                                dse_seeds=(0,), seed=cfg.simulation.seed), path)
    return path


def _availability_trace(dev_resources: Any, cfg: SimConfig, device_id: str, out: Path) -> Path:
    """The device's availability (1 idle, 1/busy_slowdown busy) over time, as a trace file."""
    dv = cfg.devices
    if dv.trace:
        source = Path(dv.trace)
        if source.is_dir():
            matches = [source / f"{device_id}{ext}" for ext in (".csv", ".json") if (source / f"{device_id}{ext}").is_file()]
            if not matches:
                raise SimConfigError(f"devices.trace: no {device_id}.csv or .json in {source}")
            return matches[0]
        if not source.is_file():
            raise SimConfigError(f"devices.trace: {source} does not exist")
        return source
    from edgepatch.device.resources import ResourceTrace

    ticks = 600
    busy = dev_resources.busy_trace(ticks)
    points = [(i * dv.markov_tick_s, 1.0 / dv.busy_slowdown if b else 1.0, 4096.0) for i, b in enumerate(busy)]
    path = out / f"{device_id}.json"
    ResourceTrace.from_points(points).save(path)
    return path


def prepare_fleet(cfg: SimConfig, out_dir: Path, broker: tuple[str, int, str], strategy: str,
                  log: Any = print) -> FleetSetup:
    from edgepatch.data.datasets import dataset_for_model
    from edgepatch.data.fleet import base_split, make_fleet, resource_profiles
    from edgepatch.device.profile import load_profile

    s, d, dv = cfg.simulation, cfg.data, cfg.devices
    bundle_dir = prepare_bundle(cfg, out_dir, log)
    _, device_part = base_split(dataset_for_model(cfg.bundle.model), fraction=1 - d.device_fraction, seed=s.seed)
    fleet = make_fleet(device_part, d.n_devices, alpha=d.alpha, shift=d.shift, tail=d.tail, seed=s.seed,
                       holdout_fraction=d.holdout_fraction, samples_per_device=d.samples_per_device or None,
                       shift_strength=d.shift_strength)
    resources = resource_profiles(d.n_devices, seed=s.seed, speed_sigma=dv.speed_sigma,
                                  p_become_busy=dv.p_become_busy, p_become_idle=dv.p_become_idle,
                                  busy_slowdown=dv.busy_slowdown)
    rng = np.random.default_rng([s.seed, 0xC1A55])
    weights = np.asarray(dv.class_weights or [1.0] * len(dv.classes), float)
    picks = rng.choice(len(dv.classes), size=d.n_devices, p=weights / weights.sum())
    # Every class appears at least once when there are enough devices (so "≥ 3 classes" holds by construction).
    for i in range(min(len(dv.classes), d.n_devices)):
        picks[i] = i
    speeds = {r.device_id: load_profile(dv.classes[picks[i]]).relative_speed * r.speed_factor
              for i, r in enumerate(resources)}
    reference = dv.reference_speed or max(speeds.values())
    data_dir, trace_dir = out_dir / "devices", out_dir / "traces"
    data_dir.mkdir(parents=True, exist_ok=True)
    trace_dir.mkdir(parents=True, exist_ok=True)
    upload_dir = out_dir / strategy / "uploads"
    specs: list[DeviceSpec] = []
    classes: dict[str, str] = {}
    for i, (dev, res) in enumerate(zip(fleet, resources, strict=True)):
        path = data_dir / f"{dev.device_id}.npz"
        np.savez(path, x=dev.train.x.astype(np.float32), y=dev.train.y.astype(np.int64))
        classes[dev.device_id] = dv.classes[picks[i]]
        specs.append(DeviceSpec(
            dev.device_id, s.fleet, str(bundle_dir.resolve()), str(path.resolve()), dv.classes[picks[i]],
            float(speeds[dev.device_id]), float(reference),
            str(_availability_trace(res, cfg, dev.device_id, trace_dir).resolve()), 0.0, broker[0], broker[1],
            broker[2], str(upload_dir.resolve()), s.seed * 1000 + i, dv.reselect_every))
    eval_x = np.concatenate([dev.holdout.x for dev in fleet]).astype(np.float32)
    eval_y = np.concatenate([dev.holdout.y for dev in fleet]).astype(np.int64)
    return FleetSetup(bundle_dir, specs, classes, eval_x, eval_y)


def _chunks(items: list[str], n: int) -> list[list[str]]:
    return [items[i::n] for i in range(n) if items[i::n]]


# Only small things cross Ray's object store (spec JSON in, a host record out): MQTT carries the weights.
LOCAL_RAY_OBJECT_STORE_BYTES = 200 * 2**20


def _ray_device_host(spec_jsons: list[str]) -> dict[str, Any]:
    """A Ray task: run_device_host, plus where it ran (so a caller can tell the hosts really ran on Ray)."""
    import ray

    rounds = run_device_host(spec_jsons)
    ctx = ray.get_runtime_context()
    return {"pid": os.getpid(), "hostname": socket.gethostname(), "node_id": ctx.get_node_id(),
            "worker_id": ctx.get_worker_id(), "rounds": rounds}


class _Workers:
    """Device hosts as local processes (spawned: no inherited broker sockets) or Ray tasks."""

    def __init__(self, specs: list[DeviceSpec], processes: int, ray_address: str) -> None:
        jsons = [s.to_json() for s in specs]
        n = processes or len(specs)
        self.groups = _chunks(jsons, max(1, min(n, len(specs))))
        self.ray_refs: list[Any] = []
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self.hosts: list[dict[str, Any]] = []  # where each host ran: pid, and on Ray its node and worker
        if ray_address:
            ray = require_ray()
            if not ray.is_initialized():
                raise SimConfigError("Ray is not connected: run the fleet inside ray_cluster(address)")
            # num_cpus=0: hosts mostly wait on MQTT and sleep their throttle, and every device must be live
            # at once (a host queued behind a CPU slot would miss every round). max_retries=0: a retried
            # host would rejoin mid-round as a device that already ran; a crash is reported instead.
            remote = ray.remote(num_cpus=0, max_retries=0)(_ray_device_host)
            self.ray_refs = [remote.remote(group) for group in self.groups]
        else:
            ctx = multiprocessing.get_context("spawn")
            self.procs = [ctx.Process(target=run_device_host, args=(group,), daemon=True) for group in self.groups]
            for p in self.procs:
                p.start()

    def join(self, timeout: float = 30.0) -> list[str]:
        """Wait for the hosts to leave; returns problems (a crashed host, one that did not stop)."""
        problems: list[str] = []
        if self.ray_refs:
            import ray

            ready, pending = ray.wait(self.ray_refs, num_returns=len(self.ray_refs), timeout=timeout)
            for ref in ready:
                try:
                    self.hosts.append(ray.get(ref))
                except Exception as exc:
                    problems.append(f"ray device host failed: {exc}")
            for ref in pending:
                ray.cancel(ref, force=True)
                problems.append("a ray device host did not stop in time (cancelled)")
        end = time.time() + timeout
        for p in self.procs:
            p.join(max(0.1, end - time.time()))
            if p.is_alive():
                p.terminate()
                p.join(5)
                problems.append(f"device host pid {p.pid} did not stop in time (terminated)")
            elif p.exitcode:
                problems.append(f"device host pid {p.pid} exited with code {p.exitcode}")
            self.hosts.append({"pid": p.pid, "exitcode": p.exitcode})
        return problems


def require_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise SimConfigError("a Ray address was given but Ray is not installed: pip install 'edgepatch[sim]' "
                             "(or pip install ray)") from None
    return ray


@contextlib.contextmanager
def ray_cluster(address: str) -> Iterator[dict[str, Any]]:
    """Connect this process to Ray: `"local"` starts a small local cluster (this machine's CPUs, a 200 MB
    object store), anything else is the address of a running cluster (`ray start --head`). Disconnects
    (and stops a local cluster) on exit, unless Ray was already connected by the caller. Yields the
    driver's pid, node id and the cluster's resources."""
    ray = require_ray()
    owned = not ray.is_initialized()
    if owned:
        try:
            if address == "local":
                ray.init(num_cpus=os.cpu_count() or 1, object_store_memory=LOCAL_RAY_OBJECT_STORE_BYTES,
                         include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=address, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise SimConfigError(f"cannot connect to Ray at {address!r}: {exc}") from exc
    try:
        yield {"address": address, "driver_pid": os.getpid(), "driver_node_id": ray.get_runtime_context().get_node_id(),
               "resources": {k: float(v) for k, v in ray.cluster_resources().items()}}
    finally:
        if owned:
            ray.shutdown()


# ------------------------------------------------------------------------------------------------- runs

def run_strategy(cfg: SimConfig, strategy_name: str, out_dir: Path, broker: tuple[str, int, str],
                 ray_address: str = "", progress: Any = None, log: Any = print) -> dict[str, Any]:
    from edgepatch.protocol.bundle import load_bundle
    from edgepatch.protocol.params import init_params

    from .server import Evaluator, FlServer
    from .strategies import make_strategy

    s = cfg.simulation
    setup = prepare_fleet(cfg, out_dir, broker, strategy_name, log)
    bundle = load_bundle(setup.bundle_dir)
    spec = bundle.model_spec
    init = bundle.base_params() if s.init == "bundle" else init_params(spec, None, s.seed)
    strategy = make_strategy(strategy_name, spec, bundle.manifest.variants, s.seed,
                             small_keep=cfg.strategy_options.small_keep,
                             dropout_keep=cfg.strategy_options.dropout_keep)
    evaluator = Evaluator(bundle, setup.eval_x, setup.eval_y)
    acc0, loss0 = evaluator(init, strategy.eval_variant())
    server = FlServer(broker_host=broker[0], broker_port=broker[1], fleet=s.fleet, bundle=bundle,
                      strategy=strategy, out_dir=out_dir / strategy_name, expected_devices=[p.device_id for p in setup.specs],
                      evaluator=evaluator, init_params=init, deadline_s=s.deadline_s, local_steps=s.local_steps,
                      lr=s.lr, clock_origin=0.0, grace_s=s.grace_s, max_wait_s=s.max_wait_s,
                      mqtt_protocol=broker[2])
    server.start()
    started = time.time()
    try:
        workers = _Workers(setup.specs, s.processes, ray_address)
    except BaseException:
        server.stop("the device hosts did not start")
        raise
    task = progress.add_task(f"{strategy_name}: joining", total=s.rounds) if progress is not None else None
    problems: list[str] = []
    try:
        server.wait_for_joins()
        join_s = time.time() - started
        server.clock_origin = time.time()  # t = 0 of every load trace and of the accuracy-vs-time curve
        for rnd in range(1, s.rounds + 1):
            rec = server.run_round(rnd)
            if progress is not None and task is not None:
                progress.update(task, advance=1, description=f"{strategy_name}: r{rnd} acc {rec.accuracy:.3f} "
                                f"({rec.contributed}/{rec.contributed + rec.dropped} in)")
    finally:
        server.stop("simulation finished")
        problems = workers.join()
    rounds = [asdict(r) for r in server.records]
    reached = next((r["closed_s"] for r in rounds if r["accuracy"] >= s.target_accuracy), None)
    return {"strategy": strategy_name, "initial_accuracy": acc0, "initial_loss": loss0,
            "final_accuracy": rounds[-1]["accuracy"] if rounds else acc0,
            "time_to_target_s": reached, "target_accuracy": s.target_accuracy,
            "total_time_s": rounds[-1]["closed_s"] if rounds else 0.0, "join_s": round(join_s, 2),
            "bytes_down": sum(r["bytes_down"] for r in rounds), "bytes_up": sum(r["bytes_up"] for r in rounds),
            "rounds": rounds, "device_classes": setup.classes,
            "device_speeds": {p.device_id: p.relative_speed for p in setup.specs},
            "reference_speed": setup.specs[0].reference_speed, "rejects": server.rejects, "worker_problems": problems,
            "worker_hosts": workers.hosts}


def run_simulation(cfg: SimConfig, out_dir: str | Path, broker_url: str | None = None, ray_address: str = "",
                   quiet: bool = False) -> dict[str, Any]:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    console = Console(quiet=quiet)
    ray_address = ray_address or cfg.ray_address
    results: dict[str, Any] = {"config": asdict(cfg), "strategies": {}}
    with contextlib.ExitStack() as stack:
        if broker_url:
            try:
                host, port = parse_broker(broker_url)
            except ValueError as exc:
                raise SimConfigError(str(exc)) from exc
            broker = (host, port, cfg.broker_protocol)
        else:
            broker = stack.enter_context(local_broker(out / "broker"))
        results["broker"] = {"host": broker[0], "port": broker[1], "protocol": broker[2],
                             "workers": "ray" if ray_address else "processes"}
        results["driver"] = {"pid": os.getpid(), "hostname": socket.gethostname()}
        if ray_address:
            results["ray"] = stack.enter_context(ray_cluster(ray_address))
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=console, disable=quiet) as progress:
            for name in cfg.simulation.strategies:
                results["strategies"][name] = run_strategy(cfg, name, out, broker, ray_address, progress,
                                                           log=console.print)
    write_results(results, out)
    if not quiet:
        console.print(summary_table(results))
    return results


def summary_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, r in results["strategies"].items():
        drops = sum(x["dropped"] for x in r["rounds"])
        total = sum(x["contributed"] + x["dropped"] for x in r["rounds"])
        rows.append({"strategy": name, "final_accuracy": round(r["final_accuracy"], 4),
                     "time_to_target_s": None if r["time_to_target_s"] is None else round(r["time_to_target_s"], 2),
                     "total_time_s": round(r["total_time_s"], 2), "drop_rate": round(drops / max(1, total), 3),
                     "MB_up": round(r["bytes_up"] / 1e6, 3), "MB_down": round(r["bytes_down"] / 1e6, 3)})
    return rows


def summary_table(results: Mapping[str, Any]) -> Any:
    from rich.table import Table

    rows = summary_rows(results)
    target = next(iter(results["strategies"].values()))["target_accuracy"] if results["strategies"] else 0
    table = Table(title=f"strategies (target accuracy {target})")
    for key in rows[0] if rows else []:
        table.add_column(key)
    for row in rows:
        table.add_row(*["—" if v is None else str(v) for v in row.values()])
    return table


def write_results(results: Mapping[str, Any], out: Path) -> None:
    from edgepatch.protocol.params import write_atomic

    write_atomic(out / "results.json", json.dumps(results, indent=1, default=str).encode())
    with open(out / "rounds.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["strategy", "round", "opened_s", "closed_s", "accuracy", "eval_loss", "contributed", "dropped",
                    "bytes_down", "bytes_up"])
        for name, r in results["strategies"].items():
            for x in r["rounds"]:
                w.writerow([name, x["round"], x["opened_s"], x["closed_s"], x["accuracy"], x["eval_loss"],
                            x["contributed"], x["dropped"], x["bytes_down"], x["bytes_up"]])
    with open(out / "devices.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["strategy", "round", "device", "class", "outcome", "reason", "steps", "steps_planned",
                    "variant_steps", "train_s", "throttle_s", "bytes_down", "bytes_up"])
        for name, r in results["strategies"].items():
            for x in r["rounds"]:
                for d in x["devices"]:
                    w.writerow([name, x["round"], d["device_id"], r["device_classes"].get(d["device_id"], ""),
                                d["outcome"], d["reason"], d["steps"], d["steps_planned"],
                                json.dumps(d["variant_steps"], sort_keys=True), d["train_s"], d["throttle_s"],
                                d["bytes_down"], d["bytes_up"]])
    write_plots(results, out)


def write_plots(results: Mapping[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strategies = results["strategies"]
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in strategies.items():
        xs = [0.0] + [x["closed_s"] for x in r["rounds"]]
        ys = [r["initial_accuracy"]] + [x["accuracy"] for x in r["rounds"]]
        ax.plot(xs, ys, marker="o", ms=3, label=name)
    if strategies:
        ax.axhline(next(iter(strategies.values()))["target_accuracy"], color="gray", ls=":", lw=1, label="target")
    ax.set_xlabel("wall-clock time (s)")
    ax.set_ylabel("global accuracy (pooled device holdouts)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out / "accuracy_vs_time.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    n = max(1, len(strategies))
    fig, axes = plt.subplots(n, 1, figsize=(8, 2.2 * n + 0.6), squeeze=False)
    # One colour per variant across every panel.
    all_variants = sorted({v for r in strategies.values() for x in r["rounds"] for d in x["devices"]
                           for _, v in d["timeline"]})
    cmap = plt.get_cmap("viridis", max(2, len(all_variants)))
    colour = {v: cmap(i) for i, v in enumerate(all_variants)}
    for ax, (name, r) in zip(axes[:, 0], strategies.items(), strict=False):
        devices = sorted(r["device_speeds"], key=lambda d: r["device_speeds"][d])
        row = {d: i for i, d in enumerate(devices)}
        pts = [(t, row[d["device_id"]], v) for x in r["rounds"] for d in x["devices"] for t, v in d["timeline"]]
        keeps = sorted({v for _, _, v in pts})
        for vid in keeps:
            sel = [(t, y) for t, y, v in pts if v == vid]
            ax.scatter([p[0] for p in sel], [p[1] for p in sel], s=8, color=colour[vid], label=vid)
        for x in r["rounds"]:
            ax.axvline(x["opened_s"], color="gray", lw=0.4)
        ax.set_title(f"{name}: variant decisions per device (rows: slowest → fastest)", fontsize=9)
        ax.set_ylabel("device")
        if keeps:
            ax.legend(fontsize=7, loc="upper right", ncol=min(4, len(keeps)))
    axes[-1, 0].set_xlabel("wall-clock time (s)")
    fig.tight_layout()
    paths.append(out / "variants_over_time.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(strategies)
    up = [strategies[n]["bytes_up"] / 1e6 for n in names]
    down = [strategies[n]["bytes_down"] / 1e6 for n in names]
    bar_x = np.arange(len(names))
    ax.bar(bar_x - 0.2, down, 0.4, label="down (global weights + round messages)")
    ax.bar(bar_x + 0.2, up, 0.4, label="up (touched entries + masks + messages)")
    ax.set_xticks(bar_x, names, rotation=20, fontsize=8)
    ax.set_ylabel("MB moved, all devices, all rounds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "bytes_moved.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def simulate_main(config_path: str | Path, broker_url: str | None = None, out_dir: str | Path = "results/simulate",
                  ray_address: str | None = None) -> Path:
    """CLI entry (`edgepatch simulate`): run the config's strategies; returns the results.json path."""
    cfg = load_config(config_path)
    run_simulation(cfg, out_dir, broker_url, ray_address or "")
    return Path(out_dir) / "results.json"


if __name__ == "__main__":  # pragma: no cover - convenience: python -m edgepatch.cloud.fl.simulate cfg.toml
    simulate_main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] != "-" else None,
                  sys.argv[3] if len(sys.argv) > 3 else "results/simulate")
