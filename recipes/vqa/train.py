"""Train a connector on question answering (VQAv2-style data or ShapesWorld QA).

    accelerate launch recipes/vqa/train.py --config recipes/vqa/configs/shapes_vlap.yaml
    accelerate launch recipes/vqa/train.py --config recipes/vqa/configs/vqav2_clip_opt.yaml data.options.images=...
"""

import os
import sys

from mmkit.cli import run_guarded
from mmkit.training.vlm import recipe_main

DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "shapes_vlap.yaml")

if __name__ == "__main__":
    sys.exit(run_guarded(lambda: recipe_main(DEFAULT), prog="train.py"))
