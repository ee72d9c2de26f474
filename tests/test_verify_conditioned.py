"""Verification of whole draft batches against an independent reference, with the coins conditioned on the verdict.

The other pure tests look at the token emitted at the first position of a one-draft batch. Here every exact mode
(dense, split-exact, coupled) verifies batches of k = 2..3 drafts on a toy pair of models over a small vocabulary
whose rows depend on the prefix (the target's row at position i is p(.|x_<i), the draft's q(.|x_<i)), and the
outcome of a batch, (accepted, emitted tokens) = (a, y_0..y_a), is compared with its exact law:

  * the joint law of the whole outcome (chi-square over every outcome, pooled only where expected below 5);
  * that law conditioned on a: the bonus after a full acceptance (a = k) and the correction after a partial one
    (a = 0..k-1, so positions other than 0), each stratum on its own. A coin reused across streams (the bonus drawn
    with the coin that accepted the last draft, the residual with the acceptance coin) is biased only once the
    verdict is known, which is what conditioning on a shows.

The reference is written here from the maths alone and never calls the function under test:
  rejection sampling (dense, split-exact): P(draft x and accept) = q(x) min(1, p(x)/q(x)); at the first rejection the
    token comes from norm(max(0, p - q)); after k acceptances the bonus comes from p at position k.
  Gumbel coupling (coupled): the draft's and the target's Gumbel-max samples share the noise; for one position
    P(both = y) = 1 / sum_z max(p(z)/p(y), q(z)/q(y)) (integrate over the noise of y; checked against numpy's own
    Gumbel draws below), and the emitted token is always the target's own sample.
Both laws, completed with the target's own draws after the emitted tokens, are the target's law of k+1 tokens
(checked exactly for each reference): what an exact method must produce.

Drafts are sampled by this file's own inverse-CDF (or Gumbel-max) code from the draft stream's coins, as the edge
does (Stream.DRAFT / Stream.GUMBEL at each absolute position), so a collision of coin streams shows too. Fixed seeds:
deterministic. Each chi-square passes at p > ALPHA. The split-exact batch goes through the edge's own bookkeeping for
its correction: the q row comes from EdgeChain.apply (edge_client/chain.py), the position from the committed length.

Beside the laws, cheap checks seed by seed (the coins conditioned one by one): each dense or split verdict is what the
coin contract gives for that seed's coins, each coupled verdict what a plain Gumbel-max over the whole vocabulary gives
(at V = 6, and at V = 6000 where gumbel_argmax prunes its long tail); the q row of a split correction is the rejected
draft's; every coin stream is its own. scripts/mutants.py plants the bugs each test catches (v*, p*, n*, l3, c2;
`make test-mutants-fast`).
"""
from __future__ import annotations

import functools
import itertools
import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from picospec.edge_client.chain import ChainToken, EdgeChain
from picospec.shared.draws import NeedMoreTail, ResidualHint, resample_exact
from picospec.shared.protocol import SessionState
from picospec.shared.rng import Stream, gumbel_noise, uniform
from picospec.shared.verify import tail_draws, top_k, verify_coupled, verify_dense, verify_split
from tests.stat_util import pooled_chisquare

pytestmark = pytest.mark.parallel  # make test runs these two at a time (pyproject.toml: markers)

ALPHA = 1e-4  # false-alarm rate of each chi-square
Outcome = tuple[int, ...]  # the emitted tokens y_0..y_a: a = len - 1 drafts accepted, then the cloud's (or edge's) token


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Rows of 4 to 6000 entries, one at a time: torch's intra-op threads only contend (the batch laws ran 5x slower,
    the V = 6000 Gumbel check 30x, with two threads on two busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- the toy pair

