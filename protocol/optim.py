"""The optimizers every backend must agree on, in numpy (the LiteRT graph implements the same maths)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AdamConfig:
    lr: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8


def adam_step(param: np.ndarray, grad: np.ndarray, m: np.ndarray, v: np.ndarray, step: float,
              cfg: AdamConfig, lr: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One bias-corrected Adam step; `step` is the number of steps already taken (t = step + 1)."""
    t = step + 1.0
    m = cfg.beta1 * m + (1.0 - cfg.beta1) * grad
    v = cfg.beta2 * v + (1.0 - cfg.beta2) * grad * grad
    m_hat = m / (1.0 - cfg.beta1 ** t)
    v_hat = v / (1.0 - cfg.beta2 ** t)
    new = param - (cfg.lr if lr is None else lr) * m_hat / (np.sqrt(v_hat) + cfg.eps)
    return new.astype(np.float32), m.astype(np.float32), v.astype(np.float32)
