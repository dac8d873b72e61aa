"""The bundle manifest: one versioned schema, validated field by field at the boundary.

`manifest.json` arrives from outside (over the network, from a file someone handed the device), so
`Manifest.from_json` trusts nothing: every field is type-checked, cross-checked against the model
description, and every error names the field it is about (`variants[2].keep.conv1: ...`). Only numpy
(via the model description) and the standard library are used: the device reads this.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import PurePosixPath
from typing import Any

from .model_spec import LayerSpec, ModelSpec, PatchSpec, SpecError
from .optim import AdamConfig
from .variants import Variant, filter_flops

SCHEMA_VERSION = 1
KNOWN_SCHEMA_VERSIONS = (1,)
MANIFEST_NAME = "manifest.json"

LAYOUTS = {"NCHW": 3, "NCL": 2}  # layout -> rank of the input without the batch
INPUT_DTYPES = ("float32",)
# Artifacts that exist once per bundle, and artifacts that exist once per variant ("<kind>:<vid>").
SINGLE_KINDS = (
    "params_base",  # npz: base weights W (role "base"); its sha256 is the bundle's base_version
    "params_shared",  # npz: shared patch parameters θ̄ (bar) and Θ (basis)
    "litert_trainable",  # .tflite with train_phi_/train_full_/infer_ signatures per variant
    "litert_infer",  # .tflite, frozen inference
    "executorch_infer",  # .pte, frozen inference (XNNPACK)
    "dse_front_png",  # plot of the DSE Pareto front
    "dse_table_json",  # the DSE's raw evaluations
    "report_json",  # free-form export report (timings, parity checks)
)
VARIANT_KINDS = ("executorch_train_phi", "executorch_train_full")
REQUIRED_KINDS = ("params_base", "params_shared")

_ID_RE = re.compile(r"^[a-z0-9-]+$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]+$")
_MODEL_ID_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_RUNTIME_RE = re.compile(r"^[a-z0-9_-]+$")


class BundleError(ValueError):
    """A bundle that must not be used: bad manifest, missing or tampered artifact, unsafe archive."""


class ManifestError(BundleError):
    """A manifest field that is missing, of the wrong type or inconsistent; the message names it."""


# -- strict readers for untrusted JSON ---------------------------------------------------------------


def _where(ctx: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{ctx}[{key}]"
    return f"{ctx}.{key}" if ctx else key


def _obj(value: Any, ctx: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ManifestError(f"{ctx or 'manifest'}: expected an object, got {type(value).__name__}")
    return value


def _only_keys(data: dict[str, Any], ctx: str, required: tuple[str, ...], optional: tuple[str, ...] = ()
               ) -> None:
    for key in required:
        if key not in data:
            raise ManifestError(f"{_where(ctx, key)}: missing required field")
    unknown = sorted(set(data) - set(required) - set(optional))
    if unknown:
        raise ManifestError(f"{ctx or 'manifest'}: unknown field(s) {unknown}")


def _str(value: Any, ctx: str, pattern: re.Pattern[str] | None = None) -> str:
    if not isinstance(value, str) or not value:
        raise ManifestError(f"{ctx}: expected a non-empty string, got {value!r}")
    if pattern is not None and not pattern.match(value):
        raise ManifestError(f"{ctx}: {value!r} does not match {pattern.pattern}")
    return value


def _int(value: Any, ctx: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):  # bool is an int in Python; refuse it
        raise ManifestError(f"{ctx}: expected an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ManifestError(f"{ctx}: must be >= {minimum}, got {value}")
    return value


def _float(value: Any, ctx: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ManifestError(f"{ctx}: expected a finite number, got {value!r}")
    return float(value)


def _bool(value: Any, ctx: str) -> bool:
    if not isinstance(value, bool):
        raise ManifestError(f"{ctx}: expected true or false, got {value!r}")
    return value


def _list(value: Any, ctx: str) -> list[Any]:
    if not isinstance(value, list):
        raise ManifestError(f"{ctx}: expected a list, got {type(value).__name__}")
    return value


def check_relative_path(path: str, ctx: str = "path") -> str:
    """A path inside the bundle: relative, POSIX, canonical, no '..' (no escaping the bundle)."""
    if not isinstance(path, str) or not path:
        raise ManifestError(f"{ctx}: expected a non-empty relative path, got {path!r}")
    if "\\" in path or "\x00" in path or (len(path) > 1 and path[1] == ":"):
        raise ManifestError(f"{ctx}: {path!r} must be a POSIX path without backslashes or drive letters")
    pure = PurePosixPath(path)
    if pure.is_absolute():
        raise ManifestError(f"{ctx}: {path!r} is absolute; artifact paths must be relative to the bundle")
    if ".." in pure.parts:
        raise ManifestError(f"{ctx}: {path!r} contains '..' (path traversal)")
    if str(pure) != path or path.startswith("./"):
        raise ManifestError(f"{ctx}: {path!r} is not in canonical form (expected {str(pure)!r})")
    if path == MANIFEST_NAME:
        raise ManifestError(f"{ctx}: an artifact cannot be named {MANIFEST_NAME}")
    return path


def _loads_strict(text: str | bytes) -> Any:
    """json.loads that refuses duplicate keys and NaN/Infinity (both ways to smuggle ambiguity in)."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise ManifestError(f"manifest: duplicate key {key!r}")
            out[key] = value
        return out

    def no_constants(name: str) -> Any:
        raise ManifestError(f"manifest: {name} is not valid JSON")

    try:
        return json.loads(text, object_pairs_hook=no_duplicates, parse_constant=no_constants)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"manifest: not valid JSON ({exc})") from exc


