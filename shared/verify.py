"""Verification of a draft batch: pure functions over tensors, no I/O.

Notation (docs/design.md §3): at each drafted position the target's processed distribution is p, the draft's is q,
and the drafted token x was sampled from q. Standard speculative sampling accepts x with probability
min(1, p(x)/q(x)); at the first rejection it emits a token from norm(max(0, p - q)); when every draft
is accepted it emits a bonus token from p at the next position. The output is then distributed exactly
as p. All coins come from shared.rng, keyed by the absolute position, so a verdict is reproducible.

These are the cloud's functions (torch, on the pass's device). What the edge samples itself (the split modes'
corrections, its drafts) is in shared/draws.py, in numpy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from picospec.shared import draws
from picospec.shared.rng import Stream, gumbel_noise, uniform, uniforms
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


# ---- coupled mode: both sides draw with the same Gumbel noise ------------------------------------

def gumbel_argmax(probs_row: torch.Tensor, seed: int, pos: int) -> int:
    """Gumbel-max sample: argmax over the support of log p + G(seed, pos, token). Exactly p-distributed.

    On the CPU shared/draws.gumbel_argmax (the same argmax without scoring the whole vocabulary); on a GPU every token
    of the support is scored where the row lies."""
    if probs_row.device.type == "cpu":
        return draws.gumbel_argmax(probs_row.numpy(), seed, pos)
    ids = torch.nonzero(probs_row > 0).flatten()                                 # [S] the support, ascending
    scores = torch.log(probs_row[ids].double()) + gumbel_noise(seed, pos, ids)  # [S]
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
