"""Keras sources (a Keras model object, a saved .keras file): the description's torch reference forward
equals Keras' own inference forward to 1e-4 on the logits (channel-last input transposed to channel-first).
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest

from edgepatch.export.resolve import load_model
from edgepatch.protocol.model_spec import ModelSpec, SpecError

from .test_model_sources import TOL, reference_logits

keras = pytest.importorskip("keras")  # tensorflow-cpu's Keras 3 is part of the export extra
L = keras.layers
pytestmark = pytest.mark.slow  # importing TensorFlow takes seconds


def randomize_norms(model: object, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for layer in model.layers:  # type: ignore[attr-defined]
        if isinstance(layer, L.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, n), rng.uniform(-0.5, 0.5, n), rng.uniform(-1, 1, n),
                               rng.uniform(0.5, 2.0, n)])


def assert_keras_parity(model: object, spec: ModelSpec, params: dict[str, np.ndarray]) -> None:
    x = np.random.default_rng(5).normal(size=(4, *spec.input_shape)).astype(np.float32)  # channel-first
    channel_last = np.moveaxis(x, 1, -1)
    want = np.asarray(model(channel_last, training=False))  # type: ignore[operator]
    got = reference_logits(spec, params, x)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= TOL, np.abs(got - want).max()


def keras_resnet(size: int = 16) -> object:
    """Strided TF-"same" stem (asymmetric at stride 2), a ResNet basic block with BN, a strided depthwise
    separable pair with ReLU6, global average pooling, dropout and a linear head."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((size, size, 3))
    x = L.ReLU()(L.BatchNormalization()(L.Conv2D(16, 3, strides=2, padding="same", use_bias=False, name="stem")(inp)))
    h = L.Activation("relu")(L.BatchNormalization()(L.Conv2D(16, 3, padding="same")(x)))
    h = L.BatchNormalization()(L.Conv2D(16, 3, padding="same")(h))
    x = L.ReLU()(L.Add()([x, h]))
    x = L.DepthwiseConv2D(3, strides=2, padding="same", name="dw")(x)
    x = L.ReLU(max_value=6.0)(L.Conv2D(24, 1)(x))
    x = L.Dropout(0.2)(L.GlobalAveragePooling2D()(x))
    model = keras.Model(inp, L.Dense(5)(x))
    randomize_norms(model)
    return model


@pytest.mark.parametrize("size", [16, 15])
def test_keras_resnet_block_tf_same_padding_and_folded_norms(size: int) -> None:
    model = keras_resnet(size)

    spec, params = load_model_object(model)

    kinds = [layer.kind for layer in spec.layers]
    assert "norm" not in kinds and kinds.count("add") == 1
    stem = spec.layer("stem")
    if size == 16:  # TF puts the odd pixel after: (0, 1) per axis, a pad layer + valid conv
        assert spec.layers[0].kind == "pad" and spec.layers[0].pads == (0, 1, 0, 1) and stem.padding == "valid"
    else:  # 15 at stride 2 pads (1, 1): the description's own symmetric "same"
        assert spec.layers[0] is stem and stem.padding == "same"
    assert spec.layer("dw").stride == 2
    assert_keras_parity(model, spec, params)


def load_model_object(model: object) -> tuple[ModelSpec, dict[str, np.ndarray]]:
    from edgepatch.export.sources.keras_source import convert_keras

    return convert_keras(model, "kmodel")


def test_keras_sequential_1d_reorders_the_flattened_dense_rows() -> None:
    keras.utils.set_random_seed(1)
    model = keras.Sequential([
        keras.Input((40, 2)), L.Conv1D(8, 5, padding="same", activation="relu"),
        L.Conv1D(8, 3, strides=2, padding="same"), L.BatchNormalization(), L.ReLU(max_value=6),
        L.AveragePooling1D(2), L.Conv1D(8, 3, padding="causal", name="causal"), L.Flatten(name="flat"), L.Dense(16, activation="relu"),
        L.Dense(4)])
    randomize_norms(model)

    spec, params = load_model_object(model)

    assert spec.input_shape == (2, 40) and spec.layer("flat").kind == "flatten"
    assert spec.layer("causal_pad").pads == (2, 0)  # causal = left pad
    assert_keras_parity(model, spec, params)


def test_keras_separable_conv_and_zero_padding() -> None:
    keras.utils.set_random_seed(2)
    model = keras.Sequential([
        keras.Input((12, 10, 3)), L.SeparableConv2D(8, 3, padding="same", activation="relu"),
        L.ZeroPadding2D(((1, 0), (0, 1))), L.Conv2D(8, 2, strides=2), L.AveragePooling2D((2, 1)),
        L.Flatten(), L.Dense(3)])

    spec, params = load_model_object(model)

    assert [layer.kind for layer in spec.layers][:3] == ["dwconv2d", "conv2d", "relu"]
    assert_keras_parity(model, spec, params)


def test_keras_ds_cnn_style_rectangular_strided_stem_and_nested_block() -> None:
    """DS-CNN keyword spotting's shape (49×10×1, a 10×4 stride-2 "same" stem), with its depthwise
    separable block written as a nested Sequential, as users often do."""
    keras.utils.set_random_seed(4)
    block = keras.Sequential([L.DepthwiseConv2D(3, padding="same", use_bias=False), L.BatchNormalization(),
                              L.ReLU(), L.Conv2D(16, 1, use_bias=False), L.BatchNormalization(), L.ReLU()],
                             name="block")
    inp = keras.Input((49, 10, 1))
    x = L.ReLU()(L.BatchNormalization()(L.Conv2D(16, (10, 4), strides=2, padding="same", name="stem")(inp)))
    x = L.AveragePooling2D((25, 5))(block(L.Dropout(0.2)(x)))
    model = keras.Model(inp, L.Dense(12)(L.Flatten()(x)))
    randomize_norms(model)
    randomize_norms(block, seed=1)

    spec, params = load_model_object(model)

    pad, stem = spec.layers[0], spec.layer("stem")
    assert pad.kind == "pad" and pad.pads == (4, 5, 1, 1)  # TF: total 9 rows (4 before, 5 after), 2 columns
    assert (stem.kernel, stem.kernel_w, stem.stride, stem.padding) == (10, 4, 2, "valid")
    assert "norm" not in [layer.kind for layer in spec.layers]
    assert_keras_parity(model, spec, params)


