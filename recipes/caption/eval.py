"""Evaluate caption connectors on held-out ShapesWorld scenes (or COCO): CIDEr, BLEU-4, attribute
accuracy, VQA accuracy and retrieval R@1/5; prints a comparison table.

    python recipes/caption/eval.py --connectors outputs/caption-vlap/final outputs/caption-linear/final \
        --split test --size 500 --json outputs/eval/caption.json
"""

import sys

from mmkit.cli import run_guarded
from mmkit.eval.vlm import eval_main

if __name__ == "__main__":
    sys.exit(run_guarded(lambda: eval_main(["caption", "vqa", "retrieval"]), prog="eval.py"))
