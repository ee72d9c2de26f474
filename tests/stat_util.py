"""Goodness-of-fit helper shared by the exactness tests."""
from __future__ import annotations

from collections import Counter
from typing import Hashable

import numpy as np
from scipy import stats


def pooled_chisquare(observed: Counter, expected: dict[Hashable, float], n: int, min_expected: float = 5.0) -> tuple[float, int]:
    """Chi-square p-value of observed counts against expected probabilities.

    Cells expected fewer than min_expected times are pooled into one cell; if even the pool is that small,
    it is dropped, after checking it did not receive far more than its share (an outcome the target never
    produces counts there too). Returns (p-value, number of cells)."""
    big = [c for c, p in expected.items() if p * n >= min_expected]
    obs = [observed.get(c, 0) for c in big]
    exp = [expected[c] * n for c in big]
    rest_obs, rest_exp = n - sum(obs), n - sum(exp)
    if rest_exp >= min_expected:
        obs.append(rest_obs)
        exp.append(rest_exp)
    else:
        assert rest_obs <= 3 * max(rest_exp, 1.0) + 5, f"{rest_obs} outcomes where the target expects {rest_exp:.1f}"
    exp_arr = np.array(exp) * (sum(obs) / sum(exp))
    return float(stats.chisquare(obs, exp_arr).pvalue), len(obs)
