"""The draft model's side of a session: propose tokens from the committed prefix. Runs in the edge executor."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from picospec.shared.backend import HFBackend
from picospec.shared.codec import Precision, quantize
from picospec.shared.rng import Stream
from picospec.shared.sampling import SamplingParams, process_logits, sample_token
from picospec.shared.verify import gumbel_argmax


@dataclass(frozen=True)
class DraftResult:
    token_ids: list[int]
    q: torch.Tensor  # [k, V] the distributions the tokens were drawn from, as the cloud will see them
    compute_s: float


class Drafter:
    def __init__(self, model: torch.nn.Module, params: SamplingParams, device: str = "cpu",
                 precision: Precision = Precision.F32, gumbel: bool = False, logits_width: int = 0) -> None:
        self.backend = HFBackend(model, device, logits_width)  # the target's width when the draft's differs
        self.params = params
        self.precision = precision
        self.gumbel = gumbel  # coupled mode: Gumbel-max with the noise the cloud will use

    @property
    def vocab_size(self) -> int:
        return self.backend.vocab_size

    def prefill(self, prompt_ids: Sequence[int]) -> float:
        t0 = time.perf_counter()
        self.backend.reset()
        if len(prompt_ids) > 1:
            self.backend.forward(prompt_ids[:-1], num_logits=1)
        return time.perf_counter() - t0

    def settle(self, committed: Sequence[int]) -> None:
        """Keep only the cached tokens that agree with `committed`, but its newest (at the end of a generation).
        Cutting by length alone is not enough: a rejected draft sits at a committed position until the next draft
        crops it, and when the generation ends right after the rejection no next draft comes."""
        tokens, keep = self.backend.tokens, 0
        limit = min(len(tokens), len(committed) - 1)
        while keep < limit and tokens[keep] == committed[keep]:
            keep += 1
        self.backend.truncate(keep)

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
            pos = len(seq)
            seq.append(gumbel_argmax(q, self.params.seed, pos) if self.gumbel else sample_token(q, self.params.seed, pos, stream))
            rows.append(q)
        q_rows = torch.stack(rows) if rows else torch.zeros(0, self.vocab_size)
        return DraftResult(seq[len(committed):], q_rows, time.perf_counter() - t0)
