"""A simulated device's compute: static speed factor times a Markov background load (for simulations)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .transforms import FleetError


@dataclass(frozen=True)
class DeviceResources:
    """A device's compute: a static speed factor (1 = the reference device; log-normal over the fleet,
    FedScale's default model) times a time-varying background load from a two-state Markov chain
    (idle ↔ busy; while busy the device runs `busy_slowdown` times slower)."""

    device_id: str
    speed_factor: float
    p_become_busy: float
    p_become_idle: float
    busy_slowdown: float
    seed: int

    def busy_trace(self, steps: int) -> np.ndarray:
        """Busy (True) / idle (False) per step, starting in the chain's stationary distribution."""
        rng = np.random.default_rng([self.seed, 0x10AD])
        stationary_busy = self.p_become_busy / (self.p_become_busy + self.p_become_idle)
        state = bool(rng.random() < stationary_busy)
        draws = rng.random(steps)
        trace = np.empty(steps, dtype=bool)
        for step in range(steps):
            trace[step] = state
            state = draws[step] >= self.p_become_idle if state else draws[step] < self.p_become_busy
        return trace

    def speed_trace(self, steps: int) -> np.ndarray:
        """Effective speed per step: speed_factor, divided by busy_slowdown while busy."""
        return self.speed_factor / np.where(self.busy_trace(steps), self.busy_slowdown, 1.0)


def resource_profiles(n_devices: int, seed: int = 0, speed_sigma: float = 0.5,
                      p_become_busy: float = 0.1, p_become_idle: float = 0.3,
                      busy_slowdown: float = 3.0) -> list[DeviceResources]:
    """One `DeviceResources` per device id `dev-000`, ...; speed_factor ~ LogNormal(0, speed_sigma)."""
    for name, p in (("p_become_busy", p_become_busy), ("p_become_idle", p_become_idle)):
        if not 0.0 < p <= 1.0:
            raise FleetError(f"{name} must be in (0, 1], got {p}")
    if busy_slowdown < 1.0:
        raise FleetError(f"busy_slowdown must be >= 1, got {busy_slowdown}")
    rng = np.random.default_rng([seed, 0x5BEED])
    speeds = rng.lognormal(0.0, speed_sigma, n_devices)
    return [DeviceResources(f"dev-{dev:03d}", float(speeds[dev]), p_become_busy, p_become_idle,
                            busy_slowdown, seed * 100003 + dev) for dev in range(n_devices)]
