"""torch idioms from torchvision-style code convert and match torch: a ResNet BasicBlock with a
downsample Sequential (conv 1×1 stride 2 + BN) and `out += identity`, one ReLU(inplace=True) module
reused, and MobileNetV2 inverted residuals (expand, strided depthwise, ReLU6, linear bottleneck)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgepatch.export.sources.torch_source import convert_module
from edgepatch.protocol.model_spec import SpecError

from .test_model_sources import assert_torch_parity, randomize_norms


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)  # one module, called twice, as torchvision does
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    input_shape = (3, 32, 32)

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True))
        self.layer1 = BasicBlock(16, 16, 1)
        self.layer2 = BasicBlock(16, 32, 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class TinyMobileNetV2(nn.Module):
    input_shape = (3, 24, 24)

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(inplace=True),
            InvertedResidual(8, 8, 1, 1), InvertedResidual(8, 16, 2, 4), InvertedResidual(16, 16, 1, 4))
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(16, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


def test_torchvision_style_resnet_converts() -> None:
    torch.manual_seed(0)
    net = randomize_norms(TinyResNet())

    spec, params = convert_module(net, "tiny_resnet")

    assert [layer.kind for layer in spec.layers].count("add") == 2
    assert spec.layer("layer2_downsample_0").stride == 2  # the projection keeps its torch name
    assert "layer2_downsample_0.bias" in params  # BatchNorm folded into the bias-free 1×1 conv
    assert_torch_parity(net, spec, params)


def test_mobilenet_v2_inverted_residuals_convert() -> None:
    torch.manual_seed(1)
    net = randomize_norms(TinyMobileNetV2())

    spec, params = convert_module(net, "tiny_mbv2")

    kinds = [layer.kind for layer in spec.layers]
    assert kinds.count("dwconv2d") == 3 and kinds.count("relu6") == 7 and kinds.count("add") == 2
    assert_torch_parity(net, spec, params)


def test_pointwise_conv_head_after_global_pooling_is_a_dense_layer() -> None:
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Conv2d(8, 4, 1), nn.Flatten())
    net.input_shape = (3, 10, 10)

    spec, params = convert_module(net, "conv_head")

    assert [layer.kind for layer in spec.layers][-2:] == ["gap", "dense"] and params["layer3.weight"].shape == (4, 8)
    assert_torch_parity(net, spec, params)


class _FunctionalPads(nn.Module):
    input_shape = (2, 9, 8)

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 2, stride=2)
        self.head = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.pad(x, (1, 1))  # the width only: 9×10
        x = nn.functional.pad(x, (0, 0, 0, 1), mode="constant", value=0.0)  # one row at the bottom: 10×10
        return self.head(torch.flatten(torch.relu(self.conv(x)), 1))


def test_functional_pads_of_some_axes_only() -> None:
    torch.manual_seed(3)
    net = _FunctionalPads()

    spec, params = convert_module(net, "fpads")

    assert [layer.pads for layer in spec.layers[:2]] == [(0, 0, 1, 1), (0, 1, 0, 0)]
    assert_torch_parity(net, spec, params)


class _InPlace(nn.Module):
    input_shape = (2, 8)

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, padding=1)
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        h.relu_()  # changes h in place: invisible to torch.fx, so converting it silently would be wrong
        return self.head(torch.flatten(h, 1))


def test_unassigned_in_place_op_is_refused_not_dropped() -> None:
    with pytest.raises(SpecError, match=r"layer 'relu_' \(in-place relu_\) is not supported: assign its result"):
        convert_module(_InPlace(), "inplace")
