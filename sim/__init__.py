"""edgepatch.sim: the fleet simulator, a composition root above the cloud (the FL server and strategies),
the device (FL clients) and the export pipeline (a bundle when none is given).

- `config`: the simulation config (TOML/JSON) and its validation;
- `load`: device classes, static speeds and Markov/trace availability;
- `setup`: per-strategy device shards, traces and `DeviceSpec`s;
- `hosts`: device host processes and Ray tasks;
- `brokers`: the one Mosquitto launcher (also used by tests and benchmarks) and `local_broker`;
- `runner`: `run_simulation` / `simulate_main` (`edgepatch simulate`); `results`: files and plots.
Nothing below sim/ imports it (tests/test_architecture.py).
"""

from __future__ import annotations

from typing import Any

# Lazy: `edgepatch.sim.brokers` (the tests' Mosquitto) must not pull in the server and the device hosts.
_EXPORTS = {"SimConfig": "config", "SimConfigError": "config", "load_config": "config", "parse_config": "config",
            "run_simulation": "runner", "simulate_main": "runner"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'edgepatch.sim' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
