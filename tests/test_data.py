"""Datasets, fleet generation, LEAF loader and the bring-your-own-data shard format."""

from __future__ import annotations

import json
import logging
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest

from edgepatch.data.datasets import (
    Dataset,
    DatasetError,
    dataset_for_model,
    load_digits,
    load_mnist1d,
    resize_images,
    upsample_digits_28,
)
from edgepatch.data.fleet import (
    DeviceTransform,
    Drift,
    FleetError,
    base_split,
    draw_transform,
    make_fleet,
    resource_profiles,
    rotate_shift_images,
    write_device_shards,
    write_fleet_shards,
)
from edgepatch.data.leaf import SHAKESPEARE_LETTERS, LeafError, load_leaf, load_leaf_split
from edgepatch.export.reference_models import REFERENCE_MODELS
from edgepatch.protocol.shards import ShardError, read_shard, read_shards, write_shard

FIXTURES = Path(__file__).parent / "fixtures" / "leaf"


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_digits()


@pytest.fixture(scope="module")
def pool(digits: Dataset) -> Dataset:
    return base_split(digits, 0.2, seed=0)[1]


def label_entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# --- offline datasets -------------------------------------------------------------------------------

def test_digits_are_unit_scaled_channel_first(digits: Dataset) -> None:
    assert digits.x.shape == (1797, 1, 8, 8) and digits.x.dtype == np.float32
    assert digits.x.min() == 0.0 and digits.x.max() == 1.0
    assert set(np.unique(digits.y)) == set(range(10))
    standard = load_digits("standard")
    assert abs(float(standard.x.mean())) < 1e-4 and abs(float(standard.x.std()) - 1.0) < 1e-3
    with pytest.raises(DatasetError, match="unknown scale"):
        load_digits("minmax")


def test_resize_keeps_constant_images_and_upsamples_digits() -> None:
    flat = np.full((2, 1, 8, 8), 0.25, np.float32)
    assert np.allclose(resize_images(flat, 28, 28), 0.25)
    up = upsample_digits_28()
    assert up.x.shape == (1797, 1, 28, 28)
    # Bilinear interpolation cannot leave the range of its inputs; ink mass per pixel is about kept.
    assert up.x.min() >= 0.0 and up.x.max() <= 1.0
    assert abs(float(up.x.mean()) - float(load_digits().x.mean())) < 0.02


@pytest.mark.parametrize("model_id", sorted(REFERENCE_MODELS))
def test_dataset_for_model_matches_input_shape(model_id: str) -> None:
    spec = REFERENCE_MODELS[model_id]()
    data = dataset_for_model(model_id, num_samples=100, seed=3)
    assert data.input_shape == tuple(spec.input_shape)
    assert data.num_classes == spec.num_classes
    with pytest.raises(DatasetError, match="no dataset for model"):
        dataset_for_model("resnet50")


