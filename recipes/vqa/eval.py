"""Evaluate connectors on question answering (VQAv2 accuracy, overall and per question type).

    python recipes/vqa/eval.py --connectors outputs/vqa-vlap/final --split test --size 500
    python recipes/vqa/eval.py --connectors ... --source vqa --vqa-questions q.json --vqa-annotations a.json --vqa-images imgs/
"""

import sys

from mmkit.cli import run_guarded
from mmkit.eval.vlm import eval_main

if __name__ == "__main__":
    sys.exit(run_guarded(lambda: eval_main(["vqa"]), prog="eval.py"))
