"""Canoe end to end over a real Mosquitto: a drifting target asks, the companion matches (skipping a helper
that is offline), a helper extracts and ships a slice, the target boosts with it."""

from __future__ import annotations

import json
import logging
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from edgepatch.cloud.canoe import CanoeCompanion
from edgepatch.cloud.companion import Companion, CompanionConfig
from edgepatch.device.canoe_boost import TailoredModel, bundle_variants, tailored_from_bundle
from edgepatch.device.canoe_helper import CanoeHelper
from edgepatch.device.canoe_target import CanoeLink, CanoeTarget, DriftDetector
from edgepatch.device.engine import Engine, open_engine
from edgepatch.protocol.bundle import Bundle, load_bundle
from edgepatch.protocol.canoe import CanoeMeta, CanoeRequest, canoe_topic
from edgepatch.protocol.params import init_params

pytestmark = [pytest.mark.broker, pytest.mark.slow]
FLEET = "canoe"
NEW = [7, 8, 9]


@dataclass
class World:
    bundle: Bundle
    base: TailoredModel  # pretrained on classes 0..6 only
    helper: TailoredModel  # knows every class
    helper_x: np.ndarray
    helper_y: np.ndarray
    stream_x: np.ndarray  # the target's stream: old classes, then (after the drift) new ones too
    stream_y: np.ndarray
    drift_at: int
    test_x: np.ndarray
    test_y: np.ndarray


def _program(bundle: Bundle) -> Engine:
    """A fresh engine: each member runs on its own thread (runtime programs are not shared across threads)."""
    return open_engine(bundle, "litert")


@pytest.fixture(scope="module")
def world(digits_bundle: Path) -> World:
    from edgepatch.data.datasets import load_digits

    bundle = load_bundle(digits_bundle)
    data = load_digits()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(data.y))
    x, y = data.x[order], data.y[order].astype(np.int64)
    test, cloud, helper, stream = slice(0, 350), slice(350, 850), slice(850, 1350), slice(1350, None)
    base = tailored_from_bundle(bundle)
    base.base = {k: v for k, v in init_params(base.spec, None, seed=1).items()}
    old = np.flatnonzero(y[cloud] < 7)
    for _ in range(250):
        idx = rng.choice(old, base.batch)
        base.train_step(x[cloud][idx], y[cloud][idx])
    helper_model = base.copy(_program(bundle))
    for _ in range(300):
        idx = rng.choice(500, helper_model.batch)
        helper_model.train_step(x[helper][idx], y[helper][idx])
    sx, sy = x[stream], y[stream]
    pre, post = np.flatnonzero(sy < 7)[:160], np.flatnonzero(sy >= 0)
    post = np.setdiff1d(post, pre)
    drifted = np.concatenate([pre, rng.permutation(post)])
    return World(bundle, base, helper_model, x[helper], y[helper], sx[drifted], sy[drifted], len(pre),
                 x[test], y[test])


def _wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture
def links(mosquitto: object) -> Iterator[Callable[[str], CanoeLink]]:
    made: list[CanoeLink] = []

    def make(device: str) -> CanoeLink:
        link = CanoeLink(FLEET, device, mosquitto.host, mosquitto.port)  # type: ignore[attr-defined]
        made.append(link)
        return link

    yield make
    for link in made:
        link.stop()


def _companion(mosquitto: object, timeout_s: float = 1.5) -> CanoeCompanion:
    comp = CanoeCompanion(FLEET, mosquitto.host, mosquitto.port, 10, timeout_s=timeout_s)  # type: ignore[attr-defined]
    comp.start()
    return comp


def _target(world: World) -> CanoeTarget:
    return CanoeTarget("dev-t", world.base.copy(_program(world.bundle)), bundle_variants(world.bundle),
                       world.bundle.base_version, DriftDetector(10, reference=96, window=64), cooldown=10_000)


def _class_accuracy(target: CanoeTarget, world: World, classes: list[int], own_only: bool = False) -> float:
    mask = np.isin(world.test_y, classes)
    return target.accuracy(world.test_x[mask], world.test_y[mask], own_only=own_only)


