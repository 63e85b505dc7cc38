"""The default model of ``mmkit segment`` (assets/segment/shapes-read) with its real frozen parts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def shipped_segmentations(model_dir, scenes: int = 60):
    """Segment two expressions of each of the first ``scenes`` held-out test scenes that hold two objects or more:
    per expression whether the named object is the one the mask overlaps best, and per scene the IoU between its
    two masks (a model that ignores the expression gives the same mask twice)."""
    from mmkit.data.sources import DataConfig, open_source
    from mmkit.eval.seg import named_object_hit
    from mmkit.heads.seg import ReadModel
    from mmkit.models.bundle import read_bundle
    from mmkit.training.seg import SEG_PROMPT, SamEmbedder

    model = ReadModel.from_pretrained(model_dir)
    prompt = read_bundle(model_dir)["parts"].get("seg_prompt", SEG_PROMPT)
    size = int(model.sam.config.prompt_encoder_config.image_size)
    source = open_source(DataConfig(source="shapesworld_refer", split="test", size=scenes, tasks={}))
    refs = [r for r in source.segmentation_examples(2, seed=0) if len(source.object_masks(r.index, size)) >= 2]
    hits, masks = [], {}
    for start in range(0, len(refs), 16):
        chunk = refs[start:start + 16]
        images = [source.image(r.index) for r in chunk]
        with torch.no_grad():
            features = model.vlm.image_features(images)
            emb = SamEmbedder(model.sam).embeddings(images)  # (B, C, s, s)
            out = model.segment(features, [prompt.replace("{expression}", r.expression) for r in chunk], emb,
                                (size, size), image_sizes=[im.size for im in images])
        for r, res in zip(chunk, out, strict=True):
            mask = None if res["mask"] is None else res["mask"].numpy()
            hits.append(named_object_hit(mask, source.object_masks(r.index, size), r.target))
            masks.setdefault(r.index, []).append(np.zeros((size, size), bool) if mask is None else mask)
    # two empty masks (no <SEG> twice) are the same answer: IoU 1
    overlaps = [float((m[0] & m[1]).sum() / (m[0] | m[1]).sum()) if (m[0] | m[1]).any() else 1.0
                for m in masks.values() if len(m) >= 2]
    return hits, overlaps


def test_the_shipped_segment_model_reads_held_out_expressions(tmp_path):
    """``mmkit segment``'s default model, fp16, with the real frozen EfficientNet-Lite0, SmolLM2-135M and the
    shipped small SAM, on the 74 expressions about the first 60 held-out test scenes that hold two objects or
    more: the mask overlaps the named object best for 45 of them (one object at random: about 42%), and the
    two expressions of a scene get different masks (a model that ignores the expression gives the same mask
    twice: IoU 1). Then once through the command line on a scene written to a file."""
    from mmkit.assets import DEFAULT_SEG_MODEL

    hits, overlaps = shipped_segmentations(DEFAULT_SEG_MODEL)
    assert len(hits) == 74 and len(overlaps) == len(hits) // 2
    assert sum(hits) >= 39, (sum(hits), len(hits))  # 45 measured; a mask of a random object: about 31
    assert float(np.mean(overlaps)) <= 0.75, overlaps  # 0.54 measured; models blind to the expression: 0.98-1.00

    from mmkit.data.sources import DataConfig, open_source

    source = open_source(DataConfig(source="shapesworld_refer", split="test", size=1, tasks={}))
    image = tmp_path / "scene.png"
    source.image(0).save(image)
    expression = source.referrals(0)[0].expression
    done = subprocess.run([sys.executable, "-m", "mmkit", "segment", str(image), expression, "--json"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1",
                               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))})
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["mask"] and record["pixels"] > 0 and Path(record["overlay"]).is_file(), record
