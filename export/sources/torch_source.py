"""A torch.nn.Module → model description + weights, through a torch.fx trace.

torch.fx keeps torch.nn layers as single `call_module` nodes, so a refusal can name the user's own layer
(`features.3`) and its class; `ShapeProp` runs the traced graph once (in eval mode, no gradients) on a
zero input of the declared shape, which gives every tensor's shape for the checks below.

The input shape is not in a torch module: the module declares it as `input_shape = (C, L)` or
`(C, H, W)` (channel-first, without the batch), or the caller passes `input_shape`.
Every node is classified before anything is built, so all unsupported layers are found at once.
"""

from __future__ import annotations

import contextlib
import copy
import io
import operator
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from edgepatch.protocol.model_spec import ModelSpec, SpecError
from edgepatch.protocol.params import Params

from .builder import Ref, SpecBuilder, hint_for, refuse, refuse_all
from .torch_steps import (
    Step,
    add_step,
    alias,
    as_tuple,
    conv_step,
    flatten_step,
    mean_step,
    node_shape,
    norm_step,
    pad_step,
    pool_step,
    simple,
    softmax_step,
    weighted,
)
from .weights import _short

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
    module = copy.deepcopy(module).float().eval()  # a copy: the caller's module keeps its mode and dtype
    try:
        graph = fx.symbolic_trace(module)
    except Exception as exc:
        raise SpecError(f"cannot trace torch module {label} with torch.fx ({_first_line(exc)}); its forward "
                        "must not branch on tensor values") from None
    _refuse_unknown_modules(graph)  # before anything runs: an LSTM is named even if its forward would fail
    shape = input_shape_of(module, input_shape, label)
    own_keys = weights is not None and _load_state(module, weights, weights_path)
    try:  # ShapeProp prints the traceback of a failing node itself: keep the one-line error only
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
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


# torch.nn layers with a build step (some only with certain settings, checked in _classify_module).
_KNOWN_MODULES = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.Hardtanh, nn.Dropout,
                  nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Identity, nn.AvgPool1d, nn.AvgPool2d,
                  nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.ZeroPad1d, nn.ZeroPad2d,
                  nn.ConstantPad1d, nn.ConstantPad2d, nn.Softmax, nn.LogSoftmax)


def _refuse_unknown_modules(graph: fx.GraphModule) -> None:
    modules = dict(graph.named_modules())
    problems = []
    for node in graph.graph.nodes:
        if node.op == "call_module" and not isinstance(modules[str(node.target)], _KNOWN_MODULES):
            type_name = _type_name(modules[str(node.target)])
            problems.append(refuse(str(node.target), type_name, hint_for(type_name)))
    refuse_all(problems)


def _type_name(mod: nn.Module) -> str:
    return f"torch.nn.{type(mod).__name__}" if type(mod).__module__.startswith("torch.nn") else type(mod).__name__


def _load_state(module: nn.Module, weights: Mapping[str, np.ndarray], path: Path | None) -> bool:
    """Load `weights` into `module` if they are keyed like its state dict; False if keyed otherwise."""
    state = {k: v for k, v in module.state_dict().items() if v.is_floating_point()}
    for wrapper in ("module.", "_orig_mod."):  # saved from DataParallel / torch.compile wrappers
        if weights and all(k.startswith(wrapper) for k in weights) and not any(k in state for k in weights):
            weights = {k.removeprefix(wrapper): v for k, v in weights.items()}
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
    while exc.__cause__ is not None:  # ShapeProp wraps the module's own error
        exc = exc.__cause__
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# -- classification: every node becomes a build step or a refusal -----------------------------------


def _plan(graph: fx.GraphModule, modules: Mapping[str, nn.Module]) -> list[Step]:
    steps: list[Step] = []
    problems: list[tuple[bool, int, SpecError]] = []
    called: set[str] = set()
    for node in graph.graph.nodes:
        try:
            if node.op == "call_module" and node.target in called and next(modules[str(node.target)].parameters(), None) is not None:
                mod = modules[str(node.target)]
                raise refuse(str(node.target), _type_name(mod), "a layer called twice shares its weights, which "
                             "edgepatch cannot train: give each call its own layer")
            called.add(str(node.target))
            step = _classify(node, modules)
        except SpecError as exc:
            problems.append((node.op != "call_module", len(problems), exc))
            continue
        if step is not None:
            steps.append(step)
    # Name the user's own layers (an LSTM) before the tensor plumbing around them (a transpose).
    refuse_all([exc for *_, exc in sorted(problems, key=lambda p: p[:2])])
    return steps


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    return [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node) and node_shape(a) is not None]


def _classify(node: fx.Node, modules: Mapping[str, nn.Module]) -> Step | None:
    if node.op == "placeholder":
        if node.prev.op == "placeholder":
            raise SpecError(f"input {node.name!r}: models with several inputs are not supported")
        return alias(node, None)
    if node.op == "output":
        out = node.args[0]
        if not isinstance(out, fx.Node):
            raise SpecError("models with several outputs are not supported: return the logits only")
        return alias(node, out, name="output")
    if node.op == "get_attr":
        raise refuse(node.name, "parameter used in forward", "use parameters only inside supported layers")
    if node.op == "call_module":
        return _classify_module(node, modules[str(node.target)], modules)
    if node_shape(node) is None and _is_shape_plumbing(node):
        return None  # x.size(0) and friends: only feed a view/reshape that is checked itself
    return _classify_function(node)


