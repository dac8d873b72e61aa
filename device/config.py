"""The device's run configuration file: what `edgepatch device run --config FILE` (and the systemd unit)
reads instead of command-line options.

One TOML file per installed device, e.g. /etc/edgepatch/device.toml:

    device_id = "pi-kitchen-01"
    fleet = "default"
    profile = "raspberry_pi_4"          # a shipped firmware profile, or a path to one
    data_dir = "/var/lib/edgepatch/data"
    state_dir = "/var/lib/edgepatch/state"
    bundle = "/var/lib/edgepatch/initial-bundle"   # installed at the first start only
    rounds = 0                          # 0 = until stopped
    interval_s = 60.0
    fleet_key = "/etc/edgepatch/fleet-signing.pub"   # install only bundles the fleet key signed (docs/security.md)

    [broker]                            # omit the table to train offline
    url = "mqtts://broker.example.internal:8883"
    password_file = "/etc/edgepatch/mqtt-password"

Secrets never sit in this file or on a command line (both end up in `ps`, shell history and backups):
the MQTT password comes from a file (`password_file`, not readable by every user) or from an
environment variable (`password_env`, e.g. set by systemd's EnvironmentFile=). The TLS files are paths.
Relative paths are relative to the configuration file's folder. Validation is strict, like the
firmware profiles: an unknown key or a wrong type is a one-line error naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .profile import MQTT_PROTOCOLS, RUNTIMES, DeviceProfile, ProfileError, TlsSettings, load_profile

_TOP_KEYS = {"device_id", "fleet", "profile", "data_dir", "state_dir", "bundle", "runtime", "rounds", "steps",
             "deadline_s", "interval_s", "await_bundle_s", "adaptive", "log_level", "broker", "fleet_key"}
_BROKER_KEYS = {"url", "protocol", "username", "password_file", "password_env", "ca_file", "cert_file",
                "key_file"}
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class ConfigError(ValueError):
    """A device configuration file that is missing, unreadable or invalid."""


@dataclass(frozen=True)
class BrokerConfig:
    url: str
    protocol: str | None = None  # "5" or "3.1.1"; None = the profile's
    username: str | None = None  # None = the profile's
    password_file: Path | None = None
    password_env: str | None = None  # None = the profile's password_env
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def password(self, profile: DeviceProfile) -> str | None:
        """Read the password now (at start-up), never earlier: it is not kept in the config object."""
        if self.password_file is not None:
            try:
                return self.password_file.read_text(encoding="utf-8").strip("\r\n")
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"broker.password_file {self.password_file}: unreadable: {exc}") from exc
        env = self.password_env or profile.mqtt.password_env
        return os.environ.get(env) if env else None


@dataclass(frozen=True)
class RunConfig:
    source: Path
    device_id: str
    profile: DeviceProfile
    data_dir: Path
    state_dir: Path
    fleet: str = "default"
    bundle: Path | None = None
    runtime: str | None = None
    rounds: int = 0
    steps: int | None = None
    deadline_s: float | None = None
    interval_s: float = 0.0
    await_bundle_s: float = 0.0
    adaptive: bool = True
    log_level: str = "INFO"
    broker: BrokerConfig | None = None
    fleet_key: Path | None = None  # the fleet's bundle-signing public key (`cloud provision`)

    def effective_profile(self) -> DeviceProfile:
        """The firmware profile with this device's broker overrides (user name, TLS files) applied."""
        b = self.broker
        if b is None:
            return self.profile
        mqtt = self.profile.mqtt
        tls = mqtt.tls
        if b.ca_file is not None or b.cert_file is not None:
            # The device's own TLS files replace the profile's as a set: a fleet that logs in with
            # passwords (`cloud provision`) gives only ca_file, and no client certificate is sent.
            tls = TlsSettings(ca_file=str(b.ca_file or (tls.ca_file if tls else "")),
                              cert_file=str(b.cert_file) if b.cert_file else None,
                              key_file=str(b.key_file) if b.key_file else None)
        mqtt = dataclasses.replace(mqtt, username=b.username or mqtt.username,
                                   password_env=b.password_env or mqtt.password_env, tls=tls)
        return dataclasses.replace(self.profile, mqtt=mqtt)


