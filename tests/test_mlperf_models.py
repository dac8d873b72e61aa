"""The MLPerf Tiny classifiers at their real sizes: structure, TF-'same' emulation, LiteRT and ExecuTorch parity.

Synthetic inputs (the benchmark's datasets are not available offline). Training programs use batch 4 to
keep CI time down; the export cost grows with the model's graph, not with the batch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgepatch.export import torch_model as tm
from edgepatch.export.reference_models import MLPERF_MODELS, default_patch
from edgepatch.protocol.model_spec import LayerSpec as L
from edgepatch.protocol.model_spec import ModelSpec, param_infos
from edgepatch.protocol.optim import AdamConfig
from edgepatch.protocol.variants import filter_flops, full_variant, sample_kept, slice_params, uniform_variant

sys.path.insert(0, str(Path(__file__).parent))
from parity_checks import assert_grads_close, batch, check_litert_variant, live_params, torch_reference  # noqa: E402

MODELS = sorted(MLPERF_MODELS)
BATCH = 4
SCALE = 0.05  # θ̄/bias perturbation and φ spread: keeps untrained deep models' logits O(1) (parity_checks)


def _count(spec: ModelSpec) -> int:
    return sum(int(np.prod(info.shape)) for info in param_infos(spec).values())


def test_shapes_and_sizes_follow_the_reference_models() -> None:
    kws, vww, resnet = (MLPERF_MODELS[m]() for m in ("ds_cnn_kws", "mobilenet_v1_vww", "resnet8_cifar"))
    shapes = kws.activation_shapes()
    assert kws.input_shape == (1, 49, 10) and shapes["conv1"] == (64, 25, 5) and shapes["pool"] == (64, 1, 1)
    assert shapes["head"] == (12,) and _count(kws) == 22604  # 23.2 k in Keras, with BatchNorm's 4 per channel
    shapes = vww.activation_shapes()
    assert vww.input_shape == (3, 96, 96) and shapes["conv1"] == (8, 48, 48) and shapes["pw13"] == (256, 3, 3)
    assert sum(layer.kind == "dwconv2d" for layer in vww.layers) == 13 and shapes["head"] == (2,)
    assert _count(vww) == 210850
    shapes = resnet.activation_shapes()
    assert shapes["s1add"] == (16, 32, 32) and shapes["s2add"] == (32, 16, 16) and shapes["s3add"] == (64, 8, 8)
    assert _count(resnet) == 77706
    assert resnet.slicing_groups() == {"stem": ("stem", "s1c2"), "s1c1": ("s1c1",), "s2c1": ("s2c1",),
                                       "s2c2": ("s2c2", "s2sc"), "s3c1": ("s3c1",), "s3c2": ("s3c2", "s3sc")}


@pytest.mark.parametrize("model", MODELS)
def test_half_variant_halves_every_group_and_cuts_flops(model: str) -> None:
    spec = MLPERF_MODELS[model]()
    half = uniform_variant(spec, 0.5)
    small = half.spec(spec)
    for group, width in half.widths(spec).items():
        assert width == spec.group_width(group) // 2, group
    assert filter_flops(small) < 0.32 * filter_flops(spec)
    # a sliced parameter set has exactly the small network's shapes
    patch = default_patch(spec, "lowrank", k=4, rank=2)
    sliced = slice_params(live_params(spec, patch, 0, SCALE), param_infos(spec, patch),
                          sample_kept(spec, half, np.random.default_rng(0)))
    assert {n: a.shape for n, a in sliced.items()} == {n: i.shape for n, i in param_infos(small, patch).items()}


def test_pad_plus_valid_reproduces_keras_same_at_stride_2() -> None:
    """The MLPerf models' TF 'same' convolutions at stride 2 (asymmetric padding) and their floor-mode
    pooling, against Keras layers with the same weights."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    cases = [  # (input CHW, our layers, keras layer, torch-layout weight shape or None)
        ((1, 49, 10), (L("pad", "p", pads=(4, 5, 1, 1)),
                       L("conv2d", "c", out=6, kernel=10, kernel_w=4, stride=2, padding="valid")),
         tf.keras.layers.Conv2D(6, (10, 4), strides=2, padding="same"), (6, 1, 10, 4)),
        ((5, 96, 96), (L("pad", "p", pads=(0, 1, 0, 1)), L("dwconv2d", "c", kernel=3, stride=2, padding="valid")),
         tf.keras.layers.DepthwiseConv2D(3, strides=2, padding="same"), (5, 1, 3, 3)),
        ((4, 32, 32), (L("conv2d", "c", out=6, kernel=1, stride=2, padding="valid"),),
         tf.keras.layers.Conv2D(6, 1, strides=2, padding="same"), (6, 4, 1, 1)),
        ((3, 25, 5), (L("avgpool", "c", kernel=24, kernel_w=5),), tf.keras.layers.AveragePooling2D((24, 5)), None),
    ]
    for chw, layers, keras_layer, w_shape in cases:
        spec = ModelSpec("probe", chw, 2, (*layers, L("flatten", "f"), L("dense", "head", out=2)))
        x = rng.normal(size=(2, *chw)).astype(np.float32)
        keras_out = keras_layer(np.transpose(x, (0, 2, 3, 1)))
        params = {}
        if w_shape is not None:
            w = rng.normal(size=w_shape).astype(np.float32)
            b = rng.normal(size=w_shape[0]).astype(np.float32)
            hwio = np.transpose(w, (2, 3, 1, 0)) if layers[-1].kind == "conv2d" else np.transpose(w, (2, 3, 0, 1))
            keras_layer.set_weights([hwio, b])
            keras_out = keras_layer(np.transpose(x, (0, 2, 3, 1)))
            params = {"c.weight": torch.tensor(w), "c.bias": torch.tensor(b)}
        h = torch.tensor(x)
        for layer in layers:
            h = tm.layer_forward(layer, h, params)
        want = np.transpose(keras_out.numpy(), (0, 3, 1, 2))
        assert h.shape == want.shape, (layers, h.shape, want.shape)
        assert spec.activation_shapes()[layers[-1].name] == want.shape[1:]  # shape inference agrees too
        np.testing.assert_allclose(h.numpy(), want, atol=1e-4, rtol=1e-4)


