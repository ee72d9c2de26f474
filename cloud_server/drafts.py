"""The cloud's queue of drafts: received, not yet verified, verified in whatever size has arrived.

Terms: a `DraftRun` is drafts of one epoch at consecutive positions; `pending` is the run received and waiting,
`verifying` the stretch of it in the current pass. The queue reads and advances the session's shared state
(shared/protocol.py: committed tokens, epoch, stopping) and adds what only the cloud has: the pending drafts,
the tokens it committed on its own (a bonus, decode-ahead), and the chains those tokens killed.

A chain is dead when the cloud has committed a token of its own at a position where the chain says something
else; the edge sees it in the verdict and starts a new epoch, the cloud sees it when the chain's drafts reach
the queue (`take`) and ends that epoch. Both look only at committed tokens and chain contents.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Sequence

from picospec.shared.protocol import Commit, ProtocolError, SessionState
from picospec.shared.trees import check_tree

MAX_PENDING_BATCHES = 8  # unverified drafts the cloud holds per session, in units of the largest batch


class BatchStatus(Enum):
    CURRENT = "current"  # verify it
    STALE = "stale"      # drafted before a rejection we have already sent: drop it


@dataclass
class DraftRun:
    """Drafts of one epoch at consecutive positions start_pos.., with what travels with each token."""

    epoch: int
    start_pos: int
    token_ids: list[int]
    extras: list[Any]  # per token: the q row (dense), q(x) (split modes) or None (coupled)
    parents: list[int] | None = None  # a token tree (coupled): each node's parent index (-1: the root); None: a chain

    @property
    def end(self) -> int:
        return self.start_pos + len(self.token_ids)


class DraftQueue:
    def __init__(self, state: SessionState) -> None:
        self.state = state
        self.pending: DraftRun | None = None    # received, waiting for a pass
        self.verifying: DraftRun | None = None  # the stretch in the pass now running
        self.cloud_tokens = 0  # tokens the cloud committed on its own (bonus, decode-ahead)
        self.dead_chains = 0   # chains that arrived contradicting such a token

    def admit(self, epoch: int, start_pos: int, draft_ids: Sequence[int], extras: Sequence[Any], max_len: int,
              resolved: int | None = None) -> BatchStatus:
        """Take an incoming draft batch into the pending run, or drop it as stale.

        extras: one item per draft token that travels with it (a q row, or q(x)). A resolved token (split
        modes) is committed here: it is the edge's sample, and both sides commit it themselves."""
        st = self.state
        if st.finished is not None:
            raise ProtocolError("draft batch after the session finished")
        if epoch < st.epoch:
            return BatchStatus.STALE
        # every epoch the edge starts is caused by a rejection (which bumps ours) or by a token we
        # committed on our own that contradicts its chain: more than that is a broken peer
        if epoch > st.epoch + self.cloud_tokens:
            raise ProtocolError(f"batch from future epoch {epoch} (current {st.epoch})")
        if len(extras) != len(draft_ids):
            raise ProtocolError(f"{len(extras)} draft probabilities for {len(draft_ids)} draft tokens")
        if epoch > st.epoch:  # the edge abandoned its chain: whatever we hold of it is stale
            st.epoch, self.pending = epoch, None
        self._trim_pending()  # drafts the cloud has overtaken with tokens of its own
        if epoch < st.epoch:
            return BatchStatus.STALE
        if st.awaiting_resolution != (resolved is not None):
            raise ProtocolError("a resolved token is required after a split rejection, and only then")
        # a correction may travel alone: the edge sends it without drafts when it has chosen to let the cloud
        # decode (draft length 0) or when it ends the session; the cloud must never wait for drafts to get it
        min_len = 0 if resolved is not None else 1
        if not min_len <= len(draft_ids) <= max_len:
            raise ProtocolError(f"batch of {len(draft_ids)} tokens; allowed {min_len}..{max_len}")
        st.check_ids(draft_ids, "draft batch")
        self._check_end(start_pos + (resolved is not None) + len(draft_ids))
        start_pos = self._check_start(epoch, start_pos, resolved)
        if not draft_ids:
            return BatchStatus.CURRENT
        if self.pending is None:
            self.pending = DraftRun(epoch, start_pos, [], [])
        if len(self.pending.token_ids) + len(draft_ids) > max_len * MAX_PENDING_BATCHES:
            raise ProtocolError(f"more than {max_len * MAX_PENDING_BATCHES} draft tokens waiting for verification")
        self.pending.token_ids.extend(int(t) for t in draft_ids)
        self.pending.extras.extend(extras)
        return BatchStatus.CURRENT

    def admit_tree(self, epoch: int, start_pos: int, tokens: Sequence[int], parents: Sequence[int],
                   max_nodes: int) -> BatchStatus:
        """Take a token tree (coupled). A tree is verified whole, against the committed prefix it grew from: it must
        start at the committed length with nothing else waiting, like a stop-and-wait batch (trees run without
        decode-ahead, so the cloud commits nothing of its own while the edge drafts one)."""
        st = self.state
        if st.finished is not None:
            raise ProtocolError("draft batch after the session finished")
        if epoch < st.epoch:
            return BatchStatus.STALE
        if epoch > st.epoch:
            raise ProtocolError(f"tree from future epoch {epoch} (current {st.epoch})")
        if self.pending is not None or self.verifying is not None:
            raise ProtocolError("a token tree while other drafts wait for verification")
        if start_pos != st.committed_len:
            raise ProtocolError(f"tree at position {start_pos}, committed length is {st.committed_len}")
        room = len(st.prompt_ids) + st.max_new_tokens - start_pos  # levels that end within the budget (_check_end)
        check_tree(tokens, parents, max_nodes, max_depth=max(0, room))
        st.check_ids(tokens, "token tree")
        self.pending = DraftRun(epoch, start_pos, [int(t) for t in tokens], [None] * len(tokens), list(parents))
        return BatchStatus.CURRENT

    def _check_end(self, end: int) -> None:
        """Drafts past the token budget can never be committed, and the edge never makes them (its chain stops at
        the budget): refusing them keeps every forward pass within prompt + max_new_tokens <= --max-context."""
        st = self.state
        last = len(st.prompt_ids) + st.max_new_tokens
        if end > last:
            raise ProtocolError(f"batch ends at position {end}, past the session's end at {last} "
                                f"({len(st.prompt_ids)} prompt + {st.max_new_tokens} new tokens)")

    def _check_start(self, epoch: int, start_pos: int, resolved: int | None) -> int:
        """The batch must continue the epoch's drafts, or start at the committed length; commit a correction.
        Returns the position of its first draft (after the correction)."""
        st = self.state
        chain_end = self.pending.end if self.pending else self.verifying.end if self.verifying else None
        if resolved is not None:
            if start_pos != st.committed_len:
                raise ProtocolError(f"resolved token at position {start_pos}, committed length is {st.committed_len}")
            st.check_ids([resolved], "resolved token")
            st.commit_resolved(resolved)
            return start_pos + 1
        if chain_end is not None and self.pending_epoch == epoch:
            if start_pos != chain_end:
                raise ProtocolError(f"batch starts at position {start_pos}; the epoch's drafts so far end at {chain_end}")
        elif start_pos > st.committed_len:
            raise ProtocolError(f"batch starts at position {start_pos}, committed length is {st.committed_len}")
        return start_pos

    @property
    def pending_epoch(self) -> int | None:
        run = self.pending or self.verifying
        return run.epoch if run else None

    def take(self, limit: int) -> DraftRun | None:
        """The next drafts to verify, at most `limit`, starting at the committed length.

        Drafts at positions the cloud has already committed (its bonus or decode-ahead tokens) are
        trimmed when they agree; when they disagree the chain is dead and its epoch ends here."""
        if self.state.finished is not None or self.state.awaiting_resolution:
            return None
        self._trim_pending()
        run = self.pending
        if run is None:
            return None
        if run.parents is not None:  # a tree goes into one pass, its first `limit` nodes (parents come first: a tree)
            cut = max(1, limit)  # the rest is dropped: trees are stop-and-wait, the next one grows from the verdict
            tree = run if cut >= len(run.token_ids) else DraftRun(run.epoch, run.start_pos, run.token_ids[:cut],
                                                                  run.extras[:cut], run.parents[:cut])
            self.pending, self.verifying = None, tree
            return tree
        head = DraftRun(run.epoch, run.start_pos, run.token_ids[:limit], run.extras[:limit])
        rest = DraftRun(run.epoch, head.end, run.token_ids[limit:], run.extras[limit:])
        self.pending = rest if rest.token_ids else None
        if not head.token_ids:
            return None
        self.verifying = head
        return head

    def _trim_pending(self) -> None:
        """Drop pending drafts at positions already committed if they agree; end their chain if not."""
        run, st = self.pending, self.state
        overlap = st.committed_len - run.start_pos if run else 0
        if overlap <= 0:
            return
        n = min(overlap, len(run.token_ids))
        if run.token_ids[:n] != st.tokens[run.start_pos : run.start_pos + n]:
            st.epoch, self.pending = run.epoch + 1, None
            self.dead_chains += 1
            return
        rest = DraftRun(run.epoch, run.start_pos + n, run.token_ids[n:], run.extras[n:])
        self.pending = rest if rest.token_ids else None

    def finish_pass(self, run: DraftRun, accepted: int, token: int | None, rejected: bool,
                    path: Sequence[int] = ()) -> Commit | None:
        """Commit the outcome of verifying `run`; None when the run went stale meanwhile. A tree commits the nodes
        of `path` (its walk), a chain its leading drafts.

        When every draft was accepted and more drafts of the chain are already waiting, the bonus token
        is dropped: the next draft takes its place (and its coin is never looked at, so nothing is biased)."""
        self.verifying = None
        st = self.state
        if run.epoch != st.epoch or run.start_pos != st.committed_len:
            return None  # the edge started a new chain while we verified this one
        drafts = [run.token_ids[i] for i in path] if run.parents is not None else run.token_ids
        if not rejected and accepted == len(drafts) and self.pending is not None:
            token = None
        c = st.commit(drafts, accepted, token, rejected)
        if rejected or c.finished is not None:
            self.pending = None
        elif c.token is not None:
            self.cloud_tokens += 1
        return c

    def commit_own(self, token: int) -> Commit:
        """A token decoded with nothing to verify (decode-ahead)."""
        c = self.state.commit((), 0, token, rejected=False)
        self.cloud_tokens += 1
        return c
