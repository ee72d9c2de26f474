"""Exactness of every verification mode as pure functions, and where the approximate one deviates.

Each exact mode must emit, at the first drafted position, a token distributed exactly as the target's
processed distribution p. Chi-square goodness of fit, fixed seeds, false-alarm rate ALPHA per test.
"""
from collections import Counter

import numpy as np
import pytest
import torch

from picospec.shared.rng import Stream, gumbel_noise, uniform
from picospec.shared.sampling import SamplingParams, process_logits, sample_from
from tests.stat_util import pooled_chisquare
from picospec.shared.draws import NeedMoreTail, ResidualHint, resample_exact, resample_topk
from picospec.shared.verify import gumbel_argmax, tail_draws, top_k, verify_coupled, verify_split

pytestmark = pytest.mark.parallel  # make test runs these two at a time (pyproject.toml: markers)

ALPHA = 1e-3
V = 40


def _pair(case: str, params: SamplingParams):
    g = torch.Generator().manual_seed({"far": 1, "near": 2, "flat_tail": 3}[case])
    lp = torch.randn(V, generator=g) * (0.5 if case == "flat_tail" else 2.0)
    lq = lp + torch.randn(V, generator=g) * (2.0 if case == "far" else 0.5)
    return process_logits(lp, params), process_logits(lq, params)


def _split_exact_round(p, q, seed, K=3, n_tail=1):
    """One split-exact round at position 0 with one drafted token, the tail refilled on demand."""
    x = sample_from(q, uniform(seed, 0, Stream.DRAFT))
    pp = torch.stack([p, p])
    v = verify_split(pp, [float(q[x])], [x], seed, 0)
    if v.accepted == 1:
        return x, 0
    ids, vals = top_k(p, K)
    tail_mass = float(p.double().sum() - vals.double().sum())
    have, refills = n_tail, 0
    while True:
        t_ids, t_vals = tail_draws(p, ids, seed, 0, 0, have)
        try:
            return resample_exact(q, ResidualHint(ids, vals, tail_mass, t_ids, t_vals), seed, 0), refills
        except NeedMoreTail as e:
            assert e.have == have
            have, refills = have * 2, refills + 1


def _chi(counts, p):
    observed = Counter({i: int(c) for i, c in enumerate(counts) if c})
    expected = {i: float(v) for i, v in enumerate(p.double()) if v > 0}
    return pooled_chisquare(observed, expected, int(counts.sum()))[0]


SETTINGS = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7), SamplingParams(temperature=1.0, top_p=0.9)]


@pytest.mark.parametrize("params", SETTINGS, ids=["t1", "t0.7", "t1-top_p0.9"])
@pytest.mark.parametrize("case", ["far", "flat_tail"])
def test_split_exact_emits_p(case, params):
    p, q = _pair(case, params)
    n = 12000
    counts, refills = np.zeros(V), 0
    for s in range(n):
        tok, r = _split_exact_round(p, q, s)
        counts[tok] += 1
        refills += r
    assert _chi(counts, p) > ALPHA
    if case == "flat_tail" and params.top_p == 1.0:
        assert refills > 0  # the ask-for-more path was exercised


@pytest.mark.parametrize("params", SETTINGS, ids=["t1", "t0.7", "t1-top_p0.9"])
@pytest.mark.parametrize("case", ["far", "near"])
def test_coupled_emits_p_and_accepts_at_least_the_bound(case, params):
    p, q = _pair(case, params)
    n = 12000
    counts, acc = np.zeros(V), 0
    for s in range(n):
        x = gumbel_argmax(q, s, 0)
        v = verify_coupled(torch.stack([p, p]), [x], s, 0)
        tok = x if v.accepted else v.token
        counts[tok] += 1
        acc += v.accepted
    assert _chi(counts, p) > ALPHA
    tv = 0.5 * float((p - q).abs().sum())
    bound = (1 - tv) / (1 + tv)
    assert acc / n > bound - 4 * (bound * (1 - bound) / n) ** 0.5


