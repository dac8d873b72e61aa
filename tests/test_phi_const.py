"""The weights-baked φ step (`build_phi_const_tflite`): one Adam step on φ matches the torch reference, and
the program is a frozen one whose weights can be rewritten in place (export/frozen.py layout)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from edgepatch.device.backends.litert import LiteRTProgram, model_op_names
from edgepatch.export.frozen import build_frozen
from edgepatch.export.reference_models import default_patch, mnist_cnn
from edgepatch.export.tflite_builder import build_phi_const_tflite
from edgepatch.protocol.optim import AdamConfig, adam_step
from edgepatch.protocol.variants import full_variant
from edgepatch.protocol.weight_layout import write_weights

sys.path.insert(0, str(Path(__file__).parent))
from parity_checks import batch, dag_probe, live_params, torch_reference  # noqa: E402

BATCH = 4


def _const_builder(spec, patch, params, batch_size):  # noqa: ANN001, ANN202 - build_frozen's Builder
    return build_phi_const_tflite(spec, patch, params, batch_size)


def _check_step(program: LiteRTProgram, spec, patch, params, seed: int) -> None:  # noqa: ANN001
    rng = np.random.default_rng(seed)
    x, y = batch(spec, BATCH, rng)
    phi = rng.normal(0.0, 0.3, patch.k).astype(np.float32)
    m = rng.normal(0.0, 0.01, patch.k).astype(np.float32)
    v = rng.uniform(1e-4, 1e-3, patch.k).astype(np.float32)
    ref = torch_reference(spec, patch, full_variant(spec), params, x, y, phi)
    out = program.train_phi_const(x, y, phi, m, v, 3.0, 0.02)
    want_phi, want_m, want_v = adam_step(phi, ref["grad_phi"], m, v, 3.0, AdamConfig(), lr=0.02)
    np.testing.assert_allclose(out["loss"], ref["loss"], rtol=1e-4)
    scale = float(np.abs(ref["grad_phi"]).max())
    np.testing.assert_allclose(out["grad"], ref["grad_phi"], rtol=1e-4, atol=1e-4 * scale)
    np.testing.assert_allclose(out["phi"], want_phi, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out["m"], want_m, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(out["v"], want_v, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("make_spec", [mnist_cnn, dag_probe], ids=["mnist_cnn", "dag_probe"])
def test_phi_const_step_matches_torch_and_takes_new_weights(make_spec) -> None:  # noqa: ANN001
    spec = make_spec()
    patch = default_patch(spec, k=8)
    params = live_params(spec, patch, seed=1, scale=0.1)
    blob, layout = build_frozen(_const_builder, spec, patch, params, BATCH)
    program = LiteRTProgram(blob, num_threads=1)
    assert set(program.signatures()["train_phi"]["inputs"]) == {"x", "y", "phi", "m", "v", "step", "lr"}
    assert not [op for op in model_op_names(blob) if op.startswith(("Flex", "CUSTOM"))]
    _check_step(program, spec, patch, params, seed=2)
    # a base update rewrites the baked weights in place (what republication and devices do), no converter
    new_params = live_params(spec, patch, seed=5, scale=0.1)
    rewritten = write_weights(blob, layout, new_params)
    assert rewritten != blob
    _check_step(LiteRTProgram(rewritten, num_threads=1), spec, patch, new_params, seed=3)
