"""Load and availability of the simulated devices: which firmware class each device is, its static speed
(class speed × the log-normal factor of `data.resources.resource_profiles`), and its availability over time
(a two-state Markov busy/idle chain rendered to a trace file, or trace files given in the config)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import SimConfig, SimConfigError

MARKOV_TICKS = 600  # rendered ticks per device; device traces loop after them


@dataclass(frozen=True)
class DeviceLoad:
    device_id: str
    device_class: str  # firmware profile name
    relative_speed: float  # class speed × speed factor (reference device = 1)
    resources: Any  # data.resources.DeviceResources: speed factor and Markov load


def fleet_load(cfg: SimConfig) -> tuple[list[DeviceLoad], float]:
    """Every device's class and speed, and the speed this machine stands for (`reference_speed`, default
    the fastest device's). Same seed ⇒ same classes, speeds and load for every strategy."""
    from edgepatch.data.resources import resource_profiles
    from edgepatch.device.profile import load_profile

    s, d, dv = cfg.simulation, cfg.data, cfg.devices
    resources = resource_profiles(d.n_devices, seed=s.seed, speed_sigma=dv.speed_sigma,
                                  p_become_busy=dv.p_become_busy, p_become_idle=dv.p_become_idle,
                                  busy_slowdown=dv.busy_slowdown)
    rng = np.random.default_rng([s.seed, 0xC1A55])
    weights = np.asarray(dv.class_weights or [1.0] * len(dv.classes), float)
    picks = rng.choice(len(dv.classes), size=d.n_devices, p=weights / weights.sum())
    # Every class appears at least once when there are enough devices (so "≥ 3 classes" holds by construction).
    for i in range(min(len(dv.classes), d.n_devices)):
        picks[i] = i
    loads = [DeviceLoad(r.device_id, dv.classes[picks[i]],
                        float(load_profile(dv.classes[picks[i]]).relative_speed * r.speed_factor), r)
             for i, r in enumerate(resources)]
    return loads, float(dv.reference_speed or max(load.relative_speed for load in loads))


def availability_trace(load: DeviceLoad, cfg: SimConfig, out: Path) -> Path:
    """The device's availability (1 idle, 1/busy_slowdown busy) over time, as a trace file: the config's
    trace (one file for all, or `<device_id>.csv|.json` in a directory), else its Markov chain."""
    dv = cfg.devices
    if dv.trace:
        source = Path(dv.trace)
        if source.is_dir():
            matches = [source / f"{load.device_id}{ext}" for ext in (".csv", ".json")
                       if (source / f"{load.device_id}{ext}").is_file()]
            if not matches:
                raise SimConfigError(f"devices.trace: no {load.device_id}.csv or .json in {source}")
            return matches[0]
        if not source.is_file():
            raise SimConfigError(f"devices.trace: {source} does not exist")
        return source
    from edgepatch.device.resources import ResourceTrace

    busy = load.resources.busy_trace(MARKOV_TICKS)
    points = [(i * dv.markov_tick_s, 1.0 / dv.busy_slowdown if b else 1.0, 4096.0) for i, b in enumerate(busy)]
    path = out / f"{load.device_id}.json"
    ResourceTrace.from_points(points).save(path)
    return path
