"""Canoe helper: extract the significant sub-network of the helper's own model for the requested classes.

Per task: first-order Taylor importance of every conv filter for the requested classes, on the helper's
own data only: score_j = Σ_batches Σ_{params of filter j} |w · ∂L/∂w| (weights and bias), with the
gradients of the full variant's full-weight training program on the device's runtime (LiteRT or
ExecuTorch; `engine.taylor_importance`) on batches drawn from the helper's samples of those classes.
The top filters per layer are kept, with as many filters as a bundle variant keeps, so the slice runs as
that variant on the target (either runtime): by default the smallest sliced variant, or the smallest whose
kept filters hold `SliceOptions.mass` of every layer's importance. The slice is fine-tuned on the helper's
data, then (sliced base W + kept indices + the helper's φ + the sliced model description) serialized
pickle-free in float16 (`protocol.canoe.encode_slice`; float32 when a weight leaves float16's range) with
its sha256; it travels inline when it fits in a message, else by reference (a file in a directory the
target can read, or any http(s) URL serving it). docs/DESIGN.md §11 has the measurements behind the defaults.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from edgepatch.protocol.canoe import (
    INLINE_LIMIT_BYTES,
    CanoeError,
    CanoeMessage,
    CanoeMeta,
    CanoeOffer,
    CanoeSlice,
    CanoeTask,
    canoe_topic,
    check_classes,
    encode_slice,
    sha256_hex,
)
from edgepatch.protocol.model_spec import ModelSpec, param_infos
from edgepatch.protocol.params import write_atomic
from edgepatch.protocol.variants import KeptSets, Variant, slice_params

from .canoe_boost import TailoredModel
from .canoe_link import CanoeLink
from .engine import sgd_step, taylor_importance

log = logging.getLogger("edgepatch.device.canoe")


def filter_importance(model: TailoredModel, x: np.ndarray, y: np.ndarray, classes: list[int],
                      rng: np.random.Generator, batches: int = 8) -> dict[str, np.ndarray]:
    """Taylor score per filter of every droppable layer, for `classes`, on (x, y) (the helper's data)."""
    pick = np.flatnonzero(np.isin(y, classes))
    if len(pick) == 0:
        raise CanoeError(f"no_data: this device has no samples of classes {classes}")
    draws = (rng.choice(pick, size=model.batch, replace=len(pick) < model.batch) for _ in range(batches))
    return taylor_importance(model.engine, model.full_vid, model.base, model.spec.droppable_layers(),
                             ((x[idx], y[idx]) for idx in draws))


def top_filters(importance: dict[str, np.ndarray], widths: dict[str, int]) -> KeptSets:
    """The `widths[layer]` most important filters of each layer, sorted (ties by lower index)."""
    kept: KeptSets = {}
    for name, width in widths.items():
        order = np.argsort(-importance[name], kind="stable")[:width]
        kept[name] = np.sort(order).astype(np.int64)
    return kept


def mass_kept(importance: np.ndarray, width: int) -> float:
    """Share of a layer's importance held by its `width` most important filters (1.0 for an all-zero layer)."""
    total = float(importance.sum())
    return float(np.sort(importance)[::-1][:width].sum() / total) if total > 0 else 1.0


def slice_variant(variants: list[Variant], spec: ModelSpec, importance: dict[str, np.ndarray], mass: float,
                  wanted: str = "") -> Variant:
    """The requested variant; else the smallest sliced variant whose top filters hold at least `mass` of the
    importance of every layer; else the largest sliced one (the most the bundle ships short of the whole
    model). The kept fraction thus follows how concentrated the importance for these classes is, within the
    widths the bundle has programs for (a slice must run as a bundle variant on the target)."""
    if wanted:
        for v in variants:
            if v.id == wanted:
                return v
        raise CanoeError(f"bad_request: variant {wanted!r} is not in the bundle ({[v.id for v in variants]})")
    small = sorted((v for v in variants if not v.is_full(spec)), key=lambda v: sum(v.widths(spec).values()))
    if not small:
        raise CanoeError("bad_request: the bundle has no sliced variant to ship")
    for v in small:
        if all(mass_kept(importance[n], w) >= mass for n, w in v.widths(spec).items()):
            return v
    return small[-1]


def recover_slice(model: TailoredModel, base: dict[str, np.ndarray], variant: Variant, x: np.ndarray,
                  y: np.ndarray, classes: list[int], steps: int, rng: np.random.Generator, focus: float = 0.5
                  ) -> dict[str, np.ndarray]:
    """A few full-weight steps of the sliced network itself (the variant's full-weight program on the
    device's runtime) on the helper's data, a `focus` share of each batch from the requested classes:
    dropping filters shifts the head's logits, and these steps recover most of that accuracy before
    anything is shipped. The rest of each batch keeps the slice from calling everything a requested class
    (the target trusts it when it names one)."""
    base = {k: v.copy() for k, v in base.items()}
    pick, rest = np.flatnonzero(np.isin(y, classes)), np.flatnonzero(~np.isin(y, classes))
    n_pick = model.batch if not len(rest) else int(round(focus * model.batch))
    for _ in range(steps):
        idx = np.concatenate([rng.choice(pick, size=n_pick), rng.choice(rest, size=model.batch - n_pick)
                              if len(rest) else np.zeros(0, np.int64)]).astype(np.int64)
        try:
            sgd_step(model.engine, variant.id, x[idx], y[idx], base, model.lr)
        except FloatingPointError as exc:
            raise CanoeError(f"helper_failed: recovering the slice diverged ({exc})") from None
    return base


@dataclass(frozen=True)
class SliceOptions:
    """How a helper cuts its slices (see the module docstring); the defaults are the benchmarked ones."""

    variant_id: str = ""  # a fixed bundle variant; "" = chosen by importance mass
    mass: float = 0.0  # importance share each layer's kept filters must hold (0: the smallest sliced variant)
    encoding: str = "float16"  # "float32" or "float16" (bounded rounding; float32 when out of range)
    batches: int = 8  # Taylor-importance batches
    recover_steps: int = 300
    focus: float = 0.5  # share of each recovery batch from the requested classes


def extract_slice(model: TailoredModel, x: np.ndarray, y: np.ndarray, classes: list[int], variants: list[Variant],
                  *, base_version: str, helper: str, request_id: str, rng: np.random.Generator,
                  options: SliceOptions = SliceOptions()) -> CanoeSlice:
    """The significant sub-network of `model` for `classes`, shaped as one of `variants`."""
    classes = check_classes(classes, model.spec.num_classes)
    importance = filter_importance(model, x, y, classes, rng, options.batches)
    variant = slice_variant(variants, model.spec, importance, options.mass, options.variant_id)
    kept = top_filters(importance, variant.widths(model.spec))
    infos = param_infos(model.spec, None)
    base = slice_params(model.base, infos, kept)
    if options.recover_steps:
        base = recover_slice(model, base, variant, x, y, classes, options.recover_steps, rng, options.focus)
    return CanoeSlice(base_version, variant.id, helper, request_id, classes, kept, base,
                      np.asarray(model.phi, np.float32), variant.spec(model.spec),
                      {k: v.tolist() for k, v in importance.items()}, options.encoding)


def encode_or_widen(s: CanoeSlice) -> bytes:
    """The slice file; a float16 slice whose weights leave float16's range is shipped as float32."""
    try:
        return encode_slice(s)
    except CanoeError:
        if s.encoding == "float32":
            raise
        log.warning("canoe helper: slice weights exceed float16's range, shipping float32")
        return encode_slice(replace(s, encoding="float32"))


def full_model_bytes(model: TailoredModel, encoding: str = "float32") -> int:
    """Bytes of the helper's whole tailored model in the same file format and encoding (the comparison point)."""
    return len(full_model_file(model, encoding))


def full_model_file(model: TailoredModel, encoding: str = "float32") -> bytes:
    """The helper's whole model as a slice file (every filter kept): what full-model transfer ships."""
    kept = {n: np.arange(model.spec.layer(n).out, dtype=np.int64) for n in model.spec.droppable_layers()}
    whole = CanoeSlice("-", "full", "-", "-", [], kept, model.base, model.phi, model.spec, encoding=encoding)
    return encode_or_widen(whole)


@dataclass
class CanoeHelper:
    """A peer that answers Canoe tasks from its own model and data."""

    device_id: str
    model: TailoredModel
    x: np.ndarray
    y: np.ndarray
    variants: list[Variant]
    base_version: str
    share_dir: Path | None = None  # where by-reference slices go (a directory the target can read)
    inline_limit: int = INLINE_LIMIT_BYTES
    options: SliceOptions = SliceOptions()
    seed: int = 0
    served: list[dict[str, object]] = field(default_factory=list)

    def answer(self, task: CanoeTask) -> CanoeOffer:
        """An offer carrying the slice (inline or by reference), or an offer with a clear error."""
        rng = np.random.default_rng([self.seed, len(self.served)])
        try:
            classes = check_classes(task.classes, self.model.spec.num_classes)
        except CanoeError as exc:
            return self._error(task, f"unknown_classes: {exc}")
        try:
            options = replace(self.options, variant_id=task.variant_id) if task.variant_id else self.options
            s = extract_slice(self.model, self.x, self.y, classes, self.variants, base_version=self.base_version,
                              helper=self.device_id, request_id=task.request_id, rng=rng, options=options)
        except CanoeError as exc:
            code = str(exc).split(":", 1)[0]
            return self._error(task, str(exc) if code in ("no_data", "bad_request") else f"helper_failed: {exc}")
        blob = encode_or_widen(s)
        digest = sha256_hex(blob)
        self.served.append({"request_id": task.request_id, "classes": classes, "bytes": len(blob),
                            "variant": s.variant_id, "kept": {k: v.tolist() for k, v in s.kept.items()}})
        log.info("canoe helper %s: slice for %s classes %s: %d bytes (%s)", self.device_id, task.target, classes,
                 len(blob), s.variant_id)
        if len(blob) <= self.inline_limit:
            return CanoeOffer(task.request_id, task.target, self.device_id, digest, len(blob),
                              inline_b64=base64.b64encode(blob).decode())
        if self.share_dir is None:
            return self._error(task, f"helper_failed: slice of {len(blob)} bytes exceeds the inline limit "
                                     f"{self.inline_limit} and no share directory is set")
        path = Path(self.share_dir) / f"{task.request_id}-{digest[:16]}.canoe.npz"
        write_atomic(path, blob)
        return CanoeOffer(task.request_id, task.target, self.device_id, digest, len(blob),
                          reference=path.resolve().as_uri())

    def _error(self, task: CanoeTask, error: str) -> CanoeOffer:
        log.warning("canoe helper %s: cannot serve %s: %s", self.device_id, task.request_id, error)
        return CanoeOffer(task.request_id, task.target, self.device_id, error=error[:512])

    def serve(self, link: CanoeLink) -> None:
        """Answer tasks relayed to this device on `link`, and tell the cloud what data it holds. The
        answer runs on the link's thread: give the helper's model its own engine (`model.copy(open_engine(..))`;
        runtime programs are not shared across threads)."""
        def on_task(msg: CanoeMessage) -> None:
            if isinstance(msg.payload, CanoeTask):
                link.publish("offer", self.answer(msg.payload))

        link.subscribe(canoe_topic(link.fleet, self.device_id, "task"), on_task)
        link.publish("meta", self.meta(), retain=True)

    def meta(self) -> CanoeMeta:
        hist = np.bincount(self.y.astype(np.int64), minlength=self.model.spec.num_classes)
        return CanoeMeta(hist.tolist())
