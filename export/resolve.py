"""Turning what a user types (`--model`, `--weights`, `--variants`) into model and variant descriptions.

Interface used by the export pipeline and the CLI (the one entry point for model sources):

    load_model(source: str, weights: Path | None, *, input_shape=None, use_source_weights=True)
        -> tuple[ModelSpec, dict[str, np.ndarray] | None]

SOURCE is one of
- a reference model name (`digits_cnn`, ...);
- `package.module:attr` or `path/to/file.py:attr`, where attr is (or is a zero-argument callable
  returning) a `ModelSpec`, a `torch.nn.Module` or a Keras model (a module in the current directory
  is importable, as with `python -m`);
- a saved Keras model file `*.keras`.
A torch module or Keras model is converted into the model description with its own weights
(export/sources/). A torch module declares its input as `input_shape = (C, L)` or `(C, H, W)`
(channel-first, without the batch), or the caller passes `input_shape`; a Keras model knows its own.

The returned params are the base weights keyed `layer.part`: from `weights` (`.npz` keyed `layer.weight`
or `layer__weight`, a torch state dict `.pt`, `.safetensors`; a torch module's own state-dict keys work
too), else the torch/Keras model's own weights (unless `use_source_weights=False`, e.g. to pretrain a
freshly built module on data), else None: a `ModelSpec` without `weights` has none (pretraining
needs data). Every problem raises `SpecError` with a one-line message.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgepatch.protocol.model_spec import ModelSpec, SpecError
from edgepatch.protocol.params import Params
from edgepatch.protocol.variants import Variant, full_variant, uniform_variant, variant_id

from .reference_models import REFERENCE_MODELS

SOURCE_FORMS = "a reference model ({}), 'module:attr', 'path/to/file.py:attr' or a saved '*.keras' file"


def load_model(source: str, weights: Path | None = None, *, input_shape: Sequence[int] | None = None,
               use_source_weights: bool = True) -> tuple[ModelSpec, Params | None]:
    """The model description of SOURCE and its base weights (None when there are none); see the module doc."""
    from .sources.weights import read_weight_file, spec_weights

    found = read_weight_file(Path(weights)) if weights is not None else None
    obj, name = _locate(source)
    kind = _kind_of(obj)
    if kind == "spec":
        if input_shape is not None and tuple(input_shape) != obj.input_shape:
            raise SpecError(f"model {source!r} has input shape {obj.input_shape}, not {tuple(input_shape)}")
        return obj, (spec_weights(obj, found, Path(weights)) if found is not None and weights else None)
    if kind == "torch":
        from .sources.torch_source import convert_module

        spec, params = convert_module(obj, name, input_shape, found, Path(weights) if weights else None, source)
    else:
        from .sources.keras_source import convert_keras

        spec, params = convert_keras(obj, name, source)
        if input_shape is not None and tuple(input_shape) != spec.input_shape:
            raise SpecError(f"Keras model {source!r} has input shape {spec.input_shape} (channel-first), "
                            f"not {tuple(input_shape)}")
        if found is not None and weights is not None:
            params = spec_weights(spec, found, Path(weights))
    return spec, (params if found is not None or use_source_weights else None)


def resolve_model(name: str) -> ModelSpec:
    """The model description of SOURCE alone (weights are not needed to describe the model)."""
    return load_model(name, None, use_source_weights=False)[0]


def _locate(source: str) -> tuple[Any, str]:
    """The object SOURCE names (called when it is a zero-argument callable) and a name for the model."""
    if source in REFERENCE_MODELS:
        return REFERENCE_MODELS[source](), source
    if source.lower().endswith(".keras"):  # the stem names the model (and its bundle's model_id)
        return _load_keras_file(Path(source)), re.sub(r"[^A-Za-z0-9_.-]", "_", Path(source).stem) or "model"
    where, sep, attr = source.rpartition(":")
    if not sep or not where or not attr:
        raise SpecError(f"unknown model {source!r}: {_hint(source)}" + SOURCE_FORMS.format(", ".join(REFERENCE_MODELS)))
    module = _import_file(Path(where)) if where.endswith(".py") else _import_module(where, source)
    obj: Any = module
    try:
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise SpecError(f"cannot load model {source!r}: {where} has no attribute {attr!r}") from None
    if _kind_of(obj) is None and callable(obj):
        try:
            obj = obj()
        except Exception as exc:
            raise SpecError(f"model {source!r}: calling {attr}() failed: {type(exc).__name__}: {exc}") from None
    if _kind_of(obj) is None:
        raise SpecError(f"{source!r} is a {type(obj).__name__}, not a ModelSpec, torch.nn.Module or Keras model")
    return obj, attr.split(".")[-1]


def _hint(source: str) -> str:
    """What to do with a file that is not a model source (the start of the 'unknown model' error)."""
    suffix = Path(source).suffix.lower()
    if suffix == ".py":
        return f"name the model inside it ('{source}:attr'); use "
    if suffix in (".pt", ".pth", ".ckpt", ".safetensors", ".npz"):
        return ("a weights file is not a model: pass the model as 'file.py:attr' and this file as --weights; "
                "use ")
    if suffix in (".h5", ".hdf5", ".onnx", ".tflite", ".pb"):
        return f"{suffix} models are not read (resave a Keras model with model.save('model.keras')); use "
    return "use "


def _kind_of(obj: Any) -> str | None:
    """'spec', 'torch', 'keras' or None, without importing a framework the object does not come from."""
    if isinstance(obj, ModelSpec):
        return "spec"
    if isinstance(obj, type):
        return None  # a class: called to build an instance
    if "torch" in sys.modules:
        import torch

        if isinstance(obj, torch.nn.Module):
            return "torch"
    if type(obj).__module__.split(".")[0] in ("keras", "tf_keras", "tensorflow"):
        import keras

        if isinstance(obj, keras.Model):
            return "keras"
    return None


def _import_module(module_name: str, source: str) -> Any:
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())  # `edgepatch export --model mymodels:net` finds ./mymodels.py
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        raise SpecError(f"cannot load model {source!r}: {exc}") from None


def _import_file(path: Path) -> Any:
    if not path.is_file():
        raise SpecError(f"model file {path} does not exist")
    module_name = f"edgepatch_user_{path.stem}_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise SpecError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    sys.path.insert(0, str(path.resolve().parent))  # its sibling modules import as in `python file.py`
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise SpecError(f"importing {path} failed: {type(exc).__name__}: {exc}") from None
    finally:  # stays importable for factories that import lazily, but no longer shadows anything
        sys.path.remove(str(path.resolve().parent))
        if str(path.resolve().parent) not in sys.path:
            sys.path.append(str(path.resolve().parent))
    return module


def _load_keras_file(path: Path) -> Any:
    if not path.is_file():
        raise SpecError(f"Keras file {path} does not exist")
    if not zipfile.is_zipfile(path):
        raise SpecError(f"{path} is not a Keras archive (the zip that model.save('model.keras') writes)")
    import keras

    try:  # safe_mode refuses Lambda layers and other deserialized code
        return keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SpecError(f"cannot load Keras file {path}: {first}") from None


def parse_variants(text: str, spec: ModelSpec) -> list[Variant]:
    """'1,0.5,0.25' (uniform ratios) or 'conv1=1:conv2=0.5,conv1=0.5:conv2=0.5' (per layer).

    The full variant is always included: it is the device's fallback and the reference for ratios.
    """
    layers = spec.droppable_layers()
    variants = [full_variant(spec)]
    for item in filter(None, (part.strip() for part in text.split(","))):
        if "=" in item:
            keep = {n: 1.0 for n in layers}
            for pair in item.split(":"):
                layer, _, ratio = pair.partition("=")
                if layer not in layers:
                    raise SpecError(f"variant {item!r}: {layer!r} is not a droppable layer ({', '.join(layers)})")
                keep[layer] = _ratio(ratio, item)
            variant = Variant(variant_id(keep, layers), keep)
        else:
            variant = uniform_variant(spec, _ratio(item, item))
        if variant.id not in {v.id for v in variants}:
            variants.append(variant)
    return variants


def _ratio(text: str, item: str) -> float:
    try:
        ratio = float(text)
    except ValueError:
        raise SpecError(f"variant {item!r}: {text!r} is not a number") from None
    if not 0.0 < ratio <= 1.0:
        raise SpecError(f"variant {item!r}: keep ratio {ratio} must be in (0, 1]")
    return ratio