def test_keras_shared_layer_is_refused() -> None:
    inp = keras.Input((8, 8, 4))
    conv = L.Conv2D(4, 3, padding="same", name="shared")
    x = conv(conv(inp))
    model = keras.Model(inp, L.Dense(2)(L.Flatten()(x)))

    with pytest.raises(SpecError, match=r"layer 'shared' \(Conv2D\) is not supported: a layer used twice"):
        load_model_object(model)


def test_saved_keras_file_source(tmp_path: Path) -> None:
    model = keras_resnet()
    path = tmp_path / "resnet_block.keras"
    model.save(path)

    spec, params = load_model(str(path), None)

    assert spec.name == "resnet_block" and params is not None
    assert_keras_parity(model, spec, params)


def test_keras_softmax_head_is_dropped() -> None:
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((8, 8, 1)), L.Conv2D(4, 3, padding="same", activation="relu"),
                              L.GlobalAveragePooling2D(), L.Dense(3, activation="softmax")])

    spec, params = load_model_object(model)

    x = np.random.default_rng(0).normal(size=(3, 1, 8, 8)).astype(np.float32)
    logits = reference_logits(spec, params, x)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert np.abs(probs - np.asarray(model(np.moveaxis(x, 1, -1)))).max() <= TOL


def _seq(*middle: object) -> object:
    return keras.Sequential([keras.Input((8, 8, 1)), L.Conv2D(4, 3, padding="same", name="conv"), *middle,
                             L.Flatten(), L.Dense(2, name="head")])


@pytest.mark.parametrize(("build", "expected"), [
    (lambda: _seq(L.MaxPooling2D(2, name="mp")), r"layer 'mp' \(keras.layers.MaxPooling2D\) is not supported: use average"),
    (lambda: _seq(L.Activation("sigmoid", name="sig")), r"layer 'sig' \(Activation\('sigmoid'\)\) is not supported: use ReLU"),
    (lambda: keras.Sequential([keras.Input((8, 8, 1)), L.Conv2D(4, 3, activation="tanh", name="conv"), L.Flatten(),
                               L.Dense(2)]), r"layer 'conv_tanh' \(Conv2D with activation 'tanh'\) is not supported"),
    (lambda: keras.Sequential([keras.Input((10, 3)), L.LSTM(4, name="lstm"), L.Dense(2)]),
     r"layer 'lstm' \(keras.layers.LSTM\) is not supported: use a stack of Conv1d"),
    (lambda: _seq(L.ReLU(), L.BatchNormalization(name="bn")), r"layer 'bn' \(BatchNormalization\) is not supported: use "
     r"BatchNorm directly after a conv"),
    (lambda: _seq(L.AveragePooling2D(3, strides=1, name="ap")), r"only non-overlapping average pooling"),
], ids=["maxpool", "sigmoid", "fused-tanh", "lstm", "norm-after-relu", "overlapping-pool"])
def test_keras_unsupported_layers_are_refused_by_name(build: object, expected: str) -> None:
    with pytest.raises(SpecError, match=expected):
        load_model_object(build())  # type: ignore[operator]


def test_subclassed_and_unbuilt_keras_models_are_refused() -> None:
    class Subclassed(keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.flat, self.head = L.Conv1D(4, 3), L.Flatten(), L.Dense(3)

        def call(self, x: object) -> object:
            return self.head(self.flat(self.conv(x)))

    model = Subclassed()
    model(np.zeros((1, 10, 2), np.float32))

    with pytest.raises(SpecError, match=r"is a subclassed Subclassed: its layers are wired in call\(\)"):
        load_model_object(model)
    with pytest.raises(SpecError, match=r"has no input shape yet: start it with keras.Input"):
        load_model_object(keras.Sequential([L.Conv1D(4, 3), L.Flatten(), L.Dense(3)]))


def test_not_a_keras_archive(tmp_path: Path) -> None:
    path = tmp_path / "model.keras"
    path.write_bytes(b"definitely not a zip")

    with pytest.raises(SpecError, match=r"is not a Keras archive"):
        load_model(str(path), None)


KERAS_FILE = """
import keras
from keras import layers as L


def build():
    keras.utils.set_random_seed(6)
    inp = keras.Input((20, 2))
    x = L.Conv1D(8, 3, strides=2, padding="same", activation="relu")(inp)
    x = L.GlobalAveragePooling1D()(x)
    return keras.Model(inp, L.Dense(3)(x))
"""


def test_file_py_attr_returning_a_keras_model(tmp_path: Path) -> None:
    import runpy

    path = tmp_path / "keras_user_model.py"
    path.write_text(KERAS_FILE)

    spec, params = load_model(f"{path}:build", None)

    same_model = runpy.run_path(str(path))["build"]()  # seeded: the same weights as load_model saw
    assert spec.name == "build" and spec.input_shape == (2, 20) and params is not None
    assert_keras_parity(same_model, spec, params)
