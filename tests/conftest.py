"""Shared fixtures. `mosquitto`: a real Mosquitto broker on a free loopback port, restartable on that port
(the one launcher, edgepatch.sim.brokers.MosquittoBroker)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

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
