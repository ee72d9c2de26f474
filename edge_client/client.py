"""The edge client: a Python API over the cloud's gRPC service and the local draft model.

    client = EdgeClient(EdgeConfig(server="host:50051"), draft=load_model("..."))
    gen = client.generate(prompt_ids, mode="sync")
    async for tokens in gen:        # committed token ids, as soon as the cloud commits them
        ...
    print(gen.stats.to_dict())      # the metrics of docs/design.md §7

Every model step runs in a one-thread executor so the event loop keeps sending and receiving.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Callable, Sequence, TypeVar

import grpc

from picospec.edge_client.drafter import Drafter
from picospec.edge_client.policy import plan_session
from picospec.edge_client.resume import (RejoinState, after_draft_token, break_action, chunk_source,
                                         finished_before_break, gave_up_message, piece_connect_s, rejoin_budget_s,
                                         resume_plan)
from picospec.edge_client.session import EdgeSession
from picospec.edge_client.stats import GenerationStats
from picospec.edge_client.text import TextStream
from picospec.edge_client.transport import (CloudLost, CloudUnreachable, EdgeError, EdgeHooks, StreamTransport,
                                            call_error, open_channel, wait_for_cloud, wire_size)
from picospec.edge_client.tree_builder import MAX_TREE_NODES_GROWN
from picospec.edge_client.waiting import WaitProgress, admission_delay_s
from picospec.shared.config import SPECULATIVE_MODES, EdgeConfig, check_edge_config, with_mode_preset
from picospec.shared.connection import server_target, token_metadata
from picospec.shared.fingerprint import (Fingerprint, eos_token_ids, session_logits_width, tokenizer_fingerprint,
                                        tokenizer_mismatch)
from picospec.shared.models import LoadedModel
from picospec.shared.protocol import PROTOCOL_VERSION, SessionState
from picospec.shared.rpc import picospec_pb2 as pb
from picospec.shared.rpc import picospec_pb2_grpc as pb_grpc
from picospec.shared.sampling import SamplingParams
from picospec.shared.schemes import scheme

__all__ = ["CloudLost", "EdgeClient", "EdgeError", "EdgeHooks", "Generation"]
T = TypeVar("T")
log = logging.getLogger("picospec.edge")
Piece = Callable[..., AsyncIterator[list[int]]]  # piece(prompt_ids, cfg=...): one session's committed tokens


class Generation:
    """An async iterator of committed token-id lists; `stats`, `token_ids` and `text` are complete once it ends.

    With stop strings, the iteration ends at the token that completed one: that chunk is cut after it, the
    session is closed (the cloud frees it) and `stats.finish_reason` is "stop". `text_delta` is the text the last
    chunk released (edge_client/text.py says what is held back and why); `stream_text()` yields only text.

    Provenance: `last_chunk_source` is "cloud" when the last chunk's tokens were verified or decoded by the target,
    "draft" when the draft made them alone (`edge` mode, or while the cloud was unreachable under --on-partition
    edge); `draft_spans` lists the [start, end) positions of `token_ids` the draft made alone during partitions.
    """

    def __init__(self, chunks: AsyncIterator[list[int]], stats: GenerationStats, text: TextStream,
                 sessions: list | None = None) -> None:
        self.stats = stats
        self.token_ids: list[int] = []
        self.text_delta = ""
        self.last_chunk_source: str | None = None  # "cloud" or "draft", once a chunk has arrived
        self._text = text
        self._it = chunks
        self._done = False
        self._sessions = sessions if sessions is not None else []  # the speculative session, once it has started

    @property
    def text(self) -> str:
        """The released text: after the end, the whole text (without the stop string)."""
        return self._text.released

    @property
    def draft_spans(self) -> list[tuple[int, int]]:
        """[start, end) positions of `token_ids` the draft made alone while the cloud was unreachable."""
        return list(self.stats.draft_only_spans)

    def describe(self) -> dict[str, object]:
        """The protocol state now (epoch, positions, what each side awaits): for hang reports and debugging."""
        if not self._sessions:
            return {"phase": "not started" if self.stats.finished_at is None else "finished", "mode": self.stats.mode}
        return self._sessions[-1].describe()

    def __aiter__(self) -> "Generation":
        return self

    async def __anext__(self) -> list[int]:
        if self._done:
            self.text_delta = ""
            raise StopAsyncIteration
        try:
            tokens = await self._it.__anext__()
        except StopAsyncIteration:
            self._done = True
            self.text_delta = self._text.finish()
            raise
        self.text_delta = self._text.push(tokens)
        if self._text.stopped:
            tokens = tokens[: self._text.tokens_kept]
            self._done = True
            await self._it.aclose()             # ends the session: the cloud frees it
            self.stats.finish("stop")
        start = len(self.token_ids)
        self.token_ids.extend(tokens)
        self.last_chunk_source = ("draft" if self.stats.mode == "edge"
                                  else chunk_source(self.stats.draft_only_spans, start, len(self.token_ids)))
        if self._done:  # what the session committed past the stop (in this chunk or while closing) was never given
            self.stats.drop_tail(self.stats.generated - len(self.token_ids))
        return tokens

    async def stream_text(self) -> AsyncIterator[str]:
        """The released text, piece by piece, to the end (held text included once the generation ends)."""
        async for _ in self:
            if self.text_delta:
                yield self.text_delta
        if self.text_delta:  # what the natural end released
            yield self.text_delta
            self.text_delta = ""

    async def aclose(self) -> None:
        self._done = True
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
        self.logits_width = self.vocab_size  # the cloud's, once connected (shared/fingerprint.py:session_logits_width)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="draft-model")
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.PicoSpecStub | None = None
        self._info_channel: grpc.aio.Channel | None = None  # several replicas: Info's own channel (connect)
        self._metadata = token_metadata(config.token)  # sent with every call (cloud_server/auth.py checks it)

    async def __aenter__(self) -> "EdgeClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for channel in (self._channel, self._info_channel):
            if channel is not None:
                await channel.close()
        self._channel = self._info_channel = None
        self.executor.shutdown(wait=False)

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def connect(self, wait_s: float | None = None,
                      on_retry: Callable[[WaitProgress], None] | None = None) -> pb.InfoReply:
        """Open the channel, wait (up to wait_s, default --wait-ready-s) for the cloud, and check it can serve this
        edge (edge_client/transport.py:wait_for_cloud)."""
        if self._channel is None:
            target = server_target(self.config.server)  # parsed and resolved once for both channels
            self._channel = open_channel(self.config, target)
            self._stub = pb_grpc.PicoSpecStub(self._channel)
            # several replicas (round_robin, one pick per call): Info on a channel of its own, or with two replicas
            # the Info before each session would take every other pick and every session would go to one replica
            if target.balanced:
                self._info_channel = open_channel(self.config, target)
        info_stub = pb_grpc.PicoSpecStub(self._info_channel) if self._info_channel is not None else self._stub
        budget = self.config.wait_ready_s if wait_s is None else wait_s
        info = await wait_for_cloud(info_stub, self.config.server, budget, on_retry, self._metadata)
        if info.protocol_version != PROTOCOL_VERSION:
            raise EdgeError(f"cloud speaks protocol {info.protocol_version}, this edge speaks {PROTOCOL_VERSION}")
        theirs = Fingerprint(info.tokenizer.num_tokens, info.tokenizer.sha256)
        mismatch = tokenizer_mismatch(self.draft.name, self.fingerprint, info.target_model, self.config.server, theirs)
        if mismatch:  # said here, before any generation: the cloud would refuse each one anyway
            raise EdgeError(mismatch)
        try:
            self.logits_width = session_logits_width(self.vocab_size, info.vocab_size, self.fingerprint.num_tokens)
        except ValueError as e:
            raise EdgeError(f"the draft {self.draft.name!r} cannot draft for {info.target_model!r}: {e}") from None
        return info

    def _hello(self, prompt_ids: Sequence[int], params: SamplingParams, cfg: EdgeConfig, verify: str) -> pb.Hello:
        return pb.Hello(
            protocol_version=PROTOCOL_VERSION,
            tokenizer=pb.TokenizerFingerprint(num_tokens=self.fingerprint.num_tokens, sha256=self.fingerprint.sha256),
            vocab_size=self.logits_width,
            draft_model=self.draft.name,
            sampling=pb.SamplingParams(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, seed=params.seed),
            verify_mode=verify,
            prompt_ids=list(prompt_ids),
            max_new_tokens=cfg.max_new_tokens,
            ignore_eos=cfg.ignore_eos,
            residual_top_k=cfg.residual_top_k,
            tail_samples=cfg.tail_samples,
        )

    def generate(self, prompt_ids: Sequence[int], *, mode: str | None = None, stop: Sequence[str] = (),
                 resume_from: Sequence[int] = (), **overrides: object) -> Generation:
        """Start a generation. `stop`: stop strings (edge_client/text.py); `overrides` replace EdgeConfig fields for
        this call (e.g. temperature=0.7). `resume_from`: tokens this generation already produced (kept by the
        caller from an earlier, interrupted run with the same settings): it goes on from them exactly as the
        uninterrupted run would have (edge_client/resume.py), yields only the tokens after them, and
        `max_new_tokens` counts them. Stop strings are looked for in the new text only."""
        text = TextStream(self.draft.tokenizer, stop)
        cfg = dataclasses.replace(self.config, **overrides) if overrides else self.config
        mode = mode or cfg.mode
        check_edge_config(dataclasses.replace(cfg, mode=mode), one_mode=True)  # ConfigError naming the field
        cfg = with_mode_preset(mode, cfg)
        if len(resume_from) >= cfg.max_new_tokens:
            raise ValueError(f"resume_from holds {len(resume_from)} tokens: nothing left of max_new_tokens "
                             f"{cfg.max_new_tokens}")
        params = SamplingParams(cfg.temperature, cfg.top_k, cfg.top_p, cfg.seed)
        speculative = mode in SPECULATIVE_MODES
        stats = GenerationStats(mode=mode, verify_mode=cfg.verify if speculative else None, prompt_tokens=len(prompt_ids),
                                exact=mode == "cloud" or (speculative and scheme(cfg.verify).exact))
        if mode == "edge":
            if resume_from:
                raise ValueError("resume_from needs the cloud (the draft alone has nothing to resume exactly)")
            return Generation(self._edge(list(prompt_ids), params, cfg, stats), stats, text)
        sessions: list = []
        if mode == "cloud":
            session = functools.partial(self._cloud, params=params, stats=stats)
        else:
            session = functools.partial(self._speculate, params=params, stats=stats, mode=mode, session_box=sessions)
        piece = functools.partial(self._admitted, session, stats=stats)
        chunks = self._resuming(piece, list(prompt_ids), params, cfg, stats, list(resume_from))
        return Generation(_finished_on_exit(chunks, stats), stats, text, sessions)

    # ---- resume (edge_client/resume.py) ---------------------------------------------------------
    async def _resuming(self, piece: Piece, prompt: list[int], params: SamplingParams, cfg: EdgeConfig,
                        stats: GenerationStats, committed: list[int]) -> AsyncIterator[list[int]]:
        """Run the generation as pieces, the first from `committed` (the caller's resume_from, usually empty). When
        the connection breaks (CloudLost), --on-partition says what follows (resume.break_action): `wait`
        reconnects for up to --reconnect-s and goes on from the tokens already yielded with the remaining budget;
        `edge` lets the draft go on alone meanwhile (_without_cloud), then goes on the same way from every token so
        far, draft-only ones included, or ends with the draft's tokens. Other failures end it."""
        resumed_from = len(committed)  # tokens the caller had before this generation: not in its stats or output
        lost_at: float | None = None  # when the current outage began
        while True:
            piece_prompt, remaining = resume_plan(prompt, committed, cfg.max_new_tokens)
            piece_cfg = dataclasses.replace(cfg, max_new_tokens=remaining, wait_ready_s=piece_connect_s(
                cfg.on_partition, cfg.wait_ready_s, lost_at, cfg.reconnect_s, time.perf_counter()))
            try:
                async with contextlib.aclosing(piece(piece_prompt, cfg=piece_cfg)) as chunks:
                    async for tokens in chunks:
                        self._recovered(stats, lost_at)
                        lost_at = None
                        committed += tokens
                        yield tokens
                self._recovered(stats, lost_at)
                return
            except (CloudLost, CloudUnreachable) as lost:
                if isinstance(lost, CloudUnreachable) and lost_at is None:
                    raise  # not up at the start: --wait-ready-s said so; after a break it is the outage going on
                yielded = len(committed) - resumed_from
                finished = finished_before_break(stats.finish_reason) and stats.generated == yielded
                action = break_action(cfg.on_partition, cfg.reconnect_s, finished)
                if action == "fail":
                    raise
                if action == "done":
                    self._recovered(stats, lost_at)
                    return
                stats.drop_tail(stats.generated - yielded)  # committed there, never yielded: made again
                lost_at, broken = (lost_at if lost_at is not None else time.perf_counter()), lost
            if action == "wait":
                await self._reconnect(broken, rejoin_budget_s(cfg.reconnect_s, lost_at, time.perf_counter()), cfg,
                                      len(committed))
            else:
                prefix, left = resume_plan(prompt, committed, cfg.max_new_tokens)
                alone = self._without_cloud(broken, prefix, params, dataclasses.replace(cfg, max_new_tokens=left),
                                            stats, lost_at)
                async with contextlib.aclosing(alone) as chunks:
                    async for tokens in chunks:
                        done = len(committed) - resumed_from
                        stats.on_draft_only(done, done + len(tokens))
                        committed += tokens
                        yield tokens
                if finished_before_break(stats.finish_reason):  # the draft finished the generation
                    self._recovered(stats, lost_at)
                    return
            stats.reconnects += 1

    async def _without_cloud(self, lost: EdgeError, prefix: list[int], params: SamplingParams, cfg: EdgeConfig,
                             stats: GenerationStats, lost_at: float) -> AsyncIterator[list[int]]:
        """The draft alone while the cloud is unreachable (--on-partition edge): `edge` mode's loop from `prefix`
        (prompt + every token so far) with cfg.max_new_tokens left, while a task reconnects for what is left of
        --reconnect-s. The draft never waits on the network: the task runs beside it, and the loop only looks at
        how it stands between tokens. Ends when the draft has finished the generation, or after the token in hand
        once the task has connected (the caller then resumes speculation)."""
        budget = rejoin_budget_s(cfg.reconnect_s, lost_at, time.perf_counter())
        log.warning("%s; the draft goes on alone (output not exact) while reconnecting for %.0f s (--on-partition "
                    "edge)", lost, budget)
        rejoin = asyncio.create_task(self._reconnect(lost, budget, cfg, stats.generated)) if budget > 0 else None
        if rejoin is not None:
            rejoin.add_done_callback(_say_rejoin_outcome)
        try:
            async with contextlib.aclosing(self._edge(prefix, params, cfg, stats,
                                                      rejoin=functools.partial(_rejoin_state, rejoin))) as chunks:
                async for tokens in chunks:
                    yield tokens
        finally:
            if rejoin is not None and not rejoin.done():
                rejoin.cancel()
                with contextlib.suppress(asyncio.CancelledError, EdgeError):
                    await rejoin

    async def _admitted(self, session: Piece, prompt: list[int], *, cfg: EdgeConfig,
                        stats: GenerationStats) -> AsyncIterator[list[int]]:
        """One session, asked for again while a full cloud refuses it (RESOURCE_EXHAUSTED before any token) at the
        interval the cloud hints, for up to --admission-wait-s, saying so each time; then the refusal stands."""
        deadline = time.perf_counter() + cfg.admission_wait_s
        attempt = 0
        while True:
            started = False
            try:
                async with contextlib.aclosing(session(prompt, cfg=cfg)) as chunks:
                    async for tokens in chunks:
                        started = True
                        yield tokens
                return
            except EdgeError as e:
                left = deadline - time.perf_counter()
                if started or e.status != "RESOURCE_EXHAUSTED" or left <= 0:
                    raise
                attempt += 1
                delay = admission_delay_s(attempt, e.retry_after_s, left, random.uniform(0.8, 1.2))
                log.warning("%s; asking again in %.1f s (--admission-wait-s)", e, delay)
                stats.admission_retries += 1
                stats.admission_wait_s += delay
                await asyncio.sleep(delay)

    @staticmethod
    def _recovered(stats: GenerationStats, lost_at: float | None) -> None:
        """Count the time lost to an outage once the first token (or the end) after it arrived."""
        if lost_at is not None:
            stats.reconnect_s += time.perf_counter() - lost_at

    async def _reconnect(self, lost: EdgeError, budget_s: float, cfg: EdgeConfig, committed: int) -> None:
        """Connect again within budget_s. A refusal or failed TLS handshake from a cloud that served this edge a
        moment ago is taken as the cloud restarting (or frozen with its port open): retried, not final."""
        deadline = time.perf_counter() + max(0.0, budget_s)
        while True:
            try:
                await self.connect(wait_s=max(0.0, deadline - time.perf_counter()))
                return
            except CloudUnreachable as e:
                raise CloudLost(gave_up_message(self.config.server, cfg.reconnect_s, str(lost), e.progress, committed),
                                lost.status) from None
            except EdgeError as e:
                if time.perf_counter() >= deadline:
                    raise CloudLost(f"lost the connection to the cloud at {self.config.server} after {committed} "
                                    f"tokens and could not resume within --reconnect-s {cfg.reconnect_s:g} s: {e}; "
                                    f"the break: {lost}", lost.status) from None
                await asyncio.sleep(min(1.0, max(0.0, deadline - time.perf_counter())))

    # ---- modes -----------------------------------------------------------------------------
    async def _cloud(self, prompt: list[int], params: SamplingParams, cfg: EdgeConfig, stats: GenerationStats) -> AsyncIterator[list[int]]:
        await self.connect(wait_s=cfg.wait_ready_s)
        hello = self._hello(prompt, params, cfg, "")
        stats.bytes_up += wire_size(hello)
        call = self._stub.CloudGenerate(hello, timeout=cfg.deadline_s(len(prompt)), metadata=self._metadata)
        reason = None
        try:
            async for chunk in call:
                stats.bytes_down += wire_size(chunk)
                stats.cloud_s += chunk.decode_s
                stats.prefill_cloud_s += chunk.prefill_s
                stats.on_tokens(len(chunk.token_ids), ["cloud"] * len(chunk.token_ids))
                if chunk.finished:
                    reason = chunk.finish_reason
                yield list(chunk.token_ids)
                if reason:
                    break  # the last token: not waiting for the call's status (the cloud settles on its own)
        except grpc.aio.AioRpcError as e:
            raise call_error(self.config.server, e, self.config.peer_timeout_s) from None
        finally:
            call.cancel()
            stats.finish(reason or "cancelled")

    async def _edge(self, prompt: list[int], params: SamplingParams, cfg: EdgeConfig, stats: GenerationStats,
                    rejoin: Callable[[], RejoinState] = lambda: "gave_up") -> AsyncIterator[list[int]]:
        """The draft decodes alone, one token per chunk: `edge` mode, and the draft-only stretch of a partition,
        where `rejoin` says how the background reconnect stands and a connected one ends the stretch
        (resume.after_draft_token)."""
        drafter = Drafter(self.draft.model, params, cfg.device, n_ctx=len(prompt) + cfg.max_new_tokens + 1)
        eos = frozenset() if cfg.ignore_eos else eos_token_ids(self.draft.model, self.draft.tokenizer)
        state = SessionState(prompt, cfg.max_new_tokens, eos, drafter.vocab_size)
        stats.prefill_edge_s += await self._run(drafter.prefill, prompt)
        try:
            while after_draft_token(state.finished is not None, rejoin()) == "draft":
                d = await self._run(drafter.draft, state.tokens, 1)
                stats.draft_s += d.compute_s
                c = state.commit((), 0, d.token_ids[0], rejected=False)
                stats.on_tokens(len(c.new_tokens), ["edge"])
                yield list(c.new_tokens)
        finally:
            stats.finish(state.finished.value if state.finished else "cancelled")

    async def _speculate(self, prompt: list[int], params: SamplingParams, cfg: EdgeConfig, stats: GenerationStats,
                         mode: str, session_box: list) -> AsyncIterator[list[int]]:
        """Speculative decoding (sync, early-exit, pipeline, picospec): one EdgeSession over one Speculate stream."""
        info = await self.connect(wait_s=cfg.wait_ready_s)
        verify_scheme = scheme(cfg.verify)
        plan = plan_session(mode, scheme=verify_scheme, greedy=params.temperature == 0.0, draft_len=cfg.draft_len,
                            max_draft_len=cfg.max_draft_len, decode_ahead=cfg.decode_ahead, hints=cfg.hints,
                            draft_confidence=cfg.draft_confidence, cloud_max_draft_len=info.max_draft_len,
                            cloud_exit_layer=info.default_exit_layer, tree_budget=cfg.tree_budget)
        tree_room = MAX_TREE_NODES_GROWN if plan.tree_budget else 0  # a tree's nodes sit in the draft's cache too
        drafter = Drafter(self.draft.model, params, cfg.device, gumbel=verify_scheme.gumbel_drafts,
                          logits_width=self.logits_width,
                          n_ctx=len(prompt) + cfg.max_new_tokens + 4 * cfg.max_draft_len + tree_room + 64)
        stats.drafter = drafter
        hello = self._hello(prompt, params, cfg, cfg.verify)
        hello.decode_ahead = plan.decode_ahead
        # the first token at once, for a fresh generation only: a resumed piece (its prompt holds tokens already
        # generated) has its first position verified as the broken session would have, with the same coins
        hello.first_token = len(prompt) == stats.prompt_tokens
        if plan.hints:
            hello.exit_layer, hello.exit_threshold = cfg.exit_layer or info.default_exit_layer, cfg.exit_threshold
            stats.exit_layer = hello.exit_layer
        call = self._stub.Speculate(timeout=cfg.deadline_s(len(prompt)), metadata=self._metadata)
        transport = StreamTransport(call, stats, self.hooks, self.config.server, self.config.peer_timeout_s)
        session = EdgeSession(hello=hello, plan=plan, cfg=cfg, stats=stats, drafter=drafter, transport=transport,
                              run_model=self._run, executor=self.executor, hooks=self.hooks)
        session_box.append(session)
        # closed with this generator, not later by the garbage collector: its `finally` ends the call (the cloud
        # frees the session) and records the finish before Generation reads or overrides it
        async with contextlib.aclosing(session.run()) as tokens_stream:
            async for tokens in tokens_stream:
                yield tokens



async def _finished_on_exit(chunks: AsyncIterator[list[int]], stats: GenerationStats) -> AsyncIterator[list[int]]:
    """`chunks`, with the stats finished as "cancelled" where the generation ended before any session recorded its
    end: cancelled or failed while connecting or waiting for admission (a session records its own end, any end)."""
    try:
        async with contextlib.aclosing(chunks) as it:
            async for tokens in it:
                yield tokens
    finally:
        if stats.finished_at is None:
            stats.finish("cancelled")


def _rejoin_state(task: "asyncio.Task[None] | None") -> RejoinState:
    """How a background reconnect stands: still trying, connected (the task returned), or given up (it raised, or
    there was none: --reconnect-s already spent)."""
    if task is None:
        return "gave_up"
    if not task.done():
        return "trying"
    return "gave_up" if task.cancelled() or task.exception() is not None else "connected"


def _say_rejoin_outcome(task: "asyncio.Task[None]") -> None:
    """Tell the user (the log, stderr in the CLI) how the background reconnect of a partition ended."""
    if task.cancelled():
        return
    if task.exception() is not None:
        log.warning("%s; the draft finishes the generation alone", task.exception())
    else:
        log.warning("the cloud is reachable again: speculation resumes from the tokens so far")
