"""Make a heterogeneous fleet out of one dataset (see /work/shared/design/DATA.md).

What each knob reproduces:
- label skew: each device's class proportions p ~ Dirichlet(α·1) (α = 0.1 very skewed, 100 ≈ IID);
- quantity skew: device sizes from a Zipf law (size ∝ 1/rank^s, ranks shuffled over devices), a
  log-normal, or uniform; the largest `head_fraction` of devices form the "head" bucket, the rest the
  "tail" (DCCL's long tail);
- feature shift: a per-device `DeviceTransform` a patch can learn — per-channel gain/offset (sensor
  calibration), a fixed permutation of a few input positions, additive noise, small rotation + shift
  (images);
- time: every sample gets an arrival time uniform over [start_time, start_time + duration); the
  holdout is the newest `holdout_fraction` of a device's samples (train older, test newer);
- drift: at a known time new classes appear, the label distribution is redrawn and/or the transform
  changes (`Drift`).

Devices draw samples without replacement from the dataset, so no two devices share a sample, and
`base_split` reserves a disjoint, untransformed part for the cloud's own pretraining. Everything comes
from one `seed`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgepatch.protocol.shards import write_shard

from .datasets import Dataset
from .resources import DeviceResources, resource_profiles
from .transforms import (
    SHIFT_KINDS,
    DeviceTransform,
    FleetError,
    draw_transform,
    parse_shift,
    rotate_shift_images,
)

__all__ = [  # transforms and resources live in their own modules; fleet callers import them from here
    "SHIFT_KINDS", "TAIL_LAWS", "DeviceData", "DeviceResources", "DeviceTransform", "Drift", "FleetError",
    "base_split", "device_sizes", "draw_transform", "head_mask", "make_fleet", "parse_shift",
    "resource_profiles", "rotate_shift_images", "write_device_shards", "write_device_timeline",
    "write_fleet_shards",
]

TAIL_LAWS = ("zipf", "lognormal", "uniform")
WEEK_SECONDS = 7 * 86400.0


@dataclass(frozen=True)
class Drift:
    """A change at a known time: `at` is a fraction of the timeline in (0, 1).

    After the drift: `new_classes` (absent before) appear and take `new_class_share` of the device's
    samples in expectation; with `redraw_labels` the device's label distribution is drawn afresh; with
    `new_transform` the device's feature transform is drawn afresh.
    """

    at: float = 0.5
    new_classes: tuple[int, ...] = ()
    new_class_share: float = 0.5
    redraw_labels: bool = False
    new_transform: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.at < 1.0:
            raise FleetError(f"drift.at must be a fraction of the timeline in (0, 1), got {self.at}")
        if not 0.0 < self.new_class_share < 1.0:
            raise FleetError(f"drift.new_class_share must be in (0, 1), got {self.new_class_share}")


@dataclass(frozen=True)
class DeviceData:
    device_id: str
    train: Dataset
    holdout: Dataset
    transform: DeviceTransform
    bucket: str  # "head" | "tail"
    label_distribution: np.ndarray  # the Dirichlet draw (before any drift)
    train_source: np.ndarray  # indices into the dataset given to make_fleet
    holdout_source: np.ndarray
    transform_after_drift: DeviceTransform | None = None
    drift_time: float | None = None
    label_distribution_after_drift: np.ndarray | None = field(default=None)

    @property
    def num_samples(self) -> int:
        return len(self.train) + len(self.holdout)

    def summary(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id, "bucket": self.bucket, "train": len(self.train),
            "holdout": len(self.holdout), "train_classes": self.train.class_counts().tolist(),
            "label_distribution": self.label_distribution.tolist(), "transform": self.transform.to_dict(),
            "drift_time": self.drift_time,
        }


def device_sizes(n_devices: int, total: int, tail: str, rng: np.random.Generator,
                 min_samples: int = 8, zipf_exponent: float = 1.0, lognormal_sigma: float = 1.0
                 ) -> np.ndarray:
    """Samples per device summing to `total`: `min_samples` each plus a share ∝ the law's weight."""
    if tail not in TAIL_LAWS:
        raise FleetError(f"unknown tail law {tail!r}; known: {list(TAIL_LAWS)}")
    extra = total - n_devices * min_samples
    if extra < 0:
        raise FleetError(f"{n_devices} devices × min_samples {min_samples} exceeds the {total} samples")
    if tail == "zipf":
        weights = 1.0 / rng.permutation(np.arange(1, n_devices + 1)) ** zipf_exponent
    elif tail == "lognormal":
        weights = rng.lognormal(0.0, lognormal_sigma, n_devices)
    else:
        weights = np.ones(n_devices)
    exact = extra * weights / weights.sum()
    share = np.floor(exact).astype(np.int64)
    # Largest remainder: hand out what flooring lost, so the sizes sum to `total` exactly.
    leftover = extra - int(share.sum())
    share[np.argsort(-(exact - share), kind="stable")[:leftover]] += 1
    return share + min_samples


