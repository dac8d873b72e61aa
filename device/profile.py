"""Firmware profiles: one TOML file per device class (cores, speed, runtime, budgets, broker settings).

Profiles ship inside the package (`edgepatch/firmware_configs/*.toml`) and are validated strictly: an
unknown key, a wrong type or an out-of-range value raises `ProfileError` naming the file and the
dotted key, so a typo in a fleet's config fails at start-up instead of silently using a default.
Secrets never live in a profile: `mqtt.password_env` names the environment variable holding the
password.
"""

from __future__ import annotations

import os
import re
import string
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import edgepatch
from edgepatch.protocol.mqtt import MqttVersion

RUNTIMES = ("litert", "executorch")
MQTT_PROTOCOLS = tuple(v.value for v in MqttVersion)  # "5", "3.1.1": the one enum of protocol/mqtt.py
_NAME_RE = re.compile(r"^[a-z0-9_]+$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ProfileError(ValueError):
    """A firmware profile that is missing, unreadable or invalid."""


def profiles_dir() -> Path:
    return Path(edgepatch.__file__).parent / "firmware_configs"


@dataclass(frozen=True)
class Budgets:
    round_deadline_s: float
    steps_per_round: int
    memory_cap_mb: int
    min_battery_pct: float
    max_temp_c: float


@dataclass(frozen=True)
class TlsSettings:
    ca_file: str
    cert_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True)
class MqttSettings:
    host: str
    port: int
    protocol: str
    qos: int
    keepalive_s: int
    client_id_pattern: str
    username: str | None = None
    password_env: str | None = None
    tls: TlsSettings | None = None
    # Issue 12: a patch stays in the outbox until the companion acknowledges it; unacknowledged ones are
    # resent after ack_timeout_s, doubling per attempt up to ack_max_backoff_s (device/link.py).
    ack_timeout_s: float = 30.0
    ack_max_backoff_s: float = 600.0

    def client_id(self, fleet: str, device: str) -> str:
        return self.client_id_pattern.format(fleet=fleet, device=device)

    def password(self) -> str | None:
        """The password from the environment (None when no variable is configured or it is unset)."""
        return os.environ.get(self.password_env) if self.password_env else None


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    cores: int
    memory_mb: int
    relative_speed: float
    runtime: str
    threads: int
    budgets: Budgets
    mqtt: MqttSettings
    battery_path: str | None = None
    thermal_path: str | None = None
    source: str = ""


# --- validation helpers -------------------------------------------------------------------------------

class _Checker:
    """Pops keys out of one TOML table, checking type and range; reports leftovers as unknown keys."""

    def __init__(self, where: str, table: Mapping[str, Any], prefix: str = "") -> None:
        self.where = where
        self.prefix = prefix
        self.left = dict(table)

    def fail(self, key: str, problem: str) -> ProfileError:
        return ProfileError(f"{self.where}: {self.prefix}{key}: {problem}")

    def _take(self, key: str) -> Any:
        if key not in self.left:
            raise self.fail(key, "missing required key")
        return self.left.pop(key)

    def _typed(self, key: str, value: Any, kinds: tuple[type, ...], label: str) -> Any:
        # bool is an int subclass in Python; `cores = true` is a typo, not 1.
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise self.fail(key, f"expected {label}, got {type(value).__name__} {value!r}")
        return value

    def integer(self, key: str, lo: int, hi: int) -> int:
        value = self._typed(key, self._take(key), (int,), "an integer")
        if not lo <= value <= hi:
            raise self.fail(key, f"{value} is out of range [{lo}, {hi}]")
        return int(value)

    def number(self, key: str, lo: float, hi: float, lo_open: bool = False) -> float:
        value = float(self._typed(key, self._take(key), (int, float), "a number"))
        below = value <= lo if lo_open else value < lo
        if below or value > hi or value != value:
            raise self.fail(key, f"{value} is out of range {'(' if lo_open else '['}{lo}, {hi}]")
        return value

    def text(self, key: str, choices: tuple[str, ...] | None = None,
             check: Callable[[str], str | None] | None = None) -> str:
        value = self._typed(key, self._take(key), (str,), "a string")
        if not value:
            raise self.fail(key, "must not be empty")
        if choices is not None and value not in choices:
            raise self.fail(key, f"{value!r} is not one of {', '.join(repr(c) for c in choices)}")
        if check is not None and (problem := check(value)) is not None:
            raise self.fail(key, problem)
        return str(value)

    def optional_text(self, key: str, check: Callable[[str], str | None] | None = None) -> str | None:
        return self.text(key, check=check) if key in self.left else None

    def table(self, key: str) -> _Checker:
        value = self._typed(key, self._take(key), (dict,), "a table")
        return _Checker(self.where, value, f"{self.prefix}{key}.")

    def done(self) -> None:
        if self.left:
            key = sorted(self.left)[0]
            extra = f" (and {len(self.left) - 1} more)" if len(self.left) > 1 else ""
            hint = "; put the password in an environment variable named by password_env" \
                if key == "password" else ""
            raise self.fail(key, f"unknown key{extra}{hint}")


