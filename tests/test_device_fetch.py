"""Bundles by reference: a device downloads only the artifacts that changed, and refuses a manifest that
does not hash to the announced version."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from edgepatch.cloud.store import PatchStore, sqlite_url
from edgepatch.cloud.web import FleetWeb
from edgepatch.device.fetch import fetch_bundle
from edgepatch.export.bundle_writer import BundleWriter
from edgepatch.protocol.bundle import load_bundle
from edgepatch.protocol.params import init_params

pytestmark = pytest.mark.slow


def _sibling_bundle(source: Path, out: Path) -> None:
    """Same programs, new shared patch parameters: what a distillation round that keeps W looks like."""
    with load_bundle(source) as old:
        m = old.manifest
        base = old.base_params()  # W kept; every shared patch parameter (θ̄, Θ, the head bias's) drawn anew
        params = {**base, **{k: v for k, v in init_params(m.model, m.patch, seed=99).items() if k not in base}}
        writer = BundleWriter(out, m.model_id).set_model(m.model, m.patch).add_params(params)
        writer.set_train(m.train).set_variants(m.variants).set_labels(m.labels)
        for name, entry in m.artifacts.items():
            if not entry.kind.startswith("params_"):
                writer.add_bytes(entry.kind, old.artifact_bytes(name))
        writer.finish()


def test_directory_reference_downloads_only_changed_artifacts(digits_bundle: Path, tmp_path: Path) -> None:
    _sibling_bundle(digits_bundle, tmp_path / "next")
    store = PatchStore(sqlite_url(tmp_path / "s.sqlite"))
    web = FleetWeb(store)
    web.start()
    try:
        with load_bundle(tmp_path / "next") as nxt:
            version, total = nxt.version, sum(e.bytes for e in nxt.manifest.artifacts.values())
        url = web.serve_bundle("next", tmp_path / "next")
        with load_bundle(digits_bundle) as have:
            path, stats = fetch_bundle(url, version, tmp_path / "dl", have, 10 * total)
        assert load_bundle(path, expected_version=version).version == version
        assert stats.reused_artifacts >= 2  # both LiteRT programs are unchanged
        assert 0 < stats.downloaded_bytes < total
        # A manifest that does not hash to the announced version is refused before any artifact.
        with pytest.raises(ValueError, match="does not match"):
            fetch_bundle(url, "0" * 64, tmp_path / "dl2", None, 10 * total)
        # Without a local bundle everything is downloaded: on the wire, each file gzip-compressed where that
        # pays (manifest, programs), and the content arrives whole (verified by load_bundle).
        cold_path, cold = fetch_bundle(url, version, tmp_path / "dl3", None, 10 * total)
        assert cold.reused_artifacts == 0 and cold.rebuilt_bytes == 0
        on_wire = sum(len(web.gzipped(f) or f.read_bytes()) for f in (tmp_path / "next").rglob("*") if f.is_file())
        assert cold.downloaded_bytes == on_wire < total
        assert load_bundle(cold_path, expected_version=version).version == version
    finally:
        web.stop()
        store.close()
        shutil.rmtree(tmp_path / "dl", ignore_errors=True)
