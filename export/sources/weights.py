"""Reading a user's weight file (`--weights`) without ever unpickling outside input.

Accepted formats, chosen by suffix:
- `.npz`: numpy archive of plain arrays (read with `allow_pickle=False`);
- `.pt` / `.pth`: a torch state dict saved with `torch.save(model.state_dict(), path)`, read with
  `torch.load(weights_only=True)` (optionally nested under "state_dict" / "model_state_dict");
- `.safetensors`: read with the safetensors library (a JSON header and raw tensors, no code).

Keys may be `layer.weight` or `layer__weight` (torch forbids dots in parameter names, so `PatchedNet`
and many scripts use `__`); they are normalized to dots. Every error is one line naming the file.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from edgepatch.protocol.model_spec import ModelSpec, SpecError, param_infos
from edgepatch.protocol.params import Params

WEIGHT_SUFFIXES = (".npz", ".pt", ".pth", ".safetensors")
# Keys a bundle's params.npz carries beside the base weights: harmless in a --weights file.
_PATCH_MARK = ".patch."


def read_weight_file(path: Path) -> Params:
    """Name → float32 array, keys normalized to `layer.part`; integer buffers (BN counters) dropped."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"weights file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        raw = _read_npz(path)
    elif suffix in (".pt", ".pth"):
        raw = _read_torch(path)
    elif suffix == ".safetensors":
        raw = _read_safetensors(path)
    else:
        raise SpecError(f"weights file {path}: unknown format {suffix!r}; use one of {', '.join(WEIGHT_SUFFIXES)}")
    if not raw:
        raise SpecError(f"weights file {path} holds no arrays")
    out: Params = {}
    for key, value in raw.items():
        array = np.asarray(value)
        if not np.issubdtype(array.dtype, np.floating):
            continue  # e.g. BatchNorm's num_batches_tracked: a counter, not a weight
        out[normalize_key(key)] = array.astype(np.float32)
    if not out:
        raise SpecError(f"weights file {path} holds no floating-point arrays (keys: {_short(raw)})")
    return out


def normalize_key(key: str) -> str:
    return key.replace("__", ".")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not zipfile.is_zipfile(path):
        raise SpecError(f"weights file {path} is not an .npz archive (a zip of .npy arrays, as np.savez writes)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except ValueError as exc:  # object arrays need pickle: refused
        raise SpecError(f"weights file {path} holds object arrays, not plain numeric arrays ({exc})") from None
    except Exception as exc:  # corrupt members: numpy raises several types
        raise SpecError(f"weights file {path} is a damaged .npz archive: {exc}") from None


def _read_torch(path: Path) -> dict[str, np.ndarray]:
    if not zipfile.is_zipfile(path):
        raise SpecError(f"weights file {path} is not a torch state-dict archive "
                        "(expected the zip that torch.save(model.state_dict(), path) writes)")
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses anything but tensors and plain containers
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f" ({found.group(1)})" if found else ""
        raise SpecError(f"weights file {path} is not a plain state dict: it holds Python objects{what}, which "
                        "are never unpickled; save model.state_dict() instead of the model") from None
    if isinstance(obj, Mapping):
        for nested in ("state_dict", "model_state_dict"):
            if isinstance(obj.get(nested), Mapping):
                obj = obj[nested]
                break
    if not isinstance(obj, Mapping):
        raise SpecError(f"weights file {path} holds a {type(obj).__name__}, not a state dict (name -> tensor)")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise SpecError(f"weights file {path} holds no tensors (keys: {_short(obj)})")
    return {k: v.detach().to(torch.float32 if v.is_floating_point() else v.dtype).numpy() for k, v in tensors.items()}


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        from safetensors.numpy import load_file
    except ImportError:
        raise SpecError("reading .safetensors needs the safetensors package: pip install 'edgepatch[export]'") from None
    try:
        return dict(load_file(str(path)))
    except Exception as exc:  # SafetensorError for a bad header, TypeError for bf16 in numpy, ...
        raise SpecError(f"weights file {path} is not a readable .safetensors file: {exc}") from None


def spec_weights(spec: ModelSpec, found: Mapping[str, np.ndarray], path: Path) -> Params:
    """The base weights of `spec` out of `found`: every expected key present, nothing unknown, shapes equal."""
    expected = {name: info.shape for name, info in param_infos(spec, None).items()}
    missing = [k for k in expected if k not in found]
    unknown = [k for k in found if k not in expected and _PATCH_MARK not in k]
    if missing or unknown:
        raise SpecError(f"weights file {path} does not fit model {spec.name!r}: "
                        f"missing {_short(missing)}; unexpected {_short(unknown)}; "
                        f"expected keys {_short(expected)}; found {_short(found)}")
    params: Params = {}
    for name, shape in expected.items():
        value = np.asarray(found[name], dtype=np.float32)
        if tuple(value.shape) != shape:
            raise SpecError(f"weights file {path}: {name!r} has shape {tuple(value.shape)}, expected {shape}")
        if not np.all(np.isfinite(value)):
            raise SpecError(f"weights file {path}: {name!r} holds NaN or inf")
        params[name] = value
    return params


def _short(keys: Iterable[object], limit: int = 8) -> str:
    """A key list for a one-line message: the first few, then how many more."""
    names = [str(k) for k in keys]
    if not names:
        return "none"
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return "[" + ", ".join(names[:limit]) + more + "]"
