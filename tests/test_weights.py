"""`--weights` files (export/sources/weights.py through load_model): .npz keyed `layer.weight` or
`layer__weight`, torch state dicts (.pt, weights_only), .safetensors; every bad file is a one-line error."""

from __future__ import annotations

import runpy
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_safetensors_numpy
from safetensors.torch import save_file as save_safetensors_torch

from edgepatch.export.resolve import load_model, resolve_model
from edgepatch.protocol.model_spec import SpecError
from edgepatch.protocol.params import init_params

from .test_model_sources import assert_torch_parity

NET_FILE = """
import torch
from torch import nn


def net():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 6, 3, padding=1), nn.BatchNorm1d(6), nn.ReLU(), nn.Flatten(),
                          nn.Linear(6 * 16, 3))
    model.input_shape = (1, 16)
    return model
"""


@pytest.fixture
def net_source(tmp_path: Path) -> tuple[str, object]:
    """A torch module source (`file.py:net`) and a builder of the same, freshly seeded module."""
    path = tmp_path / "weights_user_net.py"
    path.write_text(textwrap.dedent(NET_FILE))
    return f"{path}:net", runpy.run_path(str(path))["net"]


def _trained_state(build: object) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A module whose state differs from the source's own (as after training), BN statistics included."""
    module = build()  # type: ignore[operator]
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        module[1].running_mean.uniform_(-1, 1)
        module[1].running_var.uniform_(0.5, 2.0)
    return module.eval(), module.state_dict()


def test_npz_with_dot_or_double_underscore_keys_for_a_spec(tmp_path: Path) -> None:
    spec = resolve_model("digits_cnn")
    params = init_params(spec, seed=4)
    dots, unders = tmp_path / "dots.npz", tmp_path / "unders.npz"
    np.savez(dots, **params)
    np.savez(unders, **{k.replace(".", "__"): v for k, v in params.items()})

    for path in (dots, unders):
        _, loaded = load_model("digits_cnn", path)

        assert loaded is not None and sorted(loaded) == sorted(params)
        assert all(np.array_equal(loaded[k], params[k]) for k in params)


def test_torch_state_dict_loads_into_the_module_before_folding(tmp_path: Path, net_source: tuple) -> None:
    source, build = net_source
    trained, state = _trained_state(build)
    path = tmp_path / "trained.pt"
    torch.save(state, path)

    spec, params = load_model(source, path)

    assert params is not None
    assert_torch_parity(trained, spec, params)  # the file's weights, BN statistics folded, not the source's own


def test_state_dict_of_a_data_parallel_wrapper(tmp_path: Path, net_source: tuple) -> None:
    source, build = net_source
    trained, state = _trained_state(build)
    path = tmp_path / "parallel.pt"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)  # as nn.DataParallel saves it

    spec, params = load_model(source, path)

    assert params is not None
    assert_torch_parity(trained, spec, params)


def test_safetensors_of_a_torch_state_dict_and_of_spec_keys(tmp_path: Path, net_source: tuple) -> None:
    source, build = net_source
    trained, state = _trained_state(build)
    module_keys = tmp_path / "module.safetensors"
    save_safetensors_torch({k: v.contiguous() for k, v in state.items()}, str(module_keys))
    spec_params = init_params(resolve_model("sensor_cnn"), seed=2)
    spec_keys = tmp_path / "spec.safetensors"
    save_safetensors_numpy(spec_params, str(spec_keys))

    spec, params = load_model(source, module_keys)
    _, sensor = load_model("sensor_cnn", spec_keys)

    assert params is not None and sensor is not None
    assert_torch_parity(trained, spec, params)
    assert all(np.array_equal(sensor[k], spec_params[k]) for k in spec_params)


def test_description_keys_work_for_a_torch_source_too(tmp_path: Path, net_source: tuple) -> None:
    source, _ = net_source
    spec, own = load_model(source, None)
    assert own is not None
    replaced = {k: v + 1.0 for k, v in own.items()}
    path = tmp_path / "described.pt"
    torch.save({k.replace(".", "__"): torch.tensor(v) for k, v in replaced.items()}, path)

    _, params = load_model(source, path)

    assert params is not None and all(np.array_equal(params[k], replaced[k]) for k in replaced)


