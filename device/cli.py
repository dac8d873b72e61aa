"""`edgepatch device …`: run a device, predict, show its state. Imports no torch or tensorflow."""

from __future__ import annotations

import json
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(help="Device runtime: train patches in the lite runtime, predict, report.",
                  no_args_is_help=True)
console = Console(stderr=True)


def _mount_canoe() -> None:
    from .canoe_cli import app as canoe_app

    app.add_typer(canoe_app, name="canoe", help="Canoe peer transfer: run a helper or a drifting target.")


_mount_canoe()


def _fail(message: str) -> typer.Exit:
    # escape: paths in messages may hold '[…]' (rich markup); soft_wrap: one line per error when piped.
    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    return typer.Exit(code=2)


@app.command("run")
def run_cmd(
    config: Path | None = typer.Option(None, "--config", "-c", help="device configuration file (TOML, see "
                                       "docs/raspberry-pi.md); replaces the options below"),
    profile: str | None = typer.Option(None, help="firmware profile name or .toml path [default: linux_x86_64]"),
    bundle: Path | None = typer.Option(None, help="bundle to install (dir or archive); else the installed one"),
    data: Path | None = typer.Option(None, help="directory of .npz shards (x, y, t) — see docs/data.md"),
    state_dir: Path | None = typer.Option(None, help="where φ, bundles and the outbox live [default: "
                                          "edgepatch-device]"),
    device_id: str | None = typer.Option(None, help="[default: dev-0]"),
    fleet: str | None = typer.Option(None, help="[default: default]"),
    broker: str | None = typer.Option(None, help="mqtt://host:port (mqtts:// uses the profile's TLS files); "
                                      "omit to train offline"),
    mqtt_protocol: str | None = typer.Option(None, help="5 or 3.1.1 (default: the profile's)"),
    runtime: str | None = typer.Option(None, help="litert or executorch (default: the profile's)"),
    rounds: int | None = typer.Option(None, help="training rounds (0 = run until stopped) [default: 1]"),
    steps: int | None = typer.Option(None, help="steps per round (default: the profile's budget)"),
    deadline: float | None = typer.Option(None, help="seconds per round (default: the profile's budget)"),
    interval: float | None = typer.Option(None, help="seconds to wait between rounds [default: 0]"),
    await_bundle: float | None = typer.Option(None, help="after each round, wait up to this many seconds for "
                                              "the cloud's next bundle (rounds in step with MoMoDistill)"),
    await_every: int = typer.Option(1, min=1, help="with --await-bundle: wait only after every N-th round (the "
                                    "companion's --base-every: it updates the base every N device rounds)"),
    fixed_variant: bool = typer.Option(False, help="always train the full variant (no DISTREAL selection)"),
    log_level: str | None = typer.Option(None, help="[default: INFO]"),
    fleet_key: Path | None = typer.Option(None, help="the fleet's bundle-signing public key (fleet-signing.pub "
                                          "from `cloud provision`): install only signed, newer http(s) bundles"),
) -> None:
    """Train φ on local data round after round, publishing patches and metrics when a broker is given.

    SIGTERM (systemd stop) and Ctrl-C finish the current step, abandon the rest of the round, flush the
    outbox and exit 0; φ and the outbox are on disk, and the next start resumes from them."""
    from .service import FLUSH_TIMEOUT_S, write_heartbeat

    flags = {"--profile": profile, "--bundle": bundle, "--data": data, "--state-dir": state_dir,
             "--device-id": device_id, "--fleet": fleet, "--broker": broker, "--mqtt-protocol": mqtt_protocol,
             "--runtime": runtime, "--rounds": rounds, "--steps": steps, "--deadline": deadline,
             "--interval": interval, "--await-bundle": await_bundle, "--fixed-variant": fixed_variant or None,
             "--fleet-key": fleet_key, "--await-every": await_every if await_every != 1 else None}
    if config is not None:
        given = [flag for flag, value in flags.items() if value is not None]
        if given:
            raise _fail(f"{', '.join(given)} cannot be combined with --config: set them in {config}")
        run = _settings_from_config(config, log_level)
    else:
        if data is None:
            raise _fail("give --data DIR (shards of local samples) or --config FILE")
        run = _RunSettings(profile=profile or "linux_x86_64", bundle=bundle, data=data,
                           state_dir=state_dir or Path("edgepatch-device"), device_id=device_id or "dev-0",
                           fleet=fleet or "default", broker=broker, mqtt_protocol=mqtt_protocol, runtime=runtime,
                           rounds=1 if rounds is None else rounds, steps=steps, deadline=deadline,
                           interval=interval or 0.0, await_bundle=await_bundle or 0.0, adaptive=not fixed_variant,
                           log_level=log_level or "INFO", fleet_key=fleet_key, await_every=await_every)
    _run_device(run, FLUSH_TIMEOUT_S, write_heartbeat)


