"""docs/android.md against the real thing: the Kotlin snippet's signature, input and output names against
the LiteRT signatures of an exported bundle, its message fields and topics against the protocol, and the
sample envelope through the companion's decoder (content hash recomputed)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from edgepatch.protocol.messages import PatchUpdate, decode, encode, make_message
from edgepatch.protocol.topics import Channel, bundle_topic, device_topic

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "android.md"


def kotlin() -> str:
    blocks = re.findall(r"```kotlin\n(.*?)```", GUIDE.read_text(), flags=re.S)
    assert blocks, "docs/android.md has no ```kotlin block"
    return "\n".join(blocks)


def contract() -> dict[str, object]:
    """The `object Contract` constants of the snippet: const strings and listOf(...) string lists."""
    body = kotlin().split("object Contract {", 1)[1].split("\n}", 1)[0]
    out: dict[str, object] = {n: v for n, v in re.findall(r'const val (\w+) = "([^"]*)"', body)}
    for name, items in re.findall(r"val (\w+) = listOf\(([^)]*)\)", body):
        out[name] = re.findall(r'"([^"]*)"', items)
    return out


def function(name: str) -> str:
    """The text of one top-level Kotlin function or class (up to the next blank-line-separated definition)."""
    src = kotlin()
    start = src.index(name)
    nxt = re.search(r"\n\n(?:fun |class |/\*\*|// --)", src[start:])
    return src[start:start + nxt.start()] if nxt else src[start:]


def sig_name(vid: str) -> str:
    return vid.replace("-", "_")


# -- LiteRT names against an exported bundle -------------------------------------------------------------

@pytest.mark.slow
def test_snippet_names_match_the_bundles_litert_signatures(digits_bundle: Path) -> None:
    from edgepatch.device.backends.litert import LiteRTProgram
    from edgepatch.protocol.bundle import load_bundle

    c = contract()
    trainable = LiteRTProgram(digits_bundle / "trainable.tflite").signatures()
    frozen = LiteRTProgram(digits_bundle / "infer.tflite").signatures()
    params: list[str] = []
    for name in ("params_base.npz", "params_shared.npz"):
        with np.load(digits_bundle / name, allow_pickle=False) as npz:
            params += list(npz.files)
    param_inputs = {p.replace(".", "__") for p in params}  # Contract.paramInput

    assert c["INFER_SIGNATURE"] in frozen, sorted(frozen)
    sig = frozen[c["INFER_SIGNATURE"]]  # type: ignore[index]
    assert set(sig["inputs"]) == set(c["INFER_INPUTS"]) and set(sig["outputs"]) == set(c["INFER_OUTPUTS"])

    with load_bundle(digits_bundle) as bundle:
        vids = [row.id for row in bundle.manifest.variants]
        full = [row.id for row in bundle.manifest.variants if row.variant.is_full(bundle.model_spec)]
    assert len(vids) >= 2 and full  # a full and a smaller variant: every one must carry the same names
    for vid in vids:
        key = f"{c['TRAIN_PHI_PREFIX']}{sig_name(vid)}"  # Contract.trainPhiKey
        assert key in trainable, (key, sorted(trainable))
        assert set(trainable[key]["inputs"]) == set(c["TRAIN_PHI_INPUTS"]) | param_inputs, key
        assert set(trainable[key]["outputs"]) == set(c["TRAIN_PHI_OUTPUTS"]), key

    # Every name the code puts into or reads out of runSignature's maps is one the contract declares.
    runtime = function("class PatchRuntime")
    used = set(re.findall(r'(?:inputs|outputs)\["(\w+)"\]', runtime))
    used |= set(re.findall(r'getInputTensorFromSignature\("(\w+)"', runtime))
    declared = {*c["INFER_INPUTS"], *c["INFER_OUTPUTS"], *c["TRAIN_PHI_INPUTS"], *c["TRAIN_PHI_OUTPUTS"]}  # type: ignore[misc]
    assert used and used <= declared, used - declared
    # Both signatures are really called, each with the names of its own contract.
    assert "runSignature(inputs, outputs, trainKey)" in runtime
    assert "runSignature(inputs, outputs, Contract.INFER_SIGNATURE)" in runtime
    train_part, infer_part = runtime.split("fun logits", 1)
    train_used = set(re.findall(r'(?:inputs|outputs)\["(\w+)"\]', train_part))
    assert train_used == {*c["TRAIN_PHI_INPUTS"], *c["TRAIN_PHI_OUTPUTS"]}  # type: ignore[misc]
    infer_used = set(re.findall(r'(?:inputs|outputs)\["(\w+)"\]', infer_part))
    assert infer_used == {*c["INFER_INPUTS"], *c["INFER_OUTPUTS"]}  # type: ignore[misc]


def test_contract_names_are_the_ones_docs_contracts_defines() -> None:
    contracts = (GUIDE.parent / "CONTRACTS.md").read_text()
    section = contracts.split("## LiteRT programs", 1)[1].split("\n## ", 1)[0]
    c = contract()
    assert f"`{c['INFER_SIGNATURE']}`" in section and f"`{c['TRAIN_PHI_PREFIX']}<vid>`" in section
    for name in {*c["INFER_INPUTS"], *c["INFER_OUTPUTS"], *c["TRAIN_PHI_INPUTS"], *c["TRAIN_PHI_OUTPUTS"]}:  # type: ignore[misc]
        assert f"`{name}`" in section, name


# -- the wire ----------------------------------------------------------------------------------------------

def real_envelope() -> dict[str, object]:
    msg = make_message(PatchUpdate(phi=np.arange(4, dtype=np.float32), steps=3, samples=10, holdout_acc=0.5,
                                   loss=0.25), device_id="d1", fleet="f1", base_version="ab" * 32,
                       variant_id="k100-100", seq=1, binary=False)  # the guide's app sends the JSON form
    return json.loads(encode(msg))


def test_envelope_fields_and_topics_match_the_protocol() -> None:
    env = real_envelope()
    want = set(env) | set(env["payload"]) | set(env["payload"]["phi"])  # type: ignore[arg-type]
    code = function("fun patchEnvelope")
    keys = set(re.findall(r'"(\w+)" to ', code)) | {"content_hash"} if '("content_hash" to' in code else set()
    assert keys == want, (keys ^ want)
    assert f'"kind" to "{PatchUpdate.KIND}"' in code and '"dtype" to "<f4"' in code
    link = function("class FleetLink")
    patch = re.search(r'"(edgepatch/v1/[^"]*/patch)"', link)
    bundle = re.search(r'"(edgepatch/v1/[^"]*/bundle)"', link)
    assert patch and bundle
    fill = {"$fleet": "f1", "$deviceId": "d1"}
    for tpl, real in ((patch.group(1), device_topic("f1", "d1", Channel.PATCH)), (bundle.group(1), bundle_topic("f1"))):
        for k, v in fill.items():
            tpl = tpl.replace(k, v)
        assert tpl == real


def guide_sample() -> str:
    blocks = re.findall(r"```json\n(.*?)\n```", GUIDE.read_text(), flags=re.S)
    assert len(blocks) == 1
    return blocks[0].strip()


def fill_hash(sample: str) -> bytes:
    """What patchEnvelope does: sha256 over the canonical text without content_hash, then add it."""
    without = sample.replace('"content_hash":"CONTENT_HASH",', "")
    assert without != sample
    digest = hashlib.sha256(without.encode()).hexdigest()
    return sample.replace("CONTENT_HASH", digest).encode()


def test_sample_envelope_passes_the_companions_decoder() -> None:
    sample = guide_sample()
    env = json.loads(sample)
    data = fill_hash(sample)
    msg = decode(device_topic(env["fleet"], env["device_id"], Channel.PATCH), data)
    assert isinstance(msg.payload, PatchUpdate)
    np.testing.assert_array_equal(msg.payload.phi, np.array([0.1, -0.2, 0.3, 0, 1, -1, 2, -2], np.float32))
    assert msg.payload.steps == 50 and msg.variant_id == "k100-100"
    # The formatting matters: a sender that writes (and hashes) the Java way is refused, because the
    # companion hashes its own re-encoding of the parsed numbers.
    java = fill_hash(sample.replace('"loss":0.4137', '"loss":4.137E-1'))
    with pytest.raises(Exception, match="hash"):
        decode(device_topic(env["fleet"], env["device_id"], Channel.PATCH), java)
