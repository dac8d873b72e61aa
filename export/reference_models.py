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


# -- the MLPerf Tiny classifiers at their real sizes --------------------------------------------------
# Transcribed from the reference Keras definitions (github.com/mlcommons/tiny, benchmark/training/):
# BatchNorm is folded into the conv before it, Dropout removed, TF's asymmetric 'same' at stride 2 is a
# `pad` layer (extra row/column at the bottom/right) + a 'valid' conv, channel-first like torch.

_SAME_STRIDE2_EVEN = (0, 1, 0, 1)  # TF 'same', kernel 3, stride 2, even input: pad 1 only after


def ds_cnn_kws() -> ModelSpec:
    """Keyword spotting DS-CNN: 49x10 MFCC frames (channel-first (1, 49, 10)), 12 keywords; 22.6 k parameters (BatchNorm folded).

    Conv2D(64, (10, 4), strides 2, 'same') = pad (4, 5, 1, 1) + valid; four depthwise-separable blocks
    of 64; AveragePooling2D((24, 5)) over the 25x5 map (floor mode: the last row is dropped, as in Keras)."""
    layers = [L("pad", "pad1", pads=(4, 5, 1, 1)),
              L("conv2d", "conv1", out=64, kernel=10, kernel_w=4, stride=2, padding="valid"), L("relu", "act1")]
    for i in range(1, 5):
        layers += [L("dwconv2d", f"dw{i}", kernel=3), L("relu", f"dw{i}_act"),
                   L("conv2d", f"pw{i}", out=64, kernel=1), L("relu", f"pw{i}_act")]
    layers += [L("avgpool", "pool", kernel=24, kernel_w=5), L("flatten", "flat"), L("dense", "head", out=12)]
    return ModelSpec("ds_cnn_kws", (1, 49, 10), 12, tuple(layers))


# (depthwise stride, pointwise filters) of MobileNetV1's 13 separable blocks, at width multiplier 0.25
_MOBILENET_BLOCKS = ((1, 16), (2, 32), (1, 32), (2, 64), (1, 64), (2, 128), (1, 128), (1, 128), (1, 128),
                     (1, 128), (1, 128), (2, 256), (1, 256))


def mobilenet_v1_vww() -> ModelSpec:
    """Visual wake words MobileNetV1 (width 0.25): 96x96 RGB, person / no person; 211 k parameters."""
    layers = [L("pad", "pad1", pads=_SAME_STRIDE2_EVEN),
              L("conv2d", "conv1", out=8, kernel=3, stride=2, padding="valid"), L("relu", "act1")]
    for i, (stride, filters) in enumerate(_MOBILENET_BLOCKS, start=1):
        if stride == 2:
            layers += [L("pad", f"dw{i}_pad", pads=_SAME_STRIDE2_EVEN),
                       L("dwconv2d", f"dw{i}", kernel=3, stride=2, padding="valid")]
        else:
            layers.append(L("dwconv2d", f"dw{i}", kernel=3))
        layers += [L("relu", f"dw{i}_act"), L("conv2d", f"pw{i}", out=filters, kernel=1), L("relu", f"pw{i}_act")]
    layers += [L("avgpool", "pool", kernel=3), L("flatten", "flat"), L("dense", "head", out=2)]
    return ModelSpec("mobilenet_v1_vww", (3, 96, 96), 2, tuple(layers))


def _resnet_stage(i: int, filters: int, block_input: str) -> list[L]:
    """A down-sampling residual stage: 3x3 stride 2, 3x3, plus a 1x1 stride-2 projection shortcut."""
    s = f"s{i}"
    return [L("pad", f"{s}_pad", pads=_SAME_STRIDE2_EVEN, input=block_input),
            L("conv2d", f"{s}c1", out=filters, kernel=3, stride=2, padding="valid"), L("relu", f"{s}a1"),
            L("conv2d", f"{s}c2", out=filters, kernel=3),
            L("conv2d", f"{s}sc", out=filters, kernel=1, stride=2, padding="valid", input=block_input),
            L("add", f"{s}add", input=f"{s}c2", source=f"{s}sc"), L("relu", f"{s}out")]


def resnet8_cifar() -> ModelSpec:
    """Image classification ResNet-8 (MLPerf Tiny v1.0 reference, 16/32/64 filters): 32x32 RGB, 10 classes;
    77.7 k parameters.

    Residual adds couple the stem with stage 1's second conv, and each stage's second conv with its
    projection shortcut: three slicing groups that share kept filters across the add."""
    layers = [L("conv2d", "stem", out=16, kernel=3), L("relu", "stem_act"),
              L("conv2d", "s1c1", out=16, kernel=3), L("relu", "s1a1"), L("conv2d", "s1c2", out=16, kernel=3),
              L("add", "s1add", source="stem_act"), L("relu", "s1out")]
    layers += _resnet_stage(2, 32, "s1out") + _resnet_stage(3, 64, "s2out")
    layers += [L("avgpool", "pool", kernel=8), L("flatten", "flat"), L("dense", "head", out=10)]
    return ModelSpec("resnet8_cifar", (3, 32, 32), 10, tuple(layers))


REFERENCE_MODELS = {"digits_cnn": digits_cnn, "mnist_cnn": mnist_cnn, "sensor_cnn": sensor_cnn}
# Separate from REFERENCE_MODELS: those come with offline data and pretraining; these are descriptions
# (export them with --weights or --data).
MLPERF_MODELS = {"ds_cnn_kws": ds_cnn_kws, "mobilenet_v1_vww": mobilenet_v1_vww, "resnet8_cifar": resnet8_cifar}
DEFAULT_MODEL = "digits_cnn"


def default_patch(spec: ModelSpec, kind: str = "film", k: int = 16, rank: int = 4) -> PatchSpec:
    """Patches after every conv layer: where a per-device shift of the input is best corrected."""
    layers = tuple(layer.name for layer in spec.layers if layer.kind in ("conv2d", "conv1d", "dwconv2d"))
    return PatchSpec(kind, layers, k, rank)
