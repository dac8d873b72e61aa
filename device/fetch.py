"""Fetching an announced bundle by reference (claim check), downloading only what changed.

A reference is a directory URL ending in '/' (the companion serves each bundle's files), an archive URL,
a `file://` URL or a local path. For a directory URL the manifest comes first and must hash to the
announced sha256; then every artifact whose sha256 the active bundle already has is copied locally and
only the others are downloaded — after a MoMoDistill round that is the parameters only: the trainable
programs do not change (their weights are inputs), and a frozen inference program whose weight layout the
manifest gives is rebuilt locally by writing the new parameters into the active copy (protocol/
weight_layout.py), kept only if it hashes to the manifest's sha256 (else downloaded). Given the device's
`runtime`, the other runtime's programs are not fetched at all (the copy is marked as holding one runtime).
Every file is requested with `Accept-Encoding: gzip` and inflated within its manifest size
(protocol/blobs.py); `FetchStats.downloaded_bytes` counts the bytes on the wire.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from edgepatch.protocol.blobs import Wire, fetch_to_file
from edgepatch.protocol.bundle import RUNTIME_MARKER, Bundle
from edgepatch.protocol.manifest import MANIFEST_NAME, ArtifactEntry, Manifest, artifact_runtime
from edgepatch.protocol.param_delta import apply_delta, delta_from_bytes
from edgepatch.protocol.params import ParamsError, params_from_bytes
from edgepatch.protocol.weight_layout import LayoutError, write_weights

log = logging.getLogger("edgepatch.device.fetch")
MAX_MANIFEST_BYTES = 1 << 20


@dataclass
class FetchStats:
    downloaded_bytes: int = 0
    reused_bytes: int = 0
    reused_artifacts: int = 0
    rebuilt_bytes: int = 0  # frozen programs rewritten locally from the new parameters
    skipped_bytes: int = 0  # the other runtime's programs, not fetched


def _download(url: str, target: Path, max_bytes: int, stats: FetchStats) -> int:
    """Stream `url` into `target`, at most `max_bytes` of content (protocol/blobs.py: bounded, same-host
    redirects, gzip inflated within the bound); counts the wire bytes in `stats`, returns the content's."""
    wire = Wire()
    try:
        return fetch_to_file(url, target, max_bytes=max_bytes, allow_file=False, accept_gzip=True, wire=wire)
    finally:
        stats.downloaded_bytes += wire.bytes


def fetch_bundle(reference: str, manifest_sha256: str, dest: Path, have: Bundle | None, max_bytes: int,
                 runtime: str | None = None) -> tuple[Path, FetchStats]:
    """A local directory or archive holding the announced bundle (verified later by the installer)."""
    stats = FetchStats()
    parsed = urllib.parse.urlparse(reference)
    if parsed.scheme in ("http", "https") and reference.endswith("/"):
        root = _fetch_directory(reference, manifest_sha256, dest / "bundle", have, max_bytes, stats, runtime)
        return root, stats
    if parsed.scheme in ("http", "https"):
        target = dest / (Path(parsed.path).name or "bundle.tar.gz")
        _download(reference, target, max_bytes, stats)
        return target, stats
    path = Path(urllib.parse.unquote(parsed.path) if parsed.scheme == "file" else reference)
    if not path.exists():
        raise FileNotFoundError(f"bundle reference {reference} does not exist")
    return path, stats


