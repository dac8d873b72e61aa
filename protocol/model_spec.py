"""The model description: the single source of truth for every export.

A `ModelSpec` is a short, declarative list of edge-sized layers. The torch module, the TensorFlow twin
behind the LiteRT programs, the ExecuTorch programs and every dropout variant are all built from it,
so the frameworks cannot disagree about architecture or parameter names.

Layout conventions (shared by every builder):
- tensors are channel-first, like torch: images (N, C, H, W), sensor windows (N, C, L);
- parameter names are "<layer>.<part>" with torch's shapes: conv2d weight (O, I, k, k), conv1d weight
  (O, I, k), depthwise weight (C, 1, k, k), dense weight (O, I);
- "same" padding is symmetric, `kernel // 2` on each side, exactly as torch's `padding=k//2`.

Only numpy and the standard library are used here: the device reads specs out of bundles.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import Any

LAYER_KINDS = ("conv2d", "dwconv2d", "conv1d", "dense", "relu", "avgpool", "flatten", "norm")
# Layers whose output channels DISTREAL may drop (filters), and where patches may attach.
DROPPABLE_KINDS = ("conv2d", "conv1d")
PATCHABLE_KINDS = ("conv2d", "dwconv2d", "conv1d", "dense")
PATCH_KINDS = ("film", "lowrank")


class SpecError(ValueError):
    """A model or patch description that cannot be built."""


@dataclass(frozen=True)
class LayerSpec:
    """One layer. `out` is channels (conv) or features (dense); unused fields stay at their default."""

    kind: str
    name: str
    out: int = 0
    kernel: int = 0
    stride: int = 1

    def validate(self) -> None:
        if self.kind not in LAYER_KINDS:
            raise SpecError(f"layer {self.name!r}: unknown kind {self.kind!r}; allowed: {', '.join(LAYER_KINDS)}")
        if not self.name.isidentifier():
            raise SpecError(f"layer name {self.name!r} must be an identifier (letters, digits, _)")
        if self.kind in ("conv2d", "conv1d", "dense") and self.out < 1:
            raise SpecError(f"layer {self.name!r}: {self.kind} needs out >= 1")
        if self.kind in ("conv2d", "conv1d", "dwconv2d") and (self.kernel < 1 or self.kernel % 2 == 0):
            raise SpecError(f"layer {self.name!r}: kernel must be odd and >= 1 (got {self.kernel})")
        if self.kind == "avgpool" and self.kernel < 1:
            raise SpecError(f"layer {self.name!r}: avgpool needs kernel >= 1")
        if self.stride < 1:
            raise SpecError(f"layer {self.name!r}: stride must be >= 1")
        if self.kind == "dwconv2d" and self.stride != 1:
            # Its input gradient stays builtins-only as a flipped depthwise conv only at stride 1.
            raise SpecError(f"layer {self.name!r}: dwconv2d supports stride 1 only")


@dataclass(frozen=True)
class ModelSpec:
    """A classifier: `input_shape` is channel-first without the batch, the last layer is a dense head."""

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
        if len(self.input_shape) not in (2, 3):
            raise SpecError(f"input_shape {self.input_shape} must be (C, L) or (C, H, W)")
        if self.num_classes < 2:
            raise SpecError("num_classes must be >= 2")
        names = [layer.name for layer in self.layers]
        if len(set(names)) != len(names):
            raise SpecError(f"layer names must be unique: {names}")
        for layer in self.layers:
            layer.validate()
        if not self.layers or self.layers[-1].kind != "dense" or self.layers[-1].out != self.num_classes:
            raise SpecError("the last layer must be a dense head with out == num_classes")
        self.activation_shapes()  # raises on incompatible layer order

    @property
    def dims(self) -> int:
        """Spatial dimensions of the input: 1 (sensor windows) or 2 (images)."""
        return len(self.input_shape) - 1

    def activation_shapes(self) -> dict[str, tuple[int, ...]]:
        """Output shape (without batch) of every layer, in order."""
        shape = self.input_shape
        shapes: dict[str, tuple[int, ...]] = {}
        for layer in self.layers:
            shape = _layer_output_shape(layer, shape, self.dims)
            shapes[layer.name] = shape
        return shapes

    def layer(self, name: str) -> LayerSpec:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise SpecError(f"no layer named {name!r} in model {self.name!r}")

    def droppable_layers(self) -> list[str]:
        """Conv layers whose filters a dropout variant may drop (the head never)."""
        return [layer.name for layer in self.layers if layer.kind in DROPPABLE_KINDS]

    def with_widths(self, widths: dict[str, int]) -> ModelSpec:
        """The same architecture with fewer filters in some conv layers (a variant's physical shape)."""
        unknown = set(widths) - set(self.droppable_layers())
        if unknown:
            raise SpecError(f"not droppable layers: {sorted(unknown)}")
        layers = tuple(replace(layer, out=widths.get(layer.name, layer.out)) for layer in self.layers)
        return replace(self, layers=layers)

    # -- JSON round trip ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "layers": [asdict(layer) for layer in self.layers],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        try:
            layers = tuple(LayerSpec(**layer) for layer in data["layers"])
            return cls(str(data["name"]), tuple(data["input_shape"]), int(data["num_classes"]), layers)
        except (KeyError, TypeError) as exc:
            raise SpecError(f"malformed model description: {exc}") from exc


def _layer_output_shape(layer: LayerSpec, shape: tuple[int, ...], dims: int) -> tuple[int, ...]:
    flat = len(shape) == 1
    if layer.kind in ("conv2d", "dwconv2d", "conv1d", "avgpool") and flat:
        raise SpecError(f"layer {layer.name!r}: {layer.kind} after flatten")
    if layer.kind in ("conv2d", "dwconv2d") and dims != 2:
        raise SpecError(f"layer {layer.name!r}: {layer.kind} needs a (C, H, W) input")
    if layer.kind == "conv1d" and dims != 1:
        raise SpecError(f"layer {layer.name!r}: conv1d needs a (C, L) input")
    if layer.kind in ("conv2d", "conv1d", "dwconv2d"):
        spatial = tuple((s + 2 * (layer.kernel // 2) - layer.kernel) // layer.stride + 1 for s in shape[1:])
        channels = shape[0] if layer.kind == "dwconv2d" else layer.out
        return (channels, *spatial)
    if layer.kind == "avgpool":
        spatial = tuple(s // layer.kernel for s in shape[1:])
        if min(spatial) < 1:
            raise SpecError(f"layer {layer.name!r}: pooling {layer.kernel} shrinks {shape} to nothing")
        return (shape[0], *spatial)
    if layer.kind == "flatten":
        size = 1
        for s in shape:
            size *= s
        return (size,)
    if layer.kind == "dense":
        if not flat:
            raise SpecError(f"layer {layer.name!r}: dense needs a flatten before it")
        return (layer.out,)
    return shape  # relu, norm


@dataclass(frozen=True)
class PatchSpec:
    """MetaPatch: patches of `kind` after each layer in `layers`, generated from one φ ∈ R^k per device.

    For each patch part, θ = θ̄ + Θ·φ; θ̄ ("bar") and Θ ("basis") are shared and frozen on the device,
    φ is the only thing a device trains and uploads. `rank` is the bottleneck of "lowrank" patches.
    """

    kind: str = "film"
    layers: tuple[str, ...] = ()
    k: int = 16
    rank: int = 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        if self.kind not in PATCH_KINDS:
            raise SpecError(f"unknown patch kind {self.kind!r}; allowed: {', '.join(PATCH_KINDS)}")
        if self.k < 1 or self.rank < 1:
            raise SpecError("patch k and rank must be >= 1")
        if not self.layers:
            raise SpecError("a patch spec needs at least one layer to attach to")

    def validate_against(self, spec: ModelSpec) -> None:
        for name in self.layers:
            layer = spec.layer(name)
            if layer.kind not in PATCHABLE_KINDS:
                raise SpecError(f"patches attach to {', '.join(PATCHABLE_KINDS)} layers; {name!r} is {layer.kind}")
        if spec.layers[-1].name in self.layers:
            raise SpecError("the head layer cannot carry a patch")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "layers": list(self.layers), "k": self.k, "rank": self.rank}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PatchSpec:
        try:
            return cls(str(data["kind"]), tuple(data["layers"]), int(data["k"]), int(data.get("rank", 4)))
        except (KeyError, TypeError) as exc:
            raise SpecError(f"malformed patch description: {exc}") from exc


# -- parameters ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamInfo:
    """A parameter's shape and, per axis, which droppable layer's kept set slices that axis.

    `axis_sources[i]` is None (never sliced), a layer name (axis indexes that layer's channels), or
    "flat:<layer>:<spatial>" for a dense input after flatten (channel-major blocks of `spatial`).
    `role` is "base" (W), "bar" (θ̄) or "basis" (Θ).
    """

    shape: tuple[int, ...]
    axis_sources: tuple[str | None, ...]
    role: str = "base"


def patch_parts(kind: str, channels: int, rank: int) -> dict[str, tuple[int, ...]]:
    """Shapes of one patch's parts on a layer with `channels` output channels."""
    if kind == "film":
        return {"scale": (channels,), "shift": (channels,)}
    return {"down": (rank, channels), "up": (channels, rank)}


def param_infos(spec: ModelSpec, patch: PatchSpec | None = None) -> dict[str, ParamInfo]:
    """Every parameter of the (patched) model in a fixed order, with its slicing axes."""
    if patch is not None:
        patch.validate_against(spec)
    infos: dict[str, ParamInfo] = {}
    shapes = spec.activation_shapes()
    in_channels, source = spec.input_shape[0], None  # `source`: layer whose kept set indexes channels
    flat_source: str | None = None
    for layer in spec.layers:
        n = layer.name
        if layer.kind in ("conv2d", "conv1d"):
            ks = (layer.kernel,) * spec.dims
            infos[f"{n}.weight"] = ParamInfo((layer.out, in_channels, *ks), (n, source, *(None,) * spec.dims))
            infos[f"{n}.bias"] = ParamInfo((layer.out,), (n,))
            in_channels, source = layer.out, n
        elif layer.kind == "dwconv2d":
            ks = (layer.kernel,) * 2
            infos[f"{n}.weight"] = ParamInfo((in_channels, 1, *ks), (source, None, None, None))
            infos[f"{n}.bias"] = ParamInfo((in_channels,), (source,))
        elif layer.kind == "norm":
            infos[f"{n}.weight"] = ParamInfo((in_channels,), (source,))
            infos[f"{n}.bias"] = ParamInfo((in_channels,), (source,))
        elif layer.kind == "flatten":
            prev = _shape_before(spec, n)
            spatial = 1
            for s in prev[1:]:
                spatial *= s
            flat_source = f"flat:{source}:{spatial}" if source is not None else None
            in_channels, source = shapes[n][0], None
        elif layer.kind == "dense":
            infos[f"{n}.weight"] = ParamInfo((layer.out, in_channels), (None, flat_source))
            infos[f"{n}.bias"] = ParamInfo((layer.out,), (None,))
            in_channels, flat_source = layer.out, None
        if patch is not None and n in patch.layers:
            channels = shapes[n][0]
            for part, shape in patch_parts(patch.kind, channels, patch.rank).items():
                axes = tuple(source if d == channels and _is_channel_axis(patch.kind, part, i) else None
                             for i, d in enumerate(shape))
                infos[f"{n}.patch.{part}"] = ParamInfo(shape, axes, "bar")
                infos[f"{n}.patch.{part}_basis"] = ParamInfo((*shape, patch.k), (*axes, None), "basis")
    return infos


def _is_channel_axis(kind: str, part: str, axis: int) -> bool:
    if kind == "film":
        return True
    return (part == "down" and axis == 1) or (part == "up" and axis == 0)


def _shape_before(spec: ModelSpec, name: str) -> tuple[int, ...]:
    shape = spec.input_shape
    for layer in spec.layers:
        if layer.name == name:
            return shape
        shape = spec.activation_shapes()[layer.name]
    raise SpecError(name)


def dumps(obj: ModelSpec | PatchSpec) -> str:
    return json.dumps(obj.to_dict(), sort_keys=True)
