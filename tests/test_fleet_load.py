"""Smoke test of benchmarks/fleet_load.py (so the fleet-scale benchmark cannot rot): 50 real MQTT device
connections -> a real Mosquitto -> two ingest worker processes -> the local PostgreSQL, for a few seconds;
every sent patch and metrics message is stored, every device is held and acknowledged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _pg_available() -> bool:
    try:
        import psycopg2

        psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="test", connect_timeout=2).close()
        return True
    except Exception:  # noqa: BLE001
        return False


@pytest.mark.broker
@pytest.mark.postgres
def test_fleet_load_smoke_nothing_lost(tmp_path: Path) -> None:
    if not _pg_available():
        pytest.fail("PostgreSQL is not reachable at 127.0.0.1:5432 (user postgres, db test)", pytrace=False)
    out = tmp_path / "fleet.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "fleet_load.py"), "--devices", "50", "--interval", "1",
         "--metrics-every", "2", "--duration", "6", "--warmup", "2", "--drain", "5", "--settle", "30",
         "--rss-every", "1", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    r = report["result"]
    assert r["connections_held_min"] == 50 and r["connect_errors"] == 0 and r["lost_connections"] == 0
    assert r["patches_sent"] >= 50 * 4  # ~6 per device in 6 s at one per second
    assert r["patches_lost"] == 0 and r["patches_stored"] == r["patches_sent"]
    assert r["metrics_sent"] >= 50 and r["metrics_lost"] == 0
    assert r["device_acks"].get("stored", 0) == r["patches_sent"]  # every patch acknowledged to its device
    assert r["latency_sent_to_ack_s"]["p50"] is not None and r["latency_sent_to_ack_s"]["p50"] > 0
    assert r["rss_samples_mb"]["ingest"] and all(m > 0 for _, m in r["rss_samples_mb"]["ingest"])
    assert proc.stdout.strip().splitlines()[-1].startswith("targets met: ")
