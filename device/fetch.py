"""Fetching an announced bundle by reference (claim check), downloading only what changed.

A reference is a directory URL ending in '/' (the companion serves each bundle's files), an archive URL,
a `file://` URL or a local path. For a directory URL the manifest comes first and must hash to the
announced sha256; then every artifact whose sha256 the active bundle already has is copied locally and
only the others are downloaded — after a MoMoDistill round that is the parameters and the frozen
inference program, not the trainable program (its weights are inputs, so it does not change).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from edgepatch.protocol.blobs import fetch_to_file
from edgepatch.protocol.bundle import Bundle
from edgepatch.protocol.manifest import MANIFEST_NAME, Manifest

log = logging.getLogger("edgepatch.device.fetch")
MAX_MANIFEST_BYTES = 1 << 20


@dataclass
class FetchStats:
    downloaded_bytes: int = 0
    reused_bytes: int = 0
    reused_artifacts: int = 0


def _download(url: str, target: Path, max_bytes: int) -> int:
    """Stream `url` into `target`, at most `max_bytes` (protocol/blobs.py: bounded, same-host redirects)."""
    return fetch_to_file(url, target, max_bytes=max_bytes, allow_file=False)


def fetch_bundle(reference: str, manifest_sha256: str, dest: Path, have: Bundle | None, max_bytes: int
                 ) -> tuple[Path, FetchStats]:
    """A local directory or archive holding the announced bundle (verified later by the installer)."""
    stats = FetchStats()
    parsed = urllib.parse.urlparse(reference)
    if parsed.scheme in ("http", "https") and reference.endswith("/"):
        return _fetch_directory(reference, manifest_sha256, dest / "bundle", have, max_bytes, stats), stats
    if parsed.scheme in ("http", "https"):
        target = dest / (Path(parsed.path).name or "bundle.tar.gz")
        stats.downloaded_bytes = _download(reference, target, max_bytes)
        return target, stats
    path = Path(urllib.parse.unquote(parsed.path) if parsed.scheme == "file" else reference)
    if not path.exists():
        raise FileNotFoundError(f"bundle reference {reference} does not exist")
    return path, stats


def _fetch_directory(base: str, manifest_sha256: str, root: Path, have: Bundle | None, max_bytes: int,
                     stats: FetchStats) -> Path:
    stats.downloaded_bytes += _download(base + MANIFEST_NAME, root / MANIFEST_NAME, MAX_MANIFEST_BYTES)
    raw = (root / MANIFEST_NAME).read_bytes()
    if hashlib.sha256(raw).hexdigest() != manifest_sha256:
        raise ValueError(f"manifest at {base} does not match the announced sha256 {manifest_sha256[:12]}")
    manifest = Manifest.from_json(raw)  # validates every artifact path (relative, no '..')
    local = {}
    if have is not None:
        local = {e.sha256: have.artifact_path(n) for n, e in have.manifest.artifacts.items()}
    budget = max_bytes
    for entry in manifest.artifacts.values():
        target = root / entry.path
        target.parent.mkdir(parents=True, exist_ok=True)
        if entry.sha256 in local:
            shutil.copyfile(local[entry.sha256], target)
            stats.reused_bytes += entry.bytes
            stats.reused_artifacts += 1
            continue
        got = _download(base + urllib.parse.quote(entry.path), target, min(entry.bytes, budget))
        budget -= got
        stats.downloaded_bytes += got
    log.info("fetched bundle %s: %d B downloaded, %d B (%d artifacts) reused from the active bundle",
             manifest_sha256[:12], stats.downloaded_bytes, stats.reused_bytes, stats.reused_artifacts)
    return root
