"""The edge's draws, in numpy: a draft's logits become q, tokens are drawn from q, and the split modes' corrections
are sampled on the edge. An edge drafting on llama.cpp runs only these and never imports torch.

Terms as in shared/verify.py (docs/design.md §3): q is the draft's processed distribution at a position, p the
target's; the rules are the torch functions' (shared/sampling.py, shared/verify.py), with the same uniforms and the
same Gumbel noise (shared/rng.py). Where integers decide (the hash bits, the index an inverse CDF lands on, the order of
proposals) the results are bit-identical to the torch functions'; a softmax value may differ from torch's in its last
float32 bit, which nothing depends on: the q the edge sends is the q it drew from (tests/test_draws.py checks both).

Arrays: a row is [V] float32 (logits or probabilities); ids are int64; uniforms float64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from picospec.shared.codec import Precision
from picospec.shared.rng import Stream, gumbel_noise_array, uniform, uniforms_array, vocab_bits
from picospec.shared.sampling import SamplingParams


def process_logits(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Logits [..., V] -> float32 probabilities [..., V] after temperature, top-k and top-p (greedy: one-hot at the
    first argmax), as shared/sampling.process_logits."""
    logits = np.asarray(logits, dtype=np.float32)
    if params.greedy:
        out = np.zeros_like(logits)
        np.put_along_axis(out, logits.argmax(-1)[..., None], 1.0, axis=-1)
        return out
    logits = logits / np.float32(params.temperature)
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        kth = np.partition(logits, vocab - params.top_k, axis=-1)[..., vocab - params.top_k:vocab - params.top_k + 1]
        logits = np.where(logits < kth, np.float32(-np.inf), logits)
    if params.top_p < 1.0:
        order = np.argsort(-logits, axis=-1)  # [..., V] descending; ties in any order (as torch.sort), 4x a stable sort
        sorted_probs = _softmax(np.take_along_axis(logits, order, axis=-1))
        mass_before = np.cumsum(sorted_probs, axis=-1, dtype=np.float32) - sorted_probs
        drop = np.zeros(logits.shape, dtype=bool)
        np.put_along_axis(drop, order, mass_before >= params.top_p, axis=-1)  # the first token always stays
        logits = np.where(drop, np.float32(-np.inf), logits)
    return _softmax(logits)


def _softmax(logits: np.ndarray) -> np.ndarray:
    """float32 softmax over the last axis; -inf entries get 0."""
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True, dtype=np.float32)).astype(np.float32)


def quantize(probs: np.ndarray, precision: Precision) -> np.ndarray:
    """What the receiver will see after a round trip at `precision` (the sender must use these values)."""
    probs = np.asarray(probs, dtype=np.float32)
    return probs.astype(np.float16).astype(np.float32) if precision is Precision.F16 else probs


def sample_from(probs: np.ndarray, u: float) -> int:
    """Inverse-CDF draw from one (unnormalised, non-negative) row [V] with a given uniform u in (0, 1); never a
    zero-probability index, whatever the rounding of the cumulative sum (shared/sampling.sample_from)."""
    probs = np.asarray(probs)
    cdf = np.cumsum(probs, dtype=np.float64)                                   # [V]
    total = float(cdf[-1])
    if not total > 0.0:
        raise ValueError("cannot sample from a distribution with no mass")
    idx = int(np.searchsorted(cdf, u * total, side="right"))
    if idx >= probs.shape[-1] or probs[idx] <= 0:
        idx = int(np.flatnonzero(probs > 0)[-1])  # u * total rounded up to the last step
    return idx


def sample_token(probs: np.ndarray, seed: int, position: int, stream: Stream) -> int:
    """Draw the token at an absolute position from a processed distribution, reproducibly."""
    return sample_from(probs, uniform(seed, position, int(stream)))


# gumbel_argmax scores in full the tokens at or above this probability, and below it only those whose noise could
# lift them past the best above it.
GUMBEL_HEAD_P = 1e-4
# relative slack on that pruning bound: far above float64 rounding in the scores (about 1e-15), so no token the bound
# drops could have won
_GUMBEL_BOUND_SLACK = 1e-6


def gumbel_argmax(probs_row: np.ndarray, seed: int, pos: int) -> int:
    """Gumbel-max sample: argmax over the support of log p + G(seed, pos, token). Exactly p-distributed.

    The same argmax without scoring the whole vocabulary. A token's score is -log(E / p), with E = -log u its unit
    exponential and u from its 32 hash bits. The head (p >= cutoff = min(GUMBEL_HEAD_P, max p)) is scored in full and
    its best sets B = min E / p. A tail token (p < cutoff) can score higher only if E < B p < B cutoff, that is
    u > exp(-B cutoff): a test on its hash bits alone, which about B cutoff of the tail passes (B is about 1: a handful
    of 151,936 tokens). Those are scored beside the head, in token order, so the first maximum is the whole support's.
    """
    p = np.asarray(probs_row, dtype=np.float64)                                 # [V]
    cutoff = min(GUMBEL_HEAD_P, float(p.max()))
    head = np.flatnonzero(p >= cutoff)                                           # [H] token ids, ascending
    if len(head) > len(p) // 8:  # a flat p (high temperature): the head is most of the support, score it once
        return scored_argmax(p, np.flatnonzero(p > 0), seed, pos)
    bound = math.exp(-float((np.log(p[head]) + gumbel_noise_array(seed, pos, head)).max()))  # B = min over head of E/p
    u_min = math.exp(-bound * cutoff * (1.0 + _GUMBEL_BOUND_SLACK))
    bits_min = math.floor(u_min * 4294967296.0 - 0.5) - 1                        # u > u_min implies bits > bits_min
    bits = vocab_bits(seed, pos, int(Stream.GUMBEL), p.shape[-1])                # [V] uint32
    lifted = np.flatnonzero(bits > max(bits_min, -1))                            # [L] ids whose u could beat B
    lifted = lifted[(p[lifted] > 0) & (p[lifted] < cutoff)]                      # the tail's among them
    return scored_argmax(p, np.sort(np.concatenate([head, lifted])), seed, pos)