def _is_shape_plumbing(node: fx.Node) -> bool:
    """x.size(0), x.shape, x.dim(), and indexing into those: no tensor flows through them."""
    if node.op == "call_method" and node.target in _SHAPE_METHODS:
        return True
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in ("shape", "ndim")
    if node.op == "call_function" and node.target is operator.getitem:
        return isinstance(node.args[0], fx.Node) and node_shape(node.args[0]) is None and _is_shape_plumbing(node.args[0])
    return False


def _classify_module(node: fx.Node, mod: nn.Module, modules: Mapping[str, nn.Module]) -> Step:
    src = node.args[0]
    label, type_name = str(node.target), _type_name(mod)
    if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
        return conv_step(node, mod, label, type_name)
    if isinstance(mod, nn.Linear):
        if len(node_shape(src) or ()) != 2:
            raise refuse(label, type_name, "Linear applied to a (N, C, ...) tensor: Flatten before it")
        return weighted(node, src, "dense", label, mod.weight, mod.bias, out=mod.out_features)
    if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return norm_step(node, mod, label, type_name, modules)
    if type(mod) is nn.ReLU:
        return simple(node, src, "relu", label)
    if isinstance(mod, nn.Hardtanh) and (mod.min_val, mod.max_val) == (0.0, 6.0):  # nn.ReLU6 is one
        return simple(node, src, "relu6", label)
    if isinstance(mod, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Identity)):
        return alias(node, src)
    if isinstance(mod, (nn.AvgPool1d, nn.AvgPool2d)):
        stride = mod.stride if mod.stride is not None else mod.kernel_size
        if (as_tuple(stride) != as_tuple(mod.kernel_size) or any(as_tuple(mod.padding)) or mod.ceil_mode
                or getattr(mod, "divisor_override", None)):
            raise refuse(label, type_name, "only non-overlapping average pooling (stride = kernel, no padding, "
                         "no ceil_mode)")
        return pool_step(node, src, label, as_tuple(mod.kernel_size))
    if isinstance(mod, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)):
        if set(as_tuple(mod.output_size)) != {1}:
            raise refuse(label, type_name, "only output size 1 (global average pooling)")
        return simple(node, src, "gap", label, flat=True)
    if isinstance(mod, nn.Flatten):
        return flatten_step(node, src, label, type_name)
    if isinstance(mod, (nn.ZeroPad1d, nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d)):
        if getattr(mod, "value", 0.0) != 0.0:
            raise refuse(label, type_name, "only zero padding")
        return pad_step(node, src, label, type_name, mod.padding)
    if isinstance(mod, (nn.Softmax, nn.LogSoftmax)):
        return softmax_step(node, src, label, type_name)
    raise refuse(label, type_name, hint_for(type_name))


def _classify_function(node: fx.Node) -> Step:
    fn, args = node.target, _tensor_args(node)
    label = node.name
    src = args[0] if args else None
    method = node.op == "call_method"
    if method and str(fn).endswith("_") and not node.users:  # torch.fx does not see in-place effects
        raise refuse(label, f"in-place {fn}", f"assign its result (x = x.{str(fn)[:-1]}()): the traced graph "
                     "does not see a tensor changed in place")
    if fn in _RELU_FNS or (method and fn in ("relu", "relu_")):
        return simple(node, src, "relu", label)
    if fn is F.relu6:
        return simple(node, src, "relu6", label)
    if fn in _ADD_FNS or (method and fn in ("add", "add_")):
        if len(args) != 2 or node_shape(args[0]) != node_shape(args[1]) or "alpha" in node.kwargs:
            raise refuse(label, "add", "residual adds join exactly two tensors of the same shape")
        return add_step(node, args[0], args[1], label)
    if fn in _DROP_FNS or (method and fn in _ALIAS_METHODS):
        return alias(node, src)
    if fn is torch.flatten or (method and fn in ("flatten", "view", "reshape")) or fn is torch.reshape:
        return flatten_step(node, src, label, f"{fn if method else getattr(fn, '__name__', fn)}")
    if fn in (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d):
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        if set(as_tuple(size)) != {1}:
            raise refuse(label, str(getattr(fn, "__name__", fn)), "only output size 1 (global average pooling)")
        return simple(node, src, "gap", label, flat=True)
    if fn is torch.mean or (method and fn == "mean"):
        return mean_step(node, src, label)
    if fn in (F.avg_pool1d, F.avg_pool2d):
        kernel = node.args[1] if len(node.args) > 1 else node.kwargs["kernel_size"]
        stride = node.args[2] if len(node.args) > 2 else node.kwargs.get("stride")
        if stride not in (None, kernel) or len(node.args) > 3 or set(node.kwargs) - {"kernel_size", "stride"}:
            raise refuse(label, fn.__name__, "only non-overlapping average pooling (stride = kernel, no padding)")
        return pool_step(node, src, label, as_tuple(kernel))
    if fn is F.pad:
        pad = node.args[1] if len(node.args) > 1 else node.kwargs["pad"]
        mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
        value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)
        if mode != "constant" or value not in (None, 0, 0.0):
            raise refuse(label, "pad", "only zero (constant 0) padding")
        return pad_step(node, src, label, "pad", pad)
    if fn in _SOFTMAX_FNS or (method and fn in ("softmax", "log_softmax")):
        return softmax_step(node, src, label, str(getattr(fn, "__name__", fn)))
    name = fn if isinstance(fn, str) else getattr(fn, "__name__", str(fn))
    raise refuse(label, f"torch function {name}", hint_for(str(name)))
