"""ShapesWorld promptable segmentation samples and the small-SAM recipe (a short run, resume, reload, eval)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mmkit.data.promptable import PromptableConfig, PromptableShapes, mask_box, sam_pixels
from mmkit.training.sam import SamSizes, build_sam, iou, one_point_miou

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.hidden_size=32", "model.num_hidden_layers=2", "model.num_attention_heads=2", "model.mlp_dim=64",
        "model.global_attn_indexes=[1]", "model.window_size=4", "model.prompt_dim=32", "model.decoder_mlp_dim=64",
        "model.decoder_heads=2", "data.image_size=32", "train.batch_size=2", "train.eval_size=3",
        "train.warmup_steps=1", "train.log_every=1", "train.save_every=1", "train.eval_every=3", "train_size=8"]


def test_samples_are_exact_and_replay():
    data = PromptableShapes(PromptableConfig(image_size=48), split="train", size=5)
    a, b = data.batch(3, 4, "points"), data.batch(3, 4, "points")
    for key in ("pixel_values", "points", "labels", "boxes", "masks"):
        assert torch.equal(a[key], b[key]), key
    assert a["pixel_values"].shape == (4, 3, 48, 48) and a["masks"].shape == (4, 48, 48)
    for i in range(4):
        mask = a["masks"][i].numpy()
        assert mask.any()
        for (x, y), label in zip(a["points"][i].tolist(), a["labels"][i].tolist(), strict=True):
            if label == 1:
                assert mask[int(y), int(x)]
            elif label == 0:
                assert not mask[int(y), int(x)]
        assert (a["labels"][i] == 1).any()
        x0, y0, x1, y1 = mask_box(mask)
        bx0, by0, bx1, by1 = a["boxes"][i].tolist()
        size = max(x1 - x0, y1 - y0) + 1
        assert max(abs(bx0 - x0), abs(by0 - y0), abs(bx1 - x1), abs(by1 - y1)) <= 0.1 * size + 1e-4


def test_sam_pixels_match_sam_processor():
    from PIL import Image
    from transformers import SamImageProcessor

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    ours = sam_pixels(image)
    theirs = SamImageProcessor(do_resize=False, do_pad=False)(image, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_iou_and_held_out_miou_from_a_point_and_a_box():
    a = torch.zeros(2, 4, 4, dtype=torch.bool)
    a[0, :2] = True
    b = a.clone()
    b[0, 2] = True
    assert iou(a, b).tolist() == pytest.approx([2 / 3, 1.0])  # 8 of 12 pixels; the second pair is empty on both sides
    sam = build_sam(SamSizes(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_dim=64,
                             global_attn_indexes=(1,), window_size=4, prompt_dim=32, decoder_mlp_dim=64,
                             decoder_heads=2), 32)
    data = PromptableShapes(PromptableConfig(image_size=32), split="val", size=2)
    out = one_point_miou(sam, data)
    assert 0.0 <= out["miou"] <= 1.0 and out["objects"] >= 2
    assert one_point_miou(sam, data, box=True)["objects"] == out["objects"]


def test_pretrain_recipe_runs_resumes_and_saves_a_sam_model(tmp_path):
    out = tmp_path / "sam"
    cmd = [sys.executable, str(ROOT / "recipes/segment/pretrain_sam.py"), "--output_dir", str(out), *TINY]
    env = {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([*cmd, "--max_train_steps", "2"], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    run = subprocess.run([*cmd, "--max_train_steps", "3", "--resume"], capture_output=True,
                         text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "resumed from" in run.stdout + run.stderr
    from transformers import SamModel

    sam = SamModel.from_pretrained(out / "final")
    assert sam.config.prompt_encoder_config.image_size == 32
    log = (out / "log.jsonl").read_text()
    assert "val_one_point_miou" in log and '"step": 3' in log
    evaluated = subprocess.run([sys.executable, str(ROOT / "recipes/segment/eval_sam.py"), "--sam", str(out / "final"),
                                "--size", "2", "--split", "val", "--json", str(tmp_path / "eval.json")],
                               capture_output=True, text=True, env=env, timeout=600)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "mIoU from one positive point" in evaluated.stdout


def test_bad_sam_sizes_are_refused():
    with pytest.raises(ValueError, match="global_attn_indexes"):
        SamSizes(num_hidden_layers=2, global_attn_indexes=(5,))
    with pytest.raises(ValueError, match="not a multiple of the SAM patch size"):
        build_sam(SamSizes(), 100)


def test_a_fresh_small_sam_encodes_positions_smoothly_like_sam():
    """SAM's random Fourier positions come from N(0, 1): neighbouring pixels get similar codes, so a point prompt
    can be matched to the image positions around it. (transformers' own init, scale hidden_size // 2, made a
    from-scratch SAM ignore its prompts.)"""
    import torch

    from mmkit.training.sam import SamSizes, build_sam

    sam = build_sam(SamSizes(num_hidden_layers=2, global_attn_indexes=(1,)), 64)
    pe = sam.shared_image_embedding
    assert pe.positional_embedding is sam.prompt_encoder.shared_embedding.positional_embedding
    assert not pe.positional_embedding.requires_grad and 0.8 < float(pe.positional_embedding.std()) < 1.2
    codes = pe(torch.tensor([[[[10.0, 10.0], [11.0, 10.0], [50.0, 40.0]]]]), (64, 64))[0, 0]  # (3, C)
    cos = torch.nn.functional.cosine_similarity
    assert cos(codes[0], codes[1], dim=0) > 0.9 and cos(codes[0], codes[2], dim=0) < 0.5


def test_the_shipped_sam_loads_in_fp32_by_its_portable_name_and_follows_a_point():
    from mmkit.assets import ASSETS, DEFAULT_SAM, resolve_asset
    from mmkit.heads.sam_prompt import load_sam, resolve_sam

    assert resolve_sam(DEFAULT_SAM) == DEFAULT_SAM  # bundles keep the portable name, not this clone's path
    assert resolve_asset(DEFAULT_SAM) == str(ASSETS / "segment" / "sam-shapes")
    sam = load_sam(DEFAULT_SAM)  # fp16 on disk
    assert {p.dtype for p in sam.parameters()} == {torch.float32}
    size = int(sam.config.prompt_encoder_config.image_size)
    data = PromptableShapes(PromptableConfig(image_size=size), split="test", size=12)
    point, box = one_point_miou(sam, data), one_point_miou(sam, data, box=True)
    assert point["miou"] > 0.8 and box["miou"] > 0.8, (point, box)  # 92.5% / 92.8% on 300 scenes


def test_asset_names_stay_inside_assets_and_say_what_exists():
    from mmkit.assets import resolve_asset

    assert resolve_asset("outputs/sam") == "outputs/sam"  # not an asset name: untouched
    for bad in ("asset:../README.md", "asset:", "asset:/etc"):
        with pytest.raises(ValueError, match="an asset name is 'asset:<folder under assets/>'"):
            resolve_asset(bad)
    with pytest.raises(ValueError, match="no .*segment/nope; shipped assets are the folders under"):
        resolve_asset("asset:segment/nope")
