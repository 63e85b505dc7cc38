"""Evaluate video-QA models on held-out ShapesWorld clips: accuracy per question kind (first / last / order:
temporal order; motion; av: audio-visual matching), and captions.

    python recipes/video_qa/eval.py --connectors outputs/video-qa-past/final outputs/video-qa-none/final \\
        --source shapesworld_clips --split test --size 200 --qa-per-image 5 --json outputs/eval/video-qa.json
"""

import sys

from mmkit.cli import run_guarded
from mmkit.eval.vlm import eval_main

if __name__ == "__main__":
    sys.exit(run_guarded(lambda: eval_main(["vqa", "caption"]), prog="eval.py"))
