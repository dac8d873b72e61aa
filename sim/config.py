"""The simulation config: one TOML or JSON file (every key documented in docs/simulation.md), parsed into
frozen dataclasses; a bad key or value is a `SimConfigError` naming it."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from edgepatch.cloud.fl.strategies import STRATEGIES


class SimConfigError(ValueError):
    """A simulation config that cannot run; the message names the key."""


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
