"""The cloud gRPC service: the servicer. Handlers validate the handshake (cloud_server/handshake.py), take what a
session holds in one scope (`_session_scope`: a session slot, cloud_server/slots.py; a meter; a target cache; a lane
on the one model worker, cloud_server/worker.py), run the session (cloud_server/session.py), and map errors to gRPC
statuses in one place (`_status_for`). The engine is chosen in cloud_server/engine_setup.py; the server around this
(deserializers, limits, TLS, health) is cloud_server/grpc_setup.py."""
from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import uuid
from typing import AsyncIterator, Awaitable

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health

from picospec.cloud_server.auth import TokenAuth, client_identity
from picospec.cloud_server.capacity import CloudCapacity
from picospec.cloud_server.certificates import ServerCertificates
from picospec.cloud_server.engine import StaticBackend
from picospec.cloud_server.engine.batcher import Batcher, BatchOptions
from picospec.cloud_server.engine_setup import make_engine, uses_batching, uses_static_engine
from picospec.cloud_server.grpc_setup import parsed
from picospec.cloud_server.handshake import Refusal, SessionSpec, TargetInfo, validate_hello
from picospec.cloud_server.metrics import REFUSAL_REASONS, SHUTDOWN, CloudMetrics, SessionMeter
from picospec.cloud_server.session import CloudHooks, CloudSession, SessionRecord
from picospec.cloud_server.slots import HeldSlot, SessionSlots
from picospec.cloud_server.target import TargetCache
from picospec.cloud_server.worker import Lane, ModelWorker
from picospec.shared.codec import PayloadError
from picospec.shared.config import CloudConfig
from picospec.shared.connection import RETRY_AFTER_KEY
from picospec.shared.fingerprint import eos_token_ids, tokenizer_fingerprint
from picospec.shared.llama_backend import GgufModel
from picospec.shared.models import LoadedModel
from picospec.shared.protocol import PROTOCOL_VERSION, ProtocolError, SessionState
from picospec.shared.rpc import picospec_pb2 as pb
from picospec.shared.rpc import picospec_pb2_grpc as pb_grpc

__all__ = ["CloudHooks", "PicoSpecService", "Refusal", "SessionRecord"]
log = logging.getLogger("picospec.cloud")
CLOUD_ONLY = "cloud"  # the metrics' mode label of a CloudGenerate session


@dataclasses.dataclass(frozen=True)
class SessionScope:
    """What one session holds while it runs (PicoSpecService._session_scope)."""

    held: HeldSlot       # its session slot
    meter: SessionMeter  # its metrics
    cache: TargetCache   # the target's cache for it
    lane: Lane           # its place on the model worker


