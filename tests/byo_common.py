"""Helpers of the bring-your-own model and data tests (test_byo_*.py): the `edgepatch` CLI as a subprocess,
a real offline dataset the reference code never uses, and a user's model file written into a folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from edgepatch.protocol.ports import free_port

CLI = (sys.executable, "-m", "edgepatch.cli")

# A user's own model description, as docs/models.md shows it: a 1-D CNN over (3 channels, 10 positions).
SPEC_MODULE = '''
from edgepatch.protocol.model_spec import LayerSpec as L, ModelSpec


def tiny1d() -> ModelSpec:
    return ModelSpec("tiny1d", (3, 10), 2, (
        L("conv1d", "c1", out=16, kernel=3), L("relu", "a1"),
        L("conv1d", "c2", out=16, kernel=3), L("relu", "a2"),
        L("flatten", "f"), L("dense", "head", out=2)))
'''


def run_cli(*args: str | Path, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    cmd = [*CLI, *map(str, args)]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd,
                              env={**os.environ, "PYTHONPATH": str(cwd or ".")})
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        raise AssertionError(f"`{' '.join(cmd[2:])}` did not finish in {timeout} s: {err[-3000:]}") from exc


def ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, (f"`{' '.join(proc.args[2:])}` exited {proc.returncode}\n"
                                  f"stdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-5000:]}")
    return proc


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The single `error:` line of a failed command (exit 2, no traceback), whitespace collapsed."""
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, f"expected one error line:\n{proc.stderr}"
    return " ".join(lines[0].split())


def breast_cancer_3x10() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's Wisconsin diagnostic breast cancer set (569 real biopsies, 2 classes), standardized,
    as 3 channels (mean, standard error, worst) × 10 cell-nucleus measurements: the layout its 30 columns
    come in. No reference model or benchmark of the project uses it."""
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    x = bunch.data.astype(np.float64)
    x = (x - x.mean(axis=0)) / x.std(axis=0)
    return x.reshape(-1, 3, 10).astype(np.float32), bunch.target.astype(np.int64)


def http_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - loopback only
        return json.loads(resp.read())


def http_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - loopback only
        return str(resp.read().decode())


def metric(url: str, name: str) -> float:
    for line in http_text(f"{url}/metrics").splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


class Serve:
    """`edgepatch cloud serve …` in the background with its output in a file (a pipe could fill and block)."""

    def __init__(self, args: list[str | Path], log: Path, cwd: Path | None = None) -> None:
        self.port = free_port()
        self.log = log
        self.url = f"http://127.0.0.1:{self.port}"
        with open(log, "wb") as fh:
            self.proc = subprocess.Popen([*CLI, "cloud", "serve", *map(str, args), "--http-port", str(self.port)],
                                         stdout=fh, stderr=subprocess.STDOUT, cwd=cwd)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, needle: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            assert self.proc.poll() is None, f"serve exited {self.proc.returncode}: {self.text()[-3000:]}"
            assert time.monotonic() < deadline, f"no {needle!r} in {timeout} s: {self.text()[-3000:]}"
            time.sleep(0.1)

    def wait_metric(self, name: str, at_least: float, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while (value := metric(self.url, name)) < at_least:
            assert self.proc.poll() is None, f"serve exited {self.proc.returncode}: {self.text()[-3000:]}"
            assert time.monotonic() < deadline, f"{name} = {value} < {at_least} after {timeout} s: {self.text()[-3000:]}"
            time.sleep(0.2)
        return value

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)
