"""The resource faults of issue 12's table, with real parts (benchmarks/faults.py; tests/test_fault_extra.py):

`archive_bomb`  a bundle archive whose manifest is genuine but one artifact unpacks to `bomb_bytes` of zeros
                (a ~1 MB zip for 1 GiB); a device process opens it with `load_bundle` (the installer's call)
                while the patch stream runs. Survived: refused, and the device process wrote at most the
                manifest's declared sizes (+ one copy chunk) — issue 12 measured 1.05 GB written before the
                refusal. The device process's own counters say so: `wchar` (bytes it passed to write) and
                VmHWM from /proc/self, read after the refusal.
`idle_flood`    `flood` idle TCP connections opened on the companion's web server (cloud/web.py FleetWeb in
                its own process) while the patch stream runs. Survived: the server still answers /metrics
                within 2 s, its thread count stays within its worker pool (+ a few), and it closes the idle
                connections once its idle timeout passes — issue 12 measured 400 threads held, no timeout.

Both run inside `fault_runs.run_fault` (the devices' patch stream to the ingest through Mosquitto), so each
row also counts sent / acknowledged / stored / lost for the stream the fault must not disturb.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

from .fault_runs import FaultRow, run_fault

log = logging.getLogger(__name__)
EXTRA_FAULTS = ("archive_bomb", "idle_flood")
_CHUNK = 1 << 20

_DEVICE_OPEN = """
import json, sys
from edgepatch.protocol.bundle import load_bundle
from edgepatch.protocol.manifest import BundleError
try:
    load_bundle(sys.argv[1]).close()
    outcome = "accepted"
except BundleError as exc:
    outcome = "refused: " + str(exc)[:300]
io = dict(line.split(":", 1) for line in open("/proc/self/io").read().splitlines())
hwm = [line for line in open("/proc/self/status").read().splitlines() if line.startswith("VmHWM:")][0]
print(json.dumps({"outcome": outcome, "wchar": int(io["wchar"]), "vmhwm_kb": int(hwm.split()[1])}))
"""

_WEB_SERVER = """
import sys, time
from pathlib import Path
from edgepatch.cloud.metrics import CloudMetrics
from edgepatch.cloud.store import PatchStore
from edgepatch.cloud.web import FleetWeb
web = FleetWeb(PatchStore(sys.argv[1]), CloudMetrics(), workers=int(sys.argv[3]), idle_timeout_s=float(sys.argv[4]))
web.start()
Path(sys.argv[2]).write_text(str(web.port))
while True:
    time.sleep(3600)
