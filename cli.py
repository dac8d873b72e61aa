"""`edgepatch` command line: a thin typer layer over the packages' functions.

Heavy imports (torch, tensorflow) happen inside the commands that need them, so `edgepatch device …`
on a Raspberry Pi never loads them.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(help="edgepatch: on-device learning across a fleet.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
console = Console(stderr=True)


def _mount_subapps() -> None:
    from edgepatch.cloud.cli import app as cloud_app
    from edgepatch.device.cli import app as device_app

    app.add_typer(device_app, name="device")
    app.add_typer(cloud_app, name="cloud")


_mount_subapps()


@app.callback()
def _quiet_by_default(
    ctx: typer.Context,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="show framework output (TensorFlow, absl, torch "
                                 "warnings) and debug logs instead of writing them to the log file"),
    log_dir: Path | None = typer.Option(None, help="where framework output is logged (default: $EDGEPATCH_LOG_DIR "
                                        "or ./edgepatch-logs)"),
) -> None:
    """Runs before every command, before any framework is imported (see edgepatch/logs.py)."""
    from edgepatch import logs

    logs.setup(ctx.invoked_subcommand or "edgepatch", verbose, log_dir)


def _fail(message: str) -> typer.Exit:
    # escape: paths and reprs in messages may hold '[…]', which rich would eat as markup; soft_wrap: one
    # line per error even when piped (rich hard-wraps at 80 columns off a terminal).
    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    return typer.Exit(code=2)


def _table_console() -> Console:
    """Console for tables on stdout. Off a terminal (`| less`, `> file`, CI logs) rich assumes 80 columns
    and cuts cells to '…', which hid artifact names and timings; there, render at the table's own width."""
    out = Console()
    return out if out.is_terminal else Console(width=max(out.width, 240))


def _print_line(message: str) -> None:
    console.print(f"[dim]{message}[/dim]" if message.startswith("  ") else message)


def _log(message: str) -> None:
    """The pipeline's progress: counting messages (epochs, DSE generations) as a bar, the rest as lines."""
    from edgepatch.logs import StepLog

    global _step_log
    if _step_log is None:
        _step_log = StepLog(console, _print_line)
    _step_log(message)


_step_log = None


@app.command("export")
def export_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="bundle directory to write"),
    model: str = typer.Option("digits_cnn", help="reference model name, 'module:attr' or 'file.py:attr' (a "
                              "ModelSpec, torch module or Keras model), or a saved .keras file"),
    weights: Path | None = typer.Option(None, help="base weights (.npz, torch state dict .pt, .safetensors); "
                                        "default: the model's own, else pretrained on --data"),
    data: Path | None = typer.Option(None, help="labelled data: a shard directory or an .npz with x, y; for "
                                     "pretraining and the variant search (reference models have their own)"),
    pretrain: bool = typer.Option(False, "--pretrain", help="train the model on --data first, ignoring the "
                                  "weights a torch/Keras model carries (e.g. a freshly built module)"),
    shared: Path | None = typer.Option(None, help="shared patch parameters θ̄/Θ .npz (e.g. distilled)"),
    patch: str = typer.Option("film", help="patch kind: film or lowrank"),
    patch_layers: str = typer.Option("", help="comma-separated layers to patch (default: every conv)"),
    k: int = typer.Option(16, help="size of the per-device vector φ"),
    rank: int = typer.Option(4, help="bottleneck of lowrank patches"),
    head_bias: bool = typer.Option(True, "--head-bias/--no-head-bias", help="φ also shifts the head's logits "
                                   "(num_classes more coefficients): lets a device learn its label prior; "
                                   "--no-head-bias exports the layout of bundles before it"),
    variants: str = typer.Option("auto", help="'auto' (DSE) or keep ratios '1,0.5' or 'conv1=1:conv2=0.5,…'"),
    runtimes: str = typer.Option("litert,executorch", help="programs to build"),
    batch: int = typer.Option(32, help="fixed batch of the training programs"),
    seed: int = typer.Option(0),
) -> None:
    """Export a model to a verified bundle of LiteRT and ExecuTorch programs with dropout variants."""
    from edgepatch.export.pipeline import ExportOptions, export_bundle

    opts = ExportOptions(model=model, weights=weights, data=data, pretrain=pretrain, shared=shared,
                         patch_kind=patch, patch_layers=tuple(p for p in patch_layers.split(",") if p) or None, k=k, rank=rank,
                         head_bias=head_bias, variants=variants, runtimes=tuple(r for r in runtimes.split(",") if r),
                         batch=batch, seed=seed)
    try:
        export_bundle(opts, out, _log)
    except (ValueError, OSError) as exc:
        raise _fail(str(exc)) from exc
    _print_bundle(out)


