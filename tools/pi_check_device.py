"""Device side of tools/pi-check.sh: runs INSIDE the arm64 root, with the venv's python (no torch, no TF).

    python pi_check_device.py install VENV OUT.json      installed size of the venv, largest packages
    python pi_check_device.py imports OUT.json           the device path imports no torch/TensorFlow
    python pi_check_device.py run OUT.json LOG -- CMD…   run CMD, record exit code, wall time, peak RSS
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HEAVY = ("torch", "tensorflow", "executorch")


def dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink()) / 2**20


def install(venv: Path, out: Path) -> None:
    site = next(venv.glob("lib/python*/site-packages"))
    largest = sorted(((p.name, dir_mb(p)) for p in site.iterdir() if p.is_dir() and not p.name.endswith(
        (".dist-info", "__pycache__"))), key=lambda t: -t[1])[:6]
    empty = float(os.environ.get("PI_EMPTY_VENV_MB", "0"))
    out.write_text(json.dumps({
        "machine": platform.machine(), "python": platform.python_version(),
        "installed_mb": round(dir_mb(venv) - empty, 1),
        "largest_packages_mb": {n: round(s, 1) for n, s in largest},
        "heavy_installed": [m for m in HEAVY if importlib.util.find_spec(m) is not None]}))


class _Block(importlib.abc.MetaPathFinder):
    """Belt and braces: even if torch were installed, importing it from the device path would fail loudly."""

    attempts: list[str] = []

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001, ANN201
        if name.split(".")[0] in HEAVY:
            self.attempts.append(name)
            raise ImportError(f"{name} must not be imported on the device")
        return None


def imports(out: Path) -> None:
    sys.meta_path.insert(0, _Block())
    from ai_edge_litert.interpreter import Interpreter  # noqa: F401

    import edgepatch.device.backends.litert  # noqa: F401
    import edgepatch.device.cli  # noqa: F401
    import edgepatch.device.link  # noqa: F401
    import edgepatch.device.runtime  # noqa: F401

    heavy = sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)
    out.write_text(json.dumps({"heavy_modules": heavy, "blocked_attempts": _Block.attempts,
                               "machine_seen_by_python": platform.machine()}))


def run(out: Path, log: Path, cmd: list[str]) -> None:
    t0 = time.monotonic()
    with open(log, "wb") as fh:
        code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode
    wall = time.monotonic() - t0
    # ru_maxrss of children (KiB on Linux). Under qemu-user this is the emulator process: guest memory
    # plus qemu's translation cache, so it is an upper bound of what the Pi would use.
    rss_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out.write_text(json.dumps({"exit_code": code, "wall_s": round(wall, 1), "peak_rss_mb": round(rss_kb / 1024, 1)}))


def main(argv: list[str]) -> None:
    cmd = argv[0]
    if cmd == "install":
        install(Path(argv[1]), Path(argv[2]))
    elif cmd == "imports":
        imports(Path(argv[1]))
    elif cmd == "run":
        run(Path(argv[1]), Path(argv[2]), argv[argv.index("--") + 1:])
    else:
        sys.exit(f"unknown command {cmd!r}\n{__doc__}")


if __name__ == "__main__":
    main(sys.argv[1:])
