"""Reference models: edge-sized networks described with the model description (see docs/models.md)."""

from __future__ import annotations

from edgepatch.protocol.model_spec import LayerSpec as L
from edgepatch.protocol.model_spec import ModelSpec, PatchSpec


def digits_cnn() -> ModelSpec:
    """8×8 scikit-learn digits."""
    return ModelSpec("digits_cnn", (1, 8, 8), 10, (
        L("conv2d", "conv1", out=16, kernel=3), L("relu", "act1"),
        L("conv2d", "conv2", out=32, kernel=3), L("relu", "act2"),
        L("avgpool", "pool2", kernel=2), L("flatten", "flat"),
        L("dense", "head", out=10),
    ))


def mnist_cnn() -> ModelSpec:
    """28×28 single-channel images (MNIST/FEMNIST-sized); the DISTREAL timing reference."""
    return ModelSpec("mnist_cnn", (1, 28, 28), 10, (
        L("conv2d", "conv1", out=32, kernel=3), L("norm", "norm1"), L("relu", "act1"),
        L("avgpool", "pool1", kernel=2),
        L("conv2d", "conv2", out=64, kernel=3), L("relu", "act2"),
        L("avgpool", "pool2", kernel=2), L("flatten", "flat"),
        L("dense", "head", out=10),
    ))


def sensor_cnn() -> ModelSpec:
    """1-D sensor windows: mnist1d's 40-sample signals."""
    return ModelSpec("sensor_cnn", (1, 40), 10, (
        L("conv1d", "conv1", out=32, kernel=5), L("relu", "act1"),
        L("conv1d", "conv2", out=32, kernel=3, stride=2), L("relu", "act2"),
        L("avgpool", "pool2", kernel=2), L("flatten", "flat"),
        L("dense", "fc", out=64), L("relu", "act3"),
        L("dense", "head", out=10),
    ))


REFERENCE_MODELS = {"digits_cnn": digits_cnn, "mnist_cnn": mnist_cnn, "sensor_cnn": sensor_cnn}
DEFAULT_MODEL = "digits_cnn"


def default_patch(spec: ModelSpec, kind: str = "film", k: int = 16, rank: int = 4) -> PatchSpec:
    """Patches after every conv layer: where a per-device shift of the input is best corrected."""
    layers = tuple(layer.name for layer in spec.layers if layer.kind in ("conv2d", "conv1d", "dwconv2d"))
    return PatchSpec(kind, layers, k, rank)
