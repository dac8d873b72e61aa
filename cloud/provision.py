"""Fleet provisioning: a locked-down Mosquitto configuration plus one credential folder per device.

`provision(ProvisionOptions(...))` writes, under `out`:

    broker/mosquitto.conf        two TLS listeners (per_listener_settings): devices on `port`, the companion on
                                 `companion_port`; `allow_anonymous false` on both; bounded resources
    broker/ca.crt server.crt server.key        the broker's TLS identity (key mode 0600)
    broker/devices-dynsec.json   device logins and ACLs for Mosquitto's dynamic-security plugin (0600)
    broker/companion.passwd companion.acl      the companion's login (`mosquitto_passwd` format) and ACL
    ca/ca.key                    the fleet CA's private key (0600): needed only to re-issue the server cert
    ca/admin-password            the dynamic-security admin's password (0600), for live revocation
    companion/                   username, password (0600), ca.crt, fleet-signing.key (Ed25519, 0600),
                                 fleet-signing.pub, broker.url
    devices/<id>/                username, password (0600), ca.crt, fleet-signing.pub, broker.url
    provision.json               fleet, hosts, ports and the device list (no secrets)

Why these choices (each checked against Mosquitto 2.0.11 in tests/test_security.py):
- Devices sit behind the dynamic-security plugin, not an `acl_file`: Mosquitto's ACL file never checks
  subscriptions (only delivery), so a device could join the companion's shared subscription and, while
  receiving nothing itself, make every second patch vanish. The plugin refuses the subscription. It does
  not expand %u in 2.0.11, so every device gets its own role with literal topics.
- The device listener sets `use_username_as_clientid true`: a device's client id IS its device id, so it
  can never connect under the companion's (or another device's) client id and knock that client off.
  The companion runs several clients (publisher, ingest, Canoe, federated server) under one login, so
  its listener leaves client ids free; only the companion's login exists there.

Re-running is idempotent: the CA, the server certificate, the signing key and existing device passwords
are kept; new device ids are added. `rotate()` gives one device a new password; `revoke()` removes it;
both rewrite the plugin's JSON, which Mosquitto reads at start: restart it, or make the same change live
with `mosquitto_ctrl` as the admin (docs/security.md).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgepatch.protocol.mqtt import MqttConfigError, MqttSettings
from edgepatch.protocol.topics import PREFIX, check_name

from .provision_keys import (
    dynsec_password,
    fleet_ca,
    mosquitto_password_hash,
    server_cert,
    signing_key,
    write_file,
)

COMPANION_USER = "companion"
ADMIN_USER = "edgepatch-admin"
RESERVED_PREFIXES = ("edgepatch-", "fl-server", COMPANION_USER)  # the companion's client ids start so
# Spelled out (see protocol/topics.py) so that a new channel is denied until someone decides who writes it.
DEVICE_WRITE_CHANNELS = ("state", "lwt", "patch", "metrics", "canoe/meta", "canoe/request", "canoe/offer",
                         "fl/join", "fl/update")
DEVICE_READ_CHANNELS = ("canoe/task", "canoe/reply", "ack")  # written only by the companion (relayed)
FLEET_READ_LEVELS = ("bundle", "fl/round")  # fleet-wide topics every device reads, only the companion writes
DYNSEC_PLUGIN_PATHS = ("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
                       "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
                       "/usr/lib/mosquitto_dynamic_security.so", "/usr/local/lib/mosquitto_dynamic_security.so")


class ProvisionError(ValueError):
    """Provisioning input that cannot produce a safe configuration."""


def find_dynsec_plugin() -> str:
    for path in DYNSEC_PLUGIN_PATHS:
        if os.path.exists(path):
            return path
    raise ProvisionError("Mosquitto's dynamic-security plugin (mosquitto_dynamic_security.so) was not found "
                         f"in {', '.join(DYNSEC_PLUGIN_PATHS)}: install mosquitto >= 2.0 or pass its path")


@dataclass
class ProvisionOptions:
    fleet: str
    devices: list[str]
    out: Path
    hosts: list[str] = field(default_factory=lambda: ["localhost", "127.0.0.1"])  # in the server cert
    bind: str = ""  # listener address ("" = all interfaces)
    port: int = 8883  # device listener
    companion_port: int = 8884  # companion listener
    broker_user: str = "mosquitto"  # the user Mosquitto drops to when started as root
    max_message_bytes: int = 4 * 1024 * 1024  # bundles travel by reference; slices and FL blobs are small
    max_queued_messages: int = 1000  # per client, while it is offline or slow
    autosave_s: int = 300
    session_expiry: str = "14d"  # forget sessions of devices gone this long
    dynsec_plugin: str = ""  # default: found in the usual library folders

    def check(self) -> None:
        check_name(self.fleet, "fleet")
        for device in self.devices:
            check_name(device, "device id")
            if device.startswith(RESERVED_PREFIXES):
                raise ProvisionError(f"device id {device!r} is reserved: ids starting with "
                                     f"{', '.join(RESERVED_PREFIXES)} belong to the companion's clients")
        if len(set(self.devices)) != len(self.devices):
            raise ProvisionError("device ids repeat")
        for what, port in (("port", self.port), ("companion port", self.companion_port)):
            if not 0 < port < 65536:
                raise ProvisionError(f"{what} {port} is out of range 1-65535")
        if self.port == self.companion_port:
            raise ProvisionError("the device and companion listeners need different ports")
        if not self.hosts:
            raise ProvisionError("give at least one host name or address for the server certificate")
        if self.max_message_bytes < 1024:
            raise ProvisionError("max_message_bytes below 1024 would refuse ordinary messages")


@dataclass
class ProvisionResult:
    out: Path
    fleet: str
    devices: list[str]
    added: list[str]
    config: Path


# -- broker files --------------------------------------------------------------------------------------

def device_role(fleet: str, device: str) -> dict[str, Any]:
    """One device's role: publish on its own topics, subscribe to and receive its relayed channels and the
    fleet-wide announcements. Everything else falls to the default: denied."""
    check_name(fleet, "fleet")
    check_name(device, "device id")
    own = f"{PREFIX}/{fleet}/{device}"
    acls: list[dict[str, Any]] = [{"acltype": "publishClientSend", "topic": f"{own}/{ch}", "allow": True}
                                  for ch in DEVICE_WRITE_CHANNELS]
    reads = [f"{own}/{ch}" for ch in DEVICE_READ_CHANNELS] + [f"{PREFIX}/{fleet}/{lv}" for lv in FLEET_READ_LEVELS]
    for topic in reads:
        acls += [{"acltype": "subscribeLiteral", "topic": topic, "allow": True},
                 {"acltype": "publishClientReceive", "topic": topic, "allow": True}]
    return {"rolename": f"device-{device}", "acls": acls}


def _admin_role() -> dict[str, Any]:
    control = "$CONTROL/dynamic-security/#"
    return {"rolename": "admin", "acls": [
        {"acltype": t, "topic": control, "allow": True}
        for t in ("publishClientSend", "publishClientReceive", "subscribePattern", "unsubscribePattern")]}


def device_security_json(fleet: str, logins: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The dynamic-security plugin's file: `logins` maps username -> password fields (dynsec_password)."""
    clients, roles = [], [_admin_role()]
    for user, fields in sorted(logins.items()):
        if user == ADMIN_USER:
            clients.append({"username": user, **fields, "roles": [{"rolename": "admin"}]})
            continue
        clients.append({"username": user, "textName": f"edgepatch device {user}", **fields,
                        "roles": [{"rolename": f"device-{user}"}]})
        roles.append(device_role(fleet, user))
    return {"clients": clients, "groups": [], "roles": roles,
            "defaultACLAccess": {"publishClientSend": False, "publishClientReceive": False, "subscribe": False,
                                 "unsubscribe": True}}


