"""The adapter format and bundles, and the generic tests every registered connector gets by registering."""

import json

import pytest
import torch
from safetensors.torch import save_file

from mmkit.adapters import ADAPTERS, adapter_kinds, build_adapter, load_adapter
from mmkit.connectors import build_connector, connector_kinds
from mmkit.llm import FrozenLM
from mmkit.models import VisionLanguageModel
from mmkit.models.bundle import read_bundle


def connector_for(kind, llm, vision_dim=10):
    """A small instance of every registered kind (its own example_config), prepared on a few captions."""
    from mmkit.adapters import ADAPTERS

    connector = build_connector(kind, **ADAPTERS.get(kind).example_config(vision_dim, llm.hidden_size))
    connector.prepare(llm=llm, texts=["a red circle", "a blue star", "two green squares"])
    return connector


FEATURES = torch.randn(4, 6, 10)  # 6 tokens of width 10 per sample (2 frames of 3 tokens for frame-based kinds)
RAGGED = torch.tensor([[True] * 6, [True] * 3 + [False] * 3, [True] * 6, [True] * 6])  # sample 1 is shorter


@pytest.fixture(scope="module")
def llm(tiny_parts):
    return FrozenLM.from_pretrained(tiny_parts / "llm")


# ---------------------------------------------------------------- generic: every registered connector
@pytest.mark.parametrize("kind", connector_kinds())
def test_only_connector_parameters_change_after_three_steps(kind, llm):
    torch.manual_seed(0)
    model = VisionLanguageModel(None, connector_for(kind, llm), llm, caption_prompt="<image> caption :")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    feats, caps = FEATURES, ["a red circle", "a blue star", "two green squares", "a red star"]
    for step in range(3):
        mask = RAGGED if step == 1 else None  # (a batch with a shorter sample among them)
        out = model(feats, ["<image> caption :"] * 4, caps, alignment_texts=caps, feature_mask=mask)
        out["loss"].backward()
        opt.step()
        opt.zero_grad()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(k.startswith("connector.") for k in changed), sorted(changed)
    assert set(model.trainable_parameters()) <= set(model.connector.parameters())


@pytest.mark.parametrize("kind", connector_kinds())
def test_save_load_gives_identical_outputs_and_plain_keys(kind, llm, tmp_path):
    from safetensors.torch import load_file

    connector = connector_for(kind, llm)
    with torch.no_grad():
        for p in connector.parameters():
            p.add_(torch.randn_like(p))  # not the init: a trained-looking adapter
    connector.save_adapter(tmp_path / kind, metadata={"note": "x"})
    back, meta = load_adapter(tmp_path / kind)
    connector.eval()
    back.eval()
    assert meta == {"note": "x"} and type(back) is type(connector)
    assert torch.equal(back(FEATURES)[0], connector(FEATURES)[0])
    ours, mask = back(FEATURES, RAGGED)
    assert mask is None or mask.shape == ours.shape[:2]
    keys = load_file(str(tmp_path / kind / "adapter.safetensors")).keys()
    assert not any(k.startswith(("module.", "_orig_mod.", "connector.")) for k in keys)


def test_registry_families():
    assert set(connector_kinds()) <= set(adapter_kinds()) == set(ADAPTERS.names())
    with pytest.raises(ValueError, match="unknown connector kind 'vlp'; did you mean 'vlap'"):
        build_adapter("vlp", family="connector", vision_dim=2, llm_dim=2)


