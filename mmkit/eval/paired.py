"""Paired comparison of two models scored on the same held-out examples.

Two models evaluated on the same examples differ by less noise than two independent samples: the per-example
differences cancel what is hard or easy about each example. ``paired_difference`` reports the mean of
``b - a`` over the examples, its standard error, a percentile-bootstrap 95% interval, and how often ``b`` won,
lost or tied. ``separated`` is true when the interval excludes zero. It says nothing about training seeds: one
paired run measures one pair of trained models, and the seed spread (other runs) can be larger than this
interval.
"""

from __future__ import annotations

import math

import numpy as np


def paired_difference(a, b, *, resamples: int = 10_000, seed: int = 0, tie: float = 1e-9) -> dict:
    """Compare per-example scores ``b`` against the baseline ``a`` (two equal-length sequences, same order)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"paired scores need the same examples: got {a.size} and {b.size} scores")
    if a.size < 2:
        raise ValueError(f"a paired comparison needs at least 2 examples, got {a.size}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("paired scores must be finite numbers (a NaN or inf came in)")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    diff = b - a  # (N,)
    n = diff.size
    rng = np.random.default_rng(seed)
    # bootstrap over examples, in chunks so 10k x N stays small in memory
    means = np.concatenate([diff[rng.integers(0, n, size=(min(1000, resamples - s), n))].mean(axis=1)
                            for s in range(0, resamples, 1000)])
    low, high = np.percentile(means, [2.5, 97.5])
    return {
        "examples": n,
        "mean_a": float(a.mean()),
        "mean_b": float(b.mean()),
        "mean_diff": float(diff.mean()),
        "stderr": float(diff.std(ddof=1) / math.sqrt(n)),
        "ci95": [float(low), float(high)],
        "separated": bool(low > 0 or high < 0),
        "b_wins": int((diff > tie).sum()),
        "b_losses": int((diff < -tie).sum()),
        "ties": int((np.abs(diff) <= tie).sum()),
    }


def unpairable(base: dict, other: dict, *, scores: str, examples: str) -> str | None:
    """Why two eval reports cannot be compared example by example, or None when they can: both must hold the
    per-example ``scores`` list and the same ``examples`` fingerprint (what was scored, in order)."""
    missing = [name for name, r in (("the baseline", base), ("the other", other)) if scores not in r]
    if missing:
        return f"{' and '.join(missing)} report has no per-example scores (written by an older eval); evaluate again"
    if base.get(examples) != other.get(examples):
        return f"they were scored on different examples ({other.get(examples)} vs {base.get(examples)})"
    return None


def format_paired(name: str, result: dict, scale: float = 100.0, unit: str = "points") -> str:
    """One line: 'name: +2.1 points (SE 0.9, 95% CI +0.4 .. +3.9, separated; wins 40 / losses 22 / ties 238 of 300)'."""
    lo, hi = (scale * x for x in result["ci95"])
    return (f"{name}: {scale * result['mean_diff']:+.1f} {unit} (SE {scale * result['stderr']:.1f}, 95% CI "
            f"{lo:+.1f} .. {hi:+.1f}{', separated' if result['separated'] else ''}; wins {result['b_wins']} / "
            f"losses {result['b_losses']} / ties {result['ties']} of {result['examples']})")


__all__ = ["format_paired", "paired_difference", "unpairable"]