@dataclass
class _RunSettings:
    profile: Any  # a name/path, or a DeviceProfile already resolved by the config file
    bundle: Path | None
    data: Path
    state_dir: Path
    device_id: str
    fleet: str
    broker: str | None
    mqtt_protocol: str | None
    runtime: str | None
    rounds: int
    steps: int | None
    deadline: float | None
    interval: float
    await_bundle: float
    adaptive: bool
    log_level: str
    mqtt_password: str | None = None
    fleet_key: Path | None = None
    await_every: int = 1  # wait for a bundle after every N-th round only


def _settings_from_config(path: Path, log_level: str | None) -> _RunSettings:
    from edgepatch.protocol.bundle import ActiveBundleStore

    from .config import ConfigError, load_config

    try:
        cfg = load_config(path)
        prof = cfg.effective_profile()
        password = cfg.broker.password(prof) if cfg.broker else None
    except ConfigError as exc:
        raise _fail(str(exc)) from exc
    # The file's bundle is the first one only: later bundles arrive from the fleet and must survive restarts.
    first_start = ActiveBundleStore(cfg.state_dir / "bundles").current_version() is None
    return _RunSettings(profile=prof, bundle=cfg.bundle if first_start else None, data=cfg.data_dir,
                        state_dir=cfg.state_dir, device_id=cfg.device_id, fleet=cfg.fleet,
                        broker=cfg.broker.url if cfg.broker else None,
                        mqtt_protocol=cfg.broker.protocol if cfg.broker else None, runtime=cfg.runtime,
                        rounds=cfg.rounds, steps=cfg.steps, deadline=cfg.deadline_s, interval=cfg.interval_s,
                        await_bundle=cfg.await_bundle_s, adaptive=cfg.adaptive,
                        log_level=log_level or cfg.log_level, mqtt_password=password, fleet_key=cfg.fleet_key)


