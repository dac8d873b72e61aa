"""LiteRT backend: runs the exported .tflite signatures in the bare interpreter (no torch, no TensorFlow).

The programs are stateless (see docs/CONTRACTS.md "LiteRT programs"): parameters and Adam slots go in,
updated values come out, so the device owns all state and recreating an interpreter loses nothing.
XNNPACK is the interpreter's default delegate; `num_threads` sets its thread count.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from . import program_bytes

try:  # ai-edge-litert is the maintained runtime; tflite-runtime 2.14 (numpy < 2) runs the same programs
    from ai_edge_litert.interpreter import Interpreter
except ImportError:  # pragma: no cover - exercised only on devices with the old wheel
    from tflite_runtime.interpreter import Interpreter

FLEX_PREFIX = "Flex"  # TensorFlow ops that would need the (absent) Flex delegate are custom ops "Flex…"


class LiteRTError(ValueError):
    """A program or an input that does not fit what the caller asked for."""


def model_op_names(model: bytes) -> list[str]:
    """Every operator a .tflite uses (all subgraphs): builtin names, or the custom op's own name."""
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError:  # pragma: no cover - tflite-runtime ships no schema module
        return []
    fb = schema.Model.GetRootAsModel(bytearray(model), 0)
    names_by_code = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    ops = []
    for i in range(fb.OperatorCodesLength()):
        code = fb.OperatorCodes(i)
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        custom = code.CustomCode()
        if custom:
            ops.append(custom.decode() if isinstance(custom, bytes) else str(custom))
        else:
            ops.append(names_by_code.get(builtin, f"BUILTIN_{builtin}"))
    return ops


def _sig(name: str) -> str:
    return name.replace(".", "__").replace("-", "_")


class LiteRTProgram:
    """One .tflite (bytes or path) with cached signature runners and validated inputs."""

    def __init__(self, model_bytes_or_path: bytes | str | Path, num_threads: int | None = None) -> None:
        model = program_bytes(model_bytes_or_path, b"TFL3", "LiteRT program", LiteRTError)
        flex = [op for op in model_op_names(model) if op.startswith(FLEX_PREFIX)]
        if flex:
            raise LiteRTError(f"program needs Flex ops {flex}, which this interpreter cannot run")
        try:
            self._interpreter = Interpreter(model_content=model, num_threads=num_threads)
        except ValueError as exc:
            raise LiteRTError(f"not a loadable LiteRT program: {exc}") from exc
        self._signatures: dict[str, Any] = self._interpreter.get_signature_list()
        self._runners: dict[str, Any] = {}
        self._inputs: dict[str, dict[str, dict[str, Any]]] = {}

    def signatures(self) -> dict[str, dict[str, list[str]]]:
        """{signature: {"inputs": [...], "outputs": [...]}}."""
        return {k: {"inputs": list(v["inputs"]), "outputs": list(v["outputs"])} for k, v in self._signatures.items()}

    def has_signature(self, name: str) -> bool:
        return name in self._signatures

    def input_details(self, signature: str) -> dict[str, dict[str, Any]]:
        self._runner(signature)
        return self._inputs[signature]

    def _runner(self, signature: str) -> Any:
        if signature not in self._runners:
            if signature not in self._signatures:
                raise LiteRTError(f"no signature {signature!r}; this program has {sorted(self._signatures)}")
            runner = self._interpreter.get_signature_runner(signature)
            self._runners[signature] = runner
            self._inputs[signature] = runner.get_input_details()
        return self._runners[signature]

    def _validated(self, signature: str, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        details = self._inputs[signature]
        missing = sorted(set(details) - set(inputs))
        extra = sorted(set(inputs) - set(details))
        if missing or extra:
            raise LiteRTError(f"{signature}: missing inputs {missing}, unexpected inputs {extra}")
        out: dict[str, np.ndarray] = {}
        for name, detail in details.items():
            value = np.asarray(inputs[name])
            want = np.dtype(detail["dtype"])
            if value.dtype != want:
                if not np.can_cast(value.dtype, want, casting="same_kind"):
                    raise LiteRTError(f"{signature}: input {name!r} has dtype {value.dtype}, expected {want}")
                value = value.astype(want)
            expected = tuple(int(d) for d in detail["shape_signature"])
            if len(value.shape) != len(expected) or any(e != -1 and e != s for e, s in zip(expected, value.shape, strict=True)):
                shown = tuple("*" if e == -1 else e for e in expected)
                raise LiteRTError(f"{signature}: input {name!r} has shape {value.shape}, expected {shown}")
            out[name] = np.ascontiguousarray(value)
        return out

    def run(self, signature: str, **inputs: Any) -> dict[str, np.ndarray]:
        """Run one signature; inputs by signature name, outputs as {name: array}."""
        runner = self._runner(signature)
        return dict(runner(**self._validated(signature, inputs)))

    # -- the contract's signatures -----------------------------------------------------------------
    def train_phi(self, vid: str, x: np.ndarray, y: np.ndarray, phi: np.ndarray, m: np.ndarray, v: np.ndarray,
                  step: float, lr: float, sliced_params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One Adam step on φ: returns loss, phi, m, v, grad. `sliced_params` keyed by dotted names."""
        inputs: dict[str, Any] = {"x": x, "y": y, "phi": phi, "m": m, "v": v,
                                  "step": np.float32(step), "lr": np.float32(lr)}
        inputs.update({_sig(name): value for name, value in sliced_params.items()})
        return self.run(f"train_phi_{_sig(vid)}", **inputs)

    def train_phi_const(self, x: np.ndarray, y: np.ndarray, phi: np.ndarray, m: np.ndarray, v: np.ndarray,
                        step: float, lr: float) -> dict[str, np.ndarray]:
        """One Adam step on φ of the weights-baked full-variant program (`build_phi_const_tflite`):
        returns loss, phi, m, v, grad; the weights are constants, so XNNPACK packs them once."""
        return self.run("train_phi", x=x, y=y, phi=phi, m=m, v=v, step=np.float32(step), lr=np.float32(lr))

    def train_full(self, vid: str, x: np.ndarray, y: np.ndarray, sliced_base: Mapping[str, np.ndarray]
                   ) -> tuple[float, dict[str, np.ndarray]]:
        """Loss and the gradient of every sliced base parameter, keyed by dotted names."""
        out = self.run(f"train_full_{_sig(vid)}", x=x, y=y, **{_sig(n): p for n, p in sliced_base.items()})
        return float(out["loss"]), {name: out[f"grad__{_sig(name)}"] for name in sliced_base}

    def infer(self, x: np.ndarray, phi: np.ndarray | None = None) -> np.ndarray:
        """Logits from the frozen `infer` signature."""
        inputs: dict[str, Any] = {"x": x}
        if phi is not None:
            inputs["phi"] = phi
        return self.run("infer", **inputs)["logits"]

    def infer_variant(self, vid: str, x: np.ndarray, phi: np.ndarray, sliced_params: Mapping[str, np.ndarray]
                      ) -> np.ndarray:
        """Logits of a variant of the trainable program (weights passed in, not baked)."""
        inputs: dict[str, Any] = {"x": x, "phi": phi}
        inputs.update({_sig(name): value for name, value in sliced_params.items()})
        return self.run(f"infer_{_sig(vid)}", **inputs)["logits"]
