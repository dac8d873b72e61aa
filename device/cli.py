"""`edgepatch device …`: run a device, predict, show its state. Imports no torch or tensorflow."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

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
    profile: str = typer.Option("linux_x86_64", help="firmware profile name or .toml path"),
    bundle: Path | None = typer.Option(None, help="bundle to install (dir or archive); else the installed one"),
    data: Path = typer.Option(..., help="directory of .npz shards (x, y, t) — see docs/data.md"),
    state_dir: Path = typer.Option(Path("edgepatch-device"), help="where φ, bundles and the outbox live"),
    device_id: str = typer.Option("dev-0"),
    fleet: str = typer.Option("default"),
    broker: str | None = typer.Option(None, help="mqtt://host:port (mqtts:// uses the profile's TLS files); "
                                      "omit to train offline"),
    mqtt_protocol: str | None = typer.Option(None, help="5 or 3.1.1 (default: the profile's)"),
    runtime: str | None = typer.Option(None, help="litert or executorch (default: the profile's)"),
    rounds: int = typer.Option(1, help="training rounds (0 = run until interrupted)"),
    steps: int | None = typer.Option(None, help="steps per round (default: the profile's budget)"),
    deadline: float | None = typer.Option(None, help="seconds per round (default: the profile's budget)"),
    interval: float = typer.Option(0.0, help="seconds to wait between rounds"),
    await_bundle: float = typer.Option(0.0, help="after each round, wait up to this many seconds for the "
                                       "cloud's next bundle (rounds in step with MoMoDistill)"),
    fixed_variant: bool = typer.Option(False, help="always train the full variant (no DISTREAL selection)"),
    log_level: str = typer.Option("INFO"),
) -> None:
    """Train φ on local data round after round, publishing patches and metrics when a broker is given."""
    from edgepatch.protocol.manifest import BundleError

    from .profile import ProfileError, load_profile
    from .runtime import DeviceConfig, DeviceRuntime

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        prof = load_profile(profile)
        cfg = DeviceConfig(device_id=device_id, profile=prof, state_dir=state_dir, data_dir=data, fleet=fleet,
                           runtime=runtime, broker=broker, adaptive=not fixed_variant,
                           mqtt_protocol=mqtt_protocol)
        device = DeviceRuntime(cfg, bundle)
    except (ProfileError, BundleError, ValueError, OSError) as exc:
        raise _fail(str(exc)) from exc
    steps = steps or prof.budgets.steps_per_round
    deadline = deadline if deadline is not None else prof.budgets.round_deadline_s
    done = 0
    try:
        while rounds == 0 or done < rounds:
            report = device.run_round(steps, deadline)
            done += 1
            s = report.summary()
            console.print(f"round {done}: {s['steps']} steps in {s['seconds']:.2f}s "
                          f"({'met' if s['met_deadline'] else 'MISSED'} {deadline}s), variants {s['variants']}, "
                          f"loss {s['loss_first']:.3f}→{s['loss_last']:.3f}, holdout acc "
                          f"{s['holdout_acc_before']:.3f}→{s['holdout_acc_after']:.3f}")
            if await_bundle and (rounds == 0 or done < rounds):
                adopted = device.wait_for_new_bundle(await_bundle)
                console.print(f"bundle {'adopted: ' + device.bundle.version[:12] if adopted else 'unchanged'}")
            if interval:
                time.sleep(interval)
    except KeyboardInterrupt:
        console.print("interrupted; state is committed after every step")
    finally:
        if device.link is not None:
            device.link.wait_drained(5.0)
        device.stop()


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
def status_cmd(state_dir: Path = typer.Option(Path("edgepatch-device"))) -> None:
    """The installed bundle and the last committed training state."""
    from edgepatch.protocol.bundle import ActiveBundleStore

    from .state import DeviceStateStore

    store = ActiveBundleStore(state_dir / "bundles")
    state = DeviceStateStore(state_dir / "state").load()
    info = {"bundle_version": store.current_version(), "state": None}
    if state is not None:
        info["state"] = {"step": state.step, "base_version": state.base_version, "variant": state.variant_id,
                         "phi_norm": float(np.linalg.norm(state.phi)), "metrics": state.metrics}
    print(json.dumps(info, indent=2))
