"""LiteRT programs from a ModelSpec: stateless training signatures per dropout variant, frozen inference.

See docs/CONTRACTS.md "LiteRT programs". Every signature is converted with TFLITE_BUILTINS only: the
device interpreter has no Flex delegate, so a program needing one must fail here, at export, not on
the device. The graph maths lives in `tf_twin.py`; this module only wires signatures and converts.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import tensorflow as tf

from edgepatch.device.backends.litert import FLEX_PREFIX, model_op_names
from edgepatch.export import tf_twin
from edgepatch.protocol.model_spec import ModelSpec, PatchSpec, SpecError, param_infos
from edgepatch.protocol.optim import AdamConfig
from edgepatch.protocol.params import check_params
from edgepatch.protocol.variants import Variant

DEFAULT_BATCH = 32
PHI_CONST_CHUNK = 8  # samples per forward/backward pass of the weights-baked φ step (`_phi_step`)
InputSpec = tuple[str, tuple[int | None, ...], tf.DType]


class ConversionError(RuntimeError):
    """A program that does not convert to builtins-only LiteRT."""


def sig_name(name: str) -> str:
    """Parameter or variant name as a signature identifier: '.' -> '__', '-' -> '_'."""
    return name.replace(".", "__").replace("-", "_")


def _signature(body: Callable[[dict[str, tf.Tensor]], dict[str, tf.Tensor]],
               inputs: Sequence[InputSpec]) -> tf.types.experimental.ConcreteFunction:
    """A concrete function whose signature inputs are named exactly as `inputs` says."""
    names = [name for name, _, _ in inputs]
    specs = [tf.TensorSpec(shape, dtype, name=name) for name, shape, dtype in inputs]

    @tf.function(input_signature=specs, autograph=False)
    def fn(*args: tf.Tensor) -> dict[str, tf.Tensor]:
        return body(dict(zip(names, args, strict=True)))

    return fn.get_concrete_function()


def _convert(signatures: Mapping[str, tf.types.experimental.ConcreteFunction]) -> bytes:
    """Save as a SavedModel (the one route that keeps several named signatures) and convert builtins-only."""
    module = tf.Module()
    with tempfile.TemporaryDirectory(prefix="edgepatch-tflite-") as tmp:
        # the tape already wrote the gradients into the graphs; re-tracing custom gradients for the
        # SavedModel would fail on dynamic batch sizes and is never used
        options = tf.saved_model.SaveOptions(experimental_custom_gradients=False)
        tf.saved_model.save(module, tmp, signatures=dict(signatures), options=options)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=list(signatures))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        converter.allow_custom_ops = False
        try:
            model = converter.convert()
        except Exception as exc:  # the converter raises ConverterError and others
            raise ConversionError(_conversion_message(str(exc))) from exc
    bad = [op for op in model_op_names(model) if op.startswith(FLEX_PREFIX) or op.startswith("CUSTOM")]
    if bad:
        raise ConversionError(f"converted program needs non-builtin ops {bad}; the device has no Flex delegate")
    return bytes(model)


def _conversion_message(text: str) -> str:
    """The converter dumps the whole MLIR module; name the offending TF ops first, then a short excerpt."""
    tf_ops = sorted(set(re.findall(r'"tf\.(\w+)"', text)))
    head = text[:1500] + (" …" if len(text) > 1500 else "")
    return f"builtins-only LiteRT conversion failed; TF ops without a builtin: {tf_ops or 'unknown'}\n{head}"


def _x_input(spec: ModelSpec, batch: int | None) -> InputSpec:
    return ("x", (batch, *spec.input_shape), tf.float32)


def _param_inputs(spec: ModelSpec, patch: PatchSpec | None, roles: tuple[str, ...]) -> list[tuple[str, InputSpec]]:
    return [(name, (sig_name(name), info.shape, tf.float32))
            for name, info in param_infos(spec, patch).items() if info.role in roles]


def _phi_step(spec: ModelSpec, patch: PatchSpec, params: Mapping[str, tf.Tensor], inputs: dict[str, tf.Tensor],
              adam: AdamConfig, chunk: int | None = None) -> dict[str, tf.Tensor]:
    """One Adam step on φ (inputs x, y, phi, m, v, step, lr); `params` are signature inputs or constants.

    `chunk` runs forward and backward over at most `chunk` samples at a time and sums the gradients (the
    same step up to float summation order). Why: the backward keeps every patched layer's activation and
    relu mask live, and at batch 32 those tensors fall out of the core's cache, so every elementwise pass
    of the backward is a trip to shared cache or memory; a few samples at a time stay in cache. Chunk i+1
    reads φ through `phi + 0·grad_i`, a data dependency that makes the converter emit the chunks one after
    the other (without it, it schedules every chunk's forward first and nothing is gained)."""
    phi, x, y = inputs["phi"], inputs["x"], inputs["y"]
    batch = x.shape[0]
    size = batch if chunk is None or chunk >= batch else chunk
    loss = grad = None
    p = phi
    for start in range(0, batch, size):
        stop = min(start + size, batch)
        xs, ys = (x, y) if size == batch else (x[start:stop], y[start:stop])
        with tf.GradientTape() as tape:
            tape.watch(p)
            part = tf_twin.cross_entropy(tf_twin.forward(spec, patch, params, xs, p), ys)
            if size != batch:  # the batch mean from chunk means
                part = part * ((stop - start) / batch)
        g = tape.gradient(part, p)
        loss, grad = (part, g) if grad is None else (loss + part, grad + g)
        if stop < batch:
            p = phi + 0.0 * g
    new_phi, m, v = tf_twin.adam(phi, grad, inputs["m"], inputs["v"], inputs["step"], inputs["lr"],
                                 adam.beta1, adam.beta2, adam.eps)
    return {"loss": loss, "phi": new_phi, "m": m, "v": v, "grad": grad}


def _variant_signatures(spec: ModelSpec, patch: PatchSpec, variant: Variant, batch: int, adam: AdamConfig
                        ) -> dict[str, tf.types.experimental.ConcreteFunction]:
    vspec = variant.spec(spec)  # the physically smaller network: sliced params come in with its shapes
    vid = sig_name(variant.id)
    k = patch.k
    all_params = _param_inputs(vspec, patch, ("base", "bar", "basis"))
    base_params = _param_inputs(vspec, None, ("base",))
    x_in, y_in = _x_input(spec, batch), ("y", (batch,), tf.int32)
    phi_in = ("phi", (k,), tf.float32)

    def params_of(inputs: dict[str, tf.Tensor], table: list[tuple[str, InputSpec]]) -> dict[str, tf.Tensor]:
        return {name: inputs[sig[0]] for name, sig in table}

    def train_phi(inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return _phi_step(vspec, patch, params_of(inputs, all_params), inputs, adam)

    def train_full(inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        params = params_of(inputs, base_params)
        watched = list(params.values())
        with tf.GradientTape() as tape:
            for tensor in watched:
                tape.watch(tensor)
            loss = tf_twin.cross_entropy(tf_twin.forward(vspec, None, params, inputs["x"]), inputs["y"])
        grads = tape.gradient(loss, watched)
        out = {"loss": loss}
        out.update({f"grad__{sig_name(name)}": g for name, g in zip(params, grads, strict=True)})
        return out

    def infer(inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return {"logits": tf_twin.forward(vspec, patch, params_of(inputs, all_params), inputs["x"], inputs["phi"])}

    scalars = [("step", (), tf.float32), ("lr", (), tf.float32)]
    slots = [("m", (k,), tf.float32), ("v", (k,), tf.float32)]
    return {
        f"train_phi_{vid}": _signature(train_phi, [x_in, y_in, phi_in, *slots, *scalars,
                                                   *(s for _, s in all_params)]),
        f"train_full_{vid}": _signature(train_full, [x_in, y_in, *(s for _, s in base_params)]),
        f"infer_{vid}": _signature(infer, [x_in, phi_in, *(s for _, s in all_params)]),
    }


def build_trainable_tflite(spec: ModelSpec, patch: PatchSpec, variants: Sequence[Variant],
                           batch: int = DEFAULT_BATCH, adam: AdamConfig = AdamConfig()) -> bytes:
    """One .tflite with `train_phi_<vid>`, `train_full_<vid>` and `infer_<vid>` for every variant.

    Stateless: parameters and Adam slots are inputs, updated values are outputs. Training signatures
    take a fixed batch (a dynamic one lowers to Flex `BroadcastGradientArgs`).
    """
    if not variants:
        raise SpecError("build_trainable_tflite needs at least one variant")
    if batch < 1:
        raise SpecError(f"batch must be >= 1, got {batch}")
    patch.validate_against(spec)
    ids = [sig_name(v.id) for v in variants]
    if len(set(ids)) != len(ids):
        raise SpecError(f"variant ids collide as signature names: {ids}")
    signatures: dict[str, tf.types.experimental.ConcreteFunction] = {}
    for variant in variants:
        signatures.update(_variant_signatures(spec, patch, variant, batch, adam))
    return _convert(signatures)


def build_phi_const_tflite(spec: ModelSpec, patch: PatchSpec, params: Mapping[str, np.ndarray],
                           batch: int = DEFAULT_BATCH, adam: AdamConfig = AdamConfig(),
                           chunk: int = PHI_CONST_CHUNK) -> bytes:
    """The full variant's φ step with W, Θ and θ̄ baked in: signature `train_phi` (x, y, phi, m, v, step, lr
    -> loss, phi, m, v, grad), the same maths as `train_phi_<full>` of the trainable program.

    Why a second program: weights fed as signature inputs are not pre-packed by XNNPACK, so the
    trainable program's step is several times slower than it needs to be (benchmarks/step_vs_torch.py).
    It holds weights, so it is rebuilt (or rewritten in place, export/frozen.py) with every base update.
    It runs the batch `chunk` samples at a time (`_phi_step`: same step, summed in another order, the
    difference far inside the load-time probe's tolerance, device/phi_const.py).
    """
    check_params(params, spec, patch)
    if chunk < 1:
        raise SpecError(f"chunk must be >= 1, got {chunk}")
    consts = {name: tf.constant(np.asarray(params[name], np.float32)) for name in param_infos(spec, patch)}
    k = patch.k

    def train_phi(inp: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return _phi_step(spec, patch, consts, inp, adam, chunk)

    inputs: list[InputSpec] = [_x_input(spec, batch), ("y", (batch,), tf.int32), ("phi", (k,), tf.float32),
                               ("m", (k,), tf.float32), ("v", (k,), tf.float32),
                               ("step", (), tf.float32), ("lr", (), tf.float32)]
    return _convert({"train_phi": _signature(train_phi, inputs)})


def build_inference_tflite(spec: ModelSpec, patch: PatchSpec | None, params: Mapping[str, np.ndarray],
                           batch: int | None = None) -> bytes:
    """Frozen inference: signature `infer` (x, phi -> logits), W, Θ and θ̄ baked in as constants.

    `batch=None` gives a dynamic batch (the graph has no gradients, so it stays builtins-only).
    """
    check_params(params, spec, patch)
    consts = {name: tf.constant(np.asarray(params[name], np.float32)) for name in param_infos(spec, patch)}
    inputs: list[InputSpec] = [_x_input(spec, batch)]
    if patch is not None:
        inputs.append(("phi", (patch.k,), tf.float32))

    def infer(inp: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return {"logits": tf_twin.forward(spec, patch, consts, inp["x"], inp.get("phi"))}

    return _convert({"infer": _signature(infer, inputs)})
