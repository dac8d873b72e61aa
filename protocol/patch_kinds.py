"""Patch kinds: what a MetaPatch looks like, registered once, and the per-framework builder registries.

A kind declares its parts' shapes on a layer with C output channels, which axes of each part index those
channels (so dropout variants slice them with the layer's kept set), and which parts start random at
initialization (the rest start at zero, so φ = 0 leaves the model unchanged). Each framework (torch,
TensorFlow, ExecuTorch's channel-major form) keeps a `PatchBuilders` registry of functions applying a kind
to an activation; asking for a kind nobody registered is an error naming the registered ones, never a
silent fallback to another kind.

Besides the kind's patches on hidden layers, a patch may carry a **head bias** (`PatchSpec.head_bias`):
θ_hb = θ̄_hb + Θ_hb·φ added to the logits, i.e. a patch on the head layer's bias. Why: FiLM and low-rank
patches act on hidden channels only, so a device's φ could not express its label prior, and on
label-skewed devices personalization often did no better than "always predict my most common class"
(issue 10). With it, φ gains `num_classes` coefficients (its last ones); Θ_hb starts as the identity on
them and every other basis starts at zero there, so those coefficients begin as a plain per-class logit
offset, while MoMoDistill may still retrain θ̄_hb and Θ_hb like any other shared part.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar


class PatchKindError(ValueError):
    """An unknown patch kind, or a framework without a builder for it."""


@dataclass(frozen=True)
class PatchKind:
    """`parts(channels, rank)` -> part name -> shape; `channel_axes[part]`: axes indexed by channels;
    `random_parts`: parts whose θ̄ is drawn at init (the others start at zero)."""

    name: str
    parts: Callable[[int, int], dict[str, tuple[int, ...]]]
    channel_axes: dict[str, tuple[int, ...]]
    random_parts: tuple[str, ...] = ()


_KINDS: dict[str, PatchKind] = {}


def register_patch_kind(kind: PatchKind) -> PatchKind:
    if kind.name in _KINDS:
        raise PatchKindError(f"patch kind {kind.name!r} is already registered")
    _KINDS[kind.name] = kind
    return kind


def patch_kind(name: str) -> PatchKind:
    try:
        return _KINDS[name]
    except KeyError:
        raise PatchKindError(f"unknown patch kind {name!r}; registered: {', '.join(_KINDS)}") from None


def patch_kind_names() -> tuple[str, ...]:
    return tuple(_KINDS)


# FiLM: per-channel scale and shift, h * (1 + scale) + shift.
register_patch_kind(PatchKind("film", lambda c, r: {"scale": (c,), "shift": (c,)},
                              {"scale": (0,), "shift": (0,)}))
# Low-rank residual over channels, h + up · relu(down · h); down starts random so the gradient is not zero.
register_patch_kind(PatchKind("lowrank", lambda c, r: {"down": (r, c), "up": (c, r)},
                              {"down": (1,), "up": (0,)}, random_parts=("down",)))

# The head bias's part name: parameters "<head>.patch.bias" (θ̄_hb, (classes,)) and "<head>.patch.bias_basis"
# (Θ_hb, (classes, k)); see the module docstring.
HEAD_BIAS_PART = "bias"

F = TypeVar("F", bound=Callable[..., object])


class PatchBuilders(Generic[F]):
    """One framework's patch builders, by kind: `@BUILDERS.register("film")` on a function."""

    def __init__(self, framework: str) -> None:
        self.framework = framework
        self._builders: dict[str, F] = {}

    def register(self, kind: str) -> Callable[[F], F]:
        patch_kind(kind)  # only declared kinds get builders

        def add(fn: F) -> F:
            self._builders[kind] = fn
            return fn

        return add

    def get(self, kind: str) -> F:
        patch_kind(kind)
        try:
            return self._builders[kind]
        except KeyError:
            raise PatchKindError(f"no {self.framework} builder for patch kind {kind!r}; registered: "
                                 f"{', '.join(self._builders)}") from None
