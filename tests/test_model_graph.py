"""The model description as a DAG: wiring, shapes, slicing groups and the errors bad descriptions get."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgepatch.export.reference_models import REFERENCE_MODELS
from edgepatch.protocol.model_spec import LayerSpec as L
from edgepatch.protocol.model_spec import ModelSpec, PatchSpec, SpecError, dumps, param_infos
from edgepatch.protocol.variants import (
    Variant,
    filter_flops,
    first_kept,
    sample_kept,
    slice_params,
    uniform_variant,
)


def residual_net() -> ModelSpec:
    """A stem, one identity residual block and one projection block (ResNet-8's structure, tiny)."""
    return ModelSpec("res", (3, 16, 16), 5, (
        L("conv2d", "stem", out=16, kernel=3), L("relu", "stem_act"),
        L("conv2d", "b1c1", out=16, kernel=3), L("relu", "b1a"),
        L("conv2d", "b1c2", out=16, kernel=3),
        L("add", "b1add", source="stem_act"), L("relu", "b1out"),
        L("pad", "b2pad", pads=(0, 1, 0, 1)),
        L("conv2d", "b2c1", out=32, kernel=3, stride=2, padding="valid"), L("relu", "b2a"),
        L("conv2d", "b2c2", out=32, kernel=3),
        L("conv2d", "b2sc", out=32, kernel=1, stride=2, input="b1out"),
        L("add", "b2add", input="b2c2", source="b2sc"), L("relu6", "b2out"),
        L("gap", "pool"), L("dense", "head", out=5),
    ))


def test_shapes_follow_the_wiring() -> None:
    spec = residual_net()
    shapes = spec.activation_shapes()
    assert shapes["b1add"] == (16, 16, 16)
    assert shapes["b2pad"] == (16, 17, 17)
    assert shapes["b2c1"] == (32, 8, 8)  # TF 'same' at stride 2 = pad (0, 1) + valid
    assert shapes["b2sc"] == (32, 8, 8)  # reads b1out, not the previous layer
    assert shapes["pool"] == (32,) and shapes["head"] == (5,)
    assert spec.operands("b2sc") == ("b1out",)
    assert spec.operands("b2add") == ("b2c2", "b2sc")
    assert spec.operands("b1add") == ("b1c2", "stem_act")


def test_rectangular_kernels_strided_depthwise_and_valid_padding() -> None:
    spec = ModelSpec("kws", (1, 49, 10), 12, (
        L("pad", "p0", pads=(4, 5, 1, 1)),
        L("conv2d", "c0", out=8, kernel=10, kernel_w=4, stride=2, padding="valid"),
        L("dwconv2d", "dw", kernel=3, stride=2), L("dwconv2d", "dwv", kernel=2, kernel_w=3, padding="valid"),
        L("avgpool", "pool", kernel=3, kernel_w=1), L("flatten", "f"), L("dense", "head", out=12),
    ))
    shapes = spec.activation_shapes()
    assert shapes["c0"] == (8, 25, 5)  # as TF's Conv2D((10, 4), strides=2, padding='same') on 49x10
    assert shapes["dw"] == (8, 13, 3)
    assert shapes["dwv"] == (8, 12, 1)
    assert shapes["pool"] == (8, 4, 1) and shapes["f"] == (32,)
    infos = param_infos(spec)
    assert infos["c0.weight"].shape == (8, 1, 10, 4)
    assert infos["dwv.weight"].shape == (8, 1, 2, 3)
    # MACs count rectangular taps: 25*5 outputs * 8 filters * 40 taps for c0
    assert filter_flops(spec) == 25 * 5 * 8 * 40 + 13 * 3 * 8 * 9 + 12 * 1 * 8 * 6 + 12 * 32


def test_residual_add_couples_convs_into_one_group() -> None:
    spec = residual_net()
    groups = spec.slicing_groups()
    assert groups == {"stem": ("stem", "b1c2"), "b1c1": ("b1c1",), "b2c1": ("b2c1",),
                      "b2c2": ("b2c2", "b2sc")}
    assert spec.droppable_layers() == ["stem", "b1c1", "b2c1", "b2c2"]
    infos = param_infos(spec, PatchSpec("lowrank", ("b1c2", "b2sc"), 4, 2))
    assert infos["b1c2.weight"].axis_sources[:2] == ("stem", "b1c1")
    assert infos["b2c1.weight"].axis_sources[:2] == ("b2c1", "stem")  # reads the add's channels
    assert infos["b2sc.weight"].axis_sources[:2] == ("b2c2", "stem")
    assert infos["head.weight"].axis_sources == (None, "b2c2")  # gap: one feature per channel
    assert infos["b2sc.patch.up"].axis_sources == ("b2c2", None)


def test_variant_of_a_residual_block_really_shrinks_tensors() -> None:
    spec = residual_net()
    half = uniform_variant(spec, 0.5)
    assert half.widths(spec) == {"stem": 8, "b1c1": 8, "b2c1": 16, "b2c2": 16}
    small = half.spec(spec)
    shapes = small.activation_shapes()
    assert shapes["b1add"] == (8, 16, 16) and shapes["b2add"] == (16, 8, 8)
    patch = PatchSpec("film", ("stem", "b1c2", "b2c2", "b2sc"), 3)
    infos = param_infos(spec, patch)
    params = {n: np.random.default_rng(0).normal(size=i.shape).astype(np.float32) for n, i in infos.items()}
    kept = sample_kept(spec, half, np.random.default_rng(1))
    assert set(kept) == set(spec.droppable_layers())
    sliced = slice_params(params, infos, kept)
    small_infos = param_infos(small, patch)
    assert list(sliced) == list(small_infos)
    for name, info in small_infos.items():
        assert sliced[name].shape == info.shape, name
    assert sliced["b1c2.weight"].shape == (8, 8, 3, 3)
    assert sliced["b2sc.weight"].shape == (16, 8, 1, 1)
    assert sliced["head.weight"].shape == (5, 16)
    # the coupled convs are cut with the same kept set
    np.testing.assert_array_equal(sliced["b1c2.bias"], params["b1c2.bias"][kept["stem"]])
    np.testing.assert_array_equal(sliced["stem.bias"], params["stem.bias"][kept["stem"]])
    np.testing.assert_array_equal(sliced["b2sc.patch.scale"], params["b2sc.patch.scale"][kept["b2c2"]])
    assert filter_flops(small) < 0.35 * filter_flops(spec)
    assert first_kept(spec, half)["b2c2"].tolist() == list(range(16))


def test_add_with_the_model_input_pins_its_channels() -> None:
    spec = ModelSpec("skip_in", (4, 8, 8), 3, (
        L("conv2d", "c1", out=4, kernel=3), L("add", "a", source="input"),
        L("conv2d", "c2", out=8, kernel=3), L("flatten", "f"), L("dense", "head", out=3),
    ))
    assert spec.slicing_groups() == {"c2": ("c2",)}  # c1's channels are the input's: never dropped
    assert param_infos(spec)["c1.weight"].axis_sources[:2] == (None, None)
    with pytest.raises(SpecError, match="not droppable"):
        spec.with_widths({"c1": 2})


def test_with_widths_applies_to_the_whole_group() -> None:
    small = residual_net().with_widths({"b2c2": 8})
    assert small.layer("b2c2").out == 8 and small.layer("b2sc").out == 8
    assert small.activation_shapes()["b2add"] == (8, 8, 8)


def test_dag_json_round_trip_and_old_json_loads_unchanged() -> None:
    spec = residual_net()
    assert ModelSpec.from_dict(json.loads(dumps(spec))) == spec
    old = ('{"input_shape": [1, 8, 8], "layers": [{"kernel": 3, "kind": "conv2d", "name": "conv1", "out": 16, '
           '"stride": 1}, {"kernel": 0, "kind": "relu", "name": "act1", "out": 0, "stride": 1}, {"kernel": 0, '
           '"kind": "flatten", "name": "flat", "out": 0, "stride": 1}, {"kernel": 0, "kind": "dense", "name": '
           '"head", "out": 10, "stride": 1}], "name": "old", "num_classes": 10}')
    loaded = ModelSpec.from_dict(json.loads(old))
    assert loaded.layer("conv1").padding == "same" and loaded.layer("conv1").input == ""
    assert dumps(loaded) == old  # an old description serializes byte for byte as before


def test_reference_models_keep_their_groups_and_shapes() -> None:
    spec = REFERENCE_MODELS["digits_cnn"]()
    assert spec.droppable_layers() == ["conv1", "conv2"]
    infos = param_infos(spec, PatchSpec("film", ("conv1", "conv2"), 4))
    assert infos["head.weight"].axis_sources == (None, "flat:conv2:16")
    assert infos["conv2.weight"].axis_sources == ("conv2", "conv1", None, None)
    assert Variant("k100-50", {"conv2": 0.5}).widths(spec) == {"conv1": 16, "conv2": 16}


def _spec(*layers: L, shape: tuple[int, ...] = (2, 8, 8)) -> ModelSpec:
    return ModelSpec("bad", shape, 3, (*layers, L("flatten", "f"), L("dense", "head", out=3)))


@pytest.mark.parametrize(("layers", "message"), [
    ((L("conv2d", "c", out=4, kernel=3, input="nope"),), "input 'nope' is no layer"),
    ((L("conv2d", "c", out=4, kernel=3, input="d"), L("conv2d", "d", out=4, kernel=3)), "is a later layer"),
    ((L("conv2d", "c", out=4, kernel=3), L("add", "a", source="input")), r"shapes must match"),
    ((L("add", "a"),), "add needs source"),
    ((L("relu", "r", source="input"),), "source applies to kind 'add' only"),
    ((L("pad", "p", pads=(1, 1)),), "pads needs 4 values"),
    ((L("pad", "p"),), "pad needs pads"),
    ((L("relu", "r", pads=(1, 1, 1, 1)),), "pads applies to kind 'pad' only"),
    ((L("conv2d", "c", out=4, kernel=4),), "padding 'same' needs odd kernels"),
    ((L("conv2d", "c", out=4, kernel=3, kernel_w=2),), "padding 'same' needs odd kernels"),
    ((L("conv2d", "c", out=4, kernel=3, padding="full"),), "padding must be one of"),
    ((L("conv2d", "c", out=4, kernel=9, padding="valid"),), "larger than its padded input"),
    ((L("relu", "r", kernel_w=3),), "kernel_w applies to"),
    ((L("conv2d", "c", out=4, kernel=3), L("relu", "input")), "other than 'input'"),
    ((L("conv2d", "c", out=4, kernel=3), L("relu", "r", input="input")), r"\['c'\] is never used"),
    ((L("gap", "g"), L("avgpool", "p", kernel=2)), "needs a spatial input"),
    ((L("conv1d", "c", out=4, kernel=3),), "conv1d needs a \\(C, L\\) input"),
    ((L("avgpool", "p", kernel=9),), "shrinks"),
])
def test_bad_descriptions_get_one_clear_error(layers: tuple[L, ...], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        _spec(*layers)


def test_flatten_after_gap_is_a_no_op() -> None:
    spec = ModelSpec("g", (4, 6, 6), 3, (L("conv2d", "c", out=8, kernel=3), L("gap", "g"),
                                         L("flatten", "f"), L("dense", "head", out=3)))
    assert spec.activation_shapes()["f"] == (8,)
    assert param_infos(spec)["head.weight"].axis_sources == (None, "c")


# -- the torch reference forward over the DAG ------------------------------------------------------


def _torch_params(spec: ModelSpec, patch: PatchSpec | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: (0.3 * rng.normal(size=i.shape)).astype(np.float32) for n, i in param_infos(spec, patch).items()}


def test_torch_forward_follows_the_wiring() -> None:
    import torch
    import torch.nn.functional as F

    from edgepatch.export import torch_model as tm

    spec = residual_net()
    params = _torch_params(spec)
    p = tm.to_tensors(params)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))

    def conv(name: str, h: torch.Tensor, stride: int = 1, pad: int = 1) -> torch.Tensor:
        return F.conv2d(h, p[f"{name}.weight"], p[f"{name}.bias"], stride=stride, padding=pad)

    stem = F.relu(conv("stem", x))
    b1 = F.relu(conv("b1c2", F.relu(conv("b1c1", stem))) + stem)
    b2 = conv("b2c2", F.relu(conv("b2c1", F.pad(b1, [0, 1, 0, 1]), stride=2, pad=0)))
    out = torch.clamp(b2 + conv("b2sc", b1, stride=2, pad=0), 0, 6).mean(dim=(2, 3))
    want = out @ p["head.weight"].t() + p["head.bias"]
    torch.testing.assert_close(tm.forward(spec, None, p, x), want)


