"""Device building blocks: firmware profiles, resources (traced + real), DISTREAL selector, state store."""

from __future__ import annotations

import io
import json
import logging
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from edgepatch.device.profile import ProfileError, list_profiles, load_profile, parse_profile
from edgepatch.device.resources import (
    FakeClock,
    OsCounters,
    RealClock,
    ResourceError,
    ResourceMonitor,
    ResourceSnapshot,
    ResourceTrace,
    TracedResources,
    read_battery_pct,
    read_temp_c,
)
from edgepatch.device.selector import SelectorError, VariantSelector
from edgepatch.device.state import DeviceState, DeviceStateStore, StateError, encode_state

SHIPPED = ["android_midrange", "linux_x86_64", "raspberry_pi_4", "raspberry_pi_5", "raspberry_pi_zero_2w"]

GOOD_TOML = """
name = "test_board"
cores = 4
memory_mb = 1024
relative_speed = 1.0
runtime = "litert"
threads = 2

[budgets]
round_deadline_s = 10.0
steps_per_round = 50
memory_cap_mb = 256
min_battery_pct = 20
max_temp_c = 80.0

[mqtt]
host = "localhost"
port = 1883
protocol = "5"
qos = 1
keepalive_s = 60
client_id_pattern = "edgepatch-{fleet}-{device}"
password_env = "EDGEPATCH_MQTT_PASSWORD"
"""


# --- profiles -----------------------------------------------------------------------------------------

def test_every_shipped_profile_loads_and_is_consistent() -> None:
    assert set(SHIPPED) <= set(list_profiles())
    for name in list_profiles():
        p = load_profile(name)
        assert p.name == name, f"{name}.toml declares name {p.name!r}"
        assert p.runtime in ("litert", "executorch")
        assert 1 <= p.threads <= p.cores
        assert p.budgets.memory_cap_mb <= p.memory_mb
        assert p.mqtt.qos == 1
        assert p.mqtt.client_id("f1", "d7") == "edgepatch-f1-d7"
    assert load_profile("raspberry_pi_4").relative_speed == 1.0  # the reference class


def test_profile_by_path_and_password_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "board.toml"
    path.write_text(GOOD_TOML)
    p = load_profile(path)
    assert p.source == "board.toml" and p.budgets.steps_per_round == 50
    monkeypatch.setenv("EDGEPATCH_MQTT_PASSWORD", "s3cret")
    assert p.mqtt.password() == "s3cret"
    with pytest.raises(Exception):  # noqa: B017 - frozen dataclass
        p.cores = 8  # type: ignore[misc]


@pytest.mark.parametrize(("old", "new", "expected"), [
    ('threads = 2', 'threads = 2\ngpu = true', "bad.toml: gpu: unknown key"),
    ('keepalive_s = 60', 'keepalive_s = 60\npassword = "hunter2"', "mqtt.password: unknown key; put the password"),
    ('cores = 4', 'cores = "4"', "bad.toml: cores: expected an integer, got str '4'"),
    ('cores = 4', 'cores = true', "cores: expected an integer, got bool"),
    ('runtime = "litert"', 'runtime = "onnx"', "runtime: 'onnx' is not one of 'litert', 'executorch'"),
    ('memory_cap_mb = 256', 'memory_cap_mb = 4096', "budgets.memory_cap_mb: 4096 is out of range [1, 1024]"),
    ('qos = 1', 'qos = 2', "mqtt.qos: 2 is out of range [0, 1]"),
    ('protocol = "5"', 'protocol = "3"', "mqtt.protocol: '3' is not one of"),
    ('threads = 2', 'threads = 8', "threads: 8 exceeds cores = 4"),
    ('relative_speed = 1.0', 'relative_speed = 0', "relative_speed: 0.0 is out of range (0.0"),
    ('"edgepatch-{fleet}-{device}"', '"edgepatch-{fleet}"', "client_id_pattern: must contain {device}"),
    ('password_env = "EDGEPATCH_MQTT_PASSWORD"', 'password_env = "not a name!"',
     "mqtt.password_env: 'not a name!' is not an environment variable name"),
    ('max_temp_c = 80.0\n', '', "budgets.max_temp_c: missing required key"),
])
def test_bad_profile_names_file_and_key(tmp_path: Path, old: str, new: str, expected: str) -> None:
    assert old in GOOD_TOML
    path = tmp_path / "bad.toml"
    path.write_text(GOOD_TOML.replace(old, new, 1))
    with pytest.raises(ProfileError) as err:
        load_profile(path)
    assert expected in str(err.value)
    assert str(err.value).startswith("bad.toml: ")


