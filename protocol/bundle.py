"""Reading a bundle on the device: verify everything before trusting anything.

`load_bundle` parses the manifest strictly (protocol/manifest.py), then checks every artifact's size and
sha256; one flipped byte anywhere is a `BundleError` that names the file. Archives (.tar, .tar.gz, .zip)
are unpacked into a private temp directory, refusing links, special files and paths that would escape it.
`ActiveBundleStore` keeps the last good bundle: a candidate is verified (twice: as given, and as copied)
before a small pointer file is atomically switched to it, so a bad bundle never replaces a good one.

numpy and the standard library only (the device never imports torch or tensorflow).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .bundle_archive import ARCHIVE_SUFFIXES, unpack
from .manifest import (
    MANIFEST_NAME,
    BundleError,
    Manifest,
    ManifestError,
    VariantRow,
    artifact_runtime,
    check_relative_path,
    manifest_summary,
)
from .model_spec import ModelSpec, PatchSpec
from .params import Params, ParamsError, check_params, params_from_bytes, write_atomic
from .variants import Variant

__all__ = ["ActiveBundleStore", "Bundle", "BundleError", "ManifestError", "load_bundle", "sha256_file"]

MAX_MANIFEST_BYTES = 4 << 20  # a manifest is a few kB; refuse to parse something absurd
# In a device's copy: the one runtime whose programs it holds (device/fetch.py skips the other runtime's).
RUNTIME_MARKER = "device-runtime"
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class Bundle:
    """A verified bundle on disk. Archives are unpacked into a temp dir owned by this object."""

    def __init__(self, root: Path, manifest: Manifest, manifest_sha256: str,
                 tempdir: tempfile.TemporaryDirectory[str] | None = None) -> None:
        self.root = root
        self.manifest = manifest
        self.version = manifest_sha256  # sha256 of manifest.json: names this exact bundle
        self._tempdir = tempdir

    @property
    def only_runtime(self) -> str | None:
        """The runtime this copy was fetched for, when it holds only that runtime's programs."""
        marker = self.root / RUNTIME_MARKER
        return marker.read_text().strip() if marker.is_file() else None

    def holds(self, name: str) -> bool:
        """Whether this copy carries artifact `name` (a device's copy lacks the other runtime's programs;
        the parameter delta is only a way to fetch the parameters, fetched by devices holding the parent)."""
        entry = self.manifest.artifacts[name]
        if entry.kind == "params_delta":
            return (self.root / entry.path).is_file()
        only, runtime = self.only_runtime, artifact_runtime(entry.kind)
        return only is None or runtime is None or runtime == only

    # -- context manager: only matters for unpacked archives ----------------------------------------
    def close(self) -> None:
        if self._tempdir is not None:
            self._tempdir.cleanup()
            self._tempdir = None

    def __enter__(self) -> Bundle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- specs --------------------------------------------------------------------------------------
    @property
    def model_spec(self) -> ModelSpec:
        return self.manifest.model

    @property
    def patch_spec(self) -> PatchSpec:
        return self.manifest.patch

    @property
    def base_version(self) -> str:
        return self.manifest.base_version

    # -- artifacts ----------------------------------------------------------------------------------
    def artifact_path(self, name: str) -> Path:
        """The artifact's file, guaranteed inside the bundle (symlinks out of it are refused)."""
        entry = self.manifest.artifacts.get(name)
        if entry is None:
            raise BundleError(f"no artifact {name!r} in the bundle; known: {sorted(self.manifest.artifacts)}")
        return _inside(self.root, entry.path, name)

    def artifact_bytes(self, name: str) -> bytes:
        """The artifact's bytes, re-verified against the manifest (the file may have changed since load)."""
        path = self.artifact_path(name)
        entry = self.manifest.artifacts[name]
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise BundleError(f"artifact {name!r} ({entry.path}): unreadable: {exc}") from exc
        _check_content(name, entry.path, entry.bytes, entry.sha256, len(data), hashlib.sha256(data).hexdigest())
        return data

    def artifact_of_kind(self, kind: str) -> str:
        names = self.manifest.artifacts_of_kind(kind)
        if not names:
            raise BundleError(f"the bundle has no artifact of kind {kind!r}")
        return names[0]

    def base_params(self) -> Params:
        """Base weights W, checked against the model description."""
        return self._params("params_base", ("base",))

    def shared_params(self) -> Params:
        """Shared patch parameters θ̄ and Θ, checked against the patch description."""
        return self._params("params_shared", ("bar", "basis"))

    def all_params(self) -> Params:
        return {**self.base_params(), **self.shared_params()}

    def _params(self, kind: str, roles: tuple[str, ...]) -> Params:
        name = self.artifact_of_kind(kind)
        try:
            params = params_from_bytes(self.artifact_bytes(name))  # np.load(allow_pickle=False)
            check_params(params, self.model_spec, self.patch_spec, roles)
        except ParamsError as exc:
            raise BundleError(f"artifact {name!r} ({self.manifest.artifacts[name].path}): {exc}") from exc
        return params

    # -- variants -----------------------------------------------------------------------------------
    def variant(self, variant_id: str) -> Variant:
        return self.manifest.variant_row(variant_id).variant

    def variant_row(self, variant_id: str) -> VariantRow:
        return self.manifest.variant_row(variant_id)

    def describe(self) -> dict[str, Any]:
        """Everything `edgepatch inspect` shows: manifest gist, the variant table, artifact sizes."""
        artifacts = [{"name": n, **e.to_dict()} for n, e in sorted(self.manifest.artifacts.items())]
        return {
            "path": str(self.root), "version": self.version, **manifest_summary(self.manifest),
            "variants": [row.to_dict() for row in self.manifest.variants],
            "artifacts": artifacts, "total_bytes": sum(a["bytes"] for a in artifacts),
        }

    # -- verification -------------------------------------------------------------------------------
    def verify(self) -> None:
        """Size then sha256 of every artifact, then the parameter files against the model."""
        for name, entry in sorted(self.manifest.artifacts.items()):
            if not self.holds(name):
                continue
            path = self.artifact_path(name)
            try:
                info = path.stat()
            except FileNotFoundError:
                raise BundleError(f"artifact {name!r}: file {entry.path} is missing") from None
            if not stat.S_ISREG(info.st_mode):
                raise BundleError(f"artifact {name!r}: {entry.path} is not a regular file")
            if info.st_size != entry.bytes:  # cheap check first: catches truncation without hashing
                _check_content(name, entry.path, entry.bytes, entry.sha256, info.st_size, "")
            _check_content(name, entry.path, entry.bytes, entry.sha256, info.st_size, sha256_file(path))
        self.base_params()
        self.shared_params()


