"""One face for both runtimes: numpy in, numpy out, whatever program runs underneath.

An `Engine` has four primitives, each implemented by the LiteRT and the ExecuTorch backend:
- `phi_step`: one Adam step on φ inside a variant (sliced params in, φ and Adam slots out);
- `full_grads`: loss and the gradient of every sliced base weight of a variant (no patch), the
  building block of full-weight training (Canoe's own model, federated rounds);
- `variant_logits`: logits of a variant with its weights and φ passed in (one training-size batch);
- `logits`: logits of the frozen inference program (W, Θ, θ̄ baked; φ in).
Everything else is written once on top of them, for both runtimes: `predict_logits` and
`predict_variant` (any number of samples through a fixed-batch program), `sgd_step` (full-weight
training of a variant) and `taylor_importance` (per-filter Taylor scores for Canoe).

`open_engine(bundle, runtime)` picks the backend. The LiteRT engine imports only ai-edge-litert; the
ExecuTorch engine needs torch (its Python bindings link against it), so it is imported on demand.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, MutableMapping
from functools import cached_property
from typing import Any, Protocol

import numpy as np

from edgepatch.protocol.bundle import Bundle
from edgepatch.protocol.manifest import BundleError
from edgepatch.protocol.optim import adam_step

RUNTIMES = ("litert", "executorch")


class Engine(Protocol):
    runtime: str
    train_batch: int  # rows of every phi_step / full_grads / variant_logits call
    infer_batch: int  # rows of the frozen program's `logits` call (0: any number)
    num_classes: int

    def phi_step(self, vid: str, x: np.ndarray, y: np.ndarray, phi: np.ndarray, m: np.ndarray, v: np.ndarray,
                 step: float, lr: float, sliced: Mapping[str, np.ndarray]
                 ) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]: ...

    def full_grads(self, vid: str, x: np.ndarray, y: np.ndarray, sliced_base: Mapping[str, np.ndarray]
                   ) -> tuple[float, dict[str, np.ndarray]]: ...

    def variant_logits(self, vid: str, x: np.ndarray, phi: np.ndarray, sliced: Mapping[str, np.ndarray]
                       ) -> np.ndarray: ...

    def logits(self, x: np.ndarray, phi: np.ndarray) -> np.ndarray: ...


class LiteRTEngine:
    """One trainable program (train_phi_/train_full_/infer_<vid>, Adam inside the graph) + the frozen one."""

    runtime = "litert"

    def __init__(self, bundle: Bundle, num_threads: int | None = None) -> None:
        from .backends.litert import LiteRTProgram

        self._bundle, self._num_threads = bundle, num_threads
        self.trainable = LiteRTProgram(bundle.artifact_bytes(bundle.artifact_of_kind("litert_trainable")),
                                       num_threads=num_threads)
        self.infer_batch = bundle.manifest.train.infer_batch
        self.train_batch = bundle.manifest.train.batch
        self.num_classes = bundle.model_spec.num_classes
        self._full_id = next((r.id for r in bundle.manifest.variants if r.variant.is_full(bundle.model_spec)), None)

    @cached_property
    def frozen(self) -> Any:
        """The frozen inference program, loaded on first use (Canoe and federated rounds never need it)."""
        from .backends.litert import LiteRTProgram

        return LiteRTProgram(self._bundle.artifact_bytes(self._bundle.artifact_of_kind("litert_infer")),
                             num_threads=self._num_threads)

    @cached_property
    def phi_const(self) -> tuple[Any, dict[str, np.ndarray]] | None:
        """(the weights-baked φ program of the full variant, the weights it holds), or None: the bundle has
        none (exported before it existed), or it failed its parity check at load. Loaded on first use."""
        from .phi_const import load_phi_const

        return load_phi_const(self._bundle, self.trainable, self._full_id, self._num_threads)

    def phi_step(self, vid: str, x: np.ndarray, y: np.ndarray, phi: np.ndarray, m: np.ndarray, v: np.ndarray,
                 step: float, lr: float, sliced: Mapping[str, np.ndarray]
                 ) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
        # The baked program is XNNPACK's fast path (weights packed once), valid only for the weights it holds:
        # any other weights (a caller's own copy) go through the trainable program, which takes them as inputs.
        if vid == self._full_id and self.phi_const is not None and _same(sliced, self.phi_const[1]):
            out = self.phi_const[0].train_phi_const(x, _labels(y, np.int32), phi, m, v, step, lr)
        else:
            out = self.trainable.train_phi(vid, x, _labels(y, np.int32), phi, m, v, step, lr, sliced)
        return float(out["loss"]), out["phi"], out["m"], out["v"]

    def full_grads(self, vid: str, x: np.ndarray, y: np.ndarray, sliced_base: Mapping[str, np.ndarray]
                   ) -> tuple[float, dict[str, np.ndarray]]:
        return self.trainable.train_full(vid, x, _labels(y, np.int32), sliced_base)

    def variant_logits(self, vid: str, x: np.ndarray, phi: np.ndarray, sliced: Mapping[str, np.ndarray]
                       ) -> np.ndarray:
        return self.trainable.infer_variant(vid, x, phi, sliced)

    def logits(self, x: np.ndarray, phi: np.ndarray) -> np.ndarray:
        return self.frozen.infer(x, phi)


class ExecuTorchEngine:
    """Per-variant training programs (gradients out; Adam/SGD in numpy) + the XNNPACK inference program.

    There is no ExecuTorch program for a variant's inference with its weights as inputs: `variant_logits`
    reads the logits output of the variant's `train_phi` program (a forward and a backward pass, so it
    costs about one φ step per batch rather than one inference)."""

    runtime = "executorch"

    def __init__(self, bundle: Bundle) -> None:
        from .backends.executorch import ExecuTorchFullTrainer, ExecuTorchInference, ExecuTorchPhiTrainer

        self._bundle = bundle
        self._kinds: dict[str, Callable[[bytes], Any]] = {"executorch_train_phi": ExecuTorchPhiTrainer,
                                                          "executorch_train_full": ExecuTorchFullTrainer}
        self._programs: dict[tuple[str, str], Any] = {}
        self._inference = ExecuTorchInference
        self.adam = bundle.manifest.train.adam
        self.infer_batch = bundle.manifest.train.infer_batch
        self.train_batch = bundle.manifest.train.batch
        self.num_classes = bundle.model_spec.num_classes

    @cached_property
    def frozen(self) -> Any:
        """The XNNPACK inference program, loaded on first use (Canoe and federated rounds never need it)."""
        return self._inference(self._bundle.artifact_bytes(self._bundle.artifact_of_kind("executorch_infer")))

    def _program(self, kind: str, vid: str) -> Any:
        """The variant's program of `kind`, loaded on first use (a device may never run some variants)."""
        if (kind, vid) not in self._programs:
            names = self._bundle.manifest.artifacts_of_kind(f"{kind}:{vid}")
            if not names:
                raise BundleError(f"the bundle has no ExecuTorch program {kind!r} for variant {vid!r}")
            self._programs[(kind, vid)] = self._kinds[kind](self._bundle.artifact_bytes(names[0]))
        return self._programs[(kind, vid)]

    def phi_step(self, vid: str, x: np.ndarray, y: np.ndarray, phi: np.ndarray, m: np.ndarray, v: np.ndarray,
                 step: float, lr: float, sliced: Mapping[str, np.ndarray]
                 ) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
        loss, grad = self._program("executorch_train_phi", vid).grad(x, _labels(y, np.int64), phi, sliced)
        new_phi, m, v = adam_step(phi, grad, m, v, step, self.adam, lr=lr)
        return float(loss), new_phi, m, v

    def full_grads(self, vid: str, x: np.ndarray, y: np.ndarray, sliced_base: Mapping[str, np.ndarray]
                   ) -> tuple[float, dict[str, np.ndarray]]:
        return self._program("executorch_train_full", vid).grads(x, _labels(y, np.int64), sliced_base)

    def variant_logits(self, vid: str, x: np.ndarray, phi: np.ndarray, sliced: Mapping[str, np.ndarray]
                       ) -> np.ndarray:
        return self._program("executorch_train_phi", vid).logits(x, phi, sliced)

    def logits(self, x: np.ndarray, phi: np.ndarray) -> np.ndarray:
        return self.frozen.infer(x, phi)