def _fetch_directory(base: str, manifest_sha256: str, root: Path, have: Bundle | None, max_bytes: int,
                     stats: FetchStats, runtime: str | None = None) -> Path:
    _download(base + MANIFEST_NAME, root / MANIFEST_NAME, MAX_MANIFEST_BYTES, stats)
    raw = (root / MANIFEST_NAME).read_bytes()
    if hashlib.sha256(raw).hexdigest() != manifest_sha256:
        raise ValueError(f"manifest at {base} does not match the announced sha256 {manifest_sha256[:12]}")
    manifest = Manifest.from_json(raw)  # validates every artifact path (relative, no '..')
    local = {}
    if have is not None:
        local = {e.sha256: have.artifact_path(n) for n, e in have.manifest.artifacts.items() if have.holds(n)}
    if runtime is not None:
        (root / RUNTIME_MARKER).write_text(runtime)
    budget = max_bytes
    # The parameter delta first, then the parameters (rebuilt from it), then the programs (frozen ones
    # rebuilt from the parameters) — each rebuilt file is kept only if it hashes to the manifest's sha256.
    deltas: dict | None = None
    for entry in sorted(manifest.artifacts.values(), key=lambda e: _FETCH_ORDER.get(e.kind, 2)):
        if runtime is not None and artifact_runtime(entry.kind) not in (None, runtime):
            stats.skipped_bytes += entry.bytes
            continue
        target = root / entry.path
        target.parent.mkdir(parents=True, exist_ok=True)
        if entry.kind == "params_delta":
            if not _delta_applies(manifest, have, local):
                continue  # optional: only a device holding the parent parameters can use it
            budget -= _download(base + urllib.parse.quote(entry.path), target, min(entry.bytes, budget), stats)
            deltas = _read_delta(target, entry)
            continue
        if entry.sha256 in local:
            shutil.copyfile(local[entry.sha256], target)
            stats.reused_bytes += entry.bytes
            stats.reused_artifacts += 1
            continue
        if _rebuild_params(entry, have, deltas, target) or _rebuild_frozen(entry, manifest, root, have, target):
            stats.rebuilt_bytes += entry.bytes
            continue
        budget -= _download(base + urllib.parse.quote(entry.path), target, min(entry.bytes, budget), stats)
    log.info("fetched bundle %s: %d B downloaded, %d B (%d artifacts) reused from the active bundle, %d B "
             "rebuilt locally, %d B of the other runtime skipped", manifest_sha256[:12], stats.downloaded_bytes,
             stats.reused_bytes, stats.reused_artifacts, stats.rebuilt_bytes, stats.skipped_bytes)
    return root


_FETCH_ORDER = {"params_delta": 0, "params_base": 1, "params_shared": 1}


def _delta_applies(manifest: Manifest, have: Bundle | None, local: dict) -> bool:
    """The delta is relative to the parent bundle's parameters: worth fetching only when the device holds
    them and the new parameters are not already local."""
    if have is None or manifest.meta.get("parent_base_version") != have.base_version:
        return False
    return any(e.kind.startswith("params_") and e.kind != "params_delta" and e.sha256 not in local
               for e in manifest.artifacts.values())


def _read_delta(path: Path, entry: ArtifactEntry) -> dict | None:
    """The delta's arrays if the file is the one the (pinned) manifest names; None: fetch the parameters
    (also what a device does with an encoding it does not know)."""
    try:
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            return None
        return delta_from_bytes(data)
    except (ParamsError, OSError):
        return None


def _rebuild_params(entry: ArtifactEntry, have: Bundle | None, deltas: dict | None, target: Path) -> bool:
    """The active parameter file of this kind moved by the deltas, if it hashes as the manifest says."""
    if deltas is None or have is None or entry.kind not in ("params_base", "params_shared"):
        return False
    try:
        blob = apply_delta(have.artifact_path(have.artifact_of_kind(entry.kind)).read_bytes(), deltas)
    except (ParamsError, OSError, ValueError):
        return False
    if len(blob) != entry.bytes or hashlib.sha256(blob).hexdigest() != entry.sha256:
        return False
    target.write_bytes(blob)
    return True


def _rebuild_frozen(entry: ArtifactEntry, manifest: Manifest, root: Path, have: Bundle | None, target: Path
                    ) -> bool:
    """Write the new parameters into the active copy of this frozen program; True if it then hashes to
    the manifest's sha256 (the manifest is pinned by the announcement, so the result is what was published)."""
    if entry.weights is None or have is None:
        return False
    old = next((n for n, e in have.manifest.artifacts.items()
                if e.kind == entry.kind and e.weights is not None and have.holds(n)), None)
    if old is None:
        return False
    try:
        params = {}
        for e in manifest.artifacts.values():
            if e.kind in ("params_base", "params_shared"):
                params.update(params_from_bytes((root / e.path).read_bytes()))
        blob = write_weights(have.artifact_path(old).read_bytes(), entry.weights, params)
    except (LayoutError, ParamsError, OSError):
        return False
    if len(blob) != entry.bytes or hashlib.sha256(blob).hexdigest() != entry.sha256:
        return False
    target.write_bytes(blob)
    return True
