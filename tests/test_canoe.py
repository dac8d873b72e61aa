"""Canoe: wire formats, drift detection, SAMME weights, helper slices and the target's boosting (LiteRT)."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgepatch.cloud.canoe import rank_helpers
from edgepatch.device.canoe_boost import (
    CanoeEnsemble,
    SliceModel,
    bundle_variants,
    samme_weights,
    vote,
)
from edgepatch.device.canoe_helper import CanoeHelper, full_model_bytes
from edgepatch.device.canoe_target import CanoeTarget, DriftDetector
from edgepatch.protocol.canoe import (
    CanoeError,
    CanoeMeta,
    CanoeOffer,
    CanoeReply,
    CanoeRequest,
    CanoeTask,
    canoe_topic,
    check_classes,
    decode_message,
    decode_slice,
    encode_message,
)

NEW = [7, 8, 9]


# ------------------------------------------------------------------------------------ wire (fast)

def test_message_round_trip_and_tamper() -> None:
    req = CanoeRequest("dev-0-r1", [7, 8], [5] * 10, 0.4, 0.9, "new labels")
    topic = canoe_topic("lab", "dev-0", "request")
    data = encode_message(req, fleet="lab", device_id="dev-0")
    msg = decode_message(topic, data)
    assert msg.payload == req and msg.device_id == "dev-0"
    env = json.loads(data)
    env["payload"]["classes"] = [1]
    with pytest.raises(CanoeError, match="content_hash"):
        decode_message(topic, json.dumps(env).encode())
    with pytest.raises(CanoeError, match="does not belong on channel"):
        decode_message(canoe_topic("lab", "dev-0", "offer"), data)
    with pytest.raises(CanoeError, match="not a canoe topic"):
        decode_message("edgepatch/v1/lab/dev-0/patch", data)


def test_offer_must_be_inline_xor_reference_and_errors_are_coded() -> None:
    sha = "a" * 64
    with pytest.raises(CanoeError, match="exactly one"):
        CanoeOffer.from_json(CanoeOffer("r1", "t", "h", sha, 3, "AAAA", "file:///x").to_json())
    with pytest.raises(CanoeError, match="error code"):
        CanoeOffer.from_json(CanoeOffer("r1", "t", "h", error="whatever").to_json())
    ok = CanoeOffer.from_json(CanoeOffer("r1", "t", "h", error="no_data: none").to_json())
    assert not ok.ok
    with pytest.raises(CanoeError, match="either an offer or an error"):
        CanoeReply.from_json({"request_id": "r1", "offer": None, "error": ""})


def test_unknown_classes_are_named() -> None:
    with pytest.raises(CanoeError, match=r"unknown classes \[-1, 12\]"):
        check_classes([3, 12, -1], 10)
    assert check_classes([3, 3, 1], 10) == [1, 3]


def test_rank_helpers_prefers_coverage_of_requested_classes_and_skips_offline() -> None:
    metas = {"a": CanoeMeta([50] * 7 + [0, 0, 0]), "b": CanoeMeta([10] * 7 + [30, 30, 0]),
             "c": CanoeMeta([0] * 7 + [40, 40, 40]), "d": CanoeMeta([0] * 7 + [90, 90, 90], online=False),
             "t": CanoeMeta([0] * 7 + [99, 99, 99])}
    ranked = rank_helpers(metas, NEW, target="t")
    assert [d for d, _ in ranked] == ["c", "b"]  # a has none of them, d is offline, t is the target


def test_drift_detector_new_labels_and_accuracy_drop() -> None:
    det = DriftDetector(10, reference=40, window=40, min_new=3)
    y_old = np.arange(40) % 7
    det.observe(y_old, y_old)  # perfect reference period over classes 0..6
    det.observe(y_old[:20], y_old[:20])
    assert det.check() is None
    y_new = np.array([7, 8, 9, 1] * 5)
    det.observe(np.ones(20, np.int64), y_new)  # the new labels are all wrong
    report = det.check()
    assert report is not None and report.new_labels == NEW and report.reason == "new labels"
    assert set(NEW) <= set(report.classes) and sum(report.label_histogram) == 40

    drop = DriftDetector(10, reference=40, window=40, drop=0.2, class_floor=0.5)
    drop.observe(y_old, y_old)
    wrong = (y_old + 1) % 7
    drop.observe(np.where(y_old < 3, wrong, y_old), y_old)  # classes 0..2 now misclassified
    report = drop.check()
    assert report is not None and report.reason == "accuracy drop" and report.classes == [0, 1, 2]


def test_samme_weights_follow_accuracy() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 400)
    own = np.where(y >= 7, (y + 1) % 10, y)  # wrong on the drifted classes only
    good = np.where(rng.random(400) < 0.9, y, (y + 3) % 10)  # right 90 % of the time
    poor = np.where(rng.random(400) < 0.5, y, (y + 3) % 10)
    a_good = samme_weights([own, good], y, 10)[1]
    a_poor = samme_weights([own, poor], y, 10)[1]
    assert a_good > a_poor > 0
    useless = (y + 5) % 10  # always wrong
    assert samme_weights([own, useless], y, 10)[1] <= 0
    # Voting: with the good helper, the drifted classes come right.
    pred = vote([own, good], samme_weights([own, good], y, 10), 10, np.zeros((400, 10)))
    assert (pred == y).mean() > max((own == y).mean(), 0.85)


def test_slice_file_refuses_pickles_and_wrong_hash() -> None:
    buf = io.BytesIO()
    np.savez(buf, __header__=np.array([{"format": "x"}], dtype=object))
    with pytest.raises(CanoeError, match="not a readable slice file"):
        decode_slice(buf.getvalue())
    with pytest.raises(CanoeError, match="sha256"):
        decode_slice(b"whatever", expected_sha256="0" * 64)


# ----------------------------------------------------------------------- real bundle (LiteRT, slow)

Scenario = Any  # conftest.CanoeWorld: bundle, base (classes 0..6), helper (all), helper_x/y, test_x/y


@pytest.fixture(scope="module")
def scenario(digits_bundle: Path, canoe_world_builder: Callable[[Path, str], Scenario]) -> Scenario:
    return canoe_world_builder(digits_bundle, "litert")


def _helper(sc: Scenario, **kw: object) -> CanoeHelper:
    return CanoeHelper("dev-h", sc.helper, sc.helper_x, sc.helper_y, bundle_variants(sc.bundle),
                       sc.bundle.base_version, **kw)  # type: ignore[arg-type]


def _accuracy(pred: np.ndarray, y: np.ndarray, classes: list[int]) -> float:
    mask = np.isin(y, classes)
    return float((pred[mask] == y[mask]).mean())


@pytest.mark.slow
def test_slice_is_smaller_than_the_full_model_and_depends_on_the_classes(scenario: Scenario) -> None:
    helper = _helper(scenario)
    offer_new = helper.answer(CanoeTask("r-new", "dev-t", NEW))
    offer_old = helper.answer(CanoeTask("r-old", "dev-t", [0, 1, 2]))
    assert offer_new.ok and offer_old.ok, (offer_new.error, offer_old.error)
    # This bundle's smallest sliced variant keeps half the filters: ≤ 0.5× the whole model in the same
    # encoding (float16); a bundle with a 25 % variant ships ≤ 0.25× (test_canoe_slices, benchmarks/canoe.py).
    full = full_model_bytes(scenario.helper, "float16")
    assert offer_new.size <= 0.5 * full, (offer_new.size, full)
    assert offer_new.size <= 0.25 * full_model_bytes(scenario.helper, "float32")
    kept_new, kept_old = helper.served[0]["kept"], helper.served[1]["kept"]
    assert kept_new != kept_old  # the Taylor scores depend on which classes were asked for
    assert helper.served[0]["variant"] == "k50-50"
    s = decode_slice(offer_new.slice_bytes(), expected_sha256=offer_new.sha256)
    assert s.classes == NEW and s.widths() == {"conv1": 8, "conv2": 16} and s.encoding == "float16"
    # The slice runs on the target as the matching variant (LiteRT here) and knows the new classes.
    member = SliceModel.from_slice(s, scenario.base.engine, scenario.base.spec, scenario.base.patch,
                                   scenario.base.shared)
    pred = member.logits(scenario.test_x).argmax(axis=1)
    assert _accuracy(pred, scenario.test_y, NEW) > 0.7
    own = scenario.base.logits(scenario.test_x).argmax(axis=1)
    assert _accuracy(own, scenario.test_y, NEW) < 0.1  # the base never saw them


@pytest.mark.slow
def test_unknown_classes_and_missing_data_give_clear_errors(scenario: Scenario) -> None:
    helper = _helper(scenario)
    offer = helper.answer(CanoeTask("r-bad", "dev-t", [4, 11]))
    assert not offer.ok and offer.error.startswith("unknown_classes") and "11" in offer.error
    no_nines = scenario.helper_y != 9
    poor = CanoeHelper("dev-p", scenario.helper, scenario.helper_x[no_nines], scenario.helper_y[no_nines],
                       bundle_variants(scenario.bundle), scenario.bundle.base_version)
    offer = poor.answer(CanoeTask("r-9", "dev-t", [9]))
    assert not offer.ok and offer.error.startswith("no_data")


@pytest.mark.slow
def test_ensemble_weights_follow_recent_accuracy_and_useless_helpers_retire(scenario: Scenario) -> None:
    helper = _helper(scenario)
    good = decode_slice(helper.answer(CanoeTask("r-g", "dev-t", NEW)).slice_bytes())
    sc, own = scenario, scenario.base.copy()
    make = lambda s, name: SliceModel(name, own.engine, s.variant_id,  # noqa: E731
                                      SliceModel.from_slice(s, own.engine, own.spec, own.patch, own.shared).params,
                                      s.phi)
    bad = make(good, "bad")
    rng = np.random.default_rng(1)
    bad.params = {k: (rng.permutation(v.ravel()).reshape(v.shape) if k.endswith("weight") else v)
                  for k, v in bad.params.items()}  # the same widths, scrambled weights
    window = np.isin(sc.test_y, NEW) | (np.arange(len(sc.test_y)) % 2 == 0)
    wx, wy = sc.test_x[window][:160], sc.test_y[window][:160].astype(np.int32)

    ens_good = CanoeEnsemble(own, 10)
    ens_good.add(make(good, "good"))
    ens_bad = CanoeEnsemble(own, 10)
    ens_bad.add(bad)
    w_good = ens_good.refit(wx, wy)["good"]
    w_bad_alpha = samme_weights([own.logits(wx).argmax(1), bad.logits(wx).argmax(1)], wy, 10)[1]
    assert w_good > w_bad_alpha
    assert (ens_good.predict(wx) == wy).mean() > (own.logits(wx).argmax(1) == wy).mean() + 0.1
    # The scrambled helper does not help: it leaves the ensemble after `patience` refits at most.
    for _ in range(ens_bad.patience):
        ens_bad.refit(wx, wy)
    assert ens_bad.helpers == [] and ens_bad.retired == ["bad"]
    # Once the own model knows the new classes (here: the helper's full model stands in), α of the helper
    # falls and it is retired as no longer helping.
    ens_late = CanoeEnsemble(scenario.helper, 10)
    ens_late.add(make(good, "good"))
    for _ in range(ens_late.patience):
        ens_late.refit(wx, wy)
    assert ens_late.helpers == []


def _target(sc: Scenario) -> CanoeTarget:
    return CanoeTarget("dev-t", sc.base.copy(), bundle_variants(sc.bundle), sc.bundle.base_version,
                       DriftDetector(10, reference=64, window=64))


@pytest.mark.slow
def test_target_rejects_a_slice_with_a_wrong_hash_and_keeps_learning(scenario: Scenario) -> None:
    offer = _helper(scenario).answer(CanoeTask("r-h", "dev-t", NEW))
    forged = CanoeOffer(offer.request_id, offer.target, offer.helper, "0" * 64, offer.size,
                        inline_b64=offer.inline_b64)
    target = _target(scenario)
    target.observe(scenario.helper_x[:64], scenario.helper_y[:64])
    assert not target.on_reply(CanoeReply(offer.request_id, offer=forged))  # nobody asked: ignored unread
    assert target.events[-1]["event"] == "unrequested" and target.ensemble.helpers == []
    target._pending = offer.request_id  # now it answers our pending request: read, and refused for its hash
    assert not target.on_reply(CanoeReply(offer.request_id, offer=forged))
    assert target.ensemble.helpers == [] and target.events[-1]["event"] == "rejected"
    assert "sha256" in target.events[-1]["error"]
    # A slice for another base version is refused too; learning alone goes on.
    stale = _helper(scenario)
    stale.base_version = "other-base"
    assert not target.accept_offer(stale.answer(CanoeTask("r-s", "dev-t", NEW)))
    assert "base" in target.events[-1]["error"]
    losses = target.learn(5)
    assert len(losses) == 5 and all(np.isfinite(losses))
    # Tampered bytes with the original hash are refused as well.
    raw = bytearray(base64.b64decode(offer.inline_b64))
    raw[-20] ^= 0xFF
    tampered = CanoeOffer(offer.request_id, offer.target, offer.helper, offer.sha256, offer.size,
                          inline_b64=base64.b64encode(bytes(raw)).decode())
    assert not target.accept_offer(tampered)


@pytest.mark.slow
def test_large_slices_travel_by_reference(scenario: Scenario, tmp_path: Path) -> None:
    helper = _helper(scenario, share_dir=tmp_path, inline_limit=1024)
    offer = helper.answer(CanoeTask("r-ref", "dev-t", NEW))
    assert offer.ok and not offer.inline_b64 and offer.reference.startswith("file://")
    assert Path(offer.reference[len("file://"):]).stat().st_size == offer.size
    target = _target(scenario)
    target.observe(scenario.test_x[:64], scenario.test_y[:64])
    assert target.accept_offer(offer) and target.slice_bytes_received == offer.size


@pytest.mark.slow
def test_a_label_no_request_named_skips_the_cooldown_and_a_repeat_waits(scenario: Scenario) -> None:
    target = _target(scenario)
    target.cooldown = 10_000
    x, y = scenario.helper_x, scenario.helper_y
    old, of = np.flatnonzero(y < 7), {c: np.flatnonzero(y == c) for c in NEW}
    target.observe(x[old[:64]], y[old[:64]])
    target.observe(x[of[7][:3]], y[of[7][:3]])
    first = target.maybe_request()
    assert first is not None and 7 in first.classes and 8 not in first.classes
    target.on_reply(CanoeReply(first.request_id, error="no_helper: none"))  # nobody could help
    assert target.maybe_request() is None  # 7 again: the cooldown holds
    target.observe(x[of[8][:3]], y[of[8][:3]])
    second = target.maybe_request()  # 8 was never asked for: at once, cooldown or not
    assert second is not None and 8 in second.classes and target.requests_sent == 2
