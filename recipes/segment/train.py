"""Train READ (or the <SEG>-only baseline) on referring segmentation.

    python recipes/segment/train.py                                                    # configs/read_shapes.yaml
    python recipes/segment/train.py --config recipes/segment/configs/seg_only_shapes.yaml   # the baseline
    python recipes/segment/train.py --resume                                           # after a stop
    accelerate launch recipes/segment/train.py data.source=refcoco data.options.refs=refs.json \\
        data.options.images=images/ model.sam=facebook/sam-vit-base                    # your data, a real SAM

Needs a SAM: ``model.sam`` names a SamModel folder or hub id (offline: train one with pretrain_sam.py).
"""

import os
import sys

from mmkit.cli import run_guarded
from mmkit.training.config import run_recipe
from mmkit.training.seg import SegRecipeConfig, train_seg

DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "read_shapes.yaml")


def main(argv=None):
    return run_recipe(
        SegRecipeConfig, DEFAULT, train_seg, description="Train READ's <SEG> head, LoRA and SAM mask decoder.",
        epilog="Extra arguments are dotted overrides, e.g. model.seg.sasp=null train.learning_rate=1e-4",
        script="train.py", saved="segmentation model", argv=argv,
    )


if __name__ == "__main__":
    sys.exit(run_guarded(lambda: main(), prog="train.py"))