class _Table:
    """Typed reads out of one TOML table; anything left over is an unknown key."""

    def __init__(self, where: str, table: dict[str, Any], allowed: set[str], prefix: str = "") -> None:
        self.where, self.table, self.prefix = where, table, prefix
        for key in sorted(table):
            if key == "password":
                raise self.fail(key, "no secrets in this file: put the password in a file named by "
                                     "broker.password_file or an environment variable named by broker.password_env")
            if key not in allowed:
                raise self.fail(key, f"unknown key (allowed: {', '.join(sorted(allowed))})")

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.where}: {self.prefix}{key}: {problem}")

    def get(self, key: str, kind: type, default: Any = None, required: bool = False) -> Any:
        if key not in self.table:
            if required:
                raise self.fail(key, "missing required key")
            return default
        value = self.table[key]
        ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise self.fail(key, f"expected {kind.__name__}, got {type(value).__name__} {value!r}")
        if isinstance(value, str) and not value:
            raise self.fail(key, "must not be empty")
        if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
            raise self.fail(key, f"{value} must not be negative")
        return value

    def path(self, key: str, base: Path, required: bool = False) -> Path | None:
        raw = self.get(key, str, required=required)
        if raw is None:
            return None
        p = Path(os.path.expanduser(raw))
        return p if p.is_absolute() else (base / p)

    def choice(self, key: str, choices: tuple[str, ...]) -> str | None:
        value = self.get(key, str)
        if value is not None and value not in choices:
            raise self.fail(key, f"{value!r} is not one of {', '.join(choices)}")
        return value


def _check_secret_file(path: Path, where: str) -> None:
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"{where}: broker.password_file {path}: {exc.strerror or exc}") from exc
    if mode & stat.S_IROTH:
        raise ConfigError(f"{where}: broker.password_file {path} is readable by every user "
                          f"(mode {stat.S_IMODE(mode):04o}); chmod 640 it")


def _broker(where: str, raw: Any, base: Path) -> BrokerConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: broker: expected a table [broker], got {type(raw).__name__}")
    t = _Table(where, raw, _BROKER_KEYS, "broker.")
    url = t.get("url", str, required=True)
    if not url.startswith(("mqtt://", "mqtts://")):
        raise t.fail("url", f"{url!r} must start with mqtt:// or mqtts://")
    if "password_file" in raw and "password_env" in raw:
        raise t.fail("password_file", "give password_file or password_env, not both")
    cert, key = t.path("cert_file", base), t.path("key_file", base)
    if (cert is None) != (key is None):
        raise t.fail("cert_file" if cert is None else "key_file", "cert_file and key_file go together")
    env = t.get("password_env", str)
    if env is not None and not (env.replace("_", "a").isalnum() and not env[0].isdigit()):
        raise t.fail("password_env", f"{env!r} is not an environment variable name")
    password_file = t.path("password_file", base)
    if password_file is not None:
        _check_secret_file(password_file, where)
    return BrokerConfig(url=url, protocol=t.choice("protocol", MQTT_PROTOCOLS), username=t.get("username", str),
                        password_file=password_file, password_env=env, ca_file=t.path("ca_file", base),
                        cert_file=cert, key_file=key)


def parse_config(text: str, source: Path) -> RunConfig:
    where = str(source)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from exc
    base = source.parent
    t = _Table(where, data, _TOP_KEYS)
    profile_ref = t.get("profile", str, required=True)
    if profile_ref.endswith(".toml") and not Path(profile_ref).is_absolute():
        profile_ref = str(base / profile_ref)
    try:
        profile = load_profile(profile_ref)
    except ProfileError as exc:
        raise ConfigError(f"{where}: profile: {exc}") from exc
    level = (t.get("log_level", str) or "INFO").upper()
    if level not in _LOG_LEVELS:
        raise t.fail("log_level", f"{level!r} is not one of {', '.join(_LOG_LEVELS)}")
    steps = t.get("steps", int)
    if steps == 0:
        raise t.fail("steps", "must be at least 1")
    return RunConfig(
        source=source, device_id=t.get("device_id", str, required=True), profile=profile,
        data_dir=t.path("data_dir", base, required=True),  # type: ignore[arg-type]
        state_dir=t.path("state_dir", base, required=True),  # type: ignore[arg-type]
        fleet=t.get("fleet", str, "default"), bundle=t.path("bundle", base), runtime=t.choice("runtime", RUNTIMES),
        rounds=t.get("rounds", int, 0), steps=steps, deadline_s=t.get("deadline_s", float),
        interval_s=t.get("interval_s", float, 0.0), await_bundle_s=t.get("await_bundle_s", float, 0.0),
        adaptive=t.get("adaptive", bool, True), log_level=level,
        broker=_broker(where, data["broker"], base) if "broker" in data else None,
        fleet_key=t.path("fleet_key", base))


def load_config(path: str | os.PathLike[str]) -> RunConfig:
    """Read and validate a device configuration file (the password file is checked, not read)."""
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"{source}: configuration file not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: unreadable: {exc}") from exc
    return parse_config(text, source.resolve())
