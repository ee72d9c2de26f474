"""The law test itself (tests/law.py): its reference agrees with our sampling's conventions, its false-alarm
rate and power are what its docstring states, and it catches token-level deviations of realistic shapes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from picospec.shared.sampling import SamplingParams, process_logits
from tests.law import (ALPHA, ALPHA_TIMED, PAIR_RHO_90, TIMED_TESTS, STATISTICS, T07_TOPK_TOPP, T1, LawCheck, Warping, detectable_shift, pair_chisquare,
                       pit_values, reference_laws)

pytestmark = pytest.mark.parallel  # make test runs these two at a time (pyproject.toml: markers)

N = 2000
REPS = 300


def _shifted_uniform(d: float, size: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Draws with CDF t + 4d t(1 - t): mass d moved towards 0 (the likeliest tokens), inverse CDF in closed form."""
    u = rng.uniform(size=size)
    if d == 0:
        return u
    b = 1 + 4 * d
    return (b - np.sqrt(b * b - 16 * d * u)) / (8 * d)


def _rejection_rate(samples: np.ndarray) -> float:
    return float(np.mean([stats.kstest(row, "uniform").pvalue <= ALPHA / STATISTICS for row in samples]))


def test_pair_statistic_power_at_the_stated_correlation():
    rng = np.random.default_rng(4)
    z = rng.standard_normal((REPS, N // 2, 2))
    z[..., 1] = PAIR_RHO_90 * z[..., 0] + np.sqrt(1 - PAIR_RHO_90 ** 2) * z[..., 1]
    rate = np.mean([pair_chisquare(stats.norm.cdf(row)) <= ALPHA / STATISTICS for row in z])
    assert rate >= 0.85, rate
    null = np.mean([pair_chisquare(row) <= ALPHA / STATISTICS for row in rng.uniform(size=(REPS, N // 2, 2))])
    assert null <= 0.02, null


def test_false_alarm_rate_is_about_alpha():
    rate = _rejection_rate(_shifted_uniform(0.0, (REPS, N), np.random.default_rng(1)))
    assert rate <= 0.02, rate  # ALPHA = 1e-3: at most a few of 300


def test_power_at_the_stated_shift_is_ninety_percent():
    d = detectable_shift(N)
    rate = _rejection_rate(_shifted_uniform(d, (REPS, N), np.random.default_rng(2)))
    assert 0.85 <= rate, (d, rate)
    assert _rejection_rate(_shifted_uniform(d / 2, (REPS, N), np.random.default_rng(3))) < 0.6  # and not far more


@pytest.mark.parametrize("params", [SamplingParams(1.0), SamplingParams(0.7, top_k=20, top_p=0.9),
                                    SamplingParams(1.3, top_k=5), SamplingParams(0.5, top_p=0.5)])
def test_reference_warpers_agree_with_process_logits(params):
    """transformers' warpers and our process_logits: same support, same probabilities (ties at the k-th logit
    included: both keep them)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 300, generator=g) * 3
    logits[:, 10:14] = logits[:, 10:11]  # ties
    warping = Warping(params.temperature, params.top_k, params.top_p)
    ref = torch.softmax(warping.processors()(torch.zeros(64, 1, dtype=torch.long), logits.clone()).double(), -1)
    ours = process_logits(logits, params).double()
    assert torch.equal(ref > 0, ours > 0)
    assert torch.allclose(ref, ours, atol=1e-6)


def _real_laws(model, n_seq: int = 50, length: int = 20) -> torch.Tensor:
    """The tiny target's laws at n_seq x length positions after random contexts: [n_seq * length, 64]."""
    g = torch.Generator().manual_seed(7)
    ctx = torch.randint(2, 64, (n_seq, length + 3), generator=g).tolist()
    return torch.cat([reference_laws(model, c[:3], c[3:], T1) for c in ctx])


def _residual_ignores_q(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Mutant a1's law: accept x ~ q with min(1, p/q), on rejection draw from p itself instead of the residual."""
    both = torch.minimum(p, q)
    return both + (1 - both.sum(-1, keepdim=True)) * p


@pytest.mark.parametrize("bug,caught", [
    (lambda p, q: p, False),                                            # exact sampling passes
    (lambda p, q: p ** 1.25, True),                                     # a temperature on one side only (T=0.8)
    (lambda p, q: p * (p >= p.topk(8, -1).values[:, -1:]), True),       # the law cut to its top-8
    (lambda p, q: 0.75 * p + 0.25 / p.shape[-1], True),                 # a quarter of draws uniform
    (_residual_ignores_q, True),                                        # mutant a1
], ids=["exact", "temperature", "top8", "uniform", "residual-ignores-q"])
def test_token_level_bugs_of_realistic_shapes_are_caught(tiny_target, tiny_draft, bug, caught):
    """1,000 tokens drawn from bug(p, q) at real positions of the tiny pair, tested against p by the two KS
    statistics (ranked by p and by q/p)."""
    laws, drafts = _real_laws(tiny_target.model), _real_laws(tiny_draft.model)  # [1000, V] each
    out = bug(laws, drafts)
    out = out / out.sum(-1, keepdim=True)
    tokens = torch.multinomial(out, 1, generator=torch.Generator().manual_seed(8))[:, 0].tolist()
    rng = np.random.default_rng(9)
    ratio = torch.log(drafts + 1e-300) - torch.log(laws + 1e-300)
    pvalues = [stats.kstest(pit_values(laws, tokens, rng, scores), "uniform").pvalue for scores in (None, ratio)]
    assert bool(min(pvalues) <= ALPHA / STATISTICS) is caught, pvalues


def test_a_token_outside_the_support_is_named(tiny_target):
    law = LawCheck(tiny_target.model, Warping(1.0, top_k=1))
    greedy = int(reference_laws(tiny_target.model, [0, 5, 6], [0], Warping(1.0, top_k=1))[0].argmax())
    law.add([0, 5, 6], [(greedy + 1) % 64])
    with pytest.raises(AssertionError, match="never produces"):
        law.assert_matches("planted")


def test_pit_values_rank_by_probability():
    laws = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.25, 0.25]], dtype=torch.float64)
    rng = np.random.default_rng(0)
    u = pit_values(laws, [2, 2], rng)
    assert 0.6 <= u[0] <= 0.9 and 0.75 <= u[1] <= 1.0  # token 2 ranks second (row 0), third by id (row 1)
    assert T07_TOPK_TOPP.edge_kwargs() == {"temperature": 0.7, "top_k": 20, "top_p": 0.9}


def test_timed_law_tests_keep_the_false_alarm_rate_of_a_full_run_under_a_thousandth():
    """The law tests whose tokens depend on timing draw a fresh sample every run (tests/law.py); their number and
    rate bound the chance that a correct build fails a full run on them. They must still catch a shift of 0.075."""
    test_file = Path(__file__).with_name("test_law_tiny.py").read_text()
    assert test_file.count("timed=True)") == 4  # the tests TIMED_TESTS counts: jitter (8 cases), online (2), budget (2),
    # resumed after a cut (2)
    llama_file = Path(__file__).with_name("test_llama_cpp.py").read_text()
    assert llama_file.count("alpha=ALPHA_TIMED") == 2  # ... and llama.cpp's batched sessions (1), the Qwen pair (4)
    models_file = Path(__file__).with_name("test_law_models.py").read_text()
    assert models_file.count("alpha=ALPHA_TIMED if") == 1  # ... and SmolLM2's dense and split-exact (2 x 2 warpings)
    assert TIMED_TESTS == 2 * 2 * 2 + 2 + 2 + 2 + 1 + 4 + 4 and TIMED_TESTS * ALPHA_TIMED < 1e-3
    assert detectable_shift(2000, ALPHA_TIMED) < 0.075
