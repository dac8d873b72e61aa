"""Issue 12's resource faults with real parts (sim/fault_extra.py): an archive bomb opened by a device process
and an idle-connection flood on the companion's web server, each while 3 devices stream patches through a
real Mosquitto to the ingest process. The stream must lose nothing and the fault must stay within bounds."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from edgepatch.protocol.bundle import load_bundle
from edgepatch.protocol.manifest import BundleError
from edgepatch.sim.fault_extra import make_archive_bomb, run_extra, synthetic_bundle


def test_archive_bomb_is_refused_at_the_declared_size(tmp_path: Path) -> None:
    bundle = synthetic_bundle(tmp_path / "bundle")
    archive, declared = make_archive_bomb(bundle, tmp_path / "bomb.zip", 64 << 20)
    assert archive.stat().st_size < 2 << 20  # small on the wire, 64 MiB unpacked
    with pytest.raises(BundleError, match="manifest declares"):
        load_bundle(archive)
    # The same archive without the bomb member loads: the bound is the manifest's, not a blanket refusal.
    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(p for p in bundle.rglob("*") if p.is_file()):
            zf.write(path, path.relative_to(bundle).as_posix())
    with load_bundle(good) as loaded:
        assert loaded.manifest.model_id == "digits_cnn"
    assert declared > 0


@pytest.mark.broker
def test_archive_bomb_row_refused_nothing_lost(tmp_path: Path) -> None:
    row = run_extra("archive_bomb", tmp_path / "bomb", patches=20, bomb_bytes=256 << 20)
    assert "refused after writing" in row.fault and row.poison_misplaced == 0, row.fault
    assert row.sent == 60 and row.lost == 0 and row.unconfirmed == 0 and row.stored == row.sent
    assert row.survived


@pytest.mark.broker
def test_idle_flood_row_server_answers_nothing_lost(tmp_path: Path) -> None:
    row = run_extra("idle_flood", tmp_path / "flood", patches=20, flood=300, workers=4, idle_timeout_s=1.0)
    assert "300 closed by the server" in row.fault and row.poison_misplaced == 0, row.fault
    assert row.sent == 60 and row.lost == 0 and row.unconfirmed == 0 and row.stored == row.sent
    assert row.survived
