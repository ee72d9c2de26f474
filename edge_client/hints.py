"""Early-exit hints on the edge: pre-draft from the context a hint expects, adopt the drafts if the verdict agrees.

A hint says, mid-pass, where the cloud's tentative result expects the first rejection and which token it expects
there. The edge drafts from that context (`PreDraft`) while the pass finishes. The drafts are adopted only when
the verdict commits exactly that context: then they are the very drafts the edge would make now (same context,
same coins), so adopting them changes nothing but time. Otherwise they are discarded.
"""
from __future__ import annotations

from picospec.edge_client.chain import Applied, ChainToken, EdgeChain, PreDraft
from picospec.edge_client.stats import GenerationStats
from picospec.shared.protocol import SessionState
from picospec.shared.rpc import picospec_pb2 as pb


class HintTracker:
    def __init__(self, stats: GenerationStats, pipelined: bool) -> None:
        self.stats, self.pipelined = stats, pipelined
        self.pre: PreDraft | None = None

    def take(self, h: pb.Hint, chain: EdgeChain, state: SessionState) -> None:
        """Open a pre-draft from a hint, unless one is open, the hint is stale, or it foresees nothing new."""
        self.stats.hints += 1
        if self.pre is not None or h.epoch != chain.epoch or not h.HasField("expected_token") or not h.verified:
            return
        end = h.start_pos + h.expected_accepted
        context = chain.tokens
        if len(context) < end + self.pipelined:
            return
        if self.pipelined and (h.expected_accepted == h.verified or context[end] == h.expected_token):
            return  # the chain already continues as expected: nothing to pre-draft
        if h.expected_token in state.eos_ids:
            return
        self.pre = PreDraft(h.epoch, h.start_pos, context[:end] + [h.expected_token],
                            room=state.remaining - (end + 1 - state.committed_len))

    def wants_more(self, g: int, eos_ids: frozenset[int]) -> bool:
        pre = self.pre
        return pre is not None and len(pre.drafts) < min(max(g, 1), pre.room) and \
            not (pre.drafts and pre.drafts[-1].token in eos_ids)

    def context(self) -> list[int] | None:
        return self.pre.tokens if self.pre is not None else None

    def add(self, made: ChainToken, context: list[int]) -> bool:
        """Keep a draft made from the hint's context; False when the pre-draft moved on (or closed) meanwhile."""
        if self.pre is None or self.pre.tokens != context:
            return False
        self.pre.drafts.append(made)
        return True

    def settle(self, v: pb.Verdict, a: Applied, chain: EdgeChain) -> None:
        """After the hinted pass's verdict: adopt the pre-drafts if the committed context is the expected one."""
        pre = self.pre
        if pre is None:
            return
        hinted = bool(v.verified) and (v.epoch, v.start_pos) == (pre.epoch, pre.start)
        if not hinted and not a.chain_died:
            return  # an earlier pass, or the cloud's own token: the hinted pass is still to come
        if hinted and not chain.chain and chain.tokens == pre.context:
            self.stats.hint_hits += 1
            self.stats.predrafted_used += len(pre.drafts)
            chain.chain.extend(pre.drafts)
        else:
            self.stats.hint_misses += 1
            self.stats.wasted_draft += len(pre.drafts)
        self.pre = None
