"""One session's target-side work: prefill, verify a draft batch, decode alone. Runs in the model executor.

Holds the session's KV cache and its `SessionState`; knows nothing about gRPC.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from shared.backend import HFBackend
from shared.codec import Precision, decode_probs, encode_list, encode_probs
from shared.protocol import Commit, ProtocolError, SessionState
from shared.rng import Stream
from shared.sampling import SamplingParams, process_logits, sample_token
from shared.verify import tail_draws, top_k, verify_coupled, verify_dense, verify_split

# q rows must sum to 1 within this (float32 softmax rounding is ~1e-6 over 150k entries)
Q_SUM_TOLERANCE = 1e-3
MAX_TAIL_DRAWS = 4096  # per rejected position; the expected need is a handful


@dataclass(frozen=True)
class ResidualPayload:
    """What goes down with a split rejection."""

    topk: bytes
    tail_mass: float = 0.0
    tail: bytes = b""


@dataclass(frozen=True)
class TimedCommit:
    commit: Commit
    compute_s: float
    residual: ResidualPayload | None = None


@dataclass
class _OpenResidual:
    """Split modes: the target row at a rejected position, kept until the edge resolves it."""

    p_row: torch.Tensor
    topk_ids: torch.Tensor
    allowed: set[int]
    tails_sent: int = 0


class TargetSession:
    def __init__(
        self,
        model: torch.nn.Module,
        state: SessionState,
        params: SamplingParams,
        verify_mode: str,
        device: str = "cpu",
        residual_top_k: int = 10,
        tail_samples: int = 4,
    ) -> None:
        self.backend = HFBackend(model, device)
        self.state = state
        self.params = params
        self.verify_mode = verify_mode
        self.residual_top_k = residual_top_k
        self.tail_samples = tail_samples
        self.open_residual: _OpenResidual | None = None

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

    def _resolve(self, token: int) -> Commit:
        """Split modes: the edge's correction must come from what we sent (top-K or tail draws)."""
        if self.open_residual is None or token not in self.open_residual.allowed:
            raise ProtocolError(f"resolved token {token} is not among the candidates the cloud sent")
        self.open_residual = None
        return self.state.commit_resolved(token)

    @torch.inference_mode()
    def verify(self, draft_ids: Sequence[int], q_payload: bytes, q_of_draft: Sequence[float],
               resolved: int | None = None) -> TimedCommit:
        t0 = time.perf_counter()
        k, mode, seed = len(draft_ids), self.verify_mode, self.params.seed
        if resolved is not None:
            # both sides commit the resolved token themselves; the verdict speaks only of the drafts after it
            if self._resolve(resolved).finished is not None:
                return TimedCommit(Commit(0, None, (), False, self.state.finished), time.perf_counter() - t0)
        start = self.state.committed_len
        residual = None
        if mode == "dense":
            q = decode_probs(q_payload, vocab_size=self.backend.vocab_size, max_rows=k, max_sum_error=Q_SUM_TOLERANCE)
            if q.shape[0] != k:
                raise ValueError(f"q payload has {q.shape[0]} rows for {k} draft tokens")
            v = verify_dense(self._target_probs(draft_ids), q, draft_ids, seed, start)
            commit = self.state.commit(draft_ids, v.accepted, v.token, v.rejected)
        elif mode == "coupled":
            v = verify_coupled(self._target_probs(draft_ids), draft_ids, seed, start)
            commit = self.state.commit(draft_ids, v.accepted, v.token, v.rejected)
        elif mode in ("split-topk", "split-exact"):
            if len(q_of_draft) != k:
                raise ValueError(f"{len(q_of_draft)} draft probabilities for {k} draft tokens")
            p = self._target_probs(draft_ids)
            sv = verify_split(p, q_of_draft, draft_ids, seed, start)
            rejected = sv.bonus is None
            commit = self.state.commit(draft_ids, sv.accepted, sv.bonus, rejected)
            if self.state.awaiting_resolution:
                residual = self._open(p[sv.accepted], start + sv.accepted)
        else:
            raise ValueError(f"verify mode {mode!r} is not implemented by this server")
        # keep only committed tokens in the cache: the rejected suffix is dropped now, O(1)
        self.backend.truncate(min(self.backend.length, self.state.committed_len - 1))
        return TimedCommit(commit, time.perf_counter() - t0, residual)

    def _open(self, p_row: torch.Tensor, pos: int) -> ResidualPayload:
        ids, vals = top_k(p_row, self.residual_top_k)
        vocab = self.backend.vocab_size
        self.open_residual = _OpenResidual(p_row, ids, set(ids.tolist()))
        if self.verify_mode == "split-topk":
            # approximate mode: half-precision values are plenty for a sampler that is approximate anyway
            return ResidualPayload(encode_probs(_row(ids, vals, vocab), precision=Precision.F16))
        tail_mass = max(0.0, float(p_row.double().sum() - vals.double().sum()))
        return ResidualPayload(encode_probs(_row(ids, vals, vocab)), tail_mass, self.more_tail(pos, 0))

    def more_tail(self, pos: int, have: int) -> bytes:
        """split-exact: tail draws have .. have+n-1 at the open position (n doubles with each request)."""
        r = self.open_residual
        if r is None or self.verify_mode != "split-exact" or pos != self.state.committed_len:
            raise ProtocolError(f"no open split-exact rejection at position {pos}")
        if have != r.tails_sent:
            raise ProtocolError(f"edge has {have} tail draws, cloud sent {r.tails_sent}")
        n = min(max(self.tail_samples, have), MAX_TAIL_DRAWS - have)
        if n <= 0:
            raise ProtocolError(f"more than {MAX_TAIL_DRAWS} tail draws requested at one position")
        ids, vals = tail_draws(r.p_row, r.topk_ids, self.params.seed, pos, have, n)
        r.tails_sent += len(ids)
        r.allowed.update(ids.tolist())
        return encode_list(ids, vals, self.backend.vocab_size)

    @torch.inference_mode()
    def decode(self) -> TimedCommit:
        """Cloud-only decoding: one token from p, with the same randomness a bonus token would use."""
        t0 = time.perf_counter()
        p = self._target_probs(())[0]
        token = sample_token(p, self.params.seed, self.state.committed_len, Stream.TARGET)
        commit = self.state.commit((), 0, token, rejected=False)
        return TimedCommit(commit, time.perf_counter() - t0)


def _row(ids: torch.Tensor, vals: torch.Tensor, vocab: int) -> torch.Tensor:
    row = torch.zeros(1, vocab)
    row[0, ids] = vals.float()
    return row
