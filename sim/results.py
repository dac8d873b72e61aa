"""What a simulation leaves in its output folder: results.json, rounds.csv, devices.csv, three PNG plots,
and the summary table printed at the end."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


def summary_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, r in results["strategies"].items():
        drops = sum(x["dropped"] for x in r["rounds"])
        total = sum(x["contributed"] + x["dropped"] for x in r["rounds"])
        rows.append({"strategy": name, "final_accuracy": round(r["final_accuracy"], 4),
                     "time_to_target_s": None if r["time_to_target_s"] is None else round(r["time_to_target_s"], 2),
                     "total_time_s": round(r["total_time_s"], 2), "drop_rate": round(drops / max(1, total), 3),
                     "MB_up": round(r["bytes_up"] / 1e6, 3), "MB_down": round(r["bytes_down"] / 1e6, 3)})
    return rows


def summary_table(results: Mapping[str, Any]) -> Any:
    from rich.table import Table

    rows = summary_rows(results)
    target = next(iter(results["strategies"].values()))["target_accuracy"] if results["strategies"] else 0
    table = Table(title=f"strategies (target accuracy {target})")
    for key in rows[0] if rows else []:
        table.add_column(key)
    for row in rows:
        table.add_row(*["—" if v is None else str(v) for v in row.values()])
    return table


def write_results(results: Mapping[str, Any], out: Path) -> None:
    from edgepatch.protocol.params import write_atomic

    write_atomic(out / "results.json", json.dumps(results, indent=1, default=str).encode())
    with open(out / "rounds.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["strategy", "round", "opened_s", "closed_s", "accuracy", "eval_loss", "contributed", "dropped",
                    "bytes_down", "bytes_up"])
        for name, r in results["strategies"].items():
            for x in r["rounds"]:
                w.writerow([name, x["round"], x["opened_s"], x["closed_s"], x["accuracy"], x["eval_loss"],
                            x["contributed"], x["dropped"], x["bytes_down"], x["bytes_up"]])
    with open(out / "devices.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["strategy", "round", "device", "class", "outcome", "reason", "steps", "steps_planned",
                    "variant_steps", "train_s", "throttle_s", "bytes_down", "bytes_up"])
        for name, r in results["strategies"].items():
            for x in r["rounds"]:
                for d in x["devices"]:
                    w.writerow([name, x["round"], d["device_id"], r["device_classes"].get(d["device_id"], ""),
                                d["outcome"], d["reason"], d["steps"], d["steps_planned"],
                                json.dumps(d["variant_steps"], sort_keys=True), d["train_s"], d["throttle_s"],
                                d["bytes_down"], d["bytes_up"]])
    write_plots(results, out)


def write_plots(results: Mapping[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strategies = results["strategies"]
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in strategies.items():
        xs = [0.0] + [x["closed_s"] for x in r["rounds"]]
        ys = [r["initial_accuracy"]] + [x["accuracy"] for x in r["rounds"]]
        ax.plot(xs, ys, marker="o", ms=3, label=name)
    if strategies:
        ax.axhline(next(iter(strategies.values()))["target_accuracy"], color="gray", ls=":", lw=1, label="target")
    ax.set_xlabel("wall-clock time (s)")
    ax.set_ylabel("global accuracy (pooled device holdouts)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out / "accuracy_vs_time.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    n = max(1, len(strategies))
    fig, axes = plt.subplots(n, 1, figsize=(8, 2.2 * n + 0.6), squeeze=False)
    # One colour per variant across every panel.
    all_variants = sorted({v for r in strategies.values() for x in r["rounds"] for d in x["devices"]
                           for _, v in d["timeline"]})
    cmap = plt.get_cmap("viridis", max(2, len(all_variants)))
    colour = {v: cmap(i) for i, v in enumerate(all_variants)}
    for ax, (name, r) in zip(axes[:, 0], strategies.items(), strict=False):
        devices = sorted(r["device_speeds"], key=lambda d: r["device_speeds"][d])
        row = {d: i for i, d in enumerate(devices)}
        pts = [(t, row[d["device_id"]], v) for x in r["rounds"] for d in x["devices"] for t, v in d["timeline"]]
        keeps = sorted({v for _, _, v in pts})
        for vid in keeps:
            sel = [(t, y) for t, y, v in pts if v == vid]
            ax.scatter([p[0] for p in sel], [p[1] for p in sel], s=8, color=colour[vid], label=vid)
        for x in r["rounds"]:
            ax.axvline(x["opened_s"], color="gray", lw=0.4)
        ax.set_title(f"{name}: variant decisions per device (rows: slowest → fastest)", fontsize=9)
        ax.set_ylabel("device")
        if keeps:
            ax.legend(fontsize=7, loc="upper right", ncol=min(4, len(keeps)))
    axes[-1, 0].set_xlabel("wall-clock time (s)")
    fig.tight_layout()
    paths.append(out / "variants_over_time.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(strategies)
    up = [strategies[n]["bytes_up"] / 1e6 for n in names]
    down = [strategies[n]["bytes_down"] / 1e6 for n in names]
    bar_x = np.arange(len(names))
    ax.bar(bar_x - 0.2, down, 0.4, label="down (global weights + round messages)")
    ax.bar(bar_x + 0.2, up, 0.4, label="up (touched entries + masks + messages)")
    ax.set_xticks(bar_x, names, rotation=20, fontsize=8)
    ax.set_ylabel("MB moved, all devices, all rounds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "bytes_moved.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