# -- runtime parity (slow: every model is converted and exported) ------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["film", "lowrank"])
@pytest.mark.parametrize("model", MODELS)
def test_litert_programs_match_torch(model: str, kind: str) -> None:
    """One trainable .tflite with the full and the 50 % variant: logits, a φ Adam step and every
    full-weight gradient in the LiteRT interpreter vs torch; builtins only; the frozen inference export."""
    from edgepatch.device.backends.litert import LiteRTProgram, model_op_names
    from edgepatch.export import tflite_builder

    spec = MLPERF_MODELS[model]()
    patch = default_patch(spec, kind, k=8, rank=4)
    variants = [full_variant(spec), uniform_variant(spec, 0.5)]
    adam = AdamConfig(lr=0.05)
    model_bytes = tflite_builder.build_trainable_tflite(spec, patch, variants, batch=BATCH, adam=adam)
    ops = model_op_names(model_bytes)
    assert not [op for op in ops if op.startswith("Flex") or op == "CUSTOM"], ops
    program = LiteRTProgram(model_bytes)
    params = live_params(spec, patch, 1, SCALE)
    for i, variant in enumerate(variants):
        check_litert_variant(program, spec, patch, variant, params, BATCH, 20 + i, adam, SCALE)
    frozen = LiteRTProgram(tflite_builder.build_inference_tflite(spec, patch, params))
    rng = np.random.default_rng(5)
    x, _ = batch(spec, 3, rng)
    phi = rng.normal(0.0, SCALE, patch.k).astype(np.float32)
    want = tm.forward(spec, patch, tm.to_tensors(params), torch.tensor(x), torch.tensor(phi)).numpy()
    np.testing.assert_allclose(frozen.infer(x, phi), want, atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_executorch_programs_match_torch(model: str) -> None:
    """Frozen XNNPACK inference (low-rank), φ gradients of the FiLM 50 % and the low-rank full variant,
    and every full-weight gradient of the 50 % variant, in the ExecuTorch runtime vs torch autograd."""
    from edgepatch.device.backends.executorch import (
        ExecuTorchFullTrainer,
        ExecuTorchInference,
        ExecuTorchPhiTrainer,
    )
    from edgepatch.export import executorch_builder as eb

    spec = MLPERF_MODELS[model]()
    rng = np.random.default_rng(7)
    x, y = batch(spec, BATCH, rng, np.int64)
    lowrank = default_patch(spec, "lowrank", k=8, rank=4)
    params = live_params(spec, lowrank, 2, SCALE)
    phi = rng.normal(0.0, SCALE, lowrank.k).astype(np.float32)
    inference = ExecuTorchInference(eb.build_inference_pte(spec, lowrank, params, BATCH))
    want = tm.forward(spec, lowrank, tm.to_tensors(params), torch.tensor(x), torch.tensor(phi)).numpy()
    np.testing.assert_allclose(inference.infer(x, phi), want, atol=1e-4, rtol=0)

    half = uniform_variant(spec, 0.5)
    refs = {}
    for patch, variant in ((default_patch(spec, "film", k=8), half), (lowrank, full_variant(spec))):
        params = live_params(spec, patch, 3, SCALE)
        sliced = slice_params(params, param_infos(spec, patch), sample_kept(spec, variant, rng))
        ref = refs[variant.id] = torch_reference(spec, patch, variant, sliced, x, y, phi)
        trainer = ExecuTorchPhiTrainer(eb.build_train_phi_pte(spec, patch, variant, BATCH))
        loss, grad = trainer.grad(x, y, phi, sliced)
        np.testing.assert_allclose(loss, ref["loss"], rtol=1e-4)
        np.testing.assert_allclose(trainer.last_logits, ref["logits"], atol=1e-4, rtol=0)
        np.testing.assert_allclose(grad, ref["grad_phi"], rtol=1e-3, atol=1e-6)
    full = ExecuTorchFullTrainer(eb.build_train_full_pte(spec, half, BATCH))
    loss, grads = full.grads(x, y, refs[half.id]["base"])  # the FiLM run's sliced base params and grads
    np.testing.assert_allclose(loss, refs[half.id]["full_loss"], rtol=1e-4)
    assert_grads_close(grads, refs[half.id]["base_grads"])
