"""Crash-safe device state: φ, Adam moments, step, bundle version, variant, replay cursor, metrics.

One commit = one file, `state-<seq>.npz`, written atomically (temp + fsync + rename, see
`protocol.params.write_atomic`). Everything that must agree (φ and the step count that produced it)
is in that one file, so a SIGKILL or power cut between two writes can never pair a new φ with an old
step. The npz holds the arrays plus a `meta` entry (UTF-8 JSON as uint8) with the scalars and a
sha256 over arrays and meta, so truncated or garbled files are detected (the zip's own CRC is not
checked by numpy on every read path, and a self-consistent zip can still hold wrong bytes). The two
newest generations are kept; `load` returns the newest valid one and reports why any newer one was
rejected.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..protocol.params import write_atomic

log = logging.getLogger("edgepatch.device.state")

STATE_SCHEMA = 1
_ARRAYS = ("phi", "m", "v")
_FILE_RE = re.compile(r"^state-(\d{10})\.npz$")


class StateError(ValueError):
    """A state file that is unreadable, inconsistent or fails its checksum."""


@dataclass(frozen=True)
class DeviceState:
    phi: np.ndarray
    m: np.ndarray
    v: np.ndarray
    step: int
    base_version: str
    variant_id: str
    replay_cursor: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        for name in _ARRAYS:
            value = getattr(self, name)
            if not isinstance(value, np.ndarray) or value.ndim != 1:
                raise StateError(f"state.{name} must be a 1-D numpy array")
            if value.shape != self.phi.shape:
                raise StateError(f"state.{name} has shape {value.shape}, phi has {self.phi.shape}")
            if not np.all(np.isfinite(value)):
                # Persisting a diverged φ would survive the restart that could otherwise recover.
                raise StateError(f"state.{name} holds NaN or inf; refusing to commit it")
        if isinstance(self.step, bool) or not isinstance(self.step, int) or self.step < 0:
            raise StateError(f"state.step must be a non-negative int, got {self.step!r}")
        if isinstance(self.replay_cursor, bool) or not isinstance(self.replay_cursor, int) \
                or self.replay_cursor < 0:
            raise StateError(f"state.replay_cursor must be a non-negative int, got {self.replay_cursor!r}")
        for name in ("base_version", "variant_id"):
            if not isinstance(getattr(self, name), str):
                raise StateError(f"state.{name} must be a string, got {getattr(self, name)!r}")
        try:
            json.dumps(self.metrics, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise StateError(f"state.metrics must be JSON-serializable without NaN: {exc}") from exc


def _digest(arrays: Mapping[str, np.ndarray], meta_without_checksum: Mapping[str, Any]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    h.update(json.dumps(meta_without_checksum, sort_keys=True, separators=(",", ":")).encode())
    return h.hexdigest()


def encode_state(state: DeviceState) -> bytes:
    state.validate()
    arrays = {name: np.asarray(getattr(state, name), dtype=np.float32) for name in _ARRAYS}
    meta: dict[str, Any] = {"schema": STATE_SCHEMA, "step": state.step, "base_version": state.base_version,
                            "variant_id": state.variant_id, "replay_cursor": state.replay_cursor,
                            "metrics": state.metrics}
    meta["sha256"] = _digest(arrays, meta)
    meta_bytes = np.frombuffer(json.dumps(meta, sort_keys=True).encode("utf-8"), dtype=np.uint8)
    buf = io.BytesIO()
    entries: dict[str, Any] = {"meta": meta_bytes, **arrays}
    np.savez(buf, **entries)
    return buf.getvalue()


def decode_state(data: bytes, where: str = "<bytes>") -> DeviceState:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            files = set(npz.files)
            missing = ({"meta", *_ARRAYS}) - files
            if missing:
                raise StateError(f"{where}: missing entries {sorted(missing)}")
            arrays = {name: npz[name] for name in _ARRAYS}
            meta_raw = npz["meta"]
    except StateError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise StateError(f"{where}: unreadable state archive (truncated or garbled?): {exc}") from exc
    try:
        meta = json.loads(meta_raw.astype(np.uint8).tobytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise StateError(f"{where}: meta entry is not UTF-8 JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise StateError(f"{where}: meta entry is not a JSON object")
    if meta.get("schema") != STATE_SCHEMA:
        raise StateError(f"{where}: unknown state schema {meta.get('schema')!r} (this device reads {STATE_SCHEMA})")
    stored = meta.pop("sha256", None)
    if not isinstance(stored, str):
        raise StateError(f"{where}: no checksum in meta")
    actual = _digest(arrays, meta)
    if actual != stored:
        raise StateError(f"{where}: checksum mismatch (stored {stored[:12]}…, content {actual[:12]}…)")
    try:
        state = DeviceState(phi=arrays["phi"], m=arrays["m"], v=arrays["v"], step=meta["step"],
                            base_version=meta["base_version"], variant_id=meta["variant_id"],
                            replay_cursor=meta["replay_cursor"], metrics=meta["metrics"])
    except KeyError as exc:
        raise StateError(f"{where}: meta lacks {exc.args[0]!r}") from None
    state.validate()
    return state


class DeviceStateStore:
    """Generations of committed state in one directory; the newest two are kept."""

    KEEP = 2

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.problems: list[str] = []  # why newer generations were skipped by the last load()

    def generations(self) -> list[tuple[int, Path]]:
        """(sequence number, path), newest first."""
        if not self.dir.is_dir():
            return []
        found = [(int(mt.group(1)), p) for p in self.dir.iterdir() if (mt := _FILE_RE.match(p.name))]
        return sorted(found, reverse=True)

    def commit(self, state: DeviceState) -> Path:
        data = encode_state(state)  # validates before anything touches the disk
        gens = self.generations()
        seq = gens[0][0] + 1 if gens else 1
        path = self.dir / f"state-{seq:010d}.npz"
        write_atomic(path, data)
        # Prune only after the new generation is durable: a crash here leaves one extra file, never none.
        for _, old in self.generations()[self.KEEP:]:
            old.unlink(missing_ok=True)
        return path

    def load(self) -> DeviceState | None:
        """The newest generation that reads and checks out; None when nothing was ever committed.

        Raises StateError when generations exist but none is valid (the caller decides whether to
        start fresh: silently discarding learned state is not this module's call)."""
        self.problems = []
        gens = self.generations()
        for _, path in gens:
            try:
                state = decode_state(path.read_bytes(), where=str(path))
            except (StateError, OSError) as exc:
                self.problems.append(str(exc))
                log.warning("skipping state generation: %s", exc)
                continue
            if self.problems:
                log.warning("fell back to older state generation %s", path.name)
            return state
        if gens:
            raise StateError(f"no valid state generation in {self.dir}: " + "; ".join(self.problems))
        return None

