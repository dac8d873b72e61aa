"""Converted user models export: the LiteRT and ExecuTorch programs built from a torch module's or a
Keras model's description give the source framework's own logits (φ = 0, ≤ 1e-4), and the LiteRT
trainable program of a converted ResNet block trains φ and full weights like torch (full and 50 % variant).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest
import torch

from edgepatch.device.backends.litert import LiteRTProgram, model_op_names
from edgepatch.export import tflite_builder
from edgepatch.export.reference_models import default_patch
from edgepatch.export.sources.torch_source import convert_module
from edgepatch.protocol.model_spec import ModelSpec, PatchSpec
from edgepatch.protocol.optim import AdamConfig
from edgepatch.protocol.params import Params, init_params
from edgepatch.protocol.variants import full_variant, uniform_variant

from .test_model_sources import ResNetBlockNet, randomize_norms, sensor_sequential

sys.path.insert(0, str(Path(__file__).parent))
from parity_checks import check_litert_variant  # noqa: E402

pytestmark = pytest.mark.slow  # converts TensorFlow graphs and lowers ExecuTorch programs
BATCH = 4
TOL = 1e-4


def _torch_resnet() -> tuple[ModelSpec, Params, object]:
    torch.manual_seed(0)
    net = randomize_norms(ResNetBlockNet())
    spec, params = convert_module(net, "resblock")
    return spec, params, lambda x: net(torch.tensor(x)).detach().numpy()


def _torch_sensor() -> tuple[ModelSpec, Params, object]:
    net = sensor_sequential()
    spec, params = convert_module(net, "sensor")
    return spec, params, lambda x: net(torch.tensor(x)).detach().numpy()


def _keras_resnet() -> tuple[ModelSpec, Params, object]:
    from edgepatch.export.sources.keras_source import convert_keras

    from .test_model_sources_keras import keras_resnet

    model = keras_resnet(16)  # TF "same" at stride 2 on an even size: a pad layer + valid conv
    spec, params = convert_keras(model, "kresblock")
    return spec, params, lambda x: np.asarray(model(np.moveaxis(x, 1, -1), training=False))


def _keras_file() -> tuple[ModelSpec, Params, object]:
    """A saved .keras file through load_model, compared with the model object that was saved."""
    import tempfile

    from edgepatch.export.resolve import load_model

    from .test_model_sources_keras import keras_resnet

    model = keras_resnet(15)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "my resnet.keras"
        model.save(path)
        spec, params = load_model(str(path), None)
    assert spec.name == "my_resnet" and params is not None
    return spec, params, lambda x: np.asarray(model(np.moveaxis(x, 1, -1), training=False))


SOURCES = {"torch-resnet": _torch_resnet, "torch-sensor-1d": _torch_sensor, "keras-resnet": _keras_resnet,
           "keras-file": _keras_file}


def _patched(spec: ModelSpec, params: Params) -> tuple[PatchSpec, Params]:
    patch = default_patch(spec, "film", k=4)
    shared = {k: v for k, v in init_params(spec, patch, 1).items() if ".patch." in k}
    return patch, {**params, **shared}


def _inputs(spec: ModelSpec) -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(9).normal(size=(BATCH, *spec.input_shape)).astype(np.float32)
    return x, np.zeros(4, np.float32)


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_litert_inference_equals_the_source_framework(source: str) -> None:
    spec, params, source_forward = SOURCES[source]()
    patch, all_params = _patched(spec, params)
    x, phi = _inputs(spec)

    program = tflite_builder.build_inference_tflite(spec, patch, all_params)

    got = LiteRTProgram(program).infer(x, phi)
    assert not [op for op in model_op_names(program) if op.startswith("Flex") or op == "CUSTOM"]
    assert np.abs(got - source_forward(x)).max() <= TOL  # type: ignore[operator]


@pytest.mark.parametrize("source", ["torch-resnet", "keras-resnet"])  # ~30 s each to lower
def test_executorch_inference_equals_the_source_framework(source: str) -> None:
    from edgepatch.device.backends.executorch import ExecuTorchInference
    from edgepatch.export.executorch_builder import build_inference_pte

    spec, params, source_forward = SOURCES[source]()
    patch, all_params = _patched(spec, params)
    x, phi = _inputs(spec)

    runner = ExecuTorchInference(build_inference_pte(spec, patch, all_params, BATCH))

    assert np.abs(runner.infer(x, phi) - source_forward(x)).max() <= TOL  # type: ignore[operator]


def test_converted_resnet_block_trains_in_litert_like_torch() -> None:
    """The residual add couples the stem and the block's second conv into one slicing group: the 50 %
    variant slices them together, and φ / full-weight steps still match torch."""
    spec, params, _ = _torch_resnet()
    patch, all_params = _patched(spec, params)
    variants = [full_variant(spec), uniform_variant(spec, 0.5)]
    adam = AdamConfig(lr=0.05)

    program = LiteRTProgram(tflite_builder.build_trainable_tflite(spec, patch, variants, batch=BATCH, adam=adam))

    for i, variant in enumerate(variants):
        check_litert_variant(program, spec, patch, variant, all_params, BATCH, 20 + i, adam)
