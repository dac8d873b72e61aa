"""What devices hand the cloud for a MoMoDistill round, the cloud's own data, and their validation.

Everything arriving here came from outside (devices over MQTT, files), so every array is checked for
shape and finiteness and a bad one is rejected with a `DistillError` naming the device and the field.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgepatch.protocol.model_spec import ModelSpec, PatchSpec

DATA_MODES = ("samples", "teacher_outputs", "proxy")
# Raw data never leaves the device and the upload is the k floats of φ the protocol already carries
# (plus an optional profile vector); see `DistillConfig.mode`.
DEFAULT_MODE = "proxy"


class DistillError(ValueError):
    """Input a MoMoDistill round cannot use: names the device and the field at fault."""


@dataclass(frozen=True)
class DeviceContribution:
    """One device's upload for a round.

    - `phi`: its metapatch φ_n ∈ R^k (None: a device that has not personalized yet).
    - mode "samples": opt-in raw samples `x` (N×input_shape) and, if shared, labels `y`;
    - mode "teacher_outputs": `x` plus `logits` (N×classes) of the device's own patched model on them;
    - mode "proxy": nothing else; the cloud evaluates the device's patched model on its proxy set.
    - `profile`: optional summary features for the auxiliary encoder (see `device_profile`).
    """

    device_id: str
    phi: np.ndarray | None
    x: np.ndarray | None = None
    y: np.ndarray | None = None
    logits: np.ndarray | None = None
    profile: np.ndarray | None = None


@dataclass(frozen=True)
class CloudData:
    """The cloud's own data: labelled samples (CE in step 1) and an unlabeled proxy set (mode "proxy")."""

    x: np.ndarray | None = None
    y: np.ndarray | None = None
    proxy_x: np.ndarray | None = None


def device_profile(x: np.ndarray, y: np.ndarray | None, num_classes: int) -> np.ndarray:
    """Profile features a device can compute and upload: its label histogram (normalized; zeros when
    no labels) followed by per-channel mean and std of its inputs. Cheap, k-independent, and enough to
    tell the encoder which calibration and which classes a device has."""
    x = np.asarray(x, dtype=np.float32)
    axes = (0, *range(2, x.ndim))
    hist = np.zeros(num_classes, np.float32)
    if y is not None and len(y):
        hist = np.bincount(np.asarray(y, np.int64), minlength=num_classes)[:num_classes].astype(np.float32)
        hist /= max(1.0, float(hist.sum()))
    return np.concatenate([hist, x.mean(axis=axes), x.std(axis=axes)]).astype(np.float32)


def profile_size(spec: ModelSpec) -> int:
    return spec.num_classes + 2 * spec.input_shape[0]


def _check_finite(name: str, value: np.ndarray) -> None:
    if not np.all(np.isfinite(value)):
        raise DistillError(f"{name} holds NaN or inf")


def check_inputs(name: str, x: np.ndarray, spec: ModelSpec) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != len(spec.input_shape) + 1 or tuple(x.shape[1:]) != spec.input_shape:
        raise DistillError(f"{name} has shape {x.shape}, expected (N, {', '.join(map(str, spec.input_shape))})")
    if len(x) == 0:
        raise DistillError(f"{name} is empty")
    x = x.astype(np.float32)
    _check_finite(name, x)
    return x


def check_labels(name: str, y: np.ndarray, n: int, num_classes: int) -> np.ndarray:
    y = np.asarray(y)
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
        raise DistillError(f"{name} must be {n} integer labels, got {y.dtype} {y.shape}")
    if n and (y.min() < 0 or y.max() >= num_classes):
        raise DistillError(f"{name} has labels outside [0, {num_classes})")
    return y.astype(np.int64)


def validate_device(dev: DeviceContribution, spec: ModelSpec, patch: PatchSpec, mode: str,
                    need_profile: bool) -> DeviceContribution:
    """A normalized copy (float32/int64 arrays, profile filled in where the cloud can compute it)."""
    who = f"device {dev.device_id!r}"
    phi = dev.phi
    if phi is not None:
        phi = np.asarray(phi)
        if phi.shape != (patch.k,):
            raise DistillError(f"{who}: phi has shape {phi.shape}, expected ({patch.k},) (patch k)")
        phi = phi.astype(np.float32)
        _check_finite(f"{who}: phi", phi)
    x = y = logits = None
    if mode in ("samples", "teacher_outputs"):
        if dev.x is None:
            raise DistillError(f"{who}: mode {mode!r} needs uploaded samples x")
        x = check_inputs(f"{who}: x", dev.x, spec)
        if dev.y is not None:
            y = check_labels(f"{who}: y", dev.y, len(x), spec.num_classes)
    if mode == "samples" and phi is None:
        raise DistillError(f"{who}: mode 'samples' needs the device's phi to build its teacher")
    if mode == "teacher_outputs":
        if dev.logits is None or x is None:
            raise DistillError(f"{who}: mode 'teacher_outputs' needs x and logits")
        logits = np.asarray(dev.logits)
        if logits.shape != (len(x), spec.num_classes):
            raise DistillError(f"{who}: logits have shape {logits.shape}, expected ({len(x)}, {spec.num_classes})")
        logits = logits.astype(np.float32)
        _check_finite(f"{who}: logits", logits)
    if mode == "proxy" and phi is None:
        raise DistillError(f"{who}: mode 'proxy' needs the device's phi (its patched model is the teacher)")
    profile = dev.profile
    if profile is None and need_profile and x is not None:
        labels = y if y is not None else (logits.argmax(axis=1) if logits is not None else None)
        profile = device_profile(x, labels, spec.num_classes)
    if profile is not None:
        profile = np.asarray(profile)
        if profile.shape != (profile_size(spec),):
            raise DistillError(f"{who}: profile has shape {profile.shape}, expected ({profile_size(spec)},) "
                               "(label histogram + per-channel input mean and std; see device_profile)")
        profile = profile.astype(np.float32)
        _check_finite(f"{who}: profile", profile)
    elif need_profile:
        raise DistillError(f"{who}: the encoder needs a profile; upload device_profile(x, y) in mode {mode!r}")
    return DeviceContribution(dev.device_id, phi, x, y, logits, profile)


def validate_devices(devices: Sequence[DeviceContribution], spec: ModelSpec, patch: PatchSpec, mode: str,
                     need_profile: bool) -> list[DeviceContribution]:
    if mode not in DATA_MODES:
        raise DistillError(f"unknown data mode {mode!r}; allowed: {', '.join(DATA_MODES)}")
    if not devices:
        raise DistillError("no device contributions")
    ids = [d.device_id for d in devices]
    if len(set(ids)) != len(ids):
        raise DistillError(f"duplicate device ids: {sorted({i for i in ids if ids.count(i) > 1})}")
    return [validate_device(d, spec, patch, mode, need_profile) for d in devices]


def validate_cloud_data(cloud: CloudData, spec: ModelSpec, mode: str, need_proxy: bool = True) -> CloudData:
    x = y = proxy = None
    if cloud.x is not None:
        x = check_inputs("cloud_data.x", cloud.x, spec)
        if cloud.y is None:
            raise DistillError("cloud_data.x is labelled data and needs cloud_data.y")
        y = check_labels("cloud_data.y", cloud.y, len(x), spec.num_classes)
    if cloud.proxy_x is not None:
        proxy = check_inputs("cloud_data.proxy_x", cloud.proxy_x, spec)
    if mode == "proxy" and proxy is None and need_proxy:
        raise DistillError("mode 'proxy' needs cloud_data.proxy_x (an unlabeled proxy set)")
    return CloudData(x, y, proxy)
