"""Paired comparison of two models scored on the same held-out examples.

Two models evaluated on the same examples differ by less noise than two independent samples: the per-example
differences cancel what is hard or easy about each example. ``paired_difference`` reports the mean of
``b - a`` over the examples, its standard error, a percentile-bootstrap 95% interval, and how often ``b`` won,
lost or tied. ``separated`` is true when the interval excludes zero. It says nothing about training seeds: one
paired run measures one pair of trained models, and the seed spread (other runs) can be larger than this
interval. ``across_seeds`` takes that step: the same comparison repeated with models trained from several seeds,
judged by the spread of its per-seed differences.
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


# two-sided 95% quantiles of Student's t for 1..10 degrees of freedom; past that, the quantile at the
# bracket's lower end (never smaller than the true one, so the interval errs wide)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def _t975(dof: int) -> float:
    if dof <= len(_T975):
        return _T975[dof - 1]
    return 2.228 if dof <= 20 else 2.086 if dof <= 30 else 2.042 if dof <= 60 else 2.0


def across_seeds(per_seed) -> dict:
    """Pool paired comparisons of the same two recipes trained from different seeds (``paired_difference``
    results, one per seed, each scored on its own or the same examples).

    Each seed counts once: the estimate is the mean of the per-seed differences, and its error comes from how
    much those differ from seed to seed (Student's t with seeds - 1 degrees of freedom), not from the number
    of examples, since a new seed trains new models and the per-example interval cannot see that variance.
    With two seeds the interval is wide (t = 12.7) by design: two runs say little about a third.

    ``examples_pooled`` is the other reading, for these trained models only: every seed's examples as one
    paired sample, stratified by seed (example-weighted mean; variance from each seed's own standard error;
    normal 95% interval). It leaves out the seed-to-seed spread, so it answers "how far apart are the models
    we trained", not "how far apart would new seeds land"."""
    per_seed = list(per_seed)
    if len(per_seed) < 2:
        raise ValueError(f"pooling over seeds needs at least 2 seeds' comparisons, got {len(per_seed)}")
    means = np.array([r["mean_diff"] for r in per_seed], dtype=np.float64)  # (S,)
    s = means.size
    mean = float(means.mean())
    stderr = float(means.std(ddof=1) / math.sqrt(s))
    half = _t975(s - 1) * stderr
    low, high = mean - half, mean + half
    counts = np.array([r["examples"] for r in per_seed], dtype=np.float64)  # (S,)
    errors = np.array([r["stderr"] for r in per_seed], dtype=np.float64)  # (S,)
    pooled_mean = float((counts * means).sum() / counts.sum())
    pooled_se = float(math.sqrt(((counts * errors) ** 2).sum()) / counts.sum())
    pooled_ci = [pooled_mean - 1.96 * pooled_se, pooled_mean + 1.96 * pooled_se]
    return {
        "seeds": s,
        "mean_diff": mean,
        "seed_stderr": stderr,
        "ci95": [low, high],
        # identical per-seed differences (the same runs given twice, in practice) say nothing about seeds
        "separated": bool(stderr > 0 and (low > 0 or high < 0)),
        "per_seed": [float(m) for m in means],
        "per_seed_separated": [bool(r["separated"]) for r in per_seed],
        "same_sign": int((np.sign(means) == np.sign(mean)).sum()) if mean != 0 else 0,
        "examples_pooled": {"examples": int(counts.sum()), "mean_diff": pooled_mean, "stderr": pooled_se,
                            "ci95": pooled_ci, "separated": bool(pooled_ci[0] > 0 or pooled_ci[1] < 0)},
    }


def distinct_per_seed(groups, name) -> None:
    """Refuse seed groups (one list of reports per seed, the same recipes in the same order) that are not
    distinct runs: unequal lengths, or one model (``name(report)``) given for two seeds."""
    groups = [list(g) for g in groups]
    if len({len(g) for g in groups}) != 1:
        raise ValueError(f"every seed's group needs the same recipes in the same order; got groups of "
                         f"{[len(g) for g in groups]} reports")
    for i in range(len(groups[0])):
        names = [name(g[i]) for g in groups]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"the same model is given for two seeds ({', '.join(twice)}); each group must hold "
                             "another seed's runs")


def format_across_seeds(name: str, result: dict, scale: float = 100.0, unit: str = "points") -> str:
    """One line: 'name: -1.2 points over 3 seeds (seed SE 3.1, 95% CI -14.6 .. +12.2; same sign in 1 of 3; per
    seed -7.0 +4.5 -1.1*; all 600 examples as one sample, these models only: -1.2, SE 2.8, CI -6.7 .. +4.3)',
    where * marks a seed whose own paired interval excludes zero."""
    lo, hi = (scale * x for x in result["ci95"])
    seeds = " ".join(f"{scale * m:+.1f}{'*' if sep else ''}"
                     for m, sep in zip(result["per_seed"], result["per_seed_separated"]))
    spread = "" if result["seed_stderr"] > 0 else ", no spread between seeds: not informative"
    return (f"{name}: {scale * result['mean_diff']:+.1f} {unit} over {result['seeds']} seeds (seed SE "
            f"{scale * result['seed_stderr']:.1f}, 95% CI {lo:+.1f} .. {hi:+.1f}"
            f"{', separated' if result['separated'] else ''}{spread}; same sign in {result['same_sign']} of "
            f"{result['seeds']}; per seed {seeds}; {_examples_pooled(result, scale)})")


def _examples_pooled(result: dict, scale: float) -> str:
    pooled = result["examples_pooled"]
    lo, hi = (scale * x for x in pooled["ci95"])
    return (f"all {pooled['examples']} examples as one sample, these models only: {scale * pooled['mean_diff']:+.1f}, "
            f"SE {scale * pooled['stderr']:.1f}, CI {lo:+.1f} .. {hi:+.1f}{', separated' if pooled['separated'] else ''}")


__all__ = ["across_seeds", "distinct_per_seed", "format_across_seeds", "format_paired", "paired_difference", "unpairable"]
