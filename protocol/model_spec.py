"""The model description: the single source of truth for every export.

A `ModelSpec` is a short, declarative list of edge-sized layers in topological order: a layer reads the
previous one unless `input` names another, and `add` joins two branches (residual blocks), so the list
describes a DAG. The torch module, the TensorFlow twin behind the LiteRT programs, the ExecuTorch
programs and every dropout variant are all built from it, so the frameworks cannot disagree about
architecture or parameter names. Shape inference and slicing groups live in `graph.py`.

Layout conventions (shared by every builder):
- tensors are channel-first, like torch: images (N, C, H, W), sensor windows (N, C, L);
- parameter names are "<layer>.<part>" with torch's shapes: conv2d weight (O, I, k, k), conv1d weight
  (O, I, kh, kw), depthwise weight (C, 1, kh, kw), dense weight (O, I);
- "same" padding is symmetric, `kernel // 2` on each side, exactly as torch's `padding=k//2`; TF's
  asymmetric "same" at stride > 1 is a `pad` layer followed by a "valid" conv.

Only numpy and the standard library are used here: the device reads specs out of bundles.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from typing import Any

from . import graph
from .graph import CONV_KINDS, MODEL_INPUT
from .patch_kinds import HEAD_BIAS_PART, PatchKindError, patch_kind

LAYER_KINDS = ("conv2d", "dwconv2d", "conv1d", "dense", "relu", "relu6", "avgpool", "flatten", "norm", "gap",
               "add", "pad")
# Layers whose output channels DISTREAL may drop (filters), and where patches may attach.
DROPPABLE_KINDS = CONV_KINDS
PATCHABLE_KINDS = ("conv2d", "dwconv2d", "conv1d", "dense")
PADDINGS = ("same", "valid")
_KERNEL_KINDS = ("conv2d", "dwconv2d", "conv1d", "avgpool")


class SpecError(ValueError):
    """A model or patch description that cannot be built."""


@dataclass(frozen=True)
class LayerSpec:
    """One layer; unused fields stay at their default (see docs/models.md for which kind uses which).

    `out`: channels (conv) or features (dense). `kernel`: height (1-D: length); `kernel_w`: width when
    rectangular (0 = square). `input`: the layer read ("" = previous, "input" = model input); `source`:
    the other operand of an `add`. `padding`: "same" (symmetric kernel // 2, odd kernels) or "valid".
    `pads`: for `pad`, (before, after) per spatial dim: (left, right) or (top, bottom, left, right).
    """

    kind: str
    name: str
    out: int = 0
    kernel: int = 0
    stride: int = 1
    input: str = ""
    source: str = ""
    padding: str = "same"
    kernel_w: int = 0
    pads: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "pads", tuple(self.pads))

    def validate(self) -> None:
        where = f"layer {self.name!r}"
        if self.kind not in LAYER_KINDS:
            raise SpecError(f"{where}: unknown kind {self.kind!r}; allowed: {', '.join(LAYER_KINDS)}")
        if not isinstance(self.name, str) or not self.name.isidentifier() or self.name == MODEL_INPUT:
            raise SpecError(f"layer name {self.name!r} must be an identifier (letters, digits, _) other than "
                            f"{MODEL_INPUT!r}")
        for field in ("out", "kernel", "stride", "kernel_w"):
            if not isinstance(getattr(self, field), int):
                raise SpecError(f"{where}: {field} must be an int, got {getattr(self, field)!r}")
        if self.kind in ("conv2d", "conv1d", "dense") and self.out < 1:
            raise SpecError(f"{where}: {self.kind} needs out >= 1")
        if self.kind in _KERNEL_KINDS and (self.kernel < 1 or self.kernel_w < 0):
            raise SpecError(f"{where}: {self.kind} needs kernel >= 1 (and kernel_w >= 0)")
        if self.kernel_w and self.kind not in ("conv2d", "dwconv2d", "avgpool"):
            raise SpecError(f"{where}: kernel_w applies to conv2d, dwconv2d and avgpool only")
        if self.padding not in PADDINGS:
            raise SpecError(f"{where}: padding must be one of {PADDINGS}, got {self.padding!r}")
        if self.kind in ("conv2d", "conv1d", "dwconv2d") and self.padding == "same" and (
                self.kernel % 2 == 0 or (self.kernel_w and self.kernel_w % 2 == 0)):
            raise SpecError(f"{where}: padding 'same' needs odd kernels (got {self.kernel}x"
                            f"{self.kernel_w or self.kernel}); use a pad layer and padding 'valid'")
        if self.stride < 1:
            raise SpecError(f"{where}: stride must be >= 1")
        if self.kind == "pad":
            if not self.pads or any(not isinstance(p, int) or p < 0 for p in self.pads):
                raise SpecError(f"{where}: pad needs pads = non-negative ints (before, after) per spatial dim")
        elif self.pads:
            raise SpecError(f"{where}: pads applies to kind 'pad' only")
        if self.kind == "add" and not self.source:
            raise SpecError(f"{where}: add needs source (the other operand's layer name, or 'input')")
        if self.kind != "add" and self.source:
            raise SpecError(f"{where}: source applies to kind 'add' only")
        for field in ("input", "source"):
            ref = getattr(self, field)
            if not isinstance(ref, str) or (ref and not ref.isidentifier()):
                raise SpecError(f"{where}: {field} must be a layer name or 'input', got {ref!r}")

    def to_dict(self) -> dict[str, Any]:
        """The five original fields always; the DAG fields only when set (old specs serialize unchanged)."""
        data = asdict(self)
        for field in ("input", "source", "padding", "kernel_w", "pads"):
            if data[field] == _DEFAULTS[field]:
                del data[field]
        if "pads" in data:
            data["pads"] = list(data["pads"])
        return data


_DEFAULTS = {"input": "", "source": "", "padding": "same", "kernel_w": 0, "pads": ()}


@dataclass(frozen=True)
class ModelSpec:
    """A classifier DAG: `input_shape` is channel-first without the batch, the last layer a dense head."""

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    layers: tuple[LayerSpec, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))
        object.__setattr__(self, "layers", tuple(self.layers))
        self.validate()

    # -- validation and shape inference -------------------------------------------------------------
    def validate(self) -> None:
        if len(self.input_shape) not in (2, 3) or min(self.input_shape) < 1:
            raise SpecError(f"input_shape {self.input_shape} must be (C, L) or (C, H, W), all >= 1")
        if self.num_classes < 2:
            raise SpecError("num_classes must be >= 2")
        names = [layer.name for layer in self.layers]
        if len(set(names)) != len(names):
            raise SpecError(f"layer names must be unique: {names}")
        for layer in self.layers:
            layer.validate()
        if not self.layers or self.layers[-1].kind != "dense" or self.layers[-1].out != self.num_classes:
            raise SpecError("the last layer must be a dense head with out == num_classes")
        try:
            graph.infer_shapes(self.layers, self.input_shape)  # raises on incompatible wiring
            dead = graph.unused_outputs(self.layers)
        except graph.GraphError as exc:
            raise SpecError(f"model {self.name!r}: {exc}") from None
        if dead:
            raise SpecError(f"model {self.name!r}: the output of {dead} is never used (a dead branch)")

    @property
    def dims(self) -> int:
        """Spatial dimensions of the input: 1 (sensor windows) or 2 (images)."""
        return len(self.input_shape) - 1

    @cached_property
    def _shapes(self) -> dict[str, tuple[int, ...]]:
        return graph.infer_shapes(self.layers, self.input_shape)

    @cached_property
    def _slicing(self) -> graph.Slicing:
        return graph.slicing(self.layers, self.input_shape)

    @cached_property
    def _operands(self) -> dict[str, tuple[str, ...]]:
        return graph.operands(self.layers)

    def activation_shapes(self) -> dict[str, tuple[int, ...]]:
        """Output shape (without batch) of every layer, in layer order."""
        return dict(self._shapes)

    def shape_of(self, name: str) -> tuple[int, ...]:
        """Output shape of a layer, or of "input"."""
        return self.input_shape if name == MODEL_INPUT else self._shapes[name]

    def operands(self, layer: str) -> tuple[str, ...]:
        """What a layer reads: (input,) or, for add, (input, source); names are layers or "input"."""
        return self._operands[layer]

    def channel_source(self, name: str) -> graph.ChannelSource:
        """Which slicing group indexes the channels (features) of a layer's output (or "input")."""
        return self._slicing.sources[name]

    def layer(self, name: str) -> LayerSpec:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise SpecError(f"no layer named {name!r} in model {self.name!r}")

    def slicing_groups(self) -> dict[str, tuple[str, ...]]:
        """Droppable groups: name (its first conv) -> convs sharing one kept set (residual adds couple them)."""
        return dict(self._slicing.groups)

    def droppable_layers(self) -> list[str]:
        """Slicing group names (each a conv name) whose filters a dropout variant may drop; the head never.

        Without residual adds every conv is its own group, so these are the conv layers themselves."""
        return list(self._slicing.groups)

    def group_width(self, group: str) -> int:
        """Filters of a slicing group (every conv in it has this many)."""
        if group not in self._slicing.groups:
            raise SpecError(f"{group!r} is not a slicing group of {self.name!r} ({self.droppable_layers()})")
        return self.layer(group).out

    def with_widths(self, widths: dict[str, int]) -> ModelSpec:
        """The same architecture with fewer filters in some groups (a variant's physical shape)."""
        groups = self._slicing.groups
        unknown = set(widths) - set(groups)
        if unknown:
            raise SpecError(f"not droppable layers: {sorted(unknown)}")
        width_of = {conv: widths[g] for g in widths for conv in groups[g]}
        layers = tuple(replace(layer, out=width_of.get(layer.name, layer.out)) for layer in self.layers)
        return replace(self, layers=layers)

    # -- JSON round trip ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "layers": [layer.to_dict() for layer in self.layers],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        try:
            layers = tuple(LayerSpec(**layer) for layer in data["layers"])
            return cls(str(data["name"]), tuple(data["input_shape"]), int(data["num_classes"]), layers)
        except (KeyError, TypeError) as exc:
            raise SpecError(f"malformed model description: {exc}") from exc


@dataclass(frozen=True)
class PatchSpec:
    """MetaPatch: patches of `kind` after each layer in `layers`, generated from one φ ∈ R^k per device.

    For each patch part, θ = θ̄ + Θ·φ; θ̄ ("bar") and Θ ("basis") are shared and frozen on the device,
    φ is the only thing a device trains and uploads. `rank` is the bottleneck of "lowrank" patches.
    `head_bias`: the patch also adds θ̄_hb + Θ_hb·φ to the logits (a patch on the head's bias, so φ can
    express a device's label prior; see patch_kinds.py); its `num_classes` coefficients are φ's last ones
    and are counted in `k` (`with_head_bias` adds them).
    """

    kind: str = "film"
    layers: tuple[str, ...] = ()
    k: int = 16
    rank: int = 4
    head_bias: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        try:
            patch_kind(self.kind)
        except PatchKindError as exc:
            raise SpecError(str(exc)) from None
        if self.k < 1 or self.rank < 1:
            raise SpecError("patch k and rank must be >= 1")
        if not self.layers:
            raise SpecError("a patch spec needs at least one layer to attach to")
        if not isinstance(self.head_bias, bool):
            raise SpecError(f"patch head_bias must be true or false, got {self.head_bias!r}")

    def validate_against(self, spec: ModelSpec) -> None:
        for name in self.layers:
            layer = spec.layer(name)
            if layer.kind not in PATCHABLE_KINDS:
                raise SpecError(f"patches attach to {', '.join(PATCHABLE_KINDS)} layers; {name!r} is {layer.kind}")
        if spec.layers[-1].name in self.layers:
            raise SpecError("the head layer cannot carry a patch (a head bias is `head_bias`)")
        if self.head_bias and self.k <= spec.num_classes:
            raise SpecError(f"a head bias takes {spec.num_classes} of φ's k = {self.k} coefficients and leaves "
                            "none for the layer patches; use PatchSpec.with_head_bias (k + num_classes)")

    def with_head_bias(self, spec: ModelSpec) -> PatchSpec:
        """This patch plus a head bias: φ grows by `spec.num_classes` coefficients (a no-op if it has one)."""
        if self.head_bias:
            return self
        return replace(self, k=self.k + spec.num_classes, head_bias=True)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"kind": self.kind, "layers": list(self.layers), "k": self.k, "rank": self.rank}
        if self.head_bias:  # only when set: specs and manifests without it serialize byte-identically
            data["head_bias"] = True
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PatchSpec:
        try:
            return cls(str(data["kind"]), tuple(data["layers"]), int(data["k"]), int(data.get("rank", 4)),
                       data.get("head_bias", False))
        except (KeyError, TypeError) as exc:
            raise SpecError(f"malformed patch description: {exc}") from exc