def test_profile_unknown_name_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="unknown device profile 'pi9'.*raspberry_pi_4"):
        load_profile("pi9")
    with pytest.raises(ProfileError, match="not valid TOML"):
        parse_profile("name = ", where="x.toml")
    with pytest.raises(ProfileError, match="tls.key_file: cert_file and key_file go together"):
        parse_profile(GOOD_TOML + '\n[mqtt.tls]\nca_file = "ca"\ncert_file = "c"\n', where="x.toml")


# --- resources ----------------------------------------------------------------------------------------

def test_fake_clock_and_traced_resources_follow_the_trace() -> None:
    clock = FakeClock(100.0)
    trace = ResourceTrace.from_points([(0.0, 1.0, 900.0), (5.0, 0.5, 400.0), (8.0, 0.25, 100.0)])
    res = TracedResources(trace, clock)
    assert res.snapshot().cpu_share == 1.0 and res.snapshot().time == 100.0
    clock.advance(4.999)
    assert res.snapshot().cpu_share == 1.0
    clock.advance(0.001)
    snap = res.snapshot()
    assert (snap.cpu_share, snap.free_memory_mb) == (0.5, 400.0)
    clock.advance(100.0)
    assert res.snapshot().cpu_share == 0.25  # the last point holds
    with pytest.raises(ValueError):
        clock.advance(-1.0)

    looped = TracedResources(trace, FakeClock(0.0), loop=True, period_tail_s=2.0)  # period 10 s
    looped.clock.advance(11.0)  # type: ignore[attr-defined]
    assert looped.snapshot().cpu_share == 1.0
    looped.clock.advance(5.0)  # type: ignore[attr-defined]
    assert looped.snapshot().cpu_share == 0.5


def test_trace_files_round_trip_and_reject_bad_input(tmp_path: Path) -> None:
    trace = ResourceTrace.from_points([(0.0, 1.0, 512.0), (2.5, 0.4, 256.0)])
    for name in ("t.csv", "t.json"):
        trace.save(tmp_path / name)
        assert ResourceTrace.load(tmp_path / name) == trace
    (tmp_path / "objs.json").write_text(json.dumps([{"t_seconds": 0, "cpu_share": 0.7, "free_mb": 10}]))
    assert ResourceTrace.load(tmp_path / "objs.json").at(3.0).cpu_share == 0.7
    (tmp_path / "bad.csv").write_text("t_seconds,cpu_share,free_mb\n0,1.0,10\n1,1.5,10\n")
    with pytest.raises(ResourceError, match=r"bad.csv: trace point 1: cpu_share 1.5 is not in \(0, 1\]"):
        ResourceTrace.load(tmp_path / "bad.csv")
    (tmp_path / "order.csv").write_text("t_seconds,cpu_share,free_mb\n1,1.0,10\n1,0.5,10\n")
    with pytest.raises(ResourceError, match="does not increase"):
        ResourceTrace.load(tmp_path / "order.csv")
    (tmp_path / "cols.csv").write_text("time,cpu\n0,1\n")
    with pytest.raises(ResourceError, match="header"):
        ResourceTrace.load(tmp_path / "cols.csv")


