"""MoMoDistill: the cloud's "model over models" update (DCCL, KDD 2021; PAPERS.md §1), plus baselines.

Step 1 updates the base W of the cloud model f(x; W):
    min_W  Σ CE(y, f(x; W)) over labelled rows  +  β·T²·KL(p_n(x) ‖ f(x; W))  over teacher rows,
where the teacher p_n = f(x; W_old, θ̄ + Θ·φ_n) is device n's OWN patched model on device n's samples.
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
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from edgepatch.cloud.distill.contributions import (
    DATA_MODES,
    DEFAULT_MODE,
    CloudData,
    DeviceContribution,
    DistillError,
    device_profile,
    profile_size,
    validate_cloud_data,
    validate_devices,
)
from edgepatch.cloud.distill.encoder import EncoderParams, encode_phi, init_encoder
from edgepatch.cloud.distill.steps import (
    LabelledRows,
    PatchDistillState,
    Progress,
    TeacherRows,
    device_phi_hat,
    distill_patches,
    mean_kd_base,
    mean_kd_patched,
    patched_logits,
    tempered_probs,
    train_base,
)
from edgepatch.export.torch_model import forward, to_tensors
from edgepatch.protocol.model_spec import ModelSpec, PatchSpec, param_infos
from edgepatch.protocol.params import Params, ParamsError, check_params

__all__ = [
    "AGGREGATORS", "DATA_MODES", "DEFAULT_MODE", "Aggregator", "CloudData", "DeviceContribution",
    "DistillConfig", "DistillError", "DistillResult", "cloud_logits", "device_profile", "encode_phi",
    "momodistill", "personalized_logits", "run_aggregator",
]

PHI_SOURCES = ("encoder", "device")


@dataclass(frozen=True)
class DistillConfig:
    mode: str = DEFAULT_MODE
    beta: float = 1.0  # weight of the KD term in step 1
    temperature: float = 2.0
    step1_epochs: int = 5
    step2_epochs: int = 5
    lr_base: float = 1e-3
    lr_patch: float = 3e-3
    lr_encoder: float = 3e-3
    batch_size: int = 64
    phi_source: str = "encoder"  # φ̂_n in step 2: "encoder"(φ_n, profile) or the device's "device" φ_n
    train_bar: bool = True  # distil θ̄ as well as Θ in step 2
    encoder_hidden: int = 32
    cold_start_dropout: float = 0.3
    seed: int = 0

    def validate(self) -> None:
        if self.mode not in DATA_MODES:
            raise DistillError(f"unknown data mode {self.mode!r}; allowed: {', '.join(DATA_MODES)}")
        if self.phi_source not in PHI_SOURCES:
            raise DistillError(f"unknown phi_source {self.phi_source!r}; allowed: {', '.join(PHI_SOURCES)}")
        if not (self.beta >= 0 and np.isfinite(self.beta)):
            raise DistillError(f"beta must be finite and >= 0, got {self.beta}")
        if not (self.temperature > 0 and np.isfinite(self.temperature)):
            raise DistillError(f"temperature must be > 0, got {self.temperature}")
        if self.step1_epochs < 0 or self.step2_epochs < 0 or self.batch_size < 1 or self.encoder_hidden < 1:
            raise DistillError("epochs must be >= 0, batch_size and encoder_hidden >= 1")
        if not 0.0 <= self.cold_start_dropout < 1.0:
            raise DistillError(f"cold_start_dropout must be in [0, 1), got {self.cold_start_dropout}")
        for name in ("lr_base", "lr_patch", "lr_encoder"):
            if not getattr(self, name) > 0:
                raise DistillError(f"{name} must be > 0")


@dataclass
class DistillResult:
    """New parameters (all roles), per-device φ̂ to send back, encoder weights, losses and timing.

    `cloud_phi` None: the cloud model is the unpatched f(x; W); otherwise the patched model at that φ.
    `metrics` holds kd_step1_before/after (unpatched model vs teachers) and kd_step2_before/after
    (patched models vs their teachers: new W with old θ̄,Θ,φ_n → new W with new θ̄,Θ,φ̂_n).
    """

    method: str
    mode: str
    params: Params
    device_phi: dict[str, np.ndarray]
    encoder: EncoderParams = field(default_factory=dict)
    cloud_phi: np.ndarray | None = None
    losses: dict[str, list[float]] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)

    def cold_start_phi(self, profile: np.ndarray) -> np.ndarray:
        """φ̂ for a device that has no φ yet (zeros when the round trained no encoder)."""
        if not self.encoder:
            return np.zeros_like(next(iter(self.device_phi.values())))
        return encode_phi(self.encoder, profile)


class Aggregator(Protocol):
    name: str

    def run(self, spec: ModelSpec, patch: PatchSpec, params: Mapping[str, np.ndarray],
            devices: Sequence[DeviceContribution], cloud_data: CloudData, cfg: DistillConfig,
            progress: Progress | None = None) -> DistillResult: ...


# -- shared preparation ------------------------------------------------------------------------------


@dataclass
class _Round:
    spec: ModelSpec
    patch: PatchSpec
    cfg: DistillConfig
    devices: list[DeviceContribution]
    cloud: CloudData
    params: dict[str, torch.Tensor]
    base_names: list[str]
    patch_names: list[str]


def _prepare(spec: ModelSpec, patch: PatchSpec, params: Mapping[str, np.ndarray],
             devices: Sequence[DeviceContribution], cloud_data: CloudData, cfg: DistillConfig,
             need_profile: bool) -> _Round:
    cfg.validate()
    try:
        check_params(params, spec, patch)
    except ParamsError as exc:
        raise DistillError(f"params: {exc}") from exc
    devs = validate_devices(devices, spec, patch, cfg.mode, need_profile)
    cloud = validate_cloud_data(cloud_data, spec, cfg.mode)
    infos = param_infos(spec, patch)
    tensors = to_tensors({n: params[n] for n in infos})
    return _Round(spec, patch, cfg, devs, cloud, tensors,
                  [n for n, i in infos.items() if i.role == "base"],
                  [n for n, i in infos.items() if i.role == "basis" or (i.role == "bar" and cfg.train_bar)])


def _labelled_rows(rnd: _Round) -> LabelledRows | None:
    """Cloud labelled data plus device labels where the mode carries them."""
    xs = [rnd.cloud.x] if rnd.cloud.x is not None else []
    ys = [rnd.cloud.y] if rnd.cloud.y is not None else []
    for d in rnd.devices:
        if d.x is not None and d.y is not None:
            xs.append(d.x)
            ys.append(d.y)
    if not xs:
        return None
    return LabelledRows(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)))


def _device_teachers(rnd: _Round) -> list[TeacherRows]:
    """p_n per device on the rows of the mode, from the OLD parameters (or the uploaded logits)."""
    T = rnd.cfg.temperature
    rows: list[TeacherRows] = []
    with torch.no_grad():
        for i, d in enumerate(rnd.devices):
            if rnd.cfg.mode == "teacher_outputs":
                assert d.x is not None and d.logits is not None
                rows.append(TeacherRows(torch.from_numpy(d.x), tempered_probs(torch.from_numpy(d.logits), T), i))
                continue
            x_np = d.x if rnd.cfg.mode == "samples" else rnd.cloud.proxy_x
            assert x_np is not None and d.phi is not None
            x = torch.from_numpy(x_np)
            logits = patched_logits(rnd.spec, rnd.patch, rnd.params, x, torch.from_numpy(d.phi))
            rows.append(TeacherRows(x, tempered_probs(logits, T), i))
    return rows


def _step1_teachers(rnd: _Round, rows: list[TeacherRows]) -> TeacherRows:
    if rnd.cfg.mode == "proxy":  # one row per proxy sample, teacher = mean of the devices' probabilities
        return TeacherRows(rows[0].x, torch.stack([r.probs for r in rows]).mean(dim=0))
    return TeacherRows(torch.cat([r.x for r in rows]), torch.cat([r.probs for r in rows]))


def _numpy(params: Mapping[str, torch.Tensor]) -> Params:
    return {n: t.detach().numpy().astype(np.float32).copy() for n, t in params.items()}


def _data_sizes(devices: Sequence[DeviceContribution]) -> np.ndarray:
    return np.array([len(d.x) if d.x is not None else 1 for d in devices], dtype=np.float64)


# -- the aggregators ---------------------------------------------------------------------------------


class MoMoDistill:
    name = "momodistill"

    def run(self, spec: ModelSpec, patch: PatchSpec, params: Mapping[str, np.ndarray],
            devices: Sequence[DeviceContribution], cloud_data: CloudData, cfg: DistillConfig,
            progress: Progress | None = None) -> DistillResult:
        start = time.perf_counter()
        use_encoder = cfg.phi_source == "encoder"
        rnd = _prepare(spec, patch, params, devices, cloud_data, cfg, need_profile=use_encoder)
        if not use_encoder and any(d.phi is None for d in rnd.devices):
            raise DistillError("phi_source 'device' needs every device's phi; use 'encoder' for cold starts")
        rng = np.random.default_rng([cfg.seed, 0xD157])
        T = cfg.temperature
        rows = _device_teachers(rnd)
        step1_rows = _step1_teachers(rnd, rows)
        kd1_before = mean_kd_base(spec, rnd.params, [step1_rows], T)
        t0 = time.perf_counter()
        hist1 = train_base(spec, rnd.params, rnd.base_names, _labelled_rows(rnd), step1_rows, beta=cfg.beta,
                           temperature=T, epochs=cfg.step1_epochs, lr=cfg.lr_base, batch=cfg.batch_size,
                           rng=rng, progress=progress) if cfg.step1_epochs else []
        t1 = time.perf_counter()
        kd1_after = mean_kd_base(spec, rnd.params, [step1_rows], T)

        encoder = None
        if use_encoder:
            encoder = to_tensors(init_encoder(patch.k, profile_size(spec), cfg.encoder_hidden, cfg.seed))
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
            self.name, cfg.mode, _numpy(state.params),
            {d.device_id: p.numpy().astype(np.float32).copy() for d, p in zip(rnd.devices, phis_after, strict=True)},
            encoder=_numpy(state.encoder) if state.encoder is not None else {},
            losses={"step1": hist1, "step2": hist2},
            metrics={"kd_step1_before": kd1_before, "kd_step1_after": kd1_after,
                     "kd_step2_before": kd2_before, "kd_step2_after": kd2_after},
            timing={"prepare_s": t0 - start, "step1_s": t1 - t0, "step2_s": t2 - t1,
                    "total_s": time.perf_counter() - start})


class ModelOverData:
    """Incremental CE training of W on the labelled data the mode gives the cloud; patches untouched."""

    name = "model_over_data"

    def run(self, spec: ModelSpec, patch: PatchSpec, params: Mapping[str, np.ndarray],
            devices: Sequence[DeviceContribution], cloud_data: CloudData, cfg: DistillConfig,
            progress: Progress | None = None) -> DistillResult:
        start = time.perf_counter()
        rnd = _prepare(spec, patch, params, devices, cloud_data, cfg, need_profile=False)
        labelled = _labelled_rows(rnd)
        if labelled is None:
            raise DistillError(f"model_over_data in mode {cfg.mode!r} has no labelled data: give cloud_data.x/y "
                               "or device labels in mode 'samples'")
        rng = np.random.default_rng([cfg.seed, 0xD157])
        hist = train_base(spec, rnd.params, rnd.base_names, labelled, None, beta=0.0,
                          temperature=cfg.temperature, epochs=cfg.step1_epochs, lr=cfg.lr_base,
                          batch=cfg.batch_size, rng=rng, progress=progress) if cfg.step1_epochs else []
        return DistillResult(self.name, cfg.mode, _numpy(rnd.params),
                             {d.device_id: (d.phi if d.phi is not None else np.zeros(patch.k, np.float32))
                              for d in rnd.devices},
                             losses={"step1": hist}, timing={"total_s": time.perf_counter() - start})


class FedAvgPatches:
    """φ̄ = mean of the devices' φ (weighted by uploaded sample count where known); W, θ̄, Θ unchanged."""

    name = "fedavg_patches"

    def run(self, spec: ModelSpec, patch: PatchSpec, params: Mapping[str, np.ndarray],
            devices: Sequence[DeviceContribution], cloud_data: CloudData, cfg: DistillConfig,
            progress: Progress | None = None) -> DistillResult:
        start = time.perf_counter()
        rnd = _prepare(spec, patch, params, devices, cloud_data, cfg, need_profile=False)
        with_phi = [d for d in rnd.devices if d.phi is not None]
        if not with_phi:
            raise DistillError("fedavg_patches needs at least one device with a phi")
        weights = _data_sizes(with_phi)
        phi_bar = (np.stack([d.phi for d in with_phi]) * (weights / weights.sum())[:, None]).sum(axis=0)
        phi_bar = phi_bar.astype(np.float32)
        if progress is not None:
            progress("fedavg", 1, float(np.linalg.norm(phi_bar)))
        return DistillResult(self.name, cfg.mode, _numpy(rnd.params),
                             {d.device_id: (d.phi if d.phi is not None else phi_bar.copy()) for d in rnd.devices},
                             cloud_phi=phi_bar, timing={"total_s": time.perf_counter() - start})


AGGREGATORS: dict[str, Aggregator] = {a.name: a for a in (MoMoDistill(), ModelOverData(), FedAvgPatches())}


def run_aggregator(name: str, spec: ModelSpec, patch: PatchSpec, params: Mapping[str, np.ndarray],
                   devices: Sequence[DeviceContribution], cloud_data: CloudData,
                   cfg: DistillConfig | None = None, progress: Progress | None = None) -> DistillResult:
    if name not in AGGREGATORS:
        raise DistillError(f"unknown aggregator {name!r}; known: {', '.join(sorted(AGGREGATORS))}")
    return AGGREGATORS[name].run(spec, patch, params, devices, cloud_data, cfg or DistillConfig(), progress)


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
