"""Quiet by default (issue 14): `edgepatch export`, `edgepatch demo` and `edgepatch device run` print only
edgepatch's own lines; TensorFlow/absl C++ logs, torchao and cpuinfo messages, LiteRT's delegate notice and
Python warnings go to `edgepatch-logs/<command>.log` under the working directory; `--verbose` shows them.

Each command runs as a real subprocess (`python -m edgepatch.cli`), output captured from both streams.
A line is foreign when it matches a signature of a framework's output (below); the `--verbose` run proves
the signatures catch real noise, so a quiet run with zero foreign lines means something.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

CLI = (sys.executable, "-m", "edgepatch.cli")
LEVELS = "DEBUG|INFO|WARNING|ERROR|CRITICAL"
OUR_RECORD = re.compile(rf"^\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (\S+) ({LEVELS}) ")
FOREIGN = [
    re.compile(r"^[IWEF]\d{4} [\d:.]+\s+\d+ \S+:\d+\]"),  # glog/absl C++ (TF), torch's handler
    re.compile(r"All log messages before absl::InitializeLog"),
    re.compile(rf"^({LEVELS}):[\w.]+:"),  # Python logging's default format (absl, torchao, tensorflow)
    re.compile(rf"^({LEVELS}): "),  # TFLite/LiteRT C++ ("INFO: Created TensorFlow Lite XNNPACK delegate")
    re.compile(r"^\[[\w.]+\.(cc|cpp|h):\d+\]"),  # ExecuTorch/cpuinfo ("[cpuinfo_utils.cpp:71] Reading …")
    re.compile(r"\w+Warning: "),  # Python warnings (FutureWarning, UserWarning, DeprecationWarning …)
    re.compile(r"^\s*warnings\.warn\(|^\s*return cls\.__new__"),  # the source line a warning quotes
    re.compile(r"rebuild TensorFlow with the appropriate compiler flags|oneDNN custom operations"),
    re.compile(r"torchao|cpuinfo|Will likely fail if a gradient is requested"),
    re.compile(r"^Traceback \(most recent call last\)"),
]


def foreign_lines(text: str) -> list[str]:
    """Lines not from edgepatch: a framework signature, or a log record of a logger outside edgepatch."""
    bad = []
    for line in text.splitlines():
        record = OUR_RECORD.match(line)
        if record is not None:
            if not record.group(1).startswith("edgepatch"):
                bad.append(line)
            continue
        if any(p.search(line) for p in FOREIGN):
            bad.append(line)
    return bad


def run(args: list[str | Path], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    cmd = [*CLI, *map(str, args)]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, (f"`{' '.join(cmd[2:])}` exited {proc.returncode}\nstdout: {proc.stdout[-3000:]}\n"
                                  f"stderr: {proc.stderr[-5000:]}")
    return proc


def assert_quiet(proc: subprocess.CompletedProcess[str], log: Path) -> None:
    output = proc.stdout + proc.stderr
    bad = foreign_lines(output)
    assert not bad, f"{len(bad)} line(s) not from edgepatch, e.g.:\n" + "\n".join(bad[:10])
    assert log.is_file(), f"no log file at {log}"


def test_the_signatures_recognise_framework_lines_and_pass_ours() -> None:
    noise = ("I0000 00:00:1796024146.272578   17155 reader.cc:83] Reading SavedModel from: /tmp/x\n"
             "WARNING:absl:Importing a function (__inference_fn_352) with ops with unsaved custom gradients.\n"
             "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n"
             "[cpuinfo_utils.cpp:71] Reading file /sys/devices/soc0/image_version\n"
             "/usr/lib/python3.11/copyreg.py:105: FutureWarning: `isinstance(treespec, LeafSpec)` is deprecated\n"
             "2026-11-30 07:44:11,190 torch.utils._pytree WARNING something\n")
    ours = ("2026-11-30 07:44:11,190 edgepatch.device.runtime INFO active bundle 30d0d0a14242\n"
            "round 1: 10 steps in 0.24s (met 30.0s), variants ['k100-100'], loss 0.024→0.055,\n"
            "bundle written to /tmp/b (base version 1fa6dd3f451d)\n")
    assert len(foreign_lines(noise)) == 6
    assert foreign_lines(ours) == []


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path, Path]:
    """`edgepatch export --out DIR` (a full and a half variant; LiteRT and ExecuTorch, as by default)."""
    cwd = tmp_path_factory.mktemp("export-cwd")
    proc = run(["export", "--out", cwd / "bundle", "--variants", "1,0.5"], cwd, timeout=1500)
    return proc, cwd, cwd / "bundle"


@pytest.mark.slow
def test_export_prints_only_its_own_lines(exported: tuple[subprocess.CompletedProcess[str], Path, Path]) -> None:
    proc, cwd, bundle = exported
    log = cwd / "edgepatch-logs" / "export.log"
    assert_quiet(proc, log)
    assert "bundle written to" in proc.stderr and (bundle / "manifest.json").is_file()
    # The noise happened, and went to the file: TF's converter and torch/ExecuTorch warnings.
    logged = log.read_text(errors="replace")
    assert "Will likely fail if a gradient is requested" in logged or "SavedModel" in logged, logged[-2000:]


@pytest.mark.slow
def test_device_run_is_quiet_and_verbose_shows_the_frameworks(
        exported: tuple[subprocess.CompletedProcess[str], Path, Path], shifted_digits_devices: dict[str, Path],
        tmp_path: Path) -> None:
    _, _, bundle = exported
    data = next(iter(shifted_digits_devices.values()))
    args: list[str | Path] = ["device", "run", "--bundle", bundle, "--data", data, "--state-dir", tmp_path / "state",
                              "--rounds", "2", "--steps", "10"]
    quiet = run(args, tmp_path, timeout=300)
    assert_quiet(quiet, tmp_path / "edgepatch-logs" / "device.log")
    assert "round 1:" in quiet.stderr and "round 2:" in quiet.stderr, quiet.stderr
    assert "selector decision" not in quiet.stderr  # decisions are DEBUG: in the log file only with --verbose
    assert "XNNPACK delegate" in (tmp_path / "edgepatch-logs" / "device.log").read_text(errors="replace")

    verbose = run(["--verbose", *args], tmp_path, timeout=300)
    shown = foreign_lines(verbose.stdout + verbose.stderr)
    assert any("XNNPACK delegate" in line for line in shown), verbose.stderr[-3000:]
    assert "selector decision" in verbose.stderr  # edgepatch's DEBUG records are shown too


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_demo_prints_only_its_own_lines(tmp_path: Path) -> None:
    proc = run(["demo", "--out", tmp_path / "demo", "--devices", "2", "--rounds", "1", "--steps", "20",
                "--variants", "1,0.5"], tmp_path, timeout=1500)
    assert_quiet(proc, tmp_path / "edgepatch-logs" / "demo.log")
    assert "done in" in proc.stderr and (tmp_path / "demo" / "report.json").is_file()
    # The device processes log their frameworks beside their own output.
    assert list((tmp_path / "demo" / "devices").glob("*/logs/device.log"))


SCRIPT = """
import logging, os, sys, warnings
from pathlib import Path
from edgepatch import logs
print(logs.setup("unit", verbose=sys.argv[2] == "verbose", directory=Path(sys.argv[1])))
os.write(2, b"I0000 00:00:1.5 1 native.cc:1] C++ noise on fd 2\\n")
warnings.warn("a framework deprecation", FutureWarning)
foreign = logging.getLogger("torchao")
foreign.addHandler(logging.StreamHandler(sys.stderr))  # a library that binds its own handler, like torch
foreign.warning("Failed to load a kernel library")
logging.getLogger("tensorflow").warning("a propagated framework warning")
from rich.console import Console
Console(stderr=True).print("our progress line")
logging.getLogger("edgepatch.unit").warning("our own warning")
logging.getLogger("edgepatch.unit").debug("a device decision")
"""


@pytest.mark.parametrize("mode", ["quiet", "verbose"])
def test_setup_routes_framework_output_to_the_log_file(tmp_path: Path, mode: str) -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "logs"), mode], capture_output=True,
                          text=True, timeout=120, check=True)
    shown, log = proc.stderr, tmp_path / "logs" / "unit.log"
    assert "our progress line" in shown and "our own warning" in shown
    noise = ("C++ noise on fd 2", "a framework deprecation", "Failed to load a kernel library",
             "a propagated framework warning")
    if mode == "quiet":
        assert foreign_lines(shown) == [] and not any(n in shown for n in noise), shown
        assert "a device decision" not in shown
        logged = log.read_text()
        assert all(n in logged for n in noise), logged
        assert proc.stdout.strip() == str(log.resolve())
    else:
        assert all(n in shown for n in noise), shown
        assert "a device decision" in shown  # DEBUG records are shown with --verbose
        assert len(foreign_lines(shown)) >= 3 and not log.exists()


def test_an_unwritable_log_folder_shows_everything_instead_of_failing(tmp_path: Path) -> None:
    # A systemd unit with ProtectSystem=strict starts in a read-only "/": the command must still run. (A
    # folder under a regular file cannot be created, even by root, who ignores permission bits.)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(blocker / "logs"), "quiet"], capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "None" and "our own warning" in proc.stderr


def test_counting_messages_become_one_progress_bar() -> None:
    import io

    from rich.console import Console

    from edgepatch.logs import StepLog

    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=False)
    lines: list[str] = []
    step_log = StepLog(console, lines.append)
    step_log("pretraining digits_cnn (15 epochs)")
    for epoch in range(1, 16):
        step_log(f"  epoch {epoch}/15: loss {1 / epoch:.3f}")
    step_log("base accuracy: 0.97")
    assert lines == ["pretraining digits_cnn (15 epochs)", "base accuracy: 0.97"]
    shown = out.getvalue()
    assert shown.count("epoch") == 1 and "15/15" in shown and "loss 0.067" in shown, shown