def test_monitor_step_share_tracks_slowdown_and_blends_os_counters(tmp_path: Path) -> None:
    profile = load_profile("raspberry_pi_4")  # threads = 3 on 4 cores
    counters = OsCounters(cores=4, other_cpu_fraction=0.0, load_avg_1m=0.5, free_memory_mb=700.0)
    clock = FakeClock()
    mon = ResourceMonitor(profile, clock=clock, ema_alpha=1.0, os_weight=0.0, counters=lambda: counters)
    assert mon.snapshot().cpu_share == 1.0  # no steps yet: OS says 4 free cores for 3 threads
    mon.calibrate("k100", 0.1)
    mon.record_step("k100", 0.1)
    assert mon.snapshot().cpu_share == pytest.approx(1.0)
    mon.record_step("k100", 0.25)
    assert mon.snapshot().cpu_share == pytest.approx(0.4)
    clock.advance(31.0)  # step data is stale: the OS view takes over
    assert mon.snapshot().cpu_share == 1.0

    busy = OsCounters(cores=4, other_cpu_fraction=0.625, load_avg_1m=3.0, free_memory_mb=700.0)
    blended = ResourceMonitor(profile, clock=clock, ema_alpha=1.0, os_weight=0.5, counters=lambda: busy)
    blended.record_step("k50", 0.05)
    snap = blended.snapshot()  # steps say 1.0, OS says 1.5 free cores / 3 threads = 0.5
    assert snap.cpu_share == pytest.approx(0.75)
    assert snap.load_avg == pytest.approx(0.75) and snap.free_memory_mb == 700.0
    with pytest.raises(ResourceError):
        blended.record_step("k50", 0.0)


def test_sysfs_readers(tmp_path: Path) -> None:
    (tmp_path / "capacity").write_text("87\n")
    (tmp_path / "temp").write_text("54321\n")
    (tmp_path / "garbage").write_text("n/a\n")
    assert read_battery_pct(str(tmp_path / "capacity")) == 87.0
    assert read_temp_c(str(tmp_path / "temp")) == pytest.approx(54.321)
    assert read_battery_pct(str(tmp_path / "garbage")) is None
    assert read_temp_c(str(tmp_path / "missing")) is None
    assert read_battery_pct(None) is None


def test_real_monitor_reads_this_machine() -> None:
    """Real-part twin of the injected-counter test: psutil and the real clock on this machine."""
    mon = ResourceMonitor(load_profile("linux_x86_64"), clock=RealClock())
    snap = mon.snapshot()
    assert 0.0 < snap.cpu_share <= 1.0
    assert snap.free_memory_mb > 10.0
    assert snap.load_avg >= 0.0
    assert snap.battery_pct is None or 0.0 <= snap.battery_pct <= 100.0


# --- selector -----------------------------------------------------------------------------------------

VARIANTS = [
    {"id": "k100-100", "keep": {"conv1": 1.0, "conv2": 1.0}, "train_ms": {"litert": 100.0, "executorch": 140.0},
     "memory_bytes": 64 * 2**20, "convergence": 0.50, "pareto": True},
    {"id": "k75-75", "keep": {"conv1": 0.75, "conv2": 0.75}, "train_ms": {"litert": 60.0, "executorch": 90.0},
     "memory_bytes": 40 * 2**20, "convergence": 0.55, "pareto": True},
    {"id": "k50-50", "keep": {"conv1": 0.5, "conv2": 0.5}, "train_ms": {"litert": 35.0, "executorch": 50.0},
     "memory_bytes": 24 * 2**20, "convergence": 0.62, "pareto": True},
    {"id": "k25-25", "keep": {"conv1": 0.25, "conv2": 0.25}, "train_ms": {"litert": 15.0, "executorch": 22.0},
     "memory_bytes": 12 * 2**20, "convergence": 0.80, "pareto": True},
    {"id": "k100-25", "keep": {"conv1": 1.0, "conv2": 0.25}, "train_ms": {"litert": 70.0, "executorch": 95.0},
     "memory_bytes": 50 * 2**20, "convergence": 0.70, "pareto": False},
]


