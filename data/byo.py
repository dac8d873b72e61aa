"""A user's own data for the exporter and the cloud companion: `--data PATH` and `--proxy PATH`.

One concept, one flag. PATH is either
- a shard directory in the bring-your-own-data format the devices read (`protocol/shards.py`,
  docs/data.md: `*.npz` files with `x`, `y`, `t`), or
- one `.npz` file with `x` (N, *input_shape) float and `y` (N,) integer labels (`t` optional).
A proxy set (`--proxy`, unlabelled) is the same, and only its `x` is read.

Everything is read with `allow_pickle=False` and checked against the model's input spec; a problem is a
`DataError` with one line naming the file and what is wrong (and what was expected).

The reference models (`export/reference_models.py`) have a default: the cloud half of the offline
dataset they were designed for (`reference_data`). Nothing else is implied: a user's model without
`--data` has no data, and the callers say so.

numpy and `protocol/` only: the companion reads this module without scikit-learn installed.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgepatch.protocol.shards import ShardError, list_shards, read_shards


class DataError(ValueError):
    """Data that cannot be used: the message names the file and the problem in one line."""


@dataclass(frozen=True)
class LabelledData:
    """Samples `x` (float32, N×input_shape, channel-first) and labels `y` (int64, N); `source` for messages."""

    x: np.ndarray
    y: np.ndarray
    source: str

    def __len__(self) -> int:
        return len(self.y)

    def split(self, holdout: float = 0.2, seed: int = 0) -> tuple[LabelledData, LabelledData]:
        """(train, held-out): a class-stratified random split, so accuracy is reported on unseen samples."""
        if not 0.0 < holdout < 1.0:
            raise DataError(f"holdout must be in (0, 1), got {holdout}")
        rng = np.random.default_rng([seed, 0x401D])
        hold: list[np.ndarray] = []
        for cls in np.unique(self.y):
            members = rng.permutation(np.flatnonzero(self.y == cls))
            hold.append(members[:int(round(holdout * len(members)))])
        held = np.sort(np.concatenate(hold)) if hold else np.zeros(0, np.int64)
        mask = np.ones(len(self.y), bool)
        mask[held] = False
        if mask.sum() == 0 or len(held) == 0:
            raise DataError(f"{self.source}: {len(self.y)} samples are too few to hold out {holdout:.0%}")
        return (LabelledData(self.x[mask], self.y[mask], f"{self.source} (train)"),
                LabelledData(self.x[held], self.y[held], f"{self.source} (held out)"))


def _shape_text(shape: Sequence[int]) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def check_x(where: str, x: np.ndarray, input_shape: Sequence[int] | None) -> np.ndarray:
    """Float samples of the model's input shape, finite, as float32."""
    if x.dtype.kind not in "fiu":
        raise DataError(f"{where}: x must hold numbers (float32), got dtype {x.dtype}")
    if x.ndim < 2:
        raise DataError(f"{where}: x must be (N, *input_shape), got shape {x.shape}")
    if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape):
        raise DataError(f"{where}: x has sample shape {_shape_text(x.shape[1:])}, the model expects "
                        f"{_shape_text(input_shape)} (channel-first, without the batch)")
    if len(x) == 0:
        raise DataError(f"{where}: holds no samples")
    x32 = x.astype(np.float32, copy=False)
    bad = int(np.count_nonzero(~np.isfinite(x32)))
    if bad:
        raise DataError(f"{where}: x holds {bad} NaN/inf values")
    return x32


def check_y(where: str, y: np.ndarray, n: int, num_classes: int | None) -> np.ndarray:
    if y.dtype.kind not in "iu":
        raise DataError(f"{where}: y must hold integer class labels, got dtype {y.dtype}")
    if y.shape != (n,):
        raise DataError(f"{where}: y has shape {y.shape}, expected ({n},) labels, one per sample of x")
    if n and y.min() < 0:
        raise DataError(f"{where}: label {int(y.min())} is negative")
    if num_classes is not None and n and y.max() >= num_classes:
        raise DataError(f"{where}: label {int(y.max())} is out of range [0, {num_classes}) for this model")
    return y.astype(np.int64, copy=False)


def _read_npz(path: Path, keys: Sequence[str]) -> dict[str, np.ndarray]:
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise DataError(f"{path}: is a single array, not an .npz archive with named arrays {list(keys)}")
        with loaded as npz:
            missing = [k for k in keys if k not in npz.files]
            if missing:
                raise DataError(f"{path}: missing array(s) {missing}; found {sorted(npz.files)}, "
                                f"expected {list(keys)}")
            return {k: np.asarray(npz[k]) for k in npz.files if k in (*keys, "y")}
    except DataError:
        raise
    except ValueError as exc:  # object arrays under allow_pickle=False, a pickle, a bad header
        raise DataError(f"{path}: not a numpy .npz archive of plain arrays ({exc})") from exc
    except (zipfile.BadZipFile, EOFError, OSError, KeyError) as exc:
        raise DataError(f"{path}: unreadable .npz (truncated or corrupt: {exc})") from exc


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: does not exist (give a shard directory or an .npz file with x and y)")
    if path.is_file() and path.suffix != ".npz":
        raise DataError(f"{path}: is neither a shard directory nor an .npz file with x and y")
    return path


def load_labelled(path: str | Path, input_shape: Sequence[int] | None = None,
                  num_classes: int | None = None) -> LabelledData:
    """Labelled data from a shard directory or one `.npz` (x, y), checked against the model's input."""
    path = _existing(path)
    if path.is_dir():
        if not list_shards(path):
            raise DataError(f"{path}: the directory holds no *.npz shards")
        try:  # the devices' own reader: the same checks as on a device, errors naming the shard
            x, y, _ = read_shards(path, input_shape, num_classes)
        except ShardError as exc:
            raise DataError(str(exc)) from exc
        if len(x) == 0:
            raise DataError(f"{path}: the shards hold no samples")
        return LabelledData(x, y, str(path))
    arrays = _read_npz(path, ("x", "y"))
    x = check_x(str(path), arrays["x"], input_shape)
    return LabelledData(x, check_y(str(path), arrays["y"], len(x), num_classes), str(path))


def load_unlabelled(path: str | Path, input_shape: Sequence[int] | None = None) -> np.ndarray:
    """Unlabelled samples (a proxy set): the `x` of a shard directory or of one `.npz` (labels ignored)."""
    path = _existing(path)
    if path.is_dir():
        x = np.concatenate([_read_npz(p, ("x",))["x"] for p in list_shards(path)] or [np.zeros((0, 1))])
        return check_x(str(path), x, input_shape)
    return check_x(str(path), _read_npz(path, ("x",))["x"], input_shape)


def reference_data(model_name: str, seed: int = 0) -> LabelledData | None:
    """The default data of a reference model: the cloud half of its offline dataset (None for any other
    model). The other half is what `edgepatch demo` gives the devices."""
    from .datasets import MODEL_DATASETS, dataset_for_model
    from .fleet import base_split

    if model_name not in MODEL_DATASETS:
        return None
    cloud, _ = base_split(dataset_for_model(model_name), fraction=0.5, seed=seed)
    return LabelledData(cloud.x, cloud.y, f"offline {MODEL_DATASETS[model_name]} (cloud half)")