@dataclass(frozen=True)
class Pair:
    """A target and a draft over V tokens, k positions deep; each row depends on the whole prefix."""

    V: int
    k: int
    p: dict[Outcome, torch.Tensor]  # prefix (length 0..k) -> the target's row [V], float32 like the real ones
    q: dict[Outcome, torch.Tensor]  # prefix (length 0..k-1) -> the draft's row [V], full support

    def rows(self, drafts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """What the cloud's pass gives for these drafts: p [k+1, V] and the q rows the drafts came from [k, V]."""
        p = torch.stack([self.p[tuple(drafts[:i])] for i in range(self.k + 1)])
        q = torch.stack([self.q[tuple(drafts[:i])] for i in range(self.k)])
        return p, q


def make_pair(V: int, k: int, seed: int, gap: float = 1.2) -> Pair:
    """q = softmax(log-p + gap * noise): far enough that every position rejects often, near enough that full
    acceptances are common. About a third of the target's rows give no mass to their least likely token (as top-k or
    top-p would), which the draft can still propose."""
    g = torch.Generator().manual_seed(seed)
    p, q = {}, {}
    for n in range(k + 1):
        for prefix in itertools.product(range(V), repeat=n):
            lp = torch.randn(V, generator=g) * 1.3
            lq = lp + torch.randn(V, generator=g) * gap
            if float(torch.rand(1, generator=g)) < 0.35:
                lp[int(lp.argmin())] = float("-inf")
            p[prefix] = torch.softmax(lp, -1)
            if n < k:
                q[prefix] = torch.softmax(lq, -1)
    return Pair(V, k, p, q)


def _row(t: torch.Tensor) -> np.ndarray:
    r = t.double().numpy()
    return r / r.sum()


# ---------------------------------------------------------------------------------------------- the references

def rejection_sampling_law(pair: Pair) -> dict[Outcome, float]:
    """The exact law of (a, y_0..y_a) under speculative rejection sampling, from its definition."""
    law: dict[Outcome, float] = {}

    def walk(prefix: Outcome, weight: float) -> None:
        P = _row(pair.p[prefix])
        if len(prefix) == pair.k:  # every draft accepted: the bonus from p at position k
            for y in np.flatnonzero(P > 0):
                law[prefix + (int(y),)] = weight * P[y]
            return
        Q = _row(pair.q[prefix])
        accept_given_x = np.minimum(1.0, P / Q)          # q has full support
        reject = float(np.sum(Q * (1.0 - accept_given_x)))  # P(the draft at this position is rejected)
        residual = np.maximum(P - Q, 0.0)
        if reject > 0:
            residual = residual / residual.sum()
            for y in np.flatnonzero(residual > 0):
                law[prefix + (int(y),)] = weight * reject * residual[y]
        for x in range(pair.V):
            if Q[x] * accept_given_x[x] > 0:
                walk(prefix + (x,), weight * Q[x] * accept_given_x[x])

    walk((), 1.0)
    return law


def both_pick(P: np.ndarray, Q: np.ndarray) -> np.ndarray:
    """P(argmax(log P + G) = argmax(log Q + G) = y) for each y, one Gumbel vector G shared: given G_y = g, every other z
    must have G_z < g + min(log P_y - log P_z, log Q_y - log Q_z); integrating over g gives 1 / sum_z max(P_z/P_y, Q_z/Q_y)."""
    out = np.zeros(len(P))
    for y in range(len(P)):
        if P[y] > 0 and Q[y] > 0:
            out[y] = 1.0 / np.sum(np.maximum(P / P[y], Q / Q[y]))
    return out


def gumbel_coupling_law(pair: Pair) -> dict[Outcome, float]:
    """The exact law of (a, y_0..y_a) under coupled verification: the target's sample at each position, the draft
    accepted while its own sample (same noise) agrees."""
    law: dict[Outcome, float] = {}

    def walk(prefix: Outcome, weight: float) -> None:
        P = _row(pair.p[prefix])
        if len(prefix) == pair.k:
            for y in np.flatnonzero(P > 0):
                law[prefix + (int(y),)] = weight * P[y]
            return
        agree = both_pick(P, _row(pair.q[prefix]))
        for y in np.flatnonzero(P > 0):
            if P[y] - agree[y] > 0:
                law[prefix + (int(y),)] = weight * (P[y] - agree[y])  # the target picks y, the draft did not
            if agree[y] > 0:
                walk(prefix + (int(y),), weight * agree[y])

    walk((), 1.0)
    return law


def assert_completes_to_the_target_law(pair: Pair, law: dict[Outcome, float]) -> None:
    """An outcome y_0..y_a continued by the target's own draws at a+1..k: every sequence of k+1 tokens must come out
    with the target's probability prod_j p(y_j | y_<j). Exact arithmetic, no sampling."""
    assert abs(sum(law.values()) - 1.0) < 1e-9
    for full in itertools.product(range(pair.V), repeat=pair.k + 1):
        steps = [_row(pair.p[full[:j]])[full[j]] for j in range(pair.k + 1)]
        got = sum(law.get(full[: a + 1], 0.0) * math.prod(steps[a + 1:]) for a in range(pair.k + 1))
        assert abs(got - math.prod(steps)) < 1e-9, (full, got, math.prod(steps))


# ---------------------------------------------------------------------------------------------- the edge's drafts

def inverse_cdf(row: torch.Tensor, u: float) -> int:
    """This file's own draw from a row with a uniform u: the first index whose cumulative mass exceeds u * total."""
    c = np.cumsum(row.double().numpy())
    i = min(int(np.searchsorted(c, u * c[-1], side="right")), len(c) - 1)
    return i if row[i] > 0 else int(np.flatnonzero(row.numpy() > 0)[-1])


def sampled_drafts(pair: Pair, seed: int, start: int) -> list[int]:
    drafts: list[int] = []
    for i in range(pair.k):
        drafts.append(inverse_cdf(pair.q[tuple(drafts)], uniform(seed, start + i, Stream.DRAFT)))
    return drafts


def gumbel_drafts(pair: Pair, seed: int, start: int) -> list[int]:
    """The coupled edge's drafts: argmax(log q + G) with the noise the cloud uses at each absolute position."""
    drafts: list[int] = []
    for i in range(pair.k):
        scores = torch.log(pair.q[tuple(drafts)].double()) + gumbel_noise(seed, start + i, torch.arange(pair.V))
        drafts.append(int(torch.argmax(scores)))
    return drafts


# ---------------------------------------------------------------------------------------------- one batch per mode

def dense_batch(pair: Pair, seed: int, start: int) -> Outcome:
    drafts = sampled_drafts(pair, seed, start)
    p, q = pair.rows(drafts)
    v = verify_dense(p, q, drafts, seed, start)
    assert v.rejected == (v.accepted < pair.k)
    return tuple(drafts[: v.accepted]) + (v.token,)


SPLIT_TOP_K = 2  # of V = 5 tokens: most corrections need the tail draws, and some ask for more of them


def split_exact_batch(pair: Pair, seed: int, start: int) -> Outcome:
    """The cloud decides from q(x) alone; after a rejection the edge takes the q row of the rejected draft from its
    chain (EdgeChain.apply's rejected_extra, as edge_client/session.py does) and samples the correction from the
    top-K of p, p's mass outside it and draws from p outside it, asking for more draws when they run out."""
    drafts = sampled_drafts(pair, seed, start)
    p, q = pair.rows(drafts)
    v = verify_split(p, [float(q[i, x]) for i, x in enumerate(drafts)], drafts, seed, start)
    if v.bonus is not None:
        assert v.accepted == pair.k
        return tuple(drafts) + (v.bonus,)
    assert v.accepted < pair.k
    state = SessionState(prompt_ids=[0] * start, max_new_tokens=4 * pair.k, eos_ids=frozenset(), vocab_size=pair.V)
    edge = EdgeChain(state)
    edge.chain = [ChainToken(x, q[i], sent=True) for i, x in enumerate(drafts)]
    applied = edge.apply(start_pos=start, verified=pair.k, accepted=v.accepted, token=None, rejected=True,
                         committed_len=start + v.accepted, finished=False, epoch=0)
    assert state.awaiting_resolution and applied.rejected_extra is not None
    pos = state.committed_len
    p_row = p[v.accepted]
    ids, vals = top_k(p_row, SPLIT_TOP_K)
    tail_mass = max(0.0, float(p_row.double().sum() - vals.double().sum()))
    have = 1
    while True:
        t_ids, t_vals = tail_draws(p_row, ids, seed, pos, 0, have)
        try:
            y = resample_exact(applied.rejected_extra, ResidualHint(ids, vals, tail_mass, t_ids, t_vals), seed, pos)
            return tuple(drafts[: v.accepted]) + (y,)
        except NeedMoreTail:
            have *= 2


def coupled_batch(pair: Pair, seed: int, start: int) -> Outcome:
    drafts = gumbel_drafts(pair, seed, start)
    p, _ = pair.rows(drafts)
    v = verify_coupled(p, drafts, seed, start)
    assert v.rejected == (v.accepted < pair.k)
    return tuple(drafts[: v.accepted]) + (v.token,)


@dataclass(frozen=True)
class Case:
    batch: object
    law: object
    V: int
    k: int
    pair_seed: int
    gap: float
    n: int


# pairs picked (by their reference laws alone) so that every stratum a = 0..k has at least a fifth of the mass
CASES = {
    "dense": Case(dense_batch, rejection_sampling_law, V=4, k=3, pair_seed=19, gap=1.2, n=24000),
    "split-exact": Case(split_exact_batch, rejection_sampling_law, V=5, k=2, pair_seed=10, gap=1.2, n=16000),
    "coupled": Case(coupled_batch, gumbel_coupling_law, V=4, k=3, pair_seed=15, gap=1.5, n=12000),
}


@functools.lru_cache(maxsize=None)
def simulate(mode: str) -> tuple[Pair, dict[Outcome, float], Counter]:
    """n batches of `mode` over seeds 10**6 * index + 0..n-1, each at its own absolute start position 3..9."""
    c = CASES[mode]
    pair = make_pair(c.V, c.k, c.pair_seed, c.gap)
    law = c.law(pair)
    base = 10**6 * (1 + list(CASES).index(mode))
    seen = Counter(c.batch(pair, base + s, 3 + s % 7) for s in range(c.n))
    return pair, law, seen


def assert_follows(seen: Counter, law: dict[Outcome, float], what: str) -> None:
    n = sum(seen.values())
    never = set(seen) - set(law)
    assert not never, f"{what}: outcomes the exact law never produces: {sorted(never)[:5]}"
    pvalue, cells = pooled_chisquare(seen, law, n)
    assert pvalue > ALPHA, f"{what} deviates from the exact law: chi-square p = {pvalue:.2e} over {cells} cells, n = {n}"


def stratum(seen: Counter, law: dict[Outcome, float], a: int) -> tuple[Counter, dict[Outcome, float], float]:
    """The outcomes with exactly a drafts accepted, and the exact law conditioned on that (with P(a))."""
    obs = Counter({o: c for o, c in seen.items() if len(o) == a + 1})
    mass = sum(v for o, v in law.items() if len(o) == a + 1)
    return obs, {o: v / mass for o, v in law.items() if len(o) == a + 1}, mass


MODES = list(CASES)


# ---------------------------------------------------------------------------------------------- the references' own checks

@pytest.mark.parametrize("mode", MODES)
def test_the_reference_laws_are_the_targets_law(mode):
    """Each reference law, completed with the target's own draws, is exactly the target's law of k+1 tokens; and it has
    real weight on every stratum (rejections at every position, full acceptances), so the tests below have power."""
    c = CASES[mode]
    pair = make_pair(c.V, c.k, c.pair_seed, c.gap)
    law = c.law(pair)
    assert_completes_to_the_target_law(pair, law)
    for a in range(c.k + 1):
        assert stratum(Counter(), law, a)[2] > 0.2, a


def test_the_gumbel_coupling_formula_matches_numpys_gumbel_draws():
    """both_pick, the coupled reference's one formula, against 400,000 shared-noise pairs drawn by numpy (no project code)."""
    g = torch.Generator().manual_seed(5)
    P = _row(torch.softmax(torch.randn(5, generator=g) * 1.3, -1))
    Q = _row(torch.softmax(torch.log(torch.tensor(P)) + torch.randn(5, generator=g, dtype=torch.float64), -1))
    P[int(P.argmin())] = 0.0
    P = P / P.sum()
    noise = np.random.default_rng(0).gumbel(size=(400_000, 5))
    with np.errstate(divide="ignore"):
        yp, yq = np.argmax(np.log(P) + noise, 1), np.argmax(np.log(Q) + noise, 1)
    empirical = np.bincount(yp[yp == yq], minlength=5) / len(noise)
    sd = np.sqrt(both_pick(P, Q) * (1 - both_pick(P, Q)) / len(noise))
    assert np.all(np.abs(empirical - both_pick(P, Q)) < 5 * sd + 1e-12), (empirical, both_pick(P, Q))


# ---------------------------------------------------------------------------------------------- the laws

@pytest.mark.parametrize("mode", MODES)
def test_the_joint_law_of_a_batch(mode):
    """The law of (accepted, every emitted token) of a k-draft batch is the reference's."""
    _, law, seen = simulate(mode)
    assert_follows(seen, law, f"{mode}: (accepted, emitted tokens)")


@pytest.mark.parametrize("mode", MODES)
def test_the_bonus_after_a_full_acceptance(mode):
    """Conditioned on all k drafts accepted (q != p, k >= 2): the drafts and the bonus follow the reference, the bonus
    p at position k given the drafts; and full acceptances happen as often as the reference says (4 sigma)."""
    pair, law, seen = simulate(mode)
    obs, cond, mass = stratum(seen, law, pair.k)
    n = sum(seen.values())
    assert abs(sum(obs.values()) - n * mass) < 4 * math.sqrt(n * mass * (1 - mass)), (sum(obs.values()), n * mass)
    assert_follows(obs, cond, f"{mode}: the bonus after {pair.k} accepted drafts")


@pytest.mark.parametrize("mode", MODES)
def test_the_correction_after_a_partial_acceptance_at_every_position(mode):
    """Conditioned on exactly a drafts accepted, for every a < k (positions 1.. included): the accepted drafts and the
    correction follow the reference, and each position rejects as often as it says (4 sigma)."""
    pair, law, seen = simulate(mode)
    n = sum(seen.values())
    for a in range(pair.k):
        obs, cond, mass = stratum(seen, law, a)
        m = sum(obs.values())
        assert abs(m - n * mass) < 4 * math.sqrt(n * mass * (1 - mass)), (a, m, n * mass)
        assert m > 1000, (a, m)  # this position really was exercised
        assert_follows(obs, cond, f"{mode}: the correction after {a} accepted drafts (rejection at position {a})")


# ---------------------------------------------------------------------------------------------- verdicts seed by seed

def coin(seed: int, pos: int, stream: Stream) -> float:
    return uniform(seed, pos, stream)


def rejection_verdict_from_coins(pair: Pair, drafts: list[int], seed: int, start: int) -> tuple[int, int]:
    """(accepted, token) by the coin contract of docs/design.md §3, written out: the draft at position i is accepted when
    its ACCEPT coin u has u q(x) < p(x); the first rejected one is replaced by the inverse-CDF draw from max(0, p - q)
    with its RESIDUAL coin; after k acceptances the bonus is the inverse-CDF draw from p at k with the TARGET coin."""
    for i, x in enumerate(drafts):
        P, Q = pair.p[tuple(drafts[:i])].double(), pair.q[tuple(drafts[:i])].double()
        if not coin(seed, start + i, Stream.ACCEPT) * float(Q[x]) < float(P[x]):
            return i, inverse_cdf(torch.clamp(P - Q, min=0.0), coin(seed, start + i, Stream.RESIDUAL))
    return len(drafts), inverse_cdf(pair.p[tuple(drafts)], coin(seed, start + len(drafts), Stream.TARGET))


@pytest.mark.parametrize("mode", ["dense", "split-exact"])
def test_rejection_verdicts_follow_their_coins_seed_by_seed(mode):
    """The coins conditioned, not averaged: for each seed, the verdict of a k-draft batch is what the coin contract gives
    from that seed's coins (above), for dense (accepted, correction or bonus) and for split (accepted, bonus; the
    correction is the edge's, below in the laws). Rejections at every position and full acceptances all occur."""
    c = CASES[mode]
    pair = make_pair(c.V, c.k, c.pair_seed, c.gap)
    strata = Counter()
    for seed in range(600):
        start = 5 + seed % 11
        drafts = sampled_drafts(pair, seed, start)
        p, q = pair.rows(drafts)
        accepted, token = rejection_verdict_from_coins(pair, drafts, seed, start)
        if mode == "dense":
            v = verify_dense(p, q, drafts, seed, start)
            got, want = (v.accepted, v.token, v.rejected), (accepted, token, accepted < pair.k)
        else:
            v = verify_split(p, [float(q[i, x]) for i, x in enumerate(drafts)], drafts, seed, start)
            got, want = (v.accepted, v.bonus), (accepted, token if accepted == pair.k else None)
        assert got == want, f"seed {seed}, start {start}, drafts {drafts}: verdict {got}, the coins say {want}"
        strata[accepted] += 1
    assert min(strata[a] for a in range(pair.k + 1)) > 60, strata


def full_gumbel_max(row: torch.Tensor, seed: int, pos: int) -> int:
    """argmax of log p + G(seed, pos, token) with every token of the vocabulary scored (log 0 = -inf never wins)."""
    return int(torch.argmax(torch.log(row.double()) + gumbel_noise(seed, pos, torch.arange(row.shape[-1]))))


@pytest.mark.parametrize("V", [6, 6000])
def test_coupled_verdicts_are_the_full_vocabulary_gumbel_max_seed_by_seed(V):
    """For each seed the coupled verdict is the plain Gumbel-max one: the target's own sample Y_i = argmax(log p_i + G)
    at each absolute position, every token scored; drafts (the draft's own Gumbel-max with the same noise) accepted while
    they equal Y_i; the token is Y_a (Y_k, the bonus, after k acceptances). At V = 6000 the rows have a long tail of
    tokens below p = 1e-4, which gumbel_argmax does not score in full: those must still win as often as they should."""
    g = torch.Generator().manual_seed(V)
    k, strata, tail_wins = 3, Counter(), 0
    for seed in range(400):
        start = 7 + seed % 5
        lp = torch.randn(k + 1, V, generator=g) * (3.0 if V > 100 else 1.0)
        if seed % 2:  # a cut (as top-k would make): a third of each row gets no mass
            lp[torch.rand(k + 1, V, generator=g) < 0.33] = float("-inf")
        p = torch.softmax(lp, -1)
        q = torch.softmax(lp[:k] + torch.randn(k, V, generator=g) * (0.15 if V > 100 else 0.8), -1)
        drafts = [full_gumbel_max(q[i], seed, start + i) for i in range(k)]
        want = [full_gumbel_max(p[i], seed, start + i) for i in range(k + 1)]
        a = next((i for i in range(k) if drafts[i] != want[i]), k)
        v = verify_coupled(p, drafts, seed, start)
        assert (v.accepted, v.token, v.rejected) == (a, want[a], a < k), \
            f"seed {seed}, drafts {drafts}, the target's samples {want}: verdict {v}, Gumbel-max says {(a, want[a], a < k)}"
        strata[a] += 1
        tail_wins += sum(float(p[i, want[i]]) < 1e-4 for i in range(a + 1))
    assert min(strata[a] for a in range(k + 1)) > 20, strata
    if V > 100:
        assert tail_wins > 10, tail_wins  # the tokens gumbel_argmax prunes were really in play


def test_every_coin_stream_is_its_own():
    """Two streams made one (an IntEnum value repeated is an alias, not an error) reuse coins across roles: a draft
    accepted with the coin that drew it, a correction drawn with its rejection's coin, tail draws with the residual
    sampler's proposals. The laws above catch those (tests/test_verify_conditioned.py, mutants n1-n3); this is their
    cheap guard: seven roles, seven streams, seven different coins at every position."""
    roles = ["DRAFT", "ACCEPT", "RESIDUAL", "TARGET", "GUMBEL", "TAIL", "PROPOSAL"]
    assert set(roles) <= set(Stream.__members__)
    values = {r: int(Stream[r]) for r in roles}
    assert len(set(values.values())) == len(roles), values
    for pos in range(50):
        assert len({uniform(7, pos, Stream[r]) for r in roles}) == len(roles), pos


# ---------------------------------------------------------------------------------------------- the q row of a split correction

@pytest.mark.parametrize("in_flight", [3, 5])
def test_a_split_correction_takes_the_q_row_of_the_rejected_draft(in_flight):
    """edge_client/chain.py EdgeChain.apply: after a split rejection with a drafts accepted, the q row handed to the
    correction (rejected_extra) is the one the rejected draft, chain[a], was sampled from; never its neighbour's. With
    drafts still in flight beyond the verified ones too. Nothing is handed over without a rejection."""
    verified = 3
    for accepted in range(verified):
        state = SessionState(prompt_ids=[1, 2], max_new_tokens=20, eos_ids=frozenset(), vocab_size=10)
        edge = EdgeChain(state)
        edge.chain = [ChainToken(4 + i, extra=f"q row of draft {i}", sent=True) for i in range(in_flight)]
        a = edge.apply(start_pos=2, verified=verified, accepted=accepted, token=None, rejected=True,
                       committed_len=2 + accepted, finished=False, epoch=0)
        assert a.rejected_extra == f"q row of draft {accepted}", (accepted, a.rejected_extra)
        assert state.awaiting_resolution and state.committed_len == 2 + accepted
    state = SessionState(prompt_ids=[1, 2], max_new_tokens=20, eos_ids=frozenset(), vocab_size=10)
    edge = EdgeChain(state)
    edge.chain = [ChainToken(4 + i, extra=f"q row of draft {i}", sent=True) for i in range(in_flight)]
    a = edge.apply(start_pos=2, verified=verified, accepted=verified, token=9, rejected=False,
                   committed_len=2 + verified + 1, finished=False, epoch=0)
    assert a.rejected_extra is None
