"""The two MoMoDistill steps as plain functions over torch tensors.

Step 1 trains the base W of the *unpatched* cloud model f(x; W) on CE over labelled rows plus
β·T²·KL(p_n ‖ f(x; W)/T) over teacher rows. Step 2 freezes the new W and trains θ̄, Θ (and the encoder)
so that each device's patched model f(x; W_new, θ̄ + Θ·φ̂_n) reproduces that device's teacher p_n.
Teachers are fixed probability tables computed once from the *old* parameters (or uploaded logits).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from edgepatch.export.torch_model import forward
from edgepatch.protocol.model_spec import ModelSpec, PatchSpec

from .encoder import encoder_forward

Progress = Callable[[str, int, float], None]


@dataclass(frozen=True)
class TeacherRows:
    """Inputs with the teacher's tempered class probabilities; `device` indexes the contributions."""

    x: Tensor
    probs: Tensor
    device: int = -1
    weights: Tensor | None = None  # per-row weight of the KD term (None: every row weighs 1)


@dataclass(frozen=True)
class LabelledRows:
    x: Tensor
    y: Tensor


def tempered_probs(logits: Tensor, temperature: float) -> Tensor:
    return F.softmax(logits / temperature, dim=1)


def kd_loss(teacher_probs: Tensor, student_logits: Tensor, temperature: float,
            weights: Tensor | None = None) -> Tensor:
    """Mean over rows of (weight ×) KL(teacher ‖ student) at temperature T (without the T² factor)."""
    log_q = F.log_softmax(student_logits / temperature, dim=1)
    log_p = torch.log(teacher_probs.clamp_min(1e-12))
    per_row = (teacher_probs * (log_p - log_q)).sum(dim=1)
    return (per_row * weights).mean() if weights is not None else per_row.mean()


def patched_logits(spec: ModelSpec, patch: PatchSpec, params: Mapping[str, Tensor], x: Tensor,
                   phi: Tensor, batch: int = 512) -> Tensor:
    return torch.cat([forward(spec, patch, params, x[i:i + batch], phi) for i in range(0, len(x), batch)])


def base_logits(spec: ModelSpec, params: Mapping[str, Tensor], x: Tensor, batch: int = 512) -> Tensor:
    return torch.cat([forward(spec, None, params, x[i:i + batch]) for i in range(0, len(x), batch)])


def mean_kd_base(spec: ModelSpec, params: Mapping[str, Tensor], rows: Sequence[TeacherRows],
                 temperature: float) -> float:
    """Row-weighted KL of the unpatched model to the teachers (what step 1 lowers, with its weights)."""
    if not rows:
        return float("nan")
    with torch.no_grad():
        total = sum(float(kd_loss(r.probs, base_logits(spec, params, r.x), temperature, r.weights)) * len(r.x)
                    for r in rows)
    return total / sum(len(r.x) for r in rows)


def mean_kd_patched(spec: ModelSpec, patch: PatchSpec, params: Mapping[str, Tensor], rows: Sequence[TeacherRows],
                    phis: Sequence[Tensor], temperature: float) -> float:
    """Row-weighted KL of each device's patched model (φ̂ = phis[row.device]) to its teacher (step 2)."""
    with torch.no_grad():
        total = sum(float(kd_loss(r.probs, patched_logits(spec, patch, params, r.x, phis[r.device]),
                                  temperature)) * len(r.x) for r in rows)
    return total / sum(len(r.x) for r in rows)