def _status_for(e: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The status a failed call ends with; None for what is not ours to map (cancellation, aborts)."""
    if isinstance(e, Refusal):
        return e.code, str(e)
    if isinstance(e, DecodeError):
        return grpc.StatusCode.INVALID_ARGUMENT, f"malformed message: {e}"
    if isinstance(e, (ProtocolError, PayloadError, ValueError)):
        return grpc.StatusCode.INVALID_ARGUMENT, f"{type(e).__name__}: {e}"
    return None


class PicoSpecService(pb_grpc.PicoSpecServicer):
    def __init__(self, target: LoadedModel, config: CloudConfig, hooks: "CloudHooks | None" = None) -> None:
        if isinstance(target.model, GgufModel):  # a GGUF loaded for llama.cpp: that is the engine, whatever was said
            config = dataclasses.replace(config, engine="llama.cpp")
            uses_static_engine(config)  # --device cuda refused, with the reason
        self.target, self.config = target, config
        self.hooks = hooks  # tests only: deterministic delays on outgoing messages
        num_layers = int(target.model.config.num_hidden_layers)
        self.info = TargetInfo(config.target, int(target.model.config.vocab_size), tokenizer_fingerprint(target.tokenizer),
                               eos_token_ids(target.model, target.tokenizer), num_layers,
                               early_exits=not isinstance(target.model, GgufModel))
        self.default_exit_layer = config.exit_layer or max(1, min(num_layers - 1, round(0.75 * num_layers)))
        self.metrics = CloudMetrics(enabled=bool(config.metrics_port))
        self.engine = make_engine(target, config)  # None: each session gets a cache of its own
        batching = BatchOptions(config.max_batch_tokens, config.max_wait_ms / 1e3, config.batch_hold)
        self.batcher = (Batcher(self.engine, batching, self.metrics.on_engine_pass)
                        if self.engine is not None and uses_batching(config) else None)
        # batching: each session's jobs on a thread of their own (its lane), their passes gathered by the batcher
        self.worker = ModelWorker(thread_per_session=self.batcher is not None)
        self.slots = SessionSlots(config.max_sessions, config.max_sessions_per_client)
        # pass and decode costs as measured, recent compute per session, who wants the model now (capacity.py)
        self.capacity = CloudCapacity()
        # None: no tokens asked for (every caller may call); reloaded by the CLI on SIGHUP
        self.auth = TokenAuth(config.auth_tokens) if config.auth_tokens else None
        # None: plaintext; else the TLS files in force, reloaded by the CLI on SIGHUP (cloud_server/certificates.py)
        self.certificates = (ServerCertificates(config.tls_cert, config.tls_key, config.tls_ca)
                             if config.tls_cert or config.tls_key or config.tls_ca else None)
        # the last few sessions' end state: committed tokens and what the KV cache held (tests, debugging)
        self.closed_sessions: collections.deque[SessionRecord] = collections.deque(maxlen=16)
        self.health: health.aio.HealthServicer | None = None  # set by start_server
        self.live_sessions: set[CloudSession] = set()  # speculative sessions running (the drain ends them)
        self.shutdown_refusal: Refusal | None = None  # set when the drain's grace is over: what sessions end with

    @property
    def active_sessions(self) -> int:
        return self.slots.active

    async def begin_drain(self) -> None:
        """SIGTERM's first step (cloud_server/drain.py): refuse new sessions UNAVAILABLE, health NOT_SERVING."""
        self.slots.drain()
        if self.health is not None:
            await self.health.enter_graceful_shutdown()

    def end_sessions(self, message: str) -> int:
        """End every running session with UNAVAILABLE `message` (the drain's grace is over); how many there were.
        A speculative session's stream raises it at once (its outbox), a cloud-only one at its next token."""
        self.shutdown_refusal = Refusal(grpc.StatusCode.UNAVAILABLE, message, reason=SHUTDOWN)
        for session in self.live_sessions:
            session.outbox.put_nowait(self.shutdown_refusal)
        return self.slots.active

    @contextlib.asynccontextmanager
    async def _call(self, context: grpc.aio.ServicerContext, what: str) -> AsyncIterator[None]:
        """Map what a handler raises to the call's status, logging it once (and counting refusals of a session
        before its start in the metrics)."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - mapped below, or re-raised as it is
            status = _status_for(e)
            if status is None:
                raise
            if isinstance(e, Refusal) and e.reason in REFUSAL_REASONS:
                self.metrics.on_refused(e.reason)
            log.warning("%s: %s", what, status[1])
            retry_after = getattr(e, "retry_after_s", None)
            if retry_after is not None:
                context.set_trailing_metadata(((RETRY_AFTER_KEY, str(int(retry_after * 1000))),))
            await context.abort(*status)

    async def _sending(self, msg: pb.CloudMessage, meter: SessionMeter) -> pb.CloudMessage:
        if self.hooks is not None:
            await self.hooks.before_send(msg)
        meter.sent(msg)
        return msg

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoReply:
        async with self._call(context, "Info"):
            parsed(request)
        t, c = self.info, self.config
        return pb.InfoReply(
            protocol_version=PROTOCOL_VERSION, target_model=c.target, vocab_size=t.vocab_size,
            tokenizer=pb.TokenizerFingerprint(num_tokens=t.fingerprint.num_tokens, sha256=t.fingerprint.sha256),
            verify_modes=list(c.offered_modes), max_draft_len=c.max_draft_len, max_context=c.max_context,
            max_new_tokens=c.max_new_tokens, eos_token_ids=sorted(t.eos_ids), device=c.device,
            target_layers=t.num_layers, default_exit_layer=self.default_exit_layer,
        )

    async def Speculate(self, request_iterator: AsyncIterator[pb.EdgeMessage],
                        context: grpc.aio.ServicerContext) -> AsyncIterator[pb.CloudMessage]:
        sid = uuid.uuid4().hex[:12]
        async with self._call(context, f"session {sid}"):
            first = await anext(request_iterator, None)
            if first is None or first.WhichOneof("kind") != "hello":
                raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, "the first message of a Speculate stream must be a Hello")
            spec = validate_hello(first.hello, self.config, self.info, speculative=True)
            async with self._session_scope(context, spec, spec.verify_mode, first) as scope:
                session = CloudSession(sid, spec, scope.cache, scope.lane, self.config, self.info.vocab_size,
                                       self.hooks, scope.meter, self.capacity)
                self.live_sessions.add(session)
                try:
                    async with contextlib.aclosing(self._run(session, spec, request_iterator)) as messages:
                        async for msg in messages:
                            if spec.state.finished is not None:
                                scope.held.ending()  # before the last message: a next Hello waits for this slot
                            yield await self._sending(msg, scope.meter)
                finally:
                    scope.held.ending()
                    self.live_sessions.discard(session)
                    await self._record(session)

    @contextlib.asynccontextmanager
    async def _session_scope(self, context: grpc.aio.ServicerContext, spec: SessionSpec, label: str,
                             request: object) -> AsyncIterator[SessionScope]:
        """What a session holds, taken in this order and given back in reverse however the call ends: its caller's
        session slot, the metrics' meter (`label`: its mode), a target cache (a slot of the engine where the cloud
        has one) and a lane on the model worker. The slot is marked ending first (a next Hello waits for it rather
        than being refused); the cache closes on the lane after the session's last job, before the slot goes back."""
        async with self.slots.hold(client_identity(context, self.auth)) as held:
            with self.metrics.session(label, spec.state) as meter:
                meter.received(request)
                cache = TargetCache(self.target.model, spec.params, spec.verify_mode, self.config.device,
                                    spec.residual_top_k, spec.tail_samples, spec.exit_layer, spec.exit_threshold,
                                    self._engine_slot(), self._session_tokens(spec.state))
                lane = self.worker.lane()
                try:
                    yield SessionScope(held, meter, cache, lane)
                finally:
                    held.ending()
                    await self._close(cache, lane)

    async def _run(self, session: CloudSession, spec: SessionSpec,
                   request_iterator: AsyncIterator[pb.EdgeMessage]) -> AsyncIterator[pb.CloudMessage]:
        """A speculative session after its slot: prefill, Ready, then the session's stream; logged at its end, however
        it ends: finished; failed (the call's status, which `_call` logs); or ended by the edge's side, which it
        closed or whose connection was dropped (silent past --peer-timeout-s). That last end reaches here as a
        cancellation or as this generator being closed, depending on where the call was when it went."""
        sid, state = session.sid, spec.state
        ended_by_edge = True
        try:
            prefill_s, first_token = await session.prefill(spec.first_token)
            log.info("session %s: %d prompt tokens, mode %s%s, prefill %.3fs", sid, len(state.prompt_ids),
                     spec.verify_mode, " + decode-ahead" if spec.decode_ahead else "", prefill_s)
            yield pb.CloudMessage(ready=pb.Ready(
                session_id=sid, target_model=self.config.target, prompt_len=len(state.prompt_ids),
                prefill_s=prefill_s, eos_token_ids=sorted(state.eos_ids), first_token=first_token,
                pass_s=self.capacity.pass_costs()))
            async for msg in session.stream(request_iterator):
                yield msg
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except BaseException:
            ended_by_edge = False
            raise
        finally:
            if state.finished is not None:
                log.info("session %s finished (%s) after %d tokens", sid, state.finished.value, len(state.generated))
            elif ended_by_edge:
                log.info("session %s ended by the edge's side after %d tokens", sid, len(state.generated))

    def _session_tokens(self, state: SessionState) -> int:
        """The most tokens a session's cache holds: its prompt, its budget and one draft batch past it (what a
        llama.cpp context is sized for)."""
        return len(state.prompt_ids) + state.max_new_tokens + self.config.max_draft_len + 1

    def _engine_slot(self) -> StaticBackend | None:
        if self.engine is None:
            return None
        return self.engine.backend(passes=self.batcher.submit if self.batcher is not None else None)

    async def _close(self, cache: TargetCache, lane: Lane) -> None:
        """Give the session's engine slot back, on its lane after its last pass (one the call's end left running
        included), and end the lane. Its session slot is given back only after this, so a new session never finds
        the engine without the slot it was admitted for."""
        try:
            await _despite_cancellation(lane.run(cache.close))
        finally:
            lane.close()

    async def _record(self, session: CloudSession) -> None:
        """Keep the session's end state: the settling must happen and be recorded however the call ends."""
        await _despite_cancellation(session.record(self.closed_sessions.append))

    async def CloudGenerate(self, request: pb.Hello, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.TokenChunk]:
        """The baseline: the target decodes alone and streams its tokens, with the coins a bonus token would use."""
        sid = uuid.uuid4().hex[:12]
        async with self._call(context, f"cloud-only session {sid}"):
            spec = validate_hello(parsed(request), self.config, self.info, speculative=False)
            async with self._session_scope(context, spec, CLOUD_ONLY, request) as scope:
                # it wants the model for as long as it runs: speculative sessions' decode-ahead yields
                with self.capacity.working(sid):
                    chunks = self._decode_alone(sid, spec.state, scope.cache, scope.lane, scope.meter)
                    async with contextlib.aclosing(chunks):
                        async for chunk in chunks:
                            if chunk.finished:
                                scope.held.ending()  # before the last message: a next Hello waits for this slot
                            yield chunk

    async def _decode_alone(self, sid: str, state: SessionState, cache: TargetCache, lane: Lane,
                            meter: SessionMeter) -> AsyncIterator[pb.TokenChunk]:
        """CloudGenerate after its slot: the prompt and the first token in one pass, then one decode step per token,
        each streamed. (One pass, as a plain engine does it: llama.cpp's logits depend on how tokens are batched, so
        the prompt's last position must be computed with the prompt to match llama.cpp's own generation.)

        The next token's step is queued before this token's chunk is written, so the model never waits for a write
        (with batching, a session whose row missed a pass would wait a whole pass). A step the call's end leaves
        running still ends before the cache's close (the lane runs them in order); its result is dropped."""
        step = asyncio.ensure_future(lane.run(cache.prefill_with_first_token, list(state.tokens)))
        prefill_s = None
        try:
            while state.finished is None:
                if self.shutdown_refusal is not None:
                    raise self.shutdown_refusal
                token, dt = await step
                if prefill_s is None:  # the first token came with the prefill's pass
                    prefill_s, dt = dt, 0.0
                    log.info("cloud-only session %s: %d prompt tokens, prefill and first token %.3fs", sid,
                             len(state.prompt_ids), prefill_s)
                meter.on_compute(dt)
                if dt > 0:
                    self.capacity.on_compute(sid, 0, dt)
                c = state.commit((), 0, token, rejected=False)
                if state.finished is None:
                    step = asyncio.ensure_future(lane.run(cache.decode_next, list(state.tokens)))
                meter.committed(len(state.generated))
                chunk = pb.TokenChunk(
                    token_ids=list(c.new_tokens), committed_len=state.committed_len,
                    finished=c.finished is not None, finish_reason=c.finished.value if c.finished else "",
                    decode_s=dt, prefill_s=prefill_s if len(state.generated) == 1 else 0.0)
                meter.sent(chunk)
                yield chunk
        finally:
            step.cancel()  # its job still runs to its end on the lane; no one will read its outcome
            if step.done() and not step.cancelled():
                step.exception()  # a failure the call's end made moot is not logged as never retrieved


async def _despite_cancellation(job: Awaitable[None]) -> None:
    """Await a session's last job on the model worker to its end, even where the call is cancelled meanwhile (the
    edge hung up, or cancelled right after its last token): each cancellation is absorbed, so what comes after the
    job (the slot given back) never overtakes it. A worker shut down with the server ends it (RuntimeError)."""
    task = asyncio.ensure_future(job)
    while not task.done():
        with contextlib.suppress(asyncio.CancelledError, RuntimeError):
            await asyncio.shield(task)
    with contextlib.suppress(RuntimeError, asyncio.CancelledError):
        task.result()
