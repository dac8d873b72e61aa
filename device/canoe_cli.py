"""`edgepatch device canoe …`: run a Canoe helper or a drifting Canoe target on a device.

    python -m edgepatch.device.canoe_cli helper --bundle B --data DIR --broker mqtt://h:p --fleet F --device-id D
    python -m edgepatch.device.canoe_cli target --bundle B --data DIR --broker mqtt://h:p --fleet F --device-id D \\
        --steps-per-tick 2 --ticks 40 --out summary.json

The lead mounts `app` as `edgepatch device canoe` (`app.add_typer(canoe_app, name="canoe")`). Both commands
need a companion running Canoe matching (`edgepatch cloud serve --canoe`) on the same broker and fleet.

- `helper` loads its shards, optionally fine-tunes its own model on them (`--warmup-steps`), publishes its
  Canoe metadata (label histogram, retained) and answers every relayed task with a slice until
  SIGINT/SIGTERM or `--run-for` seconds; one log line per answer.
- `target` replays its shards in time order (t ascending) as a stream of `--samples-per-tick` samples per
  tick: predict (ensemble) then learn (`--steps-per-tick` full-weight steps), detect drift, request help,
  take in slices, publish its SAMME weights; one progress line per tick and a JSON summary (`--out`).
  Accuracy is prequential: every sample is predicted before the device learns from it.

Own model: `--model` (a params archive of the base W, `protocol.params.save_params`), else
`<state-dir>/canoe-model.npz` when it exists, else the bundle's base W. With `--state-dir` the model is
saved there (atomically) at the end, so the next run resumes from it; a helper ships by-reference slices
from `<state-dir>/slices`.

`--runtime litert` (default) imports no torch or tensorflow; `--runtime executorch` runs the bundle's
ExecuTorch programs (torch comes with them).
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import typer
from rich.console import Console

from edgepatch.protocol.bundle import Bundle, load_bundle
from edgepatch.protocol.canoe import CanoeMessage, CanoeTask, canoe_topic
from edgepatch.protocol.manifest import BundleError
from edgepatch.protocol.params import ParamsError, check_params, load_params, save_params, write_atomic
from edgepatch.protocol.shards import ShardError, read_shards
from edgepatch.protocol.transport import broker_uses_tls, parse_broker

from .canoe_boost import TailoredModel, bundle_variants, tailored_from_bundle
from .canoe_helper import CanoeHelper
from .canoe_target import CanoeLink, CanoeTarget, DriftDetector

app = typer.Typer(help="Canoe on a device: help peers with slices of your model, or learn through a drift "
                       "with their help.", no_args_is_help=True)
console = Console(stderr=True)
log = logging.getLogger("edgepatch.device.canoe.cli")

MODEL_FILE = "canoe-model.npz"
MQTT_PROTOCOLS = {"5": "mqttv5", "3.1.1": "mqttv311"}


class CanoeCliError(ValueError):
    """Bad input to a Canoe command (the message names the problem)."""


def _fail(message: str) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code=2)


# ------------------------------------------------------------------------------------------ plumbing

def mqtt_protocol_name(version: str) -> str:
    """'5' → 'mqttv5', '3.1.1' → 'mqttv311'."""
    if version not in MQTT_PROTOCOLS:
        raise CanoeCliError(f"--mqtt-protocol must be one of {sorted(MQTT_PROTOCOLS)}, got {version!r}")
    return MQTT_PROTOCOLS[version]


def open_link(broker: str, mqtt_protocol: str, fleet: str, device_id: str) -> CanoeLink:
    """A (not yet started) Canoe link to a plain mqtt:// broker."""
    if broker_uses_tls(broker):
        raise CanoeCliError(f"broker {broker!r}: the Canoe commands speak plain mqtt:// only (no TLS yet)")
    host, port = parse_broker(broker)
    return CanoeLink(fleet, device_id, host, port, protocol=mqtt_protocol_name(mqtt_protocol))


def model_path(model: Path | None, state_dir: Path | None) -> Path | None:
    """Where the own model's base W comes from: `--model`, else the state dir's saved one, else None."""
    if model is not None:
        if not model.is_file():
            raise CanoeCliError(f"--model {model} does not exist")
        return model
    if state_dir is not None and (state_dir / MODEL_FILE).is_file():
        return state_dir / MODEL_FILE
    return None