def test_drift_request_match_slice_and_boost(world: World, mosquitto: object,
                                             links: Callable[[str], CanoeLink]) -> None:
    comp = _companion(mosquitto, timeout_s=5.0)  # the default: the helper fine-tunes its slice (300 steps)
    try:
        # The best-ranked "helper" says it has lots of the new classes but never answers (offline).
        ghost = links("dev-ghost")
        ghost.start()
        ghost.publish("meta", CanoeMeta([50] * 7 + [500, 500, 500]), retain=True)
        helper = CanoeHelper("dev-h", world.helper, world.helper_x, world.helper_y, bundle_variants(world.bundle),
                             world.bundle.base_version)
        helper_link = links("dev-h")
        helper.serve(helper_link)
        helper_link.start()
        helper_link.publish("meta", helper.meta(), retain=True)  # again, now that we are connected
        target = _target(world)
        target_link = links("dev-t")
        target_link.subscribe(canoe_topic(FLEET, "dev-t", "reply"), target.on_message)
        target_link.start()
        _wait(lambda: {"dev-ghost", "dev-h"} <= set(comp.metas), 10, "device metadata at the companion")

        request: CanoeRequest | None = None
        before = after = None
        for start in range(0, len(world.stream_y), 16):
            xb, yb = world.stream_x[start:start + 16], world.stream_y[start:start + 16]
            target.observe(xb, yb)
            target.learn(2)
            target.poll_replies()
            if request is None and (req := target.maybe_request()) is not None:
                assert start >= world.drift_at - 16, "drift detected before the drift"
                request = req
                before = _class_accuracy(target, world, req.classes)
                target_link.publish("request", req)
                _wait(lambda: not target.inbox.empty(), 30, "the companion's reply")
                target.poll_replies()
                after = _class_accuracy(target, world, req.classes)
                own_now = _class_accuracy(target, world, req.classes, own_only=True)
                break
        assert request is not None, "the target never detected the drift"
        # The request names the new labels seen so far (the first ones to reach `min_new` samples).
        assert request.classes and set(request.classes) <= set(NEW), request.classes
        assert target.events[-1]["event"] == "slice", target.events
        assert target.events[-1]["helper"] == "dev-h"
        assert after is not None and before is not None
        assert after >= before + 0.3, (before, after)  # accuracy on the drifted classes improves
        assert after > own_now + 0.2
        weights = target.ensemble.weights()
        assert len(weights) == 2 and all(a > 0 for a in weights.values()), weights
        assert comp.stats["timeouts"] == 1 and comp.stats["helpers_tried"] == 2
        assert comp.stats["offers_relayed"] == 1 and comp.stats["slice_bytes"] == target.slice_bytes_received > 0
        # No raw data in the request: only classes, a histogram and two accuracies.
        assert set(request.to_json()) == {"request_id", "classes", "label_histogram", "window_accuracy",
                                          "reference_accuracy", "reason"}
        # The target keeps learning with the helper in the ensemble.
        assert np.all(np.isfinite(target.learn(3)))
    finally:
        comp.stop()


def test_unknown_classes_and_no_helper_get_error_replies(world: World, mosquitto: object,
                                                         links: Callable[[str], CanoeLink]) -> None:
    comp = _companion(mosquitto, timeout_s=0.5)
    try:
        target = _target(world)
        link = links("dev-t")
        link.subscribe(canoe_topic(FLEET, "dev-t", "reply"), target.on_message)
        link.start()
        target.observe(world.stream_x[:64], world.stream_y[:64])
        link.publish("request", CanoeRequest("dev-t-bad", [7, 42], [1] * 10, 0.2, 0.9, "test"))
        _wait(lambda: not target.inbox.empty(), 10, "the error reply")
        assert target.poll_replies() == 0
        assert target.events[-1]["event"] == "error" and "unknown classes [42]" in target.events[-1]["error"]
        # Only an offline helper knows the classes: it times out, the target hears "no_helper".
        ghost = links("dev-ghost")
        ghost.start()
        ghost.publish("meta", CanoeMeta([0] * 7 + [9, 9, 9]), retain=True)
        _wait(lambda: "dev-ghost" in comp.metas, 10, "ghost metadata")
        link.publish("request", CanoeRequest("dev-t-r2", NEW, [1] * 10, 0.2, 0.9, "test"))
        _wait(lambda: not target.inbox.empty(), 10, "the no-helper reply")
        target.poll_replies()
        assert target.events[-1]["error"].startswith("no_helper") and comp.stats["timeouts"] == 1
        assert comp.stats["bad_requests"] == 1
        assert np.all(np.isfinite(target.learn(3))) and target.ensemble.helpers == []
    finally:
        comp.stop()


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - our own loopback server
        return bytes(resp.read())


