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
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Callable, Sequence, TypeVar

import grpc
import torch

from edge_client.drafter import Drafter
from shared.codec import PayloadError, decode_list, decode_probs, encode_probs
from shared.config import EDGE_MODES, EXACT_VERIFY_MODES, VERIFY_MODES, EdgeConfig
from shared.fingerprint import eos_token_ids, tokenizer_fingerprint
from shared.models import LoadedModel
from shared.protocol import PROTOCOL_VERSION, ProtocolError, SessionState
from shared.rpc import picospec_pb2 as pb
from shared.rpc import picospec_pb2_grpc as pb_grpc
from shared.sampling import SamplingParams
from shared.stats import GenerationStats
from shared.verify import NeedMoreTail, ResidualHint, resample_exact, resample_topk

MAX_TAIL_DRAWS = 4096  # per rejected position, as the cloud allows

T = TypeVar("T")
GRPC_FRAME_OVERHEAD = 5  # gRPC's length-prefixed message header; HTTP/2 and TCP/IP headers are not counted


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
    def __init__(self, config: EdgeConfig, draft: LoadedModel) -> None:
        self.config = config
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
        params = SamplingParams(cfg.temperature, cfg.top_k, cfg.top_p, cfg.seed)
        if mode == "sync" and cfg.verify not in VERIFY_MODES:
            raise ValueError(f"unknown verify mode {cfg.verify!r}; choose from {', '.join(VERIFY_MODES)}")
        stats = GenerationStats(mode=mode, verify_mode=cfg.verify if mode == "sync" else None, prompt_tokens=len(prompt_ids),
                                exact=mode == "cloud" or (mode == "sync" and cfg.verify in EXACT_VERIFY_MODES))
        run = {"cloud": self._cloud, "edge": self._edge, "sync": self._sync}[mode]
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

    async def _sync(self, prompt: list[int], params: SamplingParams, cfg: EdgeConfig, stats: GenerationStats) -> AsyncIterator[list[int]]:
        """Stop-and-wait speculative decoding: draft k, send, wait for the verdict, repeat."""
        info = await self.connect()
        mode = cfg.verify
        drafter = Drafter(self.draft.model, params, cfg.device, gumbel=mode == "coupled")
        k_max = max(1, min(cfg.draft_len, info.max_draft_len))
        call = self._stub.Speculate(timeout=cfg.timeout_s)
        state: SessionState | None = None
        try:
            hello = pb.EdgeMessage(hello=self._hello(prompt, params, cfg, mode))
            await call.write(hello)
            stats.bytes_up += _wire_size(hello)
            # the draft's prefill overlaps the cloud's
            stats.prefill_edge_s += await self._run(drafter.prefill, prompt)
            ready = await self._read(call, "ready", stats)
            stats.prefill_cloud_s += ready.ready.prefill_s
            state = SessionState(prompt, cfg.max_new_tokens, frozenset(ready.ready.eos_token_ids), drafter.vocab_size)
            resolved: int | None = None  # split modes: our correction, committed with the next verdict
            while state.finished is None:
                context = state.tokens + ([resolved] if resolved is not None else [])
                ends_here = resolved is not None and state.would_finish_with(resolved)
                k = 0 if ends_here else max(1, min(k_max, state.remaining - (resolved is not None)))
                d = await self._run(drafter.draft, context, k)
                stats.draft_s += d.compute_s
                batch = pb.DraftBatch(epoch=state.epoch, start_pos=state.committed_len, token_ids=d.token_ids,
                                      resolved_token=resolved)
                if mode == "dense":
                    batch.q_payload = encode_probs(d.q, compress=cfg.compress)
                elif mode.startswith("split"):
                    batch.draft_probs.extend(float(d.q[i, x]) for i, x in enumerate(d.token_ids))
                msg = pb.EdgeMessage(draft=batch)
                await call.write(msg)
                stats.bytes_up += _wire_size(msg)
                v = (await self._read(call, "verdict", stats)).verdict
                if v.epoch != batch.epoch or v.start_pos != batch.start_pos:
                    raise ProtocolError(f"verdict for epoch {v.epoch} at {v.start_pos}, expected {batch.epoch} at {batch.start_pos}")
                stats.cloud_s += v.verify_s
                new: list[int] = []
                if resolved is not None:
                    new += state.commit_resolved(resolved).new_tokens
                    resolved = None
                if state.finished is None:
                    c = state.commit(d.token_ids, v.accepted, v.token if v.HasField("token") else None,
                                     rejected=v.next_epoch > v.epoch)
                    new += c.new_tokens
                    stats.on_round(len(d.token_ids), c.accepted, len(c.new_tokens) + state.awaiting_resolution)
                state.check_verdict(v.epoch, v.start_pos, v.committed_len)
                if v.finished != (state.finished is not None):
                    raise ProtocolError(f"cloud says finished={v.finished}, edge derived {state.finished}")
                if state.awaiting_resolution:
                    resolved = await self._resolve(call, v, d.q[v.accepted], state, cfg, stats, params.seed)
                stats.on_tokens(len(new))
                yield new
            await call.done_writing()
        except (ProtocolError, PayloadError) as e:
            raise EdgeError(f"protocol error: {e}") from None
        finally:
            if state is None or state.finished is None:
                call.cancel()
            stats.finish(state.finished.value if state and state.finished else "cancelled")

    async def _resolve(self, call, v: pb.Verdict, q_row: torch.Tensor, state: SessionState, cfg: EdgeConfig,
                       stats: GenerationStats, seed: int) -> int:
        """Split modes: sample the correction at the rejected position from the cloud's sparse view of p."""
        pos, vocab = state.committed_len, self.vocab_size
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
                req = pb.EdgeMessage(tail_request=pb.TailRequest(epoch=state.epoch, position=pos, have=e.have))
                await call.write(req)
                stats.bytes_up += _wire_size(req)
                t = (await self._read(call, "tail", stats)).tail
                more_ids, more_vals = decode_list(t.payload, vocab_size=vocab, max_len=MAX_TAIL_DRAWS)
                stats.on_tail_request(len(t.payload))
                if len(more_ids) == 0 or len(tail_ids) + len(more_ids) > MAX_TAIL_DRAWS:
                    raise ProtocolError("the cloud sent no further tail draws")
                tail_ids, tail_vals = torch.cat([tail_ids, more_ids]), torch.cat([tail_vals, more_vals])

    async def _read(self, call, expected: str, stats: GenerationStats) -> pb.CloudMessage:
        try:
            msg = await call.read()
        except grpc.aio.AioRpcError as e:
            raise EdgeError(f"cloud refused or failed: {e.code().name}: {e.details()}") from None
        if msg is grpc.aio.EOF:
            raise EdgeError(f"cloud closed the stream while the edge waited for {expected}")
        stats.bytes_down += _wire_size(msg)
        if msg.WhichOneof("kind") != expected:
            raise ProtocolError(f"expected {expected}, got {msg.WhichOneof('kind')}")
        return msg
