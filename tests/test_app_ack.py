"""Issue 12, item 1: a device counts a patch delivered only when the companion says it is stored.

Twin (fast unit tests on `MemoryBroker`, whose `stop(forget_shared=True)` drops `$share/` subscriptions and
what was queued for them, as Mosquitto 2 does on a restart) and real parts (Mosquitto, the ingest as its own
process, killed with SIGKILL; edgepatch.sim.fault_runs, which benchmarks/faults.py also runs).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from edgepatch.cloud.ingest import IngestService, IngestSettings
from edgepatch.cloud.store import PatchStore
from edgepatch.device.link import DeviceLink, LinkSettings
from edgepatch.device.outbox import Outbox
from edgepatch.protocol.messages import AckEntry, PatchAck, PatchUpdate, encode, make_message
from edgepatch.protocol.mqtt import MqttSettings, make_client
from edgepatch.protocol.mqtt_memory import MemoryBroker
from edgepatch.protocol.topics import Channel, device_topic
from edgepatch.sim.fault_runs import FAULTS, PG_FAULTS, POISONS, run_fault, run_poison

FLEET = "lab"


def patch(i: int, k: int = 8) -> PatchUpdate:
    return PatchUpdate(phi=np.full(k, i, np.float32), steps=i, samples=4, holdout_acc=0.5, loss=0.1)


def make_link(broker: MemoryBroker, tmp_path: Path, device_id: str = "dev-1", **kw) -> DeviceLink:
    settings = LinkSettings(fleet=FLEET, device_id=device_id, ack_timeout_s=0.2, ack_max_backoff_s=0.8, **kw)
    link = DeviceLink(settings, Outbox(tmp_path / f"{device_id}.sqlite"), base_version="b1", variant_id="v50",
                      client=make_client(settings.mqtt(), broker))
    return link


def make_ingest(broker: MemoryBroker, store: PatchStore, **kw) -> IngestService:
    settings = IngestSettings(fleet=FLEET, client_id="ingest-twin", reconnect_min_delay=0.05, **kw)
    service = IngestService(store, settings, client=make_client(settings.mqtt(), broker))
    service.start()
    assert service.wait_subscribed(2)
    return service


def run_restart(tmp_path: Path, app_ack: bool) -> tuple[list[str], set[str], list[str]]:
    """Send 5 patches, restart the broker forgetting shared subscriptions while the ingest is away, send 5
    more before it is back. Returns (sent hashes, hashes the device counts delivered, stored hashes)."""
    broker = MemoryBroker()
    store = PatchStore(tmp_path / "store.db")
    ingest = make_ingest(broker, store)
    link = make_link(broker, tmp_path, app_ack=app_ack)
    delivered: set[str] = set()
    link.on_delivered.append(lambda h, status: delivered.add(h))
    link.start()
    assert link.wait_connected(2)
    sent = [link.publish_patch(patch(i)).content_hash for i in range(5)]
    done = link.wait_delivered if app_ack else link.wait_drained
    assert done(5)
    ingest.stop()  # the companion is away (restarting) while the broker restarts
    broker.stop(forget_shared=True)
    broker.start()
    assert link.wait_connected(2)
    sent += [link.publish_patch(patch(i)).content_hash for i in range(5, 10)]
    assert link.wait_drained(5)  # the broker took every one of them ...
    assert broker.settle()
    ingest = make_ingest(broker, store)  # ... but nobody was subscribed to its group any more
    done(5)
    broker.settle()
    if not app_ack:
        delivered = set(sent) if not len(link.outbox) else set()  # the broker's PUBACK was the only ack
    stored = store.patch_hashes()
    link.stop()
    ingest.stop()
    store.close()
    return sent, delivered, stored


def test_twin_broker_restart_losing_shared_subscriptions_loses_nothing_acknowledged(tmp_path):
    sent, delivered, stored = run_restart(tmp_path, app_ack=True)
    assert delivered == set(sent), "every patch must be confirmed in the end (resent after the timeout)"
    assert delivered <= set(stored)
    assert len(stored) == len(set(stored)) == 10  # resends never duplicated a stored patch


def test_twin_without_app_acks_the_same_restart_loses_patches_the_device_counted_delivered(tmp_path):
    # The control: the failure the acks fix is real in this scenario, so the test above can fail.
    sent, delivered, stored = run_restart(tmp_path, app_ack=False)
    assert delivered == set(sent)
    assert len(set(sent) - set(stored)) == 5


def test_twin_unacked_patches_survive_a_device_restart_and_are_resent(tmp_path):
    broker = MemoryBroker()
    store = PatchStore(tmp_path / "store.db")
    link = make_link(broker, tmp_path)
    link.start()
    assert link.wait_connected(2)
    sent = [link.publish_patch(patch(i)).content_hash for i in range(3)]
    assert link.wait_drained(2)  # the broker took them; no companion runs yet
    assert link.outbox.awaiting_confirmation() == 3 and all(e.handed for e in link.outbox.pending())
    link.stop()
    link.outbox.close()
    ingest = make_ingest(broker, store)
    link = make_link(broker, tmp_path)  # the device restarts from the same outbox file
    statuses: list[str] = []
    link.on_delivered.append(lambda h, status: statuses.append(status))
    link.start()
    assert link.wait_delivered(5), f"{len(link.outbox)} patches still unconfirmed"
    assert sorted(store.patch_hashes()) == sorted(sent)
    assert statuses.count("stored") == 3 and link.resends >= 3
    link.stop()
    ingest.stop()
    store.close()


def test_twin_rejected_patch_is_dropped_not_resent_forever(tmp_path):
    broker = MemoryBroker()
    store = PatchStore(tmp_path / "store.db")
    ingest = make_ingest(broker, store)
    link = make_link(broker, tmp_path)
    link.start()
    assert link.wait_connected(2)
    # The device sends a φ of the wrong size: the companion's admission refuses it (reason in the ack).
    from edgepatch.cloud.ingest_policy import IngestPolicy

    policy = IngestPolicy(store)
    policy.note_bundle("b1", 8)
    ingest.policy = policy
    link.publish_patch(patch(1, k=5))
    link.publish_patch(patch(2, k=8))
    assert link.wait_delivered(5)
    assert link.ack_status == {"rejected": 1, "stored": 1}
    assert len(store.patch_hashes()) == 1
    link.stop()
    ingest.stop()
    store.close()


def test_forged_or_malformed_acks_are_refused_and_confirm_nothing(tmp_path):
    broker = MemoryBroker()
    link = make_link(broker, tmp_path)
    link.start()
    assert link.wait_connected(2)
    msg = link.publish_patch(patch(1))
    assert link.wait_drained(2)
    other = make_client(MqttSettings(client_id="other"), broker)
    other.connect()
    assert other.wait_connected(2)
    topic = device_topic(FLEET, "dev-1", Channel.ACK)
    other.publish(topic, b'{"not": "an ack"}')
    wrong_fleet = make_message(PatchAck((AckEntry(msg.content_hash, "stored"),)), device_id="cloud", fleet="other")
    other.publish(topic, encode(wrong_fleet))
    assert broker.settle()
    assert len(link.outbox) == 1 and link.rejects["bad_json"] + link.rejects["schema"] >= 1
    assert link.rejects["topic_mismatch"] == 1
    good = make_message(PatchAck((AckEntry(msg.content_hash, "duplicate"),)), device_id="cloud", fleet=FLEET)
    other.publish(topic, encode(good))
    assert broker.settle() and link.wait_delivered(1)
    assert link.ack_status == {"duplicate": 1}
    link.stop()
    other.disconnect()


def test_resend_backoff_grows_and_is_bounded(tmp_path):
    broker = MemoryBroker()  # no companion at all: the device keeps resending, ever more slowly
    link = make_link(broker, tmp_path)
    link.start()
    assert link.wait_connected(2)
    link.publish_patch(patch(1))
    time.sleep(2.5)
    entry = link.outbox.pending()[0]
    # attempts at ~0, 0.2, 0.6, 1.4, 2.2 s (0.2 doubling, capped at 0.8): about 5, never one per tick
    assert 3 <= entry.attempts <= 7, entry.attempts
    assert entry.next_try is not None and entry.next_try - time.time() <= 0.8 + 0.05
    link.stop()


def test_link_settings_refuse_a_bad_ack_timeout():
    with pytest.raises(ValueError, match="ack_timeout_s"):
        LinkSettings(fleet=FLEET, device_id="d", ack_timeout_s=0)
    with pytest.raises(ValueError, match="ack_max_backoff_s"):
        LinkSettings(fleet=FLEET, device_id="d", ack_timeout_s=10, ack_max_backoff_s=5)


def test_old_outbox_file_is_upgraded_and_keeps_its_entries(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript("CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, payload BLOB "
                     "NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL, priority INTEGER NOT NULL, "
                     "enqueued_at REAL NOT NULL, expiry_s INTEGER);"
                     "INSERT INTO outbox (topic, payload, qos, retain, priority, enqueued_at) "
                     "VALUES ('edgepatch/v1/lab/d/patch', x'00', 1, 0, 2, 1.0);")
    db.commit()
    db.close()
    with Outbox(path) as box:
        [entry] = box.pending()
        assert entry.content_hash is None and not entry.handed and box.unsent() == 1


# ------------------------------------------------------------------------ real parts: Mosquitto + ingest process

REAL_RUNS = [(fault, protocol) for fault in FAULTS for protocol in ("5", "3.1.1")]


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.parametrize(("fault", "protocol"), REAL_RUNS, ids=[f"{f}-mqtt{p}" for f, p in REAL_RUNS])
def test_real_fault_mid_stream_loses_no_acknowledged_patch(tmp_path, fault, protocol):
    row = run_fault(fault, protocol, tmp_path, patches=90, outage_s=3.0 if fault != "companion_kill9" else 0.5)
    assert row.sent == 270
    assert row.lost == 0, row
    assert row.acknowledged == row.sent and row.unconfirmed == 0, row  # and everything did get confirmed
    assert row.stored == row.sent and row.duplicates_in_store == 0, row


@pytest.mark.broker
@pytest.mark.slow
def test_real_control_without_app_acks_mqtt5_restart_loses_patches_the_devices_counted_delivered(tmp_path):
    # The bug of issue 12 on the real broker: Mosquitto acknowledged them, then no shared subscription got them.
    row = run_fault("broker_restart", "5", tmp_path, app_ack=False, patches=90, outage_s=3.0)
    assert row.acknowledged == row.sent and row.lost > 0, row


POISON_RUNS = [(k, None) for k in POISONS] + [
    pytest.param(k, "postgresql+psycopg2://postgres@127.0.0.1:5432/test", marks=pytest.mark.postgres)
    for k in ("seq_2e31", "nul_base_version")]


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.parametrize(("kind", "store_url"), POISON_RUNS)
def test_real_poison_mid_stream_never_stalls_it(tmp_path, kind, store_url):
    row = run_poison(kind, tmp_path, patches=40, store_url=store_url)
    assert row.lost == 0 and row.unconfirmed == 0 and row.acknowledged == row.sent == row.stored == 120, row
    assert row.poison_misplaced == 0, row  # 64-bit seq stored; NUL, >64-bit and 1 MiB refused


def test_profile_sets_the_ack_timeout_and_refuses_a_backoff_below_it():
    from edgepatch.device.profile import ProfileError, parse_profile

    base = (Path(__file__).resolve().parents[1] / "firmware_configs" / "linux_x86_64.toml").read_text()
    assert parse_profile(base).mqtt.ack_timeout_s == 30.0  # default when the keys are absent
    text = base.replace("keepalive_s = 30", "keepalive_s = 30\nack_timeout_s = 5\nack_max_backoff_s = 120")
    mqtt = parse_profile(text).mqtt
    assert (mqtt.ack_timeout_s, mqtt.ack_max_backoff_s) == (5.0, 120.0)
    with pytest.raises(ProfileError, match="ack_max_backoff_s"):
        parse_profile(base.replace("keepalive_s = 30", "keepalive_s = 30\nack_timeout_s = 50\nack_max_backoff_s = 5"))
    with pytest.raises(ProfileError, match="ack_timeout_s"):
        parse_profile(base.replace("keepalive_s = 30", "keepalive_s = 30\nack_timeout_s = 0"))


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.parametrize("fault", PG_FAULTS)
def test_real_postgresql_restart_or_kill9_mid_ingest_loses_nothing(tmp_path, fault):
    # A private cluster (initdb on a free port), so restarting it disturbs no other test's database.
    row = run_fault(fault, "5", tmp_path, patches=40, outage_s=2.0)
    assert row.store == "postgresql"
    assert row.lost == 0 and row.unconfirmed == 0 and row.acknowledged == row.stored == row.sent == 120, row
    assert row.duplicates_in_store == 0, row
