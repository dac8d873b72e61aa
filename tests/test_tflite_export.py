"""LiteRT programs vs the torch reference: logits, one φ Adam step, full-weight gradients, builtins only."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgepatch.device.backends.litert import LiteRTError, LiteRTProgram, model_op_names
from edgepatch.export import tflite_builder, torch_model
from edgepatch.export.reference_models import REFERENCE_MODELS, default_patch
from edgepatch.protocol.model_spec import LayerSpec, ModelSpec, PatchSpec, param_infos
from edgepatch.protocol.optim import AdamConfig, adam_step
from edgepatch.protocol.params import init_params
from edgepatch.protocol.variants import Variant, full_variant, sample_kept, slice_params, uniform_variant

sys.path.insert(0, str(Path(__file__).parent))
from parity_checks import batch, check_litert_variant, dag_probe, live_params  # noqa: E402

BATCH = 8  # fixed training batch of the test programs (the default 32 only costs time here)
ADAM = AdamConfig(lr=0.05)
MODELS = sorted(REFERENCE_MODELS)
KINDS = ["film", "lowrank"]

pytestmark = pytest.mark.slow  # every test here converts a TensorFlow graph


def _params_with_live_patches(spec: ModelSpec, patch: PatchSpec | None, seed: int) -> dict[str, np.ndarray]:
    """init_params makes θ̄ mostly zero (a no-op patch); perturb it so the patch maths is exercised."""
    rng = np.random.default_rng(seed)
    params = init_params(spec, patch, seed)
    infos = param_infos(spec, patch)
    for name, info in infos.items():
        if info.role == "bar":
            params[name] = params[name] + rng.normal(0.0, 0.2, info.shape).astype(np.float32)
        if name.startswith("norm") and name.endswith(".weight"):
            params[name] = params[name] + rng.normal(0.0, 0.2, info.shape).astype(np.float32)
    return params


def _batch(spec: ModelSpec, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    x = rng.normal(size=(n, *spec.input_shape)).astype(np.float32)
    return x, rng.integers(0, spec.num_classes, n).astype(np.int32)


@pytest.fixture(scope="module", params=[(m, k) for m in MODELS for k in KINDS], ids=lambda p: f"{p[0]}-{p[1]}")
def built(request: pytest.FixtureRequest) -> dict:
    """One trainable .tflite per (model, patch kind), holding the full and the 50 % variant."""
    model, kind = request.param
    spec = REFERENCE_MODELS[model]()
    patch = default_patch(spec, kind, k=8, rank=4)
    variants = [full_variant(spec), uniform_variant(spec, 0.5)]
    model_bytes = tflite_builder.build_trainable_tflite(spec, patch, variants, batch=BATCH, adam=ADAM)
    return {"spec": spec, "patch": patch, "variants": variants, "bytes": model_bytes,
            "program": LiteRTProgram(model_bytes), "params": _params_with_live_patches(spec, patch, 1)}


def _sliced(built: dict, variant: Variant, rng: np.random.Generator) -> dict[str, np.ndarray]:
    infos = param_infos(built["spec"], built["patch"])
    return slice_params(built["params"], infos, sample_kept(built["spec"], variant, rng))


@pytest.mark.parametrize("variant_index", [0, 1], ids=["full", "half"])
def test_variant_matches_torch(built: dict, variant_index: int) -> None:
    spec, patch, program = built["spec"], built["patch"], built["program"]
    variant = built["variants"][variant_index]
    vspec = variant.spec(spec)
    rng = np.random.default_rng(10 + variant_index)
    sliced = _sliced(built, variant, rng)
    if variant_index == 1:  # the 50 % program really is smaller: its inputs have the sliced shapes
        assert sliced["conv1.weight"].shape[0] < spec.layer("conv1").out
    x, y = _batch(spec, BATCH, rng)
    phi = rng.normal(0.0, 0.3, patch.k).astype(np.float32)
    m = rng.normal(0.0, 0.01, patch.k).astype(np.float32)
    v = rng.uniform(1e-4, 1e-3, patch.k).astype(np.float32)
    step, lr = 3.0, 0.02

    # logits
    t_params = torch_model.to_tensors(sliced)
    t_phi = torch.tensor(phi, requires_grad=True)
    t_logits = torch_model.forward(vspec, patch, t_params, torch.tensor(x), t_phi)
    logits = program.infer_variant(variant.id, x, phi, sliced)
    assert logits.shape == (BATCH, spec.num_classes)
    np.testing.assert_allclose(logits, t_logits.detach().numpy(), atol=1e-4, rtol=0)

    # one φ Adam step: torch autograd + protocol.optim.adam_step vs the in-graph Adam
    t_loss = F.cross_entropy(t_logits, torch.tensor(y, dtype=torch.long))
    t_loss.backward()
    t_grad = t_phi.grad.numpy()
    want_phi, want_m, want_v = adam_step(phi, t_grad, m, v, step, ADAM, lr=lr)
    out = program.train_phi(variant.id, x, y, phi, m, v, step, lr, sliced)
    np.testing.assert_allclose(out["loss"], t_loss.item(), rtol=1e-4)
    np.testing.assert_allclose(out["grad"], t_grad, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(out["phi"], want_phi, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out["m"], want_m, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(out["v"], want_v, rtol=1e-4, atol=1e-9)
    assert not np.allclose(out["phi"], phi)  # the step moved φ

    # full-weight gradients of the sliced base network (no patch)
    infos = param_infos(spec, patch)
    base = {n: p for n, p in sliced.items() if infos[n].role == "base"}
    t_base = torch_model.to_tensors(base, requires_grad=True)
    t_full = F.cross_entropy(torch_model.forward(vspec, None, t_base, torch.tensor(x)),
                             torch.tensor(y, dtype=torch.long))
    t_full.backward()
    loss, grads = program.train_full(variant.id, x, y, base)
    np.testing.assert_allclose(loss, t_full.item(), rtol=1e-4)
    assert set(grads) == set(base)
    for name, grad in grads.items():
        want = t_base[name].grad.numpy()
        assert grad.shape == base[name].shape, name
        scale = float(np.abs(want).max()) + 1e-12
        np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-4 * scale, err_msg=name)


def test_program_is_builtins_only(built: dict) -> None:
    ops = model_op_names(built["bytes"])
    assert ops, "no operators found in the flatbuffer"
    assert not [op for op in ops if op.startswith("Flex") or op == "CUSTOM"], ops
    # conv input gradients run as the builtin transposed conv, not TF's Conv2DBackpropInput
    assert "TRANSPOSE_CONV" in ops
    vids = [tflite_builder.sig_name(v.id) for v in built["variants"]]
    assert set(built["program"].signatures()) == {f"{kind}_{vid}" for vid in vids
                                                   for kind in ("train_phi", "train_full", "infer")}


@pytest.mark.parametrize("model", MODELS)
def test_frozen_inference_dynamic_batch(model: str) -> None:
    spec = REFERENCE_MODELS[model]()
    patch = default_patch(spec, "lowrank", k=8)
    params = _params_with_live_patches(spec, patch, 2)
    program = LiteRTProgram(tflite_builder.build_inference_tflite(spec, patch, params))
    assert sorted(program.signatures()["infer"]["inputs"]) == ["phi", "x"]
    rng = np.random.default_rng(3)
    phi = rng.normal(0.0, 0.3, patch.k).astype(np.float32)
    for n in (1, 5, 32):  # one program, any batch
        x, _ = _batch(spec, n, rng)
        want = torch_model.forward(spec, patch, torch_model.to_tensors(params), torch.tensor(x),
                                   torch.tensor(phi)).numpy()
        np.testing.assert_allclose(program.infer(x, phi), want, atol=1e-4, rtol=0)


def test_depthwise_and_stride_gradients_match_torch() -> None:
    """dwconv2d (custom depthwise gradients) and a stride-2 conv with a ragged pooling edge."""
    spec = ModelSpec("dw_probe", (3, 9, 9), 4, (
        LayerSpec("conv2d", "c1", out=8, kernel=3, stride=2), LayerSpec("relu", "a1"),
        LayerSpec("dwconv2d", "dw", kernel=3), LayerSpec("norm", "n1"), LayerSpec("relu", "a2"),
        LayerSpec("avgpool", "p", kernel=2), LayerSpec("flatten", "f"), LayerSpec("dense", "head", out=4),
    ))
    patch = PatchSpec("film", ("c1", "dw"), k=4)
    variant = uniform_variant(spec, 0.5)
    program = LiteRTProgram(tflite_builder.build_trainable_tflite(spec, patch, [variant], batch=4))
    params = _params_with_live_patches(spec, patch, 4)
    rng = np.random.default_rng(4)
    infos = param_infos(spec, patch)
    sliced = slice_params(params, infos, sample_kept(spec, variant, rng))
    base = {n: p for n, p in sliced.items() if infos[n].role == "base"}
    x, y = _batch(spec, 4, rng)
    t_base = torch_model.to_tensors(base, requires_grad=True)
    F.cross_entropy(torch_model.forward(variant.spec(spec), None, t_base, torch.tensor(x)),
                    torch.tensor(y, dtype=torch.long)).backward()
    _, grads = program.train_full(variant.id, x, y, base)
    for name, grad in grads.items():
        want = t_base[name].grad.numpy()
        np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-4 * (np.abs(want).max() + 1e-12), err_msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_dag_ops_match_torch_and_stay_builtins_only(kind: str) -> None:
    """pad, valid rectangular strided conv, relu6, stride-3/stride-2 depthwise with ragged edges, a branch,
    a residual add (one slicing group), rectangular pooling and gap: logits, a φ step and every full-weight
    gradient of the full and the 50 % variant in the LiteRT interpreter, and the frozen inference export."""
    spec = dag_probe()
    patch = PatchSpec(kind, ("c0", "dw", "pw2", "dw4"), k=4, rank=2)
    variants = [full_variant(spec), uniform_variant(spec, 0.5)]
    model_bytes = tflite_builder.build_trainable_tflite(spec, patch, variants, batch=4, adam=ADAM)
    ops = model_op_names(model_bytes)
    assert not [op for op in ops if op.startswith("Flex") or op == "CUSTOM"], ops
    program = LiteRTProgram(model_bytes)
    params = live_params(spec, patch, 1)
    for i, variant in enumerate(variants):
        check_litert_variant(program, spec, patch, variant, params, 4, 10 + i, ADAM)
    frozen = LiteRTProgram(tflite_builder.build_inference_tflite(spec, patch, params))
    rng = np.random.default_rng(0)
    x, _ = batch(spec, 5, rng)
    phi = rng.normal(0.0, 0.5, patch.k).astype(np.float32)
    want = torch_model.forward(spec, patch, torch_model.to_tensors(params), torch.tensor(x), torch.tensor(phi))
    np.testing.assert_allclose(frozen.infer(x, phi), want.numpy(), atol=1e-4, rtol=0)


def test_flex_requiring_graph_fails_loudly() -> None:
    import tensorflow as tf

    sig = tflite_builder._signature(lambda d: {"y": tf.linalg.inv(d["a"])}, [("a", (3, 3), tf.float32)])
    with pytest.raises(tflite_builder.ConversionError, match="MatrixInverse"):
        tflite_builder._convert({"bad": sig})


def test_runner_rejects_bad_inputs_by_name(built: dict) -> None:
    spec, patch, program = built["spec"], built["patch"], built["program"]
    variant = built["variants"][0]
    sliced = _sliced(built, variant, np.random.default_rng(0))
    x, y = _batch(spec, BATCH, np.random.default_rng(0))
    phi = np.zeros(patch.k, np.float32)
    with pytest.raises(LiteRTError, match="no signature 'infer_nope'"):
        program.run("infer_nope", x=x)
    with pytest.raises(LiteRTError, match=r"input 'x' has shape"):
        program.infer_variant(variant.id, x[:, :, :-1], phi, sliced)
    with pytest.raises(LiteRTError, match=r"input 'y' has dtype float32"):
        program.train_full(variant.id, x, y.astype(np.float32), {n: sliced[n] for n in sliced if "patch" not in n})
    bad = dict(sliced)
    bad.pop("conv1.bias")
    with pytest.raises(LiteRTError, match="conv1__bias"):
        program.infer_variant(variant.id, x, phi, bad)
    # float64 inputs are accepted and cast (same kind), as numpy's default dtype is common on the device
    out = program.infer_variant(variant.id, x.astype(np.float64), phi.astype(np.float64), sliced)
    assert out.dtype == np.float32


def test_program_rejects_garbage(tmp_path) -> None:
    with pytest.raises(LiteRTError, match="does not exist"):
        LiteRTProgram(tmp_path / "missing.tflite")
    with pytest.raises(LiteRTError, match="TFL3"):
        LiteRTProgram(b"not a flatbuffer at all")
