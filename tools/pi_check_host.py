"""Host side of tools/pi-check.sh (runs on x86-64 with the full project installed).

    python3 tools/pi_check_host.py data OUT_DIR                 device shards (digits, one shifted device)
    python3 tools/pi_check_host.py announce PORT FLEET BUNDLE REFERENCE
                                                               retained bundle announcement, as the companion
    python3 tools/pi_check_host.py listen PORT FLEET SECONDS OUT.json
                                                               count the patches the emulated device publishes
    python3 tools/pi_check_host.py report WORK OUT.json         gather the figures, write JSON, print a table
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from pathlib import Path


def make_data(out: Path) -> None:
    from edgepatch.data.datasets import load_digits
    from edgepatch.data.fleet import base_split, make_fleet, write_device_timeline

    _, part = base_split(load_digits(), fraction=0.5, seed=0)
    fleet = make_fleet(part, 3, alpha=1.0, shift="gain_offset", tail="uniform", seed=3, shift_strength=2.0)
    write_device_timeline(fleet[0], out)
    import numpy as np

    first = sorted(out.glob("*.npz"))[0]
    with np.load(first, allow_pickle=False) as shard:
        np.savez(out.parent / "predict-x.npz", x=shard["x"][:8])


def _client(port: int):  # noqa: ANN202 - paho's type
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", port)
    return client


def announce(port: int, fleet: str, bundle_dir: Path, reference: str) -> None:
    from edgepatch.protocol.bundle import load_bundle
    from edgepatch.protocol.messages import BundleAnnouncement, encode, make_message
    from edgepatch.protocol.topics import bundle_topic

    with load_bundle(bundle_dir) as bundle:
        version, base = bundle.version, bundle.base_version
        artifacts = {e.path: e.sha256 for e in bundle.manifest.artifacts.values()}
        size = sum(e.bytes for e in bundle.manifest.artifacts.values()) + (bundle_dir / "manifest.json").stat().st_size
    ann = BundleAnnouncement(version=version[:16], reference=reference, manifest_sha256=version, size=size,
                             artifacts=artifacts)
    msg = make_message(ann, device_id="cloud", fleet=fleet, base_version=base, variant_id="-", seq=1)
    client = _client(port)
    client.loop_start()
    client.publish(bundle_topic(fleet), encode(msg), qos=1, retain=True).wait_for_publish(30)
    client.loop_stop()
    client.disconnect()
    print(version)


def listen(port: int, fleet: str, seconds: float, out: Path) -> None:
    """Count messages per channel from the fleet's devices until `seconds` pass (or out's .stop appears)."""
    counts: dict[str, int] = {}
    lock = threading.Lock()

    def on_message(_c, _u, message) -> None:  # noqa: ANN001
        channel = message.topic.rsplit("/", 1)[-1]
        with lock:
            counts[channel] = counts.get(channel, 0) + 1

    client = _client(port)
    client.on_message = on_message
    client.subscribe(f"edgepatch/v1/{fleet}/#", qos=1)
    client.loop_start()
    stop = out.with_suffix(".stop")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not stop.exists():
        time.sleep(0.2)
    time.sleep(1.0)  # the last PUBACKed messages reach us right after the device exits
    client.loop_stop()
    out.write_text(json.dumps(counts))


def _host_cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    return ""


ROUND_RE = re.compile(r"round (\d+): (\d+) steps in ([0-9.]+)s")


def report(work: Path, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    r = json.loads((work / "install.json").read_text())
    r.update(json.loads((work / "import.json").read_text()))
    run = json.loads((work / "run.json").read_text())
    rounds = [(int(a), int(b), float(c)) for a, b, c in ROUND_RE.findall((work / "run.log").read_text())]
    steps = sum(n for _, n, _ in rounds)
    secs = sum(s for _, _, s in rounds)
    status = json.loads((work / "status.json").read_text())
    predict = json.loads((work / "predict.json").read_text())
    heard = json.loads((work / "heard.json").read_text())
    bundle_b = (work / "bundle-b.version").read_text().strip()
    term = json.loads((work / "sigterm.json").read_text())
    term.update(json.loads((work / "sigterm-stop.json").read_text()))
    stopped = re.search(r"stopped by SIGTERM after (\d+) committed steps", " ".join((work / "sigterm.log").read_text().split()))
    term["committed_steps_in_stopped_round"] = int(stopped.group(1)) if stopped else None
    result = {
        "figures_are": "qemu-aarch64 user-mode EMULATION on an x86-64 host; not Raspberry Pi measurements",
        "emulator": os.environ.get("PI_QEMU_VERSION", ""), "emulated_cpu": os.environ.get("PI_QEMU_CPU", ""),
        "host_cpu": _host_cpu(), **r,
        "device_run": {"exit_code": run["exit_code"], "rounds": len(rounds), "steps": steps,
                       "wall_s": run["wall_s"], "peak_rss_mb": run["peak_rss_mb"],
                       "step_ms_mean": round(1000 * secs / steps, 1) if steps else None,
                       "round_step_ms": [round(1000 * s / n, 1) for _, n, s in rounds if n]},
        "mqtt_messages_heard_by_host": heard,
        "bundle_update": {"announced": bundle_b, "installed_after": status["bundle_version"],
                          "adopted": status["bundle_version"] == bundle_b},
        "state_step": (status["state"] or {}).get("step"),
        "outbox_after_stop": {k: status["outbox"].get(k) for k in ("unsent", "awaiting_companion")},
        "predict": {"n": len(predict["predictions"]), "personalized": predict["personalized"]},
        "sigterm_mid_round": {"exit_code": term["exit_code"], "stop_seconds": round(term["stop_seconds"], 1),
                              "committed_steps_in_stopped_round": term["committed_steps_in_stopped_round"],
                              "timeout_stop_s": 30},
    }
    ok = (run["exit_code"] == 0 and result["bundle_update"]["adopted"] and not r["heavy_modules"]
          and not r["heavy_installed"] and result["predict"]["n"] == 8 and heard.get("patch", 0) >= len(rounds)
          and result["outbox_after_stop"]["unsent"] == 0 and term["exit_code"] == 0 and term["stop_seconds"] < 30
          and term["committed_steps_in_stopped_round"] is not None)
    result["passed"] = ok
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    t = Table("measure (arm64 under qemu emulation — NOT Pi figures)", "value",
              title="edgepatch device on Debian bookworm arm64 (Python " + r["python"] + ")")
    t.add_row("pip install edgepatch\\[device] size", f"{r['installed_mb']:.1f} MB")
    for name, mb in list(r["largest_packages_mb"].items())[:4]:
        t.add_row(f"  {name}", f"{mb:.1f} MB")
    t.add_row("torch / tensorflow installed", ", ".join(r["heavy_installed"]) or "neither")
    t.add_row("torch / tensorflow imported by the device", ", ".join(r["heavy_modules"]) or "neither")
    d = result["device_run"]
    t.add_row("device run", f"{d['rounds']} rounds, {d['steps']} steps, exit {d['exit_code']}, {d['wall_s']:.0f} s wall")
    t.add_row("φ step time (emulated)", f"{d['step_ms_mean']} ms mean; per round {d['round_step_ms']}")
    t.add_row("peak RSS of device run (qemu included)", f"{d['peak_rss_mb']:.1f} MB")
    t.add_row("MQTT messages the host heard", json.dumps(heard))
    t.add_row("bundle update over MQTT", f"{'adopted' if result['bundle_update']['adopted'] else 'NOT adopted'} "
              f"{bundle_b[:12]}")
    t.add_row("device predict", f"{result['predict']['n']} predictions, personalized={predict['personalized']}")
    sg = result["sigterm_mid_round"]
    t.add_row("SIGTERM mid-round", f"exit {sg['exit_code']} after {sg['stop_seconds']} s (TimeoutStopSec 30 s), "
              f"{sg['committed_steps_in_stopped_round']} steps of the round committed")
    ob = result["outbox_after_stop"]
    t.add_row("outbox after stop", f"{ob['unsent']} not taken by the broker; {ob['awaiting_companion']} patches "
              "kept for the companion's ack (no companion in this check)")
    t.add_row("emulator", f"{result['emulator']} -cpu {result['emulated_cpu']} on {result['host_cpu']}")
    t.add_row("check", "PASSED" if ok else "FAILED")
    Console(width=120).print(t)
    if not ok:
        sys.exit(1)


def main(argv: list[str]) -> None:
    cmd, args = argv[0], argv[1:]
    if cmd == "data":
        make_data(Path(args[0]))
    elif cmd == "announce":
        announce(int(args[0]), args[1], Path(args[2]), args[3])
    elif cmd == "listen":
        listen(int(args[0]), args[1], float(args[2]), Path(args[3]))
    elif cmd == "report":
        report(Path(args[0]), Path(args[1]))
    else:
        sys.exit(f"unknown command {cmd!r}\n{__doc__}")


if __name__ == "__main__":
    main(sys.argv[1:])
