"""Model sources (export/resolve.py load_model): reference names, ModelSpecs, torch modules, Keras models and
.keras files become a model description whose torch reference forward equals the source's own forward.

Every parity check runs the real source framework (torch eval mode, Keras inference) against
`export/torch_model.forward` with a FiLM patch at φ = 0, on random inputs, to 1e-4 on the logits.
"""

from __future__ import annotations

import os
import runpy
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgepatch.export.reference_models import default_patch
from edgepatch.export.resolve import load_model, resolve_model
from edgepatch.export.sources.torch_source import convert_module
from edgepatch.export.torch_model import forward, to_tensors
from edgepatch.protocol.model_spec import ModelSpec, SpecError
from edgepatch.protocol.params import init_params

TOL = 1e-4


def reference_logits(spec: ModelSpec, params: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """edgepatch's torch reference forward, patched with FiLM at φ = 0 (x channel-first)."""
    patch = default_patch(spec, "film", k=4)
    shared = {k: v for k, v in init_params(spec, patch, 1).items() if ".patch." in k}
    phi = torch.zeros(patch.k)
    with torch.no_grad():
        return forward(spec, patch, to_tensors({**params, **shared}), torch.tensor(x), phi).numpy()


def randomize_norms(module: nn.Module, seed: int = 0) -> nn.Module:
    """BatchNorm with non-trivial statistics and affine parts, so that folding is really tested."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=gen) * 2 - 1)
            m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=gen) - 0.5)
    return module.eval()


def assert_torch_parity(module: nn.Module, spec: ModelSpec, params: dict[str, np.ndarray]) -> None:
    x = np.random.default_rng(3).normal(size=(4, *spec.input_shape)).astype(np.float32)
    with torch.no_grad():
        want = module.eval()(torch.tensor(x)).numpy()
    got = reference_logits(spec, params, x)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= TOL, np.abs(got - want).max()


# -- torch modules -----------------------------------------------------------------------------------


class ResNetBlockNet(nn.Module):
    """A strided stem, a ResNet basic block (BN folded, residual add), a strided depthwise separable
    pair with ReLU6, global average pooling through `view`, and a linear head."""

    input_shape = (3, 16, 16)

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(16)
        self.conv1, self.bn1 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 24, 1)
        self.act6 = nn.ReLU6()
        self.drop = nn.Dropout(0.3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem_bn(self.stem(x)))
        h = torch.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        x = (h + x).relu()
        x = self.act6(self.pw(self.dw(x)))
        x = self.pool(self.drop(x))
        return self.head(x.view(x.size(0), -1))


def sensor_sequential() -> nn.Sequential:
    """A 1-D CNN as users write it: nn.Sequential, strided conv, BN after conv and after linear."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv1d(2, 8, 5, padding=2), nn.BatchNorm1d(8), nn.ReLU(),
        nn.Conv1d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.AvgPool1d(2),
        nn.Flatten(), nn.Dropout(0.2), nn.Linear(16 * 10, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 4))
    net.input_shape = (2, 40)
    return randomize_norms(net)


def test_torch_resnet_block_converts_with_folded_norms_and_residual_add() -> None:
    torch.manual_seed(0)
    net = randomize_norms(ResNetBlockNet())

    spec, params = convert_module(net, "resblock")

    kinds = [layer.kind for layer in spec.layers]
    assert "norm" not in kinds and kinds.count("add") == 1 and kinds[-2:] == ["gap", "dense"]
    dw = spec.layer("dw")
    assert (dw.kind, dw.stride) == ("dwconv2d", 2)
    assert "stem.bias" in params and np.any(params["stem.bias"] != 0)  # BN folded into a bias-free conv
    assert_torch_parity(net, spec, params)


def test_torch_sequential_1d_names_layers_after_the_module() -> None:
    net = sensor_sequential()

    spec, params = convert_module(net, "sensor")

    assert [layer.name for layer in spec.layers] == [
        "layer0", "layer2", "layer3", "layer4", "layer5", "layer6", "layer8", "layer10", "layer11"]
    assert spec.input_shape == (2, 40) and spec.num_classes == 4
    assert_torch_parity(net, spec, params)


def test_torch_padding_forms_become_pad_layers_or_valid_convs() -> None:
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(1, 8, 2, stride=2),  # even kernel, asymmetric pad
        nn.ReLU(), nn.Conv2d(8, 8, (3, 1), padding=(1, 0)),  # rectangular "same"
        nn.Conv2d(8, 8, 3, padding=2),  # more than k//2: pad + valid
        nn.AvgPool2d((2, 1)), nn.Flatten(), nn.Linear(8 * 4 * 8, 3))
    net.input_shape = (1, 11, 11)

    spec, params = convert_module(net, "pads")

    assert spec.layers[0].kind == "pad" and spec.layers[0].pads == (0, 1, 0, 1)
    assert spec.layer("layer1").padding == "valid"
    assert (spec.layer("layer3").kernel, spec.layer("layer3").kernel_w, spec.layer("layer3").padding) == (3, 1, "same")
    assert spec.layer("layer4_pad").pads == (2, 2, 2, 2)
    assert_torch_parity(net, spec, params)


