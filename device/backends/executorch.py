"""ExecuTorch runners for the programs of export/executorch_builder.py: numpy in, numpy out.

The ExecuTorch Python bindings link against torch, so this backend brings torch to the device; both
are imported on first use so that importing this module stays cheap and the LiteRT path never pays.

Training programs keep φ (or the sliced base weights) as program parameters. The runtime exposes a
parameter's memory only as an un-cloned output of a run, so the first call runs once to find it; from
then on values are written into that memory before each run and gradients read back after it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgepatch.protocol.optim import AdamConfig, adam_step

from . import program_bytes

METHOD = "forward"
_GRADIENTS_INDEX = "__et_training_gradients_index_forward"
_PARAMETERS_INDEX = "__et_training_parameters_index_forward"
_FQN = "__et_training_fqn_forward"
_INPUT_NAMES = "edgepatch_param_input_names"  # written by export/executorch_builder.py


class ExecuTorchRunError(ValueError):
    """Inputs that do not fit the program, or a program that is not the expected kind."""


def _runtime() -> Any:
    try:
        import torch  # noqa: F401  (the bindings need torch's libraries loaded first)
        from executorch.extension.pybindings import portable_lib
    except ImportError as exc:
        raise ImportError(
            "the ExecuTorch backend needs the executorch runtime and torch: pip install edgepatch[executorch]"
        ) from exc
    return portable_lib


def _program_bytes(pte: bytes | str | Path) -> bytes:
    return program_bytes(pte, b"ET12", "ExecuTorch program (.pte)", ExecuTorchRunError)


class _Program:
    """A loaded .pte with its input shapes, for input checks that name the problem."""

    def __init__(self, pte: bytes | str | Path) -> None:
        self._lib = _runtime()
        # The runtime reads from this buffer while it runs: keep it alive as long as the module.
        self._data = _program_bytes(pte)
        self.module = self._lib._load_for_executorch_from_buffer(self._data)
        meta = self.module.method_meta(METHOD)
        self.input_shapes = [tuple(meta.input_tensor_meta(i).sizes()) for i in range(meta.num_inputs())]
        self.method_names = set(self.module.method_names())

    def tensor(self, value: np.ndarray, index: int, name: str, dtype: type = np.float32) -> Any:
        import torch

        array: np.ndarray = np.ascontiguousarray(np.asarray(value), dtype=dtype)
        expected = self.input_shapes[index]
        if tuple(array.shape) != expected:
            raise ExecuTorchRunError(f"input {name!r} has shape {tuple(array.shape)}, the program expects {expected}")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise ExecuTorchRunError(f"input {name!r} contains NaN or infinity")
        return torch.from_numpy(array)

    def run(self, inputs: Sequence[Any], clone: bool = True) -> list[Any]:
        return list(self.module.run_method(METHOD, tuple(inputs), clone_outputs=clone))


class ExecuTorchInference:
    """`infer.pte` (or a variant's baked inference program): x f32[B, …], phi f32[k] → logits."""

    def __init__(self, pte: bytes | str | Path) -> None:
        self.program = _Program(pte)
        if len(self.program.input_shapes) != 2:
            raise ExecuTorchRunError(f"an inference program takes (x, phi); this one has "
                                     f"{len(self.program.input_shapes)} inputs")
        self.batch = self.program.input_shapes[0][0]
        self.k = self.program.input_shapes[1][0]

    def infer(self, x: np.ndarray, phi: np.ndarray) -> np.ndarray:
        # one copy of the logits out of the runtime's memory (clone_outputs would add a second)
        out = self.program.run([self.program.tensor(x, 0, "x"), self.program.tensor(phi, 1, "phi")], clone=False)
        return out[0].numpy().copy()


class _TrainingProgram:
    """A joint forward-backward program; `trainable` are its parameter names, checked at load."""

    def __init__(self, pte: bytes | str | Path) -> None:
        self.program = _Program(pte)
        if _FQN not in self.program.method_names:
            raise ExecuTorchRunError("not an ExecuTorch training program (no gradient metadata methods)")
        module = self.program.module
        self.grad_start = int(module.run_method(_GRADIENTS_INDEX, ())[0])
        self.param_start = int(module.run_method(_PARAMETERS_INDEX, ())[0])
        self.trainable: list[str] = [str(n) for n in module.run_method(_FQN, ())]
        self._param_memory: list[Any] | None = None
        self.last_logits: np.ndarray | None = None
        self.batch = self.program.input_shapes[0][0]

    def _run(self, inputs: list[Any], values: Sequence[np.ndarray]) -> tuple[float, list[np.ndarray]]:
        """Write `values` into the parameters (in `trainable` order), run, return loss and gradients;
        the batch's logits are kept in `last_logits`."""
        import torch

        if self._param_memory is None:  # the parameters' memory is visible only as outputs of a run
            self._param_memory = self.program.run(inputs, clone=False)[self.param_start:]
        if len(values) != len(self.trainable):
            raise ExecuTorchRunError(f"the program has {len(self.trainable)} parameters, got {len(values)} values")
        for memory, value, name in zip(self._param_memory, values, self.trainable, strict=True):
            array = np.asarray(value, dtype=np.float32)
            if tuple(array.shape) != tuple(memory.shape):
                raise ExecuTorchRunError(f"parameter {name!r} has shape {array.shape}, the program expects "
                                         f"{tuple(memory.shape)}")
            memory.copy_(torch.from_numpy(np.ascontiguousarray(array)))
        out = self.program.run(inputs, clone=False)
        loss = float(out[0].item())
        self.last_logits = out[1].numpy().copy()  # the batch's logits (second output), for accuracy
        grads = [g.numpy().copy() for g in out[self.grad_start:self.param_start]]
        return loss, grads

    def _xy(self, x: np.ndarray, y: np.ndarray) -> list[Any]:
        y = np.asarray(y)
        if y.dtype.kind not in "iu":
            raise ExecuTorchRunError(f"labels y must be integers, got dtype {y.dtype}")
        if y.size and (y.min() < 0):
            raise ExecuTorchRunError("labels y must be >= 0")
        return [self.program.tensor(x, 0, "x"), self.program.tensor(y, 1, "y", np.int64)]


class ExecuTorchPhiTrainer(_TrainingProgram):
    """`train_phi_<vid>.pte`: φ is the only parameter; sliced params (all roles) are inputs."""

    def __init__(self, pte: bytes | str | Path, param_names: Sequence[str] | None = None,
                 adam: AdamConfig | None = None) -> None:
        super().__init__(pte)
        if self.trainable != ["phi"]:
            raise ExecuTorchRunError(f"a phi training program must train exactly ['phi'], this one trains "
                                     f"{self.trainable}")
        stored = ([str(n) for n in self.program.module.run_method(_INPUT_NAMES, ())]
                  if _INPUT_NAMES in self.program.method_names else None)
        if param_names is not None and stored is not None and list(param_names) != stored:
            raise ExecuTorchRunError(f"param_names {list(param_names)} differ from the program's inputs {stored}")
        self.param_names = list(param_names) if param_names is not None else stored
        self.adam = adam or AdamConfig()
        self.k = 0

    def _param_inputs(self, sliced: Mapping[str, np.ndarray] | Sequence[np.ndarray]) -> list[Any]:
        count = len(self.program.input_shapes) - 2
        if isinstance(sliced, Mapping):
            names = self.param_names or list(sliced)  # old programs without names: the dict's order
            missing = [n for n in names if n not in sliced]
            if missing:
                raise ExecuTorchRunError(f"sliced params miss {missing}")
            values = [sliced[n] for n in names]
        else:
            names, values = [f"param{i}" for i in range(len(sliced))], list(sliced)
        if len(values) != count:
            raise ExecuTorchRunError(f"the program takes {count} sliced params, got {len(values)}")
        return [self.program.tensor(v, i + 2, n) for i, (n, v) in enumerate(zip(names, values, strict=True))]

    def grad(self, x: np.ndarray, y: np.ndarray, phi: np.ndarray,
             sliced_params: Mapping[str, np.ndarray] | Sequence[np.ndarray]) -> tuple[float, np.ndarray]:
        """Loss and ∂loss/∂φ for one batch. `sliced_params` in `param_infos(variant_spec, patch)` order."""
        phi = np.asarray(phi, dtype=np.float32)
        if phi.ndim != 1 or not np.isfinite(phi).all():
            raise ExecuTorchRunError(f"phi must be a finite 1-D vector, got shape {phi.shape}")
        loss, grads = self._run([*self._xy(x, y), *self._param_inputs(sliced_params)], [phi])
        return loss, grads[0]

    def logits(self, x: np.ndarray, phi: np.ndarray,
               sliced_params: Mapping[str, np.ndarray] | Sequence[np.ndarray]) -> np.ndarray:
        """The variant's logits for one batch (the program's second output). The program also runs its
        backward pass, on placeholder labels 0; the gradient is dropped."""
        self.grad(x, np.zeros(self.batch, np.int64), phi, sliced_params)
        return np.asarray(self.last_logits)

    def step(self, x: np.ndarray, y: np.ndarray, phi: np.ndarray, m: np.ndarray, v: np.ndarray, step: float,
             sliced_params: Mapping[str, np.ndarray] | Sequence[np.ndarray], lr: float | None = None
             ) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
        """One Adam step on φ (protocol.optim.adam_step): returns loss, φ, m, v."""
        loss, grad = self.grad(x, y, phi, sliced_params)
        new_phi, m, v = adam_step(np.asarray(phi, np.float32), grad, m, v, step, self.adam, lr=lr)
        return loss, new_phi, m, v


class ExecuTorchFullTrainer(_TrainingProgram):
    """`train_full_<vid>.pte`: the sliced base params are the program's parameters."""

    def __init__(self, pte: bytes | str | Path) -> None:
        super().__init__(pte)
        # Program names use '__' for '.'; parameter names never contain '__' themselves.
        self.param_names = [n.replace("__", ".") for n in self.trainable]

    def grads(self, x: np.ndarray, y: np.ndarray, sliced_base: Mapping[str, np.ndarray]
              ) -> tuple[float, dict[str, np.ndarray]]:
        """Loss and gradient per sliced base param (sliced shapes) with `sliced_base` as weights."""
        missing = [n for n in self.param_names if n not in sliced_base]
        if missing:
            raise ExecuTorchRunError(f"sliced base params miss {missing}")
        loss, grads = self._run(self._xy(x, y), [sliced_base[n] for n in self.param_names])
        return loss, dict(zip(self.param_names, grads, strict=True))