def companion_acl(fleet: str) -> str:
    check_name(fleet, "fleet")
    return (f"# edgepatch companion ACL: the companion reads and writes all of fleet {fleet}\n"
            f"user {COMPANION_USER}\ntopic readwrite {PREFIX}/{fleet}/#\n")


def mosquitto_conf(opts: ProvisionOptions) -> str:
    b = (opts.out / "broker").resolve()
    bind = f" {opts.bind}" if opts.bind else ""
    tls = [f"cafile {b}/ca.crt", f"certfile {b}/server.crt", f"keyfile {b}/server.key", "tls_version tlsv1.2"]
    lines = [f"# Mosquitto 2 configuration for edgepatch fleet {opts.fleet!r}, written by `edgepatch cloud provision`.",
             f"# Start: mosquitto -c {b}/mosquitto.conf",
             "per_listener_settings true", f"user {opts.broker_user}",
             "persistence true", f"persistence_location {b}/data/", f"autosave_interval {opts.autosave_s}",
             f"persistent_client_expiration {opts.session_expiry}",
             f"max_packet_size {opts.max_message_bytes + 65536}",
             f"max_queued_messages {opts.max_queued_messages}", "max_queued_bytes 67108864",
             "max_inflight_messages 20", "max_keepalive 300", "set_tcp_nodelay true",
             f"log_dest file {b}/mosquitto.log", "log_type error", "log_type warning", "log_type notice",
             "log_type information", "connection_messages true", "",
             "# --- devices: dynamic-security plugin (per-device roles), client id forced to the username",
             f"listener {opts.port}{bind}", "protocol mqtt", *tls, "allow_anonymous false",
             f"plugin {opts.dynsec_plugin or find_dynsec_plugin()}",
             f"plugin_opt_config_file {b}/devices-dynsec.json",
             "use_username_as_clientid true", f"max_connections {len(opts.devices) + 16}", "",
             "# --- companion: its own login only; client ids free (it runs several clients)",
             f"listener {opts.companion_port}{bind}", "protocol mqtt", *tls, "allow_anonymous false",
             f"password_file {b}/companion.passwd", f"acl_file {b}/companion.acl", "max_connections 32", ""]
    return "\n".join(lines)


