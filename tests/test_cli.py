"""The `edgepatch` command line for real: every command runs as a subprocess (`python -m edgepatch.cli …`)
so the real entry point, argument parsing, exit codes and output streams are what is tested.

The default export (pretrain offline, DSE auto, LiteRT + ExecuTorch) takes minutes on a 2-core machine;
it runs once and everything about its bundle (`inspect`, tampering) is asserted in the same test.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgepatch.protocol.ports import free_port

CLI = (sys.executable, "-m", "edgepatch.cli")


def run_cli(*args: str | Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """One `edgepatch` invocation; a hang fails the test with the command named instead of blocking it."""
    cmd = [*CLI, *map(str, args)]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"`{' '.join(cmd[2:])}` did not finish in {timeout} s; stderr tail: "
                             f"{_text(exc.stderr)[-3000:]}") from exc


def _text(stream: str | bytes | None) -> str:
    return stream.decode(errors="replace") if isinstance(stream, bytes) else (stream or "")


def _flat(text: str) -> str:
    """Output with whitespace collapsed: rich wraps long lines at the (non-tty) console width."""
    return " ".join(text.split())


def _names(text: str, path: str | Path) -> bool:
    """Whether `text` names `path`, even where rich folded the path across lines."""
    return "".join(str(path).split()) in "".join(text.split())


def _ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, (f"`{' '.join(proc.args[2:])}` exited {proc.returncode}\n"
                                  f"stdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-5000:]}")
    return proc


def first_shard_x(data_dir: Path) -> np.ndarray:
    shard = sorted(data_dir.glob("*.npz"))[0]
    with np.load(shard, allow_pickle=False) as npz:
        return np.asarray(npz["x"], np.float32)


# -- 1. export with every default, inspect, tampering -----------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_export_defaults_then_inspect_and_tamper(tmp_path: Path) -> None:
    from edgepatch.export.reference_models import REFERENCE_MODELS
    from edgepatch.protocol.bundle import load_bundle
    from edgepatch.protocol.variants import full_variant

    out = tmp_path / "bundle"
    export = _ok(run_cli("export", "--out", out, timeout=2100))

    full_id = full_variant(REFERENCE_MODELS["digits_cnn"]()).id
    with load_bundle(out) as bundle:  # verifies every hash and the parameter files
        manifest = bundle.manifest
        variant_ids = [row.id for row in manifest.variants]
        kinds = {entry.kind for entry in manifest.artifacts.values()}
        png = bundle.artifact_bytes(bundle.artifact_of_kind("dse_front_png"))
        infer_path = manifest.artifacts[bundle.artifact_of_kind("litert_infer")].path
    assert manifest.model_id == "digits_cnn"
    assert len(variant_ids) >= 2 and full_id in variant_ids, variant_ids
    for kind in ("litert_trainable", "litert_infer", "executorch_infer", "params_base", "params_shared",
                 "dse_front_png"):
        assert kind in kinds, f"default export has no {kind}: {sorted(kinds)}"
    for vid in variant_ids:
        for kind in (f"executorch_train_phi:{vid}", f"executorch_train_full:{vid}"):
            assert kind in kinds, f"no {kind} for variant {vid}: {sorted(kinds)}"
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    # Every shipped variant was timed in the shipped LiteRT program.
    assert all(row.train_ms.get("litert", 0) > 0 and row.infer_ms.get("litert", 0) > 0 for row in manifest.variants)
    for vid in variant_ids:  # export ends with the same table `inspect` prints
        assert vid in export.stdout, f"{vid} missing from export's table:\n{export.stdout}"

    inspected = _ok(run_cli("inspect", out, timeout=120))
    for vid in variant_ids:
        assert vid in inspected.stdout, f"{vid} missing from `inspect`:\n{inspected.stdout}"
    assert manifest.base_version[:12] in inspected.stdout
    # Piped, the tables are not cut to 80 columns: every artifact name and kind is printed in full.
    for name, entry in manifest.artifacts.items():
        assert name in inspected.stdout and entry.kind in inspected.stdout, f"{name} cut from:\n{inspected.stdout}"
    assert "…" not in inspected.stdout, inspected.stdout

    tampered = tmp_path / "tampered"
    shutil.copytree(out, tampered)
    target = tampered / infer_path
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the sha256 check can catch it
    target.write_bytes(bytes(data))
    bad = run_cli("inspect", tampered, timeout=120)
    assert bad.returncode == 2, f"tampered bundle: exit {bad.returncode}\n{bad.stderr}"
    err = _flat(bad.stderr)
    assert _names(bad.stderr, infer_path) and "sha256" in err, bad.stderr
    assert "Traceback" not in bad.stderr


# -- 2. explore --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_explore_writes_pareto_set_and_front(tmp_path: Path) -> None:
    out = tmp_path / "dse"
    proc = _ok(run_cli("explore", "--cost", "flops", "--generations", "2", "--population", "4", "--steps", "5",
                       "--seeds", "1", "--out", out, timeout=600))
    assert (out / "front.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    result = json.loads((out / "variants.json").read_text())
    rows = result["rows"]
    assert result["cost_runtime"] is None and result["cost_unit"] == "FLOP ratio"
    assert len(rows) >= 2
    assert all(isinstance(row["pareto"], bool) for row in rows)
    flagged = {row["id"] for row in rows if row["pareto"]}
    assert flagged == set(result["pareto"]) and set(result["front"]) <= flagged
    assert "k100-100" in flagged  # the full variant always ships (the device's fallback)
    # The front really is non-dominated in (FLOP ratio, convergence loss) among every evaluated point.
    points = {row["id"]: (row["flops_ratio"], row["convergence"]) for row in rows}
    for vid in result["front"]:
        c, loss = points[vid]
        dominators = [o for o, (c2, l2) in points.items() if c2 <= c and l2 <= loss and (c2 < c or l2 < loss)]
        assert not dominators, f"front member {vid} is dominated by {dominators}"
    for vid in flagged:
        assert vid in proc.stdout, proc.stdout


# -- 3. device run / status / predict, offline --------------------------------------------------------

@pytest.mark.slow
def test_device_run_status_predict_offline(digits_bundle: Path, shifted_digits_devices: dict[str, Path],
                                           tmp_path: Path) -> None:
    data = next(iter(shifted_digits_devices.values()))
    state = tmp_path / "state"
    run = _ok(run_cli("device", "run", "--bundle", digits_bundle, "--data", data, "--state-dir", state,
                      "--rounds", "2", "--steps", "10", timeout=300))
    assert "round 1:" in run.stderr and "round 2:" in run.stderr, run.stderr

    status = json.loads(_ok(run_cli("device", "status", "--state-dir", state, timeout=60)).stdout)
    assert status["state"]["step"] == 20, status
    assert status["bundle_version"] and status["state"]["base_version"]
    assert status["state"]["phi_norm"] > 0.0  # 20 Adam steps moved φ away from zero

    x = first_shard_x(data)[:7]
    np.savez(tmp_path / "x.npz", x=x)
    pred = json.loads(_ok(run_cli("device", "predict", tmp_path / "x.npz", "--state-dir", state,
                                  timeout=60)).stdout)
    assert pred["personalized"] is True
    assert len(pred["predictions"]) == len(x) == 7
    assert all(isinstance(p, int) and 0 <= p < 10 for p in pred["predictions"])

    np.savez(tmp_path / "bad.npz", x=x[:, 0])  # (N, 8, 8): the channel axis is missing
    bad = run_cli("device", "predict", tmp_path / "bad.npz", "--state-dir", state, timeout=60)
    assert bad.returncode == 2, f"exit {bad.returncode}\n{bad.stdout}\n{bad.stderr}"
    err = _flat(bad.stderr)
    assert "sample shape (8, 8)" in err and "(1, 8, 8)" in err, bad.stderr
    assert "Traceback" not in bad.stderr and bad.stdout == ""


# -- 4. cloud serve + device over Mosquitto + cloud status --------------------------------------------

@pytest.fixture
def companion(digits_bundle: Path, mosquitto: Any, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int,
                                                                                        Path]]:
    """`edgepatch cloud serve` as a background process; yields (process, http port, stderr log)."""
    http_port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as log_fh:  # a file, not a pipe: INFO logging must never block the service
        proc = subprocess.Popen(
            [*CLI, "cloud", "serve", "--bundle", str(digits_bundle),
             "--broker", f"mqtt://127.0.0.1:{mosquitto.port}", "--http-port", str(http_port),
             "--work-dir", str(tmp_path / "cloud"), "--fleet", "f1"],
            stdout=log_fh, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "companion serving" not in log.read_text(errors="replace"):
            assert proc.poll() is None, f"serve exited {proc.returncode}: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"serve not up in 120 s: {log.read_text()[-3000:]}"
            time.sleep(0.1)
        yield proc, http_port, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
@pytest.mark.broker
def test_cloud_serve_device_over_mosquitto_then_status(
        companion: tuple[subprocess.Popen[bytes], int, Path], mosquitto: Any, digits_bundle: Path,
        shifted_digits_devices: dict[str, Path], tmp_path: Path) -> None:
    from edgepatch.protocol.bundle import load_bundle

    serve, http_port, log = companion
    data = next(iter(shifted_digits_devices.values()))
    t0 = time.monotonic()
    _ok(run_cli("device", "run", "--bundle", digits_bundle, "--data", data, "--state-dir", tmp_path / "dev",
                "--broker", f"mqtt://127.0.0.1:{mosquitto.port}", "--mqtt-protocol", "5", "--fleet", "f1",
                "--device-id", "d1", "--rounds", "1", "--steps", "10", timeout=300))

    print(f"device run over MQTT: {time.monotonic() - t0:.1f} s")
    url = f"http://127.0.0.1:{http_port}"
    with load_bundle(digits_bundle) as bundle:
        base_version = bundle.base_version
    deadline = time.monotonic() + 30
    while True:  # ingest commits asynchronously after the device's outbox drained
        status = run_cli("cloud", "status", "--url", url, timeout=60)
        _ok(status)
        fleet = json.loads(status.stdout)
        devices = {d["device_id"]: d for d in fleet["devices"]}
        if devices.get("d1", {}).get("patches", 0) >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert "d1" in devices, fleet
    d1 = devices["d1"]
    assert d1["fleet"] == "f1" and d1["patches"] == 1, d1
    assert d1["base_version"] == base_version, d1
    assert d1["bytes_in"] > 0
    assert fleet["bundle"] is not None

    print(f"patch visible in `cloud status`: {time.monotonic() - t0:.1f} s")
    t1 = time.monotonic()
    # With --distill-after 0 nothing is distilling, so the stop is prompt (a distillation in progress
    # would be finished first, by design).
    serve.send_signal(signal.SIGTERM)
    try:
        code = serve.wait(30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"serve ignored SIGTERM for 30 s: {log.read_text()[-3000:]}")
    print(f"serve stopped {time.monotonic() - t1:.1f} s after SIGTERM")
    assert code == 0, f"serve exited {code} after SIGTERM: {log.read_text()[-3000:]}"
    assert "Traceback" not in log.read_text(errors="replace")

    gone = run_cli("cloud", "status", "--url", url, timeout=60)  # nothing listens any more: a clear error
    assert gone.returncode == 2 and "cannot reach the companion" in _flat(gone.stderr), gone.stderr


@pytest.mark.slow
@pytest.mark.broker
def test_cloud_serve_distils_only_on_request_by_default(
        companion: tuple[subprocess.Popen[bytes], int, Path], mosquitto: Any, digits_bundle: Path,
        shifted_digits_devices: dict[str, Path], tmp_path: Path) -> None:
    serve, http_port, log = companion
    data = next(iter(shifted_digits_devices.values()))
    _ok(run_cli("device", "run", "--bundle", digits_bundle, "--data", data, "--state-dir", tmp_path / "dev",
                "--broker", f"mqtt://127.0.0.1:{mosquitto.port}", "--fleet", "f1", "--device-id", "d2",
                "--rounds", "1", "--steps", "5", timeout=300))
    time.sleep(3.0)  # three of the distillation loop's 1 s polls
    serve.send_signal(signal.SIGTERM)
    try:
        code = serve.wait(15)
    except subprocess.TimeoutExpired:
        pytest.fail(f"serve still busy 15 s after SIGTERM (a distillation nobody requested?): "
                    f"{log.read_text()[-1500:]}")
    assert code == 0
    assert "distillation round" not in log.read_text(errors="replace")


# -- 5. bad input ---------------------------------------------------------------------------------------

def test_export_unknown_model_names_the_allowed_ones(tmp_path: Path) -> None:
    from edgepatch.export.reference_models import REFERENCE_MODELS

    proc = run_cli("export", "--out", tmp_path / "b", "--model", "no_such_model", timeout=120)
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr}"
    err = _flat(proc.stderr)
    assert "no_such_model" in err and all(name in err for name in REFERENCE_MODELS), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_device_run_missing_data_dir_is_a_clear_error(digits_bundle: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-data"
    proc = run_cli("device", "run", "--bundle", digits_bundle, "--data", missing, "--state-dir", tmp_path / "s",
                   "--rounds", "1", "--steps", "2", timeout=120)
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr}"
    err = _flat(proc.stderr)
    assert _names(proc.stderr, missing) and "does not exist" in err, proc.stderr
    assert "Traceback" not in proc.stderr


def test_device_predict_without_an_installed_bundle(tmp_path: Path) -> None:
    np.savez(tmp_path / "x.npz", x=np.zeros((2, 1, 8, 8), np.float32))
    proc = run_cli("device", "predict", tmp_path / "x.npz", "--state-dir", tmp_path / "empty", timeout=60)
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr}"
    assert "no bundle installed" in _flat(proc.stderr) and _names(proc.stderr, tmp_path / "empty"), proc.stderr
    assert proc.stdout == ""


def test_cli_without_a_command_shows_help() -> None:
    proc = run_cli(timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 or "Usage" in out
    for command in ("export", "explore", "inspect", "device", "cloud", "simulate", "demo"):
        assert command in out, out
