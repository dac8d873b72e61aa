"""Loader for LEAF federated benchmark JSON (FEMNIST, Shakespeare), with per-user splits.

A LEAF split is one or more JSON files, each of the form
    {"users": ["f0000_14", ...], "num_samples": [n0, ...],
     "user_data": {"f0000_14": {"x": [...], "y": [...]}, ...}, "hierarchies": [...]  (optional)}
and a dataset directory holds `train/` and `test/` with such files (LEAF's `data/<task>/data/` layout).

- FEMNIST: each x is 784 floats (a 28×28 image, row-major, values in [0, 1] as LEAF writes them) →
  (1, 28, 28) float32; y in [0, 62) (10 digits, 26 upper, 26 lower case). `digits_only=True` keeps the
  10 digit classes, which fits the 10-class reference models.
- Shakespeare: each x is an 80-character string, y the next character; both encoded with LEAF's
  80-letter vocabulary → x int64 token ids (80,), y in [0, 80).

LEAF has no timestamps; `t` is the sample's position within its user (its order in the file), so
"train older, test newer" keeps LEAF's own order. Every problem raises `LeafError` naming the file
(and user) and what is wrong.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .datasets import Dataset

FEMNIST_PIXELS = 28 * 28
FEMNIST_CLASSES = 62
SHAKESPEARE_SEQ_LEN = 80
# LEAF's models/shakespeare vocabulary (utils/language_utils.py ALL_LETTERS), index = token id.
SHAKESPEARE_LETTERS = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
KINDS = ("femnist", "shakespeare")


class LeafError(ValueError):
    """A LEAF file or directory that does not follow the format."""


@dataclass(frozen=True)
class LeafData:
    """Per-user train and test sets; `users` lists users present in train, in file order."""

    kind: str
    users: list[str]
    train: dict[str, Dataset]
    test: dict[str, Dataset]


def _json_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise LeafError(f"{path}: no such LEAF file or directory")
    files = sorted(p for p in path.iterdir() if p.suffix == ".json" and p.is_file())
    if not files:
        raise LeafError(f"{path}: directory holds no .json files")
    return files


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise LeafError(f"{path}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    except UnicodeDecodeError as exc:
        raise LeafError(f"{path}: not UTF-8 text: {exc}") from exc
    if not isinstance(doc, dict):
        raise LeafError(f"{path}: top level must be an object with users/num_samples/user_data")
    for key, kind in (("users", list), ("num_samples", list), ("user_data", dict)):
        if key not in doc:
            raise LeafError(f"{path}: missing key {key!r}")
        if not isinstance(doc[key], kind):
            raise LeafError(f"{path}: {key!r} must be a JSON {'array' if kind is list else 'object'}")
    if len(doc["users"]) != len(doc["num_samples"]):
        raise LeafError(f"{path}: {len(doc['users'])} users but {len(doc['num_samples'])} num_samples entries")
    return doc


def _femnist_user(where: str, xs: list[Any], ys: list[Any], digits_only: bool) -> tuple[np.ndarray, np.ndarray]:
    for i, row in enumerate(xs):
        if not isinstance(row, list) or len(row) != FEMNIST_PIXELS:
            got = len(row) if isinstance(row, list) else type(row).__name__
            raise LeafError(f"{where}: sample {i} has {got} features, FEMNIST needs {FEMNIST_PIXELS}")
    try:
        x = np.asarray(xs, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise LeafError(f"{where}: x holds non-numeric values: {exc}") from exc
    if not np.all(np.isfinite(x)):
        raise LeafError(f"{where}: x holds NaN/inf")
    y = _labels(where, ys, FEMNIST_CLASSES)
    x = x.reshape(len(xs), 1, 28, 28).astype(np.float32)
    if digits_only:
        keep = y < 10
        x, y = x[keep], y[keep]
    return x, y


def _labels(where: str, ys: list[Any], num_classes: int) -> np.ndarray:
    for i, label in enumerate(ys):
        is_integral = isinstance(label, int) or (isinstance(label, float) and math.isfinite(label)
                                                 and label.is_integer())
        if isinstance(label, bool) or not is_integral:
            raise LeafError(f"{where}: label {i} is {label!r}, expected an integer")
        if not 0 <= label < num_classes:
            raise LeafError(f"{where}: label {i} = {label} outside [0, {num_classes})")
    return np.asarray(ys, dtype=np.int64)


def _encode(where: str, text: Any, length: int | None) -> list[int]:
    if not isinstance(text, str):
        raise LeafError(f"{where}: expected a string, got {type(text).__name__}")
    if length is not None and len(text) != length:
        raise LeafError(f"{where}: string has {len(text)} characters, Shakespeare needs {length}")
    unknown = sorted({c for c in text if c not in SHAKESPEARE_LETTERS})
    if unknown:
        raise LeafError(f"{where}: characters {unknown!r} are not in LEAF's vocabulary")
    return [SHAKESPEARE_LETTERS.index(c) for c in text]


def _shakespeare_user(where: str, xs: list[Any], ys: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray([_encode(f"{where} sample {i}", s, SHAKESPEARE_SEQ_LEN) for i, s in enumerate(xs)],
                   dtype=np.int64).reshape(len(xs), SHAKESPEARE_SEQ_LEN)
    y = np.asarray([_encode(f"{where} label {i}", c, 1)[0] for i, c in enumerate(ys)], dtype=np.int64)
    return x, y


def load_leaf_split(path: str | Path, kind: str = "femnist", digits_only: bool = False) -> dict[str, Dataset]:
    """Every user of one split (a JSON file or a directory of them) → {user: Dataset}, in file order."""
    if kind not in KINDS:
        raise LeafError(f"unknown LEAF kind {kind!r}; known: {list(KINDS)}")
    users: dict[str, Dataset] = {}
    for file in _json_files(Path(path)):
        doc = _read_json(file)
        for user, declared in zip(doc["users"], doc["num_samples"], strict=True):
            where = f"{file}: user {user!r}"
            if user in users:
                raise LeafError(f"{where} appears in more than one file of the split")
            record = doc["user_data"].get(user)
            if not isinstance(record, dict) or not isinstance(record.get("x"), list) \
                    or not isinstance(record.get("y"), list):
                raise LeafError(f"{where}: user_data entry with lists 'x' and 'y' is missing")
            xs, ys = record["x"], record["y"]
            if len(xs) != len(ys):
                raise LeafError(f"{where}: {len(xs)} samples in x but {len(ys)} labels in y")
            if len(xs) != declared:
                raise LeafError(f"{where}: num_samples says {declared} but user_data holds {len(xs)}")
            if kind == "femnist":
                x, y = _femnist_user(where, xs, ys, digits_only)
                num_classes = 10 if digits_only else FEMNIST_CLASSES
            else:
                x, y = _shakespeare_user(where, xs, ys)
                num_classes = len(SHAKESPEARE_LETTERS)
            users[user] = Dataset(x, y, np.arange(len(y), dtype=np.float64), f"leaf-{kind}/{user}", num_classes)
        extra = set(doc["user_data"]) - set(doc["users"])
        if extra:
            raise LeafError(f"{file}: user_data has users not listed in 'users': {sorted(extra)[:5]}")
    return users


def load_leaf(directory: str | Path, kind: str = "femnist", digits_only: bool = False) -> LeafData:
    """A LEAF dataset directory with `train/` and `test/` splits.

    Test samples get timestamps after each user's train samples, so they count as "newer".
    """
    root = Path(directory)
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise LeafError(f"{root}: missing {split}/ directory (LEAF layout: train/*.json, test/*.json)")
    train = load_leaf_split(root / "train", kind, digits_only)
    test = load_leaf_split(root / "test", kind, digits_only)
    unknown = sorted(set(test) - set(train))
    if unknown:
        raise LeafError(f"{root / 'test'}: users without train data: {unknown[:5]}")
    shifted = {}
    for user, data in test.items():
        offset = float(len(train[user]))
        shifted[user] = Dataset(data.x, data.y, data.t + offset, data.name, data.num_classes)
    return LeafData(kind, list(train), train, shifted)