@app.command("explore")
def explore_cmd(
    out: Path = typer.Option(Path("dse"), "--out", "-o", help="directory for variants.json and front.png"),
    model: str = typer.Option("digits_cnn", help="as for `export --model`"),
    weights: Path | None = typer.Option(None, help="base weights; default: the model's own, else pretrained "
                                        "on --data"),
    data: Path | None = typer.Option(None, help="labelled data: a shard directory or an .npz with x, y "
                                     "(reference models have their own)"),
    rates: str = typer.Option("0.25,0.5,0.75,1", help="discretized keep ratios per layer"),
    population: int = typer.Option(8),
    generations: int = typer.Option(3),
    steps: int = typer.Option(30, help="step budget of the convergence objective"),
    seeds: int = typer.Option(3, help="seeds averaged in the convergence objective"),
    cost: str = typer.Option("litert", help="'litert' (measured step time) or 'flops' (cost model)"),
    seed: int = typer.Option(0),
) -> None:
    """DISTREAL design-space exploration: NSGA-II over per-layer keep ratios; writes the Pareto set."""
    from edgepatch.export import dse
    from edgepatch.export.pipeline import ExportOptions, base_weights, export_data, load_source, no_data_error

    try:
        opts = ExportOptions(model=model, weights=weights, data=data, seed=seed)
        spec, given = load_source(opts)
        found = export_data(spec, opts)
        if found is None:
            raise no_data_error(spec, "for the variant search")
        base = base_weights(spec, opts, found, _log, given)
        result = dse.explore(spec, base, found.x, found.y, rates=[float(r) for r in rates.split(",")],
                             pop_size=population, generations=generations, seeds=tuple(range(seeds)),
                             step_budget=steps, search_seed=seed,
                             cost_fn=dse.flops_cost if cost == "flops" else None,
                             progress=lambda rep: _log(f"  {rep}"))
    except ValueError as exc:
        raise _fail(str(exc)) from exc
    out.mkdir(parents=True, exist_ok=True)
    (out / "variants.json").write_text(json.dumps(result.to_dict(), indent=1))
    dse.plot_front(result, out / "front.png")
    table = Table("variant", "cost", "convergence loss", "FLOPs", "pareto", title=f"DSE for {spec.name}")
    for row in sorted(result.rows(), key=lambda r: r["flops_ratio"]):
        cost_value = next(iter(row["train_ms"].values()), row["flops_ratio"])
        table.add_row(row["id"], f"{cost_value:.3f}", f"{row['convergence']:.4f}", f"{row['flops_ratio']:.2f}",
                      "yes" if row["pareto"] else "")
    _table_console().print(table)
    console.print(f"wrote {out / 'variants.json'} and {out / 'front.png'}")


@app.command("inspect")
def inspect_cmd(bundle: Path = typer.Argument(..., help="bundle directory or archive")) -> None:
    """Print a bundle's manifest, variants and artifact sizes (verifies every hash)."""
    _print_bundle(bundle)


def _print_bundle(path: Path) -> None:
    from edgepatch.protocol.bundle import load_bundle
    from edgepatch.protocol.manifest import BundleError

    try:
        with load_bundle(path) as bundle:
            info = bundle.describe()
            manifest = bundle.manifest
    except BundleError as exc:
        raise _fail(str(exc)) from exc
    out = _table_console()
    out.print(f"[bold]{manifest.model_id}[/bold] base {manifest.base_version[:12]}  schema "
              f"{manifest.schema_version}  created {manifest.created}")
    out.print(f"input {list(manifest.input.shape)} {manifest.input.layout}, {manifest.labels.num_classes} classes; "
              f"{manifest.patch.kind} patches on {', '.join(manifest.patch.layers)}, k={manifest.patch.k}")
    table = Table("variant", "keep", "FLOPs", "train ms", "infer ms", "convergence", "pareto")
    for row in manifest.variants:
        table.add_row(row.id, " ".join(f"{k}={v:g}" for k, v in row.keep.items()), f"{row.flops_ratio:.2f}",
                      " ".join(f"{k}:{v:.2f}" for k, v in row.train_ms.items()),
                      " ".join(f"{k}:{v:.2f}" for k, v in row.infer_ms.items()),
                      "" if row.convergence is None else f"{row.convergence:.4f}", "yes" if row.pareto else "")
    out.print(table)
    artifacts = Table("artifact", "kind", "bytes", "sha256")
    for name, entry in manifest.artifacts.items():
        artifacts.add_row(name, entry.kind, f"{entry.bytes:,}", entry.sha256[:16])
    out.print(artifacts)
    out.print(f"total {info.get('total_bytes', sum(e.bytes for e in manifest.artifacts.values())):,} bytes")


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(Path("edgepatch-demo"), "--out", "-o", help="results, bundles, device state"),
    model: str = typer.Option("digits_cnn"),
    devices: int = typer.Option(8, help="device processes"),
    rounds: int = typer.Option(20, help="device rounds: train φ → upload (every round)"),
    steps: int = typer.Option(30, help="φ steps per device per round"),
    base_every: int = typer.Option(10, min=1, help="the companion updates the base (MoMoDistill → new bundle) every "
                                   "this many rounds; devices wait for it then"),
    rounds_per_day: float = typer.Option(24.0, help="rounds a day, for the bytes-per-day report"),
    broker: str | None = typer.Option(None, help="mqtt://host:port (MQTT 5); default: embedded amqtt"),
    variants: str = typer.Option("auto", help="'auto' (DSE) or keep ratios"),
    seed: int = typer.Option(0),
) -> None:
    """The whole loop on embedded defaults: export, fleet trains, cloud distils, fleet updates; a report."""
    from edgepatch.demo import DemoOptions, run_demo

    run_demo(DemoOptions(out=out, model=model, devices=devices, rounds=rounds, steps=steps, broker=broker,
                         variants=variants, seed=seed, base_every=base_every, rounds_per_day=rounds_per_day))


@app.command("simulate")
def simulate_cmd(
    config: Path = typer.Argument(..., help="simulation config (TOML or JSON; see docs/simulation.md)"),
    broker: str | None = typer.Option(None, help="mqtt://host:port; default: a Mosquitto (or amqtt) it starts"),
    out: Path = typer.Option(Path("results/simulate"), "--out", "-o"),
    ray: str | None = typer.Option(None, help="Ray address to run device workers on (needs ray installed)"),
) -> None:
    """A fleet of device processes under time-varying load, federated rounds by strategy, over a broker."""
    from edgepatch.sim import simulate_main

    try:
        results = simulate_main(config, broker, out, ray)
    except (ValueError, OSError) as exc:
        raise _fail(str(exc)) from exc
    console.print(f"results: {results}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
