"""The layering of docs/CONTRACTS.md, enforced: which folder may import which, and the module size limit.

Imports are read from the source (ast), lazy imports inside functions included: a lazy import is still a
dependency, it only moves the moment it is paid. Relative imports are resolved to absolute names.

    protocol  (numpy + stdlib)            imports only protocol
    data      (datasets, fleet splits)    imports protocol
    device    (LiteRT/ExecuTorch runtime) imports protocol, data; never export, cloud, sim
    export    (torch, TF, ExecuTorch)     imports protocol, data, device (its runners time the programs)
    cloud     (companion, FL server)      imports protocol, data, export; never device (it does not
                                          run device runtimes); its companion path not the export
                                          toolchain (only export.torch_model, the reference forward)
    sim       (the simulator)             imports anything: a composition root, like cli.py and demo.py
    logs.py   (quiet output)              stdlib only, usable from every layer but protocol
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("protocol", "data", "device", "export", "cloud", "sim")
MAX_LINES = 400

FORBIDDEN = {
    "protocol": {"data", "device", "export", "cloud", "sim", "cli", "demo", "logs"},
    "data": {"device", "export", "cloud", "sim", "cli", "demo"},
    "device": {"export", "cloud", "sim", "cli", "demo"},
    "export": {"cloud", "sim", "cli", "demo"},
    "cloud": {"device", "sim", "cli", "demo"},
    "logs": {"protocol", "data", "device", "export", "cloud", "sim", "cli", "demo"},  # stdlib only
}

# The companion path: every cloud module the long-running service loads, and what they load in turn.
COMPANION_ROOTS = ("edgepatch.cloud.companion",)
# What the companion may use from export/: the torch reference forward MoMoDistill trains through. Every
# other export module is the conversion toolchain (TensorFlow, ExecuTorch, LiteRT builders, DSE).
COMPANION_MAY_USE = {"edgepatch.export", "edgepatch.export.torch_model"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["edgepatch", *parts])


def package_files() -> Iterator[Path]:
    yield from sorted(p for p in ROOT.glob("*.py"))
    for package in PACKAGES:
        yield from sorted((ROOT / package).rglob("*.py"))


def imports_of(path: Path) -> set[str]:
    """Every edgepatch module `path` imports (module level and inside functions)."""
    name, is_package = module_name(path), path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            found.add(target)
            # `from edgepatch.export import pipeline` imports the submodule edgepatch.export.pipeline.
            found.update(f"{target}.{a.name}" for a in node.names if _is_module(f"{target}.{a.name}"))
    return {m for m in found if m == "edgepatch" or m.startswith("edgepatch.")}


def _is_module(name: str) -> bool:
    parts = name.split(".")[1:]
    return (ROOT.joinpath(*parts).with_suffix(".py")).is_file() or (ROOT.joinpath(*parts) / "__init__.py").is_file()


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


GRAPH = {module_name(p): imports_of(p) for p in package_files()}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_imports_point_down(layer: str) -> None:
    bad = sorted(f"{src} imports {dst}" for src, targets in GRAPH.items() if _layer(src) == layer
                 for dst in targets if _layer(dst) in FORBIDDEN[layer])
    assert not bad, f"{layer}/ may not import {sorted(FORBIDDEN[layer])}:\n  " + "\n  ".join(bad)


def _closure(roots: tuple[str, ...]) -> dict[str, str]:
    """Every edgepatch module reachable from `roots`, with the module that first imported it."""
    seen: dict[str, str] = {r: "" for r in roots}
    todo = list(roots)
    while todo:
        current = todo.pop()
        for target in GRAPH.get(current, ()):
            if target not in seen and target in GRAPH:
                seen[target] = current
                todo.append(target)
    return seen


def test_companion_path_does_not_load_the_export_toolchain() -> None:
    reached = _closure(COMPANION_ROOTS)
    bad = sorted(f"{via} imports {m}" for m, via in reached.items()
                 if _layer(m) == "export" and m not in COMPANION_MAY_USE)
    assert not bad, "the companion path reaches the export toolchain:\n  " + "\n  ".join(bad)


def test_no_module_over_the_size_limit() -> None:
    sizes = {p.relative_to(ROOT): len(p.read_text(encoding="utf-8").splitlines()) for p in package_files()}
    over = sorted(f"{path} has {n} lines" for path, n in sizes.items() if n > MAX_LINES)
    assert not over, f"modules over {MAX_LINES} lines (split them):\n  " + "\n  ".join(over)


def test_the_checker_sees_what_it_checks() -> None:
    # The rules above pass vacuously if the graph is empty or relative imports are not resolved.
    assert len(GRAPH) > 50
    assert "edgepatch.protocol.model_spec" in GRAPH["edgepatch.protocol.variants"]
    assert "edgepatch.sim.config" in GRAPH["edgepatch.sim.runner"]  # `from .config import …`
    assert any(_layer(t) == "export" for t in GRAPH["edgepatch.sim.setup"])  # a lazy import inside a function
