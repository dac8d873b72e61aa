"""protocol/signing.py: Ed25519-signed announcements, rollback protection, reference checks."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgepatch.protocol.signing import BundleSigner, BundleVerifier, SequenceFile, SignatureError


def write_key(folder: Path, name: str) -> tuple[Path, Path]:
    key = Ed25519PrivateKey.generate()
    private, public = folder / f"{name}.key", folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    os.chmod(private, 0o600)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    fleet_key, fleet_pub = write_key(tmp_path, "fleet")
    other_key, other_pub = write_key(tmp_path, "other")
    return {"key": fleet_key, "pub": fleet_pub, "other_key": other_key, "other_pub": other_pub}


def announcement(reference: str = "http://cloud.example:8080/bundles/abc/") -> dict[str, Any]:
    return {"version": "abc", "reference": reference, "manifest_sha256": "ab" * 32, "size": 1234,
            "artifacts": {"infer.tflite": "cd" * 32, "params.npz": "ef" * 32}}


def signed(key: Path, seq: int, fleet: str = "lab", **changes: Any) -> dict[str, Any]:
    ann = announcement()
    ann["sequence"] = seq
    ann["signature"] = BundleSigner.from_file(key).sign(fleet, seq, ann)
    ann.update(changes)
    return ann


def test_a_signed_newer_announcement_verifies(keys: dict[str, Path]) -> None:
    verifier = BundleVerifier.from_file(keys["pub"])
    assert verifier.verify("lab", signed(keys["key"], 5), active_sequence=4) == 5


@pytest.mark.parametrize("case, reason", [
    ("other_key", "bad_signature"), ("unsigned", "unsigned"), ("replayed", "replayed"),
    ("same_sequence", "replayed"), ("other_fleet", "bad_signature"), ("changed_reference", "bad_signature"),
    ("changed_artifact", "bad_signature"), ("bumped_sequence", "bad_signature"), ("garbage", "bad_signature"),
])
def test_untrusted_announcements_are_refused_with_a_reason(keys: dict[str, Path], case: str, reason: str) -> None:
    verifier = BundleVerifier.from_file(keys["pub"])
    ann = {
        "other_key": lambda: signed(keys["other_key"], 9),
        "unsigned": lambda: {**announcement(), "sequence": 9},
        "replayed": lambda: signed(keys["key"], 3),
        "same_sequence": lambda: signed(keys["key"], 5),
        "other_fleet": lambda: signed(keys["key"], 9, fleet="other"),
        "changed_reference": lambda: signed(keys["key"], 9, reference="http://evil.example/b/"),
        "changed_artifact": lambda: signed(keys["key"], 9, artifacts={"infer.tflite": "00" * 32}),
        "bumped_sequence": lambda: signed(keys["key"], 3, sequence=99),  # old signature, new number
        "garbage": lambda: signed(keys["key"], 9, signature="ed25519:" + verifier.key_id + ":!!"),
    }[case]()
    with pytest.raises(SignatureError) as info:
        verifier.verify("lab", ann, active_sequence=5)
    assert info.value.reason == reason
    assert str(info.value).startswith(reason)


@pytest.mark.parametrize("reference", ["file:///tmp/evil/", "/tmp/evil", "ftp://host/b/", "http:///nohost"])
def test_non_http_references_are_refused_even_when_validly_signed(keys: dict[str, Path], reference: str) -> None:
    signer = BundleSigner.from_file(keys["key"])
    with pytest.raises(SignatureError, match="bad_reference"):  # the signer refuses to sign it ...
        signer.sign("lab", 1, announcement(reference))
    # ... and a device refuses it even if someone signed it with the fleet key by other means
    ann = {**announcement(reference), "sequence": 7}
    import base64

    from edgepatch.protocol.signing import signed_bytes
    raw = signer._key.sign(signed_bytes("lab", 7, ann))
    ann["signature"] = f"ed25519:{signer.key_id}:{base64.b64encode(raw).decode()}"
    with pytest.raises(SignatureError) as info:
        BundleVerifier.from_file(keys["pub"]).verify("lab", ann, active_sequence=0)
    assert info.value.reason == "bad_reference"


def test_bad_keys_are_refused_clearly(tmp_path: Path, keys: dict[str, Path]) -> None:
    os.chmod(keys["key"], 0o644)
    with pytest.raises(SignatureError, match="readable by other users"):
        BundleSigner.from_file(keys["key"])
    (tmp_path / "junk.pub").write_text("not a key")
    with pytest.raises(SignatureError, match="not a PEM public key"):
        BundleVerifier.from_file(tmp_path / "junk.pub")
    with pytest.raises(SignatureError, match="cannot read"):
        BundleVerifier.from_file(tmp_path / "missing.pub")


def test_sequence_file_is_strictly_increasing_and_survives_restarts(tmp_path: Path) -> None:
    seq = SequenceFile(tmp_path / "seq")
    assert seq.read() == 0
    first = seq.next()
    second = SequenceFile(tmp_path / "seq").next()
    assert second > first >= 1
    seq.accept(second + 1000)
    assert SequenceFile(tmp_path / "seq").read() == second + 1000
    (tmp_path / "seq").write_text("twelve")
    with pytest.raises(ValueError, match="does not hold a sequence number"):
        seq.read()


# -- a real device refuses untrusted announcements before fetching, and keeps its bundle ---------------------

@pytest.mark.slow
def test_device_installs_only_signed_newer_http_bundles(digits_bundle: Path, shifted_digits_devices: dict,
                                                        tmp_path: Path, keys: dict[str, Path]) -> None:
    import dataclasses
    import importlib.util

    helpers = importlib.util.spec_from_file_location("_fetch_tests", Path(__file__).with_name("test_device_fetch.py"))
    assert helpers is not None and helpers.loader is not None
    fetch_tests = importlib.util.module_from_spec(helpers)
    helpers.loader.exec_module(fetch_tests)
    _sibling_bundle = fetch_tests._sibling_bundle  # a second valid bundle: new patch parameters

    from edgepatch.cloud.store import PatchStore, sqlite_url
    from edgepatch.cloud.web import FleetWeb
    from edgepatch.device.profile import load_profile
    from edgepatch.device.runtime import DeviceConfig, DeviceRuntime
    from edgepatch.protocol.bundle import load_bundle
    from edgepatch.protocol.messages import BundleAnnouncement

    _sibling_bundle(digits_bundle, tmp_path / "next")
    store = PatchStore(sqlite_url(tmp_path / "s.sqlite"))
    web = FleetWeb(store)
    web.start()
    device = None
    try:
        def announce(path: Path, name: str, seq: int, key: Path | None, reference: str | None = None
                     ) -> BundleAnnouncement:
            with load_bundle(path) as b:
                arts = {e.path: e.sha256 for e in b.manifest.artifacts.values()}
                ann = BundleAnnouncement(version=b.version[:16], reference=reference or web.serve_bundle(name, path),
                                         manifest_sha256=b.version, size=10**8, artifacts=arts)
            if key is None:
                return ann
            ann = dataclasses.replace(ann, sequence=seq)
            if reference is not None and not reference.startswith("http"):  # forge: the signer refuses to
                import base64

                from edgepatch.protocol.signing import signed_bytes
                signer = BundleSigner.from_file(key)
                raw = signer._key.sign(signed_bytes("lab", seq, ann.to_json()))
                return dataclasses.replace(ann, signature=f"ed25519:{signer.key_id}:{base64.b64encode(raw).decode()}")
            return dataclasses.replace(ann, signature=BundleSigner.from_file(key).sign("lab", seq, ann.to_json()))

        cfg = DeviceConfig(device_id="dev-s", profile=load_profile("linux_x86_64"), state_dir=tmp_path / "state",
                           data_dir=next(iter(shifted_digits_devices.values())), fleet="lab", fleet_key=keys["pub"])
        device = DeviceRuntime(cfg, digits_bundle)
        first = device.bundle.version
        refused = [announce(tmp_path / "next", "n1", 10, keys["other_key"]),  # another key
                   announce(tmp_path / "next", "n2", 10, None),  # unsigned
                   announce(tmp_path / "next", "n3", 10, keys["key"], reference=(tmp_path / "next").as_uri())]
        for ann in refused:
            assert device.apply_announcement(ann) is False
            assert device.bundle.version == first
        assert device.bytes_downloaded == 0  # nothing was fetched for any of them
        assert device.refused == {"bad_signature": 1, "unsigned": 1, "bad_reference": 1}

        assert device.apply_announcement(announce(tmp_path / "next", "n4", 10, keys["key"])) is True
        second = device.bundle.version
        assert second != first and device.bytes_downloaded > 0
        # replaying the (validly signed) announcement of the first bundle, sequence 5: refused
        assert device.apply_announcement(announce(digits_bundle, "old", 5, keys["key"])) is False
        assert device.bundle.version == second and device.refused["replayed"] == 1
        # the accepted sequence survives a restart of the device
        device.stop()
        device = DeviceRuntime(cfg)
        assert device.apply_announcement(announce(digits_bundle, "old2", 9, keys["key"])) is False
        assert device.bundle.version == second and device.refused["replayed"] == 1
    finally:
        if device is not None:
            device.stop()
        web.stop()
        store.close()
