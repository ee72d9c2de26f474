"""The edge's side of the session: the committed state (shared/protocol.py:`SessionState`, which the cloud keeps too)
plus the drafts beyond it, the chain of the current epoch, and what a verdict does to them (`EdgeChain.apply`);
early exits' pre-drafts (`PreDraft`, edge_client/hints.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from picospec.shared.protocol import ProtocolError, SessionState


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