"""


def synthetic_bundle(out: Path) -> Path:
    """A small real bundle (the reference digits CNN's manifest and parameters, opaque program bytes)."""
    from edgepatch.export.bundle_writer import BundleWriter
    from edgepatch.export.reference_models import default_patch, digits_cnn
    from edgepatch.protocol.manifest import VariantRow
    from edgepatch.protocol.params import init_params
    from edgepatch.protocol.variants import full_variant

    spec = digits_cnn()
    patch = default_patch(spec)
    writer = BundleWriter(out).set_model(spec, patch).add_params(init_params(spec, patch, seed=0))
    writer.set_variants([VariantRow.for_variant(spec, full_variant(spec), train_ms={"litert": 3.5}, convergence=0.4,
                                                pareto=True)])
    writer.add_bytes("litert_trainable", b"TFL3" + bytes(range(256)) * 64)
    writer.finish()
    return out


def make_archive_bomb(bundle_dir: Path, out: Path, bomb_bytes: int) -> tuple[Path, int]:
    """A .zip of `bundle_dir` whose largest artifact's path holds `bomb_bytes` zeros instead (deflate shrinks
    them ~1000:1). Returns the archive and the bytes the manifest declares in all (manifest included)."""
    manifest = json.loads((bundle_dir / "manifest.json").read_bytes())
    arts = manifest["artifacts"].values()
    largest = max(arts, key=lambda a: a["bytes"])["path"]
    declared = sum(a["bytes"] for a in arts) + (bundle_dir / "manifest.json").stat().st_size
    zeros = bytes(_CHUNK)
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(p for p in bundle_dir.rglob("*") if p.is_file()):
            rel = path.relative_to(bundle_dir).as_posix()
            if rel != largest:
                zf.write(path, rel)
                continue
            info = zipfile.ZipInfo(rel)
            info.external_attr, info.compress_type = (stat.S_IFREG | 0o644) << 16, zipfile.ZIP_DEFLATED
            with zf.open(info, "w", force_zip64=True) as dst:
                for left in range(bomb_bytes, 0, -_CHUNK):
                    dst.write(zeros[:min(_CHUNK, left)])
    return out, declared


def _device_opens(archive: Path, tmp: Path) -> dict[str, object]:
    tmp.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TMPDIR": str(tmp)}
    proc = subprocess.run([sys.executable, "-c", _DEVICE_OPEN, str(archive)], capture_output=True, text=True,
                          env=env, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"device process failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def _vmhwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def _get_s(port: int, timeout: float = 10.0) -> float | None:
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
            r.read()
            return round(time.monotonic() - t0, 3) if r.status == 200 else None
    except OSError:
        return None


def run_extra(fault: str, workdir: Path, *, protocol: str = "5", patches: int = 60, bomb_bytes: int = 1 << 30,
              flood: int = 400, workers: int = 4, idle_timeout_s: float = 3.0) -> FaultRow:
    """One resource fault struck a third of the way into the devices' patch stream (see the module doc)."""
    if fault not in EXTRA_FAULTS:
        raise ValueError(f"unknown fault {fault!r}; known: {EXTRA_FAULTS}")
    workdir.mkdir(parents=True, exist_ok=True)
    seen: dict[str, object] = {}
    harmed = [0]

    def bomb() -> None:
        archive, declared = make_archive_bomb(synthetic_bundle(workdir / "bundle"), workdir / "bomb.zip", bomb_bytes)
        got = _device_opens(archive, workdir / "device-tmp")
        bound = declared + _CHUNK
        refused = str(got["outcome"]).startswith("refused")
        seen["text"] = (f"{archive.stat().st_size / 2**20:.1f} MB zip -> {bomb_bytes >> 20} MB: "
                        f"{'refused' if refused else 'ACCEPTED'} after writing {got['wchar'] / 1024:.0f} kB "
                        f"(bound {bound / 1024:.0f} kB), device peak {got['vmhwm_kb'] / 1024:.1f} MB")
        seen["outcome"] = got["outcome"]
        harmed[0] = int(not refused or got["wchar"] > bound)

    def idle() -> None:
        port_file = workdir / "web.port"
        web = subprocess.Popen([sys.executable, "-c", _WEB_SERVER, str(workdir / "web.db"), str(port_file),
                                str(workers), str(idle_timeout_s)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        socks: list[socket.socket] = []
        try:
            deadline = time.monotonic() + 60
            while not port_file.exists():
                if web.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"web server did not start: {web.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
                time.sleep(0.05)
            port = int(port_file.read_text())
            _get_s(port)
            before = _threads(web.pid)
            socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(flood)]
            time.sleep(0.5)
            answer_s = _get_s(port)
            extra_threads = _threads(web.pid) - before
            deadline = time.monotonic() + idle_timeout_s + 10
            closed = 0
            for s in socks:  # the server must close every idle connection after its timeout (EOF here)
                s.settimeout(max(0.1, deadline - time.monotonic()))
                try:
                    closed += s.recv(1) == b""
                except ConnectionResetError:  # closed by the server too
                    closed += 1
                except OSError:  # timed out: still open
                    continue
            seen["text"] = (f"{flood} idle connections: /metrics answered in {answer_s} s, +{extra_threads} "
                            f"threads, {closed} closed by the server; server peak {_vmhwm_mb(web.pid)} MB")
            harmed[0] = int(answer_s is None or answer_s > 2.0 or extra_threads > workers + 2 or closed < flood)
        finally:
            for s in socks:
                s.close()
            web.kill()
            web.wait()

    row = run_fault(fault, protocol, workdir, patches=patches, strike=bomb if fault == "archive_bomb" else idle)
    row.fault = f"{fault} ({seen.get('text', 'not struck')})"
    if "outcome" in seen:
        log.info("archive bomb: %s", seen["outcome"])
    row.poison_misplaced = harmed[0]
    return row
