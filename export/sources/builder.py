"""Assembling a model description (a DAG of `LayerSpec`) and its weights, shared by the converters.

A converter walks its framework's graph in topological order and tells the builder what each tensor is:
a new layer (`add`, `conv`), the same value under another name (`alias`: Dropout, Identity, a flatten
that changes nothing) or a BatchNorm to fold into the conv/dense that produced its input (`fold_norm`).
Weights arrive already in torch's channel-first layout (see protocol/model_spec.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgepatch.protocol.model_spec import LayerSpec, ModelSpec, SpecError
from edgepatch.protocol.params import Params

SUPPORTED = ("Conv1d/Conv2d (any stride), depthwise Conv2d, Linear/Dense, ReLU, ReLU6, average pooling "
             "(stride = kernel), global average pooling, Flatten, BatchNorm after a conv/dense, Dropout, "
             "residual add, zero padding")
# What to use instead, by what the refused layer does (shared wording for torch and Keras).
HINTS = {
    "maxpool": "use average pooling with stride = kernel (AvgPool / AveragePooling) or a strided conv",
    "recurrent": "use a stack of Conv1d layers over the time axis",
    "activation": "use ReLU or ReLU6",
    "softmax": "remove it: edgepatch trains and predicts on logits (a softmax on the model's output is dropped)",
    "norm": "use BatchNorm directly after a conv or dense layer (it is folded into that layer)",
    "attention": "not expressible in edgepatch's edge layers; use convolutions",
    "reshape": "use Flatten (start_dim=1) before the dense head",
    "concat": "use a residual add of equal shapes instead of concatenation",
    "preprocess": "normalize the data before it reaches the model (outside the model)",
}
FOLDABLE = ("conv2d", "conv1d", "dwconv2d", "dense")
# Lower-case fragments of torch/Keras class names -> the HINTS entry that says what to use instead.
_HINT_WORDS = (
    (("maxpool", "maxpooling", "lppool", "fractionalmax"), "maxpool"),
    (("lstm", "gru", "rnn", "recurrent"), "recurrent"),
    (("sigmoid", "tanh", "gelu", "silu", "swish", "elu", "leakyrelu", "prelu", "mish", "softplus",
      "softsign", "hardtanh", "activation"), "activation"),
    (("softmax",), "softmax"),
    (("layernorm", "layernormalization", "groupnorm", "instancenorm", "localresponse", "unitnorm",
      "rmsnorm"), "norm"),
    (("attention", "transformer"), "attention"),
    (("reshape", "permute", "unflatten", "view", "transpose", "getitem"), "reshape"),
    (("concat", "cat"), "concat"),
    (("rescaling", "normalization", "resizing", "crop", "random"), "preprocess"),
)


def hint_for(type_name: str) -> str:
    """What to use instead of a layer of this type (falls back to the list of what is supported)."""
    lowered = type_name.lower()
    for words, key in _HINT_WORDS:
        if any(word in lowered for word in words):
            return HINTS[key]
    return f"supported are {SUPPORTED}"


def refuse(layer: str, type_name: str, hint: str) -> SpecError:
    """The one-line refusal: which layer, what it is, what to use instead."""
    return SpecError(f"layer {layer!r} ({type_name}) is not supported: {hint}")


def refuse_all(problems: Sequence[SpecError]) -> None:
    """Raise the first refusal, naming how many other layers were refused too (all found before any work)."""
    if problems:
        others = [str(exc).split(" is not supported")[0].removeprefix("layer ") for exc in problems[1:]]
        listed = ", ".join(others[:4]) + (f" and {len(others) - 4} more" if len(others) > 4 else "")
        raise SpecError(f"{problems[0]}" + (f" (also unsupported: {listed})" if others else ""))


@dataclass(frozen=True)
class Ref:
    """A tensor of the source graph as the description sees it.

    `name` is the producing layer ("input" = the model input); `flat` tells that it is (N, F);
    `channels_last` holds the (spatial..., C) shape a Keras Flatten flattened, so the dense layer after
    it can reorder its rows to edgepatch's channel-first flatten order.
    """

    name: str
    flat: bool = False
    channels_last: tuple[int, ...] | None = None


INPUT = Ref("input")


class SpecBuilder:
    def __init__(self, model_name: str, input_shape: Sequence[int]) -> None:
        self.model_name, self.input_shape = model_name, tuple(int(d) for d in input_shape)
        self.layers: list[LayerSpec] = []
        self.params: Params = {}
        self._kinds: dict[str, str] = {}

    # -- names --------------------------------------------------------------------------------------
    def unique(self, wanted: str) -> str:
        """A valid, unused layer name close to `wanted` ('features.0' -> 'features_0', '0' -> 'layer0')."""
        name = re.sub(r"\W", "_", wanted).strip("_") or "layer"
        if name[0].isdigit():
            name = f"layer{name}"
        base, i = name, 1
        while name in self._kinds or name == "input":
            name, i = f"{base}_{i}", i + 1
        return name

    # -- layers -------------------------------------------------------------------------------------
    def add(self, kind: str, wanted: str, src: Ref, *, flat: bool = False, **fields: Any) -> Ref:
        """Append a layer reading `src`; fields left at their LayerSpec default are not passed."""
        name = self.unique(wanted)
        previous = self.layers[-1].name if self.layers else "input"
        if src.name != previous:
            fields["input"] = src.name
        self.layers.append(LayerSpec(kind, name, **_non_default(fields)))
        self._kinds[name] = kind
        return Ref(name, flat=flat or src.flat)

    def weighted(self, kind: str, wanted: str, src: Ref, weight: np.ndarray, bias: np.ndarray | None,
                 **fields: Any) -> Ref:
        """A conv/dense layer with its weights (torch layout); no bias -> zero bias."""
        out = self.add(kind, wanted, src, **fields)
        channels = weight.shape[0]
        self.params[f"{out.name}.weight"] = np.asarray(weight, np.float32)
        self.params[f"{out.name}.bias"] = (np.zeros(channels, np.float32) if bias is None
                                           else np.asarray(bias, np.float32).reshape(channels))
        return out

    def conv(self, kind: str, wanted: str, src: Ref, weight: np.ndarray, bias: np.ndarray | None,
             stride: int, pads: Sequence[tuple[int, int]]) -> Ref:
        """conv1d/conv2d/dwconv2d with explicit zero padding (before, after) per spatial dim.

        Symmetric k//2 padding with odd kernels is the description's "same"; no padding is "valid";
        anything else (e.g. TF's asymmetric "same" at stride 2) becomes a `pad` layer + a "valid" conv.
        """
        kernel = tuple(int(k) for k in weight.shape[2:])
        if src.flat:  # after global pooling: a 1×1 conv on the pooled vector is a dense layer (MobileNet heads)
            if kind == "dwconv2d" or set(kernel) != {1} or stride != 1 or any(p != (0, 0) for p in pads):
                raise SpecError(f"layer {wanted!r}: a {kind} with kernel {kernel} cannot follow global pooling "
                                "or Flatten (only a 1x1 conv, read as a dense layer)")
            return self.weighted("dense", wanted, src, weight.reshape(weight.shape[0], -1), bias,
                                 out=int(weight.shape[0]))
        fields: dict[str, Any] = {"kernel": kernel[0], "stride": int(stride)}
        if len(kernel) == 2 and kernel[1] != kernel[0]:
            fields["kernel_w"] = kernel[1]
        if kind == "conv2d" or kind == "conv1d":
            fields["out"] = int(weight.shape[0])
        if all(k % 2 == 1 and p == (k // 2, k // 2) for k, p in zip(kernel, pads, strict=True)):
            fields["padding"] = "same"
        else:
            fields["padding"] = "valid"
            if any(p != (0, 0) for p in pads):
                flat_pads = tuple(int(v) for pair in pads for v in pair)
                src = self.add("pad", f"{wanted}_pad", src, pads=flat_pads)
        return self.weighted(kind, wanted, src, weight, bias, **fields)

    def fold_norm(self, src: Ref, gamma: np.ndarray | None, beta: np.ndarray | None, mean: np.ndarray,
                  var: np.ndarray, eps: float) -> Ref:
        """Fold an inference-mode BatchNorm into the conv/dense `src` (the caller checked `src` has no
        other reader): W' = W·s, b' = (b - mean)·s + beta with s = gamma / sqrt(var + eps)."""
        kind = self._kinds.get(src.name)
        if kind not in FOLDABLE:
            raise SpecError(f"internal: cannot fold a norm into {src.name!r}")
        mean = np.asarray(mean, np.float64)
        scale = (np.ones_like(mean) if gamma is None else np.asarray(gamma, np.float64)) / np.sqrt(
            np.asarray(var, np.float64) + eps)
        shift = np.zeros_like(mean) if beta is None else np.asarray(beta, np.float64)
        w, b = self.params[f"{src.name}.weight"], self.params[f"{src.name}.bias"]
        if scale.shape != (w.shape[0],):
            raise SpecError(f"BatchNorm after {src.name!r} has {scale.shape[0]} channels, the layer has {w.shape[0]}")
        self.params[f"{src.name}.weight"] = (w * scale.reshape(-1, *(1,) * (w.ndim - 1))).astype(np.float32)
        self.params[f"{src.name}.bias"] = ((b - mean) * scale + shift).astype(np.float32)
        return src

    # -- result -------------------------------------------------------------------------------------
    def finish(self, out: Ref) -> tuple[ModelSpec, Params]:
        if not self.layers or out.name != self.layers[-1].name:
            raise SpecError(f"model {self.model_name!r}: its output must be computed by the last layer "
                            f"(a dense head); got {out.name!r}")
        head = self.layers[-1]
        if head.kind != "dense":
            raise SpecError(f"model {self.model_name!r} ends in {head.kind} {head.name!r}: the last layer must "
                            "be a dense (Linear/Dense) head producing the class logits")
        spec = ModelSpec(self.model_name, self.input_shape, head.out, tuple(self.layers))
        return spec, dict(self.params)


def _non_default(fields: dict[str, Any]) -> dict[str, Any]:
    """Drop fields equal to LayerSpec's defaults, so sequential models stay plain old descriptions."""
    defaults = {"out": 0, "kernel": 0, "stride": 1, "input": "", "source": "", "padding": "same",
                "kernel_w": 0, "pads": ()}
    return {k: v for k, v in fields.items() if k not in defaults or v != defaults[k]}


def channels_last_rows(weight: np.ndarray, spatial_channels: Iterable[int]) -> np.ndarray:
    """Reorder a dense weight's input columns from a channel-last flatten (…, C) to channel-first (C, …)."""
    shape = tuple(spatial_channels)
    out = weight.shape[0]
    w = weight.reshape(out, *shape)
    order = (0, len(shape), *range(1, len(shape)))  # (out, spatial..., C) -> (out, C, spatial...)
    return np.ascontiguousarray(w.transpose(order).reshape(out, -1))