def test_mnist1d_is_generated_without_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("mnist1d tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.chdir(tmp_path)  # get_dataset() would drop a pickle in the cwd; make_dataset must not
    np.random.seed(123)
    before = np.random.random()
    np.random.seed(123)
    data = load_mnist1d(num_samples=200, seed=5)
    assert np.random.random() == before, "loading mnist1d changed numpy's global random state"
    assert data.x.shape == (200, 1, 40) and data.x.dtype == np.float32
    assert np.all(np.bincount(data.y, minlength=10) == 20)
    assert list(tmp_path.iterdir()) == []
    again = load_mnist1d(num_samples=200, seed=5)
    other = load_mnist1d(num_samples=200, seed=6)
    assert np.array_equal(data.x, again.x) and not np.array_equal(data.x, other.x)


def test_dataset_rejects_inconsistent_arrays() -> None:
    x = np.zeros((3, 1, 4), np.float32)
    with pytest.raises(DatasetError, match="labels outside"):
        Dataset(x, np.array([0, 1, 5]), np.zeros(3), "bad", 3)
    with pytest.raises(DatasetError, match="t must be"):
        Dataset(x, np.array([0, 1, 2]), np.zeros(2), "bad", 3)


# --- fleet ------------------------------------------------------------------------------------------

def test_label_skew_grows_as_alpha_falls(pool: Dataset) -> None:
    entropies = {}
    for alpha in (0.1, 1.0, 100.0):
        fleet = make_fleet(pool, 20, alpha=alpha, seed=4, samples_per_device=40, tail="uniform")
        entropies[alpha] = np.mean([label_entropy(np.bincount(np.r_[d.train.y, d.holdout.y], minlength=10))
                                    for d in fleet])
    assert entropies[0.1] + 0.5 < entropies[1.0], entropies
    assert entropies[1.0] + 0.15 < entropies[100.0], entropies
    assert entropies[100.0] > 0.85 * np.log(10)  # near IID


def test_zipf_sizes_follow_the_law_and_head_has_more(pool: Dataset) -> None:
    n, min_samples = 16, 8
    fleet = make_fleet(pool, n, alpha=1.0, tail="zipf", seed=2, samples_per_device=60, min_samples=min_samples)
    sizes = np.array([d.num_samples for d in fleet])
    assert sizes.sum() == 60 * n and sizes.min() >= min_samples
    extra = np.sort(sizes - min_samples)[::-1].astype(float)
    expected = (60 * n - n * min_samples) / np.arange(1, n + 1) / np.sum(1 / np.arange(1, n + 1))
    assert np.all(np.abs(extra - expected) <= 1.0), (extra, expected)
    head = sizes[[d.bucket == "head" for d in fleet]]
    tail = sizes[[d.bucket == "tail" for d in fleet]]
    assert len(head) == 4 and head.min() > tail.max()
    assert head.mean() > 3 * tail.mean()


def test_lognormal_sizes_are_skewed(pool: Dataset) -> None:
    fleet = make_fleet(pool, 30, tail="lognormal", lognormal_sigma=1.5, seed=9, samples_per_device=40)
    sizes = np.array([d.num_samples for d in fleet])
    assert sizes.sum() == 1200
    assert sizes.max() > 4 * np.median(sizes)


def test_holdout_is_newer_than_train(pool: Dataset) -> None:
    for device in make_fleet(pool, 12, seed=1, holdout_fraction=0.25):
        assert len(device.train) >= 1 and len(device.holdout) >= 1
        assert device.holdout.t.min() >= device.train.t.max()
        assert np.all(np.diff(device.train.t) >= 0)
        assert abs(len(device.holdout) / device.num_samples - 0.25) <= 1 / device.num_samples + 1e-9


def test_devices_never_share_samples_nor_the_cloud_split(digits: Dataset) -> None:
    cloud, rest = base_split(digits, 0.2, seed=0)
    assert len(cloud) + len(rest) == len(digits)
    assert set(cloud.t.tolist()).isdisjoint(rest.t.tolist())  # t = original index after loading
    assert np.all(np.abs(cloud.class_counts() / digits.class_counts() - 0.2) < 0.02)  # stratified
    fleet = make_fleet(rest, 10, seed=0)
    sources = np.concatenate([np.r_[d.train_source, d.holdout_source] for d in fleet])
    assert len(sources) == len(rest) and len(np.unique(sources)) == len(sources)


def test_transform_is_deterministic_per_seed_and_differs_between_devices(pool: Dataset) -> None:
    first = make_fleet(pool, 6, shift="gain_offset+permutation+noise", seed=11)
    second = make_fleet(pool, 6, shift="gain_offset+permutation+noise", seed=11)
    other = make_fleet(pool, 6, shift="gain_offset+permutation+noise", seed=12)
    for a, b in zip(first, second, strict=True):
        assert np.array_equal(a.train.x, b.train.x) and np.array_equal(a.train.t, b.train.t)
    assert not np.array_equal(first[0].train.x[:5], other[0].train.x[:5])
    gains = [float(d.transform.gain[0]) for d in first]
    assert len(set(gains)) == len(gains)
    perms = [tuple(d.transform.permutation) for d in first]
    assert len(set(perms)) == len(perms)
    # The stored data is exactly the documented transform of the source samples.
    device = first[3]
    assert np.allclose(device.train.x, device.transform.apply(pool.x[device.train_source]))
    assert not np.allclose(device.train.x, pool.x[device.train_source])


def test_no_shift_leaves_samples_untouched(pool: Dataset) -> None:
    device = make_fleet(pool, 4, shift="none", seed=0)[2]
    assert np.array_equal(device.train.x, pool.x[device.train_source])


def test_draw_transform_kinds() -> None:
    rng = np.random.default_rng(0)
    perm = draw_transform(["permutation"], (1, 10, 10), rng).permutation
    assert perm is not None and sorted(perm.tolist()) == list(range(100))
    assert int(np.count_nonzero(perm != np.arange(100))) == 10  # ~10 % of the positions move
    with pytest.raises(FleetError, match="rotation needs"):
        draw_transform(["rotation"], (1, 40), rng)
    with pytest.raises(FleetError, match="unknown shift"):
        make_fleet(load_digits(), 2, shift="blur")


def test_rotation_and_shift_geometry() -> None:
    img = np.zeros((1, 1, 5, 5), np.float32)
    img[0, 0, 0, 2] = 1.0  # top middle
    assert np.allclose(rotate_shift_images(img, 0.0, (0, 0)), img)
    shifted = rotate_shift_images(img, 0.0, (1, 0))
    assert shifted[0, 0, 1, 2] == pytest.approx(1.0)  # moved one row down
    turned = rotate_shift_images(img, 90.0, (0, 0))
    assert turned[0, 0].sum() == pytest.approx(1.0)
    assert abs(turned[0, 0, 2, 0] - 1.0) < 1e-6 or abs(turned[0, 0, 2, 4] - 1.0) < 1e-6
    identity = DeviceTransform()
    assert np.array_equal(identity.apply(img), img)


def test_drift_brings_new_classes_and_a_new_transform(pool: Dataset) -> None:
    drift = Drift(at=0.5, new_classes=(8, 9), new_transform=True)
    fleet = make_fleet(pool, 8, alpha=1.0, seed=5, drift=drift, samples_per_device=100, tail="uniform")
    before, after = [], []
    for device in fleet:
        assert device.drift_time == pytest.approx(0.5 * 7 * 86400)
        ys = np.r_[device.train.y, device.holdout.y]
        ts = np.r_[device.train.t, device.holdout.t]
        before.append(ys[ts < device.drift_time])
        after.append(ys[ts >= device.drift_time])
        assert device.transform_after_drift is not None
        assert not np.allclose(device.transform_after_drift.gain, device.transform.gain)
        # Holdout (newest quarter) lies wholly after the drift: it measures adaptation.
        assert device.holdout.t.min() >= device.drift_time
        post = device.train.t >= device.drift_time
        assert np.allclose(device.train.x[post], device.transform_after_drift.apply(
            pool.x[device.train_source[post]]))
    assert not np.isin(np.concatenate(before), [8, 9]).any()
    share_new = np.isin(np.concatenate(after), [8, 9]).mean()
    assert 0.35 < share_new < 0.65


def test_fleet_rejects_impossible_requests(pool: Dataset) -> None:
    with pytest.raises(FleetError, match="needs"):
        make_fleet(pool, 10, samples_per_device=1000)
    with pytest.raises(FleetError, match="alpha"):
        make_fleet(pool, 10, alpha=0.0)
    with pytest.raises(FleetError, match="new_classes"):
        make_fleet(pool, 4, drift=Drift(new_classes=(12,)))


def test_device_shards_round_trip(pool: Dataset, tmp_path: Path) -> None:
    fleet = make_fleet(pool, 3, seed=0)
    device = fleet[0]
    paths = write_device_shards(device, tmp_path / "dev", shard_size=16)
    assert len(paths) == -(-len(device.train) // 16)
    x, y, t = read_shards(tmp_path / "dev", device.train.input_shape, 10)
    assert np.array_equal(x, device.train.x) and np.array_equal(y, device.train.y)
    assert np.array_equal(t, device.train.t)
    dirs = write_fleet_shards(fleet, tmp_path / "fleet")
    assert sorted(dirs) == ["dev-000", "dev-001", "dev-002"]
    _, hy, ht = read_shards(tmp_path / "fleet" / "dev-002" / "holdout", (1, 8, 8), 10)
    assert np.array_equal(hy, fleet[2].holdout.y) and ht.min() >= fleet[2].train.t.max()


# --- LEAF -------------------------------------------------------------------------------------------

def test_leaf_femnist_fixture() -> None:
    leaf = load_leaf(FIXTURES / "femnist")
    assert leaf.users == ["f0000_14", "f0001_41", "f0002_07"]  # across two train files, file order
    for user in leaf.users:
        train, test = leaf.train[user], leaf.test[user]
        assert train.x.shape == (3, 1, 28, 28) and test.x.shape == (2, 1, 28, 28)
        assert train.num_classes == 62 and train.x.dtype == np.float32
        assert test.t.min() > train.t.max()
    assert leaf.train["f0002_07"].y.tolist()[2] == 36
    doc = json.loads((FIXTURES / "femnist/train/all_data_1_niid_train.json").read_text())
    first = np.asarray(doc["user_data"]["f0002_07"]["x"][0], np.float32).reshape(28, 28)
    assert np.array_equal(leaf.train["f0002_07"].x[0, 0], first)  # row-major 784 → 28×28
    digits_only = load_leaf(FIXTURES / "femnist", digits_only=True)
    assert all(len(d) == 2 and d.y.max() < 10 and d.num_classes == 10 for d in digits_only.train.values())


def test_leaf_shakespeare_fixture() -> None:
    leaf = load_leaf(FIXTURES / "shakespeare", kind="shakespeare")
    hamlet = leaf.train["THE_TRAGEDY_HAMLET"]
    assert hamlet.x.shape[1:] == (80,) and hamlet.x.dtype == np.int64
    assert "".join(SHAKESPEARE_LETTERS[i] for i in hamlet.x[0]).startswith("To be, or not to be")
    assert hamlet.num_classes == 80


def _femnist_copy(tmp_path: Path) -> tuple[Path, Path, dict]:
    root = tmp_path / "femnist"
    shutil.copytree(FIXTURES / "femnist", root)
    path = root / "train" / "all_data_0_niid_train.json"
    return root, path, json.loads(path.read_text())


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d["num_samples"].__setitem__(0, 7), "num_samples says 7 but user_data holds 3"),
    (lambda d: d["user_data"]["f0000_14"]["x"][1].pop(), "sample 1 has 783 features, FEMNIST needs 784"),
    (lambda d: d["user_data"]["f0000_14"]["y"].pop(), "3 samples in x but 2 labels"),
    (lambda d: d["user_data"]["f0001_41"]["y"].__setitem__(0, 62), r"label 0 = 62 outside \[0, 62\)"),
    (lambda d: d["user_data"]["f0001_41"]["y"].__setitem__(1, 2.5), "label 1 is 2.5, expected an integer"),
    (lambda d: d["user_data"]["f0001_41"]["x"][0].__setitem__(5, "a"), "non-numeric"),
    (lambda d: d.pop("user_data"), "missing key 'user_data'"),
    (lambda d: d["users"].append("ghost"), "2 num_samples"),
    (lambda d: d["user_data"].pop("f0001_41"), "user 'f0001_41': user_data entry"),
])
def test_leaf_malformed_files_are_named(tmp_path: Path, edit, message: str) -> None:
    root, path, doc = _femnist_copy(tmp_path)
    edit(doc)
    path.write_text(json.dumps(doc))
    with pytest.raises(LeafError, match=message) as info:
        load_leaf(root)
    assert str(path) in str(info.value)