def _cycle_batches(n: int, batch: int, steps: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`steps` mini-batches over a fresh permutation of n rows, wrapping around (the smaller pool cycles)."""
    order = rng.permutation(n)
    reps = int(np.ceil(steps * batch / n)) + 1
    order = np.concatenate([order] + [rng.permutation(n) for _ in range(reps - 1)])
    return [order[i * batch:(i + 1) * batch] for i in range(steps)]


def train_base(spec: ModelSpec, params: dict[str, Tensor], base_names: Sequence[str],
               labelled: LabelledRows | None, teachers: TeacherRows | None, *, beta: float,
               temperature: float, epochs: int, lr: float, batch: int, rng: np.random.Generator,
               progress: Progress | None = None, stage: str = "step1") -> list[float]:
    """Step 1 (β > 0) or plain incremental CE training (β = 0, the model-over-data baseline).

    One epoch is as many steps as the larger pool needs; the smaller pool cycles, so both terms appear
    in every step. Returns the mean loss per epoch.
    """
    use_kd = teachers is not None and beta > 0
    if labelled is None and not use_kd:
        raise ValueError("step 1 has neither labelled rows nor teachers to learn from")
    weights = [params[n].detach().clone().requires_grad_(True) for n in base_names]
    for name, w in zip(base_names, weights, strict=True):
        params[name] = w
    opt = torch.optim.Adam(weights, lr=lr)
    n_ce = len(labelled.x) if labelled is not None else 0
    n_kd = len(teachers.x) if use_kd and teachers is not None else 0
    steps = int(np.ceil(max(n_ce, n_kd) / batch))
    history: list[float] = []
    for epoch in range(epochs):
        ce_batches = _cycle_batches(n_ce, batch, steps, rng) if n_ce else [None] * steps
        kd_batches = _cycle_batches(n_kd, batch, steps, rng) if n_kd else [None] * steps
        total = 0.0
        for ce_idx, kd_idx in zip(ce_batches, kd_batches, strict=True):
            loss = torch.zeros(())
            if ce_idx is not None and labelled is not None:
                loss = loss + F.cross_entropy(forward(spec, None, params, labelled.x[ce_idx]), labelled.y[ce_idx])
            if kd_idx is not None and teachers is not None:
                student = forward(spec, None, params, teachers.x[kd_idx])
                row_weights = teachers.weights[kd_idx] if teachers.weights is not None else None
                loss = loss + beta * temperature**2 * kd_loss(teachers.probs[kd_idx], student, temperature,
                                                               row_weights)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach())
        history.append(total / max(1, steps))
        if progress is not None:
            progress(stage, epoch + 1, history[-1])
    for name in base_names:
        params[name] = params[name].detach()
    return history


@dataclass
class PatchDistillState:
    """Trainable tensors of step 2 (θ̄ and Θ live inside `params`)."""

    params: dict[str, Tensor]
    encoder: dict[str, Tensor] | None
    phis: list[Tensor | None]  # the devices' uploaded φ (None: cold start)
    profiles: list[Tensor | None]


def device_phi_hat(state: PatchDistillState, device: int, k: int, hide_phi: bool = False) -> Tensor:
    phi = None if hide_phi else state.phis[device]
    if state.encoder is None:
        if phi is None:
            raise ValueError(f"device #{device} has no phi and no encoder to generate one")
        return phi
    profile = state.profiles[device]
    if profile is None:
        raise ValueError(f"device #{device} has no profile for the encoder")
    return encoder_forward(state.encoder, phi, profile, k)


def distill_patches(spec: ModelSpec, patch: PatchSpec, state: PatchDistillState, patch_names: Sequence[str],
                    rows: Sequence[TeacherRows], *, temperature: float, epochs: int, lr_patch: float,
                    lr_encoder: float, batch: int, cold_start_dropout: float, rng: np.random.Generator,
                    progress: Progress | None = None) -> list[float]:
    """Step 2: mini-batches of one device at a time (φ̂ is per device); returns the mean loss per epoch.

    With an encoder, each device's φ is hidden from it with probability `cold_start_dropout` so the
    profile-only path a cold-start device uses is trained on the same teachers.
    """
    groups: list[dict[str, object]] = []
    trainable = [state.params[n].detach().clone().requires_grad_(True) for n in patch_names]
    for name, t in zip(patch_names, trainable, strict=True):
        state.params[name] = t
    if trainable:
        groups.append({"params": trainable, "lr": lr_patch})
    if state.encoder is not None:
        learned = [key for key in state.encoder if ".fc" in key]  # the standardization stays fixed
        for key in learned:
            state.encoder[key] = state.encoder[key].detach().clone().requires_grad_(True)
        groups.append({"params": [state.encoder[key] for key in learned], "lr": lr_encoder})
    if not groups:
        raise ValueError("step 2 has nothing to train (no patch parameters and no encoder)")
    opt = torch.optim.Adam(groups)
    history: list[float] = []
    for epoch in range(epochs):
        chunks = [(r, idx) for r in rows for idx in np.array_split(rng.permutation(len(r.x)),
                                                                   max(1, int(np.ceil(len(r.x) / batch))))]
        order = rng.permutation(len(chunks))
        total = 0.0
        for c in order:
            r, idx = chunks[c]
            hide = state.encoder is not None and state.phis[r.device] is not None \
                and rng.random() < cold_start_dropout
            phi_hat = device_phi_hat(state, r.device, patch.k, hide_phi=hide)
            student = forward(spec, patch, state.params, r.x[idx], phi_hat)
            loss = temperature**2 * kd_loss(r.probs[idx], student, temperature)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach())
        history.append(total / max(1, len(chunks)))
        if progress is not None:
            progress("step2", epoch + 1, history[-1])
    for name in patch_names:
        state.params[name] = state.params[name].detach()
    if state.encoder is not None:
        state.encoder = {k: v.detach() for k, v in state.encoder.items()}
    return history
