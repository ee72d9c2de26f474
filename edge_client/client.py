"""The edge client: a Python API over the cloud's gRPC service and the local draft model.

    client = EdgeClient(EdgeConfig(server="host:50051"), draft=load_model("..."))
    gen = client.generate(prompt_ids, mode="sync")
    async for tokens in gen:        # committed token ids, as soon as the cloud commits them
        ...
    print(gen.stats.to_dict())      # SPEC 7 metrics

Every model step runs in a one-thread executor so the event loop keeps sending and receiving.
"""
from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Callable, Protocol, Sequence, TypeVar

import grpc
import torch

from edge_client.drafter import Drafter
from shared.codec import PayloadError, decode_list, decode_probs, encode_probs
from shared.config import EDGE_MODES, EXACT_VERIFY_MODES, SPECULATIVE_MODES, VERIFY_MODES, EdgeConfig
from shared.fingerprint import eos_token_ids, tokenizer_fingerprint
from shared.models import LoadedModel
from shared.perf_model import choose_draft_len
from shared.protocol import PROTOCOL_VERSION, Applied, ChainToken, EdgeChain, PreDraft, ProtocolError, SessionState
from shared.rpc import picospec_pb2 as pb
from shared.rpc import picospec_pb2_grpc as pb_grpc
from shared.sampling import SamplingParams
from shared.stats import GenerationStats
from shared.verify import NeedMoreTail, ResidualHint, resample_exact, resample_topk

MAX_TAIL_DRAWS = 4096  # per rejected position, as the cloud allows

T = TypeVar("T")
GRPC_FRAME_OVERHEAD = 5  # gRPC's length-prefixed message header; HTTP/2 and TCP/IP headers are not counted


class EdgeHooks(Protocol):
    """Test hooks around the wire (e.g. to delay messages and reorder their timing against drafting).

    Optional: `steer_draft_len(chosen, awaiting_resolution) -> int` replaces the online draft-length choice, so a
    test can force the decisions that lead to a rare interleaving (e.g. length 0 while a correction is owed)."""

    async def before_send(self, msg: pb.EdgeMessage) -> None: ...
    async def after_receive(self, msg: pb.CloudMessage) -> None: ...


class EdgeError(RuntimeError):
    """A generation failed: the cloud refused it, vanished, or broke the protocol."""


def _wire_size(msg) -> int:
    return msg.ByteSize() + GRPC_FRAME_OVERHEAD


class Generation:
    """An async iterator of committed token-id lists; `stats` and `token_ids` are complete once it ends."""

    def __init__(self, chunks: AsyncIterator[list[int]], stats: GenerationStats) -> None:
        self.stats = stats
        self.token_ids: list[int] = []
        self._it = chunks

    def __aiter__(self) -> "Generation":
        return self

    async def __anext__(self) -> list[int]:
        tokens = await self._it.__anext__()
        self.token_ids.extend(tokens)
        return tokens

    async def aclose(self) -> None:
        await self._it.aclose()

    async def collect(self) -> list[int]:
        async for _ in self:
            pass
        return self.token_ids


