"""The MLPerf Tiny classifiers written as their reference Keras definitions (github.com/mlcommons/tiny,
benchmark/training: DS-CNN keyword spotting, MobileNetV1-0.25 visual wake words, ResNet-8 v1.0) convert
through the Keras source and match Keras' own logits to 1e-4 — real sizes, BatchNorm with random
statistics, TF "same" padding at stride 2 on even inputs, a 10×4 strided stem, projection shortcuts.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest

from edgepatch.export.sources.keras_source import convert_keras

from .test_model_sources import TOL, reference_logits

keras = pytest.importorskip("keras")
L = keras.layers
pytestmark = pytest.mark.slow  # TensorFlow import and three real-size models


def _bn_relu(x: object) -> object:
    return L.Activation("relu")(L.BatchNormalization()(x))


def ds_cnn() -> object:
    """kws/keras_model.py `ds_cnn`: input 49×10×1, 64 filters, four depthwise-separable blocks."""
    inp = keras.Input((49, 10, 1))
    x = L.Dropout(0.2)(_bn_relu(L.Conv2D(64, (10, 4), strides=(2, 2), padding="same")(inp)))
    for _ in range(4):
        x = _bn_relu(L.DepthwiseConv2D(depth_multiplier=1, kernel_size=(3, 3), padding="same")(x))
        x = _bn_relu(L.Conv2D(64, (1, 1), padding="same")(x))
    x = L.AveragePooling2D(pool_size=(24, 5))(L.Dropout(0.4)(x))
    return keras.Model(inp, L.Dense(12, activation="softmax")(L.Flatten()(x)))


def mobilenet_v1_025() -> object:
    """vww/vww_model.py `mobilenet_v1`: 96×96×3, 8 filters (alpha 0.25), 13 separable blocks."""
    inp = keras.Input((96, 96, 3))
    x = _bn_relu(L.Conv2D(8, 3, strides=2, padding="same")(inp))
    for stride, filters in ((1, 16), (2, 32), (1, 32), (2, 64), (1, 64), (2, 128), (1, 128), (1, 128), (1, 128),
                            (1, 128), (1, 128), (2, 256), (1, 256)):
        x = _bn_relu(L.DepthwiseConv2D(kernel_size=3, strides=stride, padding="same")(x))
        x = _bn_relu(L.Conv2D(filters, kernel_size=1, strides=1, padding="same")(x))
    x = L.AveragePooling2D(pool_size=x.shape[1:3])(x)
    return keras.Model(inp, L.Dense(2, activation="softmax")(L.Flatten()(x)))


def resnet8() -> object:
    """image_classification/keras_model.py `resnet_v1_eembc` (v1.0: 16/32/64 filters)."""
    inp = keras.Input((32, 32, 3))
    x = _bn_relu(L.Conv2D(16, 3, strides=1, padding="same")(inp))
    y = L.BatchNormalization()(L.Conv2D(16, 3, padding="same")(_bn_relu(L.Conv2D(16, 3, padding="same")(x))))
    x = L.Activation("relu")(L.add([x, y]))
    for filters in (32, 64):
        y = _bn_relu(L.Conv2D(filters, 3, strides=2, padding="same")(x))
        y = L.BatchNormalization()(L.Conv2D(filters, 3, strides=1, padding="same")(y))
        x = L.Conv2D(filters, kernel_size=1, strides=2, padding="same")(x)
        x = L.Activation("relu")(L.add([x, y]))
    x = L.AveragePooling2D(pool_size=int(np.amin(x.shape[1:3])))(x)
    return keras.Model(inp, L.Dense(10, activation="softmax")(L.Flatten()(x)))


MODELS = {"ds_cnn": ds_cnn, "mobilenet_v1_025": mobilenet_v1_025, "resnet8": resnet8}


def randomize_norms(model: object, rng: np.random.Generator) -> None:
    """BatchNorm statistics and affine parts away from their defaults, so that folding is really tested."""
    for layer in model.layers:  # type: ignore[attr-defined]
        if isinstance(layer, L.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, n), rng.uniform(-0.3, 0.3, n), rng.uniform(-0.5, 0.5, n),
                               rng.uniform(0.5, 2.0, n)])


def _folded_count(model: object) -> int:
    """Keras' parameter count without BatchNorm's 4 per channel (every conv here has its own bias)."""
    norms = sum(4 * layer.gamma.shape[0] for layer in model.layers if isinstance(layer, L.BatchNormalization))
    return int(model.count_params()) - norms  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_mlperf_tiny_keras_definition_converts_and_matches_keras(name: str) -> None:
    keras.utils.set_random_seed(0)
    model = MODELS[name]()
    rng = np.random.default_rng(1)
    randomize_norms(model, rng)

    spec, params = convert_keras(model, name)

    assert sum(v.size for v in params.values()) == _folded_count(model)  # BatchNorm folded away
    assert "norm" not in [layer.kind for layer in spec.layers]
    model.layers[-1].activation = keras.activations.linear  # Keras' own logits (the converter drops softmax)
    x = rng.normal(size=(2, *spec.input_shape)).astype(np.float32)
    want = np.asarray(model(np.moveaxis(x, 1, -1), training=False))
    got = reference_logits(spec, params, x)
    assert np.abs(got - want).max() <= TOL * max(1.0, float(np.abs(want).max()))


HAND_WRITTEN = {"ds_cnn": "ds_cnn_kws", "mobilenet_v1_025": "mobilenet_v1_vww", "resnet8": "resnet8_cifar"}
_WEIGHTED = ("conv2d", "conv1d", "dwconv2d", "dense")


@pytest.mark.parametrize("name", sorted(HAND_WRITTEN))
def test_hand_written_mlperf_descriptions_compute_what_keras_computes(name: str) -> None:
    """export/reference_models.py transcribes these models by hand; with the Keras model's weights (converted,
    then renamed layer by layer in order), the hand-written description gives Keras' own logits: same wiring,
    padding, strides and pooling, not just the same parameter shapes."""
    from edgepatch.export.reference_models import MLPERF_MODELS

    keras.utils.set_random_seed(0)
    model = MODELS[name]()
    randomize_norms(model, np.random.default_rng(5))
    converted, params = convert_keras(model, name)
    hand = MLPERF_MODELS[HAND_WRITTEN[name]]()
    pairs = list(zip([layer.name for layer in converted.layers if layer.kind in _WEIGHTED],
                     [layer.name for layer in hand.layers if layer.kind in _WEIGHTED], strict=True))

    renamed = {f"{theirs}.{part}": params[f"{ours}.{part}"] for ours, theirs in pairs for part in ("weight", "bias")}

    model.layers[-1].activation = keras.activations.linear
    x = np.random.default_rng(4).normal(size=(2, *hand.input_shape)).astype(np.float32)
    want = np.asarray(model(np.moveaxis(x, 1, -1), training=False))
    got = reference_logits(hand, renamed, x)  # raises if any renamed shape does not fit the hand description
    assert hand.input_shape == converted.input_shape
    assert np.abs(got - want).max() <= TOL * max(1.0, float(np.abs(want).max()))


@pytest.mark.parametrize("name", ["MobileNet", "MobileNetV2"])
def test_keras_applications_mobilenets_convert_and_match_keras(name: str) -> None:
    """keras.applications as users build them (weights=None: no download): MobileNet's top is global pooling
    with keepdims, a 1×1 conv (read as a dense layer), a Reshape and a softmax; MobileNetV2 has inverted
    residual adds, ReLU(6.), ZeroPadding2D before strided depthwise convs and a Dense head."""
    keras.utils.set_random_seed(2)
    build = getattr(keras.applications, name)
    model = build(input_shape=(96, 96, 3), alpha=0.25 if name == "MobileNet" else 0.35, weights=None, classes=3)
    rng = np.random.default_rng(3)
    randomize_norms(model, rng)

    spec, params = convert_keras(model, name.lower())

    assert spec.layers[-1].kind == "dense" and spec.num_classes == 3
    assert sum(v.size for v in params.values()) == _folded_count(model) + _bias_free_channels(model)
    model.layers[-1].activation = keras.activations.linear  # Dense(softmax) or Activation(softmax): logits
    x = rng.normal(size=(2, *spec.input_shape)).astype(np.float32)
    want = np.asarray(model(np.moveaxis(x, 1, -1), training=False))
    got = reference_logits(spec, params, x)
    assert np.abs(got - want).max() <= TOL * max(1.0, float(np.abs(want).max()))


def _bias_free_channels(model: object) -> int:
    """Zero biases the description adds to convs Keras built without one."""
    return sum(layer.kernel.shape[-1] if not isinstance(layer, L.DepthwiseConv2D) else layer.kernel.shape[-2]
               for layer in model.layers  # type: ignore[attr-defined]
               if isinstance(layer, (L.Conv2D, L.DepthwiseConv2D)) and not layer.use_bias)