def _check_content(name: str, path: str, want_bytes: int, want_sha: str, got_bytes: int, got_sha: str) -> None:
    if got_bytes != want_bytes:
        raise BundleError(f"artifact {name!r}: {path} has {got_bytes} bytes, the manifest says {want_bytes} "
                          f"(truncated or replaced)")
    if got_sha != want_sha:
        raise BundleError(f"artifact {name!r}: {path} fails its sha256 check (got {got_sha[:16]}…, manifest "
                          f"says {want_sha[:16]}…): the file is corrupt or tampered with")


def _inside(root: Path, relative: str, name: str) -> Path:
    check_relative_path(relative, f"artifacts.{name}.path")
    path = root / relative
    resolved_root = root.resolve()
    if not path.resolve().is_relative_to(resolved_root):
        raise BundleError(f"artifact {name!r}: {relative} resolves outside the bundle (symlink?)")
    return path


def load_bundle(path: str | Path, verify: bool = True, expected_version: str | None = None) -> Bundle:
    """Open a bundle directory or archive; with `verify`, check every artifact (and the params).

    `expected_version` (sha256 of manifest.json, as published by the cloud) also pins the manifest
    itself, so an edited manifest whose hashes were recomputed is caught too.
    """
    source = Path(path)
    if source.is_dir():
        return _open_dir(source, verify, expected_version, None)
    if source.is_file() and source.name.endswith(ARCHIVE_SUFFIXES):
        tmp = tempfile.TemporaryDirectory(prefix="edgepatch-bundle-")
        try:
            root = unpack(source, Path(tmp.name))
            return _open_dir(root, verify, expected_version, tmp)
        except BaseException:
            tmp.cleanup()
            raise
    if not source.exists():
        raise BundleError(f"no bundle at {source}")
    raise BundleError(f"{source} is neither a bundle directory nor an archive ({', '.join(ARCHIVE_SUFFIXES)})")