def open_engine(bundle: Bundle, runtime: str, num_threads: int | None = None) -> Engine:
    if runtime == "litert":
        return LiteRTEngine(bundle, num_threads)
    if runtime == "executorch":
        return ExecuTorchEngine(bundle)
    raise ValueError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")


def _same(given: Mapping[str, np.ndarray], held: Mapping[str, np.ndarray]) -> bool:
    """Whether `given` are exactly the weights `held` (identity first: the trainer passes the bundle's own)."""
    return given.keys() == held.keys() and all(
        given[n] is held[n] or np.array_equal(given[n], held[n]) for n in held)


def _labels(y: np.ndarray, dtype: type) -> np.ndarray:
    y = np.asarray(y)
    if y.dtype.kind not in "iu":
        raise ValueError(f"labels y must be integers, got dtype {y.dtype}")
    return y.astype(dtype, copy=False)


# -- written once for every runtime ---------------------------------------------------------------

def padded_batches(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch: int, width: int
                   ) -> np.ndarray:
    """`run` over any number of samples when it takes exactly `batch` rows (0: any): chunks of `batch`,
    the last one padded with copies of its last sample (real samples keep every program's input
    checks happy; per-sample layers make the padding invisible to the rows that are kept)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if batch == 0 or len(x) == batch:
        return run(x)
    outs = []
    for start in range(0, len(x), batch):
        chunk = x[start:start + batch]
        n = len(chunk)
        if n < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, axis=0)])
        outs.append(np.asarray(run(chunk))[:n])
    return np.concatenate(outs) if outs else np.zeros((0, width), np.float32)


def predict_logits(engine: Engine, x: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """Logits of the frozen program for any number of samples."""
    return padded_batches(lambda chunk: engine.logits(chunk, phi), x, engine.infer_batch, engine.num_classes)


def predict_variant(engine: Engine, vid: str, x: np.ndarray, phi: np.ndarray, sliced: Mapping[str, np.ndarray]
                    ) -> np.ndarray:
    """Logits of variant `vid` with the given (sliced) weights and φ, for any number of samples."""
    return padded_batches(lambda chunk: engine.variant_logits(vid, chunk, phi, sliced), x, engine.train_batch,
                          engine.num_classes)


def sgd_step(engine: Engine, vid: str, x: np.ndarray, y: np.ndarray, weights: MutableMapping[str, np.ndarray],
             lr: float) -> float:
    """One full-weight SGD step of variant `vid` on `weights` (its sliced base params, updated in place).
    A non-finite loss raises before anything changes."""
    loss, grads = engine.full_grads(vid, x, y, weights)
    if not np.isfinite(loss):
        raise FloatingPointError(f"full-weight step of {vid}: loss {loss}; not applying the update")
    for name, grad in grads.items():
        weights[name] = (weights[name] - lr * grad).astype(np.float32)
    return float(loss)


def taylor_importance(engine: Engine, vid: str, weights: Mapping[str, np.ndarray], layers: Iterable[str],
                      batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """First-order Taylor score of every output filter of `layers`: Σ_batches Σ_{weight, bias of filter j}
    |w · ∂L/∂w|, from the runtime's full-weight gradients of variant `vid` (whose sliced weights are
    `weights`). We score weights, not activations (|a · ∂L/∂a|): neither runtime's programs expose
    activation gradients, and for a conv filter both agree to first order on what removing it costs."""
    layers = list(layers)
    scores = {name: np.zeros(len(weights[f"{name}.weight"]), np.float64) for name in layers}
    for x, y in batches:
        _, grads = engine.full_grads(vid, x, y, weights)
        for name in layers:
            for part in ("weight", "bias"):
                key = f"{name}.{part}"
                taylor = np.abs(weights[key] * grads[key])
                scores[name] += taylor.reshape(taylor.shape[0], -1).sum(axis=1)
    return {name: s.astype(np.float32) for name, s in scores.items()}