# ---------------------------------------------------------------- files that must not load silently
def test_bad_weight_files_are_refused_naming_the_file(tmp_path):
    c = build_connector("linear", vision_dim=4, llm_dim=3)
    c.save_adapter(tmp_path / "ok")
    weights = tmp_path / "ok" / "adapter.safetensors"
    good = weights.read_bytes()
    for name, data in [("empty", b""), ("truncated", good[: len(good) // 2]), ("garbage", b"\x07" * 40)]:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "adapter.json").write_text((tmp_path / "ok" / "adapter.json").read_text())
        (folder / "adapter.safetensors").write_bytes(data)
        with pytest.raises(ValueError, match=rf"{name}/adapter.safetensors is not a readable safetensors file"):
            load_adapter(folder)
    for name, value in [("nan", float("nan")), ("zeros", 0.0)]:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "adapter.json").write_text((tmp_path / "ok" / "adapter.json").read_text())
        save_file({k: torch.full_like(v, value) for k, v in c.state_dict().items()}, str(folder / "adapter.safetensors"))
        with pytest.raises(ValueError, match="NaN or inf" if name == "nan" else "all zeros"):
            load_adapter(folder)
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "adapter.json").write_text("{oops")
    with pytest.raises(ValueError, match="badjson/adapter.json is not valid JSON"):
        load_adapter(tmp_path / "badjson")
    (tmp_path / "kind").mkdir()
    (tmp_path / "kind" / "adapter.json").write_text(json.dumps({"kind": "mlp", "config": {}, "metadata": {}}))
    with pytest.raises(ValueError, match="unknown adapter kind 'mlp'"):
        load_adapter(tmp_path / "kind")


# ---------------------------------------------------------------- bundles
def test_bundle_round_trip_and_the_older_single_connector_folder(tiny_parts, llm, tmp_path):
    from mmkit.encoders import load_encoder

    encoder = load_encoder(f"hf:{tiny_parts / 'vision'}")
    model = VisionLanguageModel(encoder, connector_for("vlap", llm, encoder.dim), llm, caption_prompt="<image> caption :")
    model.save_pretrained(tmp_path / "bundle", llm_name=str(tiny_parts / "llm"), metadata={"training": {"steps": 3}})
    bundle = read_bundle(tmp_path / "bundle")
    assert bundle["parts"]["encoder"]["spec"] == f"hf:{tiny_parts / 'vision'}" and bundle["metadata"]["training"]
    assert (tmp_path / "bundle" / "connector" / "adapter.json").is_file()
    rebuilt = VisionLanguageModel.from_pretrained(tmp_path / "bundle")
    feats = torch.randn(2, 5, encoder.dim)
    assert torch.equal(rebuilt.image_embeds(feats)[0], model.image_embeds(feats)[0])
    assert torch.equal(rebuilt.connector.prior, model.connector.prior)  # the prior travels with the weights
    # a folder as older mmkit wrote it: connector.json (parts in its metadata) + connector.safetensors
    old = tmp_path / "old"
    old.mkdir()
    state = {k: v for k, v in model.connector.state_dict().items() if k != "prior"}
    save_file(state, str(old / "connector.safetensors"))
    config = {k: v for k, v in model.connector.config.to_dict().items() if k != "assignment"}
    parts = bundle["parts"]
    (old / "connector.json").write_text(json.dumps({"kind": "vlap", "config": config, "metadata": {**parts, "x": 1}}))
    legacy = VisionLanguageModel.from_pretrained(old)
    assert legacy.connector.config.assignment == "balanced" and legacy.caption_prompt == "<image> caption :"
    assert torch.equal(legacy.image_embeds(feats)[0], model.image_embeds(feats)[0])
    with pytest.raises(FileNotFoundError, match="holds neither bundle.json"):
        read_bundle(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        read_bundle(tmp_path / "missing")


def test_the_shipped_connector_still_loads():
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "assets" / "connectors" / "shapes-vlap"
    bundle = read_bundle(folder)
    connector, _ = load_adapter(bundle["adapters"]["connector"])
    assert connector.kind == "vlap" and bundle["parts"]["encoder"]["spec"] == "timm:tf_efficientnet_lite0"


def test_cast_saved_halves_a_bundle_that_loads_back_in_the_modules_dtype(tiny_parts, llm, tmp_path):
    from mmkit.adapters import cast_saved
    from mmkit.encoders import load_encoder

    encoder = load_encoder(f"hf:{tiny_parts / 'vision'}")
    model = VisionLanguageModel(encoder, connector_for("vlap", llm, encoder.dim), llm, caption_prompt="<image> caption :")
    model.save_pretrained(tmp_path / "bundle", llm_name=str(tiny_parts / "llm"))
    written = cast_saved(tmp_path / "bundle", tmp_path / "half")
    assert written == [tmp_path / "half" / "connector" / "adapter.safetensors"]
    assert (tmp_path / "half" / "bundle.json").read_text() == (tmp_path / "bundle" / "bundle.json").read_text()
    from safetensors.torch import load_file

    saved, half = load_file(str(tmp_path / "bundle/connector/adapter.safetensors")), load_file(str(written[0]))
    assert saved.keys() == half.keys() and all(
        v.dtype == (torch.float16 if saved[k].is_floating_point() else saved[k].dtype) for k, v in half.items())
    rebuilt = VisionLanguageModel.from_pretrained(tmp_path / "half")
    assert all(p.dtype == torch.float32 for p in rebuilt.connector.parameters())
    for name, p in rebuilt.connector.state_dict().items():  # the fp16 values, back in fp32
        assert torch.equal(p, model.connector.state_dict()[name].half().float()), name
    # refused: an occupied destination, a folder without adapter weights, a cast that overflows, a non-float dtype
    with pytest.raises(FileExistsError, match="half exists and is not empty"):
        cast_saved(tmp_path / "bundle", tmp_path / "half")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="plain holds no adapter.safetensors"):
        cast_saved(tmp_path / "plain", tmp_path / "x")
    big = build_connector("linear", vision_dim=4, llm_dim=3)
    with torch.no_grad():
        next(big.parameters()).fill_(1e6)
    big.save_adapter(tmp_path / "big")
    with pytest.raises(ValueError, match="overflows torch.float16"):
        cast_saved(tmp_path / "big", tmp_path / "big16")
    assert not (tmp_path / "big16").exists()  # nothing written when a cast fails
    with pytest.raises(ValueError, match="floating dtype"):
        cast_saved(tmp_path / "bundle", tmp_path / "ints", torch.int8)