def _sample(metrics_text: str, name: str) -> float:
    """The value of an unlabelled sample in a Prometheus text exposition (AssertionError if absent)."""
    for line in metrics_text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_canoe_is_visible_in_metrics_fleet_page_and_device_logs(world: World, mosquitto: object, tmp_path: Path,
                                                                 digits_bundle: Path,
                                                                 links: Callable[[str], CanoeLink],
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """The full companion with Canoe on (what `edgepatch cloud serve --canoe` runs): after one exchange whose
    first candidate is offline, /metrics, /api/fleet, /fleet and the target's log all show it."""
    caplog.set_level(logging.INFO, logger="edgepatch.device.canoe")
    companion = Companion(CompanionConfig(bundle=digits_bundle, work_dir=tmp_path / "cloud",
                                          broker_host=mosquitto.host, broker_port=mosquitto.port,  # type: ignore[attr-defined]
                                          fleet=FLEET, canoe=True, canoe_timeout_s=5.0))
    companion.start()
    try:
        comp = companion.canoe
        assert comp is not None
        ghost = links("dev-ghost")
        ghost.start()
        ghost.publish("meta", CanoeMeta([50] * 7 + [500, 500, 500]), retain=True)
        helper = CanoeHelper("dev-h", world.helper, world.helper_x, world.helper_y, bundle_variants(world.bundle),
                             world.bundle.base_version)
        helper_link = links("dev-h")
        helper.serve(helper_link)
        helper_link.start()
        helper_link.publish("meta", helper.meta(), retain=True)
        target = _target(world)
        target_link = links("dev-t")
        target_link.subscribe(canoe_topic(FLEET, "dev-t", "reply"), target.on_message)
        target_link.start()
        _wait(lambda: {"dev-ghost", "dev-h"} <= set(comp.metas), 10, "device metadata at the companion")

        request = None
        for start in range(0, len(world.stream_y), 16):
            target.observe(world.stream_x[start:start + 16], world.stream_y[start:start + 16])
            target.learn(2)
            if (request := target.maybe_request()) is not None:
                target_link.publish("request", request)
                _wait(lambda: not target.inbox.empty(), 30, "the companion's reply")
                assert target.poll_replies() == 1
                break
        assert request is not None, "the target never detected the drift"
        weights = target.ensemble.weights()
        assert target.publish_weights(target_link) > 0
        _wait(lambda: "dev-t" in comp.ensembles, 10, "the target's weight report at the companion")

        # /metrics: the Canoe counters on the companion's one registry, beside the ingest ones.
        text = _get(f"{companion.web.url}/metrics").decode()
        assert _sample(text, "edgepatch_canoe_requests_total") == 1
        assert _sample(text, "edgepatch_canoe_helpers_tried_total") == 2
        assert _sample(text, "edgepatch_canoe_timeouts_total") == 1
        assert _sample(text, "edgepatch_canoe_offers_relayed_total") == 1
        assert _sample(text, "edgepatch_canoe_slice_bytes_total") == target.slice_bytes_received > 0
        assert _sample(text, "edgepatch_canoe_weight_reports_total") == 1
        assert _sample(text, "edgepatch_canoe_pending") == 0
        assert "edgepatch_ingest_messages_total" in text

        # /api/fleet: the request with the helpers tried, the chosen one and the slice bytes; the weights.
        fleet = json.loads(_get(f"{companion.web.url}/api/fleet"))
        [entry] = fleet["canoe"]["requests"]
        assert entry["request_id"] == request.request_id and entry["target"] == "dev-t"
        assert entry["classes"] == request.classes and entry["outcome"] == "relayed"
        assert entry["helpers_tried"] == ["dev-ghost", "dev-h"] and entry["helper"] == "dev-h"
        assert entry["slice_bytes"] == target.slice_bytes_received and entry["timeouts"] == 1
        members = fleet["canoe"]["ensembles"]["dev-t"]["members"]
        assert [m["member"] for m in members] == list(weights), members
        assert [m["alpha"] for m in members] == pytest.approx(list(weights.values()))
        assert members[1]["helper"] == "dev-h" and members[1]["request_id"] == request.request_id
        assert members[1]["slice_bytes"] == target.slice_bytes_received

        page = _get(f"{companion.web.url}/fleet").decode()
        assert "<h2>Canoe</h2>" in page and request.request_id in page
        assert f"{weights['own']:.4f}" in page and "dev-ghost → dev-h" in page

        # Device logs: one structured record per step (request, slice, weights).
        events = {r.canoe["event"]: r.canoe for r in caplog.records if hasattr(r, "canoe")}
        assert events["request"]["request_id"] == request.request_id
        assert events["slice"]["helper"] == "dev-h" and events["slice"]["bytes"] == target.slice_bytes_received
        assert events["weights"]["weights"] == weights
    finally:
        companion.stop()
