"""The parts of a manifest: input, labels, training config, the variant table rows and the artifact
entries, each read strictly from untrusted JSON (manifest_fields) and written back by `to_dict`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .manifest_fields import (
    _ID_RE,
    _RUNTIME_RE,
    _SHA_RE,
    INPUT_DTYPES,
    LAYOUTS,
    ManifestError,
    _bool,
    _float,
    _int,
    _list,
    _obj,
    _only_keys,
    _str,
    _where,
    check_relative_path,
)
from .model_spec import ModelSpec
from .optim import AdamConfig
from .variants import Variant, filter_flops


@dataclass(frozen=True)
class InputSpec:
    """What the model eats, without the batch: channel-first shape, dtype, optional normalization."""

    shape: tuple[int, ...]
    layout: str
    dtype: str = "float32"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ManifestError(f"input.layout: {self.layout!r} is not one of {sorted(LAYOUTS)}")
        if len(self.shape) != LAYOUTS[self.layout] or min(self.shape, default=0) < 1:
            raise ManifestError(f"input.shape: {list(self.shape)} does not fit layout {self.layout} "
                                f"(batch excluded, every dimension >= 1)")
        if self.dtype not in INPUT_DTYPES:
            raise ManifestError(f"input.dtype: {self.dtype!r} is not one of {list(INPUT_DTYPES)}")
        if (self.mean is None) != (self.std is None):
            raise ManifestError("input.mean/input.std: give both or neither")
        for key, values in (("mean", self.mean), ("std", self.std)):
            if values is not None and len(values) != self.shape[0]:
                raise ManifestError(f"input.{key}: needs one value per channel ({self.shape[0]}), "
                                    f"got {len(values)}")
        if self.std is not None and min(self.std) <= 0.0:
            raise ManifestError("input.std: every value must be > 0")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"shape": list(self.shape), "layout": self.layout, "dtype": self.dtype}
        if self.mean is not None and self.std is not None:
            out["mean"], out["std"] = list(self.mean), list(self.std)
        return out

    @classmethod
    def from_dict(cls, data: Any, ctx: str = "input") -> InputSpec:
        d = _obj(data, ctx)
        _only_keys(d, ctx, ("shape", "layout"), ("dtype", "mean", "std"))
        shape = tuple(_int(v, _where(_where(ctx, "shape"), i), 1)
                      for i, v in enumerate(_list(d["shape"], _where(ctx, "shape"))))
        norm: dict[str, tuple[float, ...] | None] = {}
        for key in ("mean", "std"):
            raw = d.get(key)
            norm[key] = None if raw is None else tuple(
                _float(v, _where(_where(ctx, key), i)) for i, v in enumerate(_list(raw, _where(ctx, key))))
        return cls(shape, _str(d["layout"], _where(ctx, "layout")),
                   _str(d.get("dtype", "float32"), _where(ctx, "dtype")), norm["mean"], norm["std"])

    @classmethod
    def for_model(cls, spec: ModelSpec, mean: tuple[float, ...] | None = None,
                  std: tuple[float, ...] | None = None) -> InputSpec:
        return cls(spec.input_shape, "NCHW" if spec.dims == 2 else "NCL", "float32", mean, std)


@dataclass(frozen=True)
class LabelSpec:
    num_classes: int
    names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise ManifestError(f"labels.num_classes: must be >= 2, got {self.num_classes}")
        if self.names is not None and len(self.names) != self.num_classes:
            raise ManifestError(f"labels.names: {len(self.names)} names for {self.num_classes} classes")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"num_classes": self.num_classes}
        if self.names is not None:
            out["names"] = list(self.names)
        return out

    @classmethod
    def from_dict(cls, data: Any, ctx: str = "labels") -> LabelSpec:
        d = _obj(data, ctx)
        _only_keys(d, ctx, ("num_classes",), ("names",))
        names = d.get("names")
        parsed = None if names is None else tuple(
            _str(v, _where(_where(ctx, "names"), i)) for i, v in enumerate(_list(names, _where(ctx, "names"))))
        return cls(_int(d["num_classes"], _where(ctx, "num_classes")), parsed)


@dataclass(frozen=True)
class TrainConfig:
    """How a device trains: fixed batch of the training programs, inference batch, Adam, φ's lr."""

    batch: int = 32
    infer_batch: int = 1
    adam: AdamConfig = field(default_factory=AdamConfig)
    phi_lr: float = 0.05

    def __post_init__(self) -> None:
        if self.batch < 1 or self.infer_batch < 1:
            raise ManifestError("train.batch/train.infer_batch: must be >= 1")
        a = self.adam
        if not (a.lr > 0 and 0 <= a.beta1 < 1 and 0 <= a.beta2 < 1 and a.eps > 0):
            raise ManifestError(f"train.adam: needs lr > 0, 0 <= beta1, beta2 < 1, eps > 0; got {a}")
        if not self.phi_lr > 0:
            raise ManifestError(f"train.phi_lr: must be > 0, got {self.phi_lr}")

    def to_dict(self) -> dict[str, Any]:
        a = self.adam
        return {"batch": self.batch, "infer_batch": self.infer_batch, "phi_lr": self.phi_lr,
                "adam": {"lr": a.lr, "beta1": a.beta1, "beta2": a.beta2, "eps": a.eps}}

    @classmethod
    def from_dict(cls, data: Any, ctx: str = "train") -> TrainConfig:
        d = _obj(data, ctx)
        _only_keys(d, ctx, ("batch", "infer_batch", "adam", "phi_lr"))
        actx = _where(ctx, "adam")
        a = _obj(d["adam"], actx)
        _only_keys(a, actx, ("lr", "beta1", "beta2", "eps"))
        adam = AdamConfig(*(_float(a[k], _where(actx, k)) for k in ("lr", "beta1", "beta2", "eps")))
        return cls(_int(d["batch"], _where(ctx, "batch"), 1), _int(d["infer_batch"], _where(ctx, "infer_batch"), 1),
                   adam, _float(d["phi_lr"], _where(ctx, "phi_lr")))


