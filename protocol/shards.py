"""Bring-your-own-data format for a device: a directory of `.npz` shards.

Format
------
A device's data directory holds any number of files named `*.npz` (other files are ignored; hidden
files and `*.tmp-*` leftovers of interrupted writes are skipped). Each shard is a numpy `.npz` archive
(`numpy.savez`, compressed or not) with exactly these arrays:

==== ============================== ==========================================================
key  dtype                          shape / meaning
==== ============================== ==========================================================
x    float32 (float16/64 accepted,  (N, *input_shape), channel-first, e.g. (N, 1, 8, 8); must be
     converted to float32)          finite (no NaN/inf). Same value scale the model was trained on.
y    any integer dtype              (N,) class indices in [0, num_classes)
t    float64 (any real dtype        (N,) per-sample timestamps, seconds since the Unix epoch (or
     accepted)                      any monotone clock shared by the shards); finite
==== ============================== ==========================================================

Object arrays are refused (files are opened with `allow_pickle=False`, so a shard can never run code).
Extra keys are ignored, so a later version can add fields. `N` may be 0.

`read_shards` concatenates every shard and sorts the samples by `t` (stable), so shards may be written
in any order and samples need not be sorted within a shard; the newest samples are last. A shard that is
truncated, corrupt, misshapen, carries out-of-range labels or non-finite values raises `ShardError`
naming the file and the problem; with `skip_bad=True` the shard is logged and skipped so the device
keeps learning from the rest. `write_shard` writes atomically (temp file + rename), so a reader never
sees half a shard.

Only numpy and the standard library are used here: the device reads this module.
"""

from __future__ import annotations

import io
import logging
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .params import write_atomic

log = logging.getLogger(__name__)

SHARD_SUFFIX = ".npz"
REQUIRED_KEYS = ("x", "y", "t")


class ShardError(ValueError):
    """A shard (or shard directory) that cannot be used; the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)
        self.problem = problem


def _validate(where: str | Path, x: np.ndarray, y: np.ndarray, t: np.ndarray,
              input_shape: Sequence[int] | None, num_classes: int | None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Check and convert one shard's arrays; raise ShardError on the first problem."""
    if x.dtype.kind != "f":
        raise ShardError(where, f"x must hold floats (float32), got dtype {x.dtype}")
    if y.dtype.kind not in "iu":
        raise ShardError(where, f"y must hold integer labels, got dtype {y.dtype}")
    if t.dtype.kind not in "fiu":
        raise ShardError(where, f"t must hold real timestamps (float64), got dtype {t.dtype}")
    if y.ndim != 1:
        raise ShardError(where, f"y must be 1-D (N,), got shape {y.shape}")
    if t.ndim != 1:
        raise ShardError(where, f"t must be 1-D (N,), got shape {t.shape}")
    if x.ndim < 2:
        raise ShardError(where, f"x must be (N, *input_shape), got shape {x.shape}")
    if not (len(x) == len(y) == len(t)):
        raise ShardError(where, f"length mismatch: x has {len(x)} samples, y {len(y)}, t {len(t)}")
    if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape):
        raise ShardError(where, f"x has sample shape {tuple(x.shape[1:])}, expected {tuple(input_shape)}")
    x32 = x.astype(np.float32, copy=False)
    if not np.all(np.isfinite(x32)):
        raise ShardError(where, f"x holds {int(np.count_nonzero(~np.isfinite(x32)))} NaN/inf values")
    t64 = t.astype(np.float64, copy=False)
    if not np.all(np.isfinite(t64)):
        raise ShardError(where, "t holds NaN/inf timestamps")
    if len(y) and y.min() < 0:
        raise ShardError(where, f"label {int(y.min())} is negative")
    if num_classes is not None and len(y) and y.max() >= num_classes:
        raise ShardError(where, f"label {int(y.max())} is out of range [0, {num_classes})")
    return x32, y.astype(np.int64, copy=False), t64


def write_shard(path: str | Path, x: np.ndarray, y: np.ndarray, t: np.ndarray) -> Path:
    """Validate and atomically write one shard (`x` float32, `y` int64, `t` float64)."""
    path = Path(path)
    if path.suffix != SHARD_SUFFIX:
        raise ShardError(path, f"shard files must end in {SHARD_SUFFIX}")
    x32, y64, t64 = _validate(path, np.asarray(x), np.asarray(y), np.asarray(t), None, None)
    buf = io.BytesIO()
    np.savez(buf, x=x32, y=y64, t=t64)
    write_atomic(path, buf.getvalue())
    return path


def read_shard(path: str | Path, input_shape: Sequence[int] | None = None,
               num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read and validate one shard; samples stay in file order."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in REQUIRED_KEYS if k not in npz.files]
            if missing:
                raise ShardError(path, f"missing array(s) {missing}; a shard needs {list(REQUIRED_KEYS)}")
            x, y, t = (npz[k] for k in REQUIRED_KEYS)
    except ShardError:
        raise
    except FileNotFoundError as exc:
        raise ShardError(path, "file does not exist") from exc
    except ValueError as exc:  # numpy: object arrays under allow_pickle=False, bad headers
        raise ShardError(path, f"unreadable shard (corrupt or holds object arrays): {exc}") from exc
    except (zipfile.BadZipFile, EOFError, OSError, KeyError) as exc:
        raise ShardError(path, f"unreadable shard (truncated or corrupt): {exc}") from exc
    return _validate(path, x, y, t, input_shape, num_classes)


def list_shards(directory: str | Path) -> list[Path]:
    """The shard files of a directory in name order (hidden and temporary files skipped)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ShardError(directory, "shard directory does not exist")
    return sorted(p for p in directory.iterdir()
                  if p.suffix == SHARD_SUFFIX and p.is_file() and not p.name.startswith("."))


def read_shards(directory: str | Path, input_shape: Sequence[int], num_classes: int,
                skip_bad: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All samples of a shard directory as (x float32, y int64, t float64), sorted by t.

    An empty directory gives empty arrays (a device with no data yet). With `skip_bad`, a bad shard is
    logged at WARNING and left out instead of raising.
    """
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    ts: list[np.ndarray] = []
    for path in list_shards(directory):
        try:
            x, y, t = read_shard(path, input_shape, num_classes)
        except ShardError as exc:
            if not skip_bad:
                raise
            log.warning("skipping bad shard %s", exc)
            continue
        xs.append(x)
        ys.append(y)
        ts.append(t)
    if not xs:
        return (np.zeros((0, *input_shape), np.float32), np.zeros(0, np.int64), np.zeros(0, np.float64))
    x_all, y_all, t_all = np.concatenate(xs), np.concatenate(ys), np.concatenate(ts)
    order = np.argsort(t_all, kind="stable")
    return x_all[order], y_all[order], t_all[order]