class EdgeClient:
    def __init__(self, config: EdgeConfig, draft: LoadedModel, hooks: "EdgeHooks | None" = None) -> None:
        self.config = config
        self.hooks = hooks  # tests only: deterministic delays around messages
        self.draft = draft
        self.fingerprint = tokenizer_fingerprint(draft.tokenizer)
        self.vocab_size = int(draft.model.config.vocab_size)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="draft-model")
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.PicoSpecStub | None = None

    async def __aenter__(self) -> "EdgeClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
        self.executor.shutdown(wait=False)

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def connect(self, wait_s: float | None = None) -> pb.InfoReply:
        """Open the channel, wait (up to wait_s) for the cloud, and check it can serve this edge."""
        if self._channel is None:
            limit = 64 * 1024 * 1024
            self._channel = grpc.aio.insecure_channel(
                self.config.server,
                options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)],
            )
            self._stub = pb_grpc.PicoSpecStub(self._channel)
        try:
            info = await self._stub.Info(pb.InfoRequest(), wait_for_ready=True,
                                         timeout=self.config.wait_ready_s if wait_s is None else wait_s)
        except grpc.aio.AioRpcError as e:
            raise EdgeError(f"cloud at {self.config.server} is not reachable: {e.details() or e.code().name}") from None
        if info.protocol_version != PROTOCOL_VERSION:
            raise EdgeError(f"cloud speaks protocol {info.protocol_version}, this edge speaks {PROTOCOL_VERSION}")
        return info

    def _hello(self, prompt_ids: Sequence[int], params: SamplingParams, cfg: EdgeConfig, verify: str) -> pb.Hello:
        return pb.Hello(
            protocol_version=PROTOCOL_VERSION,
            tokenizer=pb.TokenizerFingerprint(num_tokens=self.fingerprint.num_tokens, sha256=self.fingerprint.sha256),
            vocab_size=self.vocab_size,
            draft_model=self.draft.name,
            sampling=pb.SamplingParams(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, seed=params.seed),
            verify_mode=verify,
            prompt_ids=list(prompt_ids),
            max_new_tokens=cfg.max_new_tokens,
            ignore_eos=cfg.ignore_eos,
            residual_top_k=cfg.residual_top_k,
            tail_samples=cfg.tail_samples,
        )

    def generate(self, prompt_ids: Sequence[int], *, mode: str | None = None, **overrides: object) -> Generation:
        """Start a generation. `overrides` replace EdgeConfig fields for this call (e.g. temperature=0.7)."""
        cfg = dataclasses.replace(self.config, **overrides) if overrides else self.config
        mode = mode or cfg.mode
        if mode not in EDGE_MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(EDGE_MODES)}")
        if mode == "picospec":  # the paper's configuration, whatever else is set
            cfg = dataclasses.replace(cfg, verify="split-topk", residual_top_k=10, draft_len=4, decode_ahead="off")
        params = SamplingParams(cfg.temperature, cfg.top_k, cfg.top_p, cfg.seed)
        speculative = mode in SPECULATIVE_MODES
        if speculative and cfg.verify not in VERIFY_MODES:
            raise ValueError(f"unknown verify mode {cfg.verify!r}; choose from {', '.join(VERIFY_MODES)}")
        stats = GenerationStats(mode=mode, verify_mode=cfg.verify if speculative else None, prompt_tokens=len(prompt_ids),
                                exact=mode == "cloud" or (speculative and cfg.verify in EXACT_VERIFY_MODES))
        if mode in SPECULATIVE_MODES:
            return Generation(self._speculate(list(prompt_ids), params, cfg, stats, mode), stats)
        run = {"cloud": self._cloud, "edge": self._edge}[mode]
        return Generation(run(list(prompt_ids), params, cfg, stats), stats)

    # ---- modes -----------------------------------------------------------------------------
    async def _cloud(self, prompt: list[int], params: SamplingParams, cfg: EdgeConfig, stats: GenerationStats) -> AsyncIterator[list[int]]:
        await self.connect()
        hello = self._hello(prompt, params, cfg, "")
        stats.bytes_up += _wire_size(hello)
        call = self._stub.CloudGenerate(hello, timeout=cfg.timeout_s)
        reason = None
        try:
            async for chunk in call:
                stats.bytes_down += _wire_size(chunk)
                stats.cloud_s += chunk.decode_s
                stats.prefill_cloud_s += chunk.prefill_s
                stats.on_tokens(len(chunk.token_ids))
                yield list(chunk.token_ids)
                if chunk.finished:
                    reason = chunk.finish_reason
        except grpc.aio.AioRpcError as e:
            raise EdgeError(f"cloud refused or failed: {e.code().name}: {e.details()}") from None
        finally:
            call.cancel()
            stats.finish(reason or "cancelled")

    async def _edge(self, prompt: list[int], params: SamplingParams, cfg: EdgeConfig, stats: GenerationStats) -> AsyncIterator[list[int]]:
        drafter = Drafter(self.draft.model, params, cfg.device)
        eos = frozenset() if cfg.ignore_eos else eos_token_ids(self.draft.model, self.draft.tokenizer)
        state = SessionState(prompt, cfg.max_new_tokens, eos, drafter.vocab_size)
        stats.prefill_edge_s += await self._run(drafter.prefill, prompt)
        try:
            while state.finished is None:
                d = await self._run(drafter.draft, state.tokens, 1)
                stats.draft_s += d.compute_s
                c = state.commit((), 0, d.token_ids[0], rejected=False)
                stats.on_tokens(len(c.new_tokens))
                yield list(c.new_tokens)
        finally:
            stats.finish(state.finished.value if state.finished else "cancelled")

    async def _speculate(self, prompt: list[int], params: SamplingParams, cfg: EdgeConfig, stats: GenerationStats,
                         mode: str) -> AsyncIterator[list[int]]:
        """Speculative decoding. sync: draft a batch, send it, wait for its verdict. early-exit: the same, but
        pre-draft the next batch from the cloud's early-exit hint while waiting. pipeline and picospec: keep
        drafting while batches are in flight, apply verdicts as they arrive, start over on a dead chain."""
        info = await self.connect()
        pipelined = mode not in ("sync", "early-exit")
        hints = (cfg.hints == "on" or (cfg.hints == "auto" and mode == "early-exit")) and info.default_exit_layer > 0
        verify = cfg.verify
        g_cap = max(1, min(cfg.max_draft_len, info.max_draft_len))
        fixed = min(cfg.draft_len, info.max_draft_len) if cfg.draft_len > 0 else (None if pipelined else 4)
        greedy = params.temperature == 0.0
        decode_ahead = pipelined and (cfg.decode_ahead == "on" or (cfg.decode_ahead == "auto" and (verify == "coupled" or greedy)))
        confidence = cfg.draft_confidence if pipelined and fixed is None else 0.0
        drafter = Drafter(self.draft.model, params, cfg.device, gumbel=verify == "coupled")
        stats.drafter = drafter
        est = stats.estimates
        call = self._stub.Speculate(timeout=cfg.timeout_s)
        inbox: asyncio.Queue = asyncio.Queue()
        pump = asyncio.create_task(self._pump(call, inbox, stats))
        state: SessionState | None = None
        try:
            hello = self._hello(prompt, params, cfg, verify)
            hello.decode_ahead = decode_ahead
            if hints:
                hello.exit_layer, hello.exit_threshold = cfg.exit_layer or info.default_exit_layer, cfg.exit_threshold
                stats.exit_layer = hello.exit_layer
            await self._write(call, pb.EdgeMessage(hello=hello), stats)
            # the draft's prefill overlaps the cloud's
            stats.prefill_edge_s += await self._run(drafter.prefill, prompt)
            ready = await self._next(inbox, "ready")
            stats.prefill_cloud_s += ready.ready.prefill_s
            state = SessionState(prompt, cfg.max_new_tokens, frozenset(ready.ready.eos_token_ids), drafter.vocab_size)
            chain = EdgeChain(state)
            sends: list[tuple[int, int, float]] = []  # (first, end, time) of batches in flight, for RTT samples
            g = fixed or 4
            paused = False  # the draft lost confidence: wait for news before drafting on
            pre: PreDraft | None = None  # drafts from the context an early-exit hint expects

            def take_hint(h: pb.Hint) -> None:
                nonlocal pre
                stats.hints += 1
                if pre is not None or h.epoch != chain.epoch or not h.HasField("expected_token") or not h.verified:
                    return
                end = h.start_pos + h.expected_accepted
                context = chain.tokens
                if len(context) < end + pipelined:
                    return
                if pipelined and (h.expected_accepted == h.verified or context[end] == h.expected_token):
                    return  # the chain already continues as expected: nothing to pre-draft
                if h.expected_token in state.eos_ids:
                    return
                pre = PreDraft(h.epoch, h.start_pos, context[:end] + [h.expected_token],
                               room=state.remaining - (end + 1 - state.committed_len))

            def settle_hint(v: pb.Verdict, a: Applied) -> None:
                """After the hinted pass's verdict: if the committed context is the one the hint expected, the
                pre-drafts are exactly what we would draft now (same context, same coins): adopt them."""
                nonlocal pre
                if pre is None:
                    return
                hinted = bool(v.verified) and (v.epoch, v.start_pos) == (pre.epoch, pre.start)
                if not hinted and not a.chain_died:
                    return  # an earlier pass, or the cloud's own token: the hinted pass is still to come
                if hinted and not chain.chain and chain.tokens == pre.context:
                    stats.hint_hits += 1
                    stats.predrafted_used += len(pre.drafts)
                    chain.chain.extend(pre.drafts)
                else:
                    stats.hint_misses += 1
                    stats.wasted_draft += len(pre.drafts)
                pre = None

            async def apply(msg: pb.CloudMessage) -> list[int]:
                nonlocal paused
                kind = msg.WhichOneof("kind")
                if kind == "hint":
                    if hints:
                        take_hint(msg.hint)
                    return []
                v = msg.verdict
                now = time.perf_counter()
                a = chain.apply(start_pos=v.start_pos, verified=v.verified, accepted=v.accepted,
                                token=v.token if v.HasField("token") else None, rejected=v.rejected,
                                committed_len=v.committed_len, finished=v.finished, epoch=v.epoch)
                stats.cloud_s += v.verify_s
                stats.bubble_s += v.idle_s
                stats.wasted_draft += a.dropped
                est.verify.add(v.verified, v.verify_s)
                if v.verified:
                    stats.on_round(v.verified, a.accepted, len(a.new_tokens) + state.awaiting_resolution)
                    for _ in range(a.accepted):
                        est.acceptance.add(1.0)
                    if v.rejected:
                        est.acceptance.add(0.0)
                    last = v.start_pos + v.verified - 1
                    for first, end, t in sends:
                        if first <= last < end:
                            est.rtt_samples.append(max(0.0, now - t - v.verify_s - v.idle_s))
                    sends[:] = [x for x in sends if x[1] > last + 1]
                elif v.HasField("token"):
                    stats.cloud_tokens += 1
                    if a.from_chain or a.chain_died:  # a draft was there: it agreed with the cloud or not
                        est.acceptance.add(float(a.from_chain > 0))
                if a.chain_died:
                    sends.clear()
                    stats.dead_chains += not v.rejected
                paused = False
                if state.awaiting_resolution:
                    chain.resolved = await self._resolve(inbox, call, v, a.rejected_extra, state, cfg, stats, params.seed)
                if hints:
                    settle_hint(v, a)
                return list(a.new_tokens)

            while state.finished is None:
                while state.finished is None and not inbox.empty():
                    new = await apply(await self._next(inbox, "verdict", "hint"))
                    stats.on_tokens(len(new))
                    yield new
                if state.finished is not None:
                    break
                if fixed is None:
                    g = choose_draft_len(est, g_cap, pipelined=pipelined, allow_zero=decode_ahead, default=4)
                    steer = getattr(self.hooks, "steer_draft_len", None)
                    if steer is not None:
                        g = steer(g, state.awaiting_resolution)
                    g = g if decode_ahead else max(g, 1)  # length 0 leaves the decoding to the cloud: only with decode-ahead
                    stats.draft_len_choices[g] += 1
                budget = state.remaining - (chain.resolved is not None) - len(chain.chain)
                last_is_eos = bool(chain.chain) and chain.chain[-1].token in state.eos_ids
                ends_here = chain.resolved is not None and state.would_finish_with(chain.resolved)
                lookahead = 2 * g if pipelined else g
                can_draft = (g > 0 and budget > 0 and not last_is_eos and not ends_here and not paused and pre is None
                             and not (state.awaiting_resolution and chain.resolved is None) and len(chain.chain) < lookahead
                             and (pipelined or chain.in_flight == 0))
                pre_draft = pre is not None and len(pre.drafts) < min(max(g, 1), pre.room) and \
                    not (pre.drafts and pre.drafts[-1].token in state.eos_ids)
                if can_draft or pre_draft:
                    context = pre.tokens if pre_draft else chain.tokens
                    d = await self._run(drafter.draft, context, 1)
                    stats.draft_s += d.compute_s
                    est.draft_s.add(d.compute_s)
                    stats.drafted_total += 1
                    while state.finished is None and not inbox.empty():  # verdicts that came in while we drafted go first
                        new = await apply(await self._next(inbox, "verdict", "hint"))
                        stats.on_tokens(len(new))
                        yield new
                    if state.finished is not None:
                        break
                    made = ChainToken(d.token_ids[0], d.q[0])
                    if pre is not None and pre.tokens == context:
                        pre.drafts.append(made)  # ahead of the verdict, from the hint's context
                        continue
                    if chain.tokens != context:
                        stats.wasted_draft += 1
                        continue  # the chain moved under us: this draft continues a dead context
                    chain.chain.append(made)
                    if confidence and float(d.q[0].max()) < confidence:
                        paused = True
                unsent = len(chain.unsent)
                full = len(chain.chain) >= lookahead or budget <= 1 or (chain.chain and chain.chain[-1].token in state.eos_ids)
                # a correction the cloud waits for goes up at once when no draft will follow it now (draft length
                # 0, paused, budget spent): the cloud decodes nothing while it waits, so holding it back deadlocks
                owed_correction = chain.resolved is not None and not chain.resolved_sent and (ends_here or not can_draft)
                send = (unsent and (unsent >= g or paused or full or (pipelined and chain.in_flight == 0))) or owed_correction
                if send:
                    start, batch_tokens, resolved = chain.take_batch()
                    batch = pb.DraftBatch(epoch=chain.epoch, start_pos=start, token_ids=[c.token for c in batch_tokens],
                                          resolved_token=resolved)
                    if verify == "dense" and batch_tokens:
                        batch.q_payload = encode_probs(torch.stack([c.extra for c in batch_tokens]), compress=cfg.compress)
                    elif verify.startswith("split"):
                        batch.draft_probs.extend(float(c.extra[c.token]) for c in batch_tokens)
                    first = start + (resolved is not None)
                    if batch_tokens:
                        sends.append((first, first + len(batch_tokens), time.perf_counter()))
                    await self._write(call, pb.EdgeMessage(draft=batch), stats)
                    continue
                if not can_draft and not pre_draft:
                    new = await apply(await self._next(inbox, "verdict", "hint"))
                    stats.on_tokens(len(new))
                    yield new
            await call.done_writing()
        except (ProtocolError, PayloadError) as e:
            raise EdgeError(f"protocol error: {e}") from None
        finally:
            pump.cancel()
            if state is None or state.finished is None:
                call.cancel()
            stats.finish(state.finished.value if state and state.finished else "cancelled")
            if state is not None:
                # drafts past the committed prefix are dead once the generation ends: drop them from the cache
                self.executor.submit(drafter.backend.truncate, min(drafter.backend.length, max(0, state.committed_len - 1)))

    async def _resolve(self, inbox: asyncio.Queue, call, v: pb.Verdict, q_row: torch.Tensor | None, state: SessionState,
                       cfg: EdgeConfig, stats: GenerationStats, seed: int) -> int:
        """Split modes: sample the correction at the rejected position from the cloud's sparse view of p."""
        pos, vocab = state.committed_len, self.vocab_size
        if q_row is None:
            raise ProtocolError("a rejection at a position the edge never drafted")
        row = decode_probs(v.residual_payload, vocab_size=vocab, max_rows=1)[0]
        ids = torch.nonzero(row > 0).flatten()
        if len(ids) == 0:
            raise ProtocolError("empty top-K payload after a rejection")
        stats.on_rejection(len(v.residual_payload) + len(v.tail_payload))
        if cfg.verify == "split-topk":
            return await self._run(resample_topk, q_row, ids, row[ids], seed, pos)
        if not (math.isfinite(v.tail_mass) and 0.0 <= v.tail_mass <= 1.0):
            raise ProtocolError(f"tail mass {v.tail_mass} is not a probability")
        tail_ids, tail_vals = decode_list(v.tail_payload, vocab_size=vocab, max_len=MAX_TAIL_DRAWS) if v.tail_payload \
            else (torch.zeros(0, dtype=torch.long), torch.zeros(0))
        while True:
            hint = ResidualHint(ids, row[ids], v.tail_mass, tail_ids, tail_vals)
            try:
                return await self._run(resample_exact, q_row, hint, seed, pos)
            except NeedMoreTail as e:
                await self._write(call, pb.EdgeMessage(tail_request=pb.TailRequest(epoch=v.next_epoch, position=pos, have=e.have)), stats)
                t = (await self._next(inbox, "tail")).tail
                more_ids, more_vals = decode_list(t.payload, vocab_size=vocab, max_len=MAX_TAIL_DRAWS)
                stats.on_tail_request(len(t.payload))
                if len(more_ids) == 0 or len(tail_ids) + len(more_ids) > MAX_TAIL_DRAWS:
                    raise ProtocolError("the cloud sent no further tail draws")
                tail_ids, tail_vals = torch.cat([tail_ids, more_ids]), torch.cat([tail_vals, more_vals])

    async def _write(self, call, msg: pb.EdgeMessage, stats: GenerationStats) -> None:
        if self.hooks is not None:
            await self.hooks.before_send(msg)
        try:
            await call.write(msg)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            # the cloud ended the stream (it finished on its own, or failed): what it said last is in the
            # inbox, the final verdict or the error status, and the reader reports it
            return
        stats.bytes_up += _wire_size(msg)

    async def _pump(self, call, inbox: asyncio.Queue, stats: GenerationStats) -> None:
        """Read the cloud's messages as they come, so drafting never waits on the network."""
        try:
            while True:
                msg = await call.read()
                if msg is grpc.aio.EOF:
                    inbox.put_nowait(EdgeError("cloud closed the stream mid-generation"))
                    return
                stats.bytes_down += _wire_size(msg)
                if self.hooks is not None:
                    await self.hooks.after_receive(msg)
                inbox.put_nowait(msg)
        except grpc.aio.AioRpcError as e:
            inbox.put_nowait(EdgeError(f"cloud refused or failed: {e.code().name}: {e.details()}"))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - surfaced to the generation
            inbox.put_nowait(e)

    async def _next(self, inbox: asyncio.Queue, *expected: str) -> pb.CloudMessage:
        """The next message of one of the expected kinds. Hints are advice: dropped where none is expected."""
        while True:
            msg = await inbox.get()
            if isinstance(msg, BaseException):
                raise msg
            kind = msg.WhichOneof("kind")
            if kind == "hint" and "hint" not in expected:
                continue
            if kind not in expected:
                raise ProtocolError(f"expected {' or '.join(expected)}, got {kind}")
            return msg
