"""Measure whether VLAP's assignment targets carry per-caption information on your data, and whether the
gradient of L_map is batch-specific signal or the same drift every batch (see
mmkit/eval/assignment_diagnostics.py for what each number means).

    python recipes/caption/diagnose.py --config recipes/caption/configs/shapes_vlap.yaml \
        --connector outputs/caption-vlap/final --batches 8 --json outputs/eval/vlap-diagnostics.json
"""

from mmkit.eval.assignment_diagnostics import diagnose_main

if __name__ == "__main__":
    diagnose_main()
