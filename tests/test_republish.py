"""Republishing a distilled bundle from the cloud's own modules (issue 13 item 1), with the real programs.

The distillation and the republication run in a subprocess where TensorFlow, scikit-learn, the ExecuTorch
and LiteRT packages and the export toolchain cannot be imported (what `pip install edgepatch[cloud]` has).
The parent then runs the republished frozen programs in the real LiteRT interpreter and ExecuTorch runtime:
their logits must equal the torch reference forward with the *new* weights, and the trainable programs
(weights are inputs) must be the previous bundle's bytes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgepatch.export import torch_model
from edgepatch.protocol.bundle import load_bundle
from edgepatch.protocol.manifest import artifact_runtime
from edgepatch.protocol.params import load_params
from edgepatch.protocol.weight_layout import LayoutError, find_layout, marker_params, write_weights

pytestmark = pytest.mark.slow

BLOCKED = ("tensorflow", "sklearn", "executorch", "ai_edge_litert", "tflite_runtime", "edgepatch.export.pipeline",
           "edgepatch.export.tflite_builder", "edgepatch.export.executorch_builder", "edgepatch.export.frozen")

CLOUD_SIDE = r"""
import json, sys, time
# None in sys.modules: `import x` raises ModuleNotFoundError and importlib.util.find_spec(x) returns None,
# exactly as when the package is not installed.
for name in sys.argv[1].split(","):
    sys.modules[name] = None
import numpy as np
from edgepatch.cloud.momodistill import CloudData, DeviceContribution, DistillConfig, run_aggregator
from edgepatch.cloud.republish import republish_bundle
from edgepatch.protocol.bundle import load_bundle
from edgepatch.protocol.params import save_params

previous, data, out, params_out = sys.argv[2:6]
bundle = load_bundle(previous)
with np.load(data) as d:
    cloud = CloudData(d["x"], d["y"], proxy_x=d["x"])
rng = np.random.default_rng(0)
devices = [DeviceContribution(f"d{i}", rng.normal(scale=0.3, size=bundle.patch_spec.k).astype(np.float32))
           for i in range(3)]
cfg = DistillConfig(phi_source="device", step1_epochs=1, step2_epochs=1, seed=0)
result = run_aggregator("momodistill", bundle.model_spec, bundle.patch_spec, bundle.all_params(), devices, cloud, cfg)
t0 = time.perf_counter()
manifest = republish_bundle(bundle.root, result.params, out, meta={"distilled_from_devices": 3})
seconds = time.perf_counter() - t0
save_params(params_out, result.params)
leaked = sorted(m for m, mod in sys.modules.items() if mod is not None and m.split(".")[0] in
                ("tensorflow", "sklearn", "executorch", "ai_edge_litert"))