def test_leaf_truncated_json_and_layout_errors(tmp_path: Path) -> None:
    root, path, _ = _femnist_copy(tmp_path)
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(LeafError, match="malformed JSON at line 1"):
        load_leaf(root)
    shutil.copy(FIXTURES / "femnist/train/all_data_0_niid_train.json", path)
    shutil.copy(path, root / "train" / "dup.json")
    with pytest.raises(LeafError, match="more than one file"):
        load_leaf_split(root / "train")
    shutil.rmtree(root / "test")
    with pytest.raises(LeafError, match="missing test/"):
        load_leaf(root)
    with pytest.raises(LeafError, match="unknown LEAF kind"):
        load_leaf_split(path, kind="celeba")


def test_leaf_shakespeare_rejects_bad_strings(tmp_path: Path) -> None:
    bad = {"users": ["u"], "num_samples": [1], "user_data": {"u": {"x": ["x" * 79], "y": ["a"]}}}
    (tmp_path / "a.json").write_text(json.dumps(bad))
    with pytest.raises(LeafError, match="79 characters, Shakespeare needs 80"):
        load_leaf_split(tmp_path, "shakespeare")
    bad["user_data"]["u"]["x"] = ["é" * 80]
    (tmp_path / "a.json").write_text(json.dumps(bad))
    with pytest.raises(LeafError, match="not in LEAF's vocabulary"):
        load_leaf_split(tmp_path, "shakespeare")


