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
from pathlib import Path
from typing import Any

import numpy as np
import typer
from rich.console import Console

from edgepatch.protocol.bundle import Bundle, load_bundle
from edgepatch.protocol.canoe import CanoeMessage, CanoeTask, canoe_topic
from edgepatch.protocol.manifest import BundleError
from edgepatch.protocol.mqtt import MqttConfigError, MqttSettings, MqttVersion
from edgepatch.protocol.params import ParamsError, check_params, load_params, save_params, write_atomic
from edgepatch.protocol.shards import ShardError, read_shards

from .canoe_boost import TailoredModel, bundle_variants, tailored_from_bundle
from .canoe_helper import CanoeHelper
from .canoe_stream import StreamSettings, run_stream
from .canoe_target import CanoeLink, CanoeTarget, DriftDetector

app = typer.Typer(help="Canoe on a device: help peers with slices of your model, or learn through a drift "
                       "with their help.", no_args_is_help=True)
console = Console(stderr=True)
log = logging.getLogger("edgepatch.device.canoe.cli")

MODEL_FILE = "canoe-model.npz"


class CanoeCliError(ValueError):
    """Bad input to a Canoe command (the message names the problem)."""


def _fail(message: str) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code=2)


# ------------------------------------------------------------------------------------------ plumbing

def mqtt_protocol_name(version: str) -> MqttVersion:
    """'5' or '3.1.1' → the MqttVersion (CanoeCliError naming the choices otherwise)."""
    try:
        return MqttVersion.parse(version)
    except MqttConfigError as exc:
        raise CanoeCliError(f"--mqtt-protocol must be one of {[v.value for v in MqttVersion]}: {exc}") from None


def open_link(broker: str | None, mqtt_protocol: str, fleet: str, device_id: str,
              credentials: Path | None = None) -> CanoeLink:
    """A (not yet started) Canoe link: mqtt://, or mqtts:// (TLS, verified against the system's CAs), or the
    device's provisioned login (`credentials`: TLS with the fleet CA, password read from its file)."""
    client_id = f"edgepatch-canoe-{fleet}-{device_id}"
    try:
        version = mqtt_protocol_name(mqtt_protocol)
        if credentials is not None:
            settings = MqttSettings.from_credentials(credentials, client_id, broker, version=version)
        elif broker is None:
            raise CanoeCliError("give --broker mqtt://host:port or --credentials DIR (from `cloud provision`)")
        else:
            settings = MqttSettings.from_url(broker, version=version, client_id=client_id)
    except MqttConfigError as exc:
        raise CanoeCliError(str(exc)) from None
    return CanoeLink(fleet, device_id, settings=settings)


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
    from edgepatch.logs import show_level

    show_level(level)  # our records on the terminal; frameworks' go to the log file (edgepatch/logs.py)


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
    broker: str | None = typer.Option(None, help="mqtt://host:port (default: the credentials' broker.url)"),
    credentials: Path | None = typer.Option(None, help="the device's folder from `cloud provision`"),
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
        link = open_link(broker, mqtt_protocol, fleet, device_id, credentials)  # not connected: checks args
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
    broker: str | None = typer.Option(None, help="mqtt://host:port (default: the credentials' broker.url)"),
    credentials: Path | None = typer.Option(None, help="the device's folder from `cloud provision`"),
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
        link = open_link(broker, mqtt_protocol, fleet, device_id, credentials)  # not connected: checks args
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
