"""`edgepatch cloud provision` without a broker: files, modes, idempotence, rotation, revocation, the password
hash format Mosquitto reads, and bad input. (tests/test_security.py runs Mosquitto on what it writes.)"""

from __future__ import annotations

import base64
import json
import stat
import subprocess
from pathlib import Path

import pytest

from edgepatch.cloud.provision import ProvisionError, ProvisionOptions, provision, revoke, rotate
from edgepatch.cloud.provision_keys import mosquitto_password_hash
from edgepatch.sim.brokers import find_binary


def test_provision_writes_secrets_private_and_is_idempotent(tmp_path: Path) -> None:
    opts = ProvisionOptions(fleet="f", devices=["a", "b"], out=tmp_path, dynsec_plugin="/x/dynsec.so")
    first = provision(opts)
    assert sorted(first.added) == ["a", "b"]
    for secret in ("companion/fleet-signing.key", "companion/password", "devices/a/password", "ca/ca.key",
                   "broker/server.key", "broker/devices-dynsec.json", "broker/companion.passwd"):
        assert stat.S_IMODE((tmp_path / secret).stat().st_mode) == 0o600, secret
    password_a = (tmp_path / "devices/a/password").read_text()
    key = (tmp_path / "companion/fleet-signing.key").read_bytes()
    again = provision(ProvisionOptions(fleet="f", devices=["c"], out=tmp_path, dynsec_plugin="/x/dynsec.so"))
    assert again.added == ["c"] and again.devices == ["a", "b", "c"]
    assert (tmp_path / "devices/a/password").read_text() == password_a  # kept
    assert (tmp_path / "companion/fleet-signing.key").read_bytes() == key  # kept
    assert (tmp_path / "devices/c/fleet-signing.pub").read_bytes() == (tmp_path / "companion/fleet-signing.pub"
                                                                        ).read_bytes()
    conf = (tmp_path / "broker/mosquitto.conf").read_text()
    for line in ("allow_anonymous false", "use_username_as_clientid true", "per_listener_settings true",
                 "max_queued_messages 1000", "autosave_interval 300"):
        assert line in conf
    assert "allow_anonymous true" not in conf
    rotate(tmp_path, "b")
    assert (tmp_path / "devices/b/password").read_text() != ""
    revoke(tmp_path, "b")
    assert not (tmp_path / "devices/b").exists()
    users = [c["username"] for c in json.loads((tmp_path / "broker/devices-dynsec.json").read_text())["clients"]]
    assert "b" not in users and {"a", "c"} <= set(users)


def test_provision_refuses_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ProvisionError, match="reserved"):
        provision(ProvisionOptions(fleet="f", devices=["edgepatch-companion-f"], out=tmp_path))
    with pytest.raises(ValueError, match="not a valid topic level"):
        provision(ProvisionOptions(fleet="f", devices=["a/b"], out=tmp_path))
    provision(ProvisionOptions(fleet="f", devices=["a"], out=tmp_path, dynsec_plugin="/x/dynsec.so"))
    with pytest.raises(ProvisionError, match="holds fleet 'f'"):
        provision(ProvisionOptions(fleet="g", devices=["a"], out=tmp_path))
    with pytest.raises(ProvisionError, match="not provisioned"):
        revoke(tmp_path, "zz")


def test_password_hash_is_the_one_mosquitto_passwd_writes(tmp_path: Path) -> None:
    tool = find_binary("mosquitto_passwd")
    if tool is None:
        pytest.fail("mosquitto_passwd is missing (it ships with mosquitto)", pytrace=False)
    subprocess.run([tool, "-c", "-b", str(tmp_path / "pw"), "alice", "s3cret"], check=True)
    line = (tmp_path / "pw").read_text().strip()
    salt_b64 = line.split("$")[3]
    assert "alice:" + mosquitto_password_hash("s3cret", base64.b64decode(salt_b64)) == line




def test_provision_command_writes_rotates_revokes_and_refuses_bad_input(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from edgepatch.cloud.cli import app

    runner = CliRunner()
    out = tmp_path / "fleet"
    ok = runner.invoke(app, ["provision", "--out", str(out), "--fleet", "shop", "--devices", "2",
                             "--device", "cam-7", "--host", "broker.example.com"])
    assert ok.exit_code == 0, ok.output
    assert sorted(p.name for p in (out / "devices").iterdir()) == ["cam-7", "dev-000", "dev-001"]
    assert (out / "devices/cam-7/broker.url").read_text().strip() == "mqtts://broker.example.com:8883"
    before = (out / "devices/dev-001/password").read_text()
    assert runner.invoke(app, ["provision", "--out", str(out), "--rotate", "dev-001"]).exit_code == 0
    assert (out / "devices/dev-001/password").read_text() != before
    assert runner.invoke(app, ["provision", "--out", str(out), "--revoke", "cam-7"]).exit_code == 0
    assert not (out / "devices/cam-7").exists()
    bad = runner.invoke(app, ["provision", "--out", str(tmp_path / "x"), "--device", "edgepatch-companion-x"])
    assert bad.exit_code == 2 and "reserved" in bad.output and "Traceback" not in bad.output
    none = runner.invoke(app, ["provision", "--out", str(tmp_path / "y")])
    assert none.exit_code == 2 and "--devices N or --device ID" in " ".join(none.output.split())