def _simulate_round(adaptive: bool, steps: int = 50, deadline_s: float = 7.0,
                    drop_at_s: float = 2.3) -> tuple[float, list[str], VariantSelector]:
    """A round of `steps` train steps; each step takes train_ms / cpu_share of fake time."""
    clock = FakeClock()
    trace = ResourceTrace.from_points([(0.0, 1.0, 2048.0), (drop_at_s, 0.5, 2048.0)])
    resources = TracedResources(trace, clock)
    profile = load_profile("linux_x86_64")
    selector = VariantSelector(VARIANTS, profile, reselect_every=5)
    used: list[str] = []
    variant = "k100-100"
    for done in range(steps):
        snap = resources.snapshot()
        if adaptive and selector.due():
            variant = selector.select(deadline_s - clock.now(), steps - done, snap, "litert").variant_id
        step_s = selector.variants[variant].train_ms["litert"] / 1000.0 / snap.cpu_share
        clock.advance(step_s)
        selector.observe(variant, step_s, cpu_share=snap.cpu_share)
        resources.record_step(variant, step_s)
        used.append(variant)
    return clock.now(), used, selector


def test_adaptive_selector_meets_deadline_when_cpu_halves(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="edgepatch.device.selector"):  # decisions are DEBUG records
        elapsed, used, selector = _simulate_round(adaptive=True)
    full_elapsed, _, _ = _simulate_round(adaptive=False)

    assert full_elapsed > 7.0, "the scenario must be one where always-full misses the deadline"
    assert elapsed <= 7.0, f"adaptive round took {elapsed:.2f} s for a 7 s deadline"
    assert used[0] == "k100-100", "with full CPU the best-converging variant fits"
    after_drop = [d for d in selector.history if d.inputs["cpu_share"] == 0.5]
    assert after_drop and after_drop[0].variant_id == "k75-75", "the first decision after the drop goes cheaper"
    assert "k100-25" not in used, "only Pareto variants are candidates"
    # Slack regained by the cheaper steps may buy the full variant back for the last steps.
    # It switches only once the drop is visible (full variant while the CPU is whole).
    assert all(d.variant_id == "k100-100" for d in selector.history if d.inputs["cpu_share"] == 1.0)
    # Every decision is kept and logged with its inputs.
    assert len(selector.history) == 10
    first, later = selector.history[0], selector.history[-1]
    assert first.inputs["cpu_share"] == 1.0 and later.inputs["cpu_share"] == 0.5
    assert first.fits and later.fits and "largest variant that fits (accuracy first)" in first.reason
    records = [r for r in caplog.records if r.name == "edgepatch.device.selector"]
    assert len(records) == 10
    logged = records[-1].decision  # type: ignore[attr-defined]
    assert logged["variant"] == later.variant_id
    assert {"time_left_s", "steps_left", "cpu_share", "free_memory_mb", "candidates"} <= set(logged["inputs"])
    assert json.loads(records[-1].getMessage().split(" ", 2)[2])["inputs"]["steps_left"] == \
        later.inputs["steps_left"]


def _snap(cpu: float = 1.0, free_mb: float = 4096.0, battery: float | None = None,
          temp: float | None = None) -> ResourceSnapshot:
    return ResourceSnapshot(cpu, free_mb, battery, temp, 0.1, 0.0)


def test_selector_memory_cap_fallback_and_limits() -> None:
    profile = load_profile("linux_x86_64")
    sel = VariantSelector(VARIANTS, profile)
    assert sel.select(100.0, 10, _snap(), "litert").variant_id == "k100-100"
    # Only 30 MB free: the full and 75 % variants do not fit in memory.
    assert sel.select(100.0, 10, _snap(free_mb=30.0), "litert").variant_id == "k50-50"
    # The profile's cap binds even with plenty of free memory.
    zero = load_profile("raspberry_pi_zero_2w")  # memory_cap_mb = 96
    assert VariantSelector(VARIANTS, zero).select(100.0, 10, _snap(), "litert").variant_id == "k100-100"
    # Nothing fits the deadline: the cheapest, and the reason says so.
    d = sel.select(0.5, 100, _snap(cpu=0.5), "litert")
    assert d.variant_id == "k25-25" and not d.fits and "no variant fits the deadline" in d.reason
    # Nothing fits in memory: the smallest.
    d = sel.select(100.0, 1, _snap(free_mb=1.0), "litert")
    assert d.variant_id == "k25-25" and not d.fits and "memory" in d.reason
    # Battery below the profile minimum (android: 30 %): cheapest regardless of time.
    android = VariantSelector(VARIANTS, load_profile("android_midrange"))
    d = android.select(1000.0, 1, _snap(battery=12.0))
    assert d.variant_id == "k25-25" and "battery 12%" in d.reason
    assert d.inputs["runtime"] == "executorch"
    d = android.select(1000.0, 1, _snap(battery=90.0, temp=50.0))
    assert d.variant_id == "k25-25" and "temperature" in d.reason


