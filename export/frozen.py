"""Frozen inference programs built so their weights can be rewritten in place later.

The converter runs once with marker weights (all values distinct: no constant merged with another, no
weight equal to 0 or 1 folded away); the layout of every weight in the result is found by search, and the
real weights are written into that template. The shipped program is therefore exactly what republishing
(cloud/republish.py) and devices (device/fetch.py) produce with `write_weights` — one code path, exercised
by every export. A converter that folds or re-encodes a weight raises LayoutError here, at export time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from edgepatch.protocol.model_spec import ModelSpec, PatchSpec, param_infos
from edgepatch.protocol.weight_layout import Layout, find_layout, marker_params, write_weights

Builder = Callable[[ModelSpec, PatchSpec | None, Mapping[str, np.ndarray], int], bytes]


def build_frozen(builder: Builder, spec: ModelSpec, patch: PatchSpec | None, params: Mapping[str, np.ndarray],
                 batch: int) -> tuple[bytes, Layout]:
    """(program bytes holding `params`, its weight layout) from a frozen-program builder."""
    names = list(param_infos(spec, patch))
    markers = marker_params({n: np.asarray(params[n], np.float32) for n in names})
    template = builder(spec, patch, markers, batch)
    layout = find_layout(template, markers)
    return write_weights(template, layout, params), layout