# -- the parts of a manifest ------------------------------------------------------------------------


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
        if self.memory_bytes is not None and self.memory_bytes < 0:
            raise ManifestError(f"{ctx}.memory_bytes: must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "keep": dict(self.keep), "widths": dict(self.widths),
                "flops_ratio": self.flops_ratio, "train_ms": dict(self.train_ms),
                "infer_ms": dict(self.infer_ms), "memory_bytes": self.memory_bytes,
                "convergence": self.convergence, "pareto": self.pareto}

    @classmethod
    def from_dict(cls, data: Any, ctx: str) -> VariantRow:
        d = _obj(data, ctx)
        _only_keys(d, ctx, ("id", "keep", "widths", "flops_ratio"),
                   ("train_ms", "infer_ms", "memory_bytes", "convergence", "pareto"))

        def table(key: str, parse: Any) -> dict[str, Any]:
            raw = _obj(d.get(key, {}), _where(ctx, key))
            return {_str(k, _where(ctx, key)): parse(v, _where(_where(ctx, key), k)) for k, v in raw.items()}

        memory, conv = d.get("memory_bytes"), d.get("convergence")
        return cls(
            id=_str(d["id"], _where(ctx, "id"), _ID_RE),
            keep=table("keep", _float), widths=table("widths", lambda v, c: _int(v, c, 1)),
            flops_ratio=_float(d["flops_ratio"], _where(ctx, "flops_ratio")),
            train_ms=table("train_ms", _float), infer_ms=table("infer_ms", _float),
            memory_bytes=None if memory is None else _int(memory, _where(ctx, "memory_bytes"), 0),
            convergence=None if conv is None else _float(conv, _where(ctx, "convergence")),
            pareto=_bool(d.get("pareto", False), _where(ctx, "pareto")),
        )


@dataclass(frozen=True)
class ArtifactEntry:
    """A file of the bundle: where it is (relative), what it is, and its expected size and sha256."""

    path: str
    sha256: str
    bytes: int
    kind: str

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "bytes": self.bytes, "kind": self.kind}

    @classmethod
    def from_dict(cls, data: Any, ctx: str) -> ArtifactEntry:
        d = _obj(data, ctx)
        _only_keys(d, ctx, ("path", "sha256", "bytes", "kind"))
        return cls(check_relative_path(d["path"], _where(ctx, "path")),
                   _str(d["sha256"], _where(ctx, "sha256"), _SHA_RE),
                   _int(d["bytes"], _where(ctx, "bytes"), 0), _str(d["kind"], _where(ctx, "kind")))


def split_kind(kind: str) -> tuple[str, str | None]:
    """'executorch_train_phi:k100-50' -> ('executorch_train_phi', 'k100-50'); 'litert_infer' -> (.., None)."""
    base, _, vid = kind.partition(":")
    return base, (vid or None)


