"""One speculative generation on the edge: the handshake, then a loop over the policy's actions.

    step:  apply the verdicts that have arrived -> choose the draft length -> snapshot -> next_action ->
           DRAFT / PRE_DRAFT (one token, then send if a batch is ready) | SEND | WAIT (the cloud owes us) | STALL

Terms are defined in edge_client/policy.py. Model steps run in the edge's one-thread executor (`run_model`), so the
event loop keeps sending and receiving while the draft model works; the transport pumps the cloud's messages.
"""
from __future__ import annotations

import asyncio
import collections
import time
from concurrent.futures import Executor
from typing import AsyncIterator, Awaitable, Callable, Mapping

import numpy as np

from picospec.edge_client.chain import ChainToken, EdgeChain
from picospec.edge_client.drafter import Drafter, DraftTree
from picospec.edge_client.hints import HintTracker
from picospec.edge_client.policy import (SHADOW_EVERY, Action, SessionPlan, Snapshot, cloud_owes,
                                         drafts_before_next_send, edge_owes, next_action, should_send)
from picospec.edge_client.rtt import RttTracker
from picospec.edge_client.stats import GenerationStats, verdict_token_kinds
from picospec.edge_client.transport import EdgeError, StreamTransport
from picospec.edge_client.tree_builder import MAX_TREE_NODES_GROWN
from picospec.shared.codec import PayloadError, decode_list
from picospec.shared.config import EdgeConfig
from picospec.shared.perf_model import choose_draft_len, choose_tree_nodes
from picospec.shared.protocol import ProtocolError, SessionState
from picospec.shared.rpc import picospec_pb2 as pb
from picospec.shared.schemes import MAX_TAIL_DRAWS, scheme
from picospec.shared.trees import check_path

RunModel = Callable[..., Awaitable]
MAX_PASS_S = 3600.0  # a pass cost the cloud states above this (or not above 0, or NaN) is not taken
TREE_GROWTH = 4  # idle-time growth: a tree may grow to this many times the nodes sent (and MAX_TREE_NODES_GROWN)