def load_own_model(bundle: Bundle, path: Path | None, runtime: str = "litert") -> TailoredModel:
    """The device's own model on `runtime`: the bundle's base W, replaced by the archive at `path` if given
    (checked against the bundle's model description)."""
    model = tailored_from_bundle(bundle, runtime=runtime)
    if path is not None:
        base = load_params(path)
        missing = sorted(set(model.base) - set(base))
        extra = sorted(set(base) - set(model.base))
        if missing or extra:
            raise ParamsError(f"{path}: parameters do not match the bundle's model "
                              f"(missing {missing}, unexpected {extra})")
        check_params(base, model.spec, None)
        model.base = {k: np.asarray(v, np.float32) for k, v in base.items()}
    return model


def load_data(bundle: Bundle, data: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The device's shards, sorted by time; CanoeCliError when there are none."""
    spec = bundle.manifest.model
    x, y, t = read_shards(data, bundle.manifest.input.shape, spec.num_classes)
    if not len(y):
        raise CanoeCliError(f"{data} holds no samples (.npz shards with x, y, t; see docs/data.md)")
    return x, y, t


def stop_on_signals() -> threading.Event:
    """An event set by SIGINT or SIGTERM (the loops check it and shut down cleanly)."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")


# --------------------------------------------------------------------------------------------- helper

def warm_up(model: TailoredModel, x: np.ndarray, y: np.ndarray, steps: int, seed: int) -> float | None:
    """`steps` full-weight SGD steps on the device's own data; returns the last loss (None for 0 steps)."""
    rng = np.random.default_rng(seed)
    loss = None
    for _ in range(steps):
        idx = rng.choice(len(y), size=model.batch, replace=len(y) < model.batch)
        loss = model.train_step(x[idx], y[idx])
    return loss


def serve_helper(helper: CanoeHelper, link: CanoeLink) -> list[dict[str, Any]]:
    """Answer tasks relayed to `helper` on `link` (on the link's thread); returns the live answer log."""
    answers: list[dict[str, Any]] = []

    def on_task(msg: CanoeMessage) -> None:
        task = msg.payload
        if not isinstance(task, CanoeTask):
            return
        started = time.perf_counter()
        offer = helper.answer(task)
        sent = link.publish("offer", offer)
        entry = {"request_id": task.request_id, "target": task.target, "classes": task.classes,
                 "ok": offer.ok, "error": offer.error, "slice_bytes": offer.size, "message_bytes": sent,
                 "by": "inline" if offer.inline_b64 else ("reference" if offer.reference else "-"),
                 "seconds": round(time.perf_counter() - started, 3)}
        answers.append(entry)
        log.info("canoe helper=%s answered request=%s target=%s classes=%s ok=%s slice_bytes=%d by=%s "
                 "seconds=%.3f%s", helper.device_id, task.request_id, task.target, task.classes, offer.ok,
                 offer.size, entry["by"], entry["seconds"], f" error={offer.error!r}" if offer.error else "")

    link.subscribe(canoe_topic(link.fleet, helper.device_id, "task"), on_task)
    return answers


@app.command("helper")
def helper_cmd(
    bundle: Path = typer.Option(..., help="the installed bundle (directory or archive)"),
    data: Path = typer.Option(..., help="directory of .npz shards (x, y, t): the helper's own data"),
    broker: str = typer.Option(..., help="mqtt://host:port"),
    mqtt_protocol: str = typer.Option("5", help="5 or 3.1.1"),
    connect_timeout: float = typer.Option(10.0, help="seconds to wait for the broker at start"),
    fleet: str = typer.Option("default"),
    device_id: str = typer.Option(..., help="this device's id"),
    state_dir: Path | None = typer.Option(None, help="own model (canoe-model.npz) and by-reference slices"),
    model: Path | None = typer.Option(None, help="params archive of the own base W (default: state dir, "
                                      "else the bundle's)"),
    warmup_steps: int = typer.Option(0, help="fine-tune the own model on the local data before serving"),
    run_for: float = typer.Option(0.0, help="serve this many seconds (0 = until SIGINT/SIGTERM)"),
    seed: int = typer.Option(0),
    runtime: str = typer.Option("litert", help="litert or executorch (programs the bundle ships)"),
    log_level: str = typer.Option("INFO"),
) -> None:
    """Answer Canoe tasks with slices of this device's model until SIGINT/SIGTERM (or --run-for)."""
    _setup_logging(log_level)
    try:
        if warmup_steps < 0 or run_for < 0:
            raise CanoeCliError("--warmup-steps and --run-for must be >= 0")
        link = open_link(broker, mqtt_protocol, fleet, device_id)  # not connected yet: checks the arguments
        b = load_bundle(bundle)
        x, y, _ = load_data(b, data)
        own = load_own_model(b, model_path(model, state_dir), runtime)
    except (CanoeCliError, BundleError, ShardError, ParamsError, ValueError, OSError) as exc:
        raise _fail(str(exc)) from exc
    stop = stop_on_signals()
    loss = warm_up(own, x, y, warmup_steps, seed)
    if state_dir is not None:
        save_params(state_dir / MODEL_FILE, own.base)
    helper = CanoeHelper(device_id, own, x, y, bundle_variants(b), b.base_version,
                         share_dir=state_dir / "slices" if state_dir is not None else None, seed=seed)
    answers = serve_helper(helper, link)
    try:
        link.start(connect_timeout)
    except ConnectionError as exc:
        raise _fail(str(exc)) from exc
    try:
        link.publish("meta", helper.meta(), retain=True)
        hist = helper.meta().label_histogram
        console.print(f"canoe helper {device_id} serving fleet {fleet!r}: {len(y)} samples, label histogram "
                      f"{hist}" + (f", warm-up loss {loss:.3f}" if loss is not None else ""))
        stop.wait(run_for or None)
    finally:
        link.flush(5.0)
        link.stop()
    console.print(f"canoe helper {device_id} stopped after {len(answers)} answer(s)")


# --------------------------------------------------------------------------------------------- target

@dataclass(frozen=True)
class StreamSettings:
    steps_per_tick: int
    ticks: int
    samples_per_tick: int = 16
    wait_for_help: float = 0.0  # seconds to block for a reply after a request (0 = keep learning at once)
    report_every: int = 5  # ticks between weight reports (also right after a slice joins and at the end)

    def __post_init__(self) -> None:
        for name in ("steps_per_tick", "ticks", "samples_per_tick", "report_every"):
            if getattr(self, name) < 1:
                raise CanoeCliError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.wait_for_help < 0:
            raise CanoeCliError(f"--wait-for-help must be >= 0, got {self.wait_for_help}")


def _wait_for_reply(target: CanoeTarget, seconds: float, stop: threading.Event) -> None:
    deadline = time.monotonic() + seconds
    while target.inbox.empty() and time.monotonic() < deadline and not stop.is_set():
        time.sleep(0.02)


def run_stream(target: CanoeTarget, link: CanoeLink, x: np.ndarray, y: np.ndarray, t: np.ndarray,
               settings: StreamSettings, stop: threading.Event | None = None,
               on_tick: Any = None) -> dict[str, Any]:
    """Replay (x, y, t) (sorted by t) through `target` tick by tick; returns the run summary."""
    stop = stop or threading.Event()
    num_classes = target.model.spec.num_classes
    recent: deque[bool] = deque(maxlen=target.detector.window)
    curve: list[dict[str, Any]] = []
    bytes_sent = reports = 0
    started = time.perf_counter()
    for tick in range(settings.ticks):
        begin = tick * settings.samples_per_tick
        if begin >= len(y) or stop.is_set():
            break
        xb, yb = x[begin:begin + settings.samples_per_tick], y[begin:begin + settings.samples_per_tick]
        own_pred = target.model.logits(xb).argmax(axis=1)  # the own model alone, for comparison
        pred = target.observe(xb, yb)  # predict first (prequential), then keep the samples
        recent.extend((pred == yb).tolist())
        losses = target.learn(settings.steps_per_tick)
        joined = target.poll_replies()
        request = target.maybe_request()
        if request is not None:
            bytes_sent += link.publish("request", request)
            if settings.wait_for_help:
                _wait_for_reply(target, settings.wait_for_help, stop)
                joined += target.poll_replies()
        last = begin + len(yb) >= len(y) or tick == settings.ticks - 1
        if joined or (target.ensemble.helpers and (tick + 1) % settings.report_every == 0) or last:
            bytes_sent += target.publish_weights(link)
            reports += 1
        correct = pred == yb
        point = {
            "tick": tick, "samples": begin + len(yb), "t": float(t[begin + len(yb) - 1]),
            "accuracy": float(correct.mean()), "own_accuracy": float((own_pred == yb).mean()),
            "window_accuracy": float(np.mean(recent)), "loss": float(np.mean(losses)),
            "members": len(target.ensemble.weights()), "weights": target.ensemble.weights(),
            "class_total": np.bincount(yb, minlength=num_classes).tolist(),
            "class_correct": np.bincount(yb[correct], minlength=num_classes).tolist(),
            "request": request.request_id if request is not None else None, "slices_joined": joined,
            "bytes_received": target.slice_bytes_received,
        }
        curve.append(point)
        if on_tick is not None:
            on_tick(point)
    return summarize(target, curve, bytes_sent, reports, settings, time.perf_counter() - started)


def _accuracy_on(curve: list[dict[str, Any]], classes: list[int]) -> tuple[float | None, int]:
    total = sum(p["class_total"][c] for p in curve for c in classes)
    right = sum(p["class_correct"][c] for p in curve for c in classes)
    return (right / total if total else None), total


def drifted_accuracy(curve: list[dict[str, Any]], classes: list[int]) -> dict[str, Any]:
    """Prequential accuracy on `classes` from their first appearance until help arrived (`before_help`,
    including the tick a slice joined: its predictions were made before) and after it (`after_help`)."""
    first = next((p["tick"] for p in curve if any(p["class_total"][c] for c in classes)), None)
    helped = next((p["tick"] for p in curve if p["slices_joined"]), None)
    out: dict[str, Any] = {"classes": classes, "first_seen_tick": first, "help_tick": helped}
    if first is None:
        return out
    end = helped if helped is not None else curve[-1]["tick"]
    out["before_help"], out["before_help_samples"] = _accuracy_on([p for p in curve if first <= p["tick"] <= end],
                                                                  classes)
    if helped is not None:
        after = [p for p in curve if p["tick"] > helped]
        out["after_help"], out["after_help_samples"] = _accuracy_on(after, classes)
        out["after_help_ticks"] = len(after)
    return out


def summarize(target: CanoeTarget, curve: list[dict[str, Any]], bytes_sent: int, reports: int,
              settings: StreamSettings, seconds: float) -> dict[str, Any]:
    events = target.events
    requests = [e for e in events if e["event"] == "request"]
    slices = [e for e in events if e["event"] == "slice"]
    requested = sorted({c for e in requests for c in e["classes"]})
    samples = curve[-1]["samples"] if curve else 0
    return {
        "device_id": target.device_id, "base_version": target.base_version, "samples": samples,
        "ticks": len(curve), "steps_per_tick": settings.steps_per_tick,
        "samples_per_tick": settings.samples_per_tick, "seconds": round(seconds, 3),
        "requests": requests, "answered": len(slices), "slices": slices,
        "errors": [e for e in events if e["event"] in ("error", "rejected")],
        "helpers": sorted({e["helper"] for e in slices}), "retired": list(target.ensemble.retired),
        "final_weights": target.ensemble.weights(), "final_members": len(target.ensemble.weights()),
        "bytes_received": target.slice_bytes_received, "bytes_sent": bytes_sent, "weight_reports": reports,
        "accuracy": float(np.average([p["accuracy"] for p in curve],
                                     weights=[sum(p["class_total"]) for p in curve])) if curve else None,
        "final_window_accuracy": curve[-1]["window_accuracy"] if curve else None,
        "drifted": drifted_accuracy(curve, requested) if requested else None,
        "curve": curve,
    }


def _print_tick(point: dict[str, Any]) -> None:
    weights = ", ".join(f"{k.split('/')[0]}={v:.2f}" for k, v in point["weights"].items())
    extra = f"  request {point['request']}" if point["request"] else ""
    extra += f"  +{point['slices_joined']} slice(s), {point['bytes_received']} B" if point["slices_joined"] else ""
    console.print(f"tick {point['tick']:3d}  samples {point['samples']:5d}  acc {point['accuracy']:.3f}  "
                  f"own {point['own_accuracy']:.3f}  window {point['window_accuracy']:.3f}  "
                  f"members {point['members']}  [{weights}]{extra}")


@app.command("target")
def target_cmd(
    bundle: Path = typer.Option(..., help="the installed bundle (directory or archive)"),
    data: Path = typer.Option(..., help="directory of .npz shards (x, y, t), replayed in time order"),
    broker: str = typer.Option(..., help="mqtt://host:port"),
    mqtt_protocol: str = typer.Option("5", help="5 or 3.1.1"),
    connect_timeout: float = typer.Option(10.0, help="seconds to wait for the broker at start"),
    fleet: str = typer.Option("default"),
    device_id: str = typer.Option(..., help="this device's id"),
    steps_per_tick: int = typer.Option(2, help="full-weight SGD steps per tick"),
    ticks: int = typer.Option(..., help="ticks to run (fewer if the data runs out)"),
    samples_per_tick: int = typer.Option(16, help="new labelled samples per tick"),
    state_dir: Path | None = typer.Option(None, help="own model (canoe-model.npz), saved at the end"),
    model: Path | None = typer.Option(None, help="params archive of the own base W (default: state dir, "
                                      "else the bundle's)"),
    reference: int = typer.Option(128, help="drift detector: samples in the reference window"),
    window: int = typer.Option(96, help="drift detector: recent samples compared with the reference"),
    drop: float = typer.Option(0.15, help="drift detector: accuracy drop that counts as drift"),
    cooldown: int = typer.Option(64, help="samples between two help requests"),
    wait_for_help: float = typer.Option(0.0, help="after a request, block up to this many seconds for the "
                                        "reply (0 = keep learning; the reply is taken in on a later tick)"),
    report_every: int = typer.Option(5, help="ticks between ensemble weight reports"),
    out: Path | None = typer.Option(None, help="write the JSON summary here"),
    seed: int = typer.Option(0),
    runtime: str = typer.Option("litert", help="litert or executorch (programs the bundle ships)"),
    log_level: str = typer.Option("INFO"),
) -> None:
    """Learn on the local stream, ask the fleet for help when it drifts, boost with helper slices."""
    _setup_logging(log_level)
    try:
        settings = StreamSettings(steps_per_tick, ticks, samples_per_tick, wait_for_help, report_every)
        if reference < 1 or window < 2 or not 0 < drop < 1 or cooldown < 0:
            raise CanoeCliError("need --reference >= 1, --window >= 2, 0 < --drop < 1, --cooldown >= 0")
        link = open_link(broker, mqtt_protocol, fleet, device_id)  # not connected yet: checks the arguments
        b = load_bundle(bundle)
        x, y, t = load_data(b, data)
        own = load_own_model(b, model_path(model, state_dir), runtime)
    except (CanoeCliError, BundleError, ShardError, ParamsError, ValueError, OSError) as exc:
        raise _fail(str(exc)) from exc
    spec = b.manifest.model
    target = CanoeTarget(device_id, own, bundle_variants(b), b.base_version,
                         DriftDetector(spec.num_classes, reference=reference, window=window, drop=drop),
                         cooldown=cooldown, seed=seed)
    link.subscribe(canoe_topic(fleet, device_id, "reply"), target.on_message)
    stop = stop_on_signals()
    try:
        link.start(connect_timeout)
    except ConnectionError as exc:
        raise _fail(str(exc)) from exc
    console.print(f"canoe target {device_id}: {len(y)} samples, {ticks} ticks of {samples_per_tick} samples, "
                  f"{steps_per_tick} steps per tick")
    try:
        summary = run_stream(target, link, x, y, t, settings, stop, on_tick=_print_tick)
    finally:
        link.flush(5.0)
        link.stop()
    if state_dir is not None:
        save_params(state_dir / MODEL_FILE, own.base)
    if out is not None:
        write_atomic(out, json.dumps(summary, indent=1).encode())
    drifted = summary["drifted"] or {}
    console.print(f"done: {summary['ticks']} ticks, {len(summary['requests'])} request(s), "
                  f"{summary['answered']} answered, helpers {summary['helpers']}, {summary['bytes_received']} "
                  f"slice bytes received; drifted classes {drifted.get('classes')}: accuracy before help "
                  f"{drifted.get('before_help')}, after {drifted.get('after_help')}")


if __name__ == "__main__":
    app()