# --- shards -----------------------------------------------------------------------------------------

def _arrays(n: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, 1, 4, 4)).astype(np.float32), rng.integers(0, 3, n),
            rng.uniform(1.7e9, 1.8e9, n))


def test_shards_round_trip_sorted_by_time(tmp_path: Path) -> None:
    x1, y1, t1 = _arrays(6, 0)
    x2, y2, t2 = _arrays(5, 1)
    write_shard(tmp_path / "b.npz", x1, y1, t1)
    write_shard(tmp_path / "a.npz", x2, y2, t2)
    (tmp_path / "notes.txt").write_text("ignored")
    x, y, t = read_shards(tmp_path, (1, 4, 4), 3)
    assert x.dtype == np.float32 and y.dtype == np.int64 and t.dtype == np.float64
    assert len(x) == 11 and np.all(np.diff(t) >= 0)
    all_x, all_y, all_t = np.concatenate([x1, x2]), np.concatenate([y1, y2]), np.concatenate([t1, t2])
    order = np.argsort(all_t)
    assert np.array_equal(x, all_x[order]) and np.array_equal(y, all_y[order])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_empty_and_missing_directories(tmp_path: Path) -> None:
    x, y, t = read_shards(tmp_path, (1, 4, 4), 3)
    assert x.shape == (0, 1, 4, 4) and y.shape == (0,) and t.shape == (0,)
    with pytest.raises(ShardError, match="does not exist"):
        read_shards(tmp_path / "nope", (1, 4, 4), 3)


