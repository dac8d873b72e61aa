"""Objective 2 of the DSE: convergence — held-out loss of the full model after a budget of DISTREAL
steps (fresh kept set per step, sliced weights, update scattered back). See export/dse.py for the search."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from edgepatch.protocol.model_spec import ModelSpec, param_infos
from edgepatch.protocol.optim import AdamConfig, adam_step
from edgepatch.protocol.params import Params, check_params
from edgepatch.protocol.variants import Variant, sample_kept, scatter_add, slice_params

from .torch_model import forward, to_tensors


@dataclass(frozen=True)
class TrainConfig:
    """The DISTREAL training run behind the convergence objective."""

    optimizer: str = "sgd"  # "sgd" or "adam" (numpy Adam of protocol/optim.py, slots sliced like weights)
    lr: float = 0.05
    holdout: float = 0.25  # fraction of the data held out for the loss after the budget
    split_seed: int = 0

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"holdout must be in (0, 1), got {self.holdout}")


@dataclass(frozen=True)
class _Data:
    train_x: np.ndarray
    train_y: np.ndarray
    hold_x: torch.Tensor
    hold_y: torch.Tensor


def _check_data(spec: ModelSpec, x: np.ndarray, y: np.ndarray, batch: int, cfg: TrainConfig) -> _Data:
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim != len(spec.input_shape) + 1 or tuple(x.shape[1:]) != spec.input_shape:
        raise ValueError(f"data_x has shape {x.shape}; model {spec.name!r} needs (N, {', '.join(map(str, spec.input_shape))})")
    if y.shape != (len(x),):
        raise ValueError(f"data_y has shape {y.shape}; expected ({len(x)},) labels matching data_x")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= spec.num_classes:
        raise ValueError(f"data_y must hold integer labels in [0, {spec.num_classes})")
    if not np.all(np.isfinite(x)):
        raise ValueError("data_x holds NaN or inf")
    n_hold = max(1, int(round(cfg.holdout * len(x))))
    if len(x) - n_hold < batch:
        raise ValueError(f"{len(x)} samples leave {len(x) - n_hold} for training after the hold-out; "
                         f"batch {batch} needs at least that many")
    order = np.random.default_rng(cfg.split_seed).permutation(len(x))
    hold, train = order[:n_hold], order[n_hold:]
    return _Data(x[train].astype(np.float32), y[train].astype(np.int64),
                 torch.tensor(x[hold], dtype=torch.float32), torch.tensor(y[hold], dtype=torch.long))


def distreal_train(spec: ModelSpec, base_params: Mapping[str, np.ndarray], variant: Variant,
                   x: np.ndarray, y: np.ndarray, *, steps: int, batch: int, seed: int,
                   cfg: TrainConfig = TrainConfig()) -> Params:
    """`steps` DISTREAL steps on the full weights; returns the trained full-size parameters.

    Per step: a fresh kept set (sample_kept), gather (slice_params), forward/backward of the small
    network, optimizer update of the small tensors, scatter of the change back (scatter_add). Batches
    come from `seed` and kept sets from an independent stream, so variants see the same batches.
    Torch computes the gradients: it is the reference forward that the LiteRT `train_full_<vid>`
    programs are parity-tested against, so the maths is the device's.
    """
    infos = param_infos(spec, None)
    vspec = variant.spec(spec)
    params = {n: np.array(base_params[n], dtype=np.float32) for n in infos}
    slots = {n: (np.zeros_like(p), np.zeros_like(p)) for n, p in params.items()} if cfg.optimizer == "adam" else {}
    adam = AdamConfig(lr=cfg.lr)
    batch_rng = np.random.default_rng([seed, 0])
    kept_rng = np.random.default_rng([seed, 1])
    for step in range(steps):
        idx = batch_rng.choice(len(x), size=batch, replace=False)
        kept = sample_kept(spec, variant, kept_rng)
        small = to_tensors(slice_params(params, infos, kept), requires_grad=True)
        loss = F.cross_entropy(forward(vspec, None, small, torch.from_numpy(x[idx])), torch.from_numpy(y[idx]))
        grads = torch.autograd.grad(loss, list(small.values()))
        for (name, tensor), grad_t in zip(small.items(), grads, strict=True):
            grad = grad_t.numpy()
            if cfg.optimizer == "sgd":
                scatter_add(params[name], grad, infos[name], kept, alpha=-cfg.lr)
                continue
            m_full, v_full = slots[name]
            m, v = slice_params({"m": m_full, "v": v_full}, {"m": infos[name], "v": infos[name]}, kept).values()
            old = tensor.detach().numpy()
            new, m_new, v_new = adam_step(old, grad, m, v, float(step), adam)
            scatter_add(params[name], new - old, infos[name], kept)
            scatter_add(m_full, m_new - m, infos[name], kept)
            scatter_add(v_full, v_new - v, infos[name], kept)
    return params


def heldout_loss(spec: ModelSpec, params: Mapping[str, np.ndarray], x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(forward(spec, None, to_tensors(params), x), y))


def convergence(spec: ModelSpec, base_params: Mapping[str, np.ndarray], variant: Variant, data_x: np.ndarray,
                data_y: np.ndarray, *, seeds: Sequence[int] = (0, 1, 2), step_budget: int = 30, batch: int = 32,
                train: TrainConfig = TrainConfig()) -> list[float]:
    """Objective 2 for one variant: held-out loss after the DISTREAL budget, one value per seed."""
    check_params(base_params, spec, None, roles=("base",))
    data = _check_data(spec, data_x, data_y, batch, train)
    return _convergence(spec, base_params, variant, data, seeds=seeds, steps=step_budget, batch=batch, cfg=train)


def _convergence(spec: ModelSpec, base_params: Mapping[str, np.ndarray], variant: Variant, data: _Data, *,
                 seeds: Sequence[int], steps: int, batch: int, cfg: TrainConfig) -> list[float]:
    with _single_thread():
        return [heldout_loss(spec, distreal_train(spec, base_params, variant, data.train_x, data.train_y,
                                                  steps=steps, batch=batch, seed=s, cfg=cfg),
                             data.hold_x, data.hold_y)
                for s in seeds]


def seed_spread(losses: Sequence[float]) -> float | None:
    """Sample standard deviation of the per-seed losses (ddof=1: three seeds are a small sample), None
    with one seed — an unknown spread, which the device's selector never lets win on quality (issue 10)."""
    return float(np.std(np.asarray(losses, np.float64), ddof=1)) if len(losses) > 1 else None


@contextmanager
def _single_thread() -> Iterator[None]:
    """One torch thread for tiny steps: on a busy 2-core machine a thread pool was ~20x slower (measured
    3 ms vs 58 ms per digits_cnn step), and the results do not depend on the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
