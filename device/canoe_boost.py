"""Canoe boosting at the target: the device's own tailored model + helper slices, weighted by SAMME.

Members (both run on the device's `Engine`, LiteRT or ExecuTorch alike):
- `TailoredModel`: the device's own model — base W fine-tuned locally with full-weight steps (the
  runtime's `train_full` program of the full variant gives the gradients, numpy SGD applies them) plus
  the device's φ. Inference runs the full variant with the weights passed in (`predict_variant`).
- `SliceModel`: a helper's significant sub-network. Its per-layer widths equal a bundle variant's, so it
  runs as that variant on the target, with no new export; the patch's θ̄/Θ come from the target's own
  bundle, gathered with the slice's kept indices.

Weights: multi-class AdaBoost SAMME (Zhu et al. 2009) over the fixed members in order (own model first,
then helpers by arrival), computed on the target's recent labelled window: sample weights start uniform;
member m's weighted error e_m gives α_m = log((1 - e_m) / e_m) + log(K - 1), and the samples it got wrong
are up-weighted by exp(α_m). So a helper earns weight by being right where the own model is wrong (the
drifted classes). These α_m are what we report, and a helper with α_m ≤ 0 is retired.

Prediction (our refinement): plain SAMME votes argmax_k Σ α_m [h_m(x) = k]; with the usual two or three
members that degenerates to "whoever has the largest α decides", so a helper that is right exactly on
the new classes never changes a prediction while the own model's α is larger (we measured it flipping the
whole ensemble between the two members from refit to refit). We therefore vote with class-conditional
SAMME weights: α_{m,k} is the same formula with e_{m,k} = the (SAMME-reweighted, Laplace-smoothed) error of
member m on the window samples where it predicts k. The own model, which calls every new-class sample
"some old class", gets a low weight exactly for those predictions; a helper gets a high weight for
predicting the new classes. Members never predicting k on the window use their overall α. Ties are
broken by the own model's logits. Weights are recomputed whenever the target refits (it keeps learning);
a helper is also retired when the ensemble without it is at least as accurate on the window for
`patience` consecutive refits, or at once when its α is below `min_alpha` (about chance).
Three further refinements (issue 13, measured in benchmarks/canoe.py, docs/DESIGN.md §11): the sample
weights start class-balanced (`balanced`: the few samples of a new class count as much as an old class,
as in the post-drift mix the target must serve); a slice votes only for the classes it was cut for
(`expert`); and members vote softly, argmax_k Σ_m α_{m,k} · p_m(k | x) (`soft`), so a member unsure of a
sample lends it little weight. Window accuracies for retirement are class-balanced too.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from edgepatch.protocol.bundle import Bundle
from edgepatch.protocol.canoe import CanoeSlice
from edgepatch.protocol.model_spec import ModelSpec, PatchSpec, param_infos
from edgepatch.protocol.variants import KeptSets, Variant, slice_params

from .engine import Engine, open_engine, predict_variant, sgd_step

log = logging.getLogger("edgepatch.device.canoe")


def shared_slice(shared: Mapping[str, np.ndarray], spec: ModelSpec, patch: PatchSpec, kept: KeptSets
                 ) -> dict[str, np.ndarray]:
    """θ̄ and Θ of the target's bundle gathered at a slice's kept filters."""
    infos = param_infos(spec, patch)
    return slice_params(shared, {n: infos[n] for n in shared}, kept)


@dataclass
class TailoredModel:
    """A device's own model: full-variant base W trained by runtime gradients + numpy SGD, and its φ."""

    engine: Engine
    spec: ModelSpec
    patch: PatchSpec
    base: dict[str, np.ndarray]
    shared: dict[str, np.ndarray]
    phi: np.ndarray
    full_vid: str
    lr: float = 0.05
    steps: int = 0

    @property
    def batch(self) -> int:
        """Rows of every training step (the runtime programs' fixed batch)."""
        return self.engine.train_batch

    def train_step(self, x: np.ndarray, y: np.ndarray) -> float:
        try:
            loss = sgd_step(self.engine, self.full_vid, x, y, self.base, self.lr)
        except FloatingPointError as exc:
            raise FloatingPointError(f"step {self.steps}: {exc}") from None
        self.steps += 1
        return loss

    def gradients(self, x: np.ndarray, y: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        return self.engine.full_grads(self.full_vid, x, y, self.base)

    def logits(self, x: np.ndarray) -> np.ndarray:
        return predict_variant(self.engine, self.full_vid, x, self.phi, {**self.base, **self.shared})

    def copy(self, engine: Engine | None = None) -> TailoredModel:
        """An independent copy of the weights; pass a fresh `engine` to use it from another thread."""
        return TailoredModel(engine or self.engine, self.spec, self.patch, {k: v.copy() for k, v in self.base.items()},
                             self.shared, self.phi.copy(), self.full_vid, self.lr, self.steps)


@dataclass
class SliceModel:
    """A helper's slice, run on the target as the variant with the same widths."""

    name: str
    engine: Engine
    variant_id: str
    params: dict[str, np.ndarray]
    phi: np.ndarray
    nbytes: int = 0
    classes: tuple[int, ...] = ()  # the classes it was cut for (() = all): an expert votes only for these
    base_names: tuple[str, ...] = ()  # the slice's own (trainable) weights among `params`

    @classmethod
    def from_slice(cls, s: CanoeSlice, engine: Engine, spec: ModelSpec, patch: PatchSpec,
                   shared: Mapping[str, np.ndarray], nbytes: int = 0) -> SliceModel:
        params = {**s.base, **shared_slice(shared, spec, patch, s.kept)}
        return cls(f"{s.helper}/{s.request_id}", engine, s.variant_id, params, s.phi, nbytes, tuple(s.classes),
                   tuple(sorted(s.base)))

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> float:
        """One full-weight SGD step of the slice's own weights (its variant's program) on the target's data."""
        base = {k: self.params[k] for k in self.base_names}
        loss = sgd_step(self.engine, self.variant_id, x, y, base, lr)
        self.params.update(base)
        return loss

    def logits(self, x: np.ndarray) -> np.ndarray:
        return predict_variant(self.engine, self.variant_id, x, self.phi, self.params)


def samme_weights(predictions: list[np.ndarray], y: np.ndarray, num_classes: int, eps: float = 1e-3
                  ) -> list[float]:
    """SAMME α of each member in order, from its predicted labels on the window (y)."""
    return samme_fit(predictions, y, num_classes, eps)[0]


def samme_fit(predictions: list[np.ndarray], y: np.ndarray, num_classes: int, eps: float = 1e-3,
              smoothing: float = 1.0, balanced: bool = False, boosted_classes: bool = True
              ) -> tuple[list[float], np.ndarray]:
    """(α per member, class-conditional α per member × predicted label) on the window. `balanced` starts
    from equal total weight per class present instead of per sample; without `boosted_classes` the
    class-conditional errors use those starting weights, not SAMME's reweighted ones (see the module
    docstring)."""
    members = len(predictions)
    per_class = np.zeros((members, num_classes))
    if not len(y):
        return [1.0] + [0.0] * (members - 1), per_class
    w = 1.0 / np.bincount(y, minlength=num_classes)[y] if balanced else np.ones(len(y))
    w = start = w / w.sum()
    alphas = []
    log_k = np.log(num_classes - 1)
    for m, pred in enumerate(predictions):
        wrong = pred != y
        err = float(np.clip(w[wrong].sum() / w.sum(), eps, 1 - eps))
        alpha = float(np.log((1 - err) / err) + log_k)
        alphas.append(alpha)
        prior = smoothing / len(y)  # Laplace: `smoothing` pseudo-samples at the member's overall error
        cw = w if boosted_classes else start
        for k in range(num_classes):
            says_k = pred == k
            if not says_k.any():
                per_class[m, k] = alpha
                continue
            e_k = (cw[says_k & wrong].sum() + prior * err) / (cw[says_k].sum() + prior)
            e_k = float(np.clip(e_k, eps, 1 - eps))
            per_class[m, k] = np.log((1 - e_k) / e_k) + log_k
        if alpha > 0:
            w = w * np.exp(alpha * wrong)
            w /= w.sum()
    return alphas, per_class


def vote(predictions: list[np.ndarray], alphas: list[float] | np.ndarray, num_classes: int,
         tie_break: np.ndarray, probs: list[np.ndarray] | None = None) -> np.ndarray:
    """argmax_k Σ_m weight_m(h_m(x)) [h_m(x) = k]; `alphas` per member (plain SAMME) or a members ×
    classes array (class-conditional). Members with overall weight ≤ 0 do not vote. With `probs` (each
    member's softmax), the vote is soft: argmax_k Σ_m weight_m(k) · p_m(k | x)."""
    scores = 1e-6 * _softmax(tie_break)
    table = np.asarray(alphas, dtype=np.float64)
    for m, pred in enumerate(predictions):
        if probs is not None:
            row = table[m] if table.ndim == 2 else np.full(num_classes, table[m])
            scores += np.where(row > 0, row, 0.0)[None, :] * probs[m]
            continue
        weight = table[m][pred] if table.ndim == 2 else np.full(len(pred), table[m])
        rows = np.arange(len(pred))
        scores[rows, pred] += np.where(weight > 0, weight, 0.0)
    return scores.argmax(axis=1)


def balanced_accuracy(pred: np.ndarray, y: np.ndarray) -> float:
    """Mean over the classes present in y of the accuracy on that class."""
    return float(np.mean([(pred[y == c] == c).mean() for c in np.unique(y)])) if len(y) else float("nan")


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@dataclass
class CanoeEnsemble:
    """{own model, helper slices} with SAMME weights refit on the recent labelled window."""

    own: TailoredModel
    num_classes: int
    patience: int = 3
    balanced: bool = True  # class-balanced SAMME sample weights on the window
    expert: bool = True  # a helper votes only for the classes its slice was cut for
    boosted_classes: bool = True  # class-conditional weights from SAMME's reweighted errors (else: start weights)
    soft: bool = True  # members vote with their softmax (weight × probability), not their argmax
    min_alpha: float = 0.5  # a helper whose SAMME α is below this (≈ chance: e ≳ 0.85 with 10 classes) retires
    helpers: list[SliceModel] = field(default_factory=list)
    alphas: list[float] = field(default_factory=lambda: [1.0])
    class_alphas: np.ndarray | None = None  # members × classes, the vote's weights
    retired: list[str] = field(default_factory=list)
    _useless: dict[str, int] = field(default_factory=dict)

    def add(self, helper: SliceModel) -> None:
        self.helpers.append(helper)
        self.alphas.append(0.0)
        log.info("canoe: helper slice %s joined the ensemble (%d bytes)", helper.name, helper.nbytes)

    def weights(self) -> dict[str, float]:
        names = ["own"] + [h.name for h in self.helpers]
        return {n: round(a, 4) for n, a in zip(names, self.alphas, strict=True)}

    def _member_predictions(self, x: np.ndarray) -> tuple[list[np.ndarray], np.ndarray, list[np.ndarray] | None]:
        own_logits = self.own.logits(x)
        logits = [own_logits] + [h.logits(x) for h in self.helpers]
        probs = [_softmax(z) for z in logits] if self.soft else None
        return [z.argmax(axis=1) for z in logits], own_logits, probs

    def _score(self, pred: np.ndarray, y: np.ndarray) -> float:
        return balanced_accuracy(pred, y) if self.balanced else float((pred == y).mean())

    def refit(self, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        """Recompute α on the window; retire helpers with α ≤ 0 or that stopped helping."""
        if not self.helpers or not len(y):
            self.alphas, self.class_alphas = [1.0], None
            return self.weights()
        preds, own_logits, probs = self._member_predictions(x)
        self.alphas, self.class_alphas = samme_fit(preds, y, self.num_classes, balanced=self.balanced,
                                                   boosted_classes=self.boosted_classes)
        if self.expert:
            for m, helper in enumerate(self.helpers, start=1):
                if helper.classes:
                    others = np.setdiff1d(np.arange(self.num_classes), helper.classes)
                    self.class_alphas[m, others] = 0.0
        with_all = self._score(vote(preds, self.class_alphas, self.num_classes, own_logits, probs), y)
        keep: list[int] = []
        for i, helper in enumerate(self.helpers, start=1):
            rest = [j for j in range(len(preds)) if j != i]
            without = self._score(vote([preds[j] for j in rest], self.class_alphas[rest], self.num_classes,
                                       own_logits, None if probs is None else [probs[j] for j in rest]), y)
            self._useless[helper.name] = self._useless.get(helper.name, 0) + 1 if without >= with_all else 0
            if self.alphas[i] < self.min_alpha or self._useless[helper.name] >= self.patience:
                log.info("canoe: retiring helper %s (alpha %.3f, window acc with %.3f / without %.3f)",
                         helper.name, self.alphas[i], with_all, without)
                self.retired.append(helper.name)
            else:
                keep.append(i)
        if len(keep) != len(self.helpers):
            rows = [0] + keep
            self.helpers = [self.helpers[i - 1] for i in keep]
            self.alphas = [self.alphas[i] for i in rows]
            self.class_alphas = self.class_alphas[rows]
        return self.weights()

    def predict(self, x: np.ndarray) -> np.ndarray:
        preds, own_logits, probs = self._member_predictions(x)
        if not self.helpers or self.class_alphas is None:
            return preds[0]
        return vote(preds, self.class_alphas, self.num_classes, own_logits, probs)


def tailored_from_bundle(bundle: Bundle, engine: Engine | None = None, lr: float = 0.05,
                         phi: np.ndarray | None = None, runtime: str = "litert") -> TailoredModel:
    """A device's own model starting from the bundle's base W (and φ = 0 unless given), trained and run
    on `engine` (default: a new engine of `runtime` on this bundle)."""
    manifest = bundle.manifest
    spec, patch = manifest.model, manifest.patch
    full = next((r.id for r in manifest.variants if r.variant.is_full(spec)), None)
    if full is None:
        raise ValueError(f"bundle {bundle.version[:12]} has no full variant to fine-tune")
    return TailoredModel(engine or open_engine(bundle, runtime), spec, patch,
                         {k: v.copy() for k, v in bundle.base_params().items()}, bundle.shared_params(),
                         np.zeros(patch.k, np.float32) if phi is None else phi, full, lr)


def bundle_variants(bundle: Bundle) -> list[Variant]:
    return [row.variant for row in bundle.manifest.variants]