def _raw_shard(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def _bad_shards(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    x, y, t = _arrays()
    good = write_shard(tmp_path / "good.npz", x, y, t)
    data = good.read_bytes()
    cases: dict[str, tuple[Path, str]] = {}
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(data[: len(data) // 2])
    cases["truncated"] = (truncated, "truncated or corrupt")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip at all")
    cases["garbage"] = (garbage, "unreadable shard")
    cases["shape"] = (_raw_shard(tmp_path / "shape.npz", x=x.reshape(6, 1, 2, 8), y=y, t=t),
                      r"sample shape \(1, 2, 8\), expected \(1, 4, 4\)")
    cases["label"] = (_raw_shard(tmp_path / "label.npz", x=x, y=np.r_[y[:-1], 3], t=t),
                      r"label 3 is out of range \[0, 3\)")
    cases["negative"] = (_raw_shard(tmp_path / "negative.npz", x=x, y=np.r_[-1, y[1:]], t=t), "label -1 is negative")
    nan_x = x.copy()
    nan_x[2, 0, 1, 1] = np.nan
    cases["nan_x"] = (_raw_shard(tmp_path / "nan_x.npz", x=nan_x, y=y, t=t), "x holds 1 NaN/inf")
    cases["nan_t"] = (_raw_shard(tmp_path / "nan_t.npz", x=x, y=y, t=np.r_[t[:-1], np.nan]), "t holds NaN")
    cases["length"] = (_raw_shard(tmp_path / "length.npz", x=x, y=y[:5], t=t),
                       "length mismatch: x has 6 samples, y 5, t 6")
    cases["missing"] = (_raw_shard(tmp_path / "missing.npz", x=x, y=y), r"missing array\(s\) \['t'\]")
    cases["int_x"] = (_raw_shard(tmp_path / "int_x.npz", x=x.astype(np.int32), y=y, t=t), "x must hold floats")
    cases["float_y"] = (_raw_shard(tmp_path / "float_y.npz", x=x, y=y.astype(np.float32), t=t),
                        "y must hold integer labels")
    cases["object"] = (_raw_shard(tmp_path / "object.npz", x=x, y=np.array(list(y), dtype=object), t=t),
                       "object arrays")
    return cases


def test_each_bad_shard_is_named(tmp_path: Path) -> None:
    cases = _bad_shards(tmp_path)
    for name, (path, message) in cases.items():
        with pytest.raises(ShardError, match=message) as info:
            read_shard(path, (1, 4, 4), 3)
        assert info.value.path == path, name
        assert str(path) in str(info.value), name


def test_bad_shard_fails_the_directory_unless_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    x, y, t = _arrays()
    write_shard(tmp_path / "0-good.npz", x, y, t)
    (tmp_path / "1-truncated.npz").write_bytes((tmp_path / "0-good.npz").read_bytes()[:100])
    _raw_shard(tmp_path / "2-nan.npz", x=np.full_like(x, np.nan), y=y, t=t)
    with pytest.raises(ShardError, match="1-truncated.npz"):
        read_shards(tmp_path, (1, 4, 4), 3)
    with caplog.at_level(logging.WARNING, logger="edgepatch.protocol.shards"):
        kept_x, kept_y, _ = read_shards(tmp_path, (1, 4, 4), 3, skip_bad=True)
    assert np.array_equal(kept_x, x[np.argsort(t)]) and np.array_equal(kept_y, y[np.argsort(t)])
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "1-truncated.npz" in logged and "2-nan.npz" in logged


def test_write_shard_refuses_bad_arrays(tmp_path: Path) -> None:
    x, y, t = _arrays()
    with pytest.raises(ShardError, match="length mismatch"):
        write_shard(tmp_path / "s.npz", x, y[:3], t)
    with pytest.raises(ShardError, match="must end in .npz"):
        write_shard(tmp_path / "s.bin", x, y, t)
    assert list(tmp_path.iterdir()) == []


def test_resource_profiles_follow_lognormal_and_markov_load() -> None:
    profiles = resource_profiles(400, seed=3, speed_sigma=0.5)
    log_speeds = np.log([p.speed_factor for p in profiles])
    assert abs(log_speeds.mean()) < 0.08 and abs(log_speeds.std() - 0.5) < 0.06
    assert resource_profiles(400, seed=3) == profiles
    device = profiles[0]
    busy = device.busy_trace(20000)
    assert abs(busy.mean() - 0.1 / (0.1 + 0.3)) < 0.03  # stationary share of the busy state
    stay_busy = np.mean(busy[1:][busy[:-1]])
    assert abs(stay_busy - 0.7) < 0.03  # P(busy → busy) = 1 - p_become_idle
    speed = device.speed_trace(50)
    assert np.allclose(speed[busy[:50]], device.speed_factor / 3.0)
    assert np.allclose(speed[~busy[:50]], device.speed_factor)
    with pytest.raises(FleetError, match="p_become_idle"):
        resource_profiles(2, p_become_idle=0.0)


def test_miscalibration_shifts_every_device_noticeably() -> None:
    from edgepatch.data.fleet import draw_transform

    rng = np.random.default_rng(0)
    for _ in range(50):
        t = draw_transform(("miscalibration",), (1, 8, 8), rng, strength=2.0)
        assert t.gain is not None and t.offset is not None
        assert np.all(np.abs(np.log(t.gain)) >= 0.6 - 1e-6) and np.all(np.abs(np.log(t.gain)) <= 1.2 + 1e-6)
        assert np.all(np.abs(t.offset) >= 0.6 - 1e-6) and np.all(np.abs(t.offset) <= 1.2 + 1e-6)
