"""The bundle manifest: one versioned schema, validated field by field at the boundary.

`manifest.json` arrives from outside (over the network, from a file someone handed the device), so
`Manifest.from_json` trusts nothing: every field is type-checked, cross-checked against the model
description, and every error names the field it is about (`variants[2].keep.conv1: ...`). Only numpy
(via the model description) and the standard library are used: the device reads this.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .manifest_fields import (
    _MODEL_ID_RE,
    _NAME_RE,
    _SHA_RE,
    BAKED_KINDS,
    INPUT_DTYPES,
    KNOWN_SCHEMA_VERSIONS,
    LAYOUTS,
    MANIFEST_NAME,
    REQUIRED_KINDS,
    SCHEMA_VERSION,
    SINGLE_KINDS,
    VARIANT_KINDS,
    BundleError,
    ManifestError,
    _bool,
    _int,
    _list,
    _loads_strict,
    _obj,
    _only_keys,
    _str,
    check_relative_path,
)
from .manifest_parts import (
    ArtifactEntry,
    InputSpec,
    LabelSpec,
    TrainConfig,
    VariantRow,
    artifact_runtime,
    split_kind,
)
from .model_spec import LayerSpec, ModelSpec, PatchSpec, SpecError, param_infos
from .weight_layout import LayoutError, check_layout

# The public names of the manifest schema live here, whichever of the three modules defines them.
__all__ = [
    "BAKED_KINDS", "INPUT_DTYPES", "KNOWN_SCHEMA_VERSIONS", "LAYOUTS", "MANIFEST_NAME", "REQUIRED_KINDS", "SCHEMA_VERSION",
    "SINGLE_KINDS", "VARIANT_KINDS", "ArtifactEntry", "BundleError", "InputSpec", "LabelSpec", "Manifest",
    "ManifestError", "TrainConfig", "VariantRow", "artifact_runtime", "check_relative_path", "manifest_summary", "split_kind",
]


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
            if entry.weights is not None:
                try:
                    shapes = {n: i.shape for n, i in param_infos(self.model, self.patch).items()}
                    check_layout(entry.weights, shapes, entry.bytes, f"{ctx}.weights")
                except LayoutError as exc:
                    raise ManifestError(str(exc)) from None
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
    _only_keys(d, "patch", ("kind", "layers", "k"), ("rank", "head_bias"))
    _str(d["kind"], "patch.kind")
    if "head_bias" in d:
        _bool(d["head_bias"], "patch.head_bias")
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
