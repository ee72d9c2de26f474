"""The session state machine shared by both sides: committed tokens, epochs, positions, stopping.

No models, no transport: the cloud and the edge each keep one `SessionState` and feed it the same
verdicts, so they agree on every committed token. Rollback is bookkeeping only: a rejection bumps the
epoch, and anything drafted under an older epoch is stale; the KV caches are truncated by their owners
to `committed_len` (see shared.backend).

The cloud may commit tokens of its own (a bonus, or decode-ahead when it has nothing to verify): a draft
chain that disagrees with one of them is dead. The edge sees that in the verdict and starts a new epoch
(`EdgeChain`); the cloud sees it when the chain's batch reaches its queue of pending drafts
(cloud_server/drafts.py) and ends that epoch. Both rules look only at committed tokens and chain contents,
so the two sides agree without a round trip.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Sequence

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


@dataclass
class ChainToken:
    token: int
    extra: Any = None    # what the edge keeps per draft: its q row (all modes need it for a correction)
    sent: bool = False
    confidence: float | None = None  # the draft's top-1 probability there (the policy's acceptance by confidence)


@dataclass(frozen=True)
class Applied:
    """What one verdict did on the edge."""

    new_tokens: tuple[int, ...]
    accepted: int
    verified: int
    chain_died: bool           # our drafts after the committed prefix are dead: a new epoch has begun
    from_chain: int = 0        # chain tokens that became committed (accepted, or equal to the cloud's token)
    dropped: int = 0           # chain tokens thrown away (rejected, after a rejection, or contradicted)
    rejected_extra: Any = None  # split modes: the q row at the rejected position, for the correction


@dataclass
class PreDraft:
    """Edge side, early exits: drafts made while a pass runs, from the context its hint expects (the committed
    prefix, the drafts it expects accepted, its expected token). Adopted only if the verdict commits exactly that."""

    epoch: int
    start: int                 # the hinted pass's first draft position
    context: list[int]
    room: int                  # tokens the budget leaves after the expected token
    drafts: list[ChainToken] = field(default_factory=list)

    @property
    def tokens(self) -> list[int]:
        return self.context + [c.token for c in self.drafts]


class EdgeChain:
    """Edge side: the committed state plus the drafts beyond it (the chain) of the current epoch.

    Drafts are appended as they are made and marked sent when they go up; a verdict commits a prefix of
    the chain and the cloud's token, and ends the chain when the cloud rejected a draft or committed a
    token of its own that the chain contradicts."""

    def __init__(self, state: SessionState) -> None:
        self.state = state
        self.epoch = 0
        self.chain: list[ChainToken] = []
        self.resolved: int | None = None  # split modes: our correction, committed when the cloud has it
        self.resolved_sent = False

    @property
    def tokens(self) -> list[int]:
        """The context the next draft continues: committed, our correction, the chain."""
        return self.state.tokens + ([self.resolved] if self.resolved is not None else []) + [c.token for c in self.chain]

    @property
    def unsent(self) -> list[ChainToken]:
        return [c for c in self.chain if not c.sent]

    @property
    def in_flight(self) -> int:
        return sum(c.sent for c in self.chain)

    @property
    def next_pos(self) -> int:
        return len(self.state.tokens) + (self.resolved is not None) + len(self.chain)

    def _end_chain(self) -> None:
        self.chain = []
        self.epoch += 1

    def take_batch(self) -> tuple[int, list[ChainToken], int | None]:
        """The unsent drafts as one batch: (start position, tokens, our correction if not yet sent); marks them sent."""
        unsent = self.unsent
        resolved = self.resolved if self.resolved is not None and not self.resolved_sent else None
        start = self.next_pos - len(unsent) - (resolved is not None)
        for c in unsent:
            c.sent = True
        self.resolved_sent = self.resolved is not None
        return start, unsent, resolved

    def apply(self, *, start_pos: int, verified: int, accepted: int, token: int | None, rejected: bool,
              committed_len: int, finished: bool, epoch: int) -> Applied:
        s = self.state
        new: list[int] = []
        if self.resolved is not None:
            # the cloud speaks again only once it has committed our correction: commit it on our side too
            new += s.commit_resolved(self.resolved).new_tokens
            self.resolved, self.resolved_sent = None, False
        if start_pos != s.committed_len:
            raise ProtocolError(f"verdict at position {start_pos}, edge committed length is {s.committed_len}")
        if verified:
            if epoch != self.epoch:
                raise ProtocolError(f"verdict for epoch {epoch}, edge is in epoch {self.epoch}")
            if verified > self.in_flight or not all(c.sent for c in self.chain[:verified]):
                raise ProtocolError(f"cloud verified {verified} drafts, {self.in_flight} were sent")
        if not 0 <= accepted <= verified:
            raise ProtocolError(f"{accepted} accepted of {verified} verified")
        died, extra, before = False, None, len(self.chain)
        matched = 0
        if s.finished is None:
            drafts = [c.token for c in self.chain[:verified]]
            c = s.commit(drafts, accepted, token, rejected)
            new += c.new_tokens
            if rejected:
                extra = self.chain[accepted].extra if accepted < len(self.chain) else None
                self.chain = []
                self.epoch = max(self.epoch + 1, epoch + 1)
                died = True
            else:
                del self.chain[:accepted]
                if c.token is not None and self.chain:
                    if self.chain[0].token == c.token:
                        del self.chain[0]  # the cloud's own token is what we drafted there
                        matched = 1
                    else:
                        self._end_chain()
                        died = True
        if s.finished is not None:
            self.chain = []
        s.check_verdict(epoch, start_pos, committed_len)
        if finished != (s.finished is not None):
            raise ProtocolError(f"cloud says finished={finished}, edge derived {s.finished}")
        from_chain = min(accepted, before) + matched
        return Applied(tuple(new), accepted, verified, died, from_chain, before - len(self.chain) - from_chain, extra)
