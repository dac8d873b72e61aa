"""DISTREAL claim, end to end: every FL strategy on the same simulated fleet (same seeds, one run).

≥ 20 devices of ≥ 3 firmware classes, log-normal speeds × two-state Markov busy/idle load, real Mosquitto,
real LiteRT training, real (sleep-enforced) slowness. Prints a table; writes JSON, CSV and PNGs to
`--out` (default results/distreal). Run: python3 benchmarks/distreal.py [--rounds 10] [--devices 20]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from edgepatch.cloud.fl.strategies import STRATEGIES
from edgepatch.sim.config import parse_config
from edgepatch.sim.results import summary_rows
from edgepatch.sim.runner import run_simulation


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="results/distreal")
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--deadline", type=float, default=2.0)
    ap.add_argument("--local-steps", type=int, default=15)
    ap.add_argument("--target", type=float, default=0.6)
    ap.add_argument("--processes", type=int, default=5, help="device host processes (devices are threads in them)")
    ap.add_argument("--bundle", default="", help="reuse an exported bundle directory")
    ap.add_argument("--broker", default=None, help="mqtt://host:port (default: start a local Mosquitto)")
    ap.add_argument("--strategies", default=",".join(["distreal", "fedavg-wait", "fedavg-drop", "small-model",
                                                       "federated-dropout", "fjord"]))
    args = ap.parse_args()
    strategies = [s for s in args.strategies.split(",") if s]
    assert set(strategies) <= set(STRATEGIES), f"unknown strategies in {strategies}"
    config = {
        "simulation": {"name": "distreal-benchmark", "seed": 0, "rounds": args.rounds, "deadline_s": args.deadline,
                       "local_steps": args.local_steps, "lr": 0.1, "strategies": strategies,
                       "target_accuracy": args.target, "init": "random", "processes": args.processes,
                       "grace_s": 2.0, "max_wait_s": 90.0},
        "bundle": {"path": args.bundle, "variants": "1,0.75,0.5,0.25", "pretrain_epochs": 2, "dse_steps": 20},
        "data": {"n_devices": args.devices, "alpha": 0.5, "tail": "lognormal"},
        "devices": {"classes": ["raspberry_pi_zero_2w", "raspberry_pi_4", "raspberry_pi_5", "android_midrange"],
                    "speed_sigma": 0.5, "p_become_busy": 0.1, "p_become_idle": 0.3, "busy_slowdown": 3.0,
                    "markov_tick_s": 1.0},
    }
    out = Path(args.out)
    started = time.time()
    results = run_simulation(parse_config(config), out, args.broker)
    rows = summary_rows(results)
    summary = {"benchmark": "distreal", "wall_s": round(time.time() - started, 1), "config": config, "rows": rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\n{'strategy':<20}{'final acc':>10}{'t→target s':>12}{'total s':>9}{'drop rate':>10}{'MB up':>8}")
    for r in rows:
        ttt = "never" if r["time_to_target_s"] is None else f"{r['time_to_target_s']:.1f}"
        print(f"{r['strategy']:<20}{r['final_accuracy']:>10.3f}{ttt:>12}{r['total_time_s']:>9.1f}"
              f"{r['drop_rate']:>10.2f}{r['MB_up']:>8.2f}")
    print(f"results: {out}/summary.json, results.json, rounds.csv, devices.csv, *.png")


if __name__ == "__main__":
    main()
