"""Canoe observability without a bundle: the weight-metric names, FleetWeb's section hook, and the
CanoeCompanion's counters / request records / weight reports over a real Mosquitto."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgepatch.cloud.canoe import CanoeCompanion, canoe_html
from edgepatch.cloud.metrics import CloudMetrics
from edgepatch.cloud.store import PatchStore, sqlite_url
from edgepatch.cloud.web import FleetWeb
from edgepatch.device.canoe_target import CanoeLink, weight_metric_name
from edgepatch.protocol.canoe import CanoeMeta, CanoeRequest

FLEET = "obs"
METRIC_NAME = re.compile(r"^[a-z][a-z0-9_.]{0,63}$")  # protocol/messages.py's rule


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - our own loopback server
        return bytes(resp.read())


def _wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_weight_metric_names_are_valid_deterministic_and_distinct() -> None:
    assert weight_metric_name("own") == "canoe.alpha.own"
    assert weight_metric_name("dev-H/dev-t-r0-208") == "canoe.alpha.dev_h.dev_t_r0_208"
    long_a, long_b = "helper-" + "x" * 60 + "/req-a", "helper-" + "x" * 60 + "/req-b"
    names = {weight_metric_name(m) for m in (long_a, long_b)}
    assert len(names) == 2 and all(METRIC_NAME.match(n) for n in names), names
    assert weight_metric_name(long_a) == weight_metric_name(long_a)


@pytest.fixture
def web(tmp_path: Path) -> Iterator[FleetWeb]:
    store = PatchStore(sqlite_url(tmp_path / "store.sqlite"))
    fleet_web = FleetWeb(store, CloudMetrics())
    fleet_web.start()
    yield fleet_web
    fleet_web.stop()
    store.close()


def test_fleet_web_sections_show_in_json_and_html_and_survive_a_broken_provider(web: FleetWeb) -> None:
    web.add_section("extra", lambda: {"n": 3}, lambda d: f"<h2>Extra</h2><p>n={d['n']}</p>")

    def broken() -> dict[str, object]:
        raise RuntimeError("provider down")

    web.add_section("broken", broken, lambda d: "<p>never</p>")
    data = json.loads(_get(f"{web.url}/api/fleet"))
    assert data["extra"] == {"n": 3}
    assert data["broken"] == {"error": "RuntimeError: provider down"}
    assert data["devices"] == []  # the built-in fields are still there
    page = _get(f"{web.url}/fleet").decode()
    assert "<h2>Extra</h2><p>n=3</p>" in page and "unavailable: RuntimeError: provider down" in page
    with pytest.raises(ValueError, match="collides"):
        web.add_section("devices", lambda: {})


@pytest.mark.broker
def test_companion_counts_outcomes_and_records_weight_reports(mosquitto: object, web: FleetWeb) -> None:
    host, port = mosquitto.host, mosquitto.port  # type: ignore[attr-defined]
    comp = CanoeCompanion(FLEET, host, port, 10, timeout_s=0.3, metrics=web.metrics)
    comp.start()
    comp.attach(web)
    target = CanoeLink(FLEET, "dev-t", host, port)
    ghost = CanoeLink(FLEET, "dev-ghost", host, port)
    try:
        target.start()
        ghost.start()
        # Unknown classes (and a reason that must be escaped on the page).
        target.publish("request", CanoeRequest("dev-t-bad", [3, 42], [1] * 10, 0.2, 0.9, "<script>x</script>"))
        _wait(lambda: comp.stats["bad_requests"] == 1, 10, "the bad request")
        # Only an offline helper knows the classes: one timeout, then no_helper.
        ghost.publish("meta", CanoeMeta([0] * 7 + [9, 9, 9]), retain=True)
        _wait(lambda: "dev-ghost" in comp.metas, 10, "ghost metadata")
        target.publish("request", CanoeRequest("dev-t-r1", [8, 9], [1] * 10, 0.2, 0.9, "new labels"))
        _wait(lambda: comp.stats["no_helper"] == 1, 10, "the no-helper outcome")
        assert web.metrics.value("edgepatch_canoe_requests_total") == 2
        assert web.metrics.value("edgepatch_canoe_bad_requests_total") == 1
        assert web.metrics.value("edgepatch_canoe_timeouts_total") == 1
        assert web.metrics.value("edgepatch_canoe_helpers_tried_total") == 1
        assert web.metrics.value("edgepatch_canoe_no_helper_total") == 1
        assert web.metrics.value("edgepatch_canoe_offers_relayed_total") == 0

        # Weight reports: the latest per target; retirements counted by their increase.
        common = {"base_version": "b" * 64, "variant_id": "v100"}
        target.publish_metrics({"canoe.alpha.own": 1.2, weight_metric_name("dev-h/dev-t-r0"): 0.4,
                                "canoe.retired": 0.0}, **common)
        _wait(lambda: "dev-t" in comp.ensembles, 10, "the first weight report")
        target.publish_metrics({"canoe.alpha.own": 1.5, "canoe.retired": 2.0}, **common)
        target.publish_metrics({"train_ms": 3.0}, **common)  # not a Canoe report: ignored
        target.publish_metrics({"canoe.alpha.own": 1.5, "canoe.retired": 2.0}, **common)  # none newly retired
        _wait(lambda: comp.stats["weight_reports"] == 3, 10, "the third weight report")
        time.sleep(0.2)
        assert web.metrics.value("edgepatch_canoe_weight_reports_total") == 3
        assert web.metrics.value("edgepatch_canoe_helpers_retired_total") == 2
        members = comp.ensembles["dev-t"]["members"]
        assert members == [{"metric": "canoe.alpha.own", "member": "own", "helper": None, "request_id": None,
                            "classes": None, "slice_bytes": None, "alpha": 1.5}]

        data = json.loads(_get(f"{web.url}/api/fleet"))["canoe"]
        outcomes = {r["request_id"]: r for r in data["requests"]}
        assert outcomes["dev-t-bad"]["outcome"] == "unknown_classes" and "[42]" in outcomes["dev-t-bad"]["error"]
        assert outcomes["dev-t-r1"]["outcome"] == "no_helper"
        assert outcomes["dev-t-r1"]["helpers_tried"] == ["dev-ghost"] and outcomes["dev-t-r1"]["timeouts"] == 1
        assert data["requests"][0]["request_id"] == "dev-t-r1"  # newest first
        page = _get(f"{web.url}/fleet").decode()
        assert "&lt;script&gt;" in page and "<script>x" not in page
        assert "1.5000" in page
        metrics_text = _get(f"{web.url}/metrics").decode()
        assert "edgepatch_canoe_helpers_retired_total 2.0" in metrics_text
    finally:
        target.stop()
        ghost.stop()
        comp.stop()


def test_canoe_html_of_an_empty_companion_snapshot() -> None:
    page = canoe_html({"stats": {"requests": 0}, "requests": [], "ensembles": {}, "pending": 0})
    assert "<h2>Canoe</h2>" in page and "requests: 0" in page


def test_cloud_serve_has_the_canoe_switch() -> None:
    from edgepatch.cloud.cli import app

    result = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "--canoe" in result.output and "--canoe-timeout" in result.output