@dataclass(frozen=True)
class VariantRow:
    """One row of the variant table (the DSE's output). Unmeasured cells: empty dicts / None."""

    id: str
    keep: dict[str, float]
    widths: dict[str, int]
    flops_ratio: float
    train_ms: dict[str, float] = field(default_factory=dict)
    infer_ms: dict[str, float] = field(default_factory=dict)
    memory_bytes: int | None = None
    convergence: float | None = None  # mean loss after the DSE budget; lower is better
    pareto: bool = False
    convergence_std: float | None = None  # spread of `convergence` over the DSE's seeds; None = unknown

    def __post_init__(self) -> None:
        # Plain Python numbers: rows often come from numpy (the DSE), which json cannot serialize.
        object.__setattr__(self, "keep", {str(k): float(v) for k, v in self.keep.items()})
        object.__setattr__(self, "widths", {str(k): int(v) for k, v in self.widths.items()})
        object.__setattr__(self, "flops_ratio", float(self.flops_ratio))
        object.__setattr__(self, "train_ms", {str(k): float(v) for k, v in self.train_ms.items()})
        object.__setattr__(self, "infer_ms", {str(k): float(v) for k, v in self.infer_ms.items()})
        if self.memory_bytes is not None:
            object.__setattr__(self, "memory_bytes", int(self.memory_bytes))
        if self.convergence is not None:
            object.__setattr__(self, "convergence", float(self.convergence))
        if self.convergence_std is not None:
            object.__setattr__(self, "convergence_std", float(self.convergence_std))
        object.__setattr__(self, "pareto", bool(self.pareto))

    @property
    def variant(self) -> Variant:
        return Variant(self.id, dict(self.keep))

    @classmethod
    def for_variant(cls, spec: ModelSpec, variant: Variant, **measured: Any) -> VariantRow:
        """A row whose derived cells (widths, flops_ratio) are computed from the model description."""
        ratio = filter_flops(variant.spec(spec)) / filter_flops(spec)
        return cls(variant.id, dict(variant.keep), variant.widths(spec), ratio, **measured)

    def validate_against(self, spec: ModelSpec, ctx: str) -> None:
        if not _ID_RE.match(self.id):
            raise ManifestError(f"{ctx}.id: {self.id!r} must match [a-z0-9-]+")
        droppable = spec.droppable_layers()
        for layer, ratio in self.keep.items():
            if layer not in droppable:
                raise ManifestError(f"{ctx}.keep.{layer}: not a droppable layer of {spec.name!r} "
                                    f"(droppable: {droppable})")
            if not 0.0 < ratio <= 1.0:
                raise ManifestError(f"{ctx}.keep.{layer}: ratio must be in (0, 1], got {ratio}")
        expected = self.variant.widths(spec)
        if self.widths != expected:
            raise ManifestError(f"{ctx}.widths: {self.widths} do not follow from keep (expected {expected})")
        if not 0.0 < self.flops_ratio <= 1.0:
            raise ManifestError(f"{ctx}.flops_ratio: must be in (0, 1], got {self.flops_ratio}")
        for key, table in (("train_ms", self.train_ms), ("infer_ms", self.infer_ms)):
            for runtime, ms in table.items():
                if not _RUNTIME_RE.match(runtime):
                    raise ManifestError(f"{ctx}.{key}: runtime name {runtime!r} must match [a-z0-9_-]+")
                if not (math.isfinite(ms) and ms >= 0):
                    raise ManifestError(f"{ctx}.{key}.{runtime}: must be a finite number >= 0, got {ms}")
        if self.convergence is not None and not math.isfinite(self.convergence):
            raise ManifestError(f"{ctx}.convergence: must be finite or null, got {self.convergence}")
        if self.convergence_std is not None and not (math.isfinite(self.convergence_std)
                                                     and self.convergence_std >= 0):
            raise ManifestError(f"{ctx}.convergence_std: must be a finite number >= 0 or null, "
                                f"got {self.convergence_std}")
        if self.memory_bytes is not None and self.memory_bytes < 0:
            raise ManifestError(f"{ctx}.memory_bytes: must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "keep": dict(self.keep), "widths": dict(self.widths),
                "flops_ratio": self.flops_ratio, "train_ms": dict(self.train_ms),
                "infer_ms": dict(self.infer_ms), "memory_bytes": self.memory_bytes,
                "convergence": self.convergence, "pareto": self.pareto,
                # only when known: tables without it serialize byte-identically to before
                **({} if self.convergence_std is None else {"convergence_std": self.convergence_std})}

    @classmethod
    def from_dict(cls, data: Any, ctx: str) -> VariantRow:
        d = _obj(data, ctx)
        _only_keys(d, ctx, ("id", "keep", "widths", "flops_ratio"),
                   ("train_ms", "infer_ms", "memory_bytes", "convergence", "pareto", "convergence_std"))

        def table(key: str, parse: Any) -> dict[str, Any]:
            raw = _obj(d.get(key, {}), _where(ctx, key))
            return {_str(k, _where(ctx, key)): parse(v, _where(_where(ctx, key), k)) for k, v in raw.items()}

        memory, conv, conv_std = d.get("memory_bytes"), d.get("convergence"), d.get("convergence_std")
        return cls(
            id=_str(d["id"], _where(ctx, "id"), _ID_RE),
            keep=table("keep", _float), widths=table("widths", lambda v, c: _int(v, c, 1)),
            flops_ratio=_float(d["flops_ratio"], _where(ctx, "flops_ratio")),
            train_ms=table("train_ms", _float), infer_ms=table("infer_ms", _float),
            memory_bytes=None if memory is None else _int(memory, _where(ctx, "memory_bytes"), 0),
            convergence=None if conv is None else _float(conv, _where(ctx, "convergence")),
            pareto=_bool(d.get("pareto", False), _where(ctx, "pareto")),
            convergence_std=None if conv_std is None else _float(conv_std, _where(ctx, "convergence_std")),
        )