def _run_device(run: _RunSettings, flush_timeout: float, heartbeat: Any) -> None:
    from edgepatch.logs import show_level
    from edgepatch.protocol.manifest import BundleError

    from .profile import DeviceProfile, ProfileError, load_profile
    from .runtime import DeviceConfig, DeviceRuntime, RoundInterrupted

    show_level(run.log_level)  # our records on the terminal; frameworks' go to the log file
    # Install the handlers before the slow start-up (bundle install, first activation): a stop that
    # arrives then is remembered and honoured at the first step boundary.
    stop = threading.Event()
    received: list[str] = []

    def on_signal(signum: int, _frame: Any) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    device = None
    done = 0
    last: dict[str, Any] = {}
    finished = False  # the loop ended by itself or by a signal, not by an exception
    try:
        try:
            prof = run.profile if isinstance(run.profile, DeviceProfile) else load_profile(run.profile)
            cfg = DeviceConfig(device_id=run.device_id, profile=prof, state_dir=run.state_dir, data_dir=run.data,
                               fleet=run.fleet, runtime=run.runtime, broker=run.broker, adaptive=run.adaptive,
                               mqtt_protocol=run.mqtt_protocol, mqtt_password=run.mqtt_password,
                               fleet_key=run.fleet_key)
            heartbeat(run.state_dir, state="starting", rounds_done=0)
            device = DeviceRuntime(cfg, run.bundle)
        except (ProfileError, BundleError, ValueError, OSError) as exc:
            raise _fail(str(exc)) from exc
        device.stop_requested = stop
        steps = run.steps or prof.budgets.steps_per_round
        deadline = run.deadline if run.deadline is not None else prof.budgets.round_deadline_s
        while (run.rounds == 0 or done < run.rounds) and not stop.is_set():
            heartbeat(run.state_dir, state="running", rounds_done=done, round_started=time.time(),
                      bundle=device.bundle.version, last_round=last)
            try:
                report = device.run_round(steps, deadline)
            except RoundInterrupted as exc:
                console.print(f"round {done + 1}: stopped by {received[-1] if received else 'request'} "
                              f"after {exc.steps_done} committed steps")
                break
            done += 1
            s = report.summary()
            last = {k: s[k] for k in ("steps", "seconds", "met_deadline", "loss_last", "holdout_acc_after")
                    if k in s}
            console.print(f"round {done}: {s['steps']} steps in {s['seconds']:.2f}s "
                          f"({'met' if s['met_deadline'] else 'MISSED'} {deadline}s), variants {s['variants']}, "
                          f"loss {s['loss_first']:.3f}→{s['loss_last']:.3f}, holdout acc "
                          f"{s['holdout_acc_before']:.3f}→{s['holdout_acc_after']:.3f}")
            more = run.rounds == 0 or done < run.rounds
            if run.await_bundle and more and done % run.await_every == 0 and not stop.is_set():
                adopted = device.wait_for_new_bundle(run.await_bundle)
                console.print(f"bundle {'adopted: ' + device.bundle.version[:12] if adopted else 'unchanged'}")
                gate = device.last_gate_decision
                if gate is not None:
                    console.print(f"adoption gate: {'adopted' if gate.adopt else 'rejected'} {gate.version[:12]} "
                                  f"(holdout {gate.holdout_n}: active {gate.acc_active:.3f}, new+old φ "
                                  f"{gate.acc_new_old_phi:.3f}, new+refit φ {gate.acc_new_refit:.3f})")
            if run.interval and more:
                stop.wait(run.interval)  # a stop cuts the pause short
        finished = True
    finally:
        if device is not None:
            drained = device.link.wait_drained(flush_timeout) if device.link is not None else True
            device.stop()
            state = device.trainer.state
            reason = received[-1] if received else ("rounds done" if finished else "error (see the log)")
            heartbeat(run.state_dir, state="stopped" if finished else "failed", reason=reason,
                      rounds_done=done, step=state.step, bundle=device.bundle.version,
                      outbox_drained=drained, last_round=last)
            if not drained:
                console.print("outbox not fully delivered; the rest stays on disk and is sent at the next start")
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@app.command("predict")
def predict_cmd(
    input: Path = typer.Argument(..., help=".npz with an 'x' array (N, *input_shape)"),
    state_dir: Path = typer.Option(Path("edgepatch-device")),
    runtime: str = typer.Option("litert"),
    base: bool = typer.Option(False, help="ignore the device's φ (the unpersonalized model)"),
) -> None:
    """Predict with the frozen inference program and the device's current φ; prints JSON."""
    from edgepatch.protocol.bundle import ActiveBundleStore
    from edgepatch.protocol.manifest import BundleError

    from .engine import open_engine, predict_logits
    from .state import DeviceStateStore, StateError

    try:
        bundle = ActiveBundleStore(state_dir / "bundles").current()
        if bundle is None:
            raise BundleError(f"no bundle installed in {state_dir}")
        with np.load(input, allow_pickle=False) as npz:
            x = np.asarray(npz["x"], np.float32)
        if tuple(x.shape[1:]) != tuple(bundle.manifest.input.shape):
            raise ValueError(f"x has sample shape {x.shape[1:]}, the model needs {tuple(bundle.manifest.input.shape)}")
        state = DeviceStateStore(state_dir / "state").load()
        phi = np.zeros(bundle.patch_spec.k, np.float32) if (base or state is None) else state.phi
        logits = predict_logits(open_engine(bundle, runtime), x, phi)
    except (BundleError, StateError, ValueError, OSError, KeyError) as exc:
        raise _fail(str(exc)) from exc
    print(json.dumps({"predictions": logits.argmax(axis=1).tolist(), "personalized": not base and state is not None}))