def test_selector_learns_device_speed_from_observed_steps() -> None:
    sel = VariantSelector(VARIANTS, load_profile("linux_x86_64"))
    # 10 steps × 100 ms = 1 s fits in 1.5 s at the table's speed...
    assert sel.select(1.5, 10, _snap(), "litert").variant_id == "k100-100"
    # ...but this device runs the full variant at 200 ms per step at full CPU share.
    for _ in range(20):
        sel.observe("k100-100", 0.2, cpu_share=1.0)
    assert sel.factor("k100-100") == pytest.approx(2.0, rel=1e-3)
    assert sel.factor("k50-50") == pytest.approx(2.0, rel=1e-3)  # unobserved: borrows the median
    d = sel.select(1.5, 10, _snap(), "litert")
    assert d.variant_id == "k75-75"  # 10 × 60 ms × 2 = 1.2 s <= 1.425 s
    assert d.expected_step_s == pytest.approx(0.12, rel=1e-3)
    prior = VariantSelector(VARIANTS, load_profile("raspberry_pi_zero_2w"), table_relative_speed=5.0)
    assert prior.factor("k100-100") == pytest.approx(5.0 / 0.3)


def test_selector_rejects_bad_tables() -> None:
    profile = load_profile("linux_x86_64")
    with pytest.raises(SelectorError, match="variant table is empty"):
        VariantSelector([], profile)
    bad = [dict(VARIANTS[0], train_ms={"litert": -1.0})]
    with pytest.raises(SelectorError, match=r"row 0 \('k100-100'\): train_ms\['litert'\] must be a positive"):
        VariantSelector(bad, profile)
    with pytest.raises(SelectorError, match="missing field 'convergence'"):
        VariantSelector([{k: v for k, v in VARIANTS[0].items() if k != "convergence"}], profile)
    with pytest.raises(SelectorError, match="duplicate id"):
        VariantSelector([VARIANTS[0], VARIANTS[0]], profile)
    with pytest.raises(SelectorError, match="no train_ms for runtime 'tvm'"):
        VariantSelector(VARIANTS, profile).select(1.0, 1, _snap(), "tvm")


# --- state store --------------------------------------------------------------------------------------

def _state(step: int, k: int = 8) -> DeviceState:
    rng = np.random.default_rng(step)
    return DeviceState(phi=rng.normal(size=k).astype(np.float32), m=rng.normal(size=k).astype(np.float32),
                       v=rng.random(k).astype(np.float32), step=step, base_version="w3",
                       variant_id="k75-75", replay_cursor=step * 32, metrics={"loss": 0.5 / (step + 1)})


def _same(a: DeviceState, b: DeviceState) -> bool:
    return all(np.array_equal(getattr(a, n), getattr(b, n)) for n in ("phi", "m", "v")) and \
        (a.step, a.base_version, a.variant_id, a.replay_cursor, a.metrics) == \
        (b.step, b.base_version, b.variant_id, b.replay_cursor, b.metrics)


def test_state_round_trip_and_two_generations(tmp_path: Path) -> None:
    store = DeviceStateStore(tmp_path / "state")
    assert store.load() is None
    for step in (1, 2, 3):
        store.commit(_state(step))
    assert [p.name for _, p in store.generations()] == ["state-0000000003.npz", "state-0000000002.npz"]
    loaded = store.load()
    assert loaded is not None and _same(loaded, _state(3)) and store.problems == []
    assert not list((tmp_path / "state").glob(".*tmp*")), "no temp files left behind"
    with np.load(store.generations()[0][1], allow_pickle=False) as npz:  # a plain npz, no pickles
        assert sorted(npz.files) == ["m", "meta", "phi", "v"] and npz["meta"].dtype == np.uint8


