"""What the device can spend right now: CPU share, free memory, battery and temperature.

Two sources share one interface (`ResourceSource`):
- `ResourceMonitor` measures the real device: the CPU share available to training comes from recent
  step times against the fastest (full-speed) time seen for the same kind of step, blended with OS
  counters (CPU used by other processes, load average) that see contention before a step does;
  battery and temperature come from the profile's sysfs paths when readable.
- `TracedResources` replays a `ResourceTrace` at a `Clock`'s time, for simulation and tests.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import time
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from .profile import DeviceProfile

if TYPE_CHECKING:
    import psutil


class ResourceError(ValueError):
    """A malformed resource trace or an invalid measurement."""


# --- clocks -------------------------------------------------------------------------------------------

class Clock(Protocol):
    def now(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class RealClock:
    """Monotonic wall time: immune to NTP jumps, which matter on boards without an RTC."""

    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(max(0.0, seconds))


class FakeClock:
    """Time that moves only when told: simulated rounds run in microseconds and deterministically."""

    def __init__(self, start: float = 0.0) -> None:
        self._t = float(start)

    def now(self) -> float:
        return self._t

    def advance(self, seconds: float) -> None:
        if seconds < 0 or not math.isfinite(seconds):
            raise ValueError(f"FakeClock cannot advance by {seconds}")
        self._t += seconds

    def sleep(self, seconds: float) -> None:
        self.advance(max(0.0, seconds))


# --- snapshots and sources ----------------------------------------------------------------------------

@dataclass(frozen=True)
class ResourceSnapshot:
    cpu_share: float  # fraction of full-speed compute available to training, in (0, 1]
    free_memory_mb: float
    battery_pct: float | None
    temp_c: float | None
    load_avg: float  # 1-minute load average per core
    time: float

    def as_dict(self) -> dict[str, float | None]:
        return {"cpu_share": self.cpu_share, "free_memory_mb": self.free_memory_mb,
                "battery_pct": self.battery_pct, "temp_c": self.temp_c, "load_avg": self.load_avg,
                "time": self.time}


class ResourceSource(Protocol):
    def snapshot(self) -> ResourceSnapshot: ...

    def record_step(self, key: str, seconds: float) -> None: ...


MIN_CPU_SHARE = 0.02  # never report zero: expected step times divide by the share


def _clip_share(share: float) -> float:
    return min(1.0, max(MIN_CPU_SHARE, share))


# --- sysfs sensors ------------------------------------------------------------------------------------

def read_battery_pct(path: str | None) -> float | None:
    """Battery capacity in percent from a power_supply `capacity` node; None when absent or garbled."""
    value = _read_number(path)
    return value if value is not None and 0.0 <= value <= 100.0 else None


def read_temp_c(path: str | None) -> float | None:
    """Temperature from a thermal_zone `temp` node (millidegrees on Linux; plain degrees accepted)."""
    value = _read_number(path)
    if value is None:
        return None
    celsius = value / 1000.0 if abs(value) > 200.0 else value
    return celsius if -60.0 <= celsius <= 200.0 else None


def _read_number(path: str | None) -> float | None:
    if not path:
        return None
    try:
        value = float(Path(path).read_text(encoding="ascii").strip())
    except (OSError, ValueError, UnicodeDecodeError):
        return None  # unreadable sensors are normal (no battery, container): "unknown", not an error
    return value if math.isfinite(value) else None


# --- OS counters --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OsCounters:
    cores: int
    other_cpu_fraction: float  # CPU used by other processes, as a fraction of all cores
    load_avg_1m: float
    free_memory_mb: float


def psutil_counters() -> OsCounters:
    """Current OS counters via psutil, restricted to the CPUs this process may run on (a pinned
    process does not care how busy the other cores are). cpu_percent calls measure since the
    previous call."""
    import psutil

    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    per_cpu = psutil.cpu_percent(interval=None, percpu=True)
    usable = [per_cpu[i] for i in allowed if i < len(per_cpu)] or per_cpu
    cores = max(1, len(usable))
    busy_cores = sum(usable) / 100.0
    own_cores = _own_process().cpu_percent(interval=None) / 100.0  # 100 % = one full core
    other = min(1.0, max(0.0, (busy_cores - own_cores) / cores))
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return OsCounters(cores=cores, other_cpu_fraction=other, load_avg_1m=load1,
                      free_memory_mb=psutil.virtual_memory().available / 2**20)


@functools.cache
def _own_process() -> psutil.Process:
    import psutil

    proc = psutil.Process()
    proc.cpu_percent(interval=None)  # the first call only primes the counter
    return proc


def os_share(counters: OsCounters, threads: int) -> float:
    """CPU share left for `threads` training threads given what the rest of the system uses.

    Free cores = cores × (1 − others' utilisation); a scheduler gives our threads roughly the free
    cores they can occupy, and never more than `threads` of them.
    """
    free_cores = counters.cores * (1.0 - counters.other_cpu_fraction)
    return _clip_share(free_cores / max(1, threads))


# --- the real monitor ---------------------------------------------------------------------------------

@dataclass
class _StepStats:
    fastest_s: float
    share_ema: float
    last_time: float


class ResourceMonitor:
    """Available resources on the real device.

    cpu_share = (1 − os_weight) × step share + os_weight × OS share, where step share is an EMA of
    (fastest time seen for this step kind / this step's time): contention and thermal throttling
    both slow steps, and only the fastest step approximates full speed. The OS share reacts before
    a step completes. With no recent steps (older than `stale_after_s`) the OS share alone is used.
    """

    def __init__(self, profile: DeviceProfile, clock: Clock | None = None, ema_alpha: float = 0.3,
                 os_weight: float = 0.3, stale_after_s: float = 30.0,
                 counters: Callable[[], OsCounters] = psutil_counters) -> None:
        if not 0.0 < ema_alpha <= 1.0:
            raise ValueError(f"ema_alpha must be in (0, 1], got {ema_alpha}")
        if not 0.0 <= os_weight <= 1.0:
            raise ValueError(f"os_weight must be in [0, 1], got {os_weight}")
        self.profile = profile
        self.clock: Clock = clock or RealClock()
        self.ema_alpha = ema_alpha
        self.os_weight = os_weight
        self.stale_after_s = stale_after_s
        self._counters = counters
        self._steps: dict[str, _StepStats] = {}
        self._last_key: str | None = None

    def calibrate(self, key: str, full_speed_s: float) -> None:
        """Declare the full-speed time of a step kind (e.g. measured on an idle device at start-up)."""
        if not full_speed_s > 0:
            raise ResourceError(f"full-speed step time for {key!r} must be > 0, got {full_speed_s}")
        stats = self._steps.get(key)
        if stats is None:
            self._steps[key] = _StepStats(full_speed_s, 1.0, -math.inf)
        else:
            stats.fastest_s = min(stats.fastest_s, full_speed_s)

    def record_step(self, key: str, seconds: float) -> None:
        if not seconds > 0 or not math.isfinite(seconds):
            raise ResourceError(f"step time for {key!r} must be a positive number, got {seconds}")
        now = self.clock.now()
        stats = self._steps.get(key)
        if stats is None:
            self._steps[key] = _StepStats(seconds, 1.0, now)
        else:
            stats.fastest_s = min(stats.fastest_s, seconds)
            share = stats.fastest_s / seconds
            stats.share_ema = (1 - self.ema_alpha) * stats.share_ema + self.ema_alpha * share
            stats.last_time = now
        self._last_key = key

    def step_share(self) -> float | None:
        """The step-time estimate of the most recently recorded step kind, None when stale or absent."""
        if self._last_key is None:
            return None
        stats = self._steps[self._last_key]
        if self.clock.now() - stats.last_time > self.stale_after_s:
            return None
        return _clip_share(stats.share_ema)

    def snapshot(self) -> ResourceSnapshot:
        counters = self._counters()
        from_os = os_share(counters, self.profile.threads)
        from_steps = self.step_share()
        share = from_os if from_steps is None else \
            (1 - self.os_weight) * from_steps + self.os_weight * from_os
        return ResourceSnapshot(
            cpu_share=_clip_share(share), free_memory_mb=counters.free_memory_mb,
            battery_pct=read_battery_pct(self.profile.battery_path),
            temp_c=read_temp_c(self.profile.thermal_path),
            load_avg=counters.load_avg_1m / max(1, counters.cores), time=self.clock.now())


# --- traces -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TracePoint:
    t: float
    cpu_share: float
    free_mb: float


@dataclass(frozen=True)
class ResourceTrace:
    """Piecewise-constant resources over time: each point holds until the next one."""

    points: tuple[TracePoint, ...]
    _times: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.points:
            raise ResourceError("a resource trace needs at least one point")
        for i, p in enumerate(self.points):
            if not all(math.isfinite(v) for v in (p.t, p.cpu_share, p.free_mb)):
                raise ResourceError(f"trace point {i}: values must be finite, got {p}")
            if not 0.0 < p.cpu_share <= 1.0:
                raise ResourceError(f"trace point {i}: cpu_share {p.cpu_share} is not in (0, 1]")
            if p.free_mb < 0:
                raise ResourceError(f"trace point {i}: free_mb {p.free_mb} is negative")
            if i and p.t <= self.points[i - 1].t:
                raise ResourceError(f"trace point {i}: time {p.t} does not increase")
        object.__setattr__(self, "_times", tuple(p.t for p in self.points))

    @classmethod
    def from_points(cls, points: Sequence[tuple[float, float, float]]) -> ResourceTrace:
        return cls(tuple(TracePoint(float(t), float(c), float(m)) for t, c, m in points))

    @property
    def duration(self) -> float:
        return self.points[-1].t - self.points[0].t

    def at(self, t: float) -> TracePoint:
        """The point in force at time t (the first point before the trace starts)."""
        i = bisect_right(self._times, t) - 1
        return self.points[max(0, i)]

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ResourceTrace:
        """CSV with header `t_seconds,cpu_share,free_mb`, or JSON: a list of [t, cpu_share, free_mb]
        triples, a list of objects with those keys, or {"points": either}."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ResourceError(f"{path}: unreadable trace: {exc}") from exc
        try:
            if path.suffix.lower() == ".json":
                return cls._from_json(json.loads(text))
            return cls._from_csv(text)
        except (ValueError, KeyError, TypeError) as exc:
            raise ResourceError(f"{path}: {exc}") from exc

    @classmethod
    def _from_csv(cls, text: str) -> ResourceTrace:
        rows = list(csv.DictReader(line for line in text.splitlines() if line.strip()
                                   and not line.lstrip().startswith("#")))
        needed = {"t_seconds", "cpu_share", "free_mb"}
        if not rows or not needed <= set(rows[0]):
            raise ResourceError(f"trace CSV needs a header with columns {sorted(needed)}")
        return cls.from_points([(float(r["t_seconds"]), float(r["cpu_share"]), float(r["free_mb"]))
                                for r in rows])

    @classmethod
    def _from_json(cls, data: object) -> ResourceTrace:
        if isinstance(data, dict):
            data = data["points"]
        if not isinstance(data, list):
            raise ResourceError("trace JSON must be a list of points or {'points': [...]}")
        points: list[tuple[float, float, float]] = []
        for item in data:
            if isinstance(item, dict):
                points.append((item["t_seconds"], item["cpu_share"], item["free_mb"]))
            elif isinstance(item, list) and len(item) == 3:
                points.append((item[0], item[1], item[2]))
            else:
                raise ResourceError(f"trace point {item!r} is neither [t, cpu_share, free_mb] nor an object")
        return cls.from_points(points)

    def save(self, path: str | os.PathLike[str]) -> None:
        path = Path(path)
        if path.suffix.lower() == ".json":
            path.write_text(json.dumps({"points": [[p.t, p.cpu_share, p.free_mb] for p in self.points]}))
        else:
            lines = ["t_seconds,cpu_share,free_mb"] + [f"{p.t!r},{p.cpu_share!r},{p.free_mb!r}" for p in self.points]
            path.write_text("\n".join(lines) + "\n")


class TracedResources:
    """Replays a trace at the clock's time (relative to `start`, default: the clock's time now).

    With `loop=True` the trace repeats after its last point plus `period_tail_s`, so a short trace
    can drive a long simulation.
    """

    def __init__(self, trace: ResourceTrace, clock: Clock, start: float | None = None, loop: bool = False,
                 period_tail_s: float = 0.0, battery_pct: float | None = None,
                 temp_c: float | None = None) -> None:
        self.trace = trace
        self.clock = clock
        self.start = clock.now() if start is None else start
        self.loop = loop
        self.period_s = trace.duration + period_tail_s
        if loop and self.period_s <= 0:
            raise ResourceError("a looping trace needs a positive period (duration + period_tail_s)")
        self.battery_pct = battery_pct
        self.temp_c = temp_c
        self.steps: list[tuple[str, float]] = []

    def elapsed(self) -> float:
        t = self.clock.now() - self.start
        if self.loop:
            t = self.trace.points[0].t + (t - self.trace.points[0].t) % self.period_s
        return t

    def snapshot(self) -> ResourceSnapshot:
        point = self.trace.at(self.elapsed())
        return ResourceSnapshot(cpu_share=point.cpu_share, free_memory_mb=point.free_mb,
                                battery_pct=self.battery_pct, temp_c=self.temp_c,
                                load_avg=1.0 - point.cpu_share, time=self.clock.now())

    def record_step(self, key: str, seconds: float) -> None:
        # The trace is the ground truth; steps are kept only so a simulation can inspect them.
        self.steps.append((key, seconds))
