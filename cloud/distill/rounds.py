"""Validated inputs of a round and the rows both steps learn from (shared by every aggregator)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from edgepatch.cloud.robust import RobustConfig, clipped_device_weights, trimmed_mean
from edgepatch.export.torch_model import to_tensors
from edgepatch.protocol.model_spec import ModelSpec, PatchSpec, param_infos
from edgepatch.protocol.params import Params, ParamsError, check_params

from .config import DistillConfig
from .contributions import CloudData, DeviceContribution, DistillError, validate_cloud_data, validate_devices
from .steps import LabelledRows, TeacherRows, patched_logits, tempered_probs


@dataclass
class Round:
    spec: ModelSpec
    patch: PatchSpec
    cfg: DistillConfig
    devices: list[DeviceContribution]
    cloud: CloudData
    params: dict[str, torch.Tensor]
    base_names: list[str]
    patch_names: list[str]


def prepare_round(spec: ModelSpec, patch: PatchSpec, params: Mapping[str, np.ndarray],
             devices: Sequence[DeviceContribution], cloud_data: CloudData, cfg: DistillConfig,
             need_profile: bool, need_proxy: bool = True) -> Round:
    cfg.validate()
    try:
        check_params(params, spec, patch)
    except ParamsError as exc:
        raise DistillError(f"params: {exc}") from exc
    cloud = validate_cloud_data(cloud_data, spec, cfg.mode, need_proxy)
    devs = validate_devices(devices, spec, patch, cfg.mode, need_profile)
    infos = param_infos(spec, patch)
    tensors = to_tensors({n: params[n] for n in infos})
    return Round(spec, patch, cfg, devs, cloud, tensors,
                  [n for n, i in infos.items() if i.role == "base"],
                  [n for n, i in infos.items() if i.role == "basis" or (i.role == "bar" and cfg.train_bar)])


def labelled_rows(rnd: Round) -> LabelledRows | None:
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


def device_teachers(rnd: Round) -> list[TeacherRows]:
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


def step1_teachers(rnd: Round, rows: list[TeacherRows]) -> TeacherRows:
    """The KD rows of step 1, weighted per `cfg.kd_weighting`.

    "device": every device's rows together weigh the same (row weight ∝ 1/n_d, mean row weight 1), so a
    tail device with 6 samples speaks as loudly as a head device with 400 — the "voice" the paper's
    long-tail gain relies on. "sample": every row weighs 1 (head devices dominate, as in the CE term),
    except that no device's rows together weigh more than 4/N of the total (cloud/robust.py).
    In mode "proxy" every device is queried on the same rows: the teacher is their per-coordinate trimmed mean.
    """
    if rnd.cfg.mode == "proxy":  # one row per proxy sample
        # per-coordinate trimmed mean over devices (cloud/robust.py): a few bad teachers cannot steer it
        robust = trimmed_mean(torch.stack([r.probs for r in rows]).numpy(), RobustConfig().trim)
        robust /= robust.sum(axis=1, keepdims=True)
        return TeacherRows(rows[0].x, torch.from_numpy(robust.astype(np.float32)))
    total = sum(len(r.x) for r in rows)
    if rnd.cfg.kd_weighting == "device":
        weights = torch.cat([torch.full((len(r.x),), total / (len(rows) * len(r.x))) for r in rows])
    else:  # "sample": shares follow row counts, but no device above 4/N of the total (cloud/robust.py)
        shares = clipped_device_weights([len(r.x) for r in rows], RobustConfig().max_weight_factor)
        weights = torch.cat([torch.full((len(r.x),), float(s * total / len(r.x))) for s, r in zip(shares, rows,
                                                                                                  strict=True)])
    return TeacherRows(torch.cat([r.x for r in rows]), torch.cat([r.probs for r in rows]), weights=weights)


def to_numpy(params: Mapping[str, torch.Tensor]) -> Params:
    return {n: t.detach().numpy().astype(np.float32).copy() for n, t in params.items()}


def data_sizes(devices: Sequence[DeviceContribution]) -> np.ndarray:
    return np.array([len(d.x) if d.x is not None else 1 for d in devices], dtype=np.float64)
