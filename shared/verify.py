"""Verification of a draft batch: pure functions over tensors, no I/O.

Notation (docs/design.md §3): at each drafted position the target's processed distribution is p, the draft's is q,
and the drafted token x was sampled from q. Standard speculative sampling accepts x with probability
min(1, p(x)/q(x)); at the first rejection it emits a token from norm(max(0, p - q)); when every draft
is accepted it emits a bonus token from p at the next position. The output is then distributed exactly
as p. All coins come from shared.rng, keyed by the absolute position, so a verdict is reproducible.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from picospec.shared.rng import Stream, gumbel_noise, uniform, uniforms, vocab_bits
from picospec.shared.sampling import sample_from


@dataclass(frozen=True)
class Verdict:
    accepted: int   # leading draft tokens accepted
    token: int      # the cloud's token after them: a correction, or the bonus if all were accepted
    rejected: bool  # True when `token` is a correction (a rejection happened)


def verify_dense(
    p: torch.Tensor,
    q: torch.Tensor,
    draft_ids: Sequence[int],
    seed: int,
    start_pos: int,
) -> Verdict:
    """Standard rejection sampling with the full draft distributions.

    p: [k+1, V] target probabilities at positions start_pos .. start_pos+k (the last row is for the bonus).
    q: [k, V] draft probabilities the draft tokens were sampled from.
    """
    k = len(draft_ids)
    if p.shape[0] != k + 1 or q.shape[0] != k or p.shape[-1] != q.shape[-1]:
        raise ValueError(f"shape mismatch: p {tuple(p.shape)}, q {tuple(q.shape)}, {k} draft tokens")
    for i, x in enumerate(draft_ids):
        pos = start_pos + i
        px, qx = float(p[i, x]), float(q[i, x])
        if qx <= 0.0:
            raise ValueError(f"draft token {x} at position {pos} has zero draft probability")
        # accept with probability min(1, px/qx), written without a division
        if uniform(seed, pos, Stream.ACCEPT) * qx < px:
            continue
        residual = torch.clamp(p[i].double() - q[i].double(), min=0.0)
        if not float(residual.sum()) > 0.0:  # p == q up to rounding: fall back to p itself
            residual = p[i].double()
        return Verdict(i, sample_from(residual, uniform(seed, pos, Stream.RESIDUAL)), True)
    return Verdict(k, sample_from(p[k], uniform(seed, start_pos + k, Stream.TARGET)), False)


# ---- split modes: only q(x) goes up; the residual is sampled on the edge -------------------------

@dataclass(frozen=True)
class SplitVerdict:
    accepted: int
    bonus: int | None  # the cloud's bonus token when every draft was accepted; None after a rejection


def verify_split(p: torch.Tensor, q_of_draft: Sequence[float], draft_ids: Sequence[int], seed: int, start_pos: int) -> SplitVerdict:
    """The cloud's half of separate rejection sampling: the same coins as `verify_dense`, knowing only q(x)."""
    k = len(draft_ids)
    if p.shape[0] != k + 1 or len(q_of_draft) != k:
        raise ValueError(f"shape mismatch: p {tuple(p.shape)}, {len(q_of_draft)} q values, {k} draft tokens")
    # validate every value up front: a bad value after the first rejection is as much an error as one before
    for i, (x, qx) in enumerate(zip(draft_ids, q_of_draft)):
        if not 0.0 < qx <= 1.0:
            raise ValueError(f"draft probability {qx} of token {x} at position {start_pos + i} is not in (0, 1]")
    for i, (x, qx) in enumerate(zip(draft_ids, q_of_draft)):
        if uniform(seed, start_pos + i, Stream.ACCEPT) * qx >= float(p[i, x]):
            return SplitVerdict(i, None)
    return SplitVerdict(k, sample_from(p[k], uniform(seed, start_pos + k, Stream.TARGET)))