@app.command("status")
def status_cmd(
    state_dir: Path | None = typer.Option(None, help="the device's state directory [default: edgepatch-device]"),
    config: Path | None = typer.Option(None, "--config", "-c", help="read the state directory from the "
                                       "device configuration file (what the service runs with)"),
    text: bool = typer.Option(False, "--text", help="a readable summary instead of JSON"),
) -> None:
    """The installed bundle, the last committed training state, the outbox and the service's heartbeat.

    Only reads: safe while the service runs, and works for an operator in the service's group."""
    from edgepatch.protocol.bundle import ActiveBundleStore

    from .service import outbox_status, read_service_status
    from .state import DeviceStateStore, StateError

    if config is not None and state_dir is not None:
        raise _fail("give --state-dir or --config, not both")
    if config is not None:
        from .config import ConfigError, load_config

        try:
            state_dir = load_config(config).state_dir
        except ConfigError as exc:
            raise _fail(str(exc)) from exc
    state_dir = state_dir or Path("edgepatch-device")
    if not state_dir.is_dir():
        raise _fail(f"{state_dir}: no device state here (not a directory, or not readable by you)")
    try:
        state = DeviceStateStore(state_dir / "state").load()
    except (StateError, OSError) as exc:
        raise _fail(f"state in {state_dir}: {exc}") from exc
    info: dict[str, Any] = {"bundle_version": ActiveBundleStore(state_dir / "bundles").current_version(),
                            "state": None, "outbox": outbox_status(state_dir),
                            "service": read_service_status(state_dir)}
    if state is not None:
        info["state"] = {"step": state.step, "base_version": state.base_version, "variant": state.variant_id,
                         "phi_norm": float(np.linalg.norm(state.phi)), "metrics": state.metrics}
    if not text:
        print(json.dumps(info, indent=2))
        return
    print(_status_text(state_dir, info))


def _status_text(state_dir: Path, info: dict[str, Any]) -> str:
    svc, st, ob = info["service"], info["state"], info["outbox"]
    lines = [f"device state   {state_dir}",
             f"service        {svc.get('state', '?')}"
             + (f" (pid {svc['pid']}, updated {svc['age_s']:.0f} s ago)" if "pid" in svc else ""),
             f"rounds done    {svc.get('rounds_done', '-')}" + (f"; stop reason: {svc['reason']}" if "reason" in svc
                                                                else ""),
             f"bundle         {(info['bundle_version'] or 'none installed')[:16]}"]
    if st is not None:
        loss = st["metrics"].get("loss")
        lines += [f"base model     {st['base_version'][:16]}",
                  f"steps          {st['step']} (variant {st['variant']})",
                  f"phi norm       {st['phi_norm']:.4f}" + (f", last loss {loss:.4f}" if loss is not None else "")]
    else:
        lines.append("steps          0 (no committed state yet)")
    last = svc.get("last_round") or {}
    if last:
        lines.append(f"last round     {last.get('steps')} steps in {last.get('seconds', 0):.1f} s, holdout acc "
                     f"{last.get('holdout_acc_after', float('nan')):.3f}")
    if ob.get("pending") is None:
        lines.append(f"outbox         {ob.get('error')}")
    else:
        age = ob.get("oldest_age_s")
        lines.append(f"outbox         {ob['unsent']} not yet taken by the broker, {ob['awaiting_companion']} "
                     f"awaiting the companion's ack" + (f" (oldest {age:.0f} s)" if age else ""))
    return "\n".join(lines)


@app.command("unit")
def unit_cmd(
    profile: str = typer.Option("raspberry_pi_4", help="firmware profile whose limits the unit carries"),
    config: str = typer.Option("/etc/edgepatch/device.toml", help="configuration file the service reads"),
    executable: str = typer.Option("/opt/edgepatch/venv/bin/edgepatch", help="the installed edgepatch"),
    user: str = typer.Option("edgepatch", help="the dedicated service user"),
) -> None:
    """Print the systemd unit for a device class (memory and CPU limits from its firmware profile)."""
    from .profile import ProfileError, load_profile
    from .service import render_unit

    try:
        prof = load_profile(profile)
    except ProfileError as exc:
        raise _fail(str(exc)) from exc
    print(render_unit(prof, config=config, executable=executable, user=user), end="")
