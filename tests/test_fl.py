"""Federated full-weight rounds: wire messages, update codec, count-normalized aggregation, strategies,
and a real LiteRT device round (train_full + SGD + scatter_add)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from edgepatch.cloud.fl.strategies import (
    STRATEGIES,
    ClientUpdate,
    StrategyError,
    count_normalized_average,
    make_strategy,
)
from edgepatch.device.fl_client import (
    FlError,
    FullWeightTrainer,
    decode_update,
    encode_update,
    fetch_blob,
    publish_blob,
)
from edgepatch.protocol.bundle import load_bundle
from edgepatch.protocol.fl import (
    Assignment,
    BlobRef,
    FlJoin,
    FlRoundOpen,
    FlUpdate,
    MessageError,
    decode_fl,
    encode_fl,
    join_topic,
    make_fl_message,
    round_topic,
    update_topic,
)
from edgepatch.protocol.model_spec import param_infos
from edgepatch.protocol.params import init_params, params_to_bytes

REF = BlobRef("file:///tmp/x.npz", 10, "a" * 64)


def _open(**kw: object) -> FlRoundOpen:
    base = dict(round=1, strategy="distreal", deadline_at=time.time() + 5, global_ref=REF, local_steps=4, lr=0.05)
    base.update(kw)
    return FlRoundOpen(**base)  # type: ignore[arg-type]


def test_round_open_roundtrips_and_stays_small() -> None:
    assignments = {f"dev-{i:03d}": Assignment("k50", "fixed", i) for i in range(200)}
    msg = make_fl_message(_open(assignments=assignments), fleet="lab", sender="fl-server", seq=1)
    data = encode_fl(msg)
    assert len(data) < 64 * 1024  # weights travel by reference, so 200 assignments still fit
    back = decode_fl(round_topic("lab"), data)
    assert back.payload == msg.payload
    assert back.payload.assignment_for("dev-007").kept_seed == 7
    assert back.payload.assignment_for("someone-else") == Assignment()


def test_decode_rejects_tampering_wrong_topic_and_bad_fields() -> None:
    msg = make_fl_message(FlJoin("raspberry_pi_4", 1.0, 10, ("k100",)), fleet="lab", sender="dev-1", seq=1)
    data = encode_fl(msg)
    with pytest.raises(MessageError) as err:
        decode_fl(join_topic("lab", "dev-2"), data)
    assert err.value.reason == "topic_mismatch"
    with pytest.raises(MessageError) as err:
        decode_fl(update_topic("lab", "dev-1"), data)
    assert err.value.reason == "topic_mismatch"
    tampered = json.loads(data)
    tampered["payload"]["num_samples"] = 11
    with pytest.raises(MessageError) as err:
        decode_fl(join_topic("lab", "dev-1"), json.dumps(tampered).encode())
    assert err.value.reason == "hash_mismatch"
    with pytest.raises(MessageError, match="kept_seed"):
        Assignment("k50", "fixed", None)
    with pytest.raises(MessageError, match="uri"):
        BlobRef.from_json({"uri": "ftp://x", "bytes": 1, "sha256": "a" * 64})
    with pytest.raises(MessageError, match="update_ref"):
        FlUpdate.from_json({"round": 1, "status": "ok", "reason": "", "steps": 1, "steps_planned": 1,
                            "num_samples": 1, "loss": 0.1, "update_ref": None, "touched": {}, "variant_steps": {},
                            "timeline": [], "train_s": 0.1, "throttle_s": 0.0, "bytes_down": 1})


def test_count_normalized_average_keeps_untouched_entries() -> None:
    g = {"w": np.zeros(4, np.float32)}
    a = ClientUpdate("a", 30, {"w": np.array([1, 1, 0, 0], np.float32)}, {"w": np.array([1, 1, 0, 0], np.float32)})
    b = ClientUpdate("b", 10, {"w": np.array([3, 0, 3, 0], np.float32)}, {"w": np.array([1, 0, 1, 0], np.float32)})
    new = count_normalized_average(g, [a, b])["w"]
    # entry 0: (30·1 + 10·3) / 40; entry 1: only a touched it; entry 2: only b; entry 3: nobody -> unchanged
    np.testing.assert_allclose(new, [1.5, 1.0, 3.0, 0.0])


def test_update_codec_roundtrip_and_rejects_mismatch(digits_bundle: Path, tmp_path: Path) -> None:
    spec = load_bundle(digits_bundle).model_spec
    infos = param_infos(spec, None)
    rng = np.random.default_rng(0)
    masks = {n: rng.random(i.shape) < 0.4 for n, i in infos.items()}
    delta = {n: np.where(masks[n], rng.normal(size=i.shape), 0).astype(np.float32) for n, i in infos.items()}
    data = encode_update(delta, masks)
    full_size = len(params_to_bytes(delta))
    assert len(data) < full_size  # only touched entries (plus bit masks) travel
    ref = publish_blob(tmp_path, "u.npz", data)
    got_delta, got_mask = decode_update(fetch_blob(ref), infos)
    for n in infos:
        np.testing.assert_array_equal(got_delta[n], delta[n])
        np.testing.assert_array_equal(got_mask[n] > 0, masks[n])
    (tmp_path / "u.npz").write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    with pytest.raises(FlError, match="does not match"):
        fetch_blob(ref)
    with pytest.raises(FlError, match="unexpected or missing"):
        decode_update(data, {**infos, "extra.weight": next(iter(infos.values()))})


def test_real_litert_round_trains_only_the_kept_subnetwork(digits_bundle: Path) -> None:
    bundle = load_bundle(digits_bundle)
    spec = bundle.model_spec
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, *spec.input_shape)).astype(np.float32)
    y = rng.integers(0, spec.num_classes, 64)
    trainer = FullWeightTrainer(bundle, x, y, seed=0)
    small = next(r.id for r in bundle.manifest.variants if not r.variant.is_full(spec))
    params = init_params(spec, None, 0)
    first = trainer.train_round(params, _open(deadline_at=None, local_steps=3), Assignment(small, "first"))
    assert first.status == "ok" and first.steps == 3 and first.variant_steps == {small: 3}
    width = bundle.variant(small).widths(spec)["conv1"]
    conv1 = first.touched["conv1.weight"]
    assert conv1[:width].all() and not conv1[width:].any()  # the dropped filters were never touched
    assert np.abs(first.delta["conv1.weight"][width:]).max() == 0
    assert np.abs(first.delta["conv1.weight"][:width]).max() > 0
    fixed = trainer.train_round(params, _open(deadline_at=None, local_steps=2), Assignment(small, "fixed", 5))
    again = trainer.train_round(params, _open(deadline_at=None, local_steps=2), Assignment(small, "fixed", 5))
    np.testing.assert_array_equal(fixed.touched["conv2.weight"], again.touched["conv2.weight"])
    late = trainer.train_round(params, _open(deadline_at=time.time() - 1), Assignment(None, "random"))
    assert late.status == "missed_deadline" and late.steps == 0 and "deadline" in late.reason


def test_strategies_configure_rounds(digits_bundle: Path) -> None:
    bundle = load_bundle(digits_bundle)
    spec, rows = bundle.model_spec, bundle.manifest.variants
    devices = {f"dev-{i}": FlJoin("p", float(i + 1), 10, tuple(r.id for r in rows)) for i in range(4)}
    assert set(STRATEGIES) == {"distreal", "fedavg-wait", "fedavg-drop", "small-model", "federated-dropout", "fjord"}
    assert not make_strategy("fedavg-wait", spec, rows).configure_round(1, devices).uses_deadline
    fd = make_strategy("federated-dropout", spec, rows, seed=3).configure_round(1, devices)
    assert len({a.kept_seed for a in fd.assignments.values()}) == 4
    fj = make_strategy("fjord", spec, rows).configure_round(1, devices)
    assert fj.assignments["dev-0"].max_keep < fj.assignments["dev-3"].max_keep  # slowest gets the narrowest
    assert make_strategy("distreal", spec, rows).configure_round(1, devices).default.variant is None
    with pytest.raises(StrategyError, match="unknown strategy"):
        make_strategy("fedprox", spec, rows)
    with pytest.raises(StrategyError, match="small_keep"):
        make_strategy("small-model", spec, rows, small_keep=0.2).configure_round(1, devices)
