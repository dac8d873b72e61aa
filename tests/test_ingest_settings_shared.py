"""Which filters an ingest worker subscribes: `$share/<group>/…` with MQTT 5 by default, and with 3.1.1 when
`shared=True` (Mosquitto honours shared subscriptions for 3.1.1 clients; fleet_load runs 3.1.1 workers so)."""

from __future__ import annotations

from edgepatch.cloud.ingest_settings import INGEST_CHANNELS, IngestSettings


def test_v5_shares_by_default_and_v311_subscribes_plainly() -> None:
    v5 = IngestSettings(protocol="5", group="g", fleet="lab").topic_filters()
    v3 = IngestSettings(protocol="3.1.1", group="g", fleet="lab").topic_filters()
    assert len(v5) == len(v3) == len(INGEST_CHANNELS)
    assert all(f.startswith("$share/g/edgepatch/v1/lab/+/") for f in v5)
    assert v3 == [f.removeprefix("$share/g/") for f in v5]


def test_v311_shares_when_asked_and_v5_can_opt_out() -> None:
    v5 = IngestSettings(protocol="5", group="g", fleet="lab").topic_filters()
    assert IngestSettings(protocol="3.1.1", group="g", fleet="lab", shared=True).topic_filters() == v5
    assert not any(f.startswith("$share/") for f in
                   IngestSettings(protocol="5", group="g", fleet="lab", shared=False).topic_filters())
