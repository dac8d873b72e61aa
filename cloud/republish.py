"""Republishing a bundle with new weights (after MoMoDistill) in seconds, without the export toolchain.

Nothing is reconverted. Every program whose bytes do not depend on the weight values — the LiteRT
trainable program and the ExecuTorch training programs take the weights as inputs — is copied as is, so
its sha256 is unchanged and devices reuse their copy. The programs with the weights baked in (LiteRT
infer.tflite and phi_const.tflite, ExecuTorch infer.pte) carry their weight layout in the manifest
(export/frozen.py); the new weights are written into the existing bytes at those places
(protocol/weight_layout.py). The
variant table is kept whole, timings included: the programs that were timed are the same programs.

With `delta` (default "int8") the published weights are the parent's plus the quantized change, and the
bundle carries that change as `params_delta` (protocol/param_delta.py): a device holding the parent fetches
a quarter (int8, per-row scales) or half (float16) of the parameter bytes and rebuilds the parameter files
exactly. The error against the distilled weights (at most max|change of a row|/254 for int8, half a float16
ulp of each change for float16) is recorded in the manifest's meta as `delta_max_abs_error`, the encoding as
`delta_encoding`; the cloud's gate judges the published weights.

A baked program without a layout (a bundle exported before layouts existed) cannot be rewritten and is
left out of the new bundle, with a warning: devices then run inference and φ steps from the trainable
program with the weights as inputs (slower, same results) until the next full export.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from edgepatch.protocol.bundle import load_bundle
from edgepatch.protocol.bundle_writer import BundleWriter
from edgepatch.protocol.manifest import BAKED_KINDS, Manifest, artifact_runtime, split_kind
from edgepatch.protocol.model_spec import param_infos
from edgepatch.protocol.param_delta import (
    DEFAULT_DELTA_ENCODING,
    DELTA_ENCODINGS,
    delta_to_bytes,
    quantize_update,
)
from edgepatch.protocol.params import Params, ParamsError, check_params
from edgepatch.protocol.weight_layout import check_layout, write_weights

log = logging.getLogger("edgepatch.cloud.republish")

# Written anew from the parameters; everything else is either reused or rewritten in place.
PARAM_KINDS = ("params_base", "params_shared", "params_delta")
# Describe the export's variant search over the old base: not carried into a distilled bundle.
EXPORT_ONLY_KINDS = ("dse_front_png", "dse_table_json", "report_json")
RUNTIMES = ("litert", "executorch")


def republish_bundle(previous: str | Path, params: Params, out: str | Path, *,
                     runtimes: Sequence[str] | None = None, meta: Mapping[str, Any] | None = None,
                     delta: str | None = DEFAULT_DELTA_ENCODING) -> Manifest:
    """A new verified bundle at `out`: `previous` with `params` (every role) as its weights (rounded to
    parent + the change in the `delta` encoding, one of DELTA_ENCODINGS; None: the weights as given, no delta).

    `runtimes` keeps only those runtimes' programs (default: all the previous bundle has).
    """
    t0 = time.perf_counter()
    unknown = set(runtimes or ()) - set(RUNTIMES)
    if unknown:
        raise ValueError(f"unknown runtimes {sorted(unknown)}; choose from {', '.join(RUNTIMES)}")
    if delta is not None and delta not in DELTA_ENCODINGS:
        raise ValueError(f"unknown delta encoding {delta!r}; choose from {', '.join(DELTA_ENCODINGS)}")
    with load_bundle(previous) as old:
        manifest = old.manifest
        spec, patch = manifest.model, manifest.patch
        check_params(params, spec, patch)
        shapes = {name: info.shape for name, info in param_infos(spec, patch).items()}
        extra: dict[str, Any] = {}
        deltas: dict[str, Any] = {}
        if delta:
            try:
                params, deltas, error = quantize_update(old.all_params(), {n: params[n] for n in shapes}, delta)
                extra.update(delta_max_abs_error=error, delta_encoding=delta)
            except ParamsError as exc:  # a change beyond float16 or not finite: publish the weights as they are
                log.warning("no %s delta: %s", delta, exc)
        writer = BundleWriter(out, manifest.model_id).set_model(spec, patch).add_params(params)
        if deltas:
            writer.add_bytes("params_delta", delta_to_bytes(deltas))
        writer.set_input(manifest.input).set_labels(manifest.labels).set_train(manifest.train)
        writer.set_variants(manifest.variants)
        reused = rewritten = 0
        for name, entry in manifest.artifacts.items():
            base, _ = split_kind(entry.kind)
            runtime = artifact_runtime(entry.kind)
            if base in PARAM_KINDS or base in EXPORT_ONLY_KINDS:
                continue
            if runtimes is not None and runtime not in runtimes:
                continue
            source = old.artifact_path(name)
            if entry.weights is None and base in BAKED_KINDS:
                log.warning("%s has no weight layout (exported before layouts): left out; %s devices run "
                            "the trainable program instead until the next export", entry.path, runtime)
                continue
            if entry.weights is None:  # weights are inputs of this program: same bytes, same sha256
                writer.add_file(entry.kind, source, name=name, path=entry.path)
                reused += 1
                continue
            layout = check_layout(entry.weights, shapes, entry.bytes, f"{previous}: artifacts.{name}.weights")
            blob = write_weights(source.read_bytes(), layout, params)
            writer.add_bytes(entry.kind, blob, name=name, path=entry.path, weights=layout)
            rewritten += 1
        carried = {k: v for k, v in manifest.meta.items()
                   if k not in ("delta_max_abs_error", "delta_encoding")}  # not this round's
        writer.set_meta(**{**carried, "parent_base_version": manifest.base_version, **extra, **(meta or {})})
        result = writer.finish()
    log.info("republished %s: %d programs reused, %d frozen programs rewritten in place (%.2f s)",
             result.base_version[:12], reused, rewritten, time.perf_counter() - t0)
    return result
