"""The cloud gRPC service: handshake checks, sessions, and the stream loop. Model work runs off the event loop."""
from __future__ import annotations

import asyncio
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Callable, TypeVar

import grpc
from google.protobuf.message import DecodeError

from cloud_server.session import TargetSession
from shared.codec import PayloadError
from shared.config import CloudConfig
from shared.fingerprint import Fingerprint, eos_token_ids, tokenizer_fingerprint
from shared.models import LoadedModel
from shared.protocol import PROTOCOL_VERSION, BatchStatus, ProtocolError, SessionState
from shared.rpc import picospec_pb2 as pb
from shared.rpc import picospec_pb2_grpc as pb_grpc
from shared.sampling import SamplingParams

log = logging.getLogger("picospec.cloud")
T = TypeVar("T")


class Refusal(Exception):
    """A request we refuse, with the gRPC status to refuse it with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class PicoSpecService(pb_grpc.PicoSpecServicer):
    def __init__(self, target: LoadedModel, config: CloudConfig) -> None:
        self.target = target
        self.config = config
        self.vocab_size = int(target.model.config.vocab_size)
        self.fingerprint = tokenizer_fingerprint(target.tokenizer)
        self.eos_ids = eos_token_ids(target.model, target.tokenizer)
        # one model, one executor thread: model steps of all sessions are serialised, the loop stays free
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="target-model")
        self.active_sessions = 0

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # ---- handshake -------------------------------------------------------------------------
    def _open_session(self, hello: pb.Hello, *, speculative: bool) -> tuple[SessionState, SamplingParams]:
        if hello.protocol_version != PROTOCOL_VERSION:
            raise Refusal(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"protocol version mismatch: edge speaks {hello.protocol_version}, cloud speaks {PROTOCOL_VERSION}",
            )
        edge_fp = Fingerprint(hello.tokenizer.num_tokens, hello.tokenizer.sha256)
        if edge_fp != self.fingerprint:
            raise Refusal(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"tokenizer mismatch: edge has {edge_fp.short()}, cloud target {self.config.target!r} has "
                f"{self.fingerprint.short()}; draft and target must share a tokenizer",
            )
        if speculative and hello.vocab_size != self.vocab_size:
            raise Refusal(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"vocabulary width mismatch: draft logits have {hello.vocab_size} entries, target {self.vocab_size}",
            )
        if speculative and hello.verify_mode not in self.config.offered_modes:
            raise Refusal(
                grpc.StatusCode.UNIMPLEMENTED,
                f"verify mode {hello.verify_mode!r} is not offered; this cloud offers {', '.join(self.config.offered_modes)}",
            )
        if hello.residual_top_k > self.config.max_residual_top_k or hello.tail_samples > self.config.max_tail_samples:
            raise Refusal(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"residual_top_k <= {self.config.max_residual_top_k} and tail_samples <= {self.config.max_tail_samples} required",
            )
        try:
            s = hello.sampling
            params = SamplingParams(s.temperature, s.top_k, s.top_p, s.seed)
        except ValueError as e:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"bad sampling settings: {e}") from None
        limits = self.config
        if not 1 <= hello.max_new_tokens <= limits.max_new_tokens:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"max_new_tokens must be in 1..{limits.max_new_tokens}")
        if not 1 <= len(hello.prompt_ids) <= limits.max_context - hello.max_new_tokens:
            raise Refusal(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"prompt of {len(hello.prompt_ids)} tokens + {hello.max_new_tokens} new exceeds the context "
                f"limit of {limits.max_context} (or the prompt is empty)",
            )
        eos = frozenset() if hello.ignore_eos else (frozenset(hello.eos_token_ids) or self.eos_ids)
        try:
            state = SessionState(list(hello.prompt_ids), hello.max_new_tokens, eos, self.vocab_size)
            state.check_ids(sorted(eos), "eos_token_ids")
        except ProtocolError as e:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        if self.active_sessions >= limits.max_sessions:
            raise Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, f"server is at its limit of {limits.max_sessions} sessions")
        return state, params

    # ---- RPCs ------------------------------------------------------------------------------
    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoReply:
        return pb.InfoReply(
            protocol_version=PROTOCOL_VERSION,
            target_model=self.config.target,
            vocab_size=self.vocab_size,
            tokenizer=pb.TokenizerFingerprint(num_tokens=self.fingerprint.num_tokens, sha256=self.fingerprint.sha256),
            verify_modes=list(self.config.offered_modes),
            max_draft_len=self.config.max_draft_len,
            max_context=self.config.max_context,
            max_new_tokens=self.config.max_new_tokens,
            eos_token_ids=sorted(self.eos_ids),
            device=self.config.device,
        )

    async def Speculate(
        self, request_iterator: AsyncIterator[pb.EdgeMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.CloudMessage]:
        sid = uuid.uuid4().hex[:12]
        opened = False
        try:
            first = await anext(request_iterator, None)
            if first is None or first.WhichOneof("kind") != "hello":
                raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, "the first message of a Speculate stream must be a Hello")
            state, params = self._open_session(first.hello, speculative=True)
            self.active_sessions += 1
            opened = True
            h = first.hello
            session = TargetSession(self.target.model, state, params, h.verify_mode, self.config.device,
                                    h.residual_top_k or self.config.residual_top_k, h.tail_samples or self.config.tail_samples)
            prefill_s = await self._run(session.prefill)
            log.info("session %s: %d prompt tokens, mode %s, prefill %.3fs", sid, len(state.prompt_ids), session.verify_mode, prefill_s)
            yield pb.CloudMessage(
                ready=pb.Ready(
                    session_id=sid, target_model=self.config.target, prompt_len=len(state.prompt_ids),
                    prefill_s=prefill_s, eos_token_ids=sorted(state.eos_ids),
                )
            )
            async for msg in request_iterator:
                kind = msg.WhichOneof("kind")
                if kind == "cancel":
                    log.info("session %s cancelled by the edge: %s", sid, msg.cancel.reason)
                    return
                if kind == "tail_request":
                    tr = msg.tail_request
                    if tr.epoch < state.epoch:
                        continue  # stale: asked before a verdict the edge had not yet seen
                    if tr.epoch > state.epoch:
                        raise ProtocolError(f"tail request from future epoch {tr.epoch} (current {state.epoch})")
                    payload = await self._run(session.more_tail, tr.position, tr.have)
                    yield pb.CloudMessage(tail=pb.TailSamples(epoch=tr.epoch, position=tr.position, payload=payload))
                    continue
                if kind != "draft":
                    raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"unexpected {kind or 'empty'} message mid-stream")
                batch = msg.draft
                resolved = batch.resolved_token if batch.HasField("resolved_token") else None
                status = state.classify_batch(batch.epoch, batch.start_pos, batch.token_ids, self.config.max_draft_len, resolved)
                if status is BatchStatus.STALE:
                    continue
                epoch = state.epoch
                timed = await self._run(session.verify, list(batch.token_ids), batch.q_payload, list(batch.draft_probs), resolved)
                c, res = timed.commit, timed.residual
                yield pb.CloudMessage(
                    verdict=pb.Verdict(
                        epoch=epoch, start_pos=batch.start_pos, accepted=c.accepted, token=c.token,
                        committed_len=state.committed_len, next_epoch=state.epoch, finished=c.finished is not None,
                        finish_reason=c.finished.value if c.finished else "", verify_s=timed.compute_s,
                        residual_payload=res.topk if res else b"", tail_mass=res.tail_mass if res else 0.0,
                        tail_payload=res.tail if res else b"",
                    )
                )
                if c.finished is not None:
                    log.info("session %s finished (%s) after %d tokens", sid, c.finished.value, len(state.generated))
                    return
        except Refusal as r:
            log.warning("session %s refused: %s", sid, r)
            await context.abort(r.code, str(r))
        except DecodeError as e:
            log.warning("session %s: malformed message: %s", sid, e)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed message: {e}")
        except (ProtocolError, PayloadError, ValueError) as e:
            log.warning("session %s: bad input: %s", sid, e)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{type(e).__name__}: {e}")
        finally:
            if opened:
                self.active_sessions -= 1

    async def CloudGenerate(self, request: pb.Hello, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.TokenChunk]:
        sid = uuid.uuid4().hex[:12]
        opened = False
        try:
            state, params = self._open_session(request, speculative=False)
            self.active_sessions += 1
            opened = True
            session = TargetSession(self.target.model, state, params, "none", self.config.device)
            prefill_s = await self._run(session.prefill)
            log.info("cloud-only session %s: %d prompt tokens, prefill %.3fs", sid, len(state.prompt_ids), prefill_s)
            first = True
            while state.finished is None:
                timed = await self._run(session.decode)
                c = timed.commit
                yield pb.TokenChunk(
                    token_ids=list(c.new_tokens), committed_len=state.committed_len, finished=c.finished is not None,
                    finish_reason=c.finished.value if c.finished else "", decode_s=timed.compute_s,
                    prefill_s=prefill_s if first else 0.0,
                )
                first = False
        except Refusal as r:
            log.warning("cloud-only session %s refused: %s", sid, r)
            await context.abort(r.code, str(r))
        except (ProtocolError, ValueError) as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{type(e).__name__}: {e}")
        finally:
            if opened:
                self.active_sessions -= 1


def server_options(config: CloudConfig) -> list[tuple[str, int]]:
    limit = config.max_message_mb * 1024 * 1024
    return [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]


async def start_server(service: PicoSpecService, address: str) -> tuple[grpc.aio.Server, int]:
    """Start serving on address ("host:port", port 0 = pick one); return the server and its port."""
    server = grpc.aio.server(options=server_options(service.config))
    pb_grpc.add_PicoSpecServicer_to_server(service, server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {address}")
    await server.start()
    return server, port
