"""A torch.nn.Module → model description + weights, through a torch.fx trace.

torch.fx keeps torch.nn layers as single `call_module` nodes, so a refusal can name the user's own layer
(`features.3`) and its class; `ShapeProp` runs the traced graph once (in eval mode, no gradients) on a
zero input of the declared shape, which gives every tensor's shape for the checks below.

The input shape is not in a torch module: the module declares it as `input_shape = (C, L)` or
`(C, H, W)` (channel-first, without the batch), or the caller passes `input_shape`.
Every node is classified before anything is built, so all unsupported layers are found at once.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from edgepatch.protocol.model_spec import ModelSpec, SpecError
from edgepatch.protocol.params import Params

from .builder import HINTS, INPUT, Ref, SpecBuilder, hint_for, refuse, refuse_all
from .weights import _short

Step = Callable[[SpecBuilder, dict[str, Ref]], None]
_RELU_FNS = {F.relu, torch.relu, torch.relu_}
_ADD_FNS = {operator.add, operator.iadd, torch.add}
_DROP_FNS = {F.dropout, F.dropout1d, F.dropout2d, F.alpha_dropout}
_SOFTMAX_FNS = {F.softmax, torch.softmax, F.log_softmax, torch.log_softmax}
_ALIAS_METHODS = {"contiguous", "clone", "float"}
_SHAPE_METHODS = {"size", "dim"}  # shape plumbing for view/reshape: no tensor output


def input_shape_of(module: nn.Module, given: Sequence[int] | None, label: str) -> tuple[int, ...]:
    shape = given if given is not None else getattr(module, "input_shape", None)
    if shape is None:
        raise SpecError(f"torch module {label} ({type(module).__name__}) declares no input shape: set "
                        "its input_shape = (C, L) or (C, H, W) (channel-first, without the batch)")
    try:
        dims = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        raise SpecError(f"torch module {label}: input_shape {shape!r} is not a tuple of integers") from None
    if len(dims) not in (2, 3) or min(dims) < 1:
        raise SpecError(f"torch module {label}: input_shape {dims} must be (C, L) or (C, H, W), channel-first")
    return dims


def convert_module(module: nn.Module, name: str, input_shape: Sequence[int] | None = None,
                   weights: Mapping[str, np.ndarray] | None = None, weights_path: Path | None = None,
                   label: str = "") -> tuple[ModelSpec, Params]:
    """The description of `module` and its weights (BatchNorm folded, as in `module.eval()`).

    `weights` (read from `weights_path`) is either the module's own state dict (loaded into a copy of
    the module before converting) or already keyed by the description's parameter names.
    """
    label = label or name
    shape = input_shape_of(module, input_shape, label)
    module = copy.deepcopy(module).eval()
    own_keys = weights is not None and _load_state(module, weights, weights_path)
    try:
        graph = fx.symbolic_trace(module)
    except Exception as exc:
        raise SpecError(f"cannot trace torch module {label} with torch.fx ({_first_line(exc)}); its forward "
                        "must not branch on tensor values") from None
    try:
        with torch.no_grad():
            ShapeProp(graph).propagate(torch.zeros(1, *shape))
    except Exception as exc:
        raise SpecError(f"torch module {label} fails on an input of shape (1, {', '.join(map(str, shape))}): "
                        f"{_first_line(exc)}; check its input_shape") from None
    steps = _plan(graph, dict(graph.named_modules()))
    builder = SpecBuilder(name, shape)
    refs: dict[str, Ref] = {}
    for step in steps:
        step(builder, refs)
    spec, params = builder.finish(refs["output"])
    if weights is not None and not own_keys:
        from .weights import spec_weights

        params = spec_weights(spec, weights, weights_path or Path("?"))
    return spec, params


def _load_state(module: nn.Module, weights: Mapping[str, np.ndarray], path: Path | None) -> bool:
    """Load `weights` into `module` if they are keyed like its state dict; False if keyed otherwise."""
    state = {k: v for k, v in module.state_dict().items() if v.is_floating_point()}
    if not any(k in state for k in weights):
        return False  # not the module's keys: maybe the description's own names (checked after converting)
    missing = [k for k in state if k not in weights]
    unknown = [k for k in weights if k not in state]
    if missing or unknown:
        raise SpecError(f"weights file {path} does not fit the torch module's state dict: missing {_short(missing)}; "
                        f"unexpected {_short(unknown)}; expected keys {_short(state)}")
    for key, value in state.items():
        if tuple(weights[key].shape) != tuple(value.shape):
            raise SpecError(f"weights file {path}: {key!r} has shape {tuple(weights[key].shape)}, "
                            f"the module expects {tuple(value.shape)}")
    module.load_state_dict({k: torch.from_numpy(np.asarray(weights[k])) for k in state}, strict=False)
    return True


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# -- classification: every node becomes a build step or a refusal -----------------------------------


def _plan(graph: fx.GraphModule, modules: Mapping[str, nn.Module]) -> list[Step]:
    steps: list[Step] = []
    problems: list[SpecError] = []
    for node in graph.graph.nodes:
        try:
            step = _classify(node, modules)
        except SpecError as exc:
            problems.append(exc)
            continue
        if step is not None:
            steps.append(step)
    refuse_all(problems)
    return steps


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    return [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node) and _shape(a) is not None]


def _classify(node: fx.Node, modules: Mapping[str, nn.Module]) -> Step | None:
    if node.op == "placeholder":
        if node.prev.op == "placeholder":
            raise SpecError(f"input {node.name!r}: models with several inputs are not supported")
        return _alias(node, None)
    if node.op == "output":
        out = node.args[0]
        if not isinstance(out, fx.Node):
            raise SpecError("models with several outputs are not supported: return the logits only")
        return _alias(node, out, name="output")
    if node.op == "get_attr":
        raise refuse(node.name, "parameter used in forward", "use parameters only inside supported layers")
    if _shape(node) is None:
        return None  # x.size(0) and friends: only feed a view/reshape that is checked itself
    if node.op == "call_module":
        return _classify_module(node, modules[str(node.target)], modules)
    return _classify_function(node)


def _classify_module(node: fx.Node, mod: nn.Module, modules: Mapping[str, nn.Module]) -> Step:
    src = node.args[0]
    label, type_name = str(node.target), type(mod).__name__
    if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
        return _conv_step(node, mod, label)
    if isinstance(mod, nn.Linear):
        if len(_shape(src) or ()) != 2:
            raise refuse(label, type_name, "Linear applied to a (N, C, ...) tensor: Flatten before it")
        return _weighted(node, src, "dense", label, mod.weight, mod.bias, out=mod.out_features)
    if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return _norm_step(node, mod, label, modules)
    if type(mod) is nn.ReLU:
        return _simple(node, src, "relu", label)
    if isinstance(mod, nn.Hardtanh) and (mod.min_val, mod.max_val) == (0.0, 6.0):  # nn.ReLU6 is one
        return _simple(node, src, "relu6", label)
    if isinstance(mod, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Identity)):
        return _alias(node, src)
    if isinstance(mod, (nn.AvgPool1d, nn.AvgPool2d)):
        stride = mod.stride if mod.stride is not None else mod.kernel_size
        if (_pair(stride) != _pair(mod.kernel_size) or any(_pair(mod.padding)) or mod.ceil_mode
                or getattr(mod, "divisor_override", None)):
            raise refuse(label, type_name, "only non-overlapping average pooling (stride = kernel, no padding, "
                         "no ceil_mode)")
        return _pool_step(node, src, label, _pair(mod.kernel_size))
    if isinstance(mod, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
        if set(_pair(mod.output_size)) != {1}:
            raise refuse(label, type_name, "only output size 1 (global average pooling)")
        return _simple(node, src, "gap", label, flat=True)
    if isinstance(mod, nn.Flatten):
        return _flatten_step(node, src, label, type_name)
    if isinstance(mod, (nn.ZeroPad1d, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d)):
        if getattr(mod, "value", 0.0) != 0.0:
            raise refuse(label, type_name, "only zero padding")
        return _pad_step(node, src, label, type_name, mod.padding)
    if isinstance(mod, (nn.Softmax, nn.LogSoftmax)):
        return _softmax_step(node, src, label, type_name)
    raise refuse(label, f"torch.nn.{type_name}" if type(mod).__module__.startswith("torch.nn") else type_name,
                 hint_for(type_name))


def _classify_function(node: fx.Node) -> Step:
    fn, args = node.target, _tensor_args(node)
    label = node.name
    src = args[0] if args else None
    method = node.op == "call_method"
    if fn in _RELU_FNS or (method and fn in ("relu", "relu_")):
        return _simple(node, src, "relu", label)
    if fn is F.relu6:
        return _simple(node, src, "relu6", label)
    if fn in _ADD_FNS or (method and fn in ("add", "add_")):
        if len(args) != 2 or _shape(args[0]) != _shape(args[1]) or "alpha" in node.kwargs:
            raise refuse(label, "add", "residual adds join exactly two tensors of the same shape")
        return _add_step(node, args[0], args[1], label)
    if fn in _DROP_FNS or (method and fn in _ALIAS_METHODS):
        return _alias(node, src)
    if fn is torch.flatten or (method and fn in ("flatten", "view", "reshape")) or fn is torch.reshape:
        return _flatten_step(node, src, label, f"{fn if method else getattr(fn, '__name__', fn)}")
    if fn in (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d):
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        if set(_pair(size)) != {1}:
            raise refuse(label, str(getattr(fn, "__name__", fn)), "only output size 1 (global average pooling)")
        return _simple(node, src, "gap", label, flat=True)
    if fn is torch.mean or (method and fn == "mean"):
        return _mean_step(node, src, label)
    if fn in (F.avg_pool1d, F.avg_pool2d):
        kernel = node.args[1] if len(node.args) > 1 else node.kwargs["kernel_size"]
        stride = node.args[2] if len(node.args) > 2 else node.kwargs.get("stride")
        if stride not in (None, kernel) or len(node.args) > 3 or set(node.kwargs) - {"kernel_size", "stride"}:
            raise refuse(label, fn.__name__, "only non-overlapping average pooling (stride = kernel, no padding)")
        return _pool_step(node, src, label, _pair(kernel))
    if fn is F.pad:
        pad = node.args[1] if len(node.args) > 1 else node.kwargs["pad"]
        mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
        value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)
        if mode != "constant" or value not in (None, 0, 0.0):
            raise refuse(label, "pad", "only zero (constant 0) padding")
        return _pad_step(node, src, label, "pad", pad)
    if fn in _SOFTMAX_FNS or (method and fn in ("softmax", "log_softmax")):
        return _softmax_step(node, src, label, str(getattr(fn, "__name__", fn)))
    name = fn if isinstance(fn, str) else getattr(fn, "__name__", str(fn))
    raise refuse(label, f"torch function {name}", hint_for(str(name)))


def _pair(value: Any) -> tuple[int, ...]:
    return tuple(int(v) for v in value) if isinstance(value, (tuple, list)) else (int(value),)


# -- build steps ------------------------------------------------------------------------------------


def _alias(node: fx.Node, src: Any, name: str | None = None) -> Step:
    def step(b: SpecBuilder, refs: dict[str, Ref]) -> None:
        refs[name or node.name] = refs[src.name] if src is not None else INPUT

    return step


def _simple(node: fx.Node, src: Any, kind: str, label: str, flat: bool = False, **fields: object) -> Step:
    def step(b: SpecBuilder, refs: dict[str, Ref]) -> None:
        refs[node.name] = b.add(kind, label, refs[src.name], flat=flat, **fields)

    return step


def _weighted(node: fx.Node, src: Any, kind: str, label: str, weight: torch.Tensor, bias: torch.Tensor | None,
              **fields: object) -> Step:
    w = weight.detach().numpy().copy()
    b = None if bias is None else bias.detach().numpy().copy()

    def step(builder: SpecBuilder, refs: dict[str, Ref]) -> None:
        refs[node.name] = builder.weighted(kind, label, refs[src.name], w, b, **fields)

    return step


def _conv_step(node: fx.Node, mod: nn.Conv1d | nn.Conv2d, label: str) -> Step:
    type_name = type(mod).__name__
    dims = 2 if isinstance(mod, nn.Conv2d) else 1
    if mod.padding_mode != "zeros":
        raise refuse(label, type_name, f"only zero padding (padding_mode {mod.padding_mode!r})")
    if set(_pair(mod.dilation)) != {1}:
        raise refuse(label, type_name, "dilated convolutions are not supported: use dilation=1")
    strides = _pair(mod.stride)
    if len(set(strides)) != 1:
        raise refuse(label, type_name, f"stride {strides} differs per axis: use one stride for every axis")
    kind = "conv2d" if dims == 2 else "conv1d"
    if mod.groups != 1:
        if dims == 2 and mod.groups == mod.in_channels == mod.out_channels:
            kind = "dwconv2d"
        else:
            raise refuse(label, type_name, "grouped convs are supported only as depthwise Conv2d "
                         "(groups = in_channels = out_channels)")
    kernel = _pair(mod.kernel_size)
    if mod.padding == "same":
        pads = [((k - 1) // 2, k - 1 - (k - 1) // 2) for k in kernel]
    elif mod.padding == "valid":
        pads = [(0, 0)] * dims
    else:
        pads = [(p, p) for p in _pair(mod.padding)]
    w = mod.weight.detach().numpy().copy()
    bias = None if mod.bias is None else mod.bias.detach().numpy().copy()

    def step(b: SpecBuilder, refs: dict[str, Ref]) -> None:
        src = refs[node.args[0].name]  # type: ignore[union-attr]
        if src.flat:
            raise refuse(label, type_name, "a conv cannot follow Flatten or global average pooling")
        refs[node.name] = b.conv(kind, label, src, w, bias, strides[0], pads)

    return step


def _norm_step(node: fx.Node, mod: nn.BatchNorm1d | nn.BatchNorm2d, label: str,
               modules: Mapping[str, nn.Module]) -> Step:
    prev = node.args[0]
    if mod.running_mean is None or mod.running_var is None:
        raise refuse(label, type(mod).__name__, "BatchNorm without running statistics cannot be folded "
                     "(use track_running_stats=True)")
    if not (isinstance(prev, fx.Node) and prev.op == "call_module" and len(prev.users) == 1
            and isinstance(modules[str(prev.target)], (nn.Conv1d, nn.Conv2d, nn.Linear))):
        raise refuse(label, type(mod).__name__, HINTS["norm"] + "; here it follows "
                     f"{getattr(prev, 'name', prev)!r}, or that layer's output is also used elsewhere")
    gamma = None if mod.weight is None else mod.weight.detach().numpy().copy()
    beta = None if mod.bias is None else mod.bias.detach().numpy().copy()
    mean, var = mod.running_mean.numpy().copy(), mod.running_var.numpy().copy()

    def step(b: SpecBuilder, refs: dict[str, Ref]) -> None:
        refs[node.name] = b.fold_norm(refs[prev.name], gamma, beta, mean, var, float(mod.eps))

    return step


def _pool_step(node: fx.Node, src: Any, label: str, kernel: tuple[int, ...]) -> Step:
    fields: dict[str, object] = {"kernel": kernel[0]}
    if len(kernel) == 2 and kernel[1] != kernel[0]:
        fields["kernel_w"] = kernel[1]
    return _simple(node, src, "avgpool", label, **fields)


def _flatten_step(node: fx.Node, src: Any, label: str, type_name: str) -> Step:
    before, after = _shape(src) or (), _shape(node) or ()
    if len(after) != 2 or after[0] != before[0] or after[1] != int(np.prod(before[1:])):
        raise refuse(label, type_name, HINTS["reshape"] + f" (this one reshapes {before} to {after})")

    def step(b: SpecBuilder, refs: dict[str, Ref]) -> None:
        ref = refs[src.name]
        # After global pooling (or already flat) the description's tensor is (C,): nothing to flatten.
        refs[node.name] = ref if ref.flat else b.add("flatten", label, ref, flat=True)

    return step


def _mean_step(node: fx.Node, src: Any, label: str) -> Step:
    rank = len(_shape(src) or ())
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
    wanted = set(range(2, rank))
    got = {d % rank for d in _pair(dims)} if dims is not None else set()
    if rank < 3 or got != wanted:
        raise refuse(label, "mean", "only a mean over every spatial axis (global average pooling)")
    del keepdim  # (N, C) or (N, C, 1, 1): both are the description's flat (C,) after gap
    return _simple(node, src, "gap", label, flat=True)


def _add_step(node: fx.Node, a: fx.Node, c: fx.Node, label: str) -> Step:
    def step(b: SpecBuilder, refs: dict[str, Ref]) -> None:
        first, second = refs[a.name], refs[c.name]
        # `input` reads the later-built operand where possible, so the layer usually follows it.
        last = b.layers[-1].name if b.layers else "input"
        if second.name == last:
            first, second = second, first
        refs[node.name] = b.add("add", label, first, source=second.name)

    return step


def _pad_step(node: fx.Node, src: Any, label: str, type_name: str, padding: Any) -> Step:
    rank = len(_shape(src) or ())
    spatial = rank - 2
    pads = _pair(padding)
    if len(pads) == 1:
        pads = pads * (2 * spatial)
    if len(pads) != 2 * spatial or min(pads) < 0:
        raise refuse(label, type_name, "only non-negative zero padding of the spatial axes")
    # torch lists the last axis first: (left, right[, top, bottom]); the description lists axes in order.
    pairs = [pads[i:i + 2] for i in range(0, len(pads), 2)][::-1]
    flat = tuple(int(v) for pair in pairs for v in pair)
    return _simple(node, src, "pad", label, pads=flat)


def _softmax_step(node: fx.Node, src: Any, label: str, type_name: str) -> Step:
    if [u.op for u in node.users] != ["output"] or len(_shape(node) or ()) != 2:
        raise refuse(label, type_name, HINTS["softmax"])
    return _alias(node, src)  # a softmax on the logits changes no prediction: dropped
