"""The companion admits only what fits (issue 11 item 4, issue 12 item 3), with a real Mosquitto and a real
exported bundle: provisioned devices only (patches and Canoe histograms), patches only for a registered base
version with its φ size, payloads over the limit refused before decoding and counted."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgepatch.cloud.companion import Companion, CompanionConfig, CompanionError
from edgepatch.cloud.provision import ProvisionOptions, _save_meta
from edgepatch.protocol.canoe import CanoeMeta
from edgepatch.protocol.messages import Message, PatchUpdate, make_message
from edgepatch.protocol.topics import Channel, device_topic

sys.path.insert(0, str(Path(__file__).parent))  # --import-mode=importlib: tests/ is not on the path
from polling import wait_until  # noqa: E402
from test_cloud_ingest import Publisher  # noqa: E402

pytestmark = pytest.mark.broker
FLEET = "shop"
PUBLIC = "http://fleet.example.com:9999"


def provision_dir(root: Path, devices: list[str]) -> Path:
    _save_meta(ProvisionOptions(fleet=FLEET, devices=devices, out=root))  # the file `cloud provision` writes
    return root


@pytest.fixture
def companion(mosquitto: Any, digits_bundle: Path, tmp_path: Path) -> Iterator[Companion]:
    fleet_dir = provision_dir(tmp_path / "fleet", ["dev-000", "dev-001"])
    comp = Companion(CompanionConfig(bundle=digits_bundle, work_dir=tmp_path / "cloud", broker_host=mosquitto.host,
                                     broker_port=mosquitto.port, fleet=FLEET, provisioned=fleet_dir,
                                     public_url=PUBLIC, canoe=True, canoe_timeout_s=1.0, max_message_bytes=8192))
    assert comp.policy.devices is not None
    comp.policy.devices.check_every_s = 0.2  # revocation test below: re-read provision.json quickly
    comp.start()
    try:
        yield comp
    finally:
        comp.stop()


def patch(comp: Companion, device: str, seq: int, *, k: int | None = None, base: str | None = None) -> Message:
    assert comp.current is not None
    size = comp.current.patch_spec.k if k is None else k
    return make_message(PatchUpdate(phi=np.full(size, 0.01, np.float32), steps=1, samples=8, holdout_acc=0.5,
                                    loss=0.5), device_id=device, fleet=FLEET,
                        base_version=comp.current.base_version if base is None else base, variant_id="v100", seq=seq)


@pytest.mark.slow
def test_only_provisioned_devices_and_fitting_patches_are_admitted(companion: Companion, mosquitto: Any,
                                                                  tmp_path: Path) -> None:
    comp = companion
    assert comp.current is not None
    k = comp.current.patch_spec.k
    assert comp.store.bundle_bases()[comp.current.base_version] == k  # registered before it was announced
    assert comp.store.latest_bundle()["reference"].startswith(PUBLIC + "/bundles/")  # what devices are told
    pub = Publisher(mosquitto, client_id="pub-admission")
    good = patch(comp, "dev-000", 1)
    try:
        infos = [pub.send(good), pub.send(patch(comp, "dev-999", 1)),  # not provisioned
                 pub.send(patch(comp, "dev-001", 2, k=k + 3)),  # wrong φ size for the bundle it claims
                 pub.send(patch(comp, "dev-001", 3, base="not-a-base")),  # no bundle has this base
                 pub.publish(device_topic(FLEET, "dev-001", Channel.PATCH), b"x" * 9000),  # over the 8192 limit
                 pub.publish(device_topic(FLEET, "dev-001", Channel.PATCH), b"x" * 200_000),  # over MQTT 5 max
                 pub.send(make_message(CanoeMeta([5] * 10, [0.9] * 10), device_id="dev-000", fleet=FLEET)),
                 pub.send(make_message(CanoeMeta([10**6] * 10), device_id="dev-999", fleet=FLEET)),
                 pub.send(make_message(CanoeMeta([1] * 11), device_id="dev-001", fleet=FLEET))]  # 11 of 10 classes
        for info in infos:
            info.wait_for_publish(5)
        wait_until(lambda: comp.ingest.stats.accepted + comp.ingest.stats.rejected >= 5, 15, "the patches")
        assert comp.canoe is not None
        wait_until(lambda: comp.canoe.stats["metas_refused"] >= 2 and comp.canoe.metas, 10, "the histograms")
        time.sleep(0.5)  # the 200 kB publish, had the broker delivered it, would have arrived by now
        assert comp.store.patch_hashes() == [good.content_hash]
        assert sorted(r["reason"] for r in comp.store.rejects()) == ["oversize", "unknown_base", "unknown_device",
                                                                      "wrong_size"]
        oversize = [r for r in comp.store.rejects() if r["reason"] == "oversize"]
        assert oversize[0]["payload_size"] == 9000 and len(oversize[0]["payload_prefix"]) == 256
        assert comp.metrics.value("edgepatch_ingest_rejects_total", {"reason": "oversize"}) == 1
        assert set(comp.canoe.metas) == {"dev-000"} and comp.canoe.stats["metas_refused"] == 2

        # Revoked (provision.json rewritten without it): its next patch is refused without a restart.
        provision_dir(tmp_path / "fleet", ["dev-001"])
        time.sleep(0.3)
        pub.send(patch(comp, "dev-000", 9)).wait_for_publish(5)
        wait_until(lambda: comp.ingest.stats.rejected >= 5, 10, "the revoked device's patch")
        assert comp.store.patch_hashes() == [good.content_hash]
    finally:
        pub.close()


@pytest.mark.slow
def test_provisioned_directory_of_another_fleet_is_refused(digits_bundle: Path, tmp_path: Path) -> None:
    fleet_dir = provision_dir(tmp_path / "fleet", ["dev-000"])
    with pytest.raises(CompanionError, match="provisions fleet 'shop', not 'other'"):
        Companion(CompanionConfig(bundle=digits_bundle, work_dir=tmp_path / "c", fleet="other", provisioned=fleet_dir))
    with pytest.raises(CompanionError, match="no provision.json"):
        Companion(CompanionConfig(bundle=digits_bundle, work_dir=tmp_path / "c", fleet=FLEET,
                                  provisioned=tmp_path / "nowhere"))


@pytest.mark.slow
def test_serve_refuses_a_bad_provisioned_dir_or_public_url_in_one_line(digits_bundle: Path, tmp_path: Path) -> None:
    import subprocess

    base = [sys.executable, "-m", "edgepatch.cli", "cloud", "serve", "--bundle", str(digits_bundle), "--fleet", FLEET,
            "--broker", "mqtt://127.0.0.1:1", "--work-dir", str(tmp_path / "c"), "--http-port", "0"]
    for extra, words in ((["--provisioned", str(tmp_path / "nowhere")], "no provision.json"),
                         (["--public-url", "fleet.example.com"], "must start with http")):
        out = subprocess.run([*base, *extra], capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and words in out.stderr, out.stderr[-2000:]
        assert "Traceback" not in out.stderr


def test_ingest_worker_process_admits_only_provisioned_devices_and_registered_bases(mosquitto: Any,
                                                                                    tmp_path: Path) -> None:
    import json
    import signal
    import subprocess

    from edgepatch.cloud.store import PatchStore

    fleet_dir = provision_dir(tmp_path / "fleet", ["dev-000"])
    store = PatchStore(tmp_path / "w.db")
    store.add_bundle("m1", "ab" * 32, "http://x/", base_version="b1", k=8)
    store.close()
    ready, stats = tmp_path / "ready", tmp_path / "stats.json"
    proc = subprocess.Popen([sys.executable, "-m", "edgepatch.cloud.ingest", "--store", str(tmp_path / "w.db"),
                             "--port", str(mosquitto.port), "--fleet", FLEET, "--provisioned", str(fleet_dir),
                             "--check-bundles", "--ready-file", str(ready), "--stats-file", str(stats)],
                            stderr=subprocess.DEVNULL)
    pub = Publisher(mosquitto, client_id="pub-worker")
    try:
        wait_until(lambda: ready.exists() or proc.poll() is not None, 30, "the worker subscribed")

        def msg(device: str, k: int, base: str = "b1") -> Message:
            return make_message(PatchUpdate(phi=np.zeros(k, np.float32), steps=1, samples=1, holdout_acc=0.5,
                                            loss=0.1), device_id=device, fleet=FLEET, base_version=base, seq=1)
        good = msg("dev-000", 8)
        for m in (good, msg("dev-001", 8), msg("dev-000", 9), msg("dev-000", 8, base="b2")):
            pub.send(m).wait_for_publish(5)
        store = PatchStore(tmp_path / "w.db")
        wait_until(lambda: store.count("rejects") >= 3 and store.count("patches") >= 1, 15, "all four handled")
        assert store.patch_hashes() == [good.content_hash]
        assert sorted(r["reason"] for r in store.rejects()) == ["unknown_base", "unknown_device", "wrong_size"]
        store.close()
    finally:
        pub.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert proc.returncode == 0 and json.loads(stats.read_text())["rejected"] == 3
