"""The simulator: for each strategy in the config, a fresh fleet of device hosts and the FL server over one
broker; progress bars while rounds run, the results written at the end."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from edgepatch.protocol.transport import parse_broker

from .brokers import local_broker
from .config import SimConfig, SimConfigError, load_config
from .hosts import DeviceHosts, ray_cluster
from .results import summary_table, write_results
from .setup import prepare_fleet

round_log = logging.getLogger("edgepatch.sim.rounds")  # one INFO line per round


def run_strategy(cfg: SimConfig, strategy_name: str, out_dir: Path, broker: tuple[str, int, str],
                 ray_address: str = "", progress: Any = None, log: Any = print) -> dict[str, Any]:
    from edgepatch.cloud.fl.server import Evaluator, FlServer
    from edgepatch.cloud.fl.strategies import make_strategy
    from edgepatch.protocol.bundle import load_bundle
    from edgepatch.protocol.params import init_params

    s = cfg.simulation
    setup = prepare_fleet(cfg, out_dir, broker, strategy_name, log)
    bundle = load_bundle(setup.bundle_dir)
    spec = bundle.model_spec
    init = bundle.base_params() if s.init == "bundle" else init_params(spec, None, s.seed)
    strategy = make_strategy(strategy_name, spec, bundle.manifest.variants, s.seed,
                             small_keep=cfg.strategy_options.small_keep,
                             dropout_keep=cfg.strategy_options.dropout_keep)
    evaluator = Evaluator(bundle, setup.eval_x, setup.eval_y)
    acc0, loss0 = evaluator(init, strategy.eval_variant())
    server = FlServer(broker_host=broker[0], broker_port=broker[1], fleet=s.fleet, bundle=bundle,
                      strategy=strategy, out_dir=out_dir / strategy_name, expected_devices=[p.device_id for p in setup.specs],
                      evaluator=evaluator, init_params=init, deadline_s=s.deadline_s, local_steps=s.local_steps,
                      lr=s.lr, clock_origin=0.0, grace_s=s.grace_s, max_wait_s=s.max_wait_s,
                      mqtt_protocol=broker[2])
    server.start()
    started = time.time()
    try:
        workers = DeviceHosts(setup.specs, s.processes, ray_address)
    except BaseException:
        server.stop("the device hosts did not start")
        raise
    task = progress.add_task(f"{strategy_name}: joining", total=s.rounds) if progress is not None else None
    problems: list[str] = []
    try:
        server.wait_for_joins()
        join_s = time.time() - started
        server.clock_origin = time.time()  # t = 0 of every load trace and of the accuracy-vs-time curve
        for rnd in range(1, s.rounds + 1):
            rec = server.run_round(rnd)
            round_log.info("%s round %d: accuracy %.3f, %d contributed, %d dropped, closed at %.1f s", strategy_name, rnd,
                     rec.accuracy, rec.contributed, rec.dropped, rec.closed_s)
            if progress is not None and task is not None:
                progress.update(task, advance=1, description=f"{strategy_name}: r{rnd} acc {rec.accuracy:.3f} "
                                f"({rec.contributed}/{rec.contributed + rec.dropped} in)")
    finally:
        server.stop("simulation finished")
        problems = workers.join()
    rounds = [asdict(r) for r in server.records]
    reached = next((r["closed_s"] for r in rounds if r["accuracy"] >= s.target_accuracy), None)
    return {"strategy": strategy_name, "initial_accuracy": acc0, "initial_loss": loss0,
            "final_accuracy": rounds[-1]["accuracy"] if rounds else acc0,
            "time_to_target_s": reached, "target_accuracy": s.target_accuracy,
            "total_time_s": rounds[-1]["closed_s"] if rounds else 0.0, "join_s": round(join_s, 2),
            "bytes_down": sum(r["bytes_down"] for r in rounds), "bytes_up": sum(r["bytes_up"] for r in rounds),
            "rounds": rounds, "device_classes": setup.classes,
            "device_speeds": {p.device_id: p.relative_speed for p in setup.specs},
            "reference_speed": setup.specs[0].reference_speed, "rejects": server.rejects, "worker_problems": problems,
            "worker_hosts": workers.hosts}


def run_simulation(cfg: SimConfig, out_dir: str | Path, broker_url: str | None = None, ray_address: str = "",
                   quiet: bool = False) -> dict[str, Any]:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    console = Console(quiet=quiet)
    if not console.is_terminal:  # piped: rich assumes 80 columns and cuts table cells to '…'
        console = Console(quiet=quiet, width=max(console.width, 160))
    ray_address = ray_address or cfg.ray_address
    results: dict[str, Any] = {"config": asdict(cfg), "strategies": {}}
    with contextlib.ExitStack() as stack:
        if broker_url:
            try:
                host, port = parse_broker(broker_url)
            except ValueError as exc:
                raise SimConfigError(str(exc)) from exc
            broker = (host, port, cfg.broker_protocol)
        else:
            broker = stack.enter_context(local_broker(out / "broker"))
        results["broker"] = {"host": broker[0], "port": broker[1], "protocol": broker[2],
                             "workers": "ray" if ray_address else "processes"}
        results["driver"] = {"pid": os.getpid(), "hostname": socket.gethostname()}
        if ray_address:
            results["ray"] = stack.enter_context(ray_cluster(ray_address))
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=console, disable=quiet) as progress:
            for name in cfg.simulation.strategies:
                results["strategies"][name] = run_strategy(cfg, name, out, broker, ray_address, progress,
                                                           log=console.print)
    write_results(results, out)
    if not quiet:
        console.print(summary_table(results))
    return results


def simulate_main(config_path: str | Path, broker_url: str | None = None, out_dir: str | Path = "results/simulate",
                  ray_address: str | None = None) -> Path:
    """CLI entry (`edgepatch simulate`): run the config's strategies; returns the results.json path."""
    cfg = load_config(config_path)
    run_simulation(cfg, out_dir, broker_url, ray_address or "")
    return Path(out_dir) / "results.json"


if __name__ == "__main__":  # pragma: no cover - convenience: python -m edgepatch.sim.runner cfg.toml
    simulate_main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] != "-" else None,
                  sys.argv[3] if len(sys.argv) > 3 else "results/simulate")
