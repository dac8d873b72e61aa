"""One face for both runtimes: a φ training step and a prediction, numpy in and numpy out.

`open_engine(bundle, runtime)` picks the backend. The LiteRT engine imports only ai-edge-litert; the
ExecuTorch engine needs torch (its Python bindings link against it), so it is imported on demand.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np

from edgepatch.protocol.bundle import Bundle
from edgepatch.protocol.manifest import BundleError
from edgepatch.protocol.optim import adam_step

RUNTIMES = ("litert", "executorch")


class PhiStep(Protocol):
    def __call__(self, vid: str, x: np.ndarray, y: np.ndarray, phi: np.ndarray, m: np.ndarray, v: np.ndarray,
                 step: float, lr: float, sliced: Mapping[str, np.ndarray]
                 ) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]: ...


class Engine(Protocol):
    runtime: str
    infer_batch: int

    def phi_step(self, vid: str, x: np.ndarray, y: np.ndarray, phi: np.ndarray, m: np.ndarray, v: np.ndarray,
                 step: float, lr: float, sliced: Mapping[str, np.ndarray]
                 ) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]: ...

    def logits(self, x: np.ndarray, phi: np.ndarray) -> np.ndarray: ...


class LiteRTEngine:
    """Trainable program (train_phi_<vid>, Adam inside the graph) + frozen inference program."""

    runtime = "litert"

    def __init__(self, bundle: Bundle, num_threads: int | None = None) -> None:
        from .backends.litert import LiteRTProgram

        self.trainable = LiteRTProgram(bundle.artifact_bytes(bundle.artifact_of_kind("litert_trainable")),
                                       num_threads=num_threads)
        self.frozen = LiteRTProgram(bundle.artifact_bytes(bundle.artifact_of_kind("litert_infer")),
                                    num_threads=num_threads)
        shape = self.frozen.input_details("infer")["x"]["shape"]
        self.infer_batch = int(shape[0]) if int(shape[0]) > 0 else 0  # 0: any batch

    def phi_step(self, vid: str, x: np.ndarray, y: np.ndarray, phi: np.ndarray, m: np.ndarray, v: np.ndarray,
                 step: float, lr: float, sliced: Mapping[str, np.ndarray]
                 ) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
        out = self.trainable.train_phi(vid, x, y.astype(np.int32), phi, m, v, step, lr, sliced)
        return float(out["loss"]), out["phi"], out["m"], out["v"]

    def logits(self, x: np.ndarray, phi: np.ndarray) -> np.ndarray:
        return self.frozen.infer(x, phi)


class ExecuTorchEngine:
    """Per-variant φ training programs (gradient out, Adam in numpy) + XNNPACK inference program."""

    runtime = "executorch"

    def __init__(self, bundle: Bundle) -> None:
        from .backends.executorch import ExecuTorchInference, ExecuTorchPhiTrainer

        self._bundle = bundle
        self._trainer_cls = ExecuTorchPhiTrainer
        self._trainers: dict[str, object] = {}
        self.adam = bundle.manifest.train.adam
        self.frozen = ExecuTorchInference(bundle.artifact_bytes(bundle.artifact_of_kind("executorch_infer")))
        self.infer_batch = bundle.manifest.train.infer_batch

    def _trainer(self, vid: str) -> object:
        if vid not in self._trainers:
            kind = f"executorch_train_phi:{vid}"
            names = self._bundle.manifest.artifacts_of_kind(kind)
            if not names:
                raise BundleError(f"the bundle has no ExecuTorch training program for variant {vid!r}")
            self._trainers[vid] = self._trainer_cls(self._bundle.artifact_bytes(names[0]))
        return self._trainers[vid]

    def phi_step(self, vid: str, x: np.ndarray, y: np.ndarray, phi: np.ndarray, m: np.ndarray, v: np.ndarray,
                 step: float, lr: float, sliced: Mapping[str, np.ndarray]
                 ) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
        loss, grad = self._trainer(vid).grad(x, y, phi, sliced)  # type: ignore[attr-defined]
        new_phi, m, v = adam_step(phi, grad, m, v, step, self.adam, lr=lr)
        return float(loss), new_phi, m, v

    def logits(self, x: np.ndarray, phi: np.ndarray) -> np.ndarray:
        return self.frozen.infer(x, phi)


def open_engine(bundle: Bundle, runtime: str, num_threads: int | None = None) -> Engine:
    if runtime == "litert":
        return LiteRTEngine(bundle, num_threads)
    if runtime == "executorch":
        return ExecuTorchEngine(bundle)
    raise ValueError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")


def predict_logits(engine: Engine, x: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """Logits for any number of samples: chunks of the program's batch, the last one padded."""
    batch = engine.infer_batch
    if batch == 0 or len(x) == batch:
        return engine.logits(x, phi)
    outs = []
    for start in range(0, len(x), batch):
        chunk = x[start:start + batch]
        n = len(chunk)
        if n < batch:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, axis=0)])
        outs.append(engine.logits(np.ascontiguousarray(chunk), phi)[:n])
    return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)