print(json.dumps({"seconds": seconds, "leaked": leaked, "base_version": manifest.base_version}))
"""


@pytest.fixture(scope="module")
def republished(digits_bundle_both: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Distil and republish in a process without TensorFlow & co.; its report, output and new params."""
    from edgepatch.data.datasets import load_digits

    tmp_path = tmp_path_factory.mktemp("republish")
    digits = load_digits()
    np.savez(tmp_path / "cloud.npz", x=digits.x[:300], y=digits.y[:300])
    out, new_params_file = tmp_path / "republished", tmp_path / "new.npz"
    proc = subprocess.run([sys.executable, "-c", CLOUD_SIDE, ",".join(BLOCKED), str(digits_bundle_both),
                           str(tmp_path / "cloud.npz"), str(out), str(new_params_file)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"report": report, "out": out, "params": load_params(new_params_file)}


def test_republish_distilled_bundle_without_tensorflow(digits_bundle_both: Path, republished: dict) -> None:
    report, out, params = republished["report"], republished["out"], republished["params"]
    assert report["leaked"] == []
    assert report["seconds"] < 5.0, report

    old, new = load_bundle(digits_bundle_both), load_bundle(out)  # verify=True: sizes, sha256, params
    assert new.base_version == report["base_version"] != old.base_version
    before = old.all_params()
    assert max(float(np.abs(params[n] - before[n]).max()) for n in params) > 1e-3  # distillation moved them
    for name, entry in old.manifest.artifacts.items():
        if artifact_runtime(entry.kind) is None:
            continue
        got = new.manifest.artifacts[name]
        if entry.weights is None:  # weights are inputs: byte-identical, so devices reuse their copy
            assert got.sha256 == entry.sha256, name
        else:  # frozen: same size and layout, new bytes
            assert (got.bytes, got.weights) == (entry.bytes, entry.weights) and got.sha256 != entry.sha256, name
    assert {"litert_infer", "litert_phi_const", "executorch_infer"} <= {
        e.kind for e in new.manifest.artifacts.values() if e.weights}
    _check_parity(new, params, before)
    _check_phi_const(new)


def test_device_fetches_only_its_runtime_and_rebuilds_the_frozen_program(digits_bundle_both: Path,
                                                                          republished: dict, tmp_path: Path) -> None:
    """A LiteRT device updating to the republished bundle downloads the manifest and the int8 parameter
    delta, gzip-compressed on the wire, nothing else: no ExecuTorch file, the trainable program reused, the
    parameter files and infer.tflite rebuilt locally (each checked against the manifest's sha256)."""
    from edgepatch.cloud.store import PatchStore, sqlite_url
    from edgepatch.cloud.web import FleetWeb
    from edgepatch.device.backends.litert import LiteRTProgram
    from edgepatch.device.fetch import fetch_bundle
    from edgepatch.protocol.bundle import ActiveBundleStore

    out = republished["out"]
    store = PatchStore(sqlite_url(tmp_path / "s.sqlite"))
    web = FleetWeb(store)
    web.start()
    try:
        active = ActiveBundleStore(tmp_path / "device")
        have = active.install(digits_bundle_both)
        with load_bundle(out) as nxt:
            version, manifest = nxt.version, nxt.manifest
        url = web.serve_bundle("next", out)
        path, stats = fetch_bundle(url, version, tmp_path / "dl", have, 1 << 26, runtime="litert")
        sizes = {e.kind: e.bytes for e in manifest.artifacts.values()}

        def wire(rel: str) -> int:  # what the server sends a client that accepts gzip
            packed = web.gzipped(out / rel)
            return (out / rel).stat().st_size if packed is None else len(packed)

        manifest_bytes = wire("manifest.json")
        assert manifest_bytes < 0.3 * (out / "manifest.json").stat().st_size  # JSON compresses well
        # Only the manifest and the int8 delta travel: the parameter files and infer.tflite are rebuilt.
        assert stats.downloaded_bytes == wire(manifest.artifacts["params_delta"].path) + manifest_bytes
        assert sizes["params_delta"] < 0.3 * (sizes["params_base"] + sizes["params_shared"])
        assert new_meta_encoding(manifest) == "int8"
        assert stats.rebuilt_bytes == (sizes["params_base"] + sizes["params_shared"] + sizes["litert_infer"]
                                       + sizes["litert_phi_const"])
        assert stats.skipped_bytes == sum(e.bytes for e in manifest.artifacts.values() if e.runtime == "executorch")
        assert not [p for p in path.rglob("*.pte")]
        installed = active.install(path, expected_version=version)  # verified: sizes, sha256, params
        assert installed.only_runtime == "litert" and active.current().version == version
        _, cold = fetch_bundle(url, version, tmp_path / "cold", None, 1 << 26, runtime="litert")
        assert cold.downloaded_bytes == manifest_bytes + sum(
            wire(e.path) for e in manifest.artifacts.values() if e.runtime in (None, "litert")
            and e.kind != "params_delta")
        # The same version again from the LiteRT-only copy: only the manifest.
        _, again = fetch_bundle(url, version, tmp_path / "dl2", installed, 1 << 26, runtime="litert")
        assert again.downloaded_bytes == manifest_bytes and again.skipped_bytes == stats.skipped_bytes
        rng = np.random.default_rng(1)
        x = rng.normal(size=(manifest.train.infer_batch, *manifest.model.input_shape)).astype(np.float32)
        phi = rng.normal(size=manifest.patch.k).astype(np.float32)
        want = LiteRTProgram(out / manifest.artifacts["litert_infer"].path).infer(x, phi)
        got = LiteRTProgram(installed.artifact_path("litert_infer")).infer(x, phi)
        np.testing.assert_array_equal(got, want)
    finally:
        web.stop()
        store.close()


def new_meta_encoding(manifest) -> str:
    return manifest.meta["delta_encoding"]


def _check_parity(bundle, params, parent) -> None:
    """The devices' frozen programs compute the torch reference forward with the new weights (≤ 1e-4)."""
    from edgepatch.device.backends.executorch import ExecuTorchInference
    from edgepatch.device.backends.litert import LiteRTProgram

    spec, patch = bundle.model_spec, bundle.patch_spec
    # Published = parent + int8 change (protocol/param_delta.py): within the recorded bound of the distilled,
    # which is at most 1/254 of the largest change.
    shipped = bundle.all_params()
    bound = bundle.manifest.meta["delta_max_abs_error"]
    largest_change = max(float(np.abs(params[n] - parent[n]).max()) for n in params)
    assert 0 < bound <= largest_change / 254 * (1 + 1e-5)
    assert max(float(np.abs(shipped[n] - params[n]).max()) for n in params) <= bound
    params = shipped
    rng = np.random.default_rng(3)
    batch = bundle.manifest.train.infer_batch
    x = rng.normal(size=(batch, *spec.input_shape)).astype(np.float32)
    phi = rng.normal(scale=0.3, size=patch.k).astype(np.float32)
    with torch.no_grad():
        want = torch_model.forward(spec, patch, torch_model.to_tensors(params), torch.tensor(x),
                                   torch.tensor(phi)).numpy()
    litert = LiteRTProgram(bundle.artifact_bytes(bundle.artifact_of_kind("litert_infer"))).infer(x, phi)
    et = ExecuTorchInference(bundle.artifact_bytes(bundle.artifact_of_kind("executorch_infer"))).infer(x, phi)
    np.testing.assert_allclose(litert, want, atol=1e-4, rtol=0)
    np.testing.assert_allclose(et, want, atol=1e-4, rtol=0)


def _check_phi_const(bundle) -> None:
    """The republished baked φ program takes one Adam step as torch autograd does with the new weights, and
    the device's engine accepts it (its probe step agrees with the trainable program, reused unchanged)."""
    from edgepatch.device.backends.litert import LiteRTProgram
    from edgepatch.device.engine import LiteRTEngine
    from edgepatch.protocol.optim import adam_step
    from edgepatch.protocol.variants import full_variant

    sys.path.insert(0, str(Path(__file__).parent))
    from parity_checks import torch_reference

    spec, patch, params = bundle.model_spec, bundle.patch_spec, bundle.all_params()
    rng = np.random.default_rng(4)
    n = bundle.manifest.train.batch
    x = rng.normal(size=(n, *spec.input_shape)).astype(np.float32)
    y = rng.integers(0, spec.num_classes, n).astype(np.int32)
    phi, zeros = rng.normal(scale=0.3, size=patch.k).astype(np.float32), np.zeros(patch.k, np.float32)
    ref = torch_reference(spec, patch, full_variant(spec), params, x, y, phi)
    program = LiteRTProgram(bundle.artifact_bytes(bundle.artifact_of_kind("litert_phi_const")))
    out = program.train_phi_const(x, y, phi, zeros, zeros, 0.0, 0.05)
    np.testing.assert_allclose(out["loss"], ref["loss"], rtol=1e-4)
    np.testing.assert_allclose(out["grad"], ref["grad_phi"], rtol=1e-4, atol=1e-4 * float(np.abs(ref["grad_phi"]).max()))
    want_phi, _, _ = adam_step(phi, ref["grad_phi"], zeros, zeros, 0.0, bundle.manifest.train.adam, lr=0.05)
    np.testing.assert_allclose(out["phi"], want_phi, rtol=1e-4, atol=1e-6)
    assert LiteRTEngine(bundle).phi_const is not None


def test_layout_finds_transposed_and_shifted_weights_and_rewrites_only_them() -> None:
    rng = np.random.default_rng(0)
    markers = marker_params({"w": np.zeros((2, 3, 4)), "b": np.zeros(3), "s": np.zeros(5)})
    head, tail = rng.bytes(37), rng.bytes(11)
    blob = (head + np.ascontiguousarray(markers["w"].transpose(2, 0, 1)).tobytes() + markers["b"].tobytes()
            + (markers["s"] + np.float32(1)).tobytes() + tail)
    layout = find_layout(blob, markers)
    assert layout == {"w": [[37, 0.0, 2, 0, 1]], "b": [[37 + 96, 0.0, 0]], "s": [[37 + 108, 1.0, 0]]}
    new = {"w": rng.normal(size=(2, 3, 4)), "b": rng.normal(size=3), "s": rng.normal(size=5)}
    out = write_weights(blob, layout, new)
    assert out[:37] == head and out[-11:] == tail and len(out) == len(blob)
    np.testing.assert_array_equal(np.frombuffer(out[37:133], "<f4").reshape(4, 2, 3),
                                  new["w"].astype(np.float32).transpose(2, 0, 1))
    np.testing.assert_array_equal(np.frombuffer(out[145:165], "<f4"), new["s"].astype(np.float32) + 1)
    with pytest.raises(LayoutError, match="not stored verbatim"):
        find_layout(head + tail, markers)


def test_layout_finds_a_kernels_flipped_copy_and_rewrites_it() -> None:
    """A training program's depthwise input gradient holds the spatially flipped kernel as a constant of its
    own (export/tf_twin.py): its spot has reversed axes (-1 - a), found, checked and rewritten like the rest."""
    from edgepatch.protocol.weight_layout import check_layout

    rng = np.random.default_rng(0)
    markers = marker_params({"dw": np.zeros((4, 1, 3, 3)), "b": np.zeros(4)})
    stored = np.ascontiguousarray(markers["dw"].transpose(1, 2, 3, 0))  # TFLite's (1, kh, kw, C)
    flipped = np.ascontiguousarray(np.flip(markers["dw"], axis=(2, 3)).transpose(1, 2, 3, 0))
    blob = rng.bytes(8) + stored.tobytes() + markers["b"].tobytes() + flipped.tobytes() + rng.bytes(4)
    layout = find_layout(blob, markers)
    assert sorted(layout["dw"]) == [[8, 0.0, 1, 2, 3, 0], [8 + 144 + 16, 0.0, 1, -3, -4, 0]]
    check_layout(layout, {"dw": (4, 1, 3, 3), "b": (4,)}, len(blob), "test")
    new = {"dw": rng.normal(size=(4, 1, 3, 3)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)}
    out = write_weights(blob, layout, new)
    np.testing.assert_array_equal(np.frombuffer(out[168:312], "<f4").reshape(1, 3, 3, 4),
                                  np.flip(new["dw"], axis=(2, 3)).transpose(1, 2, 3, 0))
    assert find_layout(out, new) == layout  # the rewritten program holds the new weights at the same spots
    with pytest.raises(LayoutError, match="bad spot"):
        check_layout({"dw": [[8, 0.0, 1, -3, -3, 0]], "b": layout["b"]}, {"dw": (4, 1, 3, 3), "b": (4,)},
                     len(blob), "test")


def test_manifest_refuses_a_layout_outside_the_program(digits_bundle_both: Path, tmp_path: Path) -> None:
    raw = json.loads((digits_bundle_both / "manifest.json").read_text())
    entry = next(e for e in raw["artifacts"].values() if e.get("weights"))
    spot = next(iter(entry["weights"].values()))[0]
    spot[0] = entry["bytes"]  # past the end
    from edgepatch.protocol.manifest import Manifest, ManifestError

    with pytest.raises(ManifestError, match="bad spot"):
        Manifest.from_json(json.dumps(raw).encode())
