"""φ training in the bare LiteRT interpreter, in a process where torch and TensorFlow cannot be imported.

The parent trains digits_cnn briefly in torch, exports the trainable and the frozen inference program,
and writes a device task: the same digits through a fixed gain/offset (a sensor that reads darker and
lifted), which a FiLM patch can correct. The child (the "device") imports only edgepatch.device + numpy,
takes 50 Adam steps on φ through `train_phi_<vid>`, and must lower the loss and raise held-out accuracy.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

GAIN, OFFSET = 0.45, 0.35  # the device's sensor distortion
BATCH = 32

DEVICE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys

    BLOCKED = ("torch", "tensorflow")
    attempts = []

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                attempts.append(name)
                raise ImportError(f"{name} is not installed on this device")
            return None

    sys.meta_path.insert(0, Block())

    import numpy as np
    from edgepatch.device.backends.litert import LiteRTProgram
    from edgepatch.protocol.params import load_params

    work, vid, k, steps, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    trainable = LiteRTProgram(f"{work}/trainable.tflite")
    frozen = LiteRTProgram(f"{work}/infer.tflite")
    params = load_params(f"{work}/params.npz")
    with np.load(f"{work}/device_data.npz", allow_pickle=False) as d:
        x_tr, y_tr, x_te, y_te = d["x_train"], d["y_train"], d["x_test"], d["y_test"]

    def accuracy(phi):
        return float(np.mean(np.argmax(frozen.infer(x_te, phi), axis=1) == y_te))

    def full_loss(phi):  # mean loss over every training batch, at a fixed φ
        losses = []
        for i in range(0, len(x_tr) - batch + 1, batch):
            out = trainable.train_phi(vid, x_tr[i:i + batch], y_tr[i:i + batch], phi, np.zeros(k, np.float32),
                                      np.zeros(k, np.float32), 0.0, 0.0, params)
            losses.append(float(out["loss"]))
        return float(np.mean(losses))

    phi = np.zeros(k, np.float32); m = np.zeros(k, np.float32); v = np.zeros(k, np.float32)
    rng = np.random.default_rng(0)
    acc_before, loss_before = accuracy(phi), full_loss(phi)
    step_losses = []
    for step in range(steps):
        idx = rng.choice(len(x_tr), size=batch, replace=False)
        out = trainable.train_phi(vid, x_tr[idx], y_tr[idx], phi, m, v, float(step), 0.05, params)
        phi, m, v = out["phi"], out["m"], out["v"]
        step_losses.append(float(out["loss"]))
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print(json.dumps({"acc_before": acc_before, "acc_after": accuracy(phi), "loss_before": loss_before,
                      "loss_after": full_loss(phi), "step_losses": step_losses, "heavy_modules": heavy,
                      "blocked_attempts": attempts, "phi_norm": float(np.linalg.norm(phi))}))
    """
)


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[:, None, :, :]
    return x, data.target.astype(np.int32)


def _train_base(spec, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    import torch
    import torch.nn.functional as F

    from edgepatch.export import torch_model
    from edgepatch.protocol.params import init_params

    torch.manual_seed(0)
    params = torch_model.to_tensors(init_params(spec, None, seed=0), requires_grad=True)
    opt = torch.optim.Adam(params.values(), lr=5e-3)
    xt, yt = torch.tensor(x), torch.tensor(y, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    for _ in range(8):
        for idx in torch.randperm(len(xt), generator=gen).split(64):
            opt.zero_grad()
            F.cross_entropy(torch_model.forward(spec, None, params, xt[idx]), yt[idx]).backward()
            opt.step()
    return {k: v.detach().numpy().copy() for k, v in params.items()}


def test_phi_training_without_torch_or_tensorflow(tmp_path: Path) -> None:
    from edgepatch.export.reference_models import default_patch, digits_cnn
    from edgepatch.export.tflite_builder import build_inference_tflite, build_trainable_tflite
    from edgepatch.protocol.params import init_params, save_params
    from edgepatch.protocol.variants import full_variant

    spec = digits_cnn()
    patch = default_patch(spec, "film", k=16)
    x, y = _digits()
    base = _train_base(spec, x[:1200], y[:1200])
    params = {**init_params(spec, patch, seed=1), **base}  # trained W; θ̄ = 0 (identity at φ = 0), random Θ

    variant = full_variant(spec)
    (tmp_path / "trainable.tflite").write_bytes(build_trainable_tflite(spec, patch, [variant], batch=BATCH))
    (tmp_path / "infer.tflite").write_bytes(build_inference_tflite(spec, patch, params))
    save_params(tmp_path / "params.npz", params)
    device_x = GAIN * x[1200:] + OFFSET  # the device's shifted sensor
    np.savez(tmp_path / "device_data.npz", x_train=device_x[:300], y_train=y[1200:1500],
             x_test=device_x[300:], y_test=y[1500:])

    proc = subprocess.run([sys.executable, "-c", DEVICE_SCRIPT, str(tmp_path), variant.id, str(patch.k), "50",
                           str(BATCH)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])

    print({k: result[k] for k in ("acc_before", "acc_after", "loss_before", "loss_after", "blocked_attempts")})
    assert result["heavy_modules"] == [], result["heavy_modules"]
    assert all(np.isfinite(result["step_losses"]))
    assert result["loss_after"] < 0.8 * result["loss_before"], result
    assert result["acc_after"] > result["acc_before"] + 0.05, result