class EdgeSession:
    def __init__(self, *, hello: pb.Hello, plan: SessionPlan, cfg: EdgeConfig, stats: GenerationStats,
                 drafter: Drafter, transport: StreamTransport, run_model: RunModel, executor: Executor,
                 hooks: object = None) -> None:
        self.hello, self.plan, self.cfg, self.stats = hello, plan, cfg, stats
        self.drafter, self.transport, self.run_model, self.executor = drafter, transport, run_model, executor
        self.hooks = hooks
        self.scheme = scheme(hello.verify_mode)
        self.prompt = list(hello.prompt_ids)
        self.seed = hello.sampling.seed
        self.hints = HintTracker(stats, plan.pipelined)
        self.rtt = RttTracker(stats.estimates.rtt_samples)
        self.state: SessionState | None = None  # once the cloud is ready
        self.chain: EdgeChain | None = None
        self.paused = False                # the draft lost confidence: wait for news before drafting on
        self.next_shadow_at = 0            # length 0: the committed length at which the next shadow draft is due
        self.speculation_can_pay = True    # the last choice's can_pay: False, no acceptance would change it (no shadows)
        self.g = plan.fixed or 4
        self.waiting_for: str | None = None  # what the edge waits for now (the state dump says it)
        self.chunks: collections.deque[list[int]] = collections.deque()  # committed tokens not yet yielded

    async def run(self) -> AsyncIterator[list[int]]:
        """The committed tokens, chunk by chunk; the generation ends at its last token. The edge then half-closes the
        call and goes: the cloud settles the session on its own (and admits the next one into its slot, even at
        --max-sessions: cloud_server/slots.py), so no one waits here for the call's status."""
        prefill: asyncio.Task | None = None
        half_closed = False
        try:
            prefill = await self._open()
            while self.chunks:  # the first token at once, whether or not the draft has finished its prefill
                yield self.chunks.popleft()
            self.stats.prefill_edge_s += await prefill
            while True:
                while self.chunks:
                    yield self.chunks.popleft()
                if self.state.finished is not None:
                    break
                await self._step()
            self.stats.finish(self.state.finished.value)  # the user's last token: the wall time ends here
            self.transport.half_close()  # nothing awaited from here on: the generation has ended
            half_closed = True
        except (ProtocolError, PayloadError) as e:
            raise EdgeError(f"protocol error: {e}") from None
        finally:
            if prefill is not None:
                prefill.cancel()  # only where the generation ended before the draft's prefill did
            st = self.state
            # any other end (cancelled, failed, the consumer gone): the cloud drops the session at once
            self.transport.close(cancel=not half_closed)
            if not half_closed:
                self.stats.finish(st.finished.value if st and st.finished else "cancelled")
            if st is not None:
                # drafts that were not committed are dead once the generation ends: drop them from the cache (on the
                # model thread, after any draft still running there)
                self.executor.submit(self.drafter.settle, list(st.tokens))

    async def _open(self) -> asyncio.Task:
        """Hello up, then the cloud's Ready (with the first token, when asked), while the draft prefills alongside:
        the returned task, which the first draft awaits."""
        await self.transport.send(pb.EdgeMessage(hello=self.hello))
        prefill = asyncio.ensure_future(self.run_model(self.drafter.prefill, self.prompt))
        self.waiting_for = "the cloud's Ready (its prefill)"
        try:
            self._ready((await self.transport.next("ready")).ready)
        except BaseException:
            prefill.cancel()
            raise
        return prefill

    def _take_cloud_pass_costs(self, pass_s: Mapping[int, float]) -> None:
        """The cloud's pass costs over all its sessions (Ready.pass_s), as the draft-length choice's starting point:
        sizes this session will use (up to its longest batch), sane values only (a cloud's word, not the edge's). Its
        decode step (n = 0) is the anchor, which every verdict's decode_step_s then refreshes."""
        passes = self.stats.estimates.passes
        sane = {n: s for n, s in pass_s.items() if n <= self.plan.g_cap and 0.0 < s < MAX_PASS_S}
        if 0 in sane:
            passes.anchor = sane.pop(0)
        passes.prior = sane

    def _ready(self, ready: pb.Ready) -> None:
        """The session's state from the cloud's Ready; its first token, if any, committed and queued for the user."""
        self.stats.prefill_cloud_s += ready.prefill_s
        self.state = SessionState(self.prompt, self.hello.max_new_tokens, frozenset(ready.eos_token_ids),
                                  self.drafter.vocab_size)
        self.chain = EdgeChain(self.state)
        self._take_cloud_pass_costs(ready.pass_s)
        if ready.HasField("first_token"):  # the first token at once: drafting starts from it
            if not self.hello.first_token:
                raise ProtocolError("the cloud sent a first token this edge did not ask for")
            c = self.state.commit((), 0, ready.first_token, rejected=False)
            self.stats.prefill_tokens += len(c.new_tokens)
            self.stats.on_tokens(len(c.new_tokens), ["first"])
            self.chunks.append(list(c.new_tokens))

    async def _step(self) -> None:
        if self.plan.tree_budget:
            await self._tree_round()
            return
        await self._drain()
        if self.state.finished is not None:
            return
        self.g = self._choose_draft_len()
        snap = self.snapshot()
        action = next_action(snap)
        if action in (Action.DRAFT, Action.PRE_DRAFT):
            await self._draft(action)
            if self.state.finished is None and should_send(self.snapshot()):
                await self._send()
        elif action is Action.SEND:
            await self._send()
        elif action is Action.WAIT:
            self.waiting_for = cloud_owes(snap)
            await self._apply(await self.transport.next("verdict", "hint"))
        else:
            await self._stall(snap)

    def snapshot(self) -> Snapshot:
        st, ch, g = self.state, self.chain, self.g
        return Snapshot(
            g=g, pipelined=self.plan.pipelined, decode_ahead=self.plan.decode_ahead,
            budget=st.remaining - (ch.resolved is not None) - len(ch.chain), chain_len=len(ch.chain),
            unsent=len(ch.unsent), in_flight=ch.in_flight,
            last_is_eos=bool(ch.chain) and ch.chain[-1].token in st.eos_ids,
            awaiting_resolution=st.awaiting_resolution, resolved=ch.resolved is not None,
            resolved_sent=ch.resolved_sent,
            resolution_ends=ch.resolved is not None and st.would_finish_with(ch.resolved),
            paused=self.paused, predraft_open=self.hints.pre is not None,
            predraft_wants_more=self.hints.wants_more(g, st.eos_ids),
            shadow_due=self.speculation_can_pay and st.committed_len >= self.next_shadow_at,
        )

    def _choose_draft_len(self) -> int:
        if self.plan.fixed is not None:
            return self.plan.fixed
        est = self.stats.estimates
        # until the estimates exist: with decode-ahead, batches of one (each measures the round trip and a pass
        # cheaply while the cloud decodes; longer ones then grow by doubling), else the usual 4
        choice = choose_draft_len(est, self.plan.g_cap, pipelined=self.plan.pipelined,
                                  allow_zero=self.plan.decode_ahead, default=1 if self.plan.decode_ahead else 4)
        g, self.speculation_can_pay = choice.g, choice.can_pay
        steer = getattr(self.hooks, "steer_draft_len", None)
        if steer is not None:  # tests: force a decision (see EdgeHooks)
            g = steer(g, self.state.awaiting_resolution)
        g = g if self.plan.decode_ahead else max(g, 1)  # length 0 leaves the decoding to the cloud: only with decode-ahead
        self.stats.draft_len_choices[g] += 1
        est.last_choice = {"g": g, "objective": choice.objective, "modelled_tokens_per_s": choice.rate,
                           "best_speculative": choice.best_speculative, "decode_alone": choice.decode_alone,
                           "cloud_s_per_token": choice.cloud_s_per_token,
                           "alone_s_per_token": choice.alone_s_per_token, "can_pay": choice.can_pay}
        return g

    async def _drain(self) -> None:
        """Apply every message already in the inbox (verdicts that came in while we drafted go first)."""
        while self.state.finished is None and self.transport.has_news():
            await self._apply(await self.transport.next("verdict", "hint"))

    async def _draft(self, action: Action) -> None:
        context = self.hints.context() if action is Action.PRE_DRAFT else self.chain.tokens
        d = await self.run_model(self.drafter.draft, context, 1)
        self.stats.draft_s += d.compute_s
        self.stats.estimates.draft_s.add(d.compute_s)
        self.stats.drafted_total += 1
        await self._drain()
        if self.state.finished is not None:
            return
        made = ChainToken(d.token_ids[0], d.q[0], confidence=float(d.q[0].max()))
        if self.hints.add(made, context):
            return  # ahead of the verdict, from the hint's context
        if self.chain.tokens != context:
            self.stats.wasted_draft += 1
            return  # the chain moved under us: this draft continues a dead context
        self.chain.chain.append(made)
        if self.g == 0:  # a shadow draft (policy.shadowing): the next one a few tokens on
            self.next_shadow_at = self.state.committed_len + SHADOW_EVERY
        # the confidence stop (§4.4): what drafts made this sure were seen to be accepted, not the raw probability
        if self.plan.confidence and self.stats.estimates.by_confidence.estimate(made.confidence) < self.plan.confidence:
            self.paused = True

    async def _send(self) -> None:
        start, tokens, resolved = self.chain.take_batch()
        batch = pb.DraftBatch(epoch=self.chain.epoch, start_pos=start, token_ids=[c.token for c in tokens],
                              resolved_token=resolved)
        self.scheme.encode_extras(batch, [c.token for c in tokens], [c.extra for c in tokens], self.cfg.compress)
        per_draft = self.stats.estimates.draft_s.value
        if per_draft:  # when the next batch will follow, so that the cloud's decode-ahead never delays it
            batch.next_batch_in_s = drafts_before_next_send(self.snapshot()) * per_draft
        self.rtt.on_send(start + (resolved is not None), len(tokens), time.perf_counter())
        await self.transport.send(pb.EdgeMessage(draft=batch))

    async def _apply(self, msg: pb.CloudMessage) -> None:
        """Fold one cloud message into the chain, the statistics and the estimates; queue the committed tokens."""
        if msg.WhichOneof("kind") == "hint":
            if self.plan.hints:
                self.hints.take(msg.hint, self.chain, self.state)
            return
        v = msg.verdict
        judged = [c.confidence for c in self.chain.chain[:v.verified]]  # before apply drops them
        resolved = self.chain.resolved is not None  # apply commits our correction first
        a = self.chain.apply(start_pos=v.start_pos, verified=v.verified, accepted=v.accepted,
                             token=v.token if v.HasField("token") else None, rejected=v.rejected,
                             committed_len=v.committed_len, finished=v.finished, epoch=v.epoch)
        self._account(v, a, judged)
        self.paused = False
        if self.state.awaiting_resolution:
            self.chain.resolved = await self._resolve(v, a.rejected_extra)
        if self.plan.hints:
            self.hints.settle(v, a, self.chain)
        self.stats.on_tokens(len(a.new_tokens), verdict_token_kinds(len(a.new_tokens), resolved, a.accepted,
                                                                    v.verified, v.rejected))
        if a.new_tokens:
            self.chunks.append(list(a.new_tokens))

    def _account(self, v: pb.Verdict, a, judged: list[float | None]) -> None:
        """Statistics and estimates from one verdict; `judged`: the confidences of the drafts it verified."""
        stats, est = self.stats, self.stats.estimates
        stats.cloud_s += v.verify_s
        stats.bubble_s += v.idle_s
        stats.verify_waited_s += v.waited_s
        stats.wasted_draft += a.dropped
        stats.capped_drafts += v.capped
        if v.decode_step_s > 0:
            est.passes.anchor = v.decode_step_s  # the cloud's own measure of a decode step
        est.others_load = v.others_load
        if v.verify_s > 0:  # a pass ran (a verdict closing the session on our correction ran none)
            est.passes.add(v.verified, v.verify_s)
        if v.verified:
            stats.on_round(v.verified, a.accepted, len(a.new_tokens) + self.state.awaiting_resolution)
            for _ in range(a.accepted):
                est.acceptance.add(1.0)
            if v.rejected:
                est.acceptance.add(0.0)
            est.by_depth.add_verdict(a.accepted, v.rejected)
            for k, conf in enumerate(judged[: a.accepted + v.rejected]):
                if conf is not None:
                    est.by_confidence.add(conf, accepted=k < a.accepted)
            self.rtt.on_verified(v.start_pos + v.verified - 1, v.verify_s + v.idle_s, time.perf_counter())
        elif v.HasField("token"):
            stats.cloud_tokens += 1
            if a.from_chain or a.chain_died:  # a draft was there (a shadow draft too): it agreed with the cloud or not
                est.acceptance.add(float(a.from_chain > 0))
                est.by_depth.add_verdict(int(a.from_chain > 0), rejected=not a.from_chain)
        if a.chain_died:
            self.rtt.clear()
            stats.dead_chains += not v.rejected

    async def _resolve(self, v: pb.Verdict, q_row: np.ndarray | None) -> int:
        """Split modes: sample the correction at the rejected position from the cloud's sparse view of p."""
        if q_row is None:
            raise ProtocolError("a rejection at a position the edge never drafted")
        self.stats.on_rejection(len(v.residual_payload) + len(v.tail_payload))
        pos = self.state.committed_len

        async def more_tail(have: int) -> tuple[np.ndarray, np.ndarray]:
            return await self._more_tail(v.next_epoch, pos, have)
        return await self.scheme.resolve(v, q_row, self.seed, pos, self.drafter.vocab_size, self.run_model, more_tail)

    async def _more_tail(self, epoch: int, pos: int, have: int) -> tuple[np.ndarray, np.ndarray]:
        await self.transport.send(pb.EdgeMessage(tail_request=pb.TailRequest(epoch=epoch, position=pos, have=have)))
        self.waiting_for = f"tail draws {have}.. at position {pos}"
        t = (await self.transport.next("tail")).tail
        self.stats.on_tail_request(len(t.payload))
        return decode_list(t.payload, vocab_size=self.drafter.vocab_size, max_len=MAX_TAIL_DRAWS)

    # ---- token trees (coupled, stop-and-wait: docs/design.md §3.7) -------------------------------------------------
    async def _tree_round(self) -> None:
        """Draft a tree from the committed prefix, send it, wait for its verdict and commit the walk's path."""
        st, est = self.state, self.stats.estimates
        n = self.plan.tree_budget
        if self.plan.tree_online:  # as the chain's online length: sizes by modelled rate (shared/perf_model.py);
            # starting small, since a size above the largest measured is assumed to cost what that one does (a probe
            # upwards is cheap to correct), while below the smallest nothing would ever be learnt
            n = choose_tree_nodes(est, n, default=4).nodes
        self.stats.draft_len_choices[n] += 1
        accept = est.acceptance.value if est.acceptance.value is not None else 0.6
        tree = await self.run_model(self.drafter.draft_tree, self.chain.tokens, n, st.remaining, st.eos_ids,
                                    min(max(accept, 0.05), 0.95))
        self.stats.draft_s += tree.compute_s
        self.stats.drafted_total += tree.steps
        self.stats.tree_reused += tree.reused
        if tree.steps:
            est.draft_s.add(tree.compute_s / tree.steps)
        start = st.committed_len
        self.rtt.on_send(start, len(tree.tokens), time.perf_counter())
        await self.transport.send(pb.EdgeMessage(draft=pb.DraftBatch(
            epoch=self.chain.epoch, start_pos=start, token_ids=tree.tokens, parent_index=tree.parents)))
        self.waiting_for = f"the verdict on a tree of {len(tree.tokens)} nodes at position {start}"
        await self._grow_while_waiting(len(tree.tokens))
        self._apply_tree((await self.transport.next("verdict")).verdict, tree)

    async def _grow_while_waiting(self, sent: int) -> None:
        """The edge's idle time while the cloud verifies (a pass is much longer than drafting): grow the tree past
        what was sent, one draft forward at a time, looking for the verdict in between (it waits at most one
        forward), so that the next tree starts from expansions already made under the committed tokens."""
        cap = min(TREE_GROWTH * sent, MAX_TREE_NODES_GROWN)
        while not self.transport.has_news():
            grew, seconds = await self.run_model(self.drafter.grow_tree, cap)
            self.stats.draft_s += seconds
            if not grew:
                return
            self.stats.tree_idle_forwards += 1
            self.stats.drafted_total += 1

    def _apply_tree(self, v: pb.Verdict, tree: DraftTree) -> None:
        """Commit a tree's verdict: its path's tokens are the accepted drafts, then the cloud's token, as a chain's.
        The cloud verifies the whole tree, or its first nodes when the session's verification budget cuts it
        (`capped` of them kept out: cloud_server/capacity.py)."""
        path = list(v.path)
        if not 1 <= v.verified == len(tree.tokens) - v.capped or len(path) != v.accepted:
            raise ProtocolError(f"tree verdict verified {v.verified} and capped {v.capped} of {len(tree.tokens)} "
                                f"nodes, path {path} for {v.accepted} accepted")
        check_path(tree.parents[:v.verified], path)
        self.chain.chain = [ChainToken(tree.tokens[i], sent=True) for i in path]  # the path, as a chain in flight
        a = self.chain.apply(start_pos=v.start_pos, verified=len(path), accepted=v.accepted,
                             token=v.token if v.HasField("token") else None, rejected=v.rejected,
                             committed_len=v.committed_len, finished=v.finished, epoch=v.epoch)
        stats, est = self.stats, self.stats.estimates
        stats.cloud_s += v.verify_s
        stats.bubble_s += v.idle_s
        stats.wasted_draft += len(tree.tokens) - a.accepted
        stats.capped_drafts += v.capped
        stats.tree_alternatives += tree.took_alternative(path)
        est.passes.add(v.verified, v.verify_s)
        stats.on_round(v.verified, a.accepted, len(a.new_tokens))
        for _ in range(a.accepted):
            est.acceptance.add(1.0)
        if v.rejected:
            est.acceptance.add(0.0)
        est.by_depth.add_verdict(a.accepted, v.rejected)
        self.rtt.on_verified(v.start_pos + len(tree.tokens) - 1, v.verify_s + v.idle_s, time.perf_counter())
        stats.on_tokens(len(a.new_tokens), verdict_token_kinds(len(a.new_tokens), False, a.accepted,
                                                               len(tree.tokens), v.rejected))
        if a.new_tokens:
            self.chunks.append(list(a.new_tokens))

    async def _stall(self, snap: Snapshot) -> None:
        """Neither side owes the other a message: tell the cloud why we hang up (it logs its own state), then fail."""
        dump = self.describe()
        reason = f"protocol stall: the edge owes the cloud {edge_owes(snap)}, the cloud owes the edge nothing; {dump}"
        await self.transport.send(pb.EdgeMessage(cancel=pb.Cancel(reason=reason[:1000])))
        raise ProtocolError(reason)

    def describe(self) -> dict[str, object]:
        """The protocol state as the edge sees it: for stall reports, hang dumps and debugging."""
        if self.state is None:
            return {"phase": "handshake", "edge_waits_for": self.waiting_for}
        st, ch, snap = self.state, self.chain, self.snapshot()
        return {
            "epoch": ch.epoch, "committed_len": st.committed_len, "generated": len(st.generated),
            "remaining": st.remaining, "chain": len(ch.chain), "in_flight": ch.in_flight, "unsent": len(ch.unsent),
            "awaiting_resolution": st.awaiting_resolution, "resolved": ch.resolved, "resolved_sent": ch.resolved_sent,
            "draft_len": self.g, "decode_ahead": self.plan.decode_ahead, "paused": self.paused,
            "predraft_open": self.hints.pre is not None, "edge_waits_for": self.waiting_for,
            "cloud_owes": cloud_owes(snap), "edge_owes": edge_owes(snap),
        }
