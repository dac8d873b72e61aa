"""The whole loop for each kind of model source (issue 9): `edgepatch export` → `edgepatch device run`
trains φ in LiteRT and publishes it over a real Mosquitto → `edgepatch cloud serve --data` distils and
republishes → the device adopts the new bundle and trains on it. Every step is the CLI as a subprocess.

Source kinds: a `ModelSpec` (module:attr), a torch module (file.py:attr, weights from a torch state dict),
a Keras model (file.py:attr, its own weights) and a saved `.keras` file. That each conversion matches its
framework's own forward (LiteRT and ExecuTorch, ≤ 1e-4 on logits) is tested in tests/test_model_sources.py;
here the converted model runs through the product. One more test makes every distillation fail and
checks the companion counts, shows and backs off instead of spinning.

Data: scikit-learn's breast cancer set (3 × 10, 2 classes): 40 % as the companion's `--data`, the rest
as one device's shards.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # pytest runs with --import-mode=importlib
from byo_common import SPEC_MODULE, Serve, breast_cancer_3x10, http_json, http_text, metric, ok, run_cli  # noqa: E402
from polling import wait_until  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.broker]

TORCH_MODULE = '''
import torch
from torch import nn


def net() -> nn.Module:
    model = nn.Sequential(nn.Conv1d(3, 16, 3, padding=1), nn.BatchNorm1d(16), nn.ReLU(),
                          nn.Conv1d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(160, 2))
    model.input_shape = (3, 10)  # channel-first, without the batch
    return model
'''

KERAS_MODULE = '''
import keras


def net() -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input(shape=(10, 3)),  # Keras is channel-last: 10 positions, 3 channels
                             keras.layers.Conv1D(16, 3, padding="same", activation="relu"),
                             keras.layers.Conv1D(16, 3, padding="same", activation="relu"),
                             keras.layers.Flatten(), keras.layers.Dense(2)])
'''


@pytest.fixture(scope="module")
def user(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's folder: model files, the companion's data (cloud.npz) and one device's shard directory."""
    from edgepatch.protocol.shards import write_shard

    root = tmp_path_factory.mktemp("user")
    (root / "mymodels.py").write_text(SPEC_MODULE)
    (root / "torchnet.py").write_text(TORCH_MODULE)
    (root / "kerasnet.py").write_text(KERAS_MODULE)
    x, y = breast_cancer_3x10()
    order = np.random.default_rng(0).permutation(len(y))
    cloud, device = order[:228], order[228:]
    np.savez(root / "cloud.npz", x=x[cloud], y=y[cloud])
    # The device's sensor reads channel 0 with a gain and an offset: something φ can learn.
    xd = x[device].copy()
    xd[:, 0] = 1.5 * xd[:, 0] + 0.5
    write_shard(root / "device" / "shard-0.npz", xd, y[device], 1.8e9 + np.arange(len(device), dtype=np.float64))
    return root


