"""Logits processing and sampling, identical on both sides.

Exactness rests on one rule: the edge and the cloud turn logits into probabilities with the same
function and the same settings. `process_logits` is that function. Greedy decoding is expressed as a
one-hot distribution at the argmax, so that every verification rule below reduces to "accept while
argmax p == x, else emit argmax p" without a special case.

These are the torch functions (the cloud's, on any device); the edge's twins in numpy are shared/draws.py. torch is
imported where they run, so an edge on llama.cpp imports this module for SamplingParams and never loads it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from picospec.shared.config import MAX_TEMPERATURE, MAX_TOP_K, MIN_TEMPERATURE
from picospec.shared.rng import Stream, uniform

if TYPE_CHECKING:
    import torch

# MIN_TEMPERATURE, the least positive temperature: logits / T must stay finite in float32 (|logit| up to 3.4e34
# here). A Hello with T = 1.4e-45 (a float32 denormal) made every row NaN, and the cloud's decode-ahead failed with an
# IndexError that reached the edge as UNKNOWN (found by `picospec-bench fuzz`); 1e-4 is greedy in all but name anyway.
# It lives in shared/config.py, where the CLI checks it before anything imports torch.


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0            # 0 = off
    top_p: float = 1.0        # 1 = off
    seed: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and (self.temperature == 0.0 or MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE)):
            raise ValueError(f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], got {self.temperature}")
        if not (0 <= self.top_k <= MAX_TOP_K):
            raise ValueError(f"top_k must be in [0, 2**20], got {self.top_k}")
        if not (math.isfinite(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (0 <= self.seed < 1 << 64):
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def process_logits(logits: "torch.Tensor", params: SamplingParams) -> "torch.Tensor":
    """Logits [..., V] -> float32 probabilities [..., V] after temperature, top-k and top-p."""
    import torch
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(torch.float32)
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        drop_sorted = mass_before >= params.top_p  # the first token always stays (mass_before = 0)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.softmax(logits, dim=-1)


def sample_from(probs: "torch.Tensor", u: float) -> int:
    """Inverse-CDF draw from one (unnormalised, non-negative) row with a given uniform u in (0, 1).

    Never returns a zero-probability index, whatever the rounding of the cumulative sum."""
    import torch
    cdf = torch.cumsum(probs.double(), dim=-1)
    total = float(cdf[-1])
    if not total > 0.0:
        raise ValueError("cannot sample from a distribution with no mass")
    target = torch.tensor([u * total], dtype=torch.float64, device=cdf.device)  # the row's device: a CUDA cloud's p
    idx = int(torch.searchsorted(cdf, target, right=True)[0])
    if idx >= probs.shape[-1] or probs[idx] <= 0:
        idx = int(torch.nonzero(probs > 0)[-1])  # u * total rounded up to the last step
    return idx


def sample_token(probs: "torch.Tensor", seed: int, position: int, stream: Stream) -> int:
    """Draw the token at an absolute position from a processed distribution, reproducibly."""
    return sample_from(probs, uniform(seed, position, int(stream)))