def _check_client_id_pattern(pattern: str) -> str | None:
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(pattern) if f is not None}
    except ValueError as exc:
        return f"not a valid format pattern: {exc}"
    if fields - {"fleet", "device"}:
        return f"unknown placeholder(s) {sorted(fields - {'fleet', 'device'})}; use {{fleet}} and {{device}}"
    if "device" not in fields:
        return "must contain {device}: MQTT client ids must be unique per device"
    return None


def _check_env_name(name: str) -> str | None:
    return None if _ENV_NAME_RE.match(name) else f"{name!r} is not an environment variable name"


def _check_name(name: str) -> str | None:
    return None if _NAME_RE.match(name) else f"{name!r} must match [a-z0-9_]+"


def _parse(where: str, data: Mapping[str, Any]) -> DeviceProfile:
    top = _Checker(where, data)
    name = top.text("name", check=_check_name)
    cores = top.integer("cores", 1, 1024)
    memory_mb = top.integer("memory_mb", 64, 16 * 1024 * 1024)
    relative_speed = top.number("relative_speed", 0.0, 1000.0, lo_open=True)
    runtime = top.text("runtime", choices=RUNTIMES)
    threads = top.integer("threads", 1, 1024)
    if threads > cores:
        raise top.fail("threads", f"{threads} exceeds cores = {cores}")
    battery_path = top.optional_text("battery_path")
    thermal_path = top.optional_text("thermal_path")

    b = top.table("budgets")
    budgets = Budgets(
        round_deadline_s=b.number("round_deadline_s", 0.0, 7 * 24 * 3600.0, lo_open=True),
        steps_per_round=b.integer("steps_per_round", 1, 10_000_000),
        memory_cap_mb=b.integer("memory_cap_mb", 1, memory_mb),
        min_battery_pct=b.number("min_battery_pct", 0.0, 100.0),
        max_temp_c=b.number("max_temp_c", 20.0, 150.0),
    )
    b.done()

    m = top.table("mqtt")
    tls = None
    if "tls" in m.left:
        t = m.table("tls")
        tls = TlsSettings(ca_file=t.text("ca_file"), cert_file=t.optional_text("cert_file"),
                          key_file=t.optional_text("key_file"))
        if (tls.cert_file is None) != (tls.key_file is None):
            raise t.fail("cert_file" if tls.cert_file is None else "key_file",
                         "cert_file and key_file go together (client-certificate authentication)")
        t.done()
    mqtt = MqttSettings(
        host=m.text("host"),
        port=m.integer("port", 1, 65535),
        protocol=m.text("protocol", choices=MQTT_PROTOCOLS),
        # QoS 2 is not offered by the major IoT clouds; the protocol relies on QoS 1 + dedupe by hash.
        qos=m.integer("qos", 0, 1),
        keepalive_s=m.integer("keepalive_s", 5, 65535),
        client_id_pattern=m.text("client_id_pattern", check=_check_client_id_pattern),
        username=m.optional_text("username"),
        password_env=m.optional_text("password_env", check=_check_env_name),
        tls=tls,
        ack_timeout_s=m.number("ack_timeout_s", 0.0, 86400.0, lo_open=True) if "ack_timeout_s" in m.left else 30.0,
        ack_max_backoff_s=(m.number("ack_max_backoff_s", 0.0, 7 * 86400.0, lo_open=True)
                           if "ack_max_backoff_s" in m.left else 600.0),
    )
    if mqtt.ack_max_backoff_s < mqtt.ack_timeout_s:
        raise m.fail("ack_max_backoff_s", f"{mqtt.ack_max_backoff_s} is below ack_timeout_s {mqtt.ack_timeout_s}")
    m.done()
    top.done()
    return DeviceProfile(name=name, cores=cores, memory_mb=memory_mb, relative_speed=relative_speed,
                         runtime=runtime, threads=threads, budgets=budgets, mqtt=mqtt,
                         battery_path=battery_path, thermal_path=thermal_path, source=where)


def parse_profile(text: str, where: str = "<string>") -> DeviceProfile:
    """Validate TOML text as a profile; `where` names it in error messages."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{where}: not valid TOML: {exc}") from exc
    return _parse(where, data)


def list_profiles() -> list[str]:
    """Names of the profiles shipped with the package."""
    return sorted(p.stem for p in profiles_dir().glob("*.toml"))


def load_profile(name_or_path: str | os.PathLike[str]) -> DeviceProfile:
    """A shipped profile by name (e.g. 'raspberry_pi_4') or any profile file by path."""
    raw = str(name_or_path)
    looks_like_path = raw.endswith(".toml") or os.sep in raw or "/" in raw
    path = Path(raw) if looks_like_path else profiles_dir() / f"{raw}.toml"
    if not path.is_file():
        if looks_like_path:
            raise ProfileError(f"{path}: profile file not found")
        raise ProfileError(f"unknown device profile {raw!r}; shipped profiles: {', '.join(list_profiles())}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{path}: unreadable: {exc}") from exc
    return parse_profile(text, where=path.name)