# -- the manifest -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Manifest:
    model_id: str
    base_version: str  # sha256 hex of the params_base artifact's bytes
    created: str  # ISO 8601 with a timezone
    input: InputSpec
    labels: LabelSpec
    model: ModelSpec
    patch: PatchSpec
    train: TrainConfig
    variants: tuple[VariantRow, ...]
    artifacts: dict[str, ArtifactEntry]
    meta: dict[str, Any] = field(default_factory=dict)  # free-form provenance (exporter, DSE budget…)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "variants", tuple(self.variants))
        self.validate()

    def validate(self) -> None:
        """Cross-field checks: everything that a well-typed but inconsistent manifest could get wrong."""
        if self.schema_version not in KNOWN_SCHEMA_VERSIONS:
            raise ManifestError(_unknown_version(self.schema_version))
        _str(self.model_id, "model_id", _MODEL_ID_RE)
        _str(self.base_version, "base_version", _SHA_RE)
        _check_time(self.created)
        if self.input.shape != self.model.input_shape:
            raise ManifestError(f"input.shape: {list(self.input.shape)} differs from the model's "
                                f"{list(self.model.input_shape)}")
        if self.labels.num_classes != self.model.num_classes:
            raise ManifestError(f"labels.num_classes: {self.labels.num_classes} differs from the model's "
                                f"{self.model.num_classes}")
        try:
            self.patch.validate_against(self.model)
        except SpecError as exc:
            raise ManifestError(f"patch: {exc}") from exc
        self._validate_variants()
        self._validate_artifacts()

    def _validate_variants(self) -> None:
        if not self.variants:
            raise ManifestError("variants: the table is empty; it needs at least the full variant")
        seen: set[str] = set()
        for i, row in enumerate(self.variants):
            row.validate_against(self.model, f"variants[{i}]")
            if row.id in seen:
                raise ManifestError(f"variants[{i}].id: duplicate id {row.id!r}")
            seen.add(row.id)
        if not any(row.variant.is_full(self.model) for row in self.variants):
            raise ManifestError("variants: no full variant (every layer kept at 1.0); the device needs one "
                                "to fall back on")

    def _validate_artifacts(self) -> None:
        ids = {row.id for row in self.variants}
        paths: dict[str, str] = {}
        kinds: dict[str, str] = {}
        for name, entry in self.artifacts.items():
            ctx = f"artifacts.{name}"
            if not _NAME_RE.match(name):
                raise ManifestError(f"{ctx}: artifact name must match {_NAME_RE.pattern}")
            check_relative_path(entry.path, f"{ctx}.path")
            _str(entry.sha256, f"{ctx}.sha256", _SHA_RE)
            base, vid = split_kind(entry.kind)
            if vid is None and base not in SINGLE_KINDS:
                raise ManifestError(f"{ctx}.kind: unknown kind {entry.kind!r}; known: {list(SINGLE_KINDS)} "
                                    f"and {[k + ':<variant id>' for k in VARIANT_KINDS]}")
            if vid is not None and (base not in VARIANT_KINDS or vid not in ids):
                raise ManifestError(f"{ctx}.kind: {entry.kind!r} must be one of {list(VARIANT_KINDS)} "
                                    f"followed by ':' and a variant id in the table {sorted(ids)}")
            if entry.path in paths:
                raise ManifestError(f"{ctx}.path: {entry.path!r} is also the path of {paths[entry.path]!r}")
            if entry.kind in kinds:
                raise ManifestError(f"{ctx}.kind: {entry.kind!r} appears twice (also {kinds[entry.kind]!r})")
            paths[entry.path], kinds[entry.kind] = name, name
        for kind in REQUIRED_KINDS:
            if kind not in kinds:
                raise ManifestError(f"artifacts: no artifact of kind {kind!r} (required)")
        base_sha = self.artifacts[kinds["params_base"]].sha256
        if self.base_version != base_sha:
            raise ManifestError(f"base_version: {self.base_version} is not the sha256 of the params_base "
                                f"artifact ({base_sha})")

    # -- lookups ------------------------------------------------------------------------------------
    def variant_row(self, variant_id: str) -> VariantRow:
        for row in self.variants:
            if row.id == variant_id:
                return row
        raise BundleError(f"no variant {variant_id!r} in the table; known: {[r.id for r in self.variants]}")

    def artifacts_of_kind(self, kind: str) -> list[str]:
        return [name for name, entry in self.artifacts.items() if entry.kind == kind]

    # -- JSON round trip ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version, "model_id": self.model_id,
            "base_version": self.base_version, "created": self.created,
            "input": self.input.to_dict(), "labels": self.labels.to_dict(),
            "model": self.model.to_dict(), "patch": self.patch.to_dict(), "train": self.train.to_dict(),
            "variants": [row.to_dict() for row in self.variants],
            "artifacts": {name: entry.to_dict() for name, entry in self.artifacts.items()},
            "meta": self.meta,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        return cls.from_dict(_loads_strict(text))

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        d = _obj(data, "")
        # The version first: a newer schema may have changed everything else, so report that, not a
        # confusing complaint about some field.
        if "schema_version" not in d:
            raise ManifestError("schema_version: missing required field")
        version = _int(d["schema_version"], "schema_version")
        if version not in KNOWN_SCHEMA_VERSIONS:
            raise ManifestError(_unknown_version(version))
        _only_keys(d, "", ("schema_version", "model_id", "base_version", "created", "input", "labels",
                           "model", "patch", "train", "variants", "artifacts"), ("meta",))
        artifacts = _obj(d["artifacts"], "artifacts")
        return cls(
            model_id=_str(d["model_id"], "model_id", _MODEL_ID_RE),
            base_version=_str(d["base_version"], "base_version", _SHA_RE),
            created=_check_time(d["created"]),
            input=InputSpec.from_dict(d["input"]),
            labels=LabelSpec.from_dict(d["labels"]),
            model=_parse_model(d["model"]),
            patch=_parse_patch(d["patch"]),
            train=TrainConfig.from_dict(d["train"]),
            variants=tuple(VariantRow.from_dict(row, f"variants[{i}]")
                           for i, row in enumerate(_list(d["variants"], "variants"))),
            artifacts={_str(name, "artifacts"): ArtifactEntry.from_dict(entry, f"artifacts.{name}")
                       for name, entry in artifacts.items()},
            meta=_obj(d.get("meta", {}), "meta"),
            schema_version=version,
        )