# -- provisioning ----------------------------------------------------------------------------------------

def _read_logins(path: Path) -> dict[str, dict[str, Any]]:
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return {c["username"]: {k: c[k] for k in ("password", "salt", "iterations")} for c in data.get("clients", [])}


def _issue_login(folder: Path, user: str, ca_pem: bytes, pub: bytes, url: str) -> str:
    """Write a credential folder; returns the new password (hashed by the caller)."""
    password = secrets.token_urlsafe(32)
    write_file(folder / "username", user + "\n")
    write_file(folder / "password", password + "\n", 0o600)
    write_file(folder / "ca.crt", ca_pem)
    write_file(folder / "fleet-signing.pub", pub)
    write_file(folder / "broker.url", url + "\n")
    return password


def _url(opts: ProvisionOptions, port: int) -> str:
    return f"mqtts://{opts.hosts[0]}:{port}"


def _save_meta(opts: ProvisionOptions) -> None:
    meta = {k: v for k, v in asdict(opts).items() if k != "out"}
    write_file(opts.out / "provision.json", json.dumps(meta, indent=2) + "\n")


def _write_device_security(opts: ProvisionOptions, logins: dict[str, dict[str, Any]]) -> None:
    write_file(opts.out / "broker" / "devices-dynsec.json",
               json.dumps(device_security_json(opts.fleet, logins), indent=1) + "\n", 0o600)


