"""Parameter sets as plain numpy arrays: initialization and pickle-free storage.

Parameters travel between export, device and cloud as `dict[name, float32 array]` in `.npz` files read
with `allow_pickle=False`, so a tampered file can never execute code.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .model_spec import ModelSpec, PatchSpec, param_infos
from .patch_kinds import HEAD_BIAS_PART, patch_kind

Params = dict[str, np.ndarray]


class ParamsError(ValueError):
    """A parameter file that is unreadable or does not fit the model."""


def init_params(spec: ModelSpec, patch: PatchSpec | None = None, seed: int = 0) -> Params:
    """He-initialized base weights; patches with θ̄ chosen so that φ = 0 leaves the model unchanged.

    Parts a kind lists as `random_parts` start random, the others at zero (patch_kinds.py). FiLM: θ̄ = 0
    (scale 1 + 0, shift 0). Low-rank: θ̄_down random, θ̄_up = 0, so the residual is zero but its gradient
    is not. The basis Θ is a random projection scaled by 1/sqrt(k).
    """
    rng = np.random.default_rng(seed)
    params: Params = {}
    for name, info in param_infos(spec, patch).items():
        shape = info.shape
        if info.role == "basis":
            value = rng.normal(0.0, 1.0 / np.sqrt(shape[-1]), size=shape)
        elif info.role == "bar":
            random = patch is not None and name.rsplit(".", 1)[1] in patch_kind(patch.kind).random_parts
            value = rng.normal(0.0, 1.0 / np.sqrt(shape[-1]), size=shape) if random else np.zeros(shape)
        elif name.endswith(".weight") and len(shape) >= 2:
            fan_in = int(np.prod(shape[1:]))
            value = rng.normal(0.0, np.sqrt(2.0 / fan_in), size=shape)
        elif name.endswith(".weight"):  # norm scale
            value = np.ones(shape)
        else:
            value = np.zeros(shape)
        params[name] = value.astype(np.float32)
    if patch is not None and patch.head_bias:
        _start_head_bias(params, spec, patch)
    return params


def _start_head_bias(params: Params, spec: ModelSpec, patch: PatchSpec) -> None:
    """φ's last `num_classes` coefficients start as a plain logit offset: Θ_hb is the identity on them and
    zero elsewhere, every other basis is zero on them (so they move nothing else), θ̄_hb = 0."""
    head, classes = spec.layers[-1].name, spec.num_classes
    own = patch.k - classes
    for name, info in param_infos(spec, patch).items():
        if info.role == "basis":  # the layer patches' own columns keep the scale of a k = own basis
            params[name][..., :own] *= np.float32(np.sqrt(patch.k / own))
            params[name][..., own:] = 0.0
    params[f"{head}.patch.{HEAD_BIAS_PART}_basis"][:, :own] = 0.0
    params[f"{head}.patch.{HEAD_BIAS_PART}_basis"][:, own:] = np.eye(classes, dtype=np.float32)


def check_params(params: Mapping[str, np.ndarray], spec: ModelSpec, patch: PatchSpec | None,
                 roles: tuple[str, ...] = ("base", "bar", "basis")) -> None:
    """Raise ParamsError naming the first missing, misshapen or non-finite parameter."""
    for name, info in param_infos(spec, patch).items():
        if info.role not in roles:
            continue
        if name not in params:
            raise ParamsError(f"parameter {name!r} is missing")
        value = params[name]
        if tuple(value.shape) != info.shape:
            raise ParamsError(f"parameter {name!r} has shape {tuple(value.shape)}, expected {info.shape}")
        if not np.all(np.isfinite(value)):
            raise ParamsError(f"parameter {name!r} holds NaN or inf")


def params_to_bytes(params: Mapping[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    arrays: dict[str, Any] = {k: np.asarray(v, dtype=np.float32) for k, v in params.items()}
    np.savez(buf, **arrays)
    return buf.getvalue()


def params_from_bytes(data: bytes) -> Params:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {k: npz[k].astype(np.float32) for k in npz.files}
    except Exception as exc:  # numpy raises several types for corrupt archives
        raise ParamsError(f"unreadable parameter archive: {exc}") from exc


def save_params(path: str | Path, params: Mapping[str, np.ndarray]) -> None:
    """Atomic write: a reader sees the old file or the new one, never half of one."""
    write_atomic(Path(path), params_to_bytes(params))


def load_params(path: str | Path) -> Params:
    return params_from_bytes(Path(path).read_bytes())


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temp file beside `path`, fsync, then rename over it (POSIX-atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
