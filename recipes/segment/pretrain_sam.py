"""Pre-train a small SAM on ShapesWorld promptable segmentation (no SAM weights exist offline; READ uses it
frozen, as READ uses SAM).

    python recipes/segment/pretrain_sam.py                                   # configs/sam_shapes.yaml
    python recipes/segment/pretrain_sam.py --resume                          # after a stop
    python recipes/segment/pretrain_sam.py --max_train_steps 2 --output_dir /tmp/smoke model.num_hidden_layers=2 \\
        model.global_attn_indexes=[1]                                        # smoke test

The result (``output_dir/final``) is a ``SamModel`` folder; ``eval_sam.py`` reports its held-out mIoU from
one positive point and from a box.
"""

import os
import sys

from mmkit.cli import run_guarded
from mmkit.training.config import run_recipe
from mmkit.training.sam import SamPretrainConfig, train_sam

DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "sam_shapes.yaml")


def main(argv=None):
    return run_recipe(
        SamPretrainConfig, DEFAULT, train_sam, description="Pre-train a small SAM on ShapesWorld promptable segmentation.",
        epilog="Extra arguments are dotted overrides, e.g. train.learning_rate=1e-4 model.hidden_size=256",
        script="pretrain_sam.py", saved="SAM", argv=argv,
    )


if __name__ == "__main__":
    sys.exit(run_guarded(lambda: main(), prog="pretrain_sam.py"))
