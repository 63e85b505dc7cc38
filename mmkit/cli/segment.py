"""``mmkit segment``: the mask of the object an expression names (READ: <SEG> state + SasP points into SAM)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..assets import DEFAULT_SEG_MODEL
from .base import Command, UserError


def _args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", help="an image file")
    parser.add_argument("expression", help='what to segment, e.g. "the red circle"')
    parser.add_argument("--model", type=Path, default=DEFAULT_SEG_MODEL,
                        help=f"trained READ model (a bundle folder; default: {DEFAULT_SEG_MODEL})")
    parser.add_argument("--out", type=Path, default=None,
                        help="mask PNG to write (default: IMAGE's name + .mask.png); the overlay goes next to it")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of text")


def _run(args: argparse.Namespace) -> int:
    from ..data.images import load_image
    from ..models.bundle import is_bundle, read_bundle

    if not args.expression.strip():
        raise UserError("the expression is empty; name the object to segment, e.g. \"the red circle\"")
    image = load_image(args.image)
    out = args.out or Path(args.image).with_suffix(".mask.png")
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out}: masks are written as PNG; give a path ending in .png")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: folder {out.parent} does not exist")
    if not is_bundle(args.model) or read_bundle(args.model)["kind"] != "read":
        raise UserError(f"no trained READ model in {args.model}; train one with recipes/segment/train.py and pass "
                        "--model")
    import numpy as np
    import torch
    from PIL import Image

    from ..eval.seg import overlay
    from ..heads.seg import ReadModel
    from ..training.seg import SEG_PROMPT, SamEmbedder

    model = ReadModel.from_pretrained(args.model).eval()
    prompt = read_bundle(args.model)["parts"].get("seg_prompt", SEG_PROMPT).replace("{expression}", args.expression)
    with torch.no_grad():
        features = model.vlm.image_features([image])
        emb = SamEmbedder(model.sam).embeddings([image])  # (1, C, s, s)
        size = int(model.sam.config.prompt_encoder_config.image_size)
        (result,) = model.segment(features, [prompt], emb, (image.height, image.width),  # logits up-scaled to the photo
                                  image_sizes=[image.size])
    record = {"image": str(args.image), "expression": args.expression, "answer": result["text"]}
    if result["mask"] is None:
        record["mask"] = None
        print(json.dumps(record) if args.json else f"no mask: the answer holds no <SEG> ({result['text']!r})")
        return 0
    mask = result["mask"].numpy().astype(np.uint8) * 255  # (H, W) of the photo
    Image.fromarray(mask).save(out)
    over = out.with_name(out.name.replace(".mask.png", "") + ".overlay.png") if out.name.endswith(".mask.png") \
        else out.with_suffix(".overlay.png")
    overlay(image, mask > 0, None, result["points"], result["labels"], size).save(over)
    record.update(mask=str(out), overlay=str(over), pixels=int((mask > 0).sum()))
    print(json.dumps(record) if args.json else f"{args.expression}: {record['pixels']} pixels -> {out} (overlay {over})")
    return 0


COMMANDS = (Command("segment", "write the mask of the object an expression names (READ)", _args, _run),)
