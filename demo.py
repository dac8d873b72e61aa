"""`edgepatch demo`: export → fleet trains φ on-device → cloud distils → fleet updates, with a report.

Everything is real: the bundle is exported to LiteRT, every device is its own process running the
device runtime (LiteRT, no torch), they talk MQTT to a broker (embedded amqtt unless --broker), the
companion ingests into SQLite, runs MoMoDistill, republishes and announces each new bundle, and the
devices fetch, verify and adopt it before their next round.

The schedule (issue 13): devices train φ and upload it every round; the companion updates the base every
`base_every` rounds (R, `cloud serve --base-every`), and devices wait for that update after every R-th
round (`device run --await-every R`). The report counts every MQTT payload per device and the bundle bytes
served, and compares bytes per device per day with FedAvg of the full model on the same schedule
(demo_bytes.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from edgepatch.demo_bytes import Schedule, WireBytes, fedavg_blob_bytes, per_day

console = Console(stderr=True)


@dataclass
class DemoOptions:
    out: Path = Path("edgepatch-demo")
    model: str = "digits_cnn"
    devices: int = 8
    rounds: int = 20
    steps: int = 30
    base_every: int = 10  # R: the companion updates the base every R device rounds
    rounds_per_day: float = 24.0  # what "per day" means in the bytes report
    broker: str | None = None
    variants: str = "auto"
    runtimes: tuple[str, ...] = ("litert",)
    seed: int = 0


def _profiles() -> list[str]:
    """Device classes cycled over the fleet (all train with LiteRT in the demo)."""
    return ["raspberry_pi_4", "raspberry_pi_5", "raspberry_pi_zero_2w", "linux_x86_64"]


def _cloud_accuracy(spec: Any, params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    import torch

    from edgepatch.export.torch_model import forward, to_tensors

    with torch.no_grad():
        pred = forward(spec, None, to_tensors(params), torch.from_numpy(x)).argmax(1).numpy()
    return float((pred == y).mean()) if len(y) else float("nan")


def run_demo(opts: DemoOptions) -> dict[str, Any]:
    from edgepatch.cloud.broker import EmbeddedBroker
    from edgepatch.cloud.companion import Companion, CompanionConfig
    from edgepatch.cloud.rollout import RolloutSettings
    from edgepatch.data.byo import reference_data
    from edgepatch.data.datasets import dataset_for_model
    from edgepatch.data.fleet import base_split, make_fleet, write_device_timeline
    from edgepatch.device.runtime import load_local_data
    from edgepatch.export.pipeline import ExportOptions, export_bundle
    from edgepatch.logs import StepLog
    from edgepatch.protocol.bundle import load_bundle
    from edgepatch.protocol.mqtt import MqttVersion
    from edgepatch.protocol.transport import parse_broker

    started = time.perf_counter()
    out = opts.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    broker = None
    if opts.broker:
        host, port = parse_broker(opts.broker)
        protocol = MqttVersion.V5
    else:
        broker = EmbeddedBroker().start()
        host, port, protocol = broker.host, broker.port, broker.protocol
        console.print(f"[bold]1/5[/bold] embedded MQTT broker (amqtt, MQTT 3.1.1) on {host}:{port} — open: no "
                      "login, no TLS, loopback only (beyond loopback see docs/security.md)")
    try:
        console.print(f"[bold]2/5[/bold] exporting {opts.model} (pretrain offline, DSE, LiteRT programs)")
        bundle0 = out / "bundle-0"
        step_log = StepLog(console, lambda m: console.print(f"    {m}"))  # epochs, generations: one bar each
        export_bundle(ExportOptions(model=opts.model, variants=opts.variants, runtimes=opts.runtimes,
                                    dse_generations=2, dse_population=6, dse_steps=20, dse_seeds=(0, 1),
                                    seed=opts.seed), bundle0, step_log)
        step_log.close()
        with load_bundle(bundle0) as b:
            spec, base0 = b.model_spec, b.base_params()
            variant_ids = [r.id for r in b.manifest.variants]
        console.print(f"    variants shipped: {', '.join(variant_ids)}")

        console.print(f"[bold]3/5[/bold] fleet of {opts.devices} devices (long tail, per-device sensor shift)")
        _, device_part = base_split(dataset_for_model(opts.model), fraction=0.5, seed=opts.seed)
        fleet = make_fleet(device_part, opts.devices, alpha=0.5, shift="gain_offset", tail="zipf",
                           seed=opts.seed + 3, shift_strength=3.0)
        for device in fleet:
            write_device_timeline(device, out / "devices" / device.device_id / "data")

        cloud_data = reference_data(opts.model, opts.seed)  # the half of the dataset the devices do not get
        assert cloud_data is not None, f"{opts.model} is not a reference model"
        np.savez(out / "cloud-data.npz", x=cloud_data.x, y=cloud_data.y)
        companion = Companion(CompanionConfig(bundle=bundle0, work_dir=out / "cloud", broker_host=host,
                                              broker_port=port, protocol=protocol, fleet="demo",
                                              distill_after=opts.devices, base_every=opts.base_every,
                                              runtimes=opts.runtimes,
                                              data=out / "cloud-data.npz",
                                              # devices stop after their last round: canaries of the final
                                              # distillation cannot answer, so do not wait minutes for them
                                              rollout=RolloutSettings(canary_timeout_s=30.0)))
        companion.start_background()
        wire = WireBytes(host, port, "demo", protocol).start()  # every MQTT payload of the fleet
        console.print(f"[bold]4/5[/bold] companion up: fleet page {companion.web.url}/fleet, "
                      f"metrics {companion.web.url}/metrics")

        procs = _start_devices(opts, fleet, bundle0, out, f"mqtt://{host}:{port}",
                               MqttVersion.parse(protocol).value)
        _follow(opts, companion, procs)
        # The updates devices could adopt: one made after their last round (rounds a multiple of R) has no
        # device left to answer its canary stage, so it is not waited for.
        updates = (opts.rounds - 1) // opts.base_every
        if not companion.wait_distillations(updates, 600):
            console.print(f"[yellow]only {len(companion.history)} of {updates} base updates finished[/yellow]")
        bytes_in = sum(d.get("bytes_in", 0) for d in companion.store.devices("demo"))
        wire.stop()
        report = _report(opts, out, fleet, companion, spec, base0, bundle0, load_local_data, _cloud_accuracy,
                         bytes_in)
        report["bytes"].update(_bytes_per_device(opts, fleet, companion, wire, base0))
        companion.stop()
    finally:
        if broker is not None:
            broker.stop()
    report["seconds"] = round(time.perf_counter() - started, 1)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    _plot(report, out / "report.png")
    console.print(f"[bold]done[/bold] in {report['seconds']} s; wrote {out / 'report.json'} and {out / 'report.png'}")
    return report


def _start_devices(opts: DemoOptions, fleet: list[Any], bundle0: Path, out: Path, broker_url: str,
                   mqtt_protocol: str) -> dict[str, subprocess.Popen[bytes]]:
    procs = {}
    profiles = _profiles()
    for i, device in enumerate(fleet):
        ddir = out / "devices" / device.device_id
        # Each device's framework output (LiteRT's C++ lines) in its own folder (edgepatch/logs.py).
        cmd = [sys.executable, "-m", "edgepatch.cli", "--log-dir", str(ddir / "logs"), "device", "run", "--profile", profiles[i % len(profiles)],
               "--runtime", "litert", "--bundle", str(bundle0), "--data", str(ddir / "data"),
               "--state-dir", str(ddir / "state"), "--device-id", device.device_id, "--fleet", "demo",
               "--broker", broker_url, "--mqtt-protocol", mqtt_protocol, "--rounds", str(opts.rounds), "--steps", str(opts.steps),
               "--deadline", "60", "--await-bundle", "600", "--await-every", str(opts.base_every),
               "--log-level", "WARNING"]
        log = open(ddir / "device.log", "wb")  # noqa: SIM115 - closed when the process ends
        procs[device.device_id] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    return procs


def _follow(opts: DemoOptions, companion: Any, procs: dict[str, subprocess.Popen[bytes]]) -> None:
    """A progress bar (devices finished) with the round, reports and distillations, until every device
    process has finished its rounds."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    deadline = time.monotonic() + 1800
    with Progress(TextColumn("    {task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} "
                  "devices finished"), TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("starting devices", total=len(procs))
        while any(p.poll() is None for p in procs.values()) and time.monotonic() < deadline:
            time.sleep(1.0)
            bundle = companion.current.base_version[:12] if companion.current else "-"
            reported = len(companion.store.latest_patches(companion.current.base_version, "demo")) \
                if companion.current else 0
            progress.update(task, completed=sum(p.poll() is not None for p in procs.values()),
                            description=f"{reported}/{opts.devices} devices reported on base {bundle}, "
                                        f"{len(companion.history)} base updates (every {opts.base_every} rounds)")
    for device_id, proc in procs.items():
        if proc.poll() is None:
            proc.kill()
        if proc.wait() != 0:
            console.print(f"[red]device {device_id} exited with {proc.returncode}; see its device.log[/red]")


def _report(opts: DemoOptions, out: Path, fleet: list[Any], companion: Any, spec: Any,
            base0: dict[str, np.ndarray], bundle0: Path, load_local_data: Any, cloud_accuracy: Any,
            bytes_in: int) -> dict[str, Any]:
    from edgepatch.protocol.bundle import load_bundle

    console.print("[bold]5/5[/bold] report")
    with load_bundle(companion.current.root) as final:
        base_final, final_version = final.base_params(), final.base_version
    with load_bundle(bundle0) as b0:
        bundle_bytes = sum(e.bytes for e in b0.manifest.artifacts.values())
        param_bytes = sum(int(v.nbytes) for v in base0.values())
        rows = []
        for device in fleet:
            data = load_local_data(out / "devices" / device.device_id / "data", b0, 0.25)
            store = companion.store
            base_acc = store.metric_values(device.device_id, "holdout_acc_base")
            pers_acc = store.metric_values(device.device_id, "holdout_acc")
            rows.append({
                "device": device.device_id, "bucket": device.bucket, "train": len(data.train_x),
                "holdout": len(data.holdout_x),
                "acc_base_model": base_acc[0][1] if base_acc else None,
                # as served: φ only while it beats φ = 0 on the holdout (device/adoption.served_phi), from the
                # device's newest readings of both; the raw φ accuracy is kept beside it
                "acc_personalized": _served(pers_acc, base_acc),
                "acc_phi_raw": pers_acc[-1][1] if pers_acc else None,
                "cloud_acc_before": cloud_accuracy(spec, base0, data.holdout_x, data.holdout_y),
                "cloud_acc_after": cloud_accuracy(spec, base_final, data.holdout_x, data.holdout_y),
                "updates": _update_decisions(store, device.device_id)})
    buckets = {}
    for bucket in ("head", "tail"):
        members = [r for r in rows if r["bucket"] == bucket]
        buckets[bucket] = {key: float(np.mean([r[key] for r in members if r[key] is not None]))
                           if members else None
                           for key in ("acc_base_model", "acc_personalized", "cloud_acc_before", "cloud_acc_after")}
        buckets[bucket]["devices"] = len(members)
    bytes_out = int(companion.metrics.value("edgepatch_bytes_out_total"))  # bundle files served over HTTP
    edgepatch_bytes = bytes_in + bytes_out
    fedavg_round = fedavg_blob_bytes(base0)  # real serialized fp32 weights down and a full update up
    fedavg_bytes = (fedavg_round["down"] + fedavg_round["up"]) * opts.devices * opts.rounds
    report = {"devices": rows, "buckets": buckets, "rounds": opts.rounds, "distillations": companion.history,
              "final_base_version": final_version, "bytes": {
                  "patches_and_metrics_up": bytes_in, "bundles_down": bytes_out, "bundle_bytes": bundle_bytes,
                  "edgepatch_total": edgepatch_bytes, "fedavg_full_model": fedavg_bytes,
                  "model_param_bytes": param_bytes}}
    table = Table("device", "bucket", "train", "base model", "served (φ if better)", "cloud before", "cloud after",
                  "update decisions (active / new+old φ / new+refit φ)",
                  title="per-device holdout accuracy (newest 25 % of each device's data)")
    for r in rows:
        table.add_row(r["device"], r["bucket"], str(r["train"]), _pct(r["acc_base_model"]),
                      _pct(r["acc_personalized"]), _pct(r["cloud_acc_before"]), _pct(r["cloud_acc_after"]),
                      "; ".join(_update_text(u) for u in r["updates"]) or "none offered")
    Console().print(table)
    for entry in companion.history:  # the cloud's side of each update: cloud gate, canaries, promote/withdraw
        decision = entry.get("rollout") or {}
        Console().print(f"round {entry['round']} bundle {entry['bundle'][:12]}: {decision.get('stage', 'no gates')} "
                        f"{decision.get('decision', 'published')}"
                        + (f", canaries {decision['canaries']} rejected by {decision.get('rejected_by', [])}"
                           if decision.get("canaries") else ""))
    bt = Table("bucket", "devices", "base model", "served (φ if better)", "cloud before", "cloud after",
               title="long-tail buckets (mean)")
    for name, b in buckets.items():
        bt.add_row(name, str(b["devices"]), _pct(b["acc_base_model"]), _pct(b["acc_personalized"]),
                   _pct(b["cloud_acc_before"]), _pct(b["cloud_acc_after"]))
    Console().print(bt)
    Console().print(f"bytes moved in {opts.rounds} rounds: devices → cloud {bytes_in:,} B (φ + metrics); cloud → "
                    f"devices {edgepatch_bytes - bytes_in:,} B (bundle files); FedAvg of the full model would move "
                    f"{fedavg_bytes:,} B ({fedavg_round['down']:,} B of fp32 weights down and {fedavg_round['up']:,} "
                    "B up per device per round)")
    return report


def _served(phi_acc: list[Any], zero_acc: list[Any]) -> float | None:
    """Served holdout accuracy from a device's newest φ and φ = 0 readings (ties keep φ, as on the device)."""
    if not phi_acc:
        return None
    return max(phi_acc[-1][1], zero_acc[-1][1]) if zero_acc else phi_acc[-1][1]


def _bytes_per_device(opts: DemoOptions, fleet: list[Any], companion: Any, wire: WireBytes,
                      base0: dict[str, np.ndarray]) -> dict[str, Any]:
    """Bytes per device from the wire (every MQTT payload) and the bundle bytes the web server sent, per round,
    per base update and per day on this schedule, against FedAvg of the full model on the same schedule."""
    per_device = {d.device_id: wire.device(d.device_id) for d in fleet}
    up = np.mean([sum(v for k, v in b.items() if k.startswith("up_")) for b in per_device.values()])
    acks = np.mean([sum(v for k, v in b.items() if k.startswith("down_") and k != "down_bundle_announcements")
                    for b in per_device.values()])
    # Every fetch of a new bundle ends in one adoption-gate decision (adopted or not) on the metrics channel.
    fetches = sum(len(companion.store.metric_values(d.device_id, "update_adopted")) for d in fleet)
    served = companion.metrics.value("edgepatch_bytes_out_total")
    announced = wire.fleet_wide.get("bundle", 0) / max(1, len(companion.history))  # the first one included
    update = (served / fetches if fetches else 0.0) + announced
    fedavg = fedavg_blob_bytes(base0)
    day = per_day(Schedule(opts.base_every, opts.rounds_per_day), phi_up_per_round=float(up) / opts.rounds,
                  phi_down_per_round=float(acks) / opts.rounds, update_down=update, update_up=0.0,
                  fedavg_per_round=fedavg["down"] + fedavg["up"])
    t = Table("bytes per device", "per round", "per base update", "per day",
              title=f"bytes per device: φ every round, base every {opts.base_every} rounds, "
                    f"{opts.rounds_per_day:g} rounds a day (measured over {opts.rounds} rounds)")
    t.add_row("φ up (patch, metrics, state)", f"{day['phi_up_per_round']:,.0f}", "",
              f"{opts.rounds_per_day * day['phi_up_per_round']:,.0f}")
    t.add_row("acks down", f"{day['phi_down_per_round']:,.0f}", "",
              f"{opts.rounds_per_day * day['phi_down_per_round']:,.0f}")
    t.add_row("base update down (bundle files, announcements)", "",
              f"{update:,.0f}" if fetches else "none fetched", f"{day['edgepatch_base_per_day']:,}")
    t.add_row("edgepatch total", "", "", f"{day['edgepatch_per_day']:,}")
    t.add_row("FedAvg, full model (fp32 down, update up)", f"{day['fedavg_per_round']:,}", "",
              f"{day['fedavg_per_day']:,}")
    t.add_row("FedAvg / edgepatch", "", "", f"{day['fedavg_over_edgepatch']}×")
    Console().print(t)
    return {"per_device": per_device, "bundle_fetches": fetches, "per_day": day, "fedavg_round": fedavg}


def _update_decisions(store: Any, device_id: str) -> list[dict[str, Any]]:
    """The device's adoption-gate reports (device/adoption.py), oldest first, from its metrics messages."""
    names = ("update_adopted", "gate_acc_active", "gate_acc_new_old_phi", "gate_acc_new_refit")
    series = {name: store.metric_values(device_id, name) for name in names}
    return [{"decision": "adopted" if adopted >= 0.5 else "rejected",
             **{name: series[name][i][1] for name in names[1:] if i < len(series[name])}}
            for i, (_, adopted) in enumerate(series["update_adopted"])]


def _update_text(u: dict[str, Any]) -> str:
    accs = "/".join(_pct(u.get(k)) for k in ("gate_acc_active", "gate_acc_new_old_phi", "gate_acc_new_refit"))
    return f"{u['decision']} ({accs})"


def _pct(value: float | None) -> str:
    return "-" if value is None or value != value else f"{100 * value:.1f}%"


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["devices"]
    names = [r["device"] for r in rows]
    xs = np.arange(len(rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [3, 1]})
    for i, (key, label) in enumerate((("acc_base_model", "base model"), ("acc_personalized", "served (φ if better)"),
                                      ("cloud_acc_before", "cloud before"), ("cloud_acc_after", "cloud after"))):
        ax1.bar(xs + (i - 1.5) * 0.2, [r[key] or 0 for r in rows], width=0.2, label=label)
    ax1.set_xticks(xs, [f"{n}\n{r['bucket']}" for n, r in zip(names, rows, strict=True)], fontsize=7)
    ax1.set_ylabel("holdout accuracy")
    ax1.legend(fontsize=7)
    day = report["bytes"]["per_day"]
    ax2.bar(["edgepatch", "FedAvg\nfull model"], [day["edgepatch_per_day"], day["fedavg_per_day"]])
    ax2.set_ylabel(f"bytes per device per day (base every {day['base_every']} rounds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