def scored_argmax(p: np.ndarray, ids: np.ndarray, seed: int, pos: int) -> int:
    """argmax of log p + G over the token ids `ids` (ascending: the first maximum wins ties, as over the support)."""
    scores = np.log(p[ids].astype(np.float64)) + gumbel_noise_array(seed, pos, ids)  # [len(ids)]
    return int(ids[int(np.argmax(scores))])


# ---- split modes: the correction, sampled on the edge from the cloud's sparse view of p ------------------------------

def resample_topk(q_row: np.ndarray, ids: np.ndarray, vals: np.ndarray, seed: int, pos: int) -> int:
    """APPROXIMATE (the PicoSpec paper's sampler): the correction from norm(max(0, norm(topK(p)) - q)).

    Tokens outside the top-K can never be the correction, and the residual is mis-weighted, so the output
    is not exactly p-distributed; `split-exact` is the exact alternative at similar cost."""
    q = np.asarray(q_row, dtype=np.float64)                                     # [V]
    pk = np.zeros_like(q)
    pk[np.asarray(ids, dtype=np.int64)] = np.asarray(vals, dtype=np.float64)
    pk /= pk.sum()
    residual = np.maximum(pk - q, 0.0)
    if not float(residual.sum()) > 0.0:  # the draft covers the top-K entirely: fall back to the top-K itself
        residual = pk
    return sample_from(residual, uniform(seed, pos, Stream.RESIDUAL))


@dataclass(frozen=True)
class ResidualHint:
    """What the cloud sends down on a split-exact rejection: p's top-K exactly, p's mass outside it, and
    some draws from p restricted to outside the top-K, in draw order (the order matters: no sorting)."""

    topk_ids: np.ndarray    # [K] int64
    topk_vals: np.ndarray   # [K] float32
    tail_mass: float
    tail_ids: np.ndarray    # [T] int64
    tail_vals: np.ndarray   # [T] float32


class NeedMoreTail(Exception):
    """The residual sampler used every tail draw without accepting one: ask the cloud for more."""

    def __init__(self, have: int) -> None:
        super().__init__(f"all {have} tail draws used")
        self.have = have


MAX_PROPOSALS = 1 << 22


def resample_exact(q_row: np.ndarray, hint: ResidualHint, seed: int, pos: int, block: int = 256) -> int:
    """Exact correction from r = norm(max(0, p - q)) knowing p only through the hint.

    Rejection sampling: propose y ~ p (from the top-K with probability p(top-K), else the next tail draw),
    accept with probability max(0, 1 - q(y)/p(y)); the accepted y is exactly r-distributed. Proposal i
    uses uniforms (seed, pos, PROPOSAL, 2i) and (.., 2i+1), so a rerun with more tail draws replays the
    same choices and continues. Vectorised in blocks; raises NeedMoreTail when the tail runs out."""
    topk_ids, topk_vals = np.asarray(hint.topk_ids, dtype=np.int64), np.asarray(hint.topk_vals, dtype=np.float32)
    tail_ids, tail_vals = np.asarray(hint.tail_ids, dtype=np.int64), np.asarray(hint.tail_vals, dtype=np.float32)
    head_mass = float(topk_vals.astype(np.float64).sum())
    p_head = head_mass / (head_mass + hint.tail_mass)
    head_cdf = np.cumsum(topk_vals, dtype=np.float64) / max(head_mass, 1e-300)  # [K]
    q = np.asarray(q_row, dtype=np.float64)                                      # [V]
    tail_used = 0
    for start in range(0, MAX_PROPOSALS, block):
        u = uniforms_array(seed, pos, Stream.PROPOSAL, 2 * start, 2 * block).reshape(block, 2)  # [block, 2]
        from_head = u[:, 0] < p_head
        # head proposals reuse u0, rescaled to (0, 1), to pick within the top-K
        head_idx = np.minimum(np.searchsorted(head_cdf, np.minimum(u[:, 0] / p_head, 1.0), side="right"),
                              len(head_cdf) - 1) if len(head_cdf) else np.zeros(block, dtype=np.int64)
        tail_idx = tail_used + np.cumsum(~from_head) - 1
        for i in range(block):
            if from_head[i]:
                y, py = int(topk_ids[head_idx[i]]), float(topk_vals[head_idx[i]])
            else:
                j = int(tail_idx[i])
                if j >= len(tail_ids):
                    raise NeedMoreTail(len(tail_ids))
                y, py = int(tail_ids[j]), float(tail_vals[j])
            if py > 0.0 and float(u[i, 1]) * py < py - float(q[y]):
                return y
        tail_used = int(tail_idx[-1]) + 1
    raise RuntimeError(f"residual sampler did not accept in {MAX_PROPOSALS} proposals (p and q nearly equal)")
