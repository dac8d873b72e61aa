"""What a Raspberry Pi-class device pays: installed size of `pip install .[device]` and peak RSS while
training φ with LiteRT.

Creates a fresh venv (no torch, no tensorflow), installs the project's `device` extra into it, reports
its size, then trains the reference CNN's φ in that venv in a child process and reads its peak RSS.

    python benchmarks/device_footprint.py --bundle BUNDLE --out results/device_footprint.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
GOAL_MB = 150.0

TRAIN = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from edgepatch.device.profile import load_profile
    from edgepatch.device.runtime import DeviceConfig, DeviceRuntime
    bundle, data, state = map(Path, sys.argv[1:4])
    cfg = DeviceConfig(device_id="dev-fp", profile=load_profile("raspberry_pi_4"), state_dir=state,
                       data_dir=data, runtime="litert", adaptive=False)
    device = DeviceRuntime(cfg, bundle)
    report = device.run_round(int(sys.argv[4]))
    heavy = sorted(m for m in ("torch", "tensorflow") if m in sys.modules)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child of a big parent (this
    # benchmark imports TensorFlow to export) would report the parent's size.
    hwm_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps({"peak_rss_mb": hwm_kb / 1024,
                      "steps": report.steps, "heavy_modules": heavy}))
""")


def dir_size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink()) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=None, help="bundle to train (default: export mnist_cnn)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--out", type=Path, default=Path("results/device_footprint.json"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgepatch-footprint-"))
    bundle = args.bundle
    if bundle is None:
        from edgepatch.export.pipeline import ExportOptions, export_bundle

        bundle = work / "bundle"
        export_bundle(ExportOptions(model="mnist_cnn", variants="1,0.5", runtimes=("litert",), dse_steps=3,
                                    dse_seeds=(0,), pretrain_epochs=3), bundle)
    from edgepatch.data.datasets import dataset_for_model
    from edgepatch.data.fleet import make_fleet, write_device_timeline
    from edgepatch.protocol.bundle import load_bundle

    with load_bundle(bundle) as b:
        model_id = b.manifest.model_id
    fleet = make_fleet(dataset_for_model(model_id), 4, seed=0)
    write_device_timeline(fleet[0], work / "data")

    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    before = dir_size_mb(venv)
    subprocess.run([str(py), "-m", "pip", "install", "-q", f"{ROOT}[device]"], check=True)
    site = next(venv.glob("lib/python*/site-packages"))
    installed = dir_size_mb(venv) - before
    packages = sorted(((p.name, dir_size_mb(p)) for p in site.iterdir() if p.is_dir()), key=lambda t: -t[1])[:8]
    out = subprocess.run([str(py), "-c", TRAIN, str(bundle), str(work / "data"), str(work / "state"),
                          str(args.steps)], capture_output=True, text=True, check=True, cwd=work)
    run = json.loads(out.stdout.strip().splitlines()[-1])
    result = {"model": model_id, "installed_mb": round(installed, 1), "largest_packages_mb":
              {n: round(s, 1) for n, s in packages}, **run, "goal_peak_rss_mb": GOAL_MB,
              "meets_goal": run["peak_rss_mb"] <= GOAL_MB}
    table = Table("measure", "value", title=f"device footprint ({model_id}, LiteRT)")
    table.add_row("pip install .\\[device] size", f"{installed:.1f} MB")
    for name, size in packages:
        table.add_row(f"  {name}", f"{size:.1f} MB")
    table.add_row("peak RSS while training", f"{run['peak_rss_mb']:.1f} MB (goal ≤ {GOAL_MB:.0f})")
    table.add_row("torch/tensorflow imported", ", ".join(run["heavy_modules"]) or "neither")
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