def test_split_topk_deviates_where_the_tail_is_heavy():
    """The paper's sampler: exact output law is min(p, q) + P(reject) * r_K. Measure its TV from p on a
    heavy-tailed target, and check the empirical output follows that law (and not p)."""
    p, q = _pair("flat_tail", SamplingParams(temperature=1.0))
    K = 10
    ids, vals = top_k(p, K)
    pk = torch.zeros(V, dtype=torch.float64)
    pk[ids] = vals.double() / vals.double().sum()
    r = torch.clamp(pk - q.double(), min=0)
    r = r / r.sum()
    law = torch.minimum(p.double(), q.double()) + (1 - torch.minimum(p.double(), q.double()).sum()) * r
    tv_law = 0.5 * float((law - p.double()).abs().sum())
    tail_mass = 1 - float(vals.sum())
    assert tail_mass > 0.3 and tv_law > 0.05, (tail_mass, tv_law)  # heavy tail -> a real, measurable deviation
    n = 12000
    counts = np.zeros(V)
    for s in range(n):
        x = sample_from(q, uniform(s, 0, Stream.DRAFT))
        v = verify_split(torch.stack([p, p]), [float(q[x])], [x], s, 0)
        counts[x if v.accepted else resample_topk(q, ids, vals, s, 0)] += 1
    assert _chi(counts, law.float()) > ALPHA          # it does what the analysis says
    assert _chi(counts, p) < 1e-6                     # and that is not p
    outside = [t for t in range(V) if t not in set(ids.tolist())]
    assert counts[outside].sum() / n < float(torch.minimum(p, q)[outside].sum()) + 0.02  # tail only via acceptance


def test_split_verdicts_are_the_same_coins_as_dense():
    from picospec.shared.verify import verify_dense
    p, q = _pair("far", SamplingParams(temperature=1.0))
    for s in range(300):
        x = sample_from(q, uniform(s, 5, Stream.DRAFT))
        pp = torch.stack([p, p])
        d = verify_dense(pp, q[None], [x], s, 5)
        sp = verify_split(pp, [float(q[x])], [x], s, 5)
        assert d.accepted == sp.accepted and (sp.bonus is None) == d.rejected


def test_tail_draws_continue_the_same_sequence_and_avoid_the_head():
    p, _ = _pair("flat_tail", SamplingParams(temperature=1.0))
    ids, _ = top_k(p, 5)
    a, av = tail_draws(p, ids, 7, 3, 0, 10)
    b, _ = tail_draws(p, ids, 7, 3, 4, 6)
    assert a[4:].tolist() == b.tolist()
    assert not set(a.tolist()) & set(ids.tolist())
    assert torch.equal(av, p[a])
    e, _ = tail_draws(torch.nn.functional.one_hot(torch.tensor(3), V).float(), torch.tensor([3]), 0, 0, 0, 5)
    assert len(e) == 0


def _gumbel_argmax_scoring_every_token(p: torch.Tensor, seed: int, pos: int) -> int:
    """The definition: log p + G over the whole support, first maximum (the reference for the pruned search)."""
    support = torch.nonzero(p > 0).flatten()
    return int(support[int(torch.argmax(torch.log(p[support].double()) + gumbel_noise(seed, pos, support)))])


@pytest.mark.parametrize("vocab", [5, 3000, 151936])
def test_gumbel_argmax_prunes_to_the_same_token_as_scoring_every_one(vocab):
    g = torch.Generator().manual_seed(vocab)
    rows = 0
    for scale in (0.0, 0.3, 1.0, 3.0, 8.0):  # flat (every token in the head) to peaked (a handful scored)
        for trial in range(6 if vocab > 10000 else 30):
            logits = torch.randn(vocab, generator=g) * scale
            if trial % 3 == 1:  # a top-k/top-p-like support: zeros never win and never count as the tail
                logits[torch.randperm(vocab, generator=g)[: vocab // 2]] = -float("inf")
            p = torch.softmax(logits, dim=-1)
            p = p.float() if trial % 2 else p.double()  # the wire's float32 rows and float64 alike
            seed, pos = 7919 * trial + vocab, trial
            assert gumbel_argmax(p, seed, pos) == _gumbel_argmax_scoring_every_token(p, seed, pos), (scale, trial)
            rows += 1
    assert rows >= 30


def test_greedy_reduces_every_mode_to_argmax():
    eye = torch.eye(V)
    p = eye[[7, 9]]
    assert gumbel_argmax(p[0], 0, 0) == 7
    v = verify_coupled(torch.stack([eye[7], eye[2]]), [7], 0, 0)
    assert (v.accepted, v.token) == (1, 2)
    v = verify_split(torch.stack([eye[3], eye[2]]), [1.0], [7], 0, 0)
    assert v.accepted == 0
    ids, vals = top_k(eye[3], 10)
    assert ids.tolist() == [3]
    hint = ResidualHint(ids, vals, 0.0, torch.zeros(0, dtype=torch.long), torch.zeros(0))
    assert resample_exact(eye[7], hint, 0, 0) == 3
    assert resample_topk(eye[7], ids, vals, 0, 0) == 3


def test_split_verification_checks_every_draft_probability_even_after_a_rejection():
    p = torch.zeros(3, 8)
    p[:, 1] = 1.0  # the target never picks token 0: the first draft is rejected for sure
    with pytest.raises(ValueError, match="not in"):
        verify_split(p, [0.5, float("nan")], [0, 0], seed=1, start_pos=0)
    assert verify_split(p, [0.5, 0.5], [0, 0], seed=1, start_pos=0).accepted == 0
