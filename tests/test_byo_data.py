"""Bring-your-own data: every bad input gets one clear line naming the problem (issue 9).

The readers (`edgepatch.data.byo`) are tested in-process; the commands (`export`, `cloud serve`) as
subprocesses, so the exit code and the one `error:` line a user sees are what is checked.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

from edgepatch.data.byo import DataError, LabelledData, load_labelled, load_unlabelled
from edgepatch.protocol.shards import write_shard

sys.path.insert(0, str(Path(__file__).parent))  # pytest runs with --import-mode=importlib: no test dir on the path
from byo_common import SPEC_MODULE, breast_cancer_3x10, ok, one_line_error, run_cli  # noqa: E402

SHAPE = (3, 10)


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's folder: their model (mymodels.py), good data (cancer.npz) and base weights (w.npz)."""
    from edgepatch.protocol.params import init_params, save_params

    root = tmp_path_factory.mktemp("user")
    (root / "mymodels.py").write_text(SPEC_MODULE)
    x, y = breast_cancer_3x10()
    np.savez(root / "cancer.npz", x=x, y=y)
    np.savez(root / "flat.npz", x=x.reshape(len(x), 30), y=y)  # forgot the channel layout
    sys.path.insert(0, str(root))
    try:
        from mymodels import tiny1d  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(root))
    save_params(root / "w.npz", init_params(tiny1d(), None, 0))
    return root


@pytest.fixture(scope="module")
def tiny_bundle(user_dir: Path) -> Path:
    """A real bundle of the user's model (LiteRT only, explicit variants, weights given: no data needed)."""
    out = user_dir / "bundle"
    ok(run_cli("export", "--model", "mymodels:tiny1d", "--weights", "w.npz", "--variants", "1,0.5",
               "--runtimes", "litert", "--out", out, cwd=user_dir, timeout=600))
    return out


# -- the readers ------------------------------------------------------------------------------------

def test_npz_of_the_wrong_shape_names_file_and_both_shapes(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.zeros((5, 30), np.float32), y=np.zeros(5, np.int64))
    with pytest.raises(DataError) as err:
        load_labelled(tmp_path / "d.npz", SHAPE, 2)
    text = str(err.value)
    assert "\n" not in text and "d.npz" in text and "(30,)" in text and "(3, 10)" in text, text


def test_npz_without_labels_lists_keys_found_and_expected(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.zeros((5, 3, 10), np.float32), labels=np.zeros(5, np.int64))
    with pytest.raises(DataError, match=r"missing array\(s\) \['y'\]; found \['labels', 'x'\], expected \['x', 'y'\]"):
        load_labelled(tmp_path / "d.npz", SHAPE, 2)
    # A proxy set needs only x: the same file is a fine unlabelled set.
    assert load_unlabelled(tmp_path / "d.npz", SHAPE).shape == (5, 3, 10)


class _Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (str(Path(__file__).parent / "PWNED-by-byo-data"),))


def test_pickled_objects_are_refused_and_never_run(tmp_path: Path) -> None:
    marker = Path(__file__).parent / "PWNED-by-byo-data"
    np.savez(tmp_path / "evil.npz", x=np.array([_Payload()], dtype=object), y=np.zeros(1, np.int64))
    (tmp_path / "evil-pickle.npz").write_bytes(pickle.dumps({"x": _Payload()}))
    for name in ("evil.npz", "evil-pickle.npz"):
        with pytest.raises(DataError, match="not a numpy .npz archive of plain arrays|unreadable .npz") as err:
            load_labelled(tmp_path / name, SHAPE, 2)
        assert name in str(err.value)
    assert not marker.exists()