def head_mask(sizes: np.ndarray, head_fraction: float) -> np.ndarray:
    """True for the largest ceil(head_fraction · n) devices."""
    n_head = max(1, int(np.ceil(head_fraction * len(sizes))))
    mask = np.zeros(len(sizes), dtype=bool)
    mask[np.argsort(-sizes, kind="stable")[:n_head]] = True
    return mask


def _draw_labels(count: int, probs: np.ndarray, class_pools: list[list[int]],
                 rng: np.random.Generator) -> list[int]:
    """Take `count` dataset indices following `probs`, without replacement, spilling over classes that
    run out to the remaining classes (by `probs`, or by what is left if `probs` has no mass there)."""
    taken: list[int] = []
    need = count
    while need > 0:
        left = np.array([len(pool) for pool in class_pools], dtype=np.float64)
        if left.sum() == 0:
            raise FleetError("the dataset ran out of samples while filling devices")
        weights = probs * (left > 0)
        weights = weights / weights.sum() if weights.sum() > 0 else left / left.sum()
        counts = rng.multinomial(need, weights)
        for cls, wanted in enumerate(counts):
            got = min(int(wanted), len(class_pools[cls]))
            taken.extend(class_pools[cls][:got])
            del class_pools[cls][:got]
            need -= got
    return taken


