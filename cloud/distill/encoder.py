"""The auxiliary encoder of MoMoDistill step 2: φ̂ = φ_in + MLP([φ_in, has_phi, profile]).

The residual form with a zero-initialized last layer makes φ̂ = φ_n before training, so step 2 starts
exactly at "new W, old Θ, the device's own φ". A cold-start device feeds φ_in = 0, has_phi = 0 and
gets φ̂ from its profile alone; step 2 trains that path by hiding φ from the encoder at random.
Weights travel as numpy arrays (`save_params`-compatible names); `encode_phi` is the
inference for one device (numpy in and out, no autograd).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

EncoderParams = dict[str, np.ndarray]
ENCODER_KEYS = ("encoder.fc1.weight", "encoder.fc1.bias", "encoder.fc2.weight", "encoder.fc2.bias",
                "encoder.profile_mean", "encoder.profile_scale")


def encoder_input_size(k: int, profile_size: int) -> int:
    return k + 1 + profile_size


def init_encoder(k: int, profiles: np.ndarray, hidden: int, seed: int) -> EncoderParams:
    """`profiles` (devices × features) fixes the input standardization: histograms and input statistics
    live on very different scales, and a handful of devices must be enough to learn from."""
    rng = np.random.default_rng([seed, 0xE4C])
    n_in = encoder_input_size(k, profiles.shape[1])
    return {
        "encoder.profile_mean": profiles.mean(axis=0).astype(np.float32),
        "encoder.profile_scale": np.maximum(profiles.std(axis=0), 0.05).astype(np.float32),
        "encoder.fc1.weight": rng.normal(0.0, np.sqrt(2.0 / n_in), (hidden, n_in)).astype(np.float32),
        "encoder.fc1.bias": np.zeros(hidden, np.float32),
        "encoder.fc2.weight": np.zeros((k, hidden), np.float32),  # φ̂ = φ at the start (see module doc)
        "encoder.fc2.bias": np.zeros(k, np.float32),
    }


def encoder_features(phi: Tensor | None, profile: Tensor, k: int) -> Tensor:
    if phi is None:
        return torch.cat([torch.zeros(k), torch.zeros(1), profile])
    return torch.cat([phi, torch.ones(1), profile])


def encoder_forward(weights: Mapping[str, Tensor], phi: Tensor | None, profile: Tensor, k: int) -> Tensor:
    profile = (profile - weights["encoder.profile_mean"]) / weights["encoder.profile_scale"]
    z = encoder_features(phi, profile, k)
    h = torch.clamp_min(weights["encoder.fc1.weight"] @ z + weights["encoder.fc1.bias"], 0.0)
    out = weights["encoder.fc2.weight"] @ h + weights["encoder.fc2.bias"]
    return out + (phi if phi is not None else 0.0)


def encode_phi(encoder: Mapping[str, np.ndarray], profile: np.ndarray, phi: np.ndarray | None = None
               ) -> np.ndarray:
    """φ̂ for one device (cold start: `phi=None`); numpy arrays in and out."""
    missing = [key for key in ENCODER_KEYS if key not in encoder]
    if missing:
        raise ValueError(f"encoder weights missing {missing}")
    k = encoder["encoder.fc2.bias"].shape[0]
    expected = encoder["encoder.profile_mean"].shape[0]
    profile = np.asarray(profile, np.float32)
    if profile.shape != (expected,):
        raise ValueError(f"profile has shape {profile.shape}, the encoder expects ({expected},)")
    if phi is not None and np.asarray(phi).shape != (k,):
        raise ValueError(f"phi has shape {np.asarray(phi).shape}, the encoder expects ({k},)")
    weights = {key: torch.from_numpy(np.asarray(encoder[key], np.float32)) for key in ENCODER_KEYS}
    phi_t = None if phi is None else torch.from_numpy(np.asarray(phi, np.float32))
    with torch.no_grad():
        return encoder_forward(weights, phi_t, torch.from_numpy(profile), k).numpy().astype(np.float32)