@pytest.mark.parametrize("kind", ["film", "lowrank"])
def test_sliced_residual_network_equals_the_full_one_with_dropped_filters_zeroed(kind: str) -> None:
    """The physically smaller network computes exactly what the full one computes when the dropped filters
    (and every patch part on their channels) are zero: slicing a group drops the same channels everywhere."""
    import torch

    from edgepatch.export import torch_model as tm
    from edgepatch.protocol.variants import axis_index

    spec = residual_net()
    patch = PatchSpec(kind, ("stem", "b1c2", "b2c1", "b2sc"), 3, 2)
    params = _torch_params(spec, patch, seed=3)
    half = uniform_variant(spec, 0.5)
    kept = sample_kept(spec, half, np.random.default_rng(4))
    infos = param_infos(spec, patch)
    zeroed = {}
    for name, info in infos.items():
        value = params[name].copy()
        for axis, source in enumerate(info.axis_sources):
            # zero the dropped filters' outputs: output-channel axes of convs and every patch part on them
            is_output = name.endswith(".bias") or axis == 0 and name.endswith(".weight") and "head" not in name
            if source is not None and (is_output or ".patch." in name):
                keep = np.zeros(value.shape[axis], bool)
                keep[axis_index(source, kept)] = True
                value = np.moveaxis(np.moveaxis(value, axis, 0) * keep.reshape(-1, *(1,) * (value.ndim - 1)), 0, axis)
        zeroed[name] = value
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    phi = torch.randn(patch.k, generator=torch.Generator().manual_seed(2))
    full = tm.forward(spec, patch, tm.to_tensors(zeroed), x, phi)
    small = tm.forward(half.spec(spec), patch, tm.to_tensors(slice_params(params, infos, kept)), x, phi)
    torch.testing.assert_close(small, full, atol=1e-4, rtol=1e-4)


