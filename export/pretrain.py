"""Pretraining a base model in torch when no weights are given (the cloud's own starting point)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from edgepatch.protocol.model_spec import ModelSpec
from edgepatch.protocol.params import Params, init_params

from .torch_model import PatchedNet


def pretrain_base(spec: ModelSpec, x: np.ndarray, y: np.ndarray, *, epochs: int = 15, batch: int = 32,
                  lr: float = 3e-3, seed: int = 0, progress: Callable[[int, float], None] | None = None
                  ) -> Params:
    """Adam on cross-entropy over (x, y); returns base parameters (no patch) as float32 arrays."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = PatchedNet(spec, None, init_params(spec, None, seed))
    opt = torch.optim.Adam([p for n, p in net.named_parameters() if n != "phi"], lr=lr)
    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.long)
    for epoch in range(epochs):
        order = rng.permutation(len(x))
        total = 0.0
        for start in range(0, len(order), batch):
            idx = torch.as_tensor(order[start:start + batch])
            loss = F.cross_entropy(net(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        if progress is not None:
            progress(epoch + 1, total / len(x))
    return {n: t.detach().numpy().copy() for n, t in net.param_dict().items()}


def accuracy(spec: ModelSpec, params: Params, x: np.ndarray, y: np.ndarray) -> float:
    net = PatchedNet(spec, None, params)
    with torch.no_grad():
        pred = net(torch.tensor(x, dtype=torch.float32)).argmax(dim=1).numpy()
    return float((pred == y).mean())
