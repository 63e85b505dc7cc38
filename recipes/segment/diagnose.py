"""Does a READ / <SEG>-only model read the expression? Two diagnostics on held-out ShapesWorld scenes that
gIoU alone does not show:

1. Expressions of one scene: for scenes of two objects or more, one attribute expression per object; does the
   mask change with the expression (mean pairwise mask IoU, and the share of scenes whose masks all overlap
   by more than 0.8), and does it pick the named object (its IoU highest among the scene's objects)?
2. Where is the target? A ridge probe (5 folds split by scene, standardised inputs) from the ``<SEG>`` state
   the model prompted SAM with (after its own answer), and from the head's output, to the named object's centre
   (x, y in [0, 1]), next to the same probe on centres shuffled across expressions (what no signal scores).
   With a few hundred expressions and a 576-wide state this probe is weak: R^2 near 0 says the location is not
   *linearly and plainly* there, not that it is absent.

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


def ridge_r2(x: np.ndarray, y: np.ndarray, lam: float, folds: int = 5, groups: np.ndarray | None = None
             ) -> list[float]:
    """Cross-validated R^2 per output column of a ridge regression x (n, d) -> y (n, k); ``groups`` (n,) keeps
    the rows of one group (a scene) in one fold."""
    idx = np.arange(len(x))
    groups = idx if groups is None else np.asarray(groups)
    names = np.unique(groups)
    pred = np.zeros_like(y)
    for part in np.array_split(names, folds):
        held = idx[np.isin(groups, part)]
        train = np.setdiff1d(idx, held)
        mu, sd = x[train].mean(0), x[train].std(0) + 1e-6
        a, b = (x[train] - mu) / sd, (x[held] - mu) / sd
        w = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ (y[train] - y[train].mean(0)))
        pred[held] = b @ w + y[train].mean(0)
    return (1 - ((pred - y) ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0)).tolist()


def diagnose(model_dir: Path, args) -> dict:
    from mmkit.data.sources import DataConfig, open_source
    from mmkit.eval.seg import grounding, named_object_hit, seg_scores
    from mmkit.heads.seg import ReadModel
    from mmkit.models.bundle import read_bundle
    from mmkit.training.seg import SEG_PROMPT, SamEmbedder

    model = ReadModel.from_pretrained(model_dir).eval()
    prompt = read_bundle(model_dir)["parts"].get("seg_prompt", SEG_PROMPT)
    source = open_source(DataConfig(source="shapesworld_refer", split=args.split, size=args.size, tasks={}))
    size = int(model.sam.config.prompt_encoder_config.image_size)
    pair_ious, alike, hits, objects, no_mask = [], 0, [], [], 0
    states, heads, centres, groups = [], [], [], []
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
        preds = [None if o["mask"] is None else o["mask"].numpy() for o in out]
        no_mask += sum(p is None for p in preds)
        if all(p is not None for p in preds):  # does the mask change with the expression?
            these = [seg_scores([preds[a]], [preds[b]])["gIoU"] for a in range(len(preds))
                     for b in range(a + 1, len(preds))]
            pair_ious += these
            alike += int(min(these) > 0.8)
        scenes += 1
        for r, pred, o in zip(refs, preds, out, strict=True):
            hits.append(named_object_hit(pred, masks, r.target))
            objects.append(len(masks))
            if o["seg_state"] is not None and masks[r.target].any():  # the state that prompted SAM above
                ys, xs = np.nonzero(masks[r.target])
                centres.append([xs.mean() / size, ys.mean() / size])
                states.append(o["seg_state"].numpy())
                heads.append(o["prompt"].numpy())
                groups.append(i)
    if not scenes:
        raise ValueError(f"no held-out scene of --size {args.size} holds two objects with attribute expressions")
    ground = grounding(hits, objects)
    result = {"model": str(model_dir), "scenes": scenes, "expressions": ground["expressions"], "no_mask": no_mask,
              "mask_iou_between_expressions": float(np.mean(pair_ious)) if pair_ious else None,
              "scenes_with_one_mask": alike, "named_best": ground["named_best"], "chance": ground["chance"],
              "location_probe_r2_xy": None}
    if len(states) >= 10:
        x, h, y, g = np.stack(states), np.stack(heads), np.array(centres), np.array(groups)
        shuffled = y[np.random.default_rng(0).permutation(len(y))]
        result["location_probe_r2_xy"] = {
            str(lam): {"seg_state": ridge_r2(x, y, lam, groups=g), "head": ridge_r2(h, y, lam, groups=g),
                       "seg_state_shuffled_centres": ridge_r2(x, shuffled, lam, groups=g)}
            for lam in (100.0, 1000.0)}
    return result


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
        overlap = "-" if r["mask_iou_between_expressions"] is None else f"{r['mask_iou_between_expressions']:.2f}"
        print(f"{r['model']}: {r['scenes']} scenes, {r['expressions']} expressions ({r['no_mask']} without a mask); "
              f"masks of one scene's expressions overlap with IoU {overlap} (all > 0.8 in {r['scenes_with_one_mask']} "
              f"scenes); named object best {100 * r['named_best']:.0f}% (one object at random: "
              f"{100 * r['chance']:.0f}%; a mask blind to the expression hits at most one per scene)")
        for lam, probe in (r["location_probe_r2_xy"] or {}).items():
            print(f"  ridge {lam}: <SEG> state -> target centre R^2 {probe['seg_state'][0]:.2f} / "
                  f"{probe['seg_state'][1]:.2f} (x / y); head output {probe['head'][0]:.2f} / {probe['head'][1]:.2f}; "
                  f"shuffled centres {probe['seg_state_shuffled_centres'][0]:.2f} / "
                  f"{probe['seg_state_shuffled_centres'][1]:.2f}")
    if args.json:
        from mmkit.config import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    sys.exit(run_guarded(lambda: main(), prog="diagnose.py"))