def test_torch_input_shape_is_required_and_can_be_passed() -> None:
    net = nn.Sequential(nn.Conv1d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 20, 3))

    with pytest.raises(SpecError, match=r"declares no input shape: set its input_shape = \(C, L\)"):
        convert_module(net, "plain")
    spec, params = convert_module(net, "plain", input_shape=(1, 20))

    assert spec.input_shape == (1, 20)
    assert_torch_parity(net, spec, params)


def test_torch_conversion_leaves_the_callers_module_alone() -> None:
    net = sensor_sequential().train().double()
    before = {k: v.clone() for k, v in net.state_dict().items()}

    spec, params = convert_module(net, "sensor")  # converted in eval mode, float32, on a copy

    assert net.training and next(net.parameters()).dtype == torch.float64
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(v.dtype == np.float32 for v in params.values())
    assert_torch_parity(net.float(), spec, params)


class _Lstm(nn.Module):
    input_shape = (4, 10)

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 3, padding=1)
        self.rnn = nn.LSTM(8, 8, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.conv(x).transpose(1, 2))
        return self.head(out[:, -1])


def _seq(*middle: nn.Module) -> nn.Sequential:
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), *middle, nn.Flatten(), nn.Linear(4 * 8 * 8, 2))
    net.input_shape = (1, 8, 8)
    return net


@pytest.mark.parametrize(("net", "expected"), [
    (_seq(nn.MaxPool2d(1)), r"layer '1' \(torch.nn.MaxPool2d\) is not supported: use average pooling"),
    (_seq(nn.Sigmoid()), r"layer '1' \(torch.nn.Sigmoid\) is not supported: use ReLU or ReLU6"),
    (_seq(nn.ReLU(), nn.BatchNorm2d(4)), r"layer '2' \(torch.nn.BatchNorm2d\) is not supported: use BatchNorm directly after"),
    (_seq(nn.Conv2d(4, 4, 3, padding=1, groups=2)), r"\(torch.nn.Conv2d\) is not supported: grouped convs"),
    (_seq(nn.Conv2d(4, 4, 3, padding=2, dilation=2)), r"dilation=1"),
    (_seq(nn.Softmax(dim=1)), r"\(torch.nn.Softmax\) is not supported: remove it"),
    (_Lstm(), r"layer 'rnn' \(torch.nn.LSTM\) is not supported: use a stack of Conv1d"),
], ids=["maxpool", "sigmoid", "norm-after-relu", "grouped", "dilated", "softmax-inside", "lstm"])
def test_torch_unsupported_layers_are_refused_by_name(net: nn.Module, expected: str) -> None:
    with pytest.raises(SpecError, match=expected):
        convert_module(net, "bad")


def test_torch_every_unsupported_layer_is_found_before_building() -> None:
    net = _seq(nn.MaxPool2d(1), nn.Tanh(), nn.GELU())

    with pytest.raises(SpecError) as info:
        convert_module(net, "bad")

    message = str(info.value)
    assert message.startswith("layer '1' (torch.nn.MaxPool2d) is not supported: use average pooling")
    assert message.endswith("(also unsupported: '2' (torch.nn.Tanh), '3' (torch.nn.GELU))")
    assert "\n" not in message


def test_torch_unsupported_layer_is_named_before_the_module_runs() -> None:
    """No input_shape and a forward that would crash (LSTM fed channel-first): the refusal still comes first."""
    net = nn.Sequential(nn.Conv1d(3, 8, 3, padding=1), nn.LSTM(8, 8), nn.Flatten(), nn.Linear(8 * 32, 4))

    with pytest.raises(SpecError, match=r"^layer '1' \(torch.nn.LSTM\) is not supported: use a stack of Conv1d"):
        convert_module(net, "bad")


class _Shared(nn.Module):
    input_shape = (4, 8, 8)

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.conv(self.conv(x)), 1))


def test_torch_layer_called_twice_is_refused() -> None:
    with pytest.raises(SpecError, match=r"layer 'conv' \(torch.nn.Conv2d\) is not supported: a layer called twice"):
        convert_module(_Shared(), "shared")


def test_torch_softmax_on_the_output_is_dropped() -> None:
    net = _seq(nn.ReLU())
    net.append(nn.Softmax(dim=-1))

    spec, params = convert_module(net, "probs")

    x = np.random.default_rng(0).normal(size=(3, 1, 8, 8)).astype(np.float32)
    with torch.no_grad():
        want = net.eval()(torch.tensor(x)).numpy()
    got = torch.softmax(torch.tensor(reference_logits(spec, params, x)), dim=1).numpy()
    assert spec.layers[-1].kind == "dense" and np.abs(got - want).max() <= TOL