def test_not_an_npz_nor_a_directory(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("1,2,3\n")
    with pytest.raises(DataError, match="neither a shard directory nor an .npz file"):
        load_labelled(tmp_path / "data.csv", SHAPE, 2)
    with pytest.raises(DataError, match="does not exist"):
        load_labelled(tmp_path / "missing", SHAPE, 2)
    np.save(tmp_path / "one.npy", np.zeros((2, 3, 10)))
    (tmp_path / "one.npz").write_bytes((tmp_path / "one.npy").read_bytes())
    with pytest.raises(DataError, match="single array, not an .npz archive"):
        load_labelled(tmp_path / "one.npz", SHAPE, 2)


def test_labels_out_of_range_and_nan(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 3, 10), np.float32), y=np.array([0, 1, 2, 1]))
    with pytest.raises(DataError, match=r"label 2 is out of range \[0, 2\)"):
        load_labelled(tmp_path / "d.npz", SHAPE, 2)
    x = np.zeros((4, 3, 10), np.float32)
    x[1, 2, 3] = np.nan
    np.savez(tmp_path / "n.npz", x=x, y=np.zeros(4, np.int64))
    with pytest.raises(DataError, match="1 NaN/inf"):
        load_labelled(tmp_path / "n.npz", SHAPE, 2)


def test_shard_directory_names_the_bad_shard(tmp_path: Path) -> None:
    good, bad = tmp_path / "shards", tmp_path / "shards" / "b.npz"
    write_shard(good / "a.npz", np.zeros((3, 3, 10), np.float32), np.array([0, 1, 0]), np.arange(3.0))
    data = load_labelled(good, SHAPE, 2)
    assert data.x.shape == (3, 3, 10) and data.y.tolist() == [0, 1, 0]
    write_shard(bad, np.zeros((3, 10, 3), np.float32), np.array([0, 1, 0]), np.arange(3.0))
    with pytest.raises(DataError) as err:
        load_labelled(good, SHAPE, 2)
    assert "b.npz" in str(err.value) and "(10, 3)" in str(err.value) and "(3, 10)" in str(err.value)
    with pytest.raises(DataError, match="holds no"):
        (tmp_path / "empty").mkdir()
        load_labelled(tmp_path / "empty", SHAPE, 2)


def test_holdout_split_is_disjoint_stratified_and_complete() -> None:
    x, y = breast_cancer_3x10()
    train, held = LabelledData(x, y, "cancer").split(0.2, seed=1)
    assert len(train) + len(held) == len(y) == 569
    rows = {tuple(r) for r in x.reshape(len(x), -1).round(5)}
    assert len(rows) == len(y)  # every sample distinct, so disjointness below is meaningful
    held_rows = {tuple(r) for r in held.x.reshape(len(held), -1).round(5)}
    assert held_rows.isdisjoint({tuple(r) for r in train.x.reshape(len(train), -1).round(5)})
    for cls in (0, 1):  # each class held out at its own 20 %
        assert abs((held.y == cls).sum() - 0.2 * (y == cls).sum()) <= 1


# -- the commands -----------------------------------------------------------------------------------

def test_export_without_weights_or_data_says_what_to_pass(user_dir: Path) -> None:
    err = one_line_error(run_cli("export", "--model", "mymodels:tiny1d", "--out", "nope", cwd=user_dir))
    assert "'tiny1d' needs data" in err and "--data PATH" in err and "--weights" in err and "(N, 3, 10)" in err, err
    assert not (user_dir / "nope").exists()


def test_export_with_data_of_the_wrong_shape(user_dir: Path) -> None:
    err = one_line_error(run_cli("export", "--model", "mymodels:tiny1d", "--data", "flat.npz", "--out", "nope",
                                 cwd=user_dir))
    assert "flat.npz" in err and "sample shape (30,)" in err and "(3, 10)" in err, err
    assert not (user_dir / "nope").exists()


def test_export_variant_search_without_data_says_so(user_dir: Path) -> None:
    err = one_line_error(run_cli("export", "--model", "mymodels:tiny1d", "--weights", "w.npz", "--out", "nope",
                                 cwd=user_dir))
    assert "variant search" in err and "--data" in err and "--variants" in err, err


def test_explore_without_data_says_so(user_dir: Path) -> None:
    err = one_line_error(run_cli("explore", "--model", "mymodels:tiny1d", "--weights", "w.npz", "--out", "dse",
                                 cwd=user_dir))
    assert "'tiny1d' needs data for the variant search" in err and "--data PATH" in err, err
    assert not (user_dir / "dse").exists()