def test_truncated_current_falls_back_to_previous(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = DeviceStateStore(tmp_path)
    store.commit(_state(1))
    current = store.commit(_state(2))
    current.write_bytes(current.read_bytes()[: current.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="edgepatch.device.state"):
        loaded = store.load()
    assert loaded is not None and _same(loaded, _state(1))
    assert len(store.problems) == 1 and current.name in store.problems[0]
    assert "truncated or garbled" in store.problems[0]
    assert any("fell back" in r.getMessage() for r in caplog.records)
    # The next commit is a new generation after the damaged one; it loads.
    store.commit(_state(3))
    again = store.load()
    assert again is not None and again.step == 3


def test_checksum_mismatch_is_detected(tmp_path: Path) -> None:
    store = DeviceStateStore(tmp_path)
    store.commit(_state(1))
    current = store.commit(_state(2))
    # A well-formed npz whose φ was altered but whose meta (and checksum) were kept: only the checksum
    # can tell.
    with np.load(current, allow_pickle=False) as npz:
        entries = {n: npz[n] for n in npz.files}
    entries["phi"] = entries["phi"] + np.float32(1e-3)
    buf = io.BytesIO()
    np.savez(buf, **entries)
    current.write_bytes(buf.getvalue())
    loaded = store.load()
    assert loaded is not None and loaded.step == 1
    assert "checksum mismatch" in store.problems[0]
    # Both generations bad: a clear error rather than a silent fresh start.
    prev = store.generations()[1][1]
    with zipfile.ZipFile(io.BytesIO(encode_state(_state(9)))) as z:
        assert "meta.npy" in z.namelist()
    prev.write_bytes(b"\x00" * 100)
    with pytest.raises(StateError, match="no valid state generation.*checksum mismatch"):
        store.load()


def test_state_refuses_invalid_content(tmp_path: Path) -> None:
    store = DeviceStateStore(tmp_path)
    bad = _state(1)
    with pytest.raises(StateError, match="state.m has shape"):
        store.commit(DeviceState(bad.phi, bad.m[:3], bad.v, 1, "w", "k"))
    with pytest.raises(StateError, match="NaN"):
        store.commit(DeviceState(bad.phi * np.nan, bad.m, bad.v, 1, "w", "k"))
    with pytest.raises(StateError, match="step must be a non-negative int"):
        store.commit(DeviceState(bad.phi, bad.m, bad.v, -1, "w", "k"))
    assert store.generations() == []


def test_device_blocks_import_no_torch_or_tensorflow() -> None:
    import subprocess

    code = ("import sys, edgepatch.device.profile, edgepatch.device.resources, edgepatch.device.selector, "
            "edgepatch.device.state; bad = [m for m in ('torch', 'tensorflow') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_selector_accuracy_first_needs_a_clear_convergence_win() -> None:
    """Issue 10: with slack the largest variant trains; a smaller one wins on quality only when its convergence
    beats the full model's by more than both spreads over seeds (one noisy estimate never does)."""
    profile = load_profile("linux_x86_64")
    snap = ResourceSnapshot(1.0, 4096.0, None, None, 0.1, 0.0)
    noisy = [dict(VARIANTS[0], flops_ratio=1.0), dict(VARIANTS[3], flops_ratio=0.25, convergence=0.30)]
    assert VariantSelector(noisy, profile).select(30.0, 10, snap).variant_id == "k100-100"
    wide = [dict(noisy[0], convergence_std=0.15), dict(noisy[1], convergence_std=0.1)]
    assert VariantSelector(wide, profile).select(30.0, 10, snap).variant_id == "k100-100"
    clear = [dict(noisy[0], convergence_std=0.02), dict(noisy[1], convergence_std=0.02)]
    assert VariantSelector(clear, profile).select(30.0, 10, snap).variant_id == "k25-25"
    # The deadline still decides when the largest does not fit: 10 steps × 100 ms > 0.5 s.
    assert VariantSelector(noisy, profile).select(0.5, 10, snap).variant_id == "k25-25"
    with pytest.raises(SelectorError, match="convergence_std"):
        VariantSelector([dict(noisy[0], convergence_std=-1.0)], profile)