# -- parameters ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamInfo:
    """A parameter's shape and, per axis, which droppable layer's kept set slices that axis.

    `axis_sources[i]` is None (never sliced), a slicing group name (axis indexes that group's channels),
    or "flat:<group>:<spatial>" for a dense input after flatten (channel-major blocks of `spatial`).
    `role` is "base" (W), "bar" (θ̄) or "basis" (Θ).
    """

    shape: tuple[int, ...]
    axis_sources: tuple[str | None, ...]
    role: str = "base"


def patch_parts(kind: str, channels: int, rank: int) -> dict[str, tuple[int, ...]]:
    """Shapes of one patch's parts on a layer with `channels` output channels (see patch_kinds.py)."""
    return patch_kind(kind).parts(channels, rank)


def param_infos(spec: ModelSpec, patch: PatchSpec | None = None) -> dict[str, ParamInfo]:
    """Every parameter of the (patched) model in a fixed order, with its slicing axes.

    Axis sources are slicing-group names (see `ModelSpec.slicing_groups`), so convs coupled by a
    residual add are sliced with one kept set."""
    if patch is not None:
        patch.validate_against(spec)
    infos: dict[str, ParamInfo] = {}
    for layer in spec.layers:
        n = layer.name
        operand = spec.operands(n)[0]
        in_channels, in_axis = spec.shape_of(operand)[0], spec.channel_source(operand).axis()
        ks = graph.kernel_size(layer, spec.dims)
        if layer.kind in CONV_KINDS:
            own = spec.channel_source(n).axis()
            infos[f"{n}.weight"] = ParamInfo((layer.out, in_channels, *ks), (own, in_axis, *(None,) * spec.dims))
            infos[f"{n}.bias"] = ParamInfo((layer.out,), (own,))
        elif layer.kind == "dwconv2d":
            infos[f"{n}.weight"] = ParamInfo((in_channels, 1, *ks), (in_axis, None, None, None))
            infos[f"{n}.bias"] = ParamInfo((in_channels,), (in_axis,))
        elif layer.kind == "norm":
            infos[f"{n}.weight"] = ParamInfo((in_channels,), (in_axis,))
            infos[f"{n}.bias"] = ParamInfo((in_channels,), (in_axis,))
        elif layer.kind == "dense":
            infos[f"{n}.weight"] = ParamInfo((layer.out, in_channels), (None, in_axis))
            infos[f"{n}.bias"] = ParamInfo((layer.out,), (None,))
        if patch is not None and n in patch.layers:
            channels, source = spec.shape_of(n)[0], spec.channel_source(n).axis()
            kind = patch_kind(patch.kind)
            for part, shape in kind.parts(channels, patch.rank).items():
                axes = tuple(source if i in kind.channel_axes[part] else None for i in range(len(shape)))
                infos[f"{n}.patch.{part}"] = ParamInfo(shape, axes, "bar")
                infos[f"{n}.patch.{part}_basis"] = ParamInfo((*shape, patch.k), (*axes, None), "basis")
    if patch is not None and patch.head_bias:  # after the head's own parameters: older orders are unchanged
        head, classes = spec.layers[-1].name, spec.num_classes
        infos[f"{head}.patch.{HEAD_BIAS_PART}"] = ParamInfo((classes,), (None,), "bar")
        infos[f"{head}.patch.{HEAD_BIAS_PART}_basis"] = ParamInfo((classes, patch.k), (None, None), "basis")
    return infos


def dumps(obj: ModelSpec | PatchSpec) -> str:
    return json.dumps(obj.to_dict(), sort_keys=True)
