"""Verification of a draft batch: pure functions over tensors, no I/O.

Notation (SPEC 2): at each drafted position the target's processed distribution is p, the draft's is q,
and the drafted token x was sampled from q. Standard speculative sampling accepts x with probability
min(1, p(x)/q(x)); at the first rejection it emits a token from norm(max(0, p - q)); when every draft
is accepted it emits a bonus token from p at the next position. The output is then distributed exactly
as p. All coins come from shared.rng, keyed by the absolute position, so a verdict is reproducible.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from shared.rng import Stream, uniform
from shared.sampling import sample_from


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
