"""Verification schemes: how the verification of a draft batch travels and is decided, behind one interface.

Terms (docs/design.md §3):
  p         the target's processed distribution at a drafted position, [V] (a pass gives [k+1, V])
  q         the draft's processed distribution there, [V]; x ~ q is the drafted token
  extras    what travels up with each draft token: the whole q row (dense), q(x) (split modes), nothing (coupled)
  decision  the cloud's outcome of one pass: drafts accepted, the cloud's token after them (a correction or the
            bonus), whether a draft was rejected. In the split modes a rejection leaves the correction to the edge,
            which samples it from a sparse view of p sent down with the verdict (the residual payload).

Each scheme is one module (dense, split_topk, split_exact, coupled) and one object in the registry
(shared/schemes/__init__.py). The edge calls `encode_extras` and, in the split modes, `resolve`; the cloud calls
`decode_extras`, `decide`, and in the split modes `open_rejection` / `more_tail`. Nothing else in the code
compares verification-mode names.

The edge's halves work on numpy rows (shared/draws.py); the cloud's on torch tensors, importing torch and
shared/verify.py where they run, so that an edge on llama.cpp never loads torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Sequence

import numpy as np

from picospec.shared.protocol import ProtocolError
from picospec.shared.rpc import picospec_pb2 as pb

if TYPE_CHECKING:
    import torch

# q rows must sum to 1 within this (float32 softmax rounding is ~1e-6 over 150k entries)
Q_SUM_TOLERANCE = 1e-3
MAX_TAIL_DRAWS = 4096  # per rejected position; the expected need is a handful

RunModel = Callable[..., Awaitable[Any]]                       # runs a function on the edge's model thread
MoreTail = Callable[[int], Awaitable[tuple[np.ndarray, np.ndarray]]]  # have -> further tail draws (ids, p)


@dataclass(frozen=True)
class Decision:
    accepted: int        # leading drafts accepted
    token: int | None    # the cloud's token after them; None when the edge samples the correction (split rejection)
    rejected: bool


@dataclass(frozen=True)
class ResidualPayload:
    """What goes down with a split rejection."""

    topk: bytes
    tail_mass: float = 0.0
    tail: bytes = b""


@dataclass
class OpenRejection:
    """Cloud side, split modes: the target row at a rejected position, kept until the edge's correction arrives."""

    p_row: "torch.Tensor"   # [V]
    topk_ids: "torch.Tensor"
    allowed: set[int]     # the candidates sent so far: the correction must be one of them
    tails_sent: int = 0
    payload: ResidualPayload = field(default_factory=lambda: ResidualPayload(b""))

    def check(self, token: int) -> None:
        if token not in self.allowed:
            raise ProtocolError(f"resolved token {token} is not among the candidates the cloud sent")


class VerifyScheme:
    name: str = ""
    exact: bool = True
    gumbel_drafts: bool = False           # the edge proposes argmax(log q + G) with the cloud's noise (coupled)
    own_token_is_verdicts: bool = False   # the cloud's own token is the one verification would emit (coupled)
    supports_trees: bool = False          # token trees (shared/trees.py): ids and parents up, a walk on the cloud

    def own_token_is_emitted(self, greedy: bool) -> bool:
        """Whether the cloud's own next token (decode-ahead, a step the verification budget caps to none) is the token
        verifying drafts there would emit: in coupled at any temperature, in every mode at T=0. Elsewhere it is
        another sample of the same law, exact but not the same, and a seed must give one output however the cloud
        was scheduled (resume relies on it)."""
        return self.own_token_is_verdicts or greedy

    # ---- edge ----
    def encode_extras(self, batch: pb.DraftBatch, token_ids: Sequence[int], q_rows: Sequence[np.ndarray],
                      compress: bool) -> None:
        """Attach what travels with the drafts to the outgoing batch."""

    async def resolve(self, v: pb.Verdict, q_row: np.ndarray, seed: int, pos: int, vocab: int, run_model: RunModel,
                      more_tail: MoreTail) -> int:
        """Split modes: sample the correction at a rejected position from the verdict's residual payload."""
        raise ProtocolError(f"{self.name}: the cloud sends its own correction; nothing to resolve")

    # ---- cloud ----
    def decode_extras(self, batch: pb.DraftBatch, vocab: int) -> list[Any]:
        """Validate and decode what travels with each draft token (one item per token)."""
        return [None] * len(batch.token_ids)

    def decide(self, p: "torch.Tensor", extras: Sequence[Any], draft_ids: Sequence[int], seed: int,
               start_pos: int) -> Decision:
        """p: [k+1, V] at positions start_pos .. start_pos+k. The verdict, with coins keyed by position."""
        raise NotImplementedError

    def expected_token(self, p: "torch.Tensor", d: Decision, greedy: bool) -> int | None:
        """Early exits: the token a tentative decision expects after the accepted drafts (None: unforeseeable)."""
        return d.token

    def open_rejection(self, p_row: "torch.Tensor", pos: int, seed: int, top_k: int, tail_samples: int) -> OpenRejection:
        """Split modes: what to send down at a rejection, kept open until the edge's correction arrives."""
        raise ProtocolError(f"{self.name}: no residual payloads in this scheme")

    def more_tail(self, r: OpenRejection, pos: int, have: int, seed: int, tail_samples: int) -> bytes:
        raise ProtocolError(f"no open split-exact rejection at position {pos}")
