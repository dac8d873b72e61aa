"""Issue 13: a device sends a metric only when its value changed since it was last sent, every metric every
`metrics_full_every`-th report (so a cloud that lost them has them again), and events (a gate decision)
every time. Over the MQTT twin into the real ingest and store."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from edgepatch.cloud.ingest import IngestService, IngestSettings
from edgepatch.cloud.store import PatchStore
from edgepatch.device.link import DeviceLink, LinkSettings
from edgepatch.device.outbox import Outbox
from edgepatch.protocol.messages import MessageError
from edgepatch.protocol.mqtt import make_client
from edgepatch.protocol.mqtt_memory import MemoryBroker

sys.path.insert(0, str(Path(__file__).parent))  # pytest runs with --import-mode=importlib
from polling import wait_until  # noqa: E402

FLEET, DEVICE = "lab", "dev-1"
ALL = {"holdout_acc", "steps", "round_seconds"}


def make_link(broker: MemoryBroker, tmp_path: Path, **kw) -> DeviceLink:
    settings = LinkSettings(fleet=FLEET, device_id=DEVICE, **kw)
    link = DeviceLink(settings, Outbox(tmp_path / "outbox.sqlite"), base_version="b1", variant_id="v50",
                      client=make_client(settings.mqtt(), broker))
    link.start()
    assert link.wait_connected(2)
    return link


def make_ingest(broker: MemoryBroker, store: PatchStore) -> IngestService:
    settings = IngestSettings(fleet=FLEET, client_id="ingest-twin", reconnect_min_delay=0.05)
    service = IngestService(store, settings, client=make_client(settings.mqtt(), broker))
    service.start()
    assert service.wait_subscribed(2)
    return service


def stored(store: PatchStore, name: str) -> list[float]:
    return [v for _, v in store.metric_values(DEVICE, name)]


def names(msg) -> set[str]:
    return set(msg.payload.values) if msg is not None else set()


def test_only_changed_metrics_go_out_with_a_full_refresh_every_n_reports(tmp_path):
    broker = MemoryBroker()
    store = PatchStore(tmp_path / "store.db")
    ingest = make_ingest(broker, store)
    link = make_link(broker, tmp_path, metrics_full_every=3)
    try:
        reports = [{"holdout_acc": 0.5, "steps": 20.0, "round_seconds": 1.0},  # 1st report: always full
                   {"holdout_acc": 0.5, "steps": 20.0, "round_seconds": 1.25},  # only what changed
                   {"holdout_acc": 0.5, "steps": 20.0, "round_seconds": 1.25},  # nothing changed: no message
                   {"holdout_acc": 0.5, "steps": 20.0, "round_seconds": 1.25},  # 4th = 3·1 + 1: full refresh
                   {"holdout_acc": 0.75, "steps": 20.0, "round_seconds": 1.25}]
        sent = [link.publish_metrics(r) for r in reports]
        assert [names(m) for m in sent] == [ALL, {"round_seconds"}, set(), ALL, {"holdout_acc"}]
        assert link.metrics_sent == reports[-1]
        assert link.wait_drained(5)
        wait_until(lambda: len(stored(store, "holdout_acc")) == 3, 5, "the ingest to store the metrics")
        assert stored(store, "holdout_acc") == [0.5, 0.5, 0.75]
        assert stored(store, "steps") == [20.0, 20.0]
        assert stored(store, "round_seconds") == [1.0, 1.25, 1.25]
        # What it saves: 4 metric messages instead of 5, 8 values instead of 15.
        assert sum(len(names(m)) for m in sent) == 8
    finally:
        link.stop()
        ingest.stop()
        store.close()


def test_events_are_sent_every_time_and_do_not_shift_the_refresh(tmp_path):
    broker = MemoryBroker()
    link = make_link(broker, tmp_path, metrics_full_every=2)
    try:
        gate = {"update_adopted": 1.0, "update_rejected": 0.0}
        first = link.publish_metrics({}, events=gate)  # a gate decision before any round report
        again = link.publish_metrics({}, events=gate)  # the next bundle's decision, same values: still sent
        assert names(first) == names(again) == set(gate)
        r1 = link.publish_metrics({"holdout_acc": 0.5}, events={"update_adopted": 1.0})  # report 1: full
        r2 = link.publish_metrics({"holdout_acc": 0.5}, events={"update_adopted": 1.0})  # report 2: changes only
        r3 = link.publish_metrics({"holdout_acc": 0.5})  # report 3: full again (events did not count as reports)
        assert names(r1) == {"holdout_acc", "update_adopted"} and names(r2) == {"update_adopted"}
        assert names(r3) == {"holdout_acc"}
        assert "update_adopted" not in link.metrics_sent  # events never suppress a later reading of that name
    finally:
        link.stop()


def test_a_cloud_that_lost_its_store_has_every_metric_again_within_n_reports(tmp_path):
    broker = MemoryBroker()
    store = PatchStore(tmp_path / "store.db")
    ingest = make_ingest(broker, store)
    link = make_link(broker, tmp_path, metrics_full_every=4)
    report = {"holdout_acc": 0.5, "holdout_acc_base": 0.25, "steps": 20.0}
    try:
        link.publish_metrics(report)
        assert link.wait_drained(5)
        wait_until(lambda: stored(store, "holdout_acc") == [0.5], 5, "the first report")
        ingest.stop()
        store.close()
        store = PatchStore(tmp_path / "fresh.db")  # the cloud comes back with nothing
        ingest = make_ingest(broker, store)
        out = [link.publish_metrics(report) for _ in range(3)]  # reports 2..4: unchanged, nothing sent
        assert out == [None, None, None]
        assert names(link.publish_metrics(report)) == set(report)  # report 5: the periodic full refresh
        assert link.wait_drained(5)
        wait_until(lambda: all(stored(store, n) == [v] for n, v in report.items()), 5, "the refresh to be stored")
    finally:
        link.stop()
        ingest.stop()
        store.close()


def test_a_restarted_device_reports_in_full_first(tmp_path):
    broker = MemoryBroker()
    report = {"holdout_acc": 0.5, "steps": 20.0}
    link = make_link(broker, tmp_path)
    assert names(link.publish_metrics(report)) == set(report)
    assert link.publish_metrics(report) is None
    link.stop()
    link.outbox.close()
    link = make_link(broker, tmp_path)  # same outbox file, new process: it cannot know what the cloud has
    try:
        assert names(link.publish_metrics(report)) == set(report)
    finally:
        link.stop()


def test_every_report_in_full_when_the_refresh_is_zero_and_a_refused_report_changes_nothing(tmp_path):
    broker = MemoryBroker()
    link = make_link(broker, tmp_path, metrics_full_every=0)
    try:
        assert all(names(link.publish_metrics({"steps": 20.0})) == {"steps"} for _ in range(3))
        with pytest.raises(MessageError):
            link.publish_metrics({"steps": float("nan")})
        assert link.metrics_sent == {"steps": 20.0}
    finally:
        link.stop()
    with pytest.raises(ValueError, match="metrics_full_every"):
        LinkSettings(fleet=FLEET, device_id=DEVICE, metrics_full_every=-1)
