"""The manifest schema's vocabulary (versions, artifact kinds, name patterns), its errors, and the strict
readers every manifest field goes through: each refuses a wrong type and names the field (`variants[2].id`).
Private to the manifest modules (manifest.py, manifest_parts.py); everyone else imports from manifest.py."""

from __future__ import annotations

import math
import re
from pathlib import PurePosixPath
from typing import Any

from .wire import MessageError, loads_strict

SCHEMA_VERSION = 1
KNOWN_SCHEMA_VERSIONS = (1,)
MANIFEST_NAME = "manifest.json"

LAYOUTS = {"NCHW": 3, "NCL": 2}  # layout -> rank of the input without the batch
INPUT_DTYPES = ("float32",)
# Artifacts that exist once per bundle, and artifacts that exist once per variant ("<kind>:<vid>").
SINGLE_KINDS = (
    "params_base",  # npz: base weights W (role "base"); its sha256 is the bundle's base_version
    "params_shared",  # npz: shared patch parameters θ̄ (bar) and Θ (basis)
    "params_delta",  # npz float16: new minus parent parameters (protocol/param_delta.py); optional on devices
    "litert_trainable",  # .tflite with train_phi_/train_full_/infer_ signatures per variant
    "litert_infer",  # .tflite, frozen inference
    "litert_phi_const",  # .tflite, the full variant's φ step with the weights baked in (optional; faster)
    "executorch_infer",  # .pte, frozen inference (XNNPACK)
    "dse_front_png",  # plot of the DSE Pareto front
    "dse_table_json",  # the DSE's raw evaluations
    "report_json",  # free-form export report (timings, parity checks)
)
VARIANT_KINDS = ("executorch_train_phi", "executorch_train_full")
# Programs with the weights baked in: rewritten in place (their manifest entry carries the weight layout)
# on every base update; without a layout they cannot follow new weights and must not be carried over.
BAKED_KINDS = ("litert_infer", "litert_phi_const", "executorch_infer")
REQUIRED_KINDS = ("params_base", "params_shared")

_ID_RE = re.compile(r"^[a-z0-9-]+$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]+$")
_MODEL_ID_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_RUNTIME_RE = re.compile(r"^[a-z0-9_-]+$")


class BundleError(ValueError):
    """A bundle that must not be used: bad manifest, missing or tampered artifact, unsafe archive."""


class ManifestError(BundleError):
    """A manifest field that is missing, of the wrong type or inconsistent; the message names it."""


# -- strict readers for untrusted JSON ---------------------------------------------------------------


def _where(ctx: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{ctx}[{key}]"
    return f"{ctx}.{key}" if ctx else key


def _obj(value: Any, ctx: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ManifestError(f"{ctx or 'manifest'}: expected an object, got {type(value).__name__}")
    return value


def _only_keys(data: dict[str, Any], ctx: str, required: tuple[str, ...], optional: tuple[str, ...] = ()
               ) -> None:
    for key in required:
        if key not in data:
            raise ManifestError(f"{_where(ctx, key)}: missing required field")
    unknown = sorted(set(data) - set(required) - set(optional))
    if unknown:
        raise ManifestError(f"{ctx or 'manifest'}: unknown field(s) {unknown}")


def _str(value: Any, ctx: str, pattern: re.Pattern[str] | None = None) -> str:
    if not isinstance(value, str) or not value:
        raise ManifestError(f"{ctx}: expected a non-empty string, got {value!r}")
    if pattern is not None and not pattern.match(value):
        raise ManifestError(f"{ctx}: {value!r} does not match {pattern.pattern}")
    return value


def _int(value: Any, ctx: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):  # bool is an int in Python; refuse it
        raise ManifestError(f"{ctx}: expected an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ManifestError(f"{ctx}: must be >= {minimum}, got {value}")
    return value


def _float(value: Any, ctx: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ManifestError(f"{ctx}: expected a finite number, got {value!r}")
    return float(value)


def _bool(value: Any, ctx: str) -> bool:
    if not isinstance(value, bool):
        raise ManifestError(f"{ctx}: expected true or false, got {value!r}")
    return value


def _list(value: Any, ctx: str) -> list[Any]:
    if not isinstance(value, list):
        raise ManifestError(f"{ctx}: expected a list, got {type(value).__name__}")
    return value


def check_relative_path(path: str, ctx: str = "path") -> str:
    """A path inside the bundle: relative, POSIX, canonical, no '..' (no escaping the bundle)."""
    if not isinstance(path, str) or not path:
        raise ManifestError(f"{ctx}: expected a non-empty relative path, got {path!r}")
    if "\\" in path or "\x00" in path or (len(path) > 1 and path[1] == ":"):
        raise ManifestError(f"{ctx}: {path!r} must be a POSIX path without backslashes or drive letters")
    pure = PurePosixPath(path)
    if pure.is_absolute():
        raise ManifestError(f"{ctx}: {path!r} is absolute; artifact paths must be relative to the bundle")
    if ".." in pure.parts:
        raise ManifestError(f"{ctx}: {path!r} contains '..' (path traversal)")
    if str(pure) != path or path.startswith("./"):
        raise ManifestError(f"{ctx}: {path!r} is not in canonical form (expected {str(pure)!r})")
    if path == MANIFEST_NAME:
        raise ManifestError(f"{ctx}: an artifact cannot be named {MANIFEST_NAME}")
    return path


def _loads_strict(text: str | bytes) -> Any:
    """The wire codec's strict JSON (duplicate keys, NaN/Infinity, control characters and integers beyond
    64 bits refused: all ways to smuggle ambiguity in), its refusal worded as a manifest error."""
    try:
        return loads_strict(text.encode("utf-8") if isinstance(text, str) else text)
    except MessageError as exc:
        raise ManifestError(f"manifest: not valid JSON: {exc.text}") from None
