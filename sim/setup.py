"""What one strategy's run needs on disk: the bundle (given, or exported once into the output folder),
every device's training shard and availability trace, and the `DeviceSpec`s the device hosts run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgepatch.device.fl_client import DeviceSpec

from .config import SimConfig, SimConfigError
from .load import availability_trace, fleet_load


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


def prepare_fleet(cfg: SimConfig, out_dir: Path, broker: tuple[str, int, str], strategy: str,
                  log: Any = print) -> FleetSetup:
    from edgepatch.data.datasets import dataset_for_model
    from edgepatch.data.fleet import base_split, make_fleet

    s, d = cfg.simulation, cfg.data
    bundle_dir = prepare_bundle(cfg, out_dir, log)
    _, device_part = base_split(dataset_for_model(cfg.bundle.model), fraction=1 - d.device_fraction, seed=s.seed)
    fleet = make_fleet(device_part, d.n_devices, alpha=d.alpha, shift=d.shift, tail=d.tail, seed=s.seed,
                       holdout_fraction=d.holdout_fraction, samples_per_device=d.samples_per_device or None,
                       shift_strength=d.shift_strength)
    loads, reference = fleet_load(cfg)
    data_dir, trace_dir = out_dir / "devices", out_dir / "traces"
    data_dir.mkdir(parents=True, exist_ok=True)
    trace_dir.mkdir(parents=True, exist_ok=True)
    upload_dir = out_dir / strategy / "uploads"
    specs: list[DeviceSpec] = []
    classes: dict[str, str] = {}
    for i, (dev, load) in enumerate(zip(fleet, loads, strict=True)):
        path = data_dir / f"{dev.device_id}.npz"
        np.savez(path, x=dev.train.x.astype(np.float32), y=dev.train.y.astype(np.int64))
        classes[dev.device_id] = load.device_class
        specs.append(DeviceSpec(
            dev.device_id, s.fleet, str(bundle_dir.resolve()), str(path.resolve()), load.device_class,
            load.relative_speed, reference, str(availability_trace(load, cfg, trace_dir).resolve()), 0.0,
            broker[0], broker[1], broker[2], str(upload_dir.resolve()), s.seed * 1000 + i,
            cfg.devices.reselect_every))
    eval_x = np.concatenate([dev.holdout.x for dev in fleet]).astype(np.float32)
    eval_y = np.concatenate([dev.holdout.y for dev in fleet]).astype(np.int64)
    return FleetSetup(bundle_dir, specs, classes, eval_x, eval_y)