def provision(opts: ProvisionOptions) -> ProvisionResult:
    opts.check()
    out = opts.out
    if (out / "provision.json").exists():
        old = _load(out)
        if old.fleet != opts.fleet:
            raise ProvisionError(f"{out} holds fleet {old.fleet!r}, not {opts.fleet!r}: use another --out per fleet")
        opts.devices = sorted(set(old.devices) | set(opts.devices))
    ca_key, ca_cert = fleet_ca(out, opts.fleet)
    server_cert(out, opts.hosts, ca_key, ca_cert)
    shutil.copyfile(out / "ca" / "ca.crt", out / "broker" / "ca.crt")
    ca_pem = (out / "ca" / "ca.crt").read_bytes()
    pub = signing_key(out)

    logins = _read_logins(out / "broker" / "devices-dynsec.json")
    if ADMIN_USER not in logins or not (out / "ca" / "admin-password").exists():
        admin_password = secrets.token_urlsafe(32)
        write_file(out / "ca" / "admin-password", admin_password + "\n", 0o600)
        logins[ADMIN_USER] = dynsec_password(admin_password)
    added = []
    for device in opts.devices:
        folder = out / "devices" / device
        if device not in logins or not (folder / "password").exists():
            logins[device] = dynsec_password(_issue_login(folder, device, ca_pem, pub, _url(opts, opts.port)))
            added.append(device)
        else:  # keep the password; refresh the public files (a new CA or host list)
            write_file(folder / "ca.crt", ca_pem)
            write_file(folder / "fleet-signing.pub", pub)
            write_file(folder / "broker.url", _url(opts, opts.port) + "\n")
    _write_device_security(opts, logins)
    if not (out / "broker" / "companion.passwd").exists() or not (out / "companion" / "password").exists():
        password = _issue_login(out / "companion", COMPANION_USER, ca_pem, pub, _url(opts, opts.companion_port))
        write_file(out / "broker" / "companion.passwd",
                   f"{COMPANION_USER}:{mosquitto_password_hash(password)}\n", 0o600)
    write_file(out / "broker" / "companion.acl", companion_acl(opts.fleet))
    (out / "broker" / "data").mkdir(parents=True, exist_ok=True)
    config = out / "broker" / "mosquitto.conf"
    write_file(config, mosquitto_conf(opts))
    _save_meta(opts)
    return ProvisionResult(out, opts.fleet, list(opts.devices), added, config)


def _load(out: Path) -> ProvisionOptions:
    meta_path = out / "provision.json"
    if not meta_path.exists():
        raise ProvisionError(f"{out} is not a provisioned fleet directory (no provision.json)")
    return ProvisionOptions(out=out, **json.loads(meta_path.read_text()))


def rotate(out: Path, device: str) -> None:
    """New password for one device (the old one stops working when Mosquitto restarts with the new file)."""
    opts = _load(out)
    if device not in opts.devices:
        raise ProvisionError(f"device {device!r} is not provisioned in {out}")
    logins = _read_logins(out / "broker" / "devices-dynsec.json")
    logins[device] = dynsec_password(_issue_login(out / "devices" / device, device, (out / "ca" / "ca.crt").read_bytes(),
                                                  (out / "companion" / "fleet-signing.pub").read_bytes(),
                                                  _url(opts, opts.port)))
    _write_device_security(opts, logins)


def revoke(out: Path, device: str) -> None:
    """Remove one device: its login and role, its credential folder and its entry in provision.json."""
    opts = _load(out)
    if device not in opts.devices:
        raise ProvisionError(f"device {device!r} is not provisioned in {out}")
    logins = _read_logins(out / "broker" / "devices-dynsec.json")
    logins.pop(device, None)
    opts.devices = [d for d in opts.devices if d != device]
    _write_device_security(opts, logins)
    shutil.rmtree(out / "devices" / device, ignore_errors=True)
    write_file(out / "broker" / "mosquitto.conf", mosquitto_conf(opts))
    _save_meta(opts)


def companion_mqtt_settings(folder: Path, broker: str | None, version: str = "5") -> MqttSettings:
    """The companion's connection from its credential folder: TLS with the fleet CA, its login (the password
    is read from the file now, never from a command line), `broker` or the folder's broker.url."""
    try:
        return MqttSettings.from_credentials(folder, "edgepatch-companion", broker, version=version)
    except MqttConfigError as exc:
        raise ProvisionError(str(exc).replace("a credential folder", "a companion credential folder")) from None
