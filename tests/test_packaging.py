"""The wheel must contain every package: a folder forgotten in pyproject breaks `pip install .[device]`."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP_FOLDERS = ("protocol", "device", "export", "cloud", "data")


def test_every_package_folder_is_listed_in_pyproject() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {"edgepatch"}
    for top in TOP_FOLDERS:
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT)
            found.add(".".join(("edgepatch", *rel.parts)))
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"


def test_firmware_profiles_ship_as_package_data() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "firmware_configs/*.toml" in config["package-data"]["edgepatch"]
    assert list((ROOT / "firmware_configs").glob("*.toml"))