# -- the patch-kind registry ---------------------------------------------------------------------------


def test_patch_kinds_are_registered_with_shapes_and_unknown_kinds_fail() -> None:
    from edgepatch.export import torch_model as tm
    from edgepatch.protocol.params import init_params
    from edgepatch.protocol.patch_kinds import PatchBuilders, PatchKindError, patch_kind, patch_kind_names

    assert patch_kind_names()[:2] == ("film", "lowrank")
    assert patch_kind("lowrank").parts(16, 4) == {"down": (4, 16), "up": (16, 4)}
    with pytest.raises(SpecError, match="unknown patch kind 'adapter'; registered: film, lowrank"):
        PatchSpec("adapter", ("conv1",), 4)
    with pytest.raises(PatchKindError, match="unknown patch kind 'adapter'"):
        tm.APPLY_PATCH.get("adapter")
    # a declared kind without a builder in some framework is an error there, not another kind's maths
    builders: PatchBuilders = PatchBuilders("probe")
    builders.register("film")(lambda *a: None)
    with pytest.raises(PatchKindError, match="no probe builder for patch kind 'lowrank'; registered: film"):
        builders.get("lowrank")
    spec = REFERENCE_MODELS["digits_cnn"]()
    params = init_params(spec, PatchSpec("lowrank", ("conv1",), 4), seed=0)
    assert np.abs(params["conv1.patch.down"]).sum() > 0 and not params["conv1.patch.up"].any()
