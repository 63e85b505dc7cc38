"""Held-out mIoU of a SAM checkpoint on ShapesWorld objects: from one positive point and from the tight box.

    python recipes/segment/eval_sam.py --sam outputs/sam-shapes/final --size 300 --json outputs/eval/sam.json
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from mmkit.cli import run_guarded


def main(argv=None) -> dict:
    from mmkit.config import atomic_write_text
    from mmkit.data.promptable import PromptableConfig, PromptableShapes
    from mmkit.heads.sam_prompt import load_sam
    from mmkit.training.sam import one_point_miou

    parser = argparse.ArgumentParser(description="Held-out one-point / box mIoU of a SAM on ShapesWorld objects.")
    parser.add_argument("--sam", required=True, help="a SamModel folder or name")
    parser.add_argument("--split", default="test", choices=["val", "test"])
    parser.add_argument("--size", type=int, default=300, help="scenes (every object of each is prompted)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sam = load_sam(args.sam)
    size = int(sam.config.prompt_encoder_config.image_size)
    data = PromptableShapes(PromptableConfig(image_size=size), split=args.split, size=args.size)
    result = {"sam": str(args.sam), "split": args.split, "scenes": args.size,
              "one_point": one_point_miou(sam, data), "box": one_point_miou(sam, data, box=True)}
    print(f"{args.sam}: mIoU from one positive point {100 * result['one_point']['miou']:.1f}%, from the box "
          f"{100 * result['box']['miou']:.1f}% ({result['box']['objects']} objects in {args.size} {args.split} scenes)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.json), json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    sys.exit(run_guarded(lambda: main(), prog="eval_sam.py"))
