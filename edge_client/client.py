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
import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Callable, Sequence, TypeVar

import grpc

from picospec.edge_client.drafter import Drafter
from picospec.edge_client.policy import plan_session
from picospec.edge_client.session import EdgeSession
from picospec.edge_client.waiting import ATTEMPT_TIMEOUT_S, WaitProgress, retry_delay_s
from picospec.edge_client.transport import CloudLost, EdgeError, EdgeHooks, StreamTransport, call_error, wire_size
from picospec.shared.config import EDGE_MODES, SPECULATIVE_MODES, VERIFY_MODES, EdgeConfig, with_mode_preset
from picospec.shared.fingerprint import eos_token_ids, tokenizer_fingerprint
from picospec.shared.models import LoadedModel
from picospec.shared.protocol import PROTOCOL_VERSION, SessionState
from picospec.shared.rpc import picospec_pb2 as pb
from picospec.shared.rpc import picospec_pb2_grpc as pb_grpc
from picospec.shared.sampling import SamplingParams
from picospec.shared.schemes import scheme
from picospec.shared.stats import GenerationStats

__all__ = ["CloudLost", "EdgeClient", "EdgeError", "EdgeHooks", "Generation"]
T = TypeVar("T")


class Generation:
    """An async iterator of committed token-id lists; `stats` and `token_ids` are complete once it ends."""

    def __init__(self, chunks: AsyncIterator[list[int]], stats: GenerationStats, sessions: list | None = None) -> None:
        self.stats = stats
        self.token_ids: list[int] = []
        self._it = chunks
        self._sessions = sessions if sessions is not None else []  # the speculative session, once it has started

    def describe(self) -> dict[str, object]:
        """The protocol state now (epoch, positions, what each side awaits): for hang reports and debugging."""
        if not self._sessions:
            return {"phase": "not started" if self.stats.finished_at is None else "finished", "mode": self.stats.mode}
        return self._sessions[-1].describe()

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

    async def connect(self, wait_s: float | None = None,
                      on_retry: Callable[[WaitProgress], None] | None = None) -> pb.InfoReply:
        """Open the channel, wait (up to wait_s, default --wait-ready-s) for the cloud, and check it can serve this
        edge. Each attempt fails fast while nothing listens, so `on_retry` hears about every failed one at once."""
        self._open_channel()
        budget = self.config.wait_ready_s if wait_s is None else wait_s
        started, attempts, last_error = time.monotonic(), 0, ""
        while True:
            attempts += 1
            left = budget - (time.monotonic() - started)
            try:
                info = await self._stub.Info(pb.InfoRequest(), timeout=max(0.05, min(left, ATTEMPT_TIMEOUT_S)))
                break
            except grpc.aio.AioRpcError as e:
                last_error = e.details() or e.code().name
            progress = WaitProgress(self.config.server, attempts, time.monotonic() - started, last_error)
            if progress.elapsed_s >= budget:
                raise EdgeError(progress.give_up_message())
            if on_retry is not None:
                on_retry(progress)
            await asyncio.sleep(min(retry_delay_s(attempts), budget - progress.elapsed_s))
        if info.protocol_version != PROTOCOL_VERSION:
            raise EdgeError(f"cloud speaks protocol {info.protocol_version}, this edge speaks {PROTOCOL_VERSION}")
        return info

    def _open_channel(self) -> None:
        if self._channel is not None:
            return
        # receive: the cloud's messages are small (verdicts, residuals), 64 MiB bounds a hostile one. Send: gRPC's
        # default, unlimited: what the cloud accepts is its own limit, which admits every batch its
        # max_draft_len allows (cloud_server/server.py:message_limit); a local cap would only add a failure.
        # Reconnect backoff capped at 2 s (gRPC's default grows to 120 s): a cloud that comes up is seen at once.
        self._channel = grpc.aio.insecure_channel(self.config.server, options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024), ("grpc.initial_reconnect_backoff_ms", 250),
            ("grpc.min_reconnect_backoff_ms", 250), ("grpc.max_reconnect_backoff_ms", 2000)])
        self._stub = pb_grpc.PicoSpecStub(self._channel)

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
        cfg = with_mode_preset(mode, cfg)
        params = SamplingParams(cfg.temperature, cfg.top_k, cfg.top_p, cfg.seed)
        speculative = mode in SPECULATIVE_MODES
        if speculative and cfg.verify not in VERIFY_MODES:
            raise ValueError(f"unknown verify mode {cfg.verify!r}; choose from {', '.join(VERIFY_MODES)}")
        stats = GenerationStats(mode=mode, verify_mode=cfg.verify if speculative else None, prompt_tokens=len(prompt_ids),
                                exact=mode == "cloud" or (speculative and scheme(cfg.verify).exact))
        if mode in SPECULATIVE_MODES:
            sessions: list = []
            return Generation(self._speculate(list(prompt_ids), params, cfg, stats, mode, sessions), stats, sessions)
        run = {"cloud": self._cloud, "edge": self._edge}[mode]
        return Generation(run(list(prompt_ids), params, cfg, stats), stats)

    # ---- modes -----------------------------------------------------------------------------
    async def _cloud(self, prompt: list[int], params: SamplingParams, cfg: EdgeConfig, stats: GenerationStats) -> AsyncIterator[list[int]]:
        await self.connect()
        hello = self._hello(prompt, params, cfg, "")
        stats.bytes_up += wire_size(hello)
        call = self._stub.CloudGenerate(hello, timeout=cfg.deadline_s(len(prompt)))
        reason = None
        try:
            async for chunk in call:
                stats.bytes_down += wire_size(chunk)
                stats.cloud_s += chunk.decode_s
                stats.prefill_cloud_s += chunk.prefill_s
                stats.on_tokens(len(chunk.token_ids))
                yield list(chunk.token_ids)
                if chunk.finished:
                    reason = chunk.finish_reason
        except grpc.aio.AioRpcError as e:
            raise call_error(self.config.server, e) from None
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
                         mode: str, session_box: list) -> AsyncIterator[list[int]]:
        """Speculative decoding (sync, early-exit, pipeline, picospec): one EdgeSession over one Speculate stream."""
        info = await self.connect()
        verify_scheme = scheme(cfg.verify)
        plan = plan_session(mode, scheme=verify_scheme, greedy=params.temperature == 0.0, draft_len=cfg.draft_len,
                            max_draft_len=cfg.max_draft_len, decode_ahead=cfg.decode_ahead, hints=cfg.hints,
                            draft_confidence=cfg.draft_confidence, cloud_max_draft_len=info.max_draft_len,
                            cloud_exit_layer=info.default_exit_layer)
        drafter = Drafter(self.draft.model, params, cfg.device, gumbel=verify_scheme.gumbel_drafts)
        stats.drafter = drafter
        hello = self._hello(prompt, params, cfg, cfg.verify)
        hello.decode_ahead = plan.decode_ahead
        if plan.hints:
            hello.exit_layer, hello.exit_threshold = cfg.exit_layer or info.default_exit_layer, cfg.exit_threshold
            stats.exit_layer = hello.exit_layer
        transport = StreamTransport(self._stub.Speculate(timeout=cfg.deadline_s(len(prompt))), stats, self.hooks,
                                    self.config.server)
        session = EdgeSession(hello=hello, plan=plan, cfg=cfg, stats=stats, drafter=drafter, transport=transport,
                              run_model=self._run, executor=self.executor, hooks=self.hooks)
        session_box.append(session)
        async for tokens in session.run():
            yield tokens

