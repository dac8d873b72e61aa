"""Faults table (issue 12): one row per fault, real parts only (edgepatch.sim.fault_runs).

Each run: 3 device links (real paho clients, on-disk outboxes, application acks) stream patches through a
Mosquitto started here to the ingest running as its own process; the fault strikes a third of the way in.
PostgreSQL restart / kill -9 run on a private cluster (initdb, a free port): never the shared server.
Columns: sent (valid patches the devices sent), acknowledged (the devices count delivered: the companion's
PatchAck said stored/duplicate), stored (sent patches in the store), lost (acknowledged but not stored: must
be 0), unconfirmed (still in an outbox at the end), peak RSS of the ingest process (VmHWM, MB).
Resource faults (sim/fault_extra.py): a 1 MB zip bomb (1 GiB unpacked) opened by a device process, refused at
the manifest's declared sizes (its description names the bytes the device wrote and its peak memory), and
400 idle connections on the companion's web server (the server still answers, its threads stay bounded, it
closes them after its idle timeout), both during the patch stream.
The control row (no application acks, the device trusts the broker's PUBACK) shows the loss the acks fix;
it is not counted among the faults tried. The last line counts the faults survived of those tried.

    python3 benchmarks/faults.py [--quick] [--postgres] [--out results/faults.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from edgepatch.sim.fault_extra import EXTRA_FAULTS, run_extra
from edgepatch.sim.fault_runs import FAULTS, PG_FAULTS, POISONS, FaultRow, run_fault, run_poison

PG_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
COLUMNS = ("fault", "protocol", "store", "sent", "acknowledged", "stored", "lost", "unconfirmed", "resends",
           "peak_rss_mb", "seconds", "survived")


def _pg_reachable() -> bool:
    try:
        import psycopg2

        psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname="test", connect_timeout=2).close()
        return True
    except Exception:  # noqa: BLE001 - any failure means: not reachable
        return False


def table(rows: list[dict[str, Any]]) -> str:
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in COLUMNS}
    lines = [" | ".join(c.ljust(widths[c]) for c in COLUMNS), "-+-".join("-" * widths[c] for c in COLUMNS)]
    lines += [" | ".join(str(r[c]).ljust(widths[c]) for c in COLUMNS) for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="MQTT 5 only, fewer patches (a smoke run)")
    ap.add_argument("--postgres", action="store_true", help="also poison rows on PostgreSQL at 127.0.0.1:5432")
    ap.add_argument("--patches", type=int, default=90, help="per device")
    ap.add_argument("--out", type=Path, default=Path("results/faults.json"))
    args = ap.parse_args(argv)
    patches = 30 if args.quick else args.patches
    protocols = ("5",) if args.quick else ("5", "3.1.1")
    work = Path(tempfile.mkdtemp(prefix="edgepatch-faults-"))
    runs: list[tuple[bool, Any]] = []  # (counted among the faults tried, thunk)
    for fault in FAULTS:
        for protocol in protocols:
            outage = 0.5 if fault == "companion_kill9" else 3.0  # long enough for the devices to return first
            runs.append((True, lambda f=fault, p=protocol, o=outage: run_fault(
                f, p, work / f"{f}-{p}", patches=patches, outage_s=o)))
    for fault in PG_FAULTS:  # a private PostgreSQL cluster (initdb) restarted / SIGKILLed mid-ingest
        runs.append((True, lambda f=fault: run_fault(f, "5", work / f, patches=min(patches, 60), outage_s=2.0)))
    runs.append((False, lambda: _control(run_fault("broker_restart", "5", work / "control", app_ack=False,
                                                   patches=patches, outage_s=3.0))))
    for fault in EXTRA_FAULTS:  # archive bomb at a device, idle-connection flood on the web server
        runs.append((True, lambda f=fault: run_extra(f, work / f, patches=min(patches, 60))))
    for kind in POISONS:
        runs.append((True, lambda k=kind: run_poison(k, work / f"poison-{k}", patches=min(patches, 60))))
    if args.postgres:
        if not _pg_reachable():
            print(f"--postgres: PostgreSQL is not reachable at {PG_URL}", file=sys.stderr)
            return 2
        for kind in ("seq_2e31", "nul_base_version"):
            runs.append((True, lambda k=kind: run_poison(k, work / f"poison-pg-{k}", patches=min(patches, 60),
                                                         store_url=PG_URL)))
    rows: list[dict[str, Any]] = []
    tried = survived = 0
    for counted, run in runs:
        row: FaultRow = run()
        out = row.as_dict()
        out["counted"] = counted
        rows.append(out)
        print(json.dumps(out), flush=True)
        if counted:
            tried += 1
            survived += int(row.survived)
    report = {"benchmark": "faults", "host": platform.node(), "python": platform.python_version(),
              "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "patches_per_device": patches,
              "rows": rows, "tried": tried, "survived": survived}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(rows))
    print(f"faults survived: {survived} of {tried} tried (control row not counted)")
    return 0 if survived == tried else 1


def _control(row: FaultRow) -> FaultRow:
    row.fault = "control:broker_restart (no app acks)"
    return row


if __name__ == "__main__":
    sys.exit(main())