# -- module:attr, file.py:attr and reference names ---------------------------------------------------

USER_FILE = """
import torch
from torch import nn

from edgepatch.protocol.model_spec import LayerSpec, ModelSpec


def build():
    torch.manual_seed(7)
    net = nn.Sequential(nn.Conv1d(1, 6, 3, padding=1), nn.BatchNorm1d(6), nn.ReLU6(), nn.AvgPool1d(4),
                        nn.Flatten(), nn.Linear(6 * 8, 3))
    net[1].running_var.fill_(2.0)
    net.input_shape = (1, 32)
    return net


net = build()


def spec():
    return ModelSpec("tiny", (1, 32), 3, (LayerSpec("conv1d", "c", out=4, kernel=3), LayerSpec("relu", "r"),
                                          LayerSpec("flatten", "f"), LayerSpec("dense", "head", out=3)))
"""


def test_file_py_attr_builds_a_torch_module_from_a_factory(tmp_path: Path) -> None:
    path = tmp_path / "my_net_file.py"
    path.write_text(textwrap.dedent(USER_FILE))

    spec, params = load_model(f"{path}:build", None)

    same_net = runpy.run_path(str(path))["build"]()  # seeded: the same weights as load_model saw
    assert params is not None and spec.name == "build"
    assert_torch_parity(same_net, spec, params)


def test_module_attr_from_the_current_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "edgepatch_test_usermods.py").write_text(textwrap.dedent(USER_FILE))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", os.getcwd())])

    spec, params = load_model("edgepatch_test_usermods:spec", None)
    net_spec, net_params = load_model("edgepatch_test_usermods:net", None)

    assert spec.name == "tiny" and params is None  # a ModelSpec carries no weights
    assert net_params is not None and net_spec.layers[0].kind == "conv1d"
    assert load_model("edgepatch_test_usermods:net", None, use_source_weights=False)[1] is None


def test_reference_names_and_bad_sources() -> None:
    assert load_model("digits_cnn", None) == (resolve_model("digits_cnn"), None)
    with pytest.raises(SpecError, match=r"unknown model 'nope': use a reference model \(digits_cnn"):
        load_model("nope", None)
    with pytest.raises(SpecError, match=r"cannot load model 'no_such_module_xyz:net': No module named"):
        load_model("no_such_module_xyz:net", None)
    with pytest.raises(SpecError, match=r"'os:sep' is a str, not a ModelSpec, torch.nn.Module or Keras model"):
        load_model("os:sep", None)
    with pytest.raises(SpecError, match=r"model file missing.py does not exist"):
        load_model("missing.py:net", None)
    with pytest.raises(SpecError, match=r"unknown model 'net.py': name the model inside it \('net.py:attr'\)"):
        load_model("net.py", None)
    with pytest.raises(SpecError, match=r"a weights file is not a model: pass the model as 'file.py:attr'"):
        load_model("trained.pt", None)


# -- through the command line --------------------------------------------------------------------------

BAD_FILE = """
from torch import nn

net = nn.Sequential(nn.Conv1d(3, 8, 3, padding=1), nn.MaxPool1d(2), nn.LSTM(8, 8), nn.Flatten(), nn.Linear(8, 4))
good = nn.Sequential(nn.Conv1d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 4))
good.input_shape = (3, 16)
"""


@pytest.mark.parametrize(("model", "weights", "expected"), [
    ("net", None, "error: layer '1' (torch.nn.MaxPool1d) is not supported: use average pooling with stride = "
                  "kernel (AvgPool / AveragePooling) or a strided conv (also unsupported: '2' (torch.nn.LSTM))"),
    ("good", b"PK-not-really", "is not a torch state-dict archive"),
], ids=["unsupported-layer", "bad-weights"])
def test_export_command_gives_one_line_errors(tmp_path: Path, model: str, weights: bytes | None,
                                              expected: str) -> None:
    import subprocess
    import sys

    (tmp_path / "cli_user_models.py").write_text(textwrap.dedent(BAD_FILE))
    args = ["export", "--model", f"{tmp_path / 'cli_user_models.py'}:{model}", "--variants", "1",
            "--out", str(tmp_path / "bundle")]
    if weights is not None:
        (tmp_path / "w.pt").write_bytes(weights)
        args += ["--weights", str(tmp_path / "w.pt")]

    proc = subprocess.run([sys.executable, "-m", "edgepatch.cli", *args], capture_output=True, text=True,
                          timeout=300, check=False)

    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert expected in " ".join(output.split()) and "Traceback" not in output
    assert not (tmp_path / "bundle").exists()
