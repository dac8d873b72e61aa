"""MoMoDistill: the cloud's "model over models" update (DCCL, KDD 2021; PAPERS.md §1), plus baselines.

Step 1 updates the base W of the cloud model f(x; W):
    min_W  Σ CE(y, f(x; W)) over labelled rows  +  β·T²·Σ_n w_n·KL(p_n(x) ‖ f(x; W))  over teacher rows,
where the teacher p_n = f(x; W_old, θ̄ + Θ·φ_n) is device n's OWN patched model on device n's samples.
`kd_weighting="device"` (default) gives every device's KD rows the same total weight (w_n ∝ 1/|D_n|), so
a tail device's personalized knowledge is not drowned by head devices as it is in the sample-weighted
CE term; "sample" weighs every row 1.

Measured (benchmarks/momodistill.py, digits, long-tailed time-ordered fleet, results/momodistill*.json):
with labelled uploads, model-over-data already fits the device data better than the device teachers do
(old W + an 8-dim φ), so KD with β ≥ 0.5 makes the cloud model worse on head AND tail; the tuned default
(β = 0.1, T = 1, per-device weights) is a light regularizer whose gains are within the holdout noise.
See `DistillConfig` for how it was chosen and the benchmark JSON for the test-seed numbers.
Step 2 freezes the new W and distils θ̄, Θ (and an auxiliary encoder) so that
f(x; W_new, θ̄ + Θ·φ̂_n) matches p_n, with φ̂_n = φ_n ("device") or φ̂_n = encoder(φ_n, profile_n)
("encoder"); the encoder also gives a cold-start device φ̂ = encoder(profile) (see distill/encoder.py).

Data modes (where the teacher rows come from):
- "samples": devices opted in to upload raw samples (x, and y if they share labels). Most signal: CE on
  device labels, teachers evaluated by the cloud on the device's own inputs.
- "teacher_outputs": devices upload x with their patched model's logits; no φ evaluation in the cloud.
- "proxy" (DEFAULT): devices upload only φ (k floats — what the protocol already carries) and optionally
  a small profile vector; the cloud evaluates every device's patched model on an unlabeled proxy set it
  holds (FedDF-style). Default because raw data never leaves the device and no new upload is needed;
  the price is that teachers are queried off their own input distribution. In step 1 the per-device
  KL terms on the shared proxy set are summed as one KL to the mean of the teachers' probabilities
  (Σ_n KL(p_n‖q) = N·KL(p̄‖q) + const), so proxy rows are not duplicated per device.

Baselines, same interface (`AGGREGATORS`, `run_aggregator`):
- "model_over_data": step 1 with β = 0 (CE on the same labelled data, no distillation); θ̄, Θ and φ kept.
- "fedavg_patches": φ̄ = data-size-weighted mean of the devices' φ; W, θ̄ and Θ unchanged (averaging the
  metapatches is averaging the patches, since θ is linear in φ); the cloud model is the patched model
  at φ̄ (`DistillResult.cloud_phi`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from edgepatch.cloud.distill.baselines import FedAvgPatches, ModelOverData
from edgepatch.cloud.distill.config import PHI_SOURCES, Aggregator, DistillConfig, DistillResult
from edgepatch.cloud.distill.contributions import (
    DATA_MODES,
    DEFAULT_MODE,
    CloudData,
    DeviceContribution,
    DistillError,
    device_profile,
)
from edgepatch.cloud.distill.encoder import encode_phi, init_encoder
from edgepatch.cloud.distill.rounds import (
    device_teachers,
    labelled_rows,
    prepare_round,
    step1_teachers,
    to_numpy,
)
from edgepatch.cloud.distill.steps import (
    PatchDistillState,
    Progress,
    device_phi_hat,
    distill_patches,
    mean_kd_base,
    mean_kd_patched,
    train_base,
)
from edgepatch.cloud.robust import screen_contributions
from edgepatch.export.torch_model import forward, to_tensors
from edgepatch.protocol.model_spec import ModelSpec, PatchSpec

__all__ = [
    "AGGREGATORS", "DATA_MODES", "DEFAULT_MODE", "Aggregator", "CloudData", "DeviceContribution",
    "DistillConfig", "DistillError", "DistillResult", "cloud_logits", "device_profile", "encode_phi",
    "PHI_SOURCES", "missing_data", "momodistill", "personalized_logits", "run_aggregator",
]

# -- the aggregators ---------------------------------------------------------------------------------


class MoMoDistill:
    name = "momodistill"

    def needs(self, mode: str) -> tuple[str, ...]:
        return ("proxy",) if mode == "proxy" else ("device_samples",)

    def run(self, spec: ModelSpec, patch: PatchSpec, params: Mapping[str, np.ndarray],
            devices: Sequence[DeviceContribution], cloud_data: CloudData, cfg: DistillConfig,
            progress: Progress | None = None) -> DistillResult:
        start = time.perf_counter()
        use_encoder = cfg.phi_source == "encoder"
        rnd = prepare_round(spec, patch, params, devices, cloud_data, cfg, need_profile=use_encoder)
        if not use_encoder and any(d.phi is None for d in rnd.devices):
            raise DistillError("phi_source 'device' needs every device's phi; use 'encoder' for cold starts")
        rng = np.random.default_rng([cfg.seed, 0xD157])
        T = cfg.temperature
        rows = device_teachers(rnd)
        step1_rows = step1_teachers(rnd, rows)
        kd1_before = mean_kd_base(spec, rnd.params, [step1_rows], T)
        t0 = time.perf_counter()
        hist1 = train_base(spec, rnd.params, rnd.base_names, labelled_rows(rnd), step1_rows, beta=cfg.beta,
                           temperature=T, epochs=cfg.step1_epochs, lr=cfg.lr_base, batch=cfg.batch_size,
                           rng=rng, progress=progress) if cfg.step1_epochs else []
        t1 = time.perf_counter()
        kd1_after = mean_kd_base(spec, rnd.params, [step1_rows], T)

        encoder = None
        if use_encoder:
            profiles = np.stack([d.profile for d in rnd.devices if d.profile is not None])
            encoder = to_tensors(init_encoder(patch.k, profiles, cfg.encoder_hidden, cfg.seed))
        state = PatchDistillState(
            rnd.params, encoder,
            [None if d.phi is None else torch.from_numpy(d.phi) for d in rnd.devices],
            [None if d.profile is None else torch.from_numpy(d.profile) for d in rnd.devices])
        with torch.no_grad():
            phis_before = [device_phi_hat(state, i, patch.k) for i in range(len(rnd.devices))]
        kd2_before = mean_kd_patched(spec, patch, rnd.params, rows, phis_before, T)
        hist2 = distill_patches(spec, patch, state, rnd.patch_names, rows, temperature=T,
                                epochs=cfg.step2_epochs, lr_patch=cfg.lr_patch, lr_encoder=cfg.lr_encoder,
                                batch=cfg.batch_size, cold_start_dropout=cfg.cold_start_dropout, rng=rng,
                                progress=progress) if cfg.step2_epochs else []
        t2 = time.perf_counter()
        with torch.no_grad():
            phis_after = [device_phi_hat(state, i, patch.k) for i in range(len(rnd.devices))]
        kd2_after = mean_kd_patched(spec, patch, state.params, rows, phis_after, T)
        return DistillResult(
            self.name, cfg.mode, to_numpy(state.params),
            {d.device_id: p.numpy().astype(np.float32).copy() for d, p in zip(rnd.devices, phis_after, strict=True)},
            encoder=to_numpy(state.encoder) if state.encoder is not None else {},
            losses={"step1": hist1, "step2": hist2},
            metrics={"kd_step1_before": kd1_before, "kd_step1_after": kd1_after,
                     "kd_step2_before": kd2_before, "kd_step2_after": kd2_after},
            timing={"prepare_s": t0 - start, "step1_s": t1 - t0, "step2_s": t2 - t1,
                    "total_s": time.perf_counter() - start})


AGGREGATORS: dict[str, Aggregator] = {a.name: a for a in (MoMoDistill(), ModelOverData(), FedAvgPatches())}


def missing_data(name: str, mode: str, have: set[str]) -> list[str]:
    """What aggregator `name` in data mode `mode` needs and `have` lacks (empty: it can run)."""
    if name not in AGGREGATORS:
        raise DistillError(f"unknown aggregator {name!r}; known: {', '.join(sorted(AGGREGATORS))}")
    if mode not in DATA_MODES:
        raise DistillError(f"unknown data mode {mode!r}; allowed: {', '.join(DATA_MODES)}")
    return [need for need in AGGREGATORS[name].needs(mode) if need not in have]


def run_aggregator(name: str, spec: ModelSpec, patch: PatchSpec, params: Mapping[str, np.ndarray],
                   devices: Sequence[DeviceContribution], cloud_data: CloudData,
                   cfg: DistillConfig | None = None, progress: Progress | None = None) -> DistillResult:
    if name not in AGGREGATORS:
        raise DistillError(f"unknown aggregator {name!r}; known: {', '.join(sorted(AGGREGATORS))}")
    cfg = cfg or DistillConfig()
    # A bad upload (NaN, wrong size, oversized φ) is dropped with a logged reason and large φ are clipped,
    # so one device can neither abort nor steer the round (cloud/robust.py).
    screened = screen_contributions(devices, spec, patch, cfg.mode)
    result = AGGREGATORS[name].run(spec, patch, params, screened.devices, cloud_data, cfg, progress)
    if screened.dropped or screened.clipped:
        result.metrics.update({"devices_dropped": float(len(screened.dropped)),
                               "devices_clipped": float(len(screened.clipped))})
    return result


def momodistill(spec: ModelSpec, patch: PatchSpec, params: Mapping[str, np.ndarray],
                devices: Sequence[DeviceContribution], cloud_data: CloudData,
                cfg: DistillConfig | None = None, progress: Progress | None = None) -> DistillResult:
    """One MoMoDistill round (module doc); seeded by `cfg.seed`, leaves torch's global RNG alone."""
    return run_aggregator("momodistill", spec, patch, params, devices, cloud_data, cfg, progress)


# -- evaluation helpers (benchmarks, tests, the cloud's dashboards) ------------------------------------


def cloud_logits(spec: ModelSpec, patch: PatchSpec, result: DistillResult, x: np.ndarray) -> np.ndarray:
    """Logits of the round's cloud model: f(x; W) or, for fedavg_patches, the patched model at φ̄."""
    tensors = to_tensors(result.params)
    with torch.no_grad():
        if result.cloud_phi is None:
            return forward(spec, None, tensors, torch.from_numpy(np.asarray(x, np.float32))).numpy()
        return forward(spec, patch, tensors, torch.from_numpy(np.asarray(x, np.float32)),
                       torch.from_numpy(result.cloud_phi)).numpy()


def personalized_logits(spec: ModelSpec, patch: PatchSpec, params: Mapping[str, np.ndarray], phi: np.ndarray,
                        x: np.ndarray) -> np.ndarray:
    """f(x; W, θ̄ + Θ·φ) for one device."""
    with torch.no_grad():
        return forward(spec, patch, to_tensors(params), torch.from_numpy(np.asarray(x, np.float32)),
                       torch.from_numpy(np.asarray(phi, np.float32))).numpy()
