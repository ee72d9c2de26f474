"""Exactness of dense rejection sampling as a pure function: the emitted token at the first position
is distributed as p whatever q is. Chi-square goodness of fit at a stated false-alarm rate."""
import numpy as np
import pytest
import torch
from scipy import stats

from picospec.shared.rng import Stream, uniform
from picospec.shared.sampling import sample_from
from picospec.shared.verify import verify_dense

pytestmark = pytest.mark.parallel  # make test runs these two at a time (pyproject.toml: markers)

ALPHA = 1e-3  # false-alarm rate of each goodness-of-fit test


def _first_token(p, q, seed, k=1):
    """Run one speculative round of length k at position 0; return the token emitted at position 0."""
    draft = []
    for i in range(k):
        draft.append(sample_from(q[i], uniform(seed, i, Stream.DRAFT)))
    v = verify_dense(p, q, draft, seed, 0)
    return draft[0] if v.accepted >= 1 else v.token, v


@pytest.mark.parametrize("case", ["disjointish", "similar", "q_peaked"])
def test_dense_verification_emits_p(case):
    torch.manual_seed({"disjointish": 1, "similar": 2, "q_peaked": 3}[case])
    V, N = 8, 20000
    p = torch.softmax(torch.randn(2, V) * 1.5, -1)
    if case == "disjointish":
        q = torch.softmax(torch.randn(1, V) * 3, -1)
    elif case == "similar":
        q = torch.softmax(torch.log(p[:1]) + 0.3 * torch.randn(1, V), -1)
    else:
        q = torch.full((1, V), 0.01 / (V - 1)); q[0, 3] = 0.99
    counts = np.zeros(V)
    accepted = 0
    for s in range(N):
        tok, v = _first_token(p, q, seed=s)
        counts[tok] += 1
        accepted += v.accepted
    expected = p[0].double().numpy()
    chi = stats.chisquare(counts, expected / expected.sum() * N)
    assert chi.pvalue > ALPHA, (counts, p[0])
    tv = 0.5 * float((p[0] - q[0]).abs().sum())
    # P(accept) = 1 - TV: 4-sigma binomial band
    sd = (tv * (1 - tv) / N) ** 0.5
    assert abs(accepted / N - (1 - tv)) < 4 * sd + 1e-9


def test_bonus_token_when_all_accepted_is_from_last_p_row():
    p = torch.tensor([[0.0, 1.0, 0.0], [0.2, 0.3, 0.5]])
    q = torch.tensor([[0.0, 1.0, 0.0]])
    counts = np.zeros(3)
    for s in range(6000):
        v = verify_dense(p, q, [1], s, 0)
        assert v.accepted == 1 and not v.rejected
        counts[v.token] += 1
    assert stats.chisquare(counts, np.array([0.2, 0.3, 0.5]) * 6000).pvalue > ALPHA


def test_greedy_one_hot_reduces_to_argmax_match():
    eye = torch.eye(5)
    p = eye[[2, 4, 1]]
    q = eye[[2, 3]]
    v = verify_dense(p, q, [2, 3], seed=0, start_pos=10)
    assert (v.accepted, v.token, v.rejected) == (1, 4, True)
    v = verify_dense(p, eye[[2, 4]], [2, 4], seed=0, start_pos=10)
    assert (v.accepted, v.token, v.rejected) == (2, 1, False)


def test_verify_rejects_impossible_draft_and_bad_shapes():
    p = torch.full((2, 4), 0.25)
    with pytest.raises(ValueError, match="zero draft probability"):
        verify_dense(p, torch.tensor([[1.0, 0, 0, 0]]), [2], 0, 0)
    with pytest.raises(ValueError, match="shape"):
        verify_dense(p, torch.full((2, 4), 0.25), [1], 0, 0)


def test_greedy_verdicts_from_argmaxes_alone_equal_the_coupled_ones():
    """verify_greedy (the cloud's T=0 coupled path: no V-wide step per row) gives verify_coupled's verdict on the
    processed one-hot p, ties included (both take the first maximum), for drafts that agree for 0..k tokens."""
    from picospec.shared.sampling import SamplingParams, process_logits
    from picospec.shared.verify import verify_coupled, verify_greedy

    gen = torch.Generator().manual_seed(7)
    greedy = SamplingParams(temperature=0.0, seed=3)
    for case in range(200):
        k, vocab = case % 7, 50
        logits = torch.randint(0, 4, (k + 1, vocab), generator=gen).float()  # few values: ties everywhere
        best = logits.argmax(-1).tolist()
        agree = int(torch.randint(0, k + 1, (1,), generator=gen))
        drafts = best[:agree] + [(t + 1) % vocab for t in best[agree:k]]
        want = verify_coupled(process_logits(logits, greedy), drafts, greedy.seed, 10 + case)
        assert verify_greedy(best, drafts) == want, case
    with pytest.raises(ValueError, match="shape mismatch"):
        verify_greedy([1, 2], [5, 6])
