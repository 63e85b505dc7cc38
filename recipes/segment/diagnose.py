"""Does a READ / <SEG>-only model read the expression? Two diagnostics on held-out ShapesWorld scenes that
gIoU alone does not show:

1. Expressions of one scene: for scenes of two objects or more, one attribute expression per object; does the
   mask change with the expression (mean pairwise mask IoU, and the share of scenes whose masks all overlap
   by more than 0.8), and does it pick the named object (its IoU highest among the scene's objects)?
2. Where is the target? A ridge probe (5-fold, standardised inputs) from the ``<SEG>`` state, and from the
   head's output that prompts SAM, to the named object's centre (x, y in [0, 1]); R^2 near 0: the state does
   not say where the object is.

    python recipes/segment/diagnose.py --models outputs/segment-read-s0/final --size 40 --json diag.json

A bundle mid-training works too (``outputs/segment-read-s0/step-000300``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from mmkit.cli import run_guarded


def ridge_r2(x: np.ndarray, y: np.ndarray, lam: float, folds: int = 5) -> list[float]:
    """Cross-validated R^2 per output column of a ridge regression x (n, d) -> y (n, k)."""
    idx = np.arange(len(x))
    pred = np.zeros_like(y)
    for held in np.array_split(idx, folds):
        train = np.setdiff1d(idx, held)
        mu, sd = x[train].mean(0), x[train].std(0) + 1e-6
        a, b = (x[train] - mu) / sd, (x[held] - mu) / sd
        w = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ (y[train] - y[train].mean(0)))
        pred[held] = b @ w + y[train].mean(0)
    return (1 - ((pred - y) ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0)).tolist()


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 1.0


def diagnose(model_dir: Path, args) -> dict:
    from mmkit.data.sources import DataConfig, open_source
    from mmkit.heads.seg import ReadModel
    from mmkit.models.bundle import read_bundle
    from mmkit.training.seg import SEG_ANSWER, SEG_PROMPT, SamEmbedder

    model = ReadModel.from_pretrained(model_dir).eval()
    prompt = read_bundle(model_dir)["parts"].get("seg_prompt", SEG_PROMPT)
    source = open_source(DataConfig(source="shapesworld_refer", split=args.split, size=args.size, tasks={}))
    size = int(model.sam.config.prompt_encoder_config.image_size)
    llm = model.vlm.llm
    pair_ious, alike, named, asked = [], 0, 0, 0
    states, heads, centres = [], [], []
    scenes = 0
    for i in range(len(source)):
        masks = source.object_masks(i, size)
        per_object = {}
        for r in source.referrals(i):
            if r.kind == "attribute":
                per_object.setdefault(r.target, r)
        if len(masks) < 2 or len(per_object) < 2:
            continue
        refs = list(per_object.values())
        image = source.image(i)
        texts = [prompt.replace("{expression}", r.expression) for r in refs]
        with torch.no_grad():
            features = model.vlm.image_features([image] * len(refs))
            tokens = SamEmbedder(model.sam).encode([image]).tokens  # (1, s * s, C)
            side = int(round(tokens.shape[1] ** 0.5))
            emb = tokens.transpose(1, 2).reshape(1, -1, side, side).expand(len(refs), -1, -1, -1)
            out = model.segment(features, texts, emb, (size, size), image_sizes=[image.size] * len(refs))
            embeds = model._grid_embeds(features, None)
            batch = llm.build_batch(texts, embeds.shape[1], [SEG_ANSWER] * len(refs)).to(llm.device)
            seg, _ = model.seg_states(model._run_llm(batch, embeds))
            states.append(seg.float().cpu().numpy())
            heads.append(model.head(seg.float()).cpu().numpy())
        preds = [np.zeros((size, size), bool) if o["mask"] is None else o["mask"].numpy() for o in out]
        these = [iou(preds[a], preds[b]) for a in range(len(preds)) for b in range(a + 1, len(preds))]
        pair_ious += these
        alike += int(min(these) > 0.8)
        scenes += 1
        for r, pred in zip(refs, preds, strict=True):
            named += int(int(np.argmax([iou(pred, m) for m in masks])) == r.target)
            asked += 1
            ys, xs = np.nonzero(masks[r.target])
            centres.append([xs.mean() / size, ys.mean() / size])
    if not scenes:
        raise ValueError(f"no held-out scene of --size {args.size} holds two objects with attribute expressions")
    x, h, y = np.concatenate(states), np.concatenate(heads), np.array(centres)
    probe = {str(lam): {"seg_state": ridge_r2(x, y, lam), "head": ridge_r2(h, y, lam)} for lam in (100.0, 1000.0)}
    return {"model": str(model_dir), "scenes": scenes, "expressions": asked,
            "mask_iou_between_expressions": float(np.mean(pair_ious)), "scenes_with_one_mask": alike,
            "named_best": named / asked, "location_probe_r2_xy": probe}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description="Does a READ model's mask follow the expression?")
    parser.add_argument("--models", nargs="+", type=Path, required=True, help="READ bundles (or checkpoints)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--size", type=int, default=40, help="scenes (those with two objects or more count)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = [diagnose(m, args) for m in args.models]
    for r in results:
        best = max(r["location_probe_r2_xy"].values(), key=lambda v: sum(v["seg_state"]))
        print(f"{r['model']}: {r['scenes']} scenes, {r['expressions']} expressions; masks of one scene's expressions "
              f"overlap with IoU {r['mask_iou_between_expressions']:.2f} (all > 0.8 in {r['scenes_with_one_mask']} "
              f"scenes); named object best {100 * r['named_best']:.0f}%; <SEG> state -> target centre R^2 "
              f"{best['seg_state'][0]:.2f} / {best['seg_state'][1]:.2f} (x / y)")
    if args.json:
        from mmkit.config import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    sys.exit(run_guarded(lambda: main(), prog="diagnose.py"))