def _dirichlet(alpha: float, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    probs = rng.dirichlet(np.full(num_classes, alpha))
    if not np.all(np.isfinite(probs)) or probs.sum() <= 0:  # tiny α can underflow to all zeros
        probs = np.eye(num_classes)[rng.integers(num_classes)]
    return probs / probs.sum()


def make_fleet(dataset: Dataset, n_devices: int, alpha: float = 0.5,
               shift: str | Sequence[str] = "gain_offset", tail: str = "zipf", seed: int = 0,
               holdout_fraction: float = 0.25, drift: Drift | None = None,
               samples_per_device: int | None = None, min_samples: int = 8, head_fraction: float = 0.2,
               zipf_exponent: float = 1.0, lognormal_sigma: float = 1.0, shift_strength: float = 1.0,
               start_time: float = 0.0, duration: float = WEEK_SECONDS) -> list[DeviceData]:
    """Split `dataset` into `n_devices` non-overlapping, shifted, time-stamped device datasets.

    `samples_per_device` is the mean device size (default: use the whole dataset). Device ids are
    `dev-000`, `dev-001`, ... Same arguments and seed → identical fleet.
    """
    if n_devices < 1:
        raise FleetError(f"n_devices must be positive, got {n_devices}")
    if alpha <= 0:
        raise FleetError(f"alpha must be positive, got {alpha}")
    if not 0.0 < holdout_fraction < 1.0:
        raise FleetError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    if min_samples < 2:
        raise FleetError("min_samples must be at least 2 (one train and one holdout sample)")
    kinds = parse_shift(shift)
    total = len(dataset) if samples_per_device is None else samples_per_device * n_devices
    if total > len(dataset):
        raise FleetError(f"{n_devices} devices × {samples_per_device} samples needs {total} samples; "
                         f"{dataset.name} has {len(dataset)}")
    num_classes = dataset.num_classes
    new_classes = tuple(drift.new_classes) if drift else ()
    if any(not 0 <= c < num_classes for c in new_classes):
        raise FleetError(f"drift.new_classes {new_classes} outside [0, {num_classes})")

    rng = np.random.default_rng(seed)
    sizes = device_sizes(n_devices, total, tail, rng, min_samples, zipf_exponent, lognormal_sigma)
    is_head = head_mask(sizes, head_fraction)
    class_pools = [list(rng.permutation(np.flatnonzero(dataset.y == c))) for c in range(num_classes)]
    drift_time = start_time + drift.at * duration if drift else None

    fleet: list[DeviceData] = []
    for dev in range(n_devices):
        dev_rng = np.random.default_rng([seed, dev])
        probs = _dirichlet(alpha, num_classes, dev_rng)
        transform = draw_transform(kinds, dataset.input_shape, dev_rng, shift_strength)
        times = np.sort(dev_rng.uniform(start_time, start_time + duration, int(sizes[dev])))
        n_pre = int(np.searchsorted(times, drift_time)) if drift_time is not None else len(times)

        pre_probs = probs.copy()
        pre_probs[list(new_classes)] = 0.0
        if pre_probs.sum() == 0:  # the device's Dirichlet mass sat on classes that appear later
            pre_probs = np.ones(num_classes)
            pre_probs[list(new_classes)] = 0.0
        pre_probs /= pre_probs.sum()
        source = _draw_labels(n_pre, pre_probs, class_pools, rng)

        post_probs: np.ndarray | None = None
        post_transform: DeviceTransform | None = None
        if drift is not None:
            post_probs = _dirichlet(alpha, num_classes, dev_rng) if drift.redraw_labels else pre_probs
            if new_classes:
                fresh = np.zeros(num_classes)
                fresh[list(new_classes)] = 1.0 / len(new_classes)
                post_probs = (1 - drift.new_class_share) * post_probs + drift.new_class_share * fresh
            post_transform = draw_transform(kinds, dataset.input_shape, dev_rng, shift_strength) \
                if drift.new_transform else transform
            source += _draw_labels(len(times) - n_pre, post_probs, class_pools, rng)

        # Within each period the arrival order of samples is random.
        source_arr = np.asarray(source, dtype=np.int64)
        source_arr[:n_pre] = dev_rng.permutation(source_arr[:n_pre])
        source_arr[n_pre:] = dev_rng.permutation(source_arr[n_pre:])
        x = dataset.x[source_arr]
        x_pre = transform.apply(x[:n_pre]) if n_pre else x[:0].astype(np.float32)
        x_post = post_transform.apply(x[n_pre:]) if post_transform and n_pre < len(x) else x[n_pre:]
        x = np.concatenate([x_pre, x_post.astype(np.float32)])
        y = dataset.y[source_arr].astype(np.int64)

        n_holdout = min(len(times) - 1, max(1, int(round(holdout_fraction * len(times)))))
        cut = len(times) - n_holdout
        device_id = f"dev-{dev:03d}"
        train = Dataset(x[:cut], y[:cut], times[:cut], f"{dataset.name}/{device_id}/train", num_classes)
        holdout = Dataset(x[cut:], y[cut:], times[cut:], f"{dataset.name}/{device_id}/holdout", num_classes)
        fleet.append(DeviceData(
            device_id=device_id, train=train, holdout=holdout, transform=transform,
            bucket="head" if is_head[dev] else "tail", label_distribution=probs,
            train_source=source_arr[:cut], holdout_source=source_arr[cut:],
            transform_after_drift=post_transform, drift_time=drift_time,
            label_distribution_after_drift=post_probs,
        ))
    return fleet


def base_split(dataset: Dataset, fraction: float = 0.2, seed: int = 0) -> tuple[Dataset, Dataset]:
    """(cloud, devices): a class-stratified `fraction` for the cloud's own pretraining and the disjoint
    rest for `make_fleet`. The cloud part is untransformed: the shared, canonical domain."""
    if not 0.0 < fraction < 1.0:
        raise FleetError(f"fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng([seed, 0xBA5E])
    cloud_idx: list[np.ndarray] = []
    device_idx: list[np.ndarray] = []
    for cls in range(dataset.num_classes):
        members = rng.permutation(np.flatnonzero(dataset.y == cls))
        n_cloud = int(round(fraction * len(members)))
        cloud_idx.append(members[:n_cloud])
        device_idx.append(members[n_cloud:])
    cloud = np.sort(np.concatenate(cloud_idx))
    devices = np.sort(np.concatenate(device_idx))
    return (dataset.subset(cloud, f"{dataset.name}/cloud"), dataset.subset(devices, f"{dataset.name}/devices"))


def _write_dataset_shards(data: Dataset, out_dir: Path, shard_size: int) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    order = np.argsort(data.t, kind="stable")
    paths: list[Path] = []
    for number, start in enumerate(range(0, len(order), shard_size)):
        idx = order[start:start + shard_size]
        paths.append(write_shard(out_dir / f"shard-{number:05d}.npz", data.x[idx], data.y[idx], data.t[idx]))
    return paths


def write_device_shards(device_data: DeviceData, out_dir: str | Path, shard_size: int = 256,
                        holdout_dir: str | Path | None = None) -> list[Path]:
    """Write a device's train samples as time-ordered shards `shard-00000.npz`, ... in `out_dir`
    (the bring-your-own-data format of `edgepatch.protocol.shards`); optionally its holdout too."""
    if shard_size < 1:
        raise FleetError(f"shard_size must be positive, got {shard_size}")
    paths = _write_dataset_shards(device_data.train, Path(out_dir), shard_size)
    if holdout_dir is not None:
        _write_dataset_shards(device_data.holdout, Path(holdout_dir), shard_size)
    return paths


def write_device_timeline(device_data: DeviceData, out_dir: str | Path, shard_size: int = 256) -> list[Path]:
    """All of a device's samples (train and holdout) as shards: what a real device has on disk.

    The device runtime makes its own time-ordered split (older → train, newest → holdout).
    """
    both = Dataset.concatenate([device_data.train, device_data.holdout], device_data.train.name)
    return _write_dataset_shards(both, Path(out_dir), shard_size)


def write_fleet_shards(fleet: Sequence[DeviceData], root: str | Path, shard_size: int = 256) -> dict[str, Path]:
    """`root/<device_id>/train/` and `root/<device_id>/holdout/` for every device; returns train dirs."""
    dirs: dict[str, Path] = {}
    for device in fleet:
        train_dir = Path(root) / device.device_id / "train"
        write_device_shards(device, train_dir, shard_size, Path(root) / device.device_id / "holdout")
        dirs[device.device_id] = train_dir
    return dirs
