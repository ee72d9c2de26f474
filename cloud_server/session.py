"""One session's target-side work: prefill, verify a draft batch, decode alone. Runs in the model executor.

Holds the session's KV cache and its `SessionState`; knows nothing about gRPC.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from shared.backend import HFBackend
from shared.codec import decode_probs
from shared.protocol import Commit, SessionState
from shared.rng import Stream
from shared.sampling import SamplingParams, process_logits, sample_token
from shared.verify import verify_dense

# q rows must sum to 1 within this (float32 softmax rounding is ~1e-6 over 150k entries)
Q_SUM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class TimedCommit:
    commit: Commit
    compute_s: float


class TargetSession:
    def __init__(
        self,
        model: torch.nn.Module,
        state: SessionState,
        params: SamplingParams,
        verify_mode: str,
        device: str = "cpu",
    ) -> None:
        self.backend = HFBackend(model, device)
        self.state = state
        self.params = params
        self.verify_mode = verify_mode

    def prefill(self) -> float:
        """Cache the prompt but its last token (that one is fed with the first drafts)."""
        t0 = time.perf_counter()
        self.backend.reset()
        prompt = self.state.tokens
        if len(prompt) > 1:
            self.backend.forward(prompt[:-1], num_logits=1)
        return time.perf_counter() - t0

    def _target_probs(self, extra: Sequence[int]) -> torch.Tensor:
        """p at positions committed_len .. committed_len + len(extra): [len(extra) + 1, V]."""
        seq = self.state.tokens + list(extra)
        logits = self.backend.logits_at(seq, self.state.committed_len - 1)
        return process_logits(logits, self.params)

    @torch.inference_mode()
    def verify(self, draft_ids: Sequence[int], q_payload: bytes) -> TimedCommit:
        t0 = time.perf_counter()
        k = len(draft_ids)
        if self.verify_mode != "dense":
            raise ValueError(f"verify mode {self.verify_mode!r} is not implemented by this server")
        q = decode_probs(q_payload, vocab_size=self.backend.vocab_size, max_rows=k, max_sum_error=Q_SUM_TOLERANCE)
        if q.shape[0] != k:
            raise ValueError(f"q payload has {q.shape[0]} rows for {k} draft tokens")
        p = self._target_probs(draft_ids)
        start = self.state.committed_len
        v = verify_dense(p, q, draft_ids, self.params.seed, start)
        commit = self.state.commit(draft_ids, v.accepted, v.token, v.rejected)
        # keep only committed tokens in the cache: the rejected suffix is dropped now, O(1)
        self.backend.truncate(min(self.backend.length, self.state.committed_len - 1))
        return TimedCommit(commit, time.perf_counter() - t0)

    @torch.inference_mode()
    def decode(self) -> TimedCommit:
        """Cloud-only decoding: one token from p, with the same randomness a bonus token would use."""
        t0 = time.perf_counter()
        p = self._target_probs(())[0]
        token = sample_token(p, self.params.seed, self.state.committed_len, Stream.TARGET)
        commit = self.state.commit((), 0, token, rejected=False)
        return TimedCommit(commit, time.perf_counter() - t0)
