"""Shared fixtures. `mosquitto`: a real Mosquitto broker on a free loopback port, restartable on that port
(the one launcher, edgepatch.sim.brokers.MosquittoBroker)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edgepatch.sim.brokers import MOSQUITTO_HINT, MosquittoBroker, find_binary


def _mosquitto_binary() -> str:
    found = find_binary("mosquitto")
    if found is None:
        pytest.fail(f"the mosquitto binary is missing: {MOSQUITTO_HINT} (CI does this in .ci/run)", pytrace=False)
    return found


@pytest.fixture
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    """A fresh broker per test (outage tests stop/start it); killed at teardown."""
    broker = MosquittoBroker(tmp_path_factory.mktemp("mosquitto"), binary=_mosquitto_binary())
    broker.start()
    try:
        yield broker
    finally:
        broker.kill()


@pytest.fixture(scope="session")
def mosquitto_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    """One broker shared by a whole run, for tests that neither stop it nor depend on its being empty."""
    broker = MosquittoBroker(tmp_path_factory.mktemp("mosquitto-session"), binary=_mosquitto_binary())
    broker.start()
    try:
        yield broker
    finally:
        broker.kill()


# -- bundles and device data shared by the device, cloud and end-to-end tests -------------------------

@pytest.fixture(scope="session")
def digits_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real exported bundle (LiteRT programs, a full and a 50 % variant) of the digits reference CNN."""
    from edgepatch.export.pipeline import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "digits"
    export_bundle(ExportOptions(variants="1,0.5", runtimes=("litert",), pretrain_epochs=8, dse_steps=5,
                                dse_seeds=(0,)), out)
    return out


@pytest.fixture(scope="session")
def digits_bundle_both(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same bundle with LiteRT and ExecuTorch programs (the Engine tests run both runtimes on it)."""
    from edgepatch.export.pipeline import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("bundles") / "digits-both"
    export_bundle(ExportOptions(variants="1,0.5", runtimes=("litert", "executorch"), pretrain_epochs=8,
                                dse_steps=5, dse_seeds=(0,)), out)
    return out


@pytest.fixture(scope="session")
def shifted_digits_devices(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Shard directories of 3 devices whose digits carry a per-device gain/offset and pixel permutation."""
    from edgepatch.data.datasets import load_digits
    from edgepatch.data.fleet import base_split, make_fleet, write_device_timeline

    root = tmp_path_factory.mktemp("devices")
    _, device_part = base_split(load_digits(), fraction=0.5, seed=0)
    fleet = make_fleet(device_part, 3, alpha=1.0, shift="gain_offset", tail="uniform", seed=3,
                       shift_strength=2.0)
    dirs = {}
    for device in fleet:
        dirs[device.device_id] = root / device.device_id
        write_device_timeline(device, dirs[device.device_id])
    return dirs


# -- Canoe: a base model that never saw classes 7..9 and a helper that knows every class ---------------

@dataclass
class CanoeWorld:
    bundle: Any  # protocol.bundle.Bundle
    base: Any  # device.canoe_boost.TailoredModel, pretrained on classes 0..6 only
    helper: Any  # a copy fine-tuned on all classes
    helper_x: Any
    helper_y: Any
    test_x: Any
    test_y: Any


def build_canoe_world(bundle_path: Path, runtime: str = "litert") -> CanoeWorld:
    """Both models trained from scratch on the digits by `runtime`'s full-weight steps."""
    import numpy as np

    from edgepatch.data.datasets import load_digits
    from edgepatch.device.canoe_boost import tailored_from_bundle
    from edgepatch.protocol.bundle import load_bundle
    from edgepatch.protocol.params import init_params

    bundle = load_bundle(bundle_path)
    data = load_digits()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(data.y))
    x, y = data.x[order], data.y[order].astype(np.int64)
    test, cloud, helper = slice(0, 400), slice(400, 900), slice(900, 1400)
    base = tailored_from_bundle(bundle, runtime=runtime)
    base.base = dict(init_params(base.spec, None, seed=1))
    old = np.flatnonzero(y[cloud] < 7)
    for _ in range(250):
        idx = rng.choice(old, base.batch)
        base.train_step(x[cloud][idx], y[cloud][idx])
    helper_model = base.copy()
    for _ in range(300):
        idx = rng.choice(500, helper_model.batch)
        helper_model.train_step(x[helper][idx], y[helper][idx])
    return CanoeWorld(bundle, base, helper_model, x[helper], y[helper], x[test], y[test])


@pytest.fixture(scope="session")
def canoe_world_builder() -> Callable[[Path, str], CanoeWorld]:
    """`build_canoe_world` for test modules (under --import-mode=importlib they cannot import conftest)."""
    return build_canoe_world