def _error(source: str, path: Path) -> str:
    with pytest.raises(SpecError) as info:
        load_model(source, path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_wrong_keys_list_found_and_expected(tmp_path: Path) -> None:
    params = init_params(resolve_model("digits_cnn"))
    params["conv9.weight"] = params.pop("conv2.weight")
    path = tmp_path / "typo.npz"
    np.savez(path, **params)

    message = _error("digits_cnn", path)

    assert "missing [conv2.weight]" in message and "unexpected [conv9.weight]" in message
    assert "expected keys [conv1.weight, conv1.bias, conv2.weight" in message and "found [" in message


def test_torch_state_dict_with_wrong_keys_and_shapes(tmp_path: Path, net_source: tuple) -> None:
    source, build = net_source
    state = build().state_dict()
    renamed = {("9.weight" if k == "4.weight" else k): v for k, v in state.items()}
    torch.save(renamed, tmp_path / "renamed.pt")
    resized = dict(state, **{"4.weight": torch.zeros(3, 7)})
    torch.save(resized, tmp_path / "resized.pt")

    assert "missing [4.weight]; unexpected [9.weight]" in _error(source, tmp_path / "renamed.pt")
    assert "'4.weight' has shape (3, 7), the module expects (3, 96)" in _error(source, tmp_path / "resized.pt")


def test_shape_and_nan_checked_for_a_spec(tmp_path: Path) -> None:
    params = init_params(resolve_model("digits_cnn"))
    np.savez(tmp_path / "shape.npz", **dict(params, **{"head.bias": np.zeros(3, np.float32)}))
    bad = dict(params)
    bad["conv1.bias"] = np.full_like(params["conv1.bias"], np.nan)
    np.savez(tmp_path / "nan.npz", **bad)

    assert "'head.bias' has shape (3,), expected (10,)" in _error("digits_cnn", tmp_path / "shape.npz")
    assert "'conv1.bias' holds NaN or inf" in _error("digits_cnn", tmp_path / "nan.npz")


@pytest.mark.parametrize(("name", "content", "expected"), [
    ("garbage.npz", b"not a zip at all", "is not an .npz archive"),
    ("garbage.pt", b"\x80\x04not really a pickle", "is not a torch state-dict archive"),
    ("garbage.safetensors", b"\xff" * 16, "is not a readable .safetensors file"),
    ("weights.h5", b"whatever", "unknown format '.h5'; use one of .npz, .pt, .pth, .safetensors"),
], ids=["npz", "pt", "safetensors", "suffix"])
def test_files_that_are_not_weight_archives(tmp_path: Path, name: str, content: bytes, expected: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)

    message = _error("digits_cnn", path)

    assert expected in message and "pickle" not in message.lower()


def test_pickled_objects_are_never_unpickled(tmp_path: Path, net_source: tuple) -> None:
    source, build = net_source
    torch.save(build(), tmp_path / "whole_model.pt")  # a pickled module, not a state dict
    np.savez(tmp_path / "objects.npz", w=np.array([{"a": 1}], dtype=object))
    marker = tmp_path / "unpickled"
    torch.save({"w": _Evil(str(marker))}, tmp_path / "evil.pt")  # would touch `marker` if unpickled

    assert ("not a plain state dict: it holds Python objects (torch.nn.modules.container.Sequential), which are "
            "never unpickled; save model.state_dict()") in _error(source, tmp_path / "whole_model.pt")
    assert "not a plain state dict" in _error(source, tmp_path / "evil.pt")
    assert not marker.exists()
    assert "holds object arrays" in _error("digits_cnn", tmp_path / "objects.npz")


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path(self.marker).touch, ())


def test_missing_weights_file(tmp_path: Path) -> None:
    message = _error("digits_cnn", tmp_path / "nowhere.npz")

    assert "does not exist" in message
