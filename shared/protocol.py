"""The session state machine shared by both sides: committed tokens, epochs, positions, stopping.

No models, no transport: the cloud and the edge each keep one `SessionState` and feed it the same
verdicts, so they agree on every committed token. Rollback is bookkeeping only: a rejection bumps the
epoch, and anything drafted under an older epoch is stale; the KV caches are truncated by their owners
to `committed_len` (see shared.backend).

The cloud may commit tokens of its own (a bonus, or decode-ahead when it has nothing to verify): a draft
chain that disagrees with one of them is dead. The edge sees that in the verdict and starts a new epoch
(edge_client/chain.py:`EdgeChain`); the cloud sees it when the chain's batch reaches its queue of pending drafts
(cloud_server/drafts.py) and ends that epoch. Both rules look only at committed tokens and chain contents,
so the two sides agree without a round trip.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Sequence

PROTOCOL_VERSION = 1


class ProtocolError(ValueError):
    """The peer broke the protocol (wrong position, bad ids, out-of-order message)."""


class FinishReason(str, Enum):
    EOS = "eos"
    LENGTH = "length"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class Commit:
    """The outcome of one verification, as both sides apply it."""

    accepted: int               # leading draft tokens accepted (after stop truncation)
    token: int | None           # the cloud's token after them, if it survived stop truncation
    new_tokens: tuple[int, ...]  # what was appended to the committed sequence
    rejected: bool
    finished: FinishReason | None


@dataclass
class SessionState:
    prompt_ids: list[int]
    max_new_tokens: int
    eos_ids: frozenset[int]
    vocab_size: int
    tokens: list[int] = field(default_factory=list)  # committed: prompt + generated
    epoch: int = 0
    finished: FinishReason | None = None
    # split modes: a rejection left position committed_len to be resolved by the edge's residual sample
    awaiting_resolution: bool = False

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ProtocolError("empty prompt")
        self.check_ids(self.prompt_ids, "prompt")
        self.tokens = list(self.prompt_ids)

    @property
    def committed_len(self) -> int:
        return len(self.tokens)

    @property
    def generated(self) -> list[int]:
        return self.tokens[len(self.prompt_ids) :]

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - len(self.generated)

    def check_ids(self, ids: Sequence[int], what: str) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ProtocolError(f"{what} holds token id {bad[0]} outside the vocabulary [0, {self.vocab_size})")

    def would_finish_with(self, token: int) -> bool:
        """Whether committing this one token ends the session (then nothing may be drafted after it)."""
        return token in self.eos_ids or self.remaining <= 1

    def commit_resolved(self, token: int) -> Commit:
        """Commit the edge's residual sample at the position a split rejection left open."""
        if not self.awaiting_resolution:
            raise ProtocolError("no rejected position awaits a resolved token")
        self.awaiting_resolution = False
        return self.commit((), 0, token, rejected=False)

    def commit(self, draft_ids: Sequence[int], accepted: int, token: int | None, rejected: bool) -> Commit:
        """Append accepted drafts and the cloud's token, stopping at EOS or the token budget."""
        if self.finished is not None:
            raise ProtocolError("commit after the session finished")
        if not 0 <= accepted <= len(draft_ids):
            raise ProtocolError(f"{accepted} accepted of {len(draft_ids)} drafted")
        candidate = list(draft_ids[:accepted]) + ([token] if token is not None else [])
        self.check_ids(candidate, "verdict")
        new: list[int] = []
        for t in candidate:
            if self.remaining - len(new) <= 0:
                self.finished = FinishReason.LENGTH
                break
            new.append(t)
            if t in self.eos_ids:
                self.finished = FinishReason.EOS
                break
        if self.finished is None and self.remaining - len(new) <= 0:
            self.finished = FinishReason.LENGTH
        self.tokens.extend(new)
        kept_accepted = min(accepted, len(new))
        kept_token = token if len(new) > accepted else None
        if rejected:
            self.epoch += 1
            # a rejection without the cloud's token (split modes): the edge samples the correction
            self.awaiting_resolution = token is None and self.finished is None
        return Commit(kept_accepted, kept_token, tuple(new), rejected, self.finished)

    def check_verdict(self, epoch: int, start_pos: int, committed_len: int) -> None:
        """Edge side: the cloud's claimed committed length must match what we derived."""
        if committed_len != self.committed_len:
            raise ProtocolError(
                f"cloud says {committed_len} tokens are committed, edge derived {self.committed_len} "
                f"(verdict for epoch {epoch} at position {start_pos})"
            )
