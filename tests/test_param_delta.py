"""A base update's change as int8 (per-row scales) or float16: the device rebuilds the published parameter
file byte for byte, the error against the distilled weights stays within its stated bound, and a malformed
delta archive is refused with a clear error (protocol/param_delta.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest

from edgepatch.protocol.param_delta import (
    DELTA_ENCODINGS,
    apply_delta,
    delta_from_bytes,
    delta_to_bytes,
    quantize_update,
)
from edgepatch.protocol.params import ParamsError, params_to_bytes


def _pair(seed: int = 0) -> tuple[dict, dict]:
    rng = np.random.default_rng(seed)
    parent = {"w": rng.normal(size=(6, 3, 3)).astype(np.float32), "b": rng.normal(size=6).astype(np.float32),
              "same": rng.normal(size=(2, 2)).astype(np.float32)}
    change = rng.normal(scale=0.01, size=(6, 3, 3)).astype(np.float32)
    change[2] *= 100.0  # one output channel moves far more than the others
    new = {"w": parent["w"] + change, "b": parent["b"] + np.float32(0.003), "same": parent["same"].copy()}
    return parent, new


@pytest.mark.parametrize("encoding", DELTA_ENCODINGS)
def test_the_device_rebuilds_the_published_file_exactly(encoding: str) -> None:
    parent, new = _pair()
    published, arrays, bound = quantize_update(parent, new, encoding)
    assert "same" not in arrays and np.array_equal(published["same"], parent["same"])  # unchanged: no delta
    worst = max(float(np.abs(published[n] - new[n]).max()) for n in new)
    assert 0 < worst == bound
    rebuilt = apply_delta(params_to_bytes(parent), delta_from_bytes(delta_to_bytes(arrays)))
    assert rebuilt == params_to_bytes(published)  # byte for byte: the device checks the manifest's sha256


def test_int8_error_is_bounded_per_row_and_a_quarter_of_the_bytes() -> None:
    parent, new = _pair(1)
    published, arrays, _ = quantize_update(parent, new, "int8")
    assert arrays["w"]["values"].dtype == np.int8 and arrays["w"]["scale"].shape == (6,)
    change = new["w"] - parent["w"]
    for row in range(6):  # each row's error is within 1/254 of that row's largest change, not the tensor's
        row_max = float(np.abs(change[row]).max())
        assert float(np.abs(published["w"][row] - new["w"][row]).max()) <= row_max / 254 * (1 + 1e-5)
    # Small channels keep their precision although channel 2 moved 100x more.
    assert float(np.abs(published["w"][0] - new["w"][0]).max()) < 0.05 * float(np.abs(change[2]).max()) / 254
    fp16 = delta_to_bytes(quantize_update(parent, new, "float16")[1])
    assert len(delta_to_bytes(arrays)) < len(fp16)


def test_float16_refuses_a_change_it_cannot_hold_and_int8_holds_it() -> None:
    parent, new = _pair()
    big = {**new, "b": parent["b"] + np.float32(1e6)}
    with pytest.raises(ParamsError, match="does not fit float16"):
        quantize_update(parent, big, "float16")
    published, _, bound = quantize_update(parent, big, "int8")
    assert bound <= 1e6 / 254 * 1.01 and np.all(np.isfinite(published["b"]))
    with pytest.raises(ParamsError, match="not finite"):
        quantize_update(parent, {**new, "b": parent["b"] * np.float32(np.nan)}, "int8")
    with pytest.raises(ValueError, match="unknown delta encoding"):
        quantize_update(parent, new, "int4")


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _good() -> bytes:
    parent, new = _pair()
    return delta_to_bytes(quantize_update(parent, new, "int8")[1])


@pytest.mark.parametrize("data, message", [
    (b"", "ends inside the magic"),
    (b"XYZ\x01\x00\x00\x00\x00", "bad magic"),
    (b"EPD\x02\x00\x00\x00\x00", "format 2"),
    (b"EPD\x01\x01\x00\x00\x00", "ends inside a name length"),
    (b"EPD\x01\x01\x00\x00\x00\x01\x00\xff\x01\x01\x01\x00\x00\x00", "not UTF-8"),
    (b"EPD\x01\x01\x00\x00\x00\x01\x00w\x07\x01\x01\x00\x00\x00", "encoding 7"),
    (b"EPD\x01\x01\x00\x00\x00\x01\x00w\x02\x01\xff\xff\xff\x7f", "ends inside 'w'"),
    (_good()[:-1], "ends inside 'b'"),
    (_good() + b"\x00", "1 bytes after the last tensor"),
    (b"PK not a zip", "unreadable delta archive"),
    (_npz(w=np.zeros((6, 9), np.float32)), "not float16"),
    (b"EPD\x01\x01\x00\x00\x00\x00\x00", "empty or repeated tensor name"),
])
def test_malformed_delta_files_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(ParamsError, match=message):
        delta_from_bytes(data)


def test_a_repeated_name_is_refused() -> None:
    one = delta_to_bytes({"w": {"values": np.zeros(3, np.float16)}})
    two = one[:4] + b"\x02" + one[5:] + one[8:]
    with pytest.raises(ParamsError, match="repeated"):
        delta_from_bytes(two)


def test_legacy_float16_npz_deltas_still_apply() -> None:
    parent, new = _pair()
    published, arrays, _ = quantize_update(parent, new, "float16")
    legacy = _npz(**{name: parts["values"] for name, parts in arrays.items()})
    assert apply_delta(params_to_bytes(parent), delta_from_bytes(legacy)) == params_to_bytes(published)


@pytest.mark.parametrize("scale, message", [
    (np.array([1, 1, np.inf, 1, 1, 1], np.float32), "NaN, inf or a negative"),
    (-np.ones(6, np.float32), "NaN, inf or a negative"),
])
def test_a_bad_scale_or_shape_is_refused_when_applied(scale: np.ndarray, message: str) -> None:
    parent, _ = _pair()
    arrays = delta_from_bytes(delta_to_bytes({"w": {"values": np.zeros((6, 3, 3), np.int8), "scale": scale}}))
    with pytest.raises(ParamsError, match=message):
        apply_delta(params_to_bytes(parent), arrays)
    wrong_shape = delta_from_bytes(delta_to_bytes({"w": {"values": np.zeros((3, 6), np.float16)}}))
    with pytest.raises(ParamsError, match="has shape"):
        apply_delta(params_to_bytes(parent), wrong_shape)


def test_parameter_names_are_free_including_scale_parts() -> None:
    """FiLM patches name parameters "<layer>.scale": nothing about a name is reserved."""
    parent = {"conv.scale": np.ones((4, 2), np.float32), "w": np.zeros(3, np.float32)}
    new = {"conv.scale": parent["conv.scale"] + np.float32(0.1), "w": parent["w"]}
    published, arrays, _ = quantize_update(parent, new)
    assert set(arrays) == {"conv.scale"}
    assert apply_delta(params_to_bytes(parent), delta_from_bytes(delta_to_bytes(arrays))) == params_to_bytes(published)