@dataclass(frozen=True)
class ArtifactEntry:
    """A file of the bundle: where it is (relative), what it is, and its expected size and sha256."""

    path: str
    sha256: str
    bytes: int
    kind: str
    # Frozen programs: where each weight sits in the file (protocol/weight_layout.py), so the cloud and
    # devices can write new weights in place instead of reconverting / downloading. Checked by Manifest.
    weights: dict[str, Any] | None = field(default=None, compare=False, hash=False)

    def to_dict(self) -> dict[str, Any]:
        out = {"path": self.path, "sha256": self.sha256, "bytes": self.bytes, "kind": self.kind}
        return out if self.weights is None else {**out, "weights": self.weights}

    @classmethod
    def from_dict(cls, data: Any, ctx: str) -> ArtifactEntry:
        d = _obj(data, ctx)
        _only_keys(d, ctx, ("path", "sha256", "bytes", "kind"), ("weights",))
        weights = d.get("weights")
        if weights is not None:
            weights = _obj(weights, _where(ctx, "weights"))
        return cls(check_relative_path(d["path"], _where(ctx, "path")),
                   _str(d["sha256"], _where(ctx, "sha256"), _SHA_RE),
                   _int(d["bytes"], _where(ctx, "bytes"), 0), _str(d["kind"], _where(ctx, "kind")), weights)

    @property
    def runtime(self) -> str | None:
        """The runtime that runs this artifact ('litert', 'executorch'); None = every device needs it
        (parameters) or no device does (reports)."""
        return artifact_runtime(self.kind)


def artifact_runtime(kind: str) -> str | None:
    base = split_kind(kind)[0]
    return next((rt for rt in ("litert", "executorch") if base.startswith(rt + "_")), None)


def split_kind(kind: str) -> tuple[str, str | None]:
    """'executorch_train_phi:k100-50' -> ('executorch_train_phi', 'k100-50'); 'litert_infer' -> (.., None)."""
    base, _, vid = kind.partition(":")
    return base, (vid or None)