def _open_dir(root: Path, verify: bool, expected_version: str | None,
              tmp: tempfile.TemporaryDirectory[str] | None) -> Bundle:
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise BundleError(f"{root} has no {MANIFEST_NAME}: not a bundle")
    if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{manifest_path}: larger than {MAX_MANIFEST_BYTES} bytes; refusing to parse")
    raw = manifest_path.read_bytes()
    version = hashlib.sha256(raw).hexdigest()
    if expected_version is not None and version != expected_version:
        raise BundleError(f"{MANIFEST_NAME}: sha256 {version[:16]}… is not the expected bundle version "
                          f"{expected_version[:16]}… (manifest edited or wrong bundle)")
    try:
        manifest = Manifest.from_json(raw)
    except ManifestError as exc:
        raise ManifestError(f"{manifest_path}: {exc}") from exc
    bundle = Bundle(root, manifest, version, tmp)
    if verify:
        bundle.verify()
    return bundle


# -- keeping the last good bundle -------------------------------------------------------------------


class ActiveBundleStore:
    """`root/bundles/<version>/` copies plus `root/current.json` pointing at the active one.

    The pointer is replaced with write-temp-then-rename, so a reader sees the old or the new bundle,
    never a half-installed one; a candidate that fails verification leaves everything as it was.
    One installer at a time (the device runtime is the only writer).
    """

    POINTER = "current.json"

    def __init__(self, root: str | Path, keep: int = 2) -> None:
        self.root = Path(root)
        self.keep = max(1, keep)  # bundles kept on disk: the active one and the previous (rollback)
        self.bundles_dir = self.root / "bundles"

    def install(self, candidate: str | Path, expected_version: str | None = None) -> Bundle:
        """Verify `candidate` (dir or archive), copy it in, verify the copy, then switch to it."""
        with load_bundle(candidate, verify=True, expected_version=expected_version) as incoming:
            version = incoming.version
            target = self.bundles_dir / version
            if target.exists() and not _is_intact(target, version):
                shutil.rmtree(target)  # a rotten copy of the same version: replace it with the good one
            if not target.exists():
                self.bundles_dir.mkdir(parents=True, exist_ok=True)
                staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.bundles_dir))
                try:
                    _copy_bundle(incoming, staging)
                    load_bundle(staging, verify=True, expected_version=version)  # the copy, not the source
                    os.replace(staging, target)
                finally:
                    if staging.exists():
                        shutil.rmtree(staging)
        installed = load_bundle(target, verify=True, expected_version=version)
        history = [version] + [v for v in self._pointer().get("history", []) if v != version]
        pointer = {"version": version, "path": f"bundles/{version}", "model_id": installed.manifest.model_id,
                   "base_version": installed.base_version,
                   "installed": datetime.now(UTC).isoformat(timespec="seconds"), "history": history[:self.keep]}
        write_atomic(self.root / self.POINTER, (json.dumps(pointer, indent=2) + "\n").encode())
        self._prune(set(history[:self.keep]))
        return installed

    def current(self, verify: bool = True) -> Bundle | None:
        """The active bundle (verified again: storage can rot), or None before the first install."""
        pointer = self._pointer()
        if not pointer:
            return None
        version = pointer.get("version")
        if not isinstance(version, str) or not version.isalnum():
            raise BundleError(f"{self.root / self.POINTER}: malformed pointer (version {version!r})")
        return load_bundle(self.bundles_dir / version, verify=verify, expected_version=version)

    def current_version(self) -> str | None:
        version = self._pointer().get("version")
        return version if isinstance(version, str) else None

    def _pointer(self) -> dict[str, Any]:
        path = self.root / self.POINTER
        if not path.exists():
            return {}
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise BundleError(f"{path}: unreadable pointer: {exc}") from exc
        if not isinstance(data, dict):
            raise BundleError(f"{path}: malformed pointer")
        return data

    def _prune(self, keep: set[str]) -> None:
        for child in self.bundles_dir.iterdir():
            if child.is_dir() and child.name not in keep and not child.name.startswith(".staging-"):
                shutil.rmtree(child, ignore_errors=True)


def _is_intact(root: Path, version: str) -> bool:
    try:
        load_bundle(root, verify=True, expected_version=version).close()
    except BundleError:
        return False
    return True


def _copy_bundle(bundle: Bundle, dest: Path) -> None:
    """Copy only what the manifest names (stray files in the source are not carried along)."""
    shutil.copyfile(bundle.root / MANIFEST_NAME, dest / MANIFEST_NAME)
    if bundle.only_runtime is not None:
        shutil.copyfile(bundle.root / RUNTIME_MARKER, dest / RUNTIME_MARKER)
    for name, entry in bundle.manifest.artifacts.items():
        if not bundle.holds(name):
            continue
        target = dest / entry.path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(bundle.artifact_path(name), target)
    # On disk before the pointer names it: a power cut must not leave `current` on unwritten data.
    for path in dest.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
