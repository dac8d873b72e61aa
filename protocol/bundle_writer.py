"""Writing a bundle: artifacts first, manifest last, all in a staging directory renamed into place.

A reader (a device, the cloud publisher) therefore sees either the previous complete bundle or the new
complete one. The writer computes every size and sha256 itself, derives `base_version` from the base
parameter file, validates the manifest with the same strict code the device uses, and re-opens the
staged bundle with `load_bundle(verify=True)` before publishing it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from edgepatch.protocol.bundle import load_bundle
from edgepatch.protocol.manifest import (
    MANIFEST_NAME,
    ArtifactEntry,
    BundleError,
    InputSpec,
    LabelSpec,
    Manifest,
    TrainConfig,
    VariantRow,
    check_relative_path,
    split_kind,
)
from edgepatch.protocol.model_spec import ModelSpec, PatchSpec, param_infos
from edgepatch.protocol.params import params_to_bytes

# Where each kind of artifact goes unless the caller says otherwise.
DEFAULT_PATHS = {
    "params_base": "params_base.npz",
    "params_shared": "params_shared.npz",
    "params_delta": "params_delta.npz",
    "litert_trainable": "trainable.tflite",
    "litert_infer": "infer.tflite",
    "litert_phi_const": "phi_const.tflite",
    "executorch_infer": "infer.pte",
    "executorch_train_phi": "train_phi_{vid}.pte",
    "executorch_train_full": "train_full_{vid}.pte",
    "dse_front_png": "dse_front.png",
    "dse_table_json": "dse_table.json",
    "report_json": "report.json",
}
_CHUNK = 1 << 20


@dataclass(frozen=True)
class _Pending:
    kind: str
    path: str
    data: bytes | None = None
    source: Path | None = None
    weights: dict[str, Any] | None = None  # a frozen program's weight layout (protocol/weight_layout.py)


class BundleWriter:
    """Collect a bundle's parts, then `finish()` writes and verifies it.

    Usage: `w = BundleWriter(out); w.set_model(spec, patch); w.add_params(params);
    w.set_variants(rows); w.add_file("litert_trainable", path); manifest = w.finish()`.
    """

    def __init__(self, out_dir: str | Path, model_id: str | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.model_id = model_id
        self.model: ModelSpec | None = None
        self.patch: PatchSpec | None = None
        self.input: InputSpec | None = None
        self.labels: LabelSpec | None = None
        self.train = TrainConfig()
        self.variants: list[VariantRow] = []
        self.meta: dict[str, Any] = {}
        self._pending: dict[str, _Pending] = {}

    # -- manifest fields ----------------------------------------------------------------------------
    def set_model(self, spec: ModelSpec, patch: PatchSpec) -> BundleWriter:
        self.model, self.patch = spec, patch
        return self

    def set_input(self, spec: InputSpec) -> BundleWriter:
        self.input = spec
        return self

    def set_labels(self, labels: LabelSpec) -> BundleWriter:
        self.labels = labels
        return self

    def set_train(self, train: TrainConfig) -> BundleWriter:
        self.train = train
        return self

    def set_variants(self, rows: Iterable[VariantRow]) -> BundleWriter:
        self.variants = list(rows)
        return self

    def add_variant(self, row: VariantRow) -> BundleWriter:
        self.variants.append(row)
        return self

    def set_meta(self, **values: Any) -> BundleWriter:
        self.meta.update(values)
        return self

    # -- artifacts ----------------------------------------------------------------------------------
    def add_bytes(self, kind: str, data: bytes, name: str | None = None, path: str | None = None,
                  weights: Mapping[str, Any] | None = None) -> BundleWriter:
        """`weights`: where the program holds each parameter, for frozen programs (rewritable in place)."""
        return self._add(kind, name, path, _Pending(kind, "", data=bytes(data), weights=_copy(weights)))

    def add_file(self, kind: str, source: str | Path, name: str | None = None, path: str | None = None,
                 weights: Mapping[str, Any] | None = None) -> BundleWriter:
        source = Path(source)
        if not source.is_file():
            raise BundleError(f"artifact {name or kind!r}: {source} is not a file")
        return self._add(kind, name, path, _Pending(kind, "", source=source, weights=_copy(weights)))

    def add_params(self, params: Mapping[str, np.ndarray]) -> BundleWriter:
        """Split a full parameter set by role: W → params_base, θ̄ and Θ → params_shared."""
        if self.model is None or self.patch is None:
            raise BundleError("set_model(spec, patch) before add_params")
        infos = param_infos(self.model, self.patch)
        missing = sorted(set(infos) - set(params))
        if missing:
            raise BundleError(f"add_params: parameters missing: {missing}")
        base = {n: params[n] for n, info in infos.items() if info.role == "base"}
        shared = {n: params[n] for n, info in infos.items() if info.role != "base"}
        self.add_bytes("params_base", params_to_bytes(base))
        return self.add_bytes("params_shared", params_to_bytes(shared))

    def _add(self, kind: str, name: str | None, path: str | None, pending: _Pending) -> BundleWriter:
        base, vid = split_kind(kind)
        if base not in DEFAULT_PATHS:
            raise BundleError(f"unknown artifact kind {kind!r}; known: {sorted(DEFAULT_PATHS)}")
        name = name or kind.replace(":", "_")
        rel = path or DEFAULT_PATHS[base].format(vid=vid)
        check_relative_path(rel, f"artifacts.{name}.path")
        self._pending[name] = _Pending(kind, rel, pending.data, pending.source, pending.weights)
        return self

    # -- writing ------------------------------------------------------------------------------------
    def finish(self, created: str | None = None) -> Manifest:
        """Write everything into a staging dir, verify it as a device would, then rename into place."""
        if self.model is None or self.patch is None:
            raise BundleError("set_model(spec, patch) before finish")
        self._check_destination()
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.staging-", dir=self.out_dir.parent))
        try:
            entries = {name: _write_artifact(staging, p) for name, p in self._pending.items()}
            base_names = [n for n, e in entries.items() if e.kind == "params_base"]
            if not base_names:
                raise BundleError("no params_base artifact: call add_params (base_version is its sha256)")
            manifest = Manifest(
                model_id=self.model_id or self.model.name,
                base_version=entries[base_names[0]].sha256,
                created=created or datetime.now(UTC).isoformat(timespec="seconds"),
                input=self.input or InputSpec.for_model(self.model),
                labels=self.labels or LabelSpec(self.model.num_classes),
                model=self.model, patch=self.patch, train=self.train,
                variants=tuple(self.variants), artifacts=entries, meta=dict(self.meta),
            )
            _write_synced(staging / MANIFEST_NAME, manifest.to_json().encode())  # last: marks it complete
            load_bundle(staging, verify=True).close()
            self._publish(staging)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
        return manifest

    def _check_destination(self) -> None:
        out = self.out_dir
        if out.exists() and not out.is_dir():
            raise BundleError(f"{out} exists and is not a directory; refusing to overwrite it")
        if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
            raise BundleError(f"{out} is a non-empty directory that is not a bundle (no {MANIFEST_NAME}); "
                              f"refusing to overwrite it")

    def _publish(self, staging: Path) -> None:
        out = self.out_dir
        if out.exists():
            # Two renames: the old bundle moves aside only once the new one is complete and verified.
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(staging, out)
            shutil.rmtree(old)
        else:
            os.replace(staging, out)
        _fsync_dir(out.parent)


def _write_artifact(root: Path, pending: _Pending) -> ArtifactEntry:
    target = root / pending.path
    target.parent.mkdir(parents=True, exist_ok=True)
    digest, size = hashlib.sha256(), 0
    with open(target, "wb") as dst:
        if pending.data is not None:
            dst.write(pending.data)
            digest.update(pending.data)
            size = len(pending.data)
        else:
            assert pending.source is not None
            with open(pending.source, "rb") as src:
                while chunk := src.read(_CHUNK):
                    dst.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
        dst.flush()
        os.fsync(dst.fileno())
    return ArtifactEntry(pending.path, digest.hexdigest(), size, pending.kind, pending.weights)


def _copy(weights: Mapping[str, Any] | None) -> dict[str, Any] | None:
    return None if weights is None else {name: [list(spot) for spot in spots] for name, spots in weights.items()}


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pack_bundle(bundle_dir: str | Path, archive: str | Path) -> Path:
    """A single .tar.gz of a (verified) bundle: manifest plus exactly the artifacts it names."""
    with load_bundle(bundle_dir, verify=True) as bundle:
        archive = Path(archive)
        tmp = archive.with_name(f".{archive.name}.tmp-{os.getpid()}")
        try:
            with tarfile.open(tmp, "w:gz") as tf:
                tf.add(bundle.root / MANIFEST_NAME, arcname=MANIFEST_NAME)
                for name, entry in sorted(bundle.manifest.artifacts.items()):
                    tf.add(bundle.artifact_path(name), arcname=entry.path)
            os.replace(tmp, archive)
        finally:
            if tmp.exists():
                tmp.unlink()
    return archive
