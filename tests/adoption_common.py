"""Bundles for the adoption-gate tests: a base with shuffled head weights (bad) and a same-weights copy (good)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgepatch.protocol.bundle import load_bundle


def _republish(previous: Path, params: dict[str, np.ndarray], out: Path, meta: dict[str, Any]) -> Path:
    try:  # the republisher moved from export/ to cloud/ (issue 9 work); accept either home
        from edgepatch.cloud.republish import republish_bundle
    except ImportError:  # pragma: no cover - depends on the checkout's state
        from edgepatch.export.pipeline import republish_bundle  # type: ignore[no-redef]
    republish_bundle(previous, params, out, meta=meta)
    return out


def head_name(previous: Path) -> str:
    with load_bundle(previous) as bundle:
        return [layer.name for layer in bundle.model_spec.layers if layer.kind == "dense"][-1]


def shuffled_head_bundle(previous: Path, out: Path, seed: int = 0) -> Path:
    """The base with its classifier rows permuted (a derangement): confidently wrong on every class."""
    with load_bundle(previous) as bundle:
        params = {k: np.array(v) for k, v in bundle.all_params().items()}
    head = head_name(previous)
    n = params[f"{head}.weight"].shape[0]
    perm = np.roll(np.arange(n), 1 + seed % (n - 1))
    params[f"{head}.weight"] = params[f"{head}.weight"][perm]
    params[f"{head}.bias"] = params[f"{head}.bias"][perm]
    return _republish(previous, params, out, {"test_bundle": "shuffled-head"})


def same_weights_bundle(previous: Path, out: Path) -> Path:
    """A new bundle version whose weights equal the base's (a harmless update)."""
    with load_bundle(previous) as bundle:
        params = {k: np.array(v) for k, v in bundle.all_params().items()}
    return _republish(previous, params, out, {"test_bundle": "same-weights"})
