"""Train a captioning connector (VLAP or the linear baseline) between a frozen encoder and a frozen LLM.

    accelerate launch recipes/caption/train.py --config recipes/caption/configs/shapes_vlap.yaml
    accelerate launch recipes/caption/train.py --max_train_steps 2 train.output_dir=/tmp/smoke   # smoke test
    accelerate launch recipes/caption/train.py --resume                                          # after a crash
"""

import os
import sys

from mmkit.cli import run_guarded
from mmkit.training.vlm import recipe_main

DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "shapes_vlap.yaml")

if __name__ == "__main__":
    sys.exit(run_guarded(lambda: recipe_main(DEFAULT), prog="train.py"))
