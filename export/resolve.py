"""Turning what a user types (`--model`, `--variants`) into model and variant descriptions."""

from __future__ import annotations

import importlib

from edgepatch.protocol.model_spec import ModelSpec, SpecError
from edgepatch.protocol.variants import Variant, full_variant, uniform_variant, variant_id

from .reference_models import REFERENCE_MODELS


def resolve_model(name: str) -> ModelSpec:
    """A reference model name, or `package.module:attr` naming a ModelSpec or a function returning one."""
    if name in REFERENCE_MODELS:
        return REFERENCE_MODELS[name]()
    if ":" not in name:
        raise SpecError(f"unknown model {name!r}: use one of {', '.join(REFERENCE_MODELS)} or 'module:attr'")
    module_name, attr = name.split(":", 1)
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise SpecError(f"cannot load model {name!r}: {exc}") from exc
    spec = obj() if callable(obj) and not isinstance(obj, ModelSpec) else obj
    if not isinstance(spec, ModelSpec):
        raise SpecError(f"{name!r} is a {type(spec).__name__}, not a ModelSpec")
    return spec


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
