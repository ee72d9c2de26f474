"""One session's target-side work: prefill, verify a draft batch, decode alone. Runs in the model executor.

Holds the session's KV cache and its `SessionState`; knows nothing about gRPC.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch

from shared.backend import HFBackend
from shared.codec import Precision, encode_list, encode_probs
from shared.early_exit import ExpectedOutcome, expected_outcome
from shared.protocol import Commit, DraftRun, ProtocolError, SessionState
from shared.rng import Stream
from shared.sampling import SamplingParams, process_logits, sample_token
from shared.verify import tail_draws, top_k, verify_coupled, verify_dense, verify_split

# q rows must sum to 1 within this (float32 softmax rounding is ~1e-6 over 150k entries)
Q_SUM_TOLERANCE = 1e-3
MAX_TAIL_DRAWS = 4096  # per rejected position; the expected need is a handful
log = logging.getLogger("picospec.cloud")


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


@dataclass(frozen=True)
class PassOutcome:
    """The verification of one draft run, before it is committed (that happens on the event loop)."""

    accepted: int
    token: int | None        # correction, or bonus when every draft was accepted; None after a split rejection
    rejected: bool
    compute_s: float
    residual: "ResidualPayload | None" = None
    open_residual: "_OpenResidual | None" = None


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
        exit_layer: int = 0,
        exit_threshold: float = 1.0,
    ) -> None:
        self.backend = HFBackend(model, device)
        self.exit_layer = exit_layer          # early-exit hints after this layer (0 = none)
        self.exit_threshold = exit_threshold  # ... when the tentative confidence reaches this
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

    def check_resolved(self, token: int) -> None:
        """Split modes: the edge's correction must come from what we sent (top-K or tail draws)."""
        if self.open_residual is None or token not in self.open_residual.allowed:
            raise ProtocolError(f"resolved token {token} is not among the candidates the cloud sent")
        self.open_residual = None

    @torch.inference_mode()
    def verify_run(self, committed: list[int], run: DraftRun,
                   on_hint: Callable[[ExpectedOutcome], None] | None = None) -> PassOutcome:
        """Verify a run of drafts at committed_len.. in one forward pass. Runs in the model executor and
        touches only the KV cache: `committed` is a snapshot, and the commit happens on the event loop.
        With an exit layer, `on_hint` gets the tentative outcome mid-pass when it is confident enough."""
        t0 = time.perf_counter()
        draft_ids, mode, seed, start = run.token_ids, self.verify_mode, self.params.seed, run.start_pos
        if start != len(committed):
            raise ProtocolError(f"internal: run at {start}, committed length {len(committed)}")
        hinting = contextlib.nullcontext()
        if self.exit_layer and on_hint is not None and draft_ids:
            def tentative(logits: torch.Tensor) -> None:
                try:
                    e = expected_outcome(logits, self.params, mode, draft_ids, run.extras, seed, start)
                except Exception:  # noqa: BLE001 - a hint is advice: never let it break the pass
                    log.exception("early-exit hint failed")
                    return
                if e.confidence >= self.exit_threshold:
                    on_hint(e)
            hinting = self.backend.early_exit(self.exit_layer, len(draft_ids) + 1, tentative)
        with hinting:
            logits = self.backend.logits_at(committed + draft_ids, len(committed) - 1)
        p = process_logits(logits, self.params)
        if mode == "dense":
            v = verify_dense(p, torch.stack(run.extras), draft_ids, seed, start)
            return PassOutcome(v.accepted, v.token, v.rejected, time.perf_counter() - t0)
        if mode == "coupled":
            v = verify_coupled(p, draft_ids, seed, start)
            return PassOutcome(v.accepted, v.token, v.rejected, time.perf_counter() - t0)
        if mode in ("split-topk", "split-exact"):
            sv = verify_split(p, run.extras, draft_ids, seed, start)
            if sv.bonus is not None:
                return PassOutcome(sv.accepted, sv.bonus, False, time.perf_counter() - t0)
            residual, opened = self._residual(p[sv.accepted], start + sv.accepted)
            return PassOutcome(sv.accepted, None, True, time.perf_counter() - t0, residual, opened)
        raise ValueError(f"verify mode {mode!r} is not implemented by this server")

    @torch.inference_mode()
    def decode_next(self, committed: list[int]) -> tuple[int, float]:
        """One token from p after `committed` (decode-ahead): the same coin a bonus token there would use."""
        t0 = time.perf_counter()
        p = process_logits(self.backend.logits_at(committed, len(committed) - 1), self.params)[0]
        return sample_token(p, self.params.seed, len(committed), Stream.TARGET), time.perf_counter() - t0

    def settle_cache(self) -> None:
        """Keep exactly the committed tokens but the newest (it is fed with the next drafts): O(1)."""
        self.backend.truncate(min(self.backend.length, max(0, self.state.committed_len - 1)))

    def _residual(self, p_row: torch.Tensor, pos: int) -> tuple[ResidualPayload, _OpenResidual]:
        ids, vals = top_k(p_row, self.residual_top_k)
        vocab = self.backend.vocab_size
        opened = _OpenResidual(p_row, ids, set(ids.tolist()))
        if self.verify_mode == "split-topk":
            # approximate mode: half-precision values are plenty for a sampler that is approximate anyway
            return ResidualPayload(encode_probs(_row(ids, vals, vocab), precision=Precision.F16)), opened
        tail_mass = max(0.0, float(p_row.double().sum() - vals.double().sum()))
        first = self._tail(opened, pos, 0)
        return ResidualPayload(encode_probs(_row(ids, vals, vocab)), tail_mass, first), opened

    def more_tail(self, pos: int, have: int) -> bytes:
        """split-exact: tail draws have .. have+n-1 at the open position (n doubles with each request)."""
        r = self.open_residual
        if r is None or self.verify_mode != "split-exact" or pos != self.state.committed_len:
            raise ProtocolError(f"no open split-exact rejection at position {pos}")
        return self._tail(r, pos, have)

    def _tail(self, r: _OpenResidual, pos: int, have: int) -> bytes:
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
        p = process_logits(self.backend.logits_at(self.state.tokens, self.state.committed_len - 1), self.params)[0]
        token = sample_token(p, self.params.seed, self.state.committed_len, Stream.TARGET)
        commit = self.state.commit((), 0, token, rejected=False)
        return TimedCommit(commit, time.perf_counter() - t0)


def _row(ids: torch.Tensor, vals: torch.Tensor, vocab: int) -> torch.Tensor:
    row = torch.zeros(1, vocab)
    row[0, ids] = vals.float()
    return row
