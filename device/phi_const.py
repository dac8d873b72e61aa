"""The weights-baked φ program (`litert_phi_const`): loaded only after it agrees with the trainable program.

The full variant's φ step exists twice in a LiteRT bundle: `train_phi_<full>` of the trainable program
takes the weights as signature inputs (any weights; XNNPACK repacks them on every call), and
`phi_const.tflite` holds them as constants (XNNPACK packs them once, so the step is several times faster:
benchmarks/step_vs_torch.py). A base update rewrites its weights in place, on the cloud
(cloud/republish.py) or on the device (device/fetch.py), and the sha256 proves the bytes are the published
ones — but not that the published program computes the same step. So before the engine uses it, one probe
step runs through both programs with the bundle's own weights; if loss, gradient or updated φ differ, the
baked program is not used (a warning says why) and every φ step goes through the trainable program, which
is slower but always right. Bundles without the artifact (exported before it existed) take that path too.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from edgepatch.protocol.bundle import Bundle
from edgepatch.protocol.model_spec import param_infos

from .backends.litert import LiteRTError, LiteRTProgram

log = logging.getLogger("edgepatch.device.phi_const")
KIND = "litert_phi_const"
RTOL = 1e-3  # both programs run the same maths in float32; only the summation order may differ


def load_phi_const(bundle: Bundle, trainable: LiteRTProgram, full_id: str | None, num_threads: int | None
                   ) -> tuple[LiteRTProgram, dict[str, np.ndarray]] | None:
    """(program, the weights it holds) if the bundle ships one that passes the probe step, else None."""
    names = [n for n in bundle.manifest.artifacts_of_kind(KIND) if bundle.holds(n)]
    if not names or full_id is None:
        return None
    params = bundle.all_params()
    params = {name: params[name] for name in param_infos(bundle.model_spec, bundle.patch_spec)}
    try:
        program = LiteRTProgram(bundle.artifact_bytes(names[0]), num_threads=num_threads)
        mismatch = probe_mismatch(program, trainable, full_id, params, bundle.manifest.train.batch,
                                  bundle.model_spec, bundle.patch_spec.k)
    except LiteRTError as exc:
        mismatch = str(exc)
    if mismatch:
        log.warning("%s not used (φ steps run on the trainable program instead): %s", KIND, mismatch)
        return None
    return program, params


def probe_mismatch(program: LiteRTProgram, trainable: LiteRTProgram, full_id: str, params: dict[str, np.ndarray],
                   batch: int, spec: Any, k: int) -> str:
    """One Adam step on a fixed random batch through both programs; '' if they agree, else what differs."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, *spec.input_shape)).astype(np.float32)
    y = rng.integers(0, spec.num_classes, batch).astype(np.int32)
    phi = rng.normal(0.0, 0.1, k).astype(np.float32)
    m = rng.normal(0.0, 0.01, k).astype(np.float32)
    v = rng.uniform(1e-4, 1e-3, k).astype(np.float32)
    got = program.train_phi_const(x, y, phi, m, v, 3.0, 0.01)
    want = trainable.train_phi(full_id, x, y, phi, m, v, 3.0, 0.01, params)
    for key in ("loss", "grad", "phi", "m", "v"):
        a, b = np.asarray(got[key], np.float64), np.asarray(want[key], np.float64)
        if a.shape != b.shape:
            return f"probe step: {key} has shape {a.shape}, the trainable program's {b.shape}"
        err = float(np.abs(a - b).max()) if np.all(np.isfinite(a)) else float("inf")
        if err > RTOL * max(float(np.abs(b).max()), 1e-12):
            return f"probe step: {key} differs from the trainable program's (max |Δ| {err:.3g})"
    return ""
