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
from edgepatch.protocol.weight_layout import write_weights

sys.path.insert(0, str(Path(__file__).parent))
from parity_checks import batch, check_phi_const_step, dag_probe, live_params  # noqa: E402

BATCH = 4


def _const_builder(spec, patch, params, batch_size):  # noqa: ANN001, ANN202 - build_frozen's Builder
    return build_phi_const_tflite(spec, patch, params, batch_size)


@pytest.mark.parametrize("make_spec", [mnist_cnn, dag_probe], ids=["mnist_cnn", "dag_probe"])
def test_phi_const_step_matches_torch_and_takes_new_weights(make_spec) -> None:  # noqa: ANN001
    spec = make_spec()
    patch = default_patch(spec, k=8)
    params = live_params(spec, patch, seed=1, scale=0.1)
    blob, layout = build_frozen(_const_builder, spec, patch, params, BATCH)
    program = LiteRTProgram(blob, num_threads=1)
    assert set(program.signatures()["train_phi"]["inputs"]) == {"x", "y", "phi", "m", "v", "step", "lr"}
    assert not [op for op in model_op_names(blob) if op.startswith(("Flex", "CUSTOM"))]
    check_phi_const_step(program, spec, patch, params, BATCH, seed=2)
    # a base update rewrites the baked weights in place (what republication and devices do), no converter
    new_params = live_params(spec, patch, seed=5, scale=0.1)
    rewritten = write_weights(blob, layout, new_params)
    assert rewritten != blob
    check_phi_const_step(LiteRTProgram(rewritten, num_threads=1), spec, patch, new_params, BATCH, seed=3)


# -- shipped in bundles: the engine's φ step (device/engine.py, device/phi_const.py) ---------------------

def _copy_bundle(src: Path, out: Path, blobs: dict | None = None, drop: tuple[str, ...] = ()) -> Path:
    """`src` rewritten by the bundle writer, with some artifacts replaced (`blobs`: kind -> bytes) or left out."""
    from edgepatch.protocol.bundle import load_bundle
    from edgepatch.protocol.bundle_writer import BundleWriter

    with load_bundle(src) as old:
        m = old.manifest
        writer = BundleWriter(out, m.model_id).set_model(m.model, m.patch).add_params(old.all_params())
        writer.set_input(m.input).set_labels(m.labels).set_train(m.train).set_variants(m.variants)
        for name, entry in m.artifacts.items():
            if entry.kind.startswith("params_") or entry.kind in drop:
                continue
            data = (blobs or {}).get(entry.kind, old.artifact_bytes(name))
            writer.add_bytes(entry.kind, data, name=name, path=entry.path, weights=entry.weights)
        writer.finish()
    return out


def _engine_step(engine, bundle, sliced, seed: int = 0):  # noqa: ANN001, ANN202
    rng = np.random.default_rng(seed)
    x, y = batch(bundle.model_spec, engine.train_batch, rng)
    k = bundle.patch_spec.k
    phi, zeros = rng.normal(0.0, 0.3, k).astype(np.float32), np.zeros(k, np.float32)
    full = next(r.id for r in bundle.manifest.variants if r.variant.is_full(bundle.model_spec))
    got = engine.phi_step(full, x, y, phi, zeros, zeros, 0.0, 0.05, sliced)
    want = engine.trainable.train_phi(full, x, y, phi, zeros, zeros, 0.0, 0.05, sliced)
    return got, want


def test_exported_bundle_ships_the_baked_phi_step_and_the_engine_uses_it(digits_bundle: Path) -> None:
    from edgepatch.device.engine import LiteRTEngine
    from edgepatch.protocol.bundle import load_bundle

    bundle = load_bundle(digits_bundle)
    entry = bundle.manifest.artifacts[bundle.artifact_of_kind("litert_phi_const")]
    assert entry.weights is not None and entry.path == "phi_const.tflite"  # rewritable in place on republish
    engine = LiteRTEngine(bundle, num_threads=1)
    params = bundle.all_params()
    (loss, phi, m, v), want = _engine_step(engine, bundle, params)
    assert engine.phi_const is not None  # passed its probe step against the trainable program
    np.testing.assert_allclose(loss, want["loss"], rtol=1e-5)
    np.testing.assert_allclose(phi, want["phi"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m, want["m"], rtol=1e-4, atol=1e-8)
    # Other weights than the bundle's (the baked program cannot hold them): the trainable program, exactly.
    other = {n: (p * 1.5).astype(np.float32) for n, p in params.items()}
    (loss2, phi2, _, _), want2 = _engine_step(engine, bundle, other)
    assert loss2 == float(want2["loss"]) and np.array_equal(phi2, want2["phi"])
    assert abs(loss2 - loss) > 1e-3


def test_old_bundle_without_it_and_a_wrong_one_fall_back_to_the_trainable_program(
        digits_bundle: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from edgepatch.device.engine import LiteRTEngine
    from edgepatch.protocol.bundle import load_bundle

    old = load_bundle(_copy_bundle(digits_bundle, tmp_path / "old", drop=("litert_phi_const",)))
    assert not old.manifest.artifacts_of_kind("litert_phi_const")
    engine = LiteRTEngine(old, num_threads=1)
    (loss, phi, _, _), want = _engine_step(engine, old, old.all_params())
    assert engine.phi_const is None and loss == float(want["loss"]) and np.array_equal(phi, want["phi"])

    # A baked program holding other weights than the bundle's parameters: refused at load by its probe step.
    with load_bundle(digits_bundle) as src:
        entry = src.manifest.artifacts[src.artifact_of_kind("litert_phi_const")]
        moved = {n: (p + 0.1).astype(np.float32) for n, p in src.all_params().items()}
        wrong = write_weights(src.artifact_bytes(src.artifact_of_kind("litert_phi_const")), entry.weights, moved)
    bad = load_bundle(_copy_bundle(digits_bundle, tmp_path / "bad", blobs={"litert_phi_const": wrong}))
    engine = LiteRTEngine(bad, num_threads=1)
    with caplog.at_level("WARNING", logger="edgepatch.device.phi_const"):
        (loss, phi, _, _), want = _engine_step(engine, bad, bad.all_params())
    assert engine.phi_const is None and "probe step" in caplog.text
    assert loss == float(want["loss"]) and np.array_equal(phi, want["phi"])
