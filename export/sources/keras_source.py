"""A Keras 3 model (functional or sequential, or a saved `.keras` file) → model description + weights.

The converter walks the model's own layer graph (its nodes, in the order Keras itself runs them),
so the input shape comes from the model. Keras is channel-last; the description is channel-first:
kernels are transposed to torch's layout, the dense layer after a Flatten has its rows reordered from
(…, C) to (C, …) order, and TF's "same" padding (asymmetric when the stride is > 1) becomes an explicit
`pad` layer before a "valid" conv wherever it is not the description's symmetric k//2.
Every node is classified before anything is built, so all unsupported layers are found at once.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from edgepatch.protocol.model_spec import ModelSpec, SpecError
from edgepatch.protocol.params import Params

from .builder import HINTS, INPUT, Ref, SpecBuilder, channels_last_rows, hint_for, refuse, refuse_all

Refs = dict[int, Ref]  # id(KerasTensor) -> what the description calls it
Step = Callable[[SpecBuilder, Refs], None]
_DROPOUTS = ("Dropout", "SpatialDropout1D", "SpatialDropout2D", "GaussianDropout", "AlphaDropout", "Identity")
_CONVS = ("Conv1D", "Conv2D", "DepthwiseConv2D", "SeparableConv2D", "Dense")


def keras_graph(model: Any, label: str) -> Any:
    """The functional graph behind `model` (a Sequential keeps one once it knows its input shape)."""
    sequential = type(model).__name__ == "Sequential"
    if not sequential and not hasattr(model, "_nodes_by_depth"):
        raise SpecError(f"Keras model {label} is a subclassed {type(model).__name__}: its layers are wired in "
                        "call(), which edgepatch cannot read; build it with keras.Input and the functional API, "
                        "or as keras.Sequential")
    graph = getattr(model, "_functional", None) if sequential else model
    if graph is None or not getattr(graph, "inputs", None):
        raise SpecError(f"Keras model {label} has no input shape yet: start it with keras.Input(shape=...)")
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        raise SpecError(f"Keras model {label}: only models with one input and one output are supported")
    return graph


def input_shape_of(graph: Any, label: str) -> tuple[int, ...]:
    dims = tuple(graph.inputs[0].shape[1:])
    if None in dims or len(dims) not in (2, 3):
        raise SpecError(f"Keras model {label}: input shape {dims} must be fully known (L, C) or (H, W, C)")
    return (int(dims[-1]), *(int(d) for d in dims[:-1]))  # channel-last -> channel-first


def convert_keras(model: Any, name: str, label: str = "") -> tuple[ModelSpec, Params]:
    label = label or name
    graph = keras_graph(model, label)
    shape = input_shape_of(graph, label)
    problems: list[SpecError] = []
    steps = _graph_steps(graph, id(graph.outputs[0]), problems, set())
    refuse_all(problems)
    builder = SpecBuilder(name, shape)
    refs: Refs = {id(graph.inputs[0]): INPUT}
    for step in steps:
        step(builder, refs)
    return builder.finish(refs[id(graph.outputs[0])])


def _graph_steps(graph: Any, output_id: int, problems: list[SpecError], seen: set[int]) -> list[Step]:
    """Build steps of one functional graph, in Keras' own execution order; nested models are inlined.

    `output_id` is the model output's tensor id (a softmax there is dropped), or -1 inside a nested model
    whose output is not the model's output.
    """
    nodes = [node for depth in sorted(graph._nodes_by_depth, reverse=True) for node in graph._nodes_by_depth[depth]]
    uses = Counter(id(t) for node in nodes for t in node.input_tensors)
    steps: list[Step] = []
    for node in nodes:
        layer = node.operation
        if type(layer).__name__ == "InputLayer":
            continue
        if id(layer) in seen:
            problems.append(refuse(layer.name, type(layer).__name__, "a layer used twice shares its weights, "
                                   "which edgepatch cannot train: give each use its own layer"))
            continue
        seen.add(id(layer))
        try:
            if hasattr(layer, "_nodes_by_depth") or type(layer).__name__ == "Sequential":  # a nested model
                inner = keras_graph(layer, repr(layer.name))
                steps.append(_alias(node.input_tensors[0], inner.inputs[0]))
                last = id(inner.outputs[0]) if id(node.output_tensors[0]) == output_id else -1
                steps.extend(_graph_steps(inner, last, problems, seen))
                steps.append(_alias(inner.outputs[0], node.output_tensors[0]))
            else:
                steps.extend(_classify(node, uses, output_id))
        except SpecError as exc:
            problems.append(exc)
    return steps


# -- classification ---------------------------------------------------------------------------------


def _numpy(variable: Any) -> np.ndarray:
    return np.array(variable.numpy() if hasattr(variable, "numpy") else variable, dtype=np.float32)


def _activation(layer: Any) -> str:
    act = layer.get_config().get("activation", "linear")
    return act if isinstance(act, str) else str(act.get("config", act)) if isinstance(act, dict) else str(act)


def _classify(node: Any, uses: Counter[int], output_id: int) -> list[Step]:
    layer, type_name = node.operation, type(node.operation).__name__
    label = layer.name
    ins = list(node.input_tensors)
    out = node.output_tensors[0]
    if len(node.output_tensors) != 1:
        raise refuse(label, type_name, "layers with several outputs are not supported")
    if type_name == "Add":
        if len(ins) < 2 or len({tuple(t.shape) for t in ins}) != 1:
            raise refuse(label, type_name, "residual adds join tensors of the same shape")
        return [_add(label, ins, out)]
    if len(ins) != 1:
        raise refuse(label, type_name, hint_for(type_name))
    src, in_shape = ins[0], tuple(ins[0].shape)
    if getattr(layer, "data_format", "channels_last") == "channels_first":
        raise refuse(label, type_name, "data_format='channels_first': use channels_last (Keras' default)")
    if type_name in _CONVS:
        steps = [_weighted(layer, type_name, label, src, out, in_shape)]
        act = _activation(layer)
        if act != "linear":
            steps.append(_activation_step(f"{label}_{act}", type_name + f" with activation {act!r}", act, out, out,
                                          out_id=id(out) == output_id and uses[id(out)] == 0))
        return steps
    if type_name == "BatchNormalization":
        return [_norm(layer, label, src, out, in_shape, uses)]
    if type_name == "ReLU":
        cfg = layer.get_config()
        if cfg.get("negative_slope", 0.0) or cfg.get("threshold", 0.0) or cfg.get("max_value") not in (None, 6.0, 6):
            raise refuse(label, type_name, HINTS["activation"] + " (no slope, threshold or max other than 6)")
        return [_layer("relu" if cfg.get("max_value") is None else "relu6", label, src, out)]
    if type_name in ("Activation", "Softmax"):
        act = "softmax" if type_name == "Softmax" else _activation(layer)
        return [_activation_step(label, f"{type_name}({act!r})", act, src, out,
                                 out_id=id(out) == output_id and uses[id(out)] == 0)]
    if type_name in _DROPOUTS:
        return [_alias(src, out)]
    if type_name in ("AveragePooling1D", "AveragePooling2D"):
        pool, strides = tuple(layer.pool_size), tuple(layer.strides)
        if strides != pool or (layer.padding != "valid" and any(s % p for s, p in zip(in_shape[1:-1], pool, strict=True))):
            raise refuse(label, type_name, "only non-overlapping average pooling (strides = pool_size, padding "
                         "'valid')")
        fields: dict[str, Any] = {"kernel": int(pool[0])}
        if len(pool) == 2 and pool[1] != pool[0]:
            fields["kernel_w"] = int(pool[1])
        return [_layer("avgpool", label, src, out, **fields)]
    if type_name in ("GlobalAveragePooling1D", "GlobalAveragePooling2D"):
        # keepdims=True gives (N, 1, 1, C): the same vector; a 1×1 conv after it becomes a dense layer.
        return [_layer("gap", label, src, out, flat=True)]
    if type_name == "Reshape":
        return [_reshape(label, src, out, in_shape, tuple(out.shape))]
    if type_name == "Flatten":
        return [_flatten(label, src, out, in_shape)]
    if type_name in ("ZeroPadding1D", "ZeroPadding2D"):
        pads = layer.padding
        pairs = [pads] if type_name == "ZeroPadding1D" else list(pads)
        return [_layer("pad", label, src, out, pads=tuple(int(v) for pair in pairs for v in pair))]
    raise refuse(label, f"keras.layers.{type_name}", hint_for(type_name))


def _tf_same_pads(sizes: Sequence[int], kernel: Sequence[int], stride: int) -> list[tuple[int, int]]:
    """TF's "same": total = max((ceil(n/s) - 1)·s + k - n, 0), the extra pixel after (bottom/right)."""
    pads = []
    for n, k in zip(sizes, kernel, strict=True):
        total = max((math.ceil(n / stride) - 1) * stride + k - n, 0)
        pads.append((total // 2, total - total // 2))
    return pads


def _conv_geometry(layer: Any, type_name: str, label: str, in_shape: tuple[Any, ...], kernel: Sequence[int]
                   ) -> tuple[int, list[tuple[int, int]]]:
    strides = tuple(layer.strides)
    if len(set(strides)) != 1:
        raise refuse(label, type_name, f"strides {strides} differ per axis: use one stride for every axis")
    if set(tuple(layer.dilation_rate)) != {1}:
        raise refuse(label, type_name, "dilated convolutions are not supported: use dilation_rate=1")
    if layer.padding == "same":
        pads = _tf_same_pads([int(s) for s in in_shape[1:-1]], kernel, strides[0])
    elif layer.padding == "causal":  # Conv1D: everything before, like a left pad + valid conv
        pads = [(int(kernel[0]) - 1, 0)]
    else:
        pads = [(0, 0)] * len(kernel)
    return int(strides[0]), pads


def _weighted(layer: Any, type_name: str, label: str, src: Any, out: Any, in_shape: tuple[Any, ...]) -> Step:
    bias = _numpy(layer.bias) if getattr(layer, "use_bias", False) and layer.bias is not None else None
    if type_name == "Dense":
        if len(in_shape) != 2:
            raise refuse(label, type_name, "Dense applied to a (N, ..., C) tensor: Flatten before it")
        w = _numpy(layer.kernel).T  # (in, out) -> (out, in)

        def dense(b: SpecBuilder, refs: Refs) -> None:
            ref = refs[id(src)]
            weight = w if ref.channels_last is None else channels_last_rows(w, ref.channels_last)
            refs[id(out)] = b.weighted("dense", label, ref, weight, bias, out=int(w.shape[0]))

        return dense
    if type_name in ("DepthwiseConv2D", "SeparableConv2D") and layer.depth_multiplier != 1:
        raise refuse(label, type_name, "only depth_multiplier=1")
    if type_name in ("Conv1D", "Conv2D") and layer.groups != 1:
        raise refuse(label, type_name, "grouped convs: use groups=1 or DepthwiseConv2D")
    kernel_var = layer.depthwise_kernel if type_name == "SeparableConv2D" else layer.kernel
    k = _numpy(kernel_var)
    stride, pads = _conv_geometry(layer, type_name, label, in_shape, k.shape[:-2])
    if type_name == "Conv1D":
        kind, weight = "conv1d", k.transpose(2, 1, 0)  # (k, in, out) -> (out, in, k)
    elif type_name == "Conv2D":
        kind, weight = "conv2d", k.transpose(3, 2, 0, 1)  # (kh, kw, in, out) -> (out, in, kh, kw)
    else:
        kind, weight = "dwconv2d", k.transpose(2, 3, 0, 1)  # (kh, kw, C, 1) -> (C, 1, kh, kw)
    pointwise = _numpy(layer.pointwise_kernel).transpose(3, 2, 0, 1) if type_name == "SeparableConv2D" else None

    def conv(b: SpecBuilder, refs: Refs) -> None:
        ref = refs[id(src)]
        if pointwise is None:
            refs[id(out)] = b.conv(kind, label, ref, weight, bias, stride, pads)
            return
        # SeparableConv2D = depthwise (no bias) then a 1×1 conv carrying the bias.
        mid = b.conv("dwconv2d", f"{label}_depthwise", ref, weight, None, stride, pads)
        refs[id(out)] = b.conv("conv2d", label, mid, pointwise, bias, 1, [(0, 0), (0, 0)])

    return conv


def _norm(layer: Any, label: str, src: Any, out: Any, in_shape: tuple[Any, ...], uses: Counter[int]
          ) -> Step:
    axis = layer.axis if isinstance(layer.axis, int) else (list(layer.axis) + [None])[0]
    producer = src._keras_history.operation
    ptype = type(producer).__name__
    if axis not in (-1, len(in_shape) - 1):
        raise refuse(label, "BatchNormalization", f"axis {layer.axis}: only the channel axis (-1)")
    if ptype not in _CONVS or _activation(producer) != "linear" or uses[id(src)] != 1:
        raise refuse(label, "BatchNormalization", HINTS["norm"] + f"; here it follows {producer.name!r} "
                     f"({ptype}{', with an activation' if ptype in _CONVS else ''}), or that output is also used elsewhere")
    gamma = _numpy(layer.gamma) if layer.scale else None
    beta = _numpy(layer.beta) if layer.center else None
    mean, var = _numpy(layer.moving_mean), _numpy(layer.moving_variance)

    def step(b: SpecBuilder, refs: Refs) -> None:
        refs[id(out)] = b.fold_norm(refs[id(src)], gamma, beta, mean, var, float(layer.epsilon))

    return step


def _layer(kind: str, label: str, src: Any, out: Any, flat: bool = False, **fields: Any) -> Step:
    def step(b: SpecBuilder, refs: Refs) -> None:
        ref = refs[id(src)]
        if ref.flat and kind in ("avgpool", "gap", "pad"):
            raise refuse(label, kind, "spatial layers cannot follow Flatten or global pooling")
        refs[id(out)] = b.add(kind, label, ref, flat=flat, **fields)

    return step


def _alias(src: Any, out: Any) -> Step:
    def step(b: SpecBuilder, refs: Refs) -> None:
        refs[id(out)] = refs[id(src)]

    return step


def _activation_step(label: str, type_name: str, act: str, src: Any, out: Any, out_id: bool) -> Step:
    if act == "linear":
        return _alias(src, out)
    if act in ("relu", "relu6"):
        return _layer(act, label, src, out)
    if act == "softmax" and out_id:
        return _alias(src, out)  # a softmax on the logits changes no prediction: dropped
    raise refuse(label, type_name, HINTS["softmax"] if act == "softmax" else HINTS["activation"])


def _flatten(label: str, src: Any, out: Any, in_shape: tuple[Any, ...]) -> Step:
    spatial_channels = tuple(int(d) for d in in_shape[1:])

    def step(b: SpecBuilder, refs: Refs) -> None:
        ref = refs[id(src)]
        if ref.flat or len(spatial_channels) == 1:
            refs[id(out)] = ref
            return
        made = b.add("flatten", label, ref, flat=True)
        refs[id(out)] = Ref(made.name, flat=True, channels_last=spatial_channels)

    return step


def _reshape(label: str, src: Any, out: Any, in_shape: tuple[Any, ...], out_shape: tuple[Any, ...]) -> Step:
    """Only (N, 1, …, 1, C) -> (N, C), as after a keepdims global pooling: the same vector."""
    if len(out_shape) != 2 or len(in_shape) < 3 or set(in_shape[1:-1]) != {1} or out_shape[1] != in_shape[-1]:
        raise refuse(label, "Reshape", HINTS["reshape"] + f" (this one reshapes {in_shape[1:]} to {out_shape[1:]})")

    def step(b: SpecBuilder, refs: Refs) -> None:
        ref = refs[id(src)]
        refs[id(out)] = ref if ref.flat else b.add("flatten", label, ref, flat=True)

    return step


def _add(label: str, ins: Sequence[Any], out: Any) -> Step:
    def step(b: SpecBuilder, refs: Refs) -> None:
        acc = refs[id(ins[0])]
        for i, other in enumerate(ins[1:]):
            first, second = acc, refs[id(other)]
            last = b.layers[-1].name if b.layers else "input"
            if second.name == last:
                first, second = second, first
            acc = b.add("add", label if i == len(ins) - 2 else f"{label}_{i}", first, source=second.name)
        refs[id(out)] = acc

    return step