def test_explicit_variants_need_no_data(tiny_bundle: Path) -> None:
    from edgepatch.protocol.bundle import load_bundle

    with load_bundle(tiny_bundle) as bundle:
        rows = bundle.manifest.variants
        assert bundle.manifest.model_id == "tiny1d" and bundle.manifest.input.shape == (3, 10)
    assert [r.keep for r in rows] == [{"c1": 1.0, "c2": 1.0}, {"c1": 0.5, "c2": 0.5}]
    assert all(r.convergence is None for r in rows)  # nothing to measure it on, and nothing made up


def test_cloud_serve_refuses_data_of_the_wrong_shape_at_start_up(user_dir: Path, tiny_bundle: Path) -> None:
    err = one_line_error(run_cli("cloud", "serve", "--bundle", tiny_bundle, "--data", "flat.npz",
                                 "--broker", "mqtt://127.0.0.1:9", "--work-dir", "cloud-x", cwd=user_dir, timeout=120))
    assert "flat.npz" in err and "(30,)" in err and "(3, 10)" in err, err
    np.savez(user_dir / "proxy-bad.npz", x=np.zeros((4, 10, 3), np.float32))
    err = one_line_error(run_cli("cloud", "serve", "--bundle", tiny_bundle, "--proxy", "proxy-bad.npz",
                                 "--broker", "mqtt://127.0.0.1:9", "--work-dir", "cloud-x", cwd=user_dir, timeout=120))
    assert "proxy-bad.npz" in err and "(10, 3)" in err, err


def test_cloud_serve_refuses_automatic_rounds_that_could_never_run(user_dir: Path, tiny_bundle: Path) -> None:
    err = one_line_error(run_cli("cloud", "serve", "--bundle", tiny_bundle, "--distill-after", "2",
                                 "--broker", "mqtt://127.0.0.1:9", "--work-dir", "cloud-x", cwd=user_dir, timeout=120))
    assert "'momodistill'" in err and "--data" in err and "fedavg_patches" in err, err
    err = one_line_error(run_cli("cloud", "serve", "--bundle", tiny_bundle, "--distill-after", "2", "--data",
                                 "cancer.npz", "--mode", "samples", "--broker", "mqtt://127.0.0.1:9",
                                 "--work-dir", "cloud-x", cwd=user_dir, timeout=120))
    assert "never sends" in err and "--mode proxy" in err, err


def test_companion_without_data_says_which_aggregators_can_run(tiny_bundle: Path, tmp_path: Path) -> None:
    from edgepatch.cloud.companion import Companion, CompanionConfig

    companion = Companion(CompanionConfig(bundle=tiny_bundle, work_dir=tmp_path / "c"))
    try:
        assert companion.blocked is not None
        assert "needs an unlabelled proxy set (--proxy or --data)" in companion.blocked
        assert "these can run: fedavg_patches" in companion.blocked
        status = companion.distill_status()
        assert status["blocked"] == companion.blocked and status["data"] == "no data"
    finally:
        companion.store.close()
    fedavg = Companion(CompanionConfig(bundle=tiny_bundle, work_dir=tmp_path / "f", aggregator="fedavg_patches",
                                       distill_after=2))
    try:
        assert fedavg.blocked is None  # φ alone is enough
    finally:
        fedavg.store.close()
    # An unlabelled proxy set (a shard directory; labels ignored) is all MoMoDistill's proxy mode needs, but
    # not enough for model_over_data, which trains on labels.
    x, y = breast_cancer_3x10()
    write_shard(tmp_path / "proxy" / "p.npz", x[:50], y[:50], np.arange(50.0))
    proxied = Companion(CompanionConfig(bundle=tiny_bundle, work_dir=tmp_path / "p", proxy=tmp_path / "proxy"))
    try:
        assert proxied.blocked is None and proxied.cloud_data.proxy_x is not None
        assert proxied.cloud_data.proxy_x.shape == (50, 3, 10) and proxied.cloud_data.x is None
        assert proxied.startup_note().startswith("distillation: momodistill (mode proxy) on 50 proxy samples")
    finally:
        proxied.store.close()
    with pytest.raises(ValueError, match="'model_over_data' .* needs labelled data \\(--data\\)"):
        Companion(CompanionConfig(bundle=tiny_bundle, work_dir=tmp_path / "m", proxy=tmp_path / "proxy",
                                  aggregator="model_over_data", distill_after=1))
