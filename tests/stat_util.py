"""Goodness-of-fit helper shared by the exactness tests."""
from __future__ import annotations

from collections import Counter
from typing import Hashable

import numpy as np
import torch
from scipy import stats

from picospec.shared.sampling import SamplingParams, process_logits


def pooled_chisquare(observed: Counter, expected: dict[Hashable, float], n: int, min_expected: float = 5.0,
                     max_pooled: float = 0.05) -> tuple[float, int]:
    """Chi-square p-value of observed counts against expected probabilities.

    Cells expected fewer than min_expected times are pooled into one cell; if even the pool is that small,
    it is dropped, after checking it did not receive far more than its share (an outcome the target never
    produces counts there too). A law with more than `max_pooled` of its mass in the pool is refused: a bug
    that moves mass inside the pool would be invisible (tests/law.py's PIT test needs no pooling).
    Returns (p-value, number of cells)."""
    big = [c for c, p in expected.items() if p * n >= min_expected]
    pooled = 1.0 - sum(expected[c] for c in big) / sum(expected.values())
    assert pooled <= max_pooled, f"{pooled:.1%} of the law pooled into one cell: too little power, use tests/law.py"
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


def target_joint(target, prompt_ids: list[int], params: SamplingParams) -> dict[tuple[int, int], float]:
    """Exact P(t1, t2) under the target alone: plain forward passes, no cache, no speculative code."""
    with torch.inference_mode():
        p1 = process_logits(target.model(torch.tensor([prompt_ids])).logits[0, -1], params).double()
        joint = {}
        for t1 in torch.nonzero(p1 > 0).flatten().tolist():
            logits = target.model(torch.tensor([prompt_ids + [t1]])).logits[0, -1]
            p2 = process_logits(logits, params).double()
            for t2 in torch.nonzero(p2 > 0).flatten().tolist():
                joint[(t1, t2)] = float(p1[t1] * p2[t2])
    return joint
