"""The weights-baked φ step runs the batch in chunks, one after another: the same Adam step as the torch
reference (uneven last chunk included), and the converter really emits the chunks in sequence (the
speed-up, benchmarks/step_vs_torch.py, depends on it: with every chunk's forward first nothing is gained)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from edgepatch.device.backends.litert import LiteRTProgram
from edgepatch.export.frozen import build_frozen
from edgepatch.export.reference_models import default_patch, mnist_cnn
from edgepatch.export.tflite_builder import build_inference_tflite, build_phi_const_tflite
from edgepatch.protocol.model_spec import SpecError
from edgepatch.protocol.weight_layout import write_weights

sys.path.insert(0, str(Path(__file__).parent))
from parity_checks import check_phi_const_step, dag_probe, live_params  # noqa: E402

BATCH, CHUNK = 7, 3  # chunks of 3, 3 and 1 samples
CONV_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "TRANSPOSE_CONV")


def _op_sequence(model: bytes) -> list[str]:
    """The builtin operators of the (only) subgraph in execution order."""
    from ai_edge_litert import schema_py_generated as schema

    fb = schema.Model.GetRootAsModel(bytearray(model), 0)
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    codes = [fb.OperatorCodes(i) for i in range(fb.OperatorCodesLength())]
    graph = fb.Subgraphs(0)
    return [names[max(codes[op.OpcodeIndex()].BuiltinCode(), codes[op.OpcodeIndex()].DeprecatedBuiltinCode())]
            for op in (graph.Operators(i) for i in range(graph.OperatorsLength()))]


def _chunked(spec, patch, params, batch_size):  # noqa: ANN001, ANN202 - build_frozen's Builder
    return build_phi_const_tflite(spec, patch, params, batch_size, chunk=CHUNK)


@pytest.mark.parametrize("make_spec", [mnist_cnn, dag_probe], ids=["mnist_cnn", "dag_probe"])
def test_chunked_step_matches_torch_and_takes_new_weights(make_spec) -> None:  # noqa: ANN001
    spec = make_spec()
    patch = default_patch(spec, k=8)
    params = live_params(spec, patch, seed=1, scale=0.1)
    blob, layout = build_frozen(_chunked, spec, patch, params, BATCH)
    for weights in (params, live_params(spec, patch, seed=5, scale=0.1)):  # as built, then rewritten in place
        program = LiteRTProgram(write_weights(blob, layout, weights), num_threads=1)
        check_phi_const_step(program, spec, patch, weights, BATCH, seed=2)


def test_chunks_are_emitted_one_after_another() -> None:
    """Each chunk's loss (its one LOG) comes after its own forward convolutions and before the next chunk's:
    before the first LOG there are exactly the convolutions of one forward pass, not every chunk's."""
    spec = mnist_cnn()
    patch = default_patch(spec, k=8)
    params = live_params(spec, patch, seed=1, scale=0.1)
    ops = _op_sequence(build_phi_const_tflite(spec, patch, params, BATCH, chunk=CHUNK))
    forward_convs = sum(op in CONV_OPS for op in _op_sequence(build_inference_tflite(spec, patch, params, 3)))
    logs = [i for i, op in enumerate(ops) if op == "LOG"]
    assert len(logs) == 3, ops
    assert forward_convs > 0
    assert sum(op in CONV_OPS for op in ops[:logs[0]]) == forward_convs, ops
    # and the chunk's backward (the transposed convolutions) runs before the next chunk's loss
    assert sum(op in CONV_OPS for op in ops[logs[0]:logs[1]]) > forward_convs, ops


def test_bad_chunk_is_refused() -> None:
    spec = mnist_cnn()
    patch = default_patch(spec, k=8)
    with pytest.raises(SpecError, match="chunk"):
        build_phi_const_tflite(spec, patch, live_params(spec, patch, seed=1), 4, chunk=0)