def top_k(p_row: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most probable ids (ascending id order, zero-probability ids dropped) and their probabilities."""
    vals, ids = torch.topk(p_row, min(k, p_row.shape[-1]))
    keep = vals > 0
    ids, vals = ids[keep], vals[keep]
    order = torch.argsort(ids)
    return ids[order], vals[order]


def resample_topk(q_row: torch.Tensor, ids: torch.Tensor, vals: torch.Tensor, seed: int, pos: int) -> int:
    """APPROXIMATE (the PicoSpec paper's sampler): the correction from norm(max(0, norm(topK(p)) - q)).

    Tokens outside the top-K can never be the correction, and the residual is mis-weighted, so the output
    is not exactly p-distributed; `split-exact` is the exact alternative at similar cost."""
    pk = torch.zeros_like(q_row, dtype=torch.float64)
    pk[ids] = vals.double()
    pk /= pk.sum()
    residual = torch.clamp(pk - q_row.double(), min=0.0)
    if not float(residual.sum()) > 0.0:  # the draft covers the top-K entirely: fall back to the top-K itself
        residual = pk
    return sample_from(residual, uniform(seed, pos, Stream.RESIDUAL))


def tail_draws(p_row: torch.Tensor, exclude: torch.Tensor, seed: int, pos: int, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws start .. start+count-1 from p conditioned on lying outside `exclude` (ids), with their p values.

    Each draw is a pure function of (seed, pos, index), so the edge can ask for more and get the same
    sequence continued. Empty when p has no mass outside `exclude`."""
    tail = p_row.double().clone()
    tail[exclude] = 0.0
    cdf = torch.cumsum(tail, 0)
    total = float(cdf[-1])
    if count <= 0 or not total > 0.0:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0)
    us = uniforms(seed, pos, Stream.TAIL, start, count).to(cdf.device) * total
    ids = torch.searchsorted(cdf, us, right=True).clamp(max=p_row.shape[-1] - 1)
    # rounding at the very top can land on a zero entry: move it to the last id with mass
    last = int(torch.nonzero(tail > 0)[-1])
    ids = torch.where(tail[ids] > 0, ids, torch.full_like(ids, last))
    return ids, p_row[ids].float()


@dataclass(frozen=True)
class ResidualHint:
    """What the cloud sends down on a split-exact rejection: p's top-K exactly, p's mass outside it, and
    some draws from p restricted to outside the top-K, in draw order (the order matters: no sorting)."""

    topk_ids: torch.Tensor
    topk_vals: torch.Tensor
    tail_mass: float
    tail_ids: torch.Tensor
    tail_vals: torch.Tensor


class NeedMoreTail(Exception):
    """The residual sampler used every tail draw without accepting one: ask the cloud for more."""

    def __init__(self, have: int) -> None:
        super().__init__(f"all {have} tail draws used")
        self.have = have


MAX_PROPOSALS = 1 << 22


def resample_exact(q_row: torch.Tensor, hint: ResidualHint, seed: int, pos: int, block: int = 256) -> int:
    """Exact correction from r = norm(max(0, p - q)) knowing p only through the hint.

    Rejection sampling: propose y ~ p (from the top-K with probability p(top-K), else the next tail draw),
    accept with probability max(0, 1 - q(y)/p(y)); the accepted y is exactly r-distributed. Proposal i
    uses uniforms (seed, pos, PROPOSAL, 2i) and (.., 2i+1), so a rerun with more tail draws replays the
    same choices and continues. Vectorised in blocks; raises NeedMoreTail when the tail runs out."""
    head_mass = float(hint.topk_vals.double().sum())
    p_head = head_mass / (head_mass + hint.tail_mass)
    head_cdf = torch.cumsum(hint.topk_vals.double(), 0) / max(head_mass, 1e-300)
    q = q_row.double()
    tail_used = 0
    for start in range(0, MAX_PROPOSALS, block):
        u = uniforms(seed, pos, Stream.PROPOSAL, 2 * start, 2 * block).view(block, 2)
        from_head = u[:, 0] < p_head
        # head proposals reuse u0, rescaled to (0, 1), to pick within the top-K
        head_idx = torch.searchsorted(head_cdf, (u[:, 0] / p_head).clamp(max=1.0), right=True).clamp(max=len(head_cdf) - 1) \
            if len(head_cdf) else torch.zeros(block, dtype=torch.long)
        tail_idx = tail_used + torch.cumsum((~from_head).long(), 0) - 1
        for i in range(block):
            if from_head[i]:
                y, py = int(hint.topk_ids[head_idx[i]]), float(hint.topk_vals[head_idx[i]])
            else:
                j = int(tail_idx[i])
                if j >= len(hint.tail_ids):
                    raise NeedMoreTail(len(hint.tail_ids))
                y, py = int(hint.tail_ids[j]), float(hint.tail_vals[j])
            if py > 0.0 and float(u[i, 1]) * py < py - float(q[y]):
                return y
        tail_used = int(tail_idx[-1]) + 1
    raise RuntimeError(f"residual sampler did not accept in {MAX_PROPOSALS} proposals (p and q nearly equal)")


# ---- coupled mode: both sides draw with the same Gumbel noise ------------------------------------

# gumbel_argmax scores in full the tokens at or above this probability, and below it only those whose noise could
# lift them past the best above it.
GUMBEL_HEAD_P = 1e-4
# relative slack on that pruning bound: far above float64 rounding in the scores (about 1e-15), so no token the bound
# drops could have won
_GUMBEL_BOUND_SLACK = 1e-6


def gumbel_argmax(probs_row: torch.Tensor, seed: int, pos: int) -> int:
    """Gumbel-max sample: argmax over the support of log p + G(seed, pos, token). Exactly p-distributed.

    On CPU the same argmax without scoring the whole vocabulary. A token's score is -log(E / p), with E = -log u its
    unit exponential and u from its 32 hash bits. The head (p >= cutoff = min(GUMBEL_HEAD_P, max p)) is scored in full
    and its best sets B = min E / p. A tail token (p < cutoff) can score higher only if E < B p < B cutoff, that is
    u > exp(-B cutoff): a test on its hash bits alone, which about B cutoff of the tail passes (B is about 1: a handful
    of 151,936 tokens). Those are scored beside the head, in token order, so the first maximum is the whole support's.
    """
    if probs_row.device.type != "cpu":
        return _gumbel_argmax_scored(probs_row, torch.nonzero(probs_row > 0).flatten(), seed, pos)
    p = probs_row.double()                                                       # [V]
    cutoff = min(GUMBEL_HEAD_P, float(p.max()))
    head = torch.nonzero(p >= cutoff).flatten()                                  # [H] token ids, ascending
    if len(head) > len(p) // 8:  # a flat p (high temperature): the head is most of the support, score it once
        return _gumbel_argmax_scored(probs_row, torch.nonzero(p > 0).flatten(), seed, pos)
    bound = math.exp(-float((torch.log(p[head]) + gumbel_noise(seed, pos, head)).max()))  # B = min over head of E / p
    u_min = math.exp(-bound * cutoff * (1.0 + _GUMBEL_BOUND_SLACK))
    bits_min = math.floor(u_min * 4294967296.0 - 0.5) - 1                        # u > u_min implies bits > bits_min
    bits = vocab_bits(seed, pos, int(Stream.GUMBEL), p.shape[-1])                # [V] uint32
    lifted = torch.from_numpy(np.flatnonzero(bits > max(bits_min, -1)))          # [L] ids whose u could beat B
    lifted = lifted[(p[lifted] > 0) & (p[lifted] < cutoff)]                      # the tail's among them
    return _gumbel_argmax_scored(probs_row, torch.sort(torch.cat([head, lifted])).values, seed, pos)


def _gumbel_argmax_scored(probs_row: torch.Tensor, ids: torch.Tensor, seed: int, pos: int) -> int:
    """argmax of log p + G over the token ids `ids` (ascending: the first maximum wins ties, as over the support)."""
    scores = torch.log(probs_row[ids].double()) + gumbel_noise(seed, pos, ids)  # [len(ids)]
    return int(ids[int(torch.argmax(scores))])


def verify_greedy(best: Sequence[int], draft_ids: Sequence[int]) -> Verdict:
    """verify_coupled at temperature 0 from each row's argmax `best` [k+1] alone: p is one-hot there, so the Gumbel-max
    token is the argmax whatever the noise. The same verdict without a V-wide step per row."""
    k = len(draft_ids)
    if len(best) != k + 1:
        raise ValueError(f"shape mismatch: {len(best)} rows, {k} draft tokens")
    for i, x in enumerate(draft_ids):
        if best[i] != x:
            return Verdict(i, best[i], True)
    return Verdict(k, best[k], False)


def verify_coupled(p: torch.Tensor, draft_ids: Sequence[int], seed: int, start_pos: int) -> Verdict:
    """Accept while the draft's Gumbel-max token equals the target's; the emitted token is always the
    target's own Gumbel-max sample, so the output is exactly p whatever the draft does."""
    k = len(draft_ids)
    if p.shape[0] != k + 1:
        raise ValueError(f"shape mismatch: p {tuple(p.shape)}, {k} draft tokens")
    for i, x in enumerate(draft_ids):
        y = gumbel_argmax(p[i], seed, start_pos + i)
        if y != x:
            return Verdict(i, y, True)
    return Verdict(k, gumbel_argmax(p[k], seed, start_pos + k), False)
