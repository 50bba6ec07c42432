"""Check the cohort analysis on many simulated cohorts with a known effect.

Each cohort (``tilscore.cohort.simulate_cohort``) has stromal CD8 % positive cells with a median
of 6% before and 20% after treatment and an odds ratio of pCR of 2 per 10 percentage points of
the pre-treatment value. For each cohort size the script prints how often the 95% intervals of
the median change and of the odds ratio contain the true values (should be about 0.95) and how
often each test reaches p < 0.05 (the power).

Run::

    python benchmarks/eval_cohort.py [--runs 200] [--sizes 60 200]
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np

from tilscore.cohort import paired_change, pcr_association, simulate_cohort


def true_median_change(pre: float, post: float, spread: float, n: int = 2_000_000) -> float:
    """Population median of post - pre under simulate_cohort's model, by Monte Carlo."""
    rng = np.random.default_rng(0)
    x = pre * np.exp(spread * rng.standard_normal(n))
    y = x * (post / pre) * np.exp(spread * rng.standard_normal(n))
    return float(np.median(y - x))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200, help="cohorts per size")
    parser.add_argument("--sizes", type=int, nargs="+", default=[60, 200], help="patients")
    args = parser.parse_args()
    pre, post, spread, odds = 6.0, 20.0, 0.6, 2.0
    change = true_median_change(pre, post, spread)
    print(f"true median change {change:.2f} points; true OR {odds} per 10 points")
    warnings.simplefilter("ignore")
    for n in args.sizes:
        cov_change = cov_or = sig_change = sig_or = 0
        for run in range(args.runs):
            df = simulate_cohort(
                n,
                seed=1000 + run,
                pre_median=pre,
                post_median=post,
                spread=spread,
                odds_ratio_per_10=odds,
                compartments=("stromal",),
            )
            p = paired_change(df, ["pct_positive"]).iloc[0]
            a = pcr_association(df, ["pct_positive"], ["pre"]).iloc[0]
            cov_change += bool(p.change_ci_low <= change <= p.change_ci_high)
            sig_change += bool(p.p_value < 0.05)
            cov_or += bool(a.ci_low <= odds <= a.ci_high)
            sig_or += bool(a.p_value < 0.05)
        r = args.runs
        print(
            f"n={n:4d} patients, {r} cohorts: median-change CI coverage {cov_change / r:.3f}, "
            f"Wilcoxon p<0.05 {sig_change / r:.3f}; OR CI coverage {cov_or / r:.3f}, "
            f"OR p<0.05 {sig_or / r:.3f}"
        )


if __name__ == "__main__":
    main()
