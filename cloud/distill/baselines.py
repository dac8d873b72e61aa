"""Baselines through the same `Aggregator` interface as MoMoDistill (see cloud/momodistill.py)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import numpy as np

from edgepatch.protocol.model_spec import ModelSpec, PatchSpec

from .config import DistillConfig, DistillResult
from .contributions import CloudData, DeviceContribution, DistillError
from .rounds import data_sizes, labelled_rows, prepare_round, to_numpy
from .steps import Progress, train_base


class ModelOverData:
    """Incremental CE training of W on the labelled data the mode gives the cloud; patches untouched."""

    name = "model_over_data"

    def needs(self, mode: str) -> tuple[str, ...]:
        return ("labelled", "proxy") if mode == "proxy" else ("labelled",)

    def run(self, spec: ModelSpec, patch: PatchSpec, params: Mapping[str, np.ndarray],
            devices: Sequence[DeviceContribution], cloud_data: CloudData, cfg: DistillConfig,
            progress: Progress | None = None) -> DistillResult:
        start = time.perf_counter()
        rnd = prepare_round(spec, patch, params, devices, cloud_data, cfg, need_profile=False)
        labelled = labelled_rows(rnd)
        if labelled is None:
            raise DistillError(f"model_over_data in mode {cfg.mode!r} has no labelled data: give cloud_data.x/y "
                               "or device labels in mode 'samples'")
        rng = np.random.default_rng([cfg.seed, 0xD157])
        hist = train_base(spec, rnd.params, rnd.base_names, labelled, None, beta=0.0,
                          temperature=cfg.temperature, epochs=cfg.step1_epochs, lr=cfg.lr_base,
                          batch=cfg.batch_size, rng=rng, progress=progress) if cfg.step1_epochs else []
        return DistillResult(self.name, cfg.mode, to_numpy(rnd.params),
                             {d.device_id: (d.phi if d.phi is not None else np.zeros(patch.k, np.float32))
                              for d in rnd.devices},
                             losses={"step1": hist}, timing={"total_s": time.perf_counter() - start})


class FedAvgPatches:
    """φ̄ = mean of the devices' φ (weighted by uploaded sample count where known); W, θ̄, Θ unchanged."""

    name = "fedavg_patches"

    def needs(self, mode: str) -> tuple[str, ...]:
        return ()  # the devices' φ alone

    def run(self, spec: ModelSpec, patch: PatchSpec, params: Mapping[str, np.ndarray],
            devices: Sequence[DeviceContribution], cloud_data: CloudData, cfg: DistillConfig,
            progress: Progress | None = None) -> DistillResult:
        start = time.perf_counter()
        rnd = prepare_round(spec, patch, params, devices, cloud_data, cfg, need_profile=False, need_proxy=False)
        with_phi = [d for d in rnd.devices if d.phi is not None]
        if not with_phi:
            raise DistillError("fedavg_patches needs at least one device with a phi")
        weights = data_sizes(with_phi)
        stacked = np.stack([d.phi for d in with_phi if d.phi is not None])
        phi_bar = (stacked * (weights / weights.sum())[:, None]).sum(axis=0)
        phi_bar = phi_bar.astype(np.float32)
        if progress is not None:
            progress("fedavg", 1, float(np.linalg.norm(phi_bar)))
        return DistillResult(self.name, cfg.mode, to_numpy(rnd.params),
                             {d.device_id: (d.phi if d.phi is not None else phi_bar.copy()) for d in rnd.devices},
                             cloud_phi=phi_bar, timing={"total_s": time.perf_counter() - start})
