"""Where a frozen program keeps each weight, so new weights can be written into it without reconverting.

A frozen inference program (LiteRT .tflite, ExecuTorch .pte) stores every parameter as raw little-endian
float32 somewhere in its bytes, possibly transposed by the converter (e.g. a dense weight as (out, in)).
Its other bytes (graph, operators, delegate headers) do not depend on the weight values. The exporter
therefore converts once with *marker* weights — distinct random values, so no two constants are equal and
a converter cannot merge them — finds every parameter's bytes by search (`find_layout`), and writes the
real weights into those places (`write_weights`). The layout travels in the manifest; republishing after
MoMoDistill, and a device rebuilding its own copy, repeat only `write_weights`: numpy, no converter.

A layout is {param name: [[byte offset, plus, axis permutation...], ...]}: the parameter, transposed by
the permutation, plus the constant `plus`, sits as float32 at that offset (a parameter may appear more than
once). `plus` exists because converters fold constant arithmetic: TensorFlow stores FiLM's `1 + θ̄` as one
constant, so the program holds θ̄ + 1, not θ̄. An axis written as `-1 - a` is source axis `a` reversed: a
training program's input gradient of a (depthwise) convolution correlates with the spatially flipped
kernel, and the converter stores that flipped copy as a constant of its own (searched for 4-axis
parameters with both trailing axes reversed: a 2-D kernel's spatial axes in torch's layout).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import numpy as np

Layout = dict[str, list[list[float]]]
# Constants a converter may have added to a weight (FiLM's 1 + scale); 0 is tried first.
PLUS = (0.0, 1.0, -1.0)


class LayoutError(ValueError):
    """A program whose weights cannot be located or rewritten in place; the message says which."""


def marker_params(params: Mapping[str, np.ndarray], seed: int = 0) -> dict[str, np.ndarray]:
    """Same names and shapes, every value distinct (and far from 0/1, which converters may fold)."""
    total = sum(int(np.asarray(v).size) for v in params.values())
    rng = np.random.default_rng(seed)
    # Distinct by construction: a permutation of a strictly increasing grid, then scaled into [0.5, 1.5).
    values = (0.5 + (rng.permutation(total) + 0.5) / total).astype(np.float32)
    out, at = {}, 0
    for name, value in params.items():
        shape = np.asarray(value).shape
        size = int(np.prod(shape, dtype=np.int64))
        out[name] = values[at: at + size].reshape(shape) * np.where(rng.random(shape) < 0.5, -1, 1).astype(
            np.float32)
        at += size
    return out


def _axis(code: int) -> int:
    """Source axis of a layout axis entry (`-1 - a` = axis `a` reversed)."""
    return code if code >= 0 else -1 - code


def _encode(value: np.ndarray, plus: float, perm: list[int] | tuple[int, ...]) -> bytes:
    shifted = np.asarray(value, np.float32) + np.float32(plus)  # float32 add: the converter's rounding
    flipped = tuple(-1 - a for a in perm if a < 0)
    if flipped:
        shifted = np.flip(shifted, axis=flipped)
    return np.ascontiguousarray(shifted.transpose([_axis(a) for a in perm]), dtype="<f4").tobytes()


def _candidates(value: np.ndarray, plus: float) -> list[tuple[tuple[int, ...], bytes]]:
    """Each distinct transposition of `value + plus` as float32 bytes (identity first), and of a kernel's
    spatially flipped copy (both trailing axes reversed) for 2-D kernels (4 axes)."""
    flips: list[frozenset[int]] = [frozenset()]
    if value.ndim == 4:
        flips.append(frozenset((value.ndim - 2, value.ndim - 1)))
    seen: dict[bytes, tuple[int, ...]] = {}
    for flip in flips:
        for perm in itertools.permutations(range(value.ndim)):
            codes = tuple(-1 - a if a in flip else a for a in perm)
            seen.setdefault(_encode(value, plus, codes), codes)
    return [(perm, raw) for raw, perm in seen.items()]


def find_layout(blob: bytes, markers: Mapping[str, np.ndarray]) -> Layout:
    """Every occurrence of every marker parameter in `blob`; LayoutError names the ones not found whole."""
    layout: Layout = {}
    missing = []
    for name, value in markers.items():
        value = np.asarray(value, np.float32)
        spots: list[list[float]] = []
        for plus in PLUS:
            for perm, raw in _candidates(value, plus):
                start = blob.find(raw)
                while start >= 0:
                    spots.append([start, plus, *perm])
                    start = blob.find(raw, start + 1)
            if spots:
                break
        if not spots:
            missing.append(name)
        layout[name] = spots
    if missing:
        raise LayoutError(f"weights not stored verbatim in the program (folded or re-encoded by the "
                          f"converter): {missing[:5]}{' …' if len(missing) > 5 else ''}")
    _check_disjoint(layout, markers)
    return layout


def _check_disjoint(layout: Layout, markers: Mapping[str, np.ndarray]) -> None:
    """Two spots sharing bytes would mean a chance match (a tiny parameter's bytes found inside other data)."""
    spans = sorted((int(spot[0]), int(spot[0]) + 4 * int(np.asarray(markers[name]).size), name)
                   for name, spots in layout.items() for spot in spots)
    for (_, end, first), (start, _, second) in itertools.pairwise(spans):
        if start < end:
            raise LayoutError(f"weights {first!r} and {second!r} overlap in the program: ambiguous layout")


def check_layout(layout: object, shapes: Mapping[str, tuple[int, ...]], size: int, ctx: str) -> Layout:
    """A layout read from a manifest: every parameter placed, offsets and permutations in range."""
    if not isinstance(layout, dict):
        raise LayoutError(f"{ctx}: expected an object of parameter -> [[offset, axes...]]")
    if set(layout) != set(shapes):
        raise LayoutError(f"{ctx}: places {sorted(layout)[:5]}…, the model has {sorted(shapes)[:5]}…")
    for name, spots in layout.items():
        shape = tuple(shapes[name])
        nbytes = 4 * int(np.prod(shape, dtype=np.int64))
        if not isinstance(spots, list) or not spots:
            raise LayoutError(f"{ctx}.{name}: expected a non-empty list of [offset, axes...]")
        for spot in spots:
            ok = (isinstance(spot, list) and len(spot) == 2 + len(shape)
                  and all(isinstance(v, int) and not isinstance(v, bool) for v in spot[:1] + spot[2:])
                  and spot[1] in PLUS and sorted(_axis(a) for a in spot[2:]) == list(range(len(shape)))
                  and 0 <= spot[0] <= size - nbytes)
            if not ok:
                raise LayoutError(f"{ctx}.{name}: bad spot {spot!r} for shape {shape} in {size} bytes")
    return layout


def write_weights(blob: bytes, layout: Mapping[str, list[list[float]]], params: Mapping[str, np.ndarray]) -> bytes:
    """`blob` with every parameter's bytes replaced by `params` (same shapes), nothing else touched."""
    out = bytearray(blob)
    for name, spots in layout.items():
        if name not in params:
            raise LayoutError(f"write_weights: no value for parameter {name!r}")
        value = np.asarray(params[name], np.float32)
        for offset, plus, *perm in spots:
            offset = int(offset)
            raw = _encode(value, plus, [int(p) for p in perm])
            if offset + len(raw) > len(out):
                raise LayoutError(f"write_weights: {name!r} at {offset} runs past the program's end")
            out[offset: offset + len(raw)] = raw
    return bytes(out)