def _unknown_version(version: object) -> str:
    return (f"schema_version: unsupported manifest schema version {version!r}; this build knows "
            f"{list(KNOWN_SCHEMA_VERSIONS)} (update the device software or re-export the bundle)")


def _check_time(value: Any) -> str:
    text = _str(value, "created")
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError as exc:
        raise ManifestError(f"created: {text!r} is not an ISO 8601 time") from exc
    if parsed.tzinfo is None:
        raise ManifestError(f"created: {text!r} has no timezone")
    return text


def _parse_model(data: Any) -> ModelSpec:
    d = _obj(data, "model")
    _only_keys(d, "model", ("name", "input_shape", "num_classes", "layers"))
    _str(d["name"], "model.name")
    for i, v in enumerate(_list(d["input_shape"], "model.input_shape")):
        _int(v, f"model.input_shape[{i}]", 1)
    _int(d["num_classes"], "model.num_classes")
    for i, layer in enumerate(_list(d["layers"], "model.layers")):
        ctx = f"model.layers[{i}]"
        fields = _obj(layer, ctx)
        _only_keys(fields, ctx, ("kind", "name"), tuple(LayerSpec.__dataclass_fields__))
        _str(fields["kind"], f"{ctx}.kind")
        _str(fields["name"], f"{ctx}.name")
        for key in ("out", "kernel", "stride"):
            if key in fields:
                _int(fields[key], f"{ctx}.{key}")
    try:
        return ModelSpec.from_dict(d)
    except SpecError as exc:
        raise ManifestError(f"model: {exc}") from exc


def _parse_patch(data: Any) -> PatchSpec:
    d = _obj(data, "patch")
    _only_keys(d, "patch", ("kind", "layers", "k"), ("rank",))
    _str(d["kind"], "patch.kind")
    for i, v in enumerate(_list(d["layers"], "patch.layers")):
        _str(v, f"patch.layers[{i}]")
    _int(d["k"], "patch.k", 1)
    _int(d.get("rank", 4), "patch.rank", 1)
    try:
        return PatchSpec.from_dict(d)
    except SpecError as exc:
        raise ManifestError(f"patch: {exc}") from exc


def manifest_summary(manifest: Manifest) -> dict[str, Any]:
    """The human-facing gist of a manifest (for `edgepatch inspect`)."""
    return {
        "schema_version": manifest.schema_version, "model_id": manifest.model_id,
        "base_version": manifest.base_version, "created": manifest.created,
        "model": manifest.model.name, "input": manifest.input.to_dict(), "labels": manifest.labels.to_dict(),
        "patch": manifest.patch.to_dict(), "train": manifest.train.to_dict(),
    }
