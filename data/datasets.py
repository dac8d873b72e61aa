"""Offline datasets as channel-first float32 arrays with integer labels.

Nothing here touches the network: scikit-learn's digits ship inside its wheel and mnist1d is generated
from the templates built into the `mnist1d` package (we call `mnist1d.data.make_dataset`, never
`get_dataset`, whose default path downloads a pickle).

Value ranges (documented because patches and pretraining depend on them):
- digits: pixel intensity 0..16 divided by 16, so x ∈ [0, 1] (`scale="unit"`, default), or standardized
  with the dataset's global mean/std (`scale="standard"`).
- digits upsampled to 28×28: bilinear interpolation of the [0, 1] images, still in [0, 1].
- mnist1d: the generator's own normalization (global mean 0, std 1).

Per-sample timestamps `t` of a freshly loaded dataset are the acquisition order (0, 1, 2, ... seconds);
`edgepatch.data.fleet` replaces them with per-device arrival times.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


class DatasetError(ValueError):
    """A dataset whose arrays do not agree with each other or with its declared shape."""


@dataclass(frozen=True)
class Dataset:
    """Samples `x` (float32 N×input_shape, or int64 token ids), labels `y` (int64 N), timestamps `t`."""

    x: np.ndarray
    y: np.ndarray
    t: np.ndarray
    name: str
    num_classes: int

    def __post_init__(self) -> None:
        n = len(self.x)
        if self.x.dtype != np.float32 and not np.issubdtype(self.x.dtype, np.integer):
            raise DatasetError(f"{self.name}: x must be float32 (or integer token ids), got {self.x.dtype}")
        if self.x.ndim < 2:
            raise DatasetError(f"{self.name}: x must be N×input_shape, got shape {self.x.shape}")
        if self.y.shape != (n,) or not np.issubdtype(self.y.dtype, np.integer):
            raise DatasetError(f"{self.name}: y must be {n} integers, got {self.y.dtype} {self.y.shape}")
        if self.t.shape != (n,) or self.t.dtype != np.float64:
            raise DatasetError(f"{self.name}: t must be {n} float64 timestamps, got {self.t.dtype} {self.t.shape}")
        if self.num_classes < 1:
            raise DatasetError(f"{self.name}: num_classes must be positive, got {self.num_classes}")
        if n and (self.y.min() < 0 or self.y.max() >= self.num_classes):
            raise DatasetError(f"{self.name}: labels outside [0, {self.num_classes})")

    def __len__(self) -> int:
        return len(self.y)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.x.shape[1:])

    def subset(self, indices: np.ndarray, name: str | None = None) -> Dataset:
        idx = np.asarray(indices, dtype=np.int64)
        return Dataset(self.x[idx], self.y[idx], self.t[idx], name or self.name, self.num_classes)

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.y, minlength=self.num_classes)

    @staticmethod
    def concatenate(parts: list[Dataset], name: str) -> Dataset:
        if not parts:
            raise DatasetError(f"{name}: nothing to concatenate")
        num_classes = max(p.num_classes for p in parts)
        return Dataset(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]),
                       np.concatenate([p.t for p in parts]), name, num_classes)


def _acquisition_order(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.float64)


def load_digits(scale: str = "unit") -> Dataset:
    """scikit-learn's 1,797 real 8×8 handwritten digits as (N, 1, 8, 8); see module doc for `scale`."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    x = bunch.images.astype(np.float32)[:, None, :, :] / np.float32(16.0)
    if scale == "standard":
        x = ((x - x.mean()) / x.std()).astype(np.float32)
    elif scale != "unit":
        raise DatasetError(f"unknown scale {scale!r}; use 'unit' or 'standard'")
    y = bunch.target.astype(np.int64)
    return Dataset(x, y, _acquisition_order(len(y)), "digits", 10)


def _bilinear_matrix(size_in: int, size_out: int) -> np.ndarray:
    """Row i holds the linear-interpolation weights of output pixel i (pixel centres aligned)."""
    centres = (np.arange(size_out) + 0.5) * size_in / size_out - 0.5
    centres = np.clip(centres, 0.0, size_in - 1)
    lo = np.floor(centres).astype(np.int64)
    hi = np.minimum(lo + 1, size_in - 1)
    frac = centres - lo
    matrix = np.zeros((size_out, size_in), dtype=np.float64)
    matrix[np.arange(size_out), lo] += 1.0 - frac
    matrix[np.arange(size_out), hi] += frac
    return matrix


def resize_images(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of (N, C, H, W) images with numpy only (separable interpolation)."""
    if x.ndim != 4:
        raise DatasetError(f"resize_images expects (N, C, H, W), got shape {x.shape}")
    rows = _bilinear_matrix(x.shape[2], height)
    cols = _bilinear_matrix(x.shape[3], width)
    return np.einsum("hi,ncij,wj->nchw", rows, x.astype(np.float64), cols).astype(np.float32)


def upsample_digits_28(scale: str = "unit") -> Dataset:
    """Digits resized to (N, 1, 28, 28) so the MNIST-sized reference CNN sees real handwriting."""
    digits = load_digits(scale)
    return Dataset(resize_images(digits.x, 28, 28), digits.y, digits.t, "digits28", digits.num_classes)


def load_mnist1d(num_samples: int = 5000, seed: int = 42) -> Dataset:
    """mnist1d signals (N, 1, 40) generated offline from the package's built-in templates.

    `make_dataset` seeds numpy's and Python's global generators; we restore both afterwards so loading
    data never changes the randomness of the caller. `num_samples` is rounded down to a multiple of 10
    (the generator makes the same number of samples per class).
    """
    if num_samples < 10:
        raise DatasetError(f"mnist1d needs num_samples >= 10 (one per class), got {num_samples}")
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = int(num_samples)
    args.seed = int(seed)
    args.train_split = 1.0
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        raw = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    x = np.concatenate([raw["x"], raw["x_test"]]).astype(np.float32)[:, None, :]
    y = np.concatenate([raw["y"], raw["y_test"]]).astype(np.int64)
    return Dataset(x, y, _acquisition_order(len(y)), "mnist1d", 10)


DATASET_LOADERS: dict[str, Callable[[], Dataset]] = {
    "digits": load_digits,
    "digits28": upsample_digits_28,
    "mnist1d": load_mnist1d,
}

MODEL_DATASETS = {"digits_cnn": "digits", "mnist_cnn": "digits28", "sensor_cnn": "mnist1d"}


def load_dataset(name: str) -> Dataset:
    if name not in DATASET_LOADERS:
        raise DatasetError(f"unknown dataset {name!r}; known: {sorted(DATASET_LOADERS)}")
    return DATASET_LOADERS[name]()


def dataset_for_model(model_id: str, num_samples: int | None = None, seed: int = 42) -> Dataset:
    """The offline dataset whose input shape matches a reference model.

    digits_cnn → digits (1, 8, 8); mnist_cnn → digits upsampled to (1, 28, 28); sensor_cnn → mnist1d
    (1, 40). `num_samples`/`seed` apply to mnist1d only (the digits are a fixed real set).
    """
    if model_id not in MODEL_DATASETS:
        raise DatasetError(f"no dataset for model {model_id!r}; known: {sorted(MODEL_DATASETS)}")
    name = MODEL_DATASETS[model_id]
    if name == "mnist1d":
        return load_mnist1d(num_samples or 5000, seed)
    return load_dataset(name)