def _torch_weights(user: Path) -> Path:
    """The user trained their torch module as usual and saved a state dict (docs/models.md, "weights")."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(user))
    try:
        from torchnet import net  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(user))
    torch.manual_seed(0)
    model = net()
    with np.load(user / "cloud.npz") as data:
        x, y = torch.from_numpy(data["x"]), torch.from_numpy(data["y"])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    torch.save(model.state_dict(), user / "torchnet.pt")
    return user / "torchnet.pt"


def _keras_file(user: Path) -> Path:
    """A Keras model saved the Keras way (`model.save("net.keras")`)."""
    sys.path.insert(0, str(user))
    try:
        from kerasnet import net  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(user))
    path = user / "kerasnet.keras"
    net().save(path)
    return path


def _export_args(kind: str, user: Path) -> list[str | Path]:
    if kind == "spec":  # no weights: pretrained on --data, accuracy on a held-out part
        return ["--model", "mymodels:tiny1d", "--data", "cloud.npz"]
    if kind == "torch":
        return ["--model", "torchnet.py:net", "--weights", _torch_weights(user).name]
    if kind == "keras":
        return ["--model", "kerasnet.py:net"]
    return ["--model", _keras_file(user).name]


def _export(kind: str, user: Path) -> Path:
    """`edgepatch export` of one source kind, once per module (the failure test reuses the spec bundle)."""
    bundle = user / f"bundle-{kind}"
    if not bundle.exists():
        export = ok(run_cli("export", *_export_args(kind, user), "--variants", "1,0.5", "--runtimes", "litert",
                            "--out", bundle, cwd=user, timeout=600))
        if kind == "spec":
            held = re.search(r"accuracy on (\d+) held-out samples \(not trained on\): ([0-9.]+)", export.stderr)
            assert held and int(held.group(1)) >= 40 and float(held.group(2)) >= 0.85, export.stderr
            print(f"spec: pretrained on cloud.npz, held-out accuracy {held.group(2)} on {held.group(1)} samples")
    return bundle


@pytest.mark.parametrize("kind", ["spec", "torch", "keras", "keras_file"])
def test_source_exports_trains_on_device_and_is_distilled(kind: str, user: Path, mosquitto: Any) -> None:
    from edgepatch.protocol.bundle import load_bundle

    t0 = time.monotonic()
    bundle = _export(kind, user)
    with load_bundle(bundle) as b:
        first = b.base_version
        assert b.manifest.input.shape == (3, 10) and b.manifest.labels.num_classes == 2
    t_export = time.monotonic() - t0

    broker = f"mqtt://127.0.0.1:{mosquitto.port}"
    serve = Serve(["--bundle", bundle, "--data", "cloud.npz", "--broker", broker, "--work-dir", f"cloud-{kind}",
                   "--fleet", kind, "--distill-after", "1", "--base-every", "1"], user / f"serve-{kind}.log", cwd=user)
    try:
        serve.wait_for("companion serving")
        assert "distillation: momodistill (mode proxy) on 228 labelled samples" in serve.text(), serve.text()
        device = ok(run_cli("device", "run", "--bundle", bundle, "--data", "device", "--state-dir", f"dev-{kind}",
                            "--broker", broker, "--fleet", kind, "--device-id", "d1", "--rounds", "2",
                            "--steps", "10", "--await-bundle", "240", cwd=user, timeout=420))
        assert "round 1:" in device.stderr and "round 2:" in device.stderr, device.stderr
        adopted = re.search(r"bundle adopted: ([0-9a-f]{12})", device.stderr)
        assert adopted, f"the device never adopted a distilled bundle:\n{device.stderr}\n{serve.text()[-3000:]}"
        # The round enters the history once its rollout has decided: the device (the canary) may have
        # adopted the bundle a moment before the companion saw its gate report.
        wait_until(lambda: http_json(f"{serve.url}/api/fleet")["distillation"]["rounds"] >= 1, 120,
                   "the distillation round to be recorded")
        assert metric(serve.url, "edgepatch_distillation_runs_total") >= 1
        assert metric(serve.url, "edgepatch_bundles_published_total") >= 2
        assert metric(serve.url, "edgepatch_distillation_failures_total") == 0
        fleet = http_json(f"{serve.url}/api/fleet")
        assert fleet["distillation"]["blocked"] is None, fleet
        published = sorted((user / f"cloud-{kind}" / "bundles").iterdir())
        with load_bundle(published[0]) as b:
            assert b.base_version != first and b.manifest.meta["parent_base_version"] == first
    finally:
        code = serve.stop()
    assert code == 0, serve.text()[-3000:]
    assert "Traceback" not in serve.text()
    print(f"{kind}: export {t_export:.1f} s, loop {time.monotonic() - t0 - t_export:.1f} s")


def test_failing_rounds_are_counted_shown_and_backed_off(user: Path, mosquitto: Any) -> None:
    """Every round fails (the companion cannot write its bundle directory) until the cause is removed."""
    bundle = _export("spec", user)
    work = user / "cloud-failing"
    work.mkdir()
    blocker = work / "bundles"
    blocker.write_text("a file where the companion wants its bundle directory")
    broker = f"mqtt://127.0.0.1:{mosquitto.port}"
    serve = Serve(["--bundle", bundle, "--data", "cloud.npz", "--broker", broker, "--work-dir", work,
                   "--fleet", "failing", "--distill-after", "1", "--base-every", "1"], user / "serve-failing.log", cwd=user)
    try:
        serve.wait_for("companion serving")
        ok(run_cli("device", "run", "--bundle", bundle, "--data", "device", "--state-dir", "dev-failing",
                   "--broker", broker, "--fleet", "failing", "--device-id", "d1", "--rounds", "1", "--steps", "5",
                   cwd=user, timeout=300))
        serve.wait_metric("edgepatch_distillation_failures_total", 2, timeout=120)
        time.sleep(3.0)  # with back-off (2 s, 4 s, 8 s …) this window holds at most one more try
        failures = metric(serve.url, "edgepatch_distillation_failures_total")
        assert 2 <= failures <= 3, f"{failures} failed rounds: not backing off\n{serve.text()[-3000:]}"
        page = http_text(f"{serve.url}/fleet")
        assert "Last round failed" in page and "next try in" in page, page
        status = http_json(f"{serve.url}/api/fleet")["distillation"]
        assert status["failures"] >= 2 and "bundles" in status["last_error"], status
        log = serve.text()
        assert log.count("distillation round failed") == failures and "Traceback" not in log, log[-3000:]
        waits = [float(w) for w in re.findall(r"next try in (\d+) s", log)]
        assert waits[:2] == [2.0, 4.0], waits

        blocker.unlink()  # the cause goes away: the next try (after the back-off) publishes
        # The next try waits out its back-off, then distils and publishes the distilled bundle.
        serve.wait_metric("edgepatch_bundles_published_total", 2, timeout=180)
        assert metric(serve.url, "edgepatch_distillation_failures_total") == failures  # no failure since
    finally:
        code = serve.stop()
    assert code == 0, serve.text()[-3000:]


def test_without_data_fedavg_patches_runs_once_per_set_of_patches(user: Path, mosquitto: Any) -> None:
    """No `--data`: the companion says so at start-up, and `fedavg_patches` (φ alone) still aggregates —
    once for the patches it got, not again every second on the same ones (W, hence the base, is unchanged)."""
    bundle = _export("spec", user)
    broker = f"mqtt://127.0.0.1:{mosquitto.port}"
    serve = Serve(["--bundle", bundle, "--aggregator", "fedavg_patches", "--broker", broker, "--work-dir",
                   "cloud-fedavg", "--fleet", "fedavg", "--distill-after", "1", "--base-every", "1"], user / "serve-fedavg.log", cwd=user)
    try:
        serve.wait_for("companion serving")
        assert "distillation: fedavg_patches (mode proxy) on no data" in serve.text(), serve.text()
        ok(run_cli("device", "run", "--bundle", bundle, "--data", "device", "--state-dir", "dev-fedavg",
                   "--broker", broker, "--fleet", "fedavg", "--device-id", "d1", "--rounds", "1", "--steps", "5",
                   cwd=user, timeout=300))
        serve.wait_metric("edgepatch_distillation_runs_total", 1, timeout=120)
        time.sleep(4.0)  # four turns of the companion's loop
        assert metric(serve.url, "edgepatch_distillation_runs_total") == 1, serve.text()[-3000:]
        assert metric(serve.url, "edgepatch_distillation_failures_total") == 0
    finally:
        code = serve.stop()
    assert code == 0 and "Traceback" not in serve.text(), serve.text()[-3000:]
