"""Small Canoe slices (issue 13): the slice file /2 (flat float16/float32 weights, strict decode, size
bounds), the variant chosen by importance mass, helper matching on the target's context, the expert soft
vote, and immediate requests for labels no request has named yet. No bundle needed: numpy only."""

from __future__ import annotations

import io
import json
from dataclasses import replace

import numpy as np
import pytest

from edgepatch.cloud.canoe import context_share, rank_helpers
from edgepatch.device.canoe_boost import balanced_accuracy, samme_fit, vote
from edgepatch.device.canoe_helper import encode_or_widen, mass_kept, slice_variant
from edgepatch.device.canoe_target import DriftDetector
from edgepatch.export.reference_models import digits_cnn
from edgepatch.protocol import canoe_slice
from edgepatch.protocol.canoe import CanoeError, CanoeMeta, CanoeSlice, decode_slice, encode_slice
from edgepatch.protocol.model_spec import param_infos
from edgepatch.protocol.params import init_params
from edgepatch.protocol.variants import Variant, slice_params, uniform_variant

SPEC = digits_cnn()
VARIANTS = [uniform_variant(SPEC, r) for r in (1.0, 0.5, 0.25)]


def _slice(ratio: float = 0.25, encoding: str = "float16", seed: int = 0) -> CanoeSlice:
    variant = uniform_variant(SPEC, ratio)
    rng = np.random.default_rng(seed)
    kept = {n: np.sort(rng.choice(SPEC.layer(n).out, w, replace=False)).astype(np.int64)
            for n, w in variant.widths(SPEC).items()}
    base = slice_params(dict(init_params(SPEC, None, seed=seed)), param_infos(SPEC, None), kept)
    return CanoeSlice("b" * 12, variant.id, "dev-h", "r-1", [7, 8, 9], kept, base,
                      rng.normal(size=16).astype(np.float32), variant.spec(SPEC),
                      {n: rng.random(SPEC.layer(n).out).tolist() for n in kept}, encoding)


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def _parts(blob: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def test_float16_slice_round_trips_within_the_rounding_bound_at_half_the_bytes() -> None:
    s16, s32 = _slice(encoding="float16"), _slice(encoding="float32")
    b16, b32 = encode_slice(s16), encode_slice(s32)
    assert len(b16) < 0.6 * len(b32)
    back = decode_slice(b16)
    assert back.encoding == "float16" and back.kept.keys() == s16.kept.keys()
    for name in s16.kept:
        np.testing.assert_array_equal(back.kept[name], s16.kept[name])
    for name, value in s16.base.items():
        assert back.base[name].dtype == np.float32 and back.base[name].shape == value.shape
        # float16 keeps 11 significant bits: relative error ≤ 2^-11, absolute ≤ 2^-25 near zero
        np.testing.assert_allclose(back.base[name], value, rtol=2.0**-11, atol=2.0**-25)
    np.testing.assert_allclose(back.phi, s16.phi, rtol=2.0**-11)
    header = json.loads(_parts(b16)["__header__"].tobytes())
    assert 0 < header["rounding_error"] < 0.01
    exact = decode_slice(b32)  # float32 is lossless
    for name, value in s32.base.items():
        np.testing.assert_array_equal(exact.base[name], value)
    assert exact.importance["conv1"] == pytest.approx(s32.importance["conv1"], rel=1e-2)


def test_a_quarter_slice_is_at_most_a_quarter_of_the_whole_model_in_the_same_encoding() -> None:
    for encoding in ("float16", "float32"):
        whole = _slice(1.0, encoding)
        small = _slice(0.25, encoding)
        assert len(encode_slice(small)) <= 0.25 * len(encode_slice(whole)), encoding


def test_out_of_range_float16_is_refused_and_the_helper_ships_float32() -> None:
    s = _slice()
    big = dict(s.base)
    big["head.bias"] = big["head.bias"].copy()
    big["head.bias"][0] = 1e6
    s = replace(s, base=big)
    with pytest.raises(CanoeError, match="float16"):
        encode_slice(s)
    back = decode_slice(encode_or_widen(s))
    assert back.encoding == "float32" and back.base["head.bias"][0] == 1e6
    with pytest.raises(CanoeError, match="encoding"):
        encode_slice(replace(s, encoding="int8"))


def test_strict_decode_refuses_inconsistent_files() -> None:
    good = _parts(encode_slice(_slice()))
    header = json.loads(good["__header__"].tobytes())

    def with_header(**change: object) -> bytes:
        h = dict(header, **change)
        return _npz(__header__=np.frombuffer(json.dumps(h).encode(), np.uint8), kept=good["kept"],
                    weights=good["weights"])

    cases = {
        "float16": _npz(__header__=good["__header__"], kept=good["kept"], weights=good["weights"].astype(np.float32)),
        "describes": _npz(__header__=good["__header__"], kept=good["kept"], weights=good["weights"][:-1]),
        "counts": _npz(__header__=good["__header__"], kept=good["kept"][:-1], weights=good["weights"]),
        "once each": _npz(**good, extra=np.zeros(1)),
        "lacks": _npz(__header__=good["__header__"], weights=good["weights"]),
        "integers": _npz(__header__=good["__header__"], kept=good["kept"].astype(np.float32),
                         weights=good["weights"]),
        "repeats": with_header(params=header["params"] + header["params"][:1]),
        "canoe-slice/2": with_header(format="canoe-slice/1"),
        "dimension": with_header(params=[[header["params"][0][0], [-1]]] + header["params"][1:]),
        "importance": with_header(importance={"conv1": ["x"]}),
    }
    for needle, blob in cases.items():
        with pytest.raises(CanoeError, match=needle):
            decode_slice(blob)
    nan = good["weights"].copy()
    nan[3] = np.nan
    with pytest.raises(CanoeError, match="NaN"):
        decode_slice(_npz(__header__=good["__header__"], kept=good["kept"], weights=nan))


def test_a_file_that_unpacks_beyond_the_bound_is_refused_before_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    blob = encode_slice(_slice())
    monkeypatch.setattr(canoe_slice, "MAX_SLICE_BYTES", len(blob) + 64)  # the wire size passes, the unpacked not
    with pytest.raises(CanoeError, match="unpacks to"):
        decode_slice(blob)


def test_variant_by_importance_mass() -> None:
    widths = {n: SPEC.layer(n).out for n in SPEC.droppable_layers()}
    peaked = {n: np.r_[np.full(w // 4, 10.0), np.full(w - w // 4, 0.1)] for n, w in widths.items()}
    flat = {n: np.ones(w) for n, w in widths.items()}
    assert mass_kept(peaked["conv2"], 8) > 0.9 and mass_kept(flat["conv2"], 8) == pytest.approx(0.25)
    assert slice_variant(VARIANTS, SPEC, peaked, 0.9).id == "k25-25"
    assert slice_variant(VARIANTS, SPEC, flat, 0.5).id == "k50-50"
    assert slice_variant(VARIANTS, SPEC, flat, 0.99).id == "k50-50"  # never the whole model
    assert slice_variant(VARIANTS, SPEC, flat, 0.0).id == "k25-25"  # the default: the smallest
    assert slice_variant(VARIANTS, SPEC, flat, 0.0, wanted="k50-50").id == "k50-50"
    with pytest.raises(CanoeError, match="bad_request"):
        slice_variant(VARIANTS[:1], SPEC, flat, 0.0)
    with pytest.raises(CanoeError, match="bad_request"):
        slice_variant(VARIANTS, SPEC, flat, 0.0, wanted="k10-10")
    assert isinstance(VARIANTS[0], Variant)


def test_helpers_are_matched_on_the_target_context_too() -> None:
    # "narrow" has the most samples of the new classes but none of the target's classes 3..6
    metas = {"narrow": CanoeMeta([30, 5, 30, 0, 0, 0, 0, 40, 40, 40]),
             "broad": CanoeMeta([10] * 7 + [20, 20, 20])}
    target_window = [10, 10, 10, 10, 10, 10, 10, 3, 2, 1]
    assert [d for d, _ in rank_helpers(metas, [7, 8, 9], "t")] == ["narrow", "broad"]  # without the context
    assert [d for d, _ in rank_helpers(metas, [7, 8, 9], "t", context=target_window)] == ["broad", "narrow"]
    assert context_share(metas["narrow"].label_histogram, target_window, [7, 8, 9]) == pytest.approx(30 / 70)  # 0, 1, 2
    assert context_share([0] * 10, None, [7]) == 1.0
    # knowing none of the target's other classes ranks last but is still a candidate (better than none)
    blind = {**metas, "blind": CanoeMeta([0] * 7 + [90, 90, 90])}
    assert [d for d, _ in rank_helpers(blind, [7, 8, 9], "t", context=target_window)] == ["broad", "narrow", "blind"]


def test_expert_soft_vote_and_balanced_weights() -> None:
    y = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 7, 7])
    own = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 1])  # never says 7
    helper = np.array([0, 0, 1, 0, 0, 0, 1, 1, 0, 1, 1, 1, 7, 7])  # right on 7, some mistakes elsewhere
    plain_alphas, _ = samme_fit([own, helper], y, 10)
    balanced_alphas, table = samme_fit([own, helper], y, 10, balanced=True)
    assert balanced_alphas[0] < plain_alphas[0]  # the own model's misses on the rare new class weigh more
    table[1, np.setdiff1d(np.arange(10), [7])] = 0.0  # the helper as an expert for class 7 only
    probs = [np.eye(10)[own] * 0.6 + 0.04, np.eye(10)[helper] * 0.9 + 0.01]
    combined = vote([own, helper], table, 10, np.eye(10)[own], probs)
    assert (combined[y == 7] == 7).all() and (combined[y != 7] == y[y != 7]).all()
    assert balanced_accuracy(combined, y) == 1.0 and balanced_accuracy(own, y) == pytest.approx(2 / 3)


def test_a_label_no_request_named_is_requested_at_once() -> None:
    det = DriftDetector(10, reference=40, window=40, min_new=3)
    y_old = np.arange(40) % 7
    det.observe(y_old, y_old)
    det.observe(np.zeros(4, np.int64), np.array([7, 7, 7, 1]))
    first = det.check()
    assert first is not None and first.new_labels == [7]
    det.acknowledge([7])  # a slice for 7 arrived
    det.observe(np.zeros(3, np.int64), np.array([8, 8, 8]))
    second = det.check()
    assert second is not None and second.new_labels == [8]
