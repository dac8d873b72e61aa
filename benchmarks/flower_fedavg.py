"""Side by side on one data split and round count: Flower's FedAvg, edgepatch `fedavg-wait`, patch-only.

- edgepatch fedavg-wait: the real simulator (Mosquitto, device processes, LiteRT train_full), no throttling
  differences matter here because every device is waited for.
- Flower FedAvg 1.41 in its OWN venv (flwr pins protobuf < 7, tensorflow here needs 7): the venv is created
  with --system-site-packages (so torch 2.13.0 and edgepatch come from the main install) and gets
  `flwr==1.41.0` and `protobuf<7` installed inside it only. Server and clients talk gRPC on localhost
  (start_server / start_client); the clients train the same CNN in torch (export/torch_model.py) from the
  same initial weights with the same SGD lr, batch and local steps. If the venv cannot be made (no index,
  no network) the Flower column is skipped with the reason printed and stored.
- patch-only (MetaPatch): each device trains only its patch coefficients φ (LiteRT train_phi, Adam) on the
  bundle's pretrained base; accuracy is the mean of per-device holdout accuracies with their own φ; bytes
  are the encoded PatchUpdate message (φ) per device per round. It starts from a pretrained base, the two
  FedAvg columns from random weights: compare its bytes and time, not its accuracy curve's start.

Run: python3 benchmarks/flower_fedavg.py [--rounds 5] [--devices 10]   → results/flower_fedavg/summary.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

FLOWER_SCRIPT = r'''
import json, sys, threading, time
import numpy as np, torch
import flwr as fl
from edgepatch.protocol.bundle import load_bundle
from edgepatch.protocol.model_spec import param_infos
from edgepatch.export.torch_model import forward

cfg = json.loads(open(sys.argv[1]).read())
bundle = load_bundle(cfg["bundle"])
spec = bundle.model_spec
names = list(param_infos(spec, None))
with np.load(cfg["init"], allow_pickle=False) as z:
    init = [z[n].astype(np.float32) for n in names]
with np.load(cfg["eval"], allow_pickle=False) as z:
    ex, ey = torch.tensor(z["x"]), torch.tensor(z["y"])
log = {"rounds": [], "bytes_per_client_per_round": 2 * int(sum(a.nbytes for a in init))}
t_start = [None]

def logits(ws, x):
    return forward(spec, None, {n: torch.tensor(w) for n, w in zip(names, ws)}, x)

def evaluate(rnd, ws, _conf):
    with torch.no_grad():
        z = logits(ws, ex)
        acc = float((z.argmax(1) == ey).float().mean())
    now = time.time()
    if t_start[0] is None:
        t_start[0] = now
    log["rounds"].append({"round": rnd, "accuracy": acc, "t": now - t_start[0]})
    return float(torch.nn.functional.cross_entropy(z, ey)), {"accuracy": acc}

class Client(fl.client.NumPyClient):
    def __init__(self, path, seed):
        with np.load(path, allow_pickle=False) as z:
            self.x, self.y = torch.tensor(z["x"]), torch.tensor(z["y"])
        self.rng = np.random.default_rng(seed)
    def fit(self, ws, _conf):
        params = {n: torch.tensor(w, requires_grad=True) for n, w in zip(names, ws)}
        for _ in range(cfg["local_steps"]):
            idx = torch.tensor(self.rng.choice(len(self.x), cfg["batch"], replace=len(self.x) < cfg["batch"]))
            loss = torch.nn.functional.cross_entropy(forward(spec, None, params, self.x[idx]), self.y[idx])
            grads = torch.autograd.grad(loss, list(params.values()))
            with torch.no_grad():
                for p, g in zip(params.values(), grads):
                    p -= cfg["lr"] * g
        return [p.detach().numpy() for p in params.values()], len(self.x), {}

strategy = fl.server.strategy.FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=len(cfg["devices"]),
    min_available_clients=len(cfg["devices"]), initial_parameters=fl.common.ndarrays_to_parameters(init),
    evaluate_fn=evaluate)
addr = f"127.0.0.1:{cfg['port']}"
def client(i, path):
    time.sleep(2)
    fl.client.start_client(server_address=addr, client=Client(path, i).to_client())
threads = [threading.Thread(target=client, args=(i, p), daemon=True) for i, p in enumerate(cfg["devices"])]
for t in threads: t.start()
fl.server.start_server(server_address=addr, config=fl.server.ServerConfig(num_rounds=cfg["rounds"]), strategy=strategy)
open(cfg["out"], "w").write(json.dumps(log))
'''


def flower_venv(root: Path) -> tuple[Path | None, str]:
    """(python of a venv with flwr, "") or (None, why not)."""
    venv = root / "flower-venv"
    py = venv / "bin" / "python"
    try:
        if not py.exists():
            subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True,
                           capture_output=True, timeout=300)
        probe = subprocess.run([str(py), "-c", "import flwr, google.protobuf as p; print(flwr.__version__, p.__version__)"],
                               capture_output=True, text=True)
        if probe.returncode != 0:
            # Only inside the venv: the main environment keeps protobuf 7 for tensorflow.
            subprocess.run([str(py), "-m", "pip", "install", "-q", "flwr==1.41.0", "protobuf<7", "torch==2.13.0",
                            "numpy"], check=True, capture_output=True, text=True, timeout=900)
        return py, ""
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        detail = getattr(exc, "stderr", "") or ""
        return None, f"could not prepare the Flower venv: {exc} {str(detail)[-400:]}"


def run_flower(root: Path, bundle: Path, device_paths: list[str], rounds: int, local_steps: int, lr: float,
               batch: int) -> dict:
    py, why = flower_venv(root)
    if py is None:
        print(f"SKIPPING Flower: {why}")
        return {"skipped": why}
    from edgepatch.protocol.ports import free_port

    cfg = {"bundle": str(bundle), "init": str(root / "init.npz"), "eval": str(root / "eval.npz"),
           "devices": device_paths, "rounds": rounds, "local_steps": local_steps, "lr": lr, "batch": batch,
           "port": free_port(), "out": str(root / "flower_log.json")}
    (root / "flower_cfg.json").write_text(json.dumps(cfg))
    (root / "flower_run.py").write_text(FLOWER_SCRIPT)
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    started = time.time()
    proc = subprocess.run([str(py), str(root / "flower_run.py"), str(root / "flower_cfg.json")], capture_output=True,
                          text=True, timeout=900, env=env)
    if proc.returncode != 0:
        why = f"Flower run failed (exit {proc.returncode}): {proc.stderr[-800:]}"
        print(f"SKIPPING Flower: {why}")
        return {"skipped": why}
    log = json.loads(Path(cfg["out"]).read_text())
    rounds_out = [r for r in log["rounds"] if r["round"] >= 1]
    times = [log["rounds"][0]["t"]] + [r["t"] for r in rounds_out]
    return {"accuracy": [r["accuracy"] for r in rounds_out], "round_s": list(np.diff(times)),
            "bytes_per_client_per_round": log["bytes_per_client_per_round"],
            "bytes_note": "raw float32 weights down + up (gRPC/protobuf framing not counted)",
            "total_s": time.time() - started}


def run_patch_only(bundle_dir: Path, device_paths: list[str], holdouts: list[tuple[np.ndarray, np.ndarray]],
                   rounds: int, local_steps: int) -> dict:
    from edgepatch.device.engine import open_engine, predict_variant
    from edgepatch.protocol.bundle import load_bundle
    from edgepatch.protocol.messages import PatchUpdate, encode, make_message

    bundle = load_bundle(bundle_dir)
    engine = open_engine(bundle, "litert")
    params = bundle.all_params()
    full = next(r.id for r in bundle.manifest.variants if r.variant.is_full(bundle.model_spec))
    k, batch, lr = bundle.patch_spec.k, bundle.manifest.train.batch, bundle.manifest.train.phi_lr
    states = [(np.zeros(k, np.float32),) * 3 for _ in device_paths]
    steps = [0] * len(device_paths)
    data = []
    for p in device_paths:
        with np.load(p, allow_pickle=False) as z:
            data.append((z["x"].astype(np.float32), z["y"]))
    rng = np.random.default_rng(0)
    out: dict = {"accuracy": [], "round_s": [], "bytes_per_client_per_round": 0}

    def accuracy(i: int) -> float:
        x, y = holdouts[i]
        return float((predict_variant(engine, full, x, states[i][0], params).argmax(1) == y).mean())

    for _ in range(rounds):
        per_device = []
        for i, (x, y) in enumerate(data):
            t0 = time.perf_counter()
            phi, m, v = states[i]
            for _ in range(local_steps):
                idx = rng.choice(len(x), batch, replace=len(x) < batch)
                _, phi, m, v = engine.phi_step(full, x[idx], y[idx], phi, m, v, float(steps[i]), lr, params)
                steps[i] += 1
            states[i] = (phi, m, v)
            per_device.append(time.perf_counter() - t0)
        msg = make_message(PatchUpdate(phi=states[0][0], steps=steps[0], samples=len(data[0][0]), holdout_acc=0.5,
                                       loss=0.1), device_id="dev-000", fleet="bench", base_version="b",
                           variant_id=full, seq=1)
        out["bytes_per_client_per_round"] = len(encode(msg))
        out["round_s"].append(max(per_device))  # devices run in parallel: the round lasts as long as the slowest
        out["accuracy"].append(float(np.mean([accuracy(i) for i in range(len(data))])))
    out["note"] = "pretrained base + per-device φ; in-process LiteRT, unthrottled; bytes = one PatchUpdate up"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="results/flower_fedavg")
    ap.add_argument("--devices", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--local-steps", type=int, default=10)
    ap.add_argument("--bundle", default="")
    args = ap.parse_args()
    from edgepatch.protocol.bundle import load_bundle
    from edgepatch.protocol.params import init_params, save_params
    from edgepatch.sim.config import parse_config
    from edgepatch.sim.runner import run_simulation
    from edgepatch.sim.setup import prepare_fleet

    root = Path(args.out).resolve()
    lr = 0.1
    config = {"simulation": {"rounds": args.rounds, "deadline_s": 30.0, "local_steps": args.local_steps, "lr": lr,
                             "strategies": ["fedavg-wait"], "init": "random", "processes": 2, "max_wait_s": 120.0},
              "bundle": {"path": args.bundle, "pretrain_epochs": 2, "dse_steps": 10},
              "data": {"n_devices": args.devices, "alpha": 0.5},
              "devices": {"classes": ["raspberry_pi_4"], "speed_sigma": 0.0001, "p_become_busy": 0.0001,
                          "p_become_idle": 1.0, "busy_slowdown": 1.0, "reference_speed": 0.5}}
    cfg = parse_config(config)
    ep = run_simulation(cfg, root, None)["strategies"]["fedavg-wait"]
    setup = prepare_fleet(cfg, root, ("127.0.0.1", 1, "5"), "flower")
    bundle = load_bundle(setup.bundle_dir)
    save_params(root / "init.npz", init_params(bundle.model_spec, None, cfg.simulation.seed))
    np.savez(root / "eval.npz", x=setup.eval_x, y=setup.eval_y)
    paths = [s.data_path for s in setup.specs]
    # The per-device holdouts, for patch-only's personalized accuracy: rebuilt from the same split.
    from edgepatch.data.datasets import dataset_for_model
    from edgepatch.data.fleet import base_split, make_fleet

    _, part = base_split(dataset_for_model(cfg.bundle.model), fraction=1 - cfg.data.device_fraction,
                         seed=cfg.simulation.seed)
    fleet = make_fleet(part, cfg.data.n_devices, alpha=cfg.data.alpha, shift=cfg.data.shift, tail=cfg.data.tail,
                       seed=cfg.simulation.seed, holdout_fraction=cfg.data.holdout_fraction)
    holdouts = [(d.holdout.x.astype(np.float32), d.holdout.y) for d in fleet]
    n = args.devices
    results = {
        "edgepatch_fedavg_wait": {
            "accuracy": [r["accuracy"] for r in ep["rounds"]],
            "round_s": [round(r["closed_s"] - r["opened_s"], 3) for r in ep["rounds"]],
            "bytes_per_client_per_round": [round((r["bytes_down"] + r["bytes_up"]) / n) for r in ep["rounds"]],
            "bytes_note": "global .npz down + touched-entries .npz up + MQTT messages"},
        "flower_fedavg": run_flower(root, setup.bundle_dir, paths, args.rounds, args.local_steps, lr,
                                    bundle.manifest.train.batch),
        "patch_only": run_patch_only(setup.bundle_dir, paths, holdouts, args.rounds, args.local_steps),
    }
    summary = {"benchmark": "flower_fedavg", "devices": n, "rounds": args.rounds, "local_steps": args.local_steps,
               "lr": lr, "results": results}
    (root / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    print(f"\n{'round':>5} | {'edgepatch fedavg-wait':>32} | {'Flower FedAvg':>32} | {'patch-only':>32}")
    print(f"{'':>5} | {'acc   s/round  B/client':>32} | {'acc   s/round  B/client':>32} | {'acc   s/round  B/client':>32}")
    for i in range(args.rounds):
        cells = []
        for key in ("edgepatch_fedavg_wait", "flower_fedavg", "patch_only"):
            r = results[key]
            if "skipped" in r:
                cells.append("skipped")
                continue
            b = r["bytes_per_client_per_round"]
            b = b[i] if isinstance(b, list) else b
            cells.append(f"{r['accuracy'][i]:.3f} {r['round_s'][i]:8.2f} {b:10d}")
        print(f"{i + 1:>5} | " + " | ".join(f"{c:>32}" for c in cells))
    print(f"summary: {root / 'summary.json'}")


if __name__ == "__main__":
    main()
