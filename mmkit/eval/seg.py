"""Referring segmentation metrics and pictures: gIoU (mean per-example IoU), cIoU (total intersection over
total union), and mask overlays with SAM's points on an HTML sheet.

An answer without ``<SEG>`` is "no mask": an empty prediction (IoU 0, or 1 when the truth is empty too); its
ground truth still counts in cIoU's union.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def seg_scores(preds: list[np.ndarray | None], truths: list[np.ndarray], per_example: bool = False) -> dict:
    """gIoU, cIoU and how many predictions were "no mask", over paired (H, W) bool masks (and, with
    ``per_example``, each example's IoU as "ious", for paired comparisons)."""
    ious, inter_total, union_total, missing = [], 0, 0, 0
    for pred, truth in zip(preds, truths, strict=True):
        truth = np.asarray(truth, dtype=bool)
        if pred is None:
            missing += 1
            pred = np.zeros_like(truth)
        pred = np.asarray(pred, dtype=bool)
        inter, union = int((pred & truth).sum()), int((pred | truth).sum())
        ious.append(inter / union if union else 1.0)
        inter_total += inter
        union_total += union
    scores = {"gIoU": float(np.mean(ious)) if ious else float("nan"),
              "cIoU": inter_total / union_total if union_total else float("nan"),
              "examples": len(ious), "no_mask": missing}
    if per_example:
        scores["ious"] = ious
    return scores


def examples_digest(refs) -> str:
    """A short fingerprint of the expressions a report scored (each referral's image index and text, in order):
    two reports pair per expression only when their digests agree."""
    import hashlib

    return hashlib.sha256("\n".join(f"{r.index}\t{r.expression}" for r in refs).encode()).hexdigest()[:16]


def named_object_hit(pred: np.ndarray | None, masks: list[np.ndarray] | None, target: int) -> float | None:
    """For one expression: 1.0 when the predicted mask overlaps the named object ``masks[target]`` with a higher
    IoU than any other object of the scene (and touches it), 0.0 otherwise ("no mask" included); None when the
    scene holds fewer than two objects or its objects are unknown (``masks`` None)."""
    if masks is None or len(masks) < 2:
        return None
    if pred is None:
        return 0.0
    pred = np.asarray(pred, dtype=bool)
    ious = [int((pred & m).sum()) / max(int((pred | m).sum()), 1) for m in masks]
    return float(int(np.argmax(ious)) == target and ious[target] > 0)


def grounding(hits: list[float | None], objects: list[int]) -> dict:
    """Does a mask pick out the object its expression names? Over the expressions whose scene has two objects or
    more (``hits[i]`` from :func:`named_object_hit`, None elsewhere; ``objects[i]``: the scene's object count),
    the share whose mask overlaps the named object best, next to ``chance``, what a mask of one object drawn at
    random would reach. A model that segments some object well but not the named one earns gIoU in one-object
    scenes and chance here."""
    kept = [(h, n) for h, n in zip(hits, objects, strict=True) if h is not None]
    return {"expressions": len(kept), "named_best": float(np.mean([h for h, _ in kept])) if kept else None,
            "chance": float(np.mean([1.0 / n for _, n in kept])) if kept else None}


def map_auc(scores, truth, box=None) -> float | None:
    """How well a coarse score map ranks the target's pixels above the rest: the probability that a random
    target pixel's cell scores higher than a random background pixel's (ties count half), with the (h, w)
    map laid over the (H, W) bool truth cell by cell (over its ``box`` x0, y0, x1, y1 in the truth's pixels,
    e.g. the encoder's crop; None: all of it). 0.5 is a map that says nothing about the target; None when the
    truth is empty or covers everything."""
    scores = np.asarray(scores, dtype=np.float64)
    truth = np.asarray(truth, dtype=bool)
    if box is not None:
        x0, y0, x1, y1 = (int(round(float(c))) for c in box)
        truth = truth[max(y0, 0):y1, max(x0, 0):x1]
    h, w = scores.shape
    height, width = truth.shape
    rows = np.minimum(((np.arange(height) + 0.5) * h / height).astype(int), h - 1)  # the cell of each pixel's centre
    cols = np.minimum(((np.arange(width) + 0.5) * w / width).astype(int), w - 1)
    cell = (rows[:, None] * w + cols[None, :]).reshape(-1)
    target = np.bincount(cell, weights=truth.reshape(-1), minlength=h * w)  # target pixels per cell
    background = np.bincount(cell, minlength=h * w) - target
    if target.sum() == 0 or background.sum() == 0:
        return None
    flat = scores.reshape(-1)
    order = np.argsort(flat, kind="stable")
    flat, target, background = flat[order], target[order], background[order]
    wins = 0.0  # sum over target pixels of the background pixels strictly below (+ half the equal ones)
    below = 0.0
    start = 0
    while start < len(flat):  # groups of equal scores
        stop = start + 1
        while stop < len(flat) and flat[stop] == flat[start]:
            stop += 1
        t, b = target[start:stop].sum(), background[start:stop].sum()
        wins += t * (below + 0.5 * b)
        below += b
        start = stop
    return float(wins / (target.sum() * background.sum()))


def overlay(image: Image.Image, mask: np.ndarray | None, truth: np.ndarray | None = None,
            points=None, labels=None, point_frame: int | None = None) -> Image.Image:
    """The image with the predicted mask in red, the ground truth's outline in green, and SAM's points (white
    ring: positive, black: negative) scaled from a ``point_frame``-pixel square to the image."""
    base = image.convert("RGB")
    w, h = base.size
    canvas = np.asarray(base, dtype=np.float32).copy()
    if mask is not None:
        m = np.asarray(Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255).resize((w, h), Image.NEAREST)) > 0
        canvas[m] = 0.45 * canvas[m] + 0.55 * np.array([230, 30, 30])
    out = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    if truth is not None:
        t = np.asarray(Image.fromarray(np.asarray(truth, dtype=np.uint8) * 255).resize((w, h), Image.NEAREST)) > 0
        edge = t & ~(np.roll(t, 1, 0) & np.roll(t, -1, 0) & np.roll(t, 1, 1) & np.roll(t, -1, 1))
        ys, xs = np.nonzero(edge)
        for x, y in zip(xs.tolist(), ys.tolist(), strict=True):
            draw.point((x, y), fill=(40, 220, 40))
    if points is not None and labels is not None and point_frame:
        sx, sy = w / point_frame, h / point_frame
        for (x, y), label in zip(np.asarray(points).tolist(), np.asarray(labels).tolist(), strict=True):
            if label not in (0, 1):
                continue
            r = max(2, w // 60)
            cx, cy = (x + 0.5) * sx, (y + 0.5) * sy  # SAM's pixel-index coordinates -> this image
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=(255, 255, 255) if label == 1 else (0, 0, 0),
                         width=2)
    return out


def _data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def write_sheet(path: str | Path, title: str, cards: list[dict], note: str = "") -> Path:
    """An HTML page of cards {"image": PIL, "expression", "answer", "iou"} (images embedded)."""
    parts = [
        "<!doctype html><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em}.card{display:inline-block;vertical-align:top;width:210px;"
        "margin:6px;padding:6px;border:1px solid #ccc;border-radius:6px}.card img{width:196px;height:196px;"
        "image-rendering:pixelated}small{color:#666}</style>",
        f"<h1>{html.escape(title)}</h1><p><small>{html.escape(note)}</small></p>",
    ]
    for c in cards:
        iou = "no mask" if c.get("iou") is None else f"IoU {100 * c['iou']:.0f}%"
        parts.append(f"<div class='card'><img src='{_data_uri(c['image'])}'><br><b>{html.escape(c['expression'])}"
                     f"</b><br><small>{html.escape(c.get('answer', ''))} · {iou}</small></div>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))
    return path
