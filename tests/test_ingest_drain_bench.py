"""Smoke test of benchmarks/ingest_drain.py (so the ingest-cost benchmark cannot rot): a 600-message backlog at
a real Mosquitto (persistent MQTT 5 or 3.1.1 session on a shared subscription) drained into the local PostgreSQL; everything stored, the backlog within its bound."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.broker
@pytest.mark.postgres
@pytest.mark.parametrize("protocol", ["5", "3.1.1"])  # both through a $share/ group, as fleet_load runs them
def test_ingest_drain_smoke(tmp_path: Path, protocol: str) -> None:
    out = tmp_path / "drain.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ingest_drain.py"), "--messages", "600",
                           "--repeat", "1", "--out", str(out), "--protocol", protocol], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    run = json.loads(out.read_text())["runs"][0]
    assert run["protocol"] == protocol
    assert run["stored"] == run["patches"] == 500
    assert 0 < run["max_arrival_backlog"] <= run["arrival_bound"]
    assert run["cpu_us_per_patch"] > 0 and run["app_acks"] == 500
    assert proc.stdout.strip().splitlines()[-1].startswith("targets met: ")
