"""The draft model's side of a session: propose tokens from the committed prefix. Runs in the edge executor."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from shared.backend import HFBackend
from shared.codec import Precision, quantize
from shared.rng import Stream
from shared.sampling import SamplingParams, process_logits, sample_token


@dataclass(frozen=True)
class DraftResult:
    token_ids: list[int]
    q: torch.Tensor  # [k, V] the distributions the tokens were drawn from, as the cloud will see them
    compute_s: float


class Drafter:
    def __init__(self, model: torch.nn.Module, params: SamplingParams, device: str = "cpu",
                 precision: Precision = Precision.F32) -> None:
        self.backend = HFBackend(model, device)
        self.params = params
        self.precision = precision

    @property
    def vocab_size(self) -> int:
        return self.backend.vocab_size

    def prefill(self, prompt_ids: Sequence[int]) -> float:
        t0 = time.perf_counter()
        self.backend.reset()
        if len(prompt_ids) > 1:
            self.backend.forward(prompt_ids[:-1], num_logits=1)
        return time.perf_counter() - t0

    @torch.inference_mode()
    def draft(self, committed: Sequence[int], k: int, stream: Stream = Stream.DRAFT) -> DraftResult:
        """Sample k tokens after `committed`; the cache rolls back to the committed prefix by itself."""
        t0 = time.perf_counter()
        seq = list(committed)
        rows = []
        for _ in range(k):
            logits = self.backend.logits_at(seq, len(seq) - 1)[-1]
            # sample from exactly what the cloud will decode, so the maths holds at any wire precision
            q = quantize(process_logits(logits, self.params), self.precision)
            seq.append(sample_token(q, self.params.seed, len(seq), stream))
            rows.append(q)
        return DraftResult(seq[len(committed):], torch.stack(rows), time.perf_counter() - t0)
