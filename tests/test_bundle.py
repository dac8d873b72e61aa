"""The bundle contract: write → load round trip, and refusal of every kind of tampering."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgepatch.export.bundle_writer import BundleWriter, pack_bundle
from edgepatch.export.reference_models import default_patch, digits_cnn
from edgepatch.protocol.bundle import ActiveBundleStore, load_bundle
from edgepatch.protocol.manifest import (
    SCHEMA_VERSION,
    BundleError,
    InputSpec,
    LabelSpec,
    Manifest,
    ManifestError,
    TrainConfig,
    VariantRow,
)
from edgepatch.protocol.optim import AdamConfig
from edgepatch.protocol.params import init_params, params_to_bytes
from edgepatch.protocol.variants import Variant, full_variant, uniform_variant

SPEC = digits_cnn()
PATCH = default_patch(SPEC)
HALF = uniform_variant(SPEC, 0.5)  # id "k50-50"
# Synthetic program bytes: the bundle code treats them as opaque, so realism does not matter here.
SYNTHETIC = {
    "litert_trainable": b"TFL3" + bytes(range(256)) * 8,
    "litert_infer": b"TFL3" + bytes(range(255, -1, -1)) * 4,
    "executorch_infer": b"ET12" + b"\x01\x02" * 300,
    f"executorch_train_phi:{HALF.id}": b"ET12phi" * 50,
    f"executorch_train_full:{HALF.id}": b"ET12full" * 70,
    "dse_front_png": b"\x89PNG\r\n\x1a\n" + b"\x00" * 64,
}
ALL_ARTIFACTS = ["params_base", "params_shared", *(k.replace(":", "_") for k in SYNTHETIC)]


def write_bundle(out: Path, seed: int = 0, **meta: Any) -> Manifest:
    writer = BundleWriter(out).set_model(SPEC, PATCH).add_params(init_params(SPEC, PATCH, seed=seed))
    writer.set_train(TrainConfig(batch=16, infer_batch=4, adam=AdamConfig(lr=0.01), phi_lr=0.1))
    writer.set_variants([
        VariantRow.for_variant(SPEC, full_variant(SPEC), train_ms={"litert": 3.5}, convergence=0.4, pareto=True),
        VariantRow.for_variant(SPEC, HALF, train_ms={"litert": 1.2, "executorch": 2.0}, infer_ms={"litert": 0.3},
                               memory_bytes=123456, convergence=0.6, pareto=True),
    ])
    for kind, data in SYNTHETIC.items():
        writer.add_bytes(kind, data)
    writer.set_meta(seed=seed, **meta)
    return writer.finish()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pristine") / "bundle"
    write_bundle(out)
    return out


@pytest.fixture
def bundle_dir(pristine: Path, tmp_path: Path) -> Path:
    """A private copy each test may damage."""
    return Path(shutil.copytree(pristine, tmp_path / "bundle"))


def edit_manifest(bundle: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


# -- round trip -------------------------------------------------------------------------------------


def test_round_trip_gives_back_every_part(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir)

    assert sorted(bundle.manifest.artifacts) == sorted(ALL_ARTIFACTS)
    assert bundle.model_spec == SPEC and bundle.patch_spec == PATCH
    expected = init_params(SPEC, PATCH, seed=0)
    got = bundle.all_params()
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value)
    for kind, data in SYNTHETIC.items():
        assert bundle.artifact_bytes(kind.replace(":", "_")) == data
    base_file = bundle.artifact_path("params_base").read_bytes()
    assert bundle.base_version == hashlib.sha256(base_file).hexdigest()
    assert bundle.variant(HALF.id) == Variant(HALF.id, {"conv1": 0.5, "conv2": 0.5})
    assert bundle.variant(HALF.id).widths(SPEC) == {"conv1": 8, "conv2": 16}
    assert bundle.manifest.train.phi_lr == 0.1 and bundle.manifest.train.adam.lr == 0.01
    assert bundle.manifest.input.layout == "NCHW" and bundle.manifest.labels.num_classes == 10
    assert Manifest.from_json(bundle.manifest.to_json()) == bundle.manifest


def test_input_normalization_and_label_names_round_trip(tmp_path: Path) -> None:
    writer = BundleWriter(tmp_path / "b").set_model(SPEC, PATCH).add_params(init_params(SPEC, PATCH))
    writer.set_input(InputSpec.for_model(SPEC, mean=(0.25,), std=(0.5,)))
    writer.set_labels(LabelSpec(10, tuple(str(d) for d in range(10))))
    writer.set_variants([VariantRow.for_variant(SPEC, full_variant(SPEC))])
    written = writer.finish()

    loaded = load_bundle(tmp_path / "b").manifest
    assert loaded == written
    assert loaded.input.mean == (0.25,) and loaded.input.std == (0.5,)
    assert loaded.labels.names is not None and loaded.labels.names[3] == "3"


@pytest.mark.parametrize(("build", "pattern"), [
    (lambda: InputSpec((1, 8, 8), "NCHW", mean=(0.1, 0.2), std=(1.0, 1.0)), r"input\.mean: needs one value"),
    (lambda: InputSpec((1, 8, 8), "NCHW", mean=(0.1,), std=(0.0,)), r"input\.std: every value must be > 0"),
    (lambda: InputSpec((1, 8, 8), "NCL"), r"input\.shape.*layout NCL"),
    (lambda: InputSpec((1, 8, 8), "NCHW", dtype="float16"), r"input\.dtype"),
    (lambda: LabelSpec(3, ("a", "b")), r"labels\.names: 2 names for 3 classes"),
    (lambda: TrainConfig(adam=AdamConfig(beta1=1.0)), r"train\.adam"),
    (lambda: TrainConfig(phi_lr=0.0), r"train\.phi_lr"),
])
def test_manifest_parts_refuse_bad_values(build: Callable[[], object], pattern: str) -> None:
    with pytest.raises(ManifestError, match=pattern):
        build()


def test_describe_lists_variants_and_real_sizes(bundle_dir: Path) -> None:
    info = load_bundle(bundle_dir).describe()

    sizes = {a["name"]: a["bytes"] for a in info["artifacts"]}
    assert sizes == {n: (bundle_dir / a["path"]).stat().st_size for n, a in
                     ((a["name"], a) for a in info["artifacts"])}
    assert info["total_bytes"] == sum(sizes.values())
    assert [v["id"] for v in info["variants"]] == ["k100-100", HALF.id]
    assert info["variants"][1]["memory_bytes"] == 123456
    assert info["model_id"] == "digits_cnn" and info["schema_version"] == SCHEMA_VERSION
    json.dumps(info)  # `edgepatch inspect --json` prints it


def test_unknown_variant_and_artifact_are_named(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir)
    with pytest.raises(BundleError, match="k10-10"):
        bundle.variant("k10-10")
    with pytest.raises(BundleError, match="nope"):
        bundle.artifact_bytes("nope")


# -- tampering with artifacts -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_ARTIFACTS)
def test_one_flipped_byte_in_any_artifact_is_refused_naming_it(bundle_dir: Path, name: str) -> None:
    path = bundle_dir / load_bundle(bundle_dir).manifest.artifacts[name].path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))

    with pytest.raises(BundleError, match=rf"{name}.*{path.name}.*sha256"):
        load_bundle(bundle_dir)


@pytest.mark.parametrize("name", ALL_ARTIFACTS)
def test_reads_after_load_are_verified_again(bundle_dir: Path, name: str) -> None:
    bundle = load_bundle(bundle_dir)
    path = bundle.artifact_path(name)
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))

    with pytest.raises(BundleError, match=name):
        bundle.artifact_bytes(name)


def test_truncated_artifact_is_refused(bundle_dir: Path) -> None:
    path = bundle_dir / "params_shared.npz"
    path.write_bytes(path.read_bytes()[:-10])

    with pytest.raises(BundleError, match=r"params_shared.*bytes.*truncated"):
        load_bundle(bundle_dir)


def test_missing_artifact_is_refused(bundle_dir: Path) -> None:
    (bundle_dir / "infer.pte").unlink()

    with pytest.raises(BundleError, match=r"executorch_infer.*infer\.pte is missing"):
        load_bundle(bundle_dir)


def test_symlink_out_of_the_bundle_is_refused(bundle_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.tflite"
    outside.write_bytes(SYNTHETIC["litert_infer"])  # same bytes: only the location is wrong
    (bundle_dir / "infer.tflite").unlink()
    (bundle_dir / "infer.tflite").symlink_to(outside)

    with pytest.raises(BundleError, match=r"litert_infer.*outside the bundle"):
        load_bundle(bundle_dir)


def test_verify_false_skips_hashing_but_reads_still_check(bundle_dir: Path) -> None:
    (bundle_dir / "infer.tflite").write_bytes(b"garbage")

    bundle = load_bundle(bundle_dir, verify=False)  # e.g. `inspect` of a damaged bundle
    assert bundle.describe()["model_id"] == "digits_cnn"
    with pytest.raises(BundleError, match="litert_infer"):
        bundle.artifact_bytes("litert_infer")


# -- tampering with the manifest --------------------------------------------------------------------


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        node: Any = data
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if value is _DELETE:
            del node[int(last) if isinstance(node, list) else last]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return edit


_DELETE = object()
_OTHER_SHA = "ab" * 32

MANIFEST_EDITS = {
    "artifact sha changed": (_set("artifacts/litert_infer/sha256", _OTHER_SHA), r"litert_infer.*sha256"),
    "artifact size changed": (_set("artifacts/litert_infer/bytes", 5), r"litert_infer.*bytes"),
    "unknown schema version": (_set("schema_version", 2), r"schema version 2.*\[1\]"),
    "schema version as string": (_set("schema_version", "1"), r"schema_version: expected an integer"),
    "no schema version": (_set("schema_version", _DELETE), r"schema_version: missing"),
    "path traversal": (_set("artifacts/litert_infer/path", "../x"), r"litert_infer\.path.*traversal"),
    "nested traversal": (_set("artifacts/litert_infer/path", "a/../../x"), r"traversal"),
    "absolute path": (_set("artifacts/litert_infer/path", "/etc/passwd"), r"litert_infer\.path.*absolute"),
    "backslash path": (_set("artifacts/litert_infer/path", "..\\x"), r"litert_infer\.path.*backslash"),
    "missing field": (_set("model_id", _DELETE), r"model_id: missing required field"),
    "unknown field": (_set("surprise", 1), r"unknown field.*surprise"),
    "batch as string": (_set("train/batch", "32"), r"train\.batch: expected an integer"),
    "size as bool": (_set("artifacts/params_base/bytes", True), r"params_base\.bytes: expected an integer"),
    "keep above one": (_set("variants/1/keep/conv1", 1.5), r"variants\[1\]\.keep\.conv1.*\(0, 1\]"),
    "keep on the head": (_set("variants/1/keep/head", 0.5), r"variants\[1\]\.keep\.head.*not a droppable"),
    "keep on a missing layer": (_set("variants/1/keep/conv9", 0.5), r"keep\.conv9: not a droppable layer"),
    "widths inconsistent": (_set("variants/1/widths/conv1", 9), r"variants\[1\]\.widths"),
    "duplicate variant id": (_set("variants/1/id", "k100-100"), r"variants\[1\]\.id: duplicate"),
    "bad variant id": (_set("variants/1/id", "K50_50"), r"variants\[1\]\.id"),
    "no full variant": (_set("variants/0", _DELETE), r"variants: no full variant"),
    "base_version mismatch": (_set("base_version", _OTHER_SHA), r"base_version.*params_base"),
    "unknown artifact kind": (_set("artifacts/litert_infer/kind", "shellscript"), r"litert_infer\.kind.*unknown"),
    "variant kind, unknown id": (_set(f"artifacts/executorch_train_phi_{HALF.id}/kind",
                                      "executorch_train_phi:k10-10"), r"kind.*k10-10"),
    "no base params": (_set("artifacts/params_base", _DELETE), r"no artifact of kind 'params_base'"),
    "input shape off": (_set("input/shape", [1, 28, 28]), r"input\.shape"),
    "layout unknown": (_set("input/layout", "NHWC"), r"input\.layout"),
    "created not a time": (_set("created", "yesterday"), r"created: 'yesterday' is not an ISO 8601 time"),
    "model layer out as float": (_set("model/layers/0/out", 16.5), r"model\.layers\[0\]\.out"),
    "patch on unknown layer": (_set("patch/layers", ["conv9"]), r"patch: no layer named 'conv9'"),
    "convergence NaN": (_set("variants/0/convergence", float("nan")), r"not valid JSON: JSON constant NaN"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_EDITS))
def test_edited_manifest_is_refused_with_a_clear_message(bundle_dir: Path, case: str) -> None:
    edit, pattern = MANIFEST_EDITS[case]
    edit_manifest(bundle_dir, edit)

    with pytest.raises(BundleError, match=pattern):
        load_bundle(bundle_dir)


def test_duplicate_json_key_is_refused(bundle_dir: Path) -> None:
    path = bundle_dir / "manifest.json"
    text = path.read_text()
    path.write_text(text.replace('"model_id":', '"model_id": "evil", "model_id":', 1))

    with pytest.raises(ManifestError, match="duplicate key 'model_id'"):
        load_bundle(bundle_dir)


def test_manifest_that_is_not_json_is_refused(bundle_dir: Path) -> None:
    (bundle_dir / "manifest.json").write_bytes(b"\xff{not json")

    with pytest.raises(ManifestError, match="not valid JSON"):
        load_bundle(bundle_dir)


def test_expected_version_catches_a_consistent_looking_edit(bundle_dir: Path) -> None:
    version = load_bundle(bundle_dir).version
    edit_manifest(bundle_dir, _set("variants/1/pareto", False))  # hashes still match the files

    assert load_bundle(bundle_dir).manifest.variants[1].pareto is False
    with pytest.raises(BundleError, match="expected bundle version"):
        load_bundle(bundle_dir, expected_version=version)


def test_params_of_the_wrong_shape_are_refused_even_with_matching_hashes(tmp_path: Path) -> None:
    params = init_params(SPEC, PATCH)
    base = {n: v for n, v in params.items() if ".patch." not in n}
    base["conv2.weight"] = base["conv2.weight"][:8]
    writer = BundleWriter(tmp_path / "b").set_model(SPEC, PATCH).add_params(params)
    writer.add_bytes("params_base", params_to_bytes(base))  # replaces the good one
    writer.set_variants([VariantRow.for_variant(SPEC, full_variant(SPEC))])

    with pytest.raises(BundleError, match=r"params_base.*conv2\.weight.*shape"):
        writer.finish()
    assert not (tmp_path / "b").exists()


# -- archives ---------------------------------------------------------------------------------------


def test_tar_archive_round_trip(pristine: Path, tmp_path: Path) -> None:
    archive = pack_bundle(pristine, tmp_path / "bundle.tar.gz")

    with load_bundle(archive) as bundle:
        unpacked = bundle.root
        assert bundle.version == load_bundle(pristine).version
        assert bundle.artifact_bytes("litert_trainable") == SYNTHETIC["litert_trainable"]
    assert not unpacked.exists()  # the temp dir goes with the bundle


def test_zip_archive_of_the_directory_loads(pristine: Path, tmp_path: Path) -> None:
    archive = tmp_path / "bundle.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(pristine.rglob("*")):
            zf.write(path, f"bundle/{path.relative_to(pristine)}")

    with load_bundle(archive) as bundle:
        assert bundle.manifest.model_id == "digits_cnn"


def test_tampered_archive_names_the_file(pristine: Path, tmp_path: Path) -> None:
    archive = tmp_path / "bundle.tar"
    with tarfile.open(archive, "w") as tf:
        for path in sorted(pristine.iterdir()):
            data = path.read_bytes()
            if path.name == "infer.pte":
                data = data[:-1] + bytes([data[-1] ^ 1])
            info = tarfile.TarInfo(path.name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))

    with pytest.raises(BundleError, match=r"executorch_infer.*infer\.pte"):
        load_bundle(archive)


def _tar_with(tmp_path: Path, info: tarfile.TarInfo, data: bytes = b"") -> Path:
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tf:
        info.size = len(data) if info.isfile() else 0
        tf.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return archive


def test_archive_with_traversal_is_refused(tmp_path: Path) -> None:
    archive = _tar_with(tmp_path, tarfile.TarInfo("../escaped.txt"), b"owned")

    with pytest.raises(BundleError, match="path traversal"):
        load_bundle(archive)
    assert not (tmp_path.parent / "escaped.txt").exists()


def test_archive_with_symlink_is_refused(tmp_path: Path) -> None:
    link = tarfile.TarInfo("manifest.json")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"

    with pytest.raises(BundleError, match="link or special file"):
        load_bundle(_tar_with(tmp_path, link))


def test_zip_with_traversal_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../../escaped.txt", b"owned")

    with pytest.raises(BundleError, match="path traversal"):
        load_bundle(archive)


# -- the writer -------------------------------------------------------------------------------------


def test_writer_refuses_a_non_bundle_directory(tmp_path: Path) -> None:
    target = tmp_path / "photos"
    target.mkdir()
    (target / "holiday.jpg").write_bytes(b"precious")

    with pytest.raises(BundleError, match="not a bundle"):
        write_bundle(target)
    assert (target / "holiday.jpg").read_bytes() == b"precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]  # no staging left behind


def test_writer_replaces_an_existing_bundle_whole(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    first = write_bundle(out, seed=0)
    second = write_bundle(out, seed=1)

    assert first.base_version != second.base_version
    assert load_bundle(out).base_version == second.base_version
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_writer_refuses_a_variant_table_without_full_variant(tmp_path: Path) -> None:
    writer = BundleWriter(tmp_path / "b").set_model(SPEC, PATCH).add_params(init_params(SPEC, PATCH))
    writer.set_variants([VariantRow.for_variant(SPEC, HALF)])

    with pytest.raises(ManifestError, match="no full variant"):
        writer.finish()


def test_writer_accepts_numpy_measurements(tmp_path: Path) -> None:
    row = VariantRow.for_variant(SPEC, full_variant(SPEC), train_ms={"litert": np.float32(2.5)},
                                 memory_bytes=np.int64(10), convergence=np.float64(0.5))
    writer = BundleWriter(tmp_path / "b").set_model(SPEC, PATCH).add_params(init_params(SPEC, PATCH))
    writer.set_variants([row]).add_file("litert_infer", _file(tmp_path / "src.tflite", b"TFL3abc"))
    writer.finish()

    bundle = load_bundle(tmp_path / "b")
    assert bundle.variant_row("k100-100").train_ms == {"litert": 2.5}
    assert bundle.artifact_bytes("litert_infer") == b"TFL3abc"


def _file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# -- keeping the last good bundle -------------------------------------------------------------------


def test_store_keeps_the_last_good_bundle(pristine: Path, tmp_path: Path) -> None:
    store = ActiveBundleStore(tmp_path / "store")
    assert store.current() is None
    good = store.install(pristine)

    bad = Path(shutil.copytree(pristine, tmp_path / "bad"))
    edit_manifest(bad, _set("meta/seed", 99))  # a different bundle version…
    (bad / "trainable.tflite").write_bytes(b"TFL3" + b"\x00" * 100)  # …with a corrupt program
    with pytest.raises(BundleError, match="litert_trainable"):
        store.install(bad)

    current = store.current()
    assert current is not None and current.version == good.version
    assert current.artifact_bytes("litert_trainable") == SYNTHETIC["litert_trainable"]
    assert [p.name for p in (tmp_path / "store" / "bundles").iterdir()] == [good.version]


def test_store_switches_to_a_good_new_bundle_and_keeps_one_previous(tmp_path: Path) -> None:
    store = ActiveBundleStore(tmp_path / "store", keep=2)
    versions = []
    for seed in range(3):
        write_bundle(tmp_path / f"b{seed}", seed=seed)
        versions.append(store.install(tmp_path / f"b{seed}").version)
        assert store.current_version() == versions[-1]

    current = store.current()
    assert current is not None and current.base_version == load_bundle(tmp_path / "b2").base_version
    kept = sorted(p.name for p in (tmp_path / "store" / "bundles").iterdir())
    assert kept == sorted(versions[1:])  # the active one and the previous, for rollback
    pointer = json.loads((tmp_path / "store" / "current.json").read_text())
    assert pointer["history"] == [versions[2], versions[1]]


def test_store_notices_rot_in_the_installed_bundle(pristine: Path, tmp_path: Path) -> None:
    store = ActiveBundleStore(tmp_path / "store")
    installed = store.install(pristine)
    path = installed.artifact_path("params_base")
    data = bytearray(path.read_bytes())
    data[100] ^= 0x10
    path.write_bytes(bytes(data))

    with pytest.raises(BundleError, match="params_base"):
        store.current()


def test_reinstalling_the_same_version_repairs_a_rotten_copy(pristine: Path, tmp_path: Path) -> None:
    store = ActiveBundleStore(tmp_path / "store")
    path = store.install(pristine).artifact_path("litert_infer")
    path.write_bytes(b"rot")

    store.install(pristine)
    current = store.current()
    assert current is not None and current.artifact_bytes("litert_infer") == SYNTHETIC["litert_infer"]


def test_store_install_from_archive(pristine: Path, tmp_path: Path) -> None:
    archive = pack_bundle(pristine, tmp_path / "b.tar.gz")
    store = ActiveBundleStore(tmp_path / "store")

    installed = store.install(archive)
    assert installed.version == load_bundle(pristine).version
    assert installed.root.is_relative_to(tmp_path / "store")


# -- dependencies -----------------------------------------------------------------------------------


def test_bundle_reader_imports_neither_torch_nor_tensorflow(pristine: Path) -> None:
    code = (
        "import sys\n"
        "from edgepatch.protocol.bundle import load_bundle\n"
        "b = load_bundle(sys.argv[1]); b.all_params(); b.describe()\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'tensorflow', 'keras'))\n"
        "assert not heavy, heavy\n"
        "print('ok', b.manifest.model_id)\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(pristine)], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONWARNINGS": "error"})

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok digits_cnn"
