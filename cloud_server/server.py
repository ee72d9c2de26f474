"""The cloud gRPC service: a thin adapter. Handlers validate the handshake (cloud_server/handshake.py), hold a
session slot (cloud_server/slots.py), run a session (cloud_server/session.py) whose model work goes through the one
model worker (cloud_server/worker.py), and map errors to gRPC statuses in one place (`_status_for`)."""
from __future__ import annotations

import dataclasses
import asyncio
import collections
import contextlib
import logging
import uuid
from typing import AsyncIterator, Awaitable, Callable

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from picospec.cloud_server.auth import AuthInterceptor, TokenAuth, client_identity, exposure_warning
from picospec.cloud_server.capacity import CloudCapacity
from picospec.cloud_server.certificates import ServerCertificates
from picospec.cloud_server.handshake import Refusal, SessionSpec, TargetInfo, validate_hello
from picospec.cloud_server.metrics import REFUSAL_REASONS, SHUTDOWN, CloudMetrics, SessionMeter
from picospec.cloud_server.session import CloudHooks, CloudSession, SessionRecord
from picospec.cloud_server.slots import SessionSlots
from picospec.cloud_server.target import TargetCache
from picospec.cloud_server.worker import Lane, ModelWorker
from picospec.shared.codec import PayloadError, dense_payload_bound
from picospec.shared.config import CloudConfig
from picospec.shared.connection import RETRY_AFTER_KEY, server_keepalive_options, split_host
from picospec.shared.engine import EngineOptions, StaticBackend, StaticEngine
from picospec.shared.llama_backend import GgufModel
from picospec.shared.engine.batcher import Batcher, BatchOptions
from picospec.shared.engine.llama_engine import LlamaEngine
from picospec.shared.fingerprint import eos_token_ids, tokenizer_fingerprint
from picospec.shared.models import LoadedModel, ModelError, resolve_engine as resolve_model_engine
from picospec.shared.protocol import PROTOCOL_VERSION, ProtocolError, SessionState
from picospec.shared.rpc import picospec_pb2 as pb
from picospec.shared.rpc import picospec_pb2_grpc as pb_grpc

__all__ = ["CloudHooks", "PicoSpecService", "Refusal", "SessionRecord", "message_limit", "server_options",
           "start_server"]
log = logging.getLogger("picospec.cloud")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PicoSpec"].full_name  # "picospec.v1.PicoSpec"
CLOUD_ONLY = "cloud"  # the metrics' mode label of a CloudGenerate session


def _status_for(e: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The status a failed call ends with; None for what is not ours to map (cancellation, aborts)."""
    if isinstance(e, Refusal):
        return e.code, str(e)
    if isinstance(e, DecodeError):
        return grpc.StatusCode.INVALID_ARGUMENT, f"malformed message: {e}"
    if isinstance(e, (ProtocolError, PayloadError, ValueError)):
        return grpc.StatusCode.INVALID_ARGUMENT, f"{type(e).__name__}: {e}"
    return None


class Malformed:
    """A unary request whose bytes did not parse. gRPC deserializes a unary request before the handler runs, and
    a deserializer that raises ends the call UNKNOWN ("Unexpected DecodeError", with a traceback in the log); so
    the server's deserializers hand this to the handler instead, which refuses it INVALID_ARGUMENT like a
    malformed stream message (found by `picospec-bench fuzz`: random bytes as an Info or CloudGenerate request)."""

    def __init__(self, error: DecodeError) -> None:
        self.error = error


def lenient(parse: Callable[[bytes], object]) -> Callable[[bytes], object]:
    """A request deserializer that returns `Malformed` where `parse` raises DecodeError."""
    def deserialize(data: bytes) -> object:
        try:
            return parse(data)
        except DecodeError as e:
            return Malformed(e)
    return deserialize


def parsed(request: object) -> object:
    """The request itself, or the DecodeError it failed with (which `_status_for` maps to INVALID_ARGUMENT)."""
    if isinstance(request, Malformed):
        raise request.error
    return request


def add_service(service: "PicoSpecService", server: grpc.aio.Server) -> None:
    """pb_grpc.add_PicoSpecServicer_to_server with lenient unary deserializers (see `Malformed`)."""
    handlers = {
        "Info": grpc.unary_unary_rpc_method_handler(
            service.Info, request_deserializer=lenient(pb.InfoRequest.FromString),
            response_serializer=pb.InfoReply.SerializeToString),
        "Speculate": grpc.stream_stream_rpc_method_handler(  # a stream message that does not parse raises in the
            service.Speculate, request_deserializer=pb.EdgeMessage.FromString,  # handler, which maps it
            response_serializer=pb.CloudMessage.SerializeToString),
        "CloudGenerate": grpc.unary_stream_rpc_method_handler(
            service.CloudGenerate, request_deserializer=lenient(pb.Hello.FromString),
            response_serializer=pb.TokenChunk.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("picospec.v1.PicoSpec", handlers),))
    server.add_registered_method_handlers("picospec.v1.PicoSpec", handlers)


def resolve_engine(config: CloudConfig) -> CloudConfig:
    """The config with `--engine auto` made concrete for loading: llama.cpp on a CPU cloud whose target is a GGUF it can
    run (a built-in or a .gguf path, no torch suffix) when llama-cpp-python is installed and neither batching nor a
    device map is asked for: the fastest exact engine measured on a CPU (docs/performance.md). Otherwise auto stays,
    and means what it did (static on cuda or with --batching on, else hf)."""
    if config.engine != "auto" or config.device != "cpu" or config.batching == "on" or config.device_mapped:
        return config
    if resolve_model_engine(config.target, "auto") == "llama.cpp":
        return dataclasses.replace(config, engine="llama.cpp")
    return config


def uses_static_engine(config: CloudConfig) -> bool:
    """--engine static, or auto on one CUDA device; a ModelError where static cannot work (a device map)."""
    mapped = config.device_mapped
    if config.engine == "llama.cpp":
        if config.device != "cpu" or mapped:
            raise ModelError("--engine llama.cpp runs on the cpu: not with --device cuda or --device-map")
        return False
    if (config.engine == "static" or config.batching == "on") and mapped:  # the cache lives on one device
        raise ModelError("the static engine (--engine static, --batching on) keeps the whole KV cache on one device: "
                         "use --engine hf --batching off with --device-map")
    if config.batching == "on" and config.engine == "hf":
        raise ModelError("--batching on needs the static engine (--engine static or auto) or --engine llama.cpp")
    return config.engine == "static" or (config.engine == "auto" and not mapped
                                         and (config.device == "cuda" or config.batching == "on"))


def uses_batching(config: CloudConfig) -> bool:
    return config.batching == "on" or (config.batching == "auto" and uses_static_engine(config))


MAX_GRAPH_ROWS = 64     # the widest batch captured as a CUDA graph; wider ones run eager
MAX_GRAPH_TOKENS = 256  # ... and no graph pads more tokens than this (rows x bucket): each keeps its own logits


def graph_rows(max_sessions: int, batching: bool) -> tuple[int, ...]:
    """Rows per captured pass: powers of two up to the first that holds every session (at most MAX_GRAPH_ROWS), so
    a batch of any size the cloud admits replays a graph (8 sessions: 1, 2, 4, 8; 24: up to 32); 1 without
    batching."""
    if not batching:
        return (1,)
    rows = [1]
    while rows[-1] < min(max_sessions, MAX_GRAPH_ROWS):
        rows.append(rows[-1] * 2)
    return tuple(rows)


def make_engine(target: LoadedModel, config: CloudConfig) -> StaticEngine | LlamaEngine | None:
    """The static engine where the config asks for it, or llama.cpp's with --batching on (every session a sequence
    of one context); one slot per session --max-sessions allows. None: each session a cache of its own."""
    if isinstance(target.model, GgufModel):
        if not uses_batching(config):
            return None
        # a session holds its prompt and budget (at most max_context) and one draft batch past them
        return LlamaEngine(target.model, config.max_sessions, config.max_context + config.max_draft_len + 1)
    if not uses_static_engine(config):
        return None
    options = EngineOptions(slots=config.max_sessions + 1, max_len=config.max_context, graphs=config.device == "cuda",
                            batch_buckets=graph_rows(config.max_sessions, uses_batching(config)),
                            max_graph_tokens=MAX_GRAPH_TOKENS)
    return StaticEngine(target.model, options)


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
            async with self.slots.hold(client_identity(context, self.auth)) as held:
                with self.metrics.session(spec.verify_mode, spec.state) as meter:
                    meter.received(first)
                    cache = TargetCache(self.target.model, spec.params, spec.verify_mode, self.config.device,
                                        spec.residual_top_k, spec.tail_samples, spec.exit_layer, spec.exit_threshold,
                                        self._engine_slot(), self._session_tokens(spec.state))
                    lane = self.worker.lane()
                    session = CloudSession(sid, spec, cache, lane, self.config, self.info.vocab_size,
                                           self.hooks, meter, self.capacity)
                    self.live_sessions.add(session)
                    try:
                        async with contextlib.aclosing(self._run(session, spec, request_iterator)) as messages:
                            async for msg in messages:
                                if spec.state.finished is not None:
                                    held.ending()  # before the last message: a next Hello waits for this slot
                                yield await self._sending(msg, meter)
                    finally:
                        held.ending()
                        self.live_sessions.discard(session)
                        await self._record(session)
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
            state = spec.state
            async with self.slots.hold(client_identity(context, self.auth)) as held:
                with self.metrics.session(CLOUD_ONLY, state) as meter:
                    meter.received(request)
                    cache = TargetCache(self.target.model, spec.params, spec.verify_mode, self.config.device,
                                        backend=self._engine_slot(), n_ctx=self._session_tokens(state))
                    lane = self.worker.lane()
                    try:
                        # it wants the model for as long as it runs: speculative sessions' decode-ahead yields
                        with self.capacity.working(sid):
                            async with contextlib.aclosing(self._decode_alone(sid, state, cache, lane, meter)) as chunks:
                                async for chunk in chunks:
                                    if chunk.finished:
                                        held.ending()  # before the last message: a next Hello waits for this slot
                                    yield chunk
                    finally:
                        held.ending()
                        await self._close(cache, lane)

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


# protobuf framing of an EdgeMessage around a dense batch's payload: tags, length prefixes, epoch, positions and
# the optional resolved token at their widest varints (41 bytes), with room to spare; plus 5 bytes per draft id
BATCH_FRAMING_BYTES = 64
MIB = 1024 * 1024


def message_limit(config: CloudConfig, vocab_size: int) -> int:
    """The largest message the cloud accepts: --max-message-mb, raised where needed to the largest batch its own
    admission rules allow (a dense batch of --max-draft-len incompressible rows). A lower transport limit would
    end sessions mid-generation over legal batches: with Qwen's 151,936-token vocabulary 32 rows are 18.5 MiB."""
    rows = config.max_draft_len
    largest_batch = dense_payload_bound(rows, vocab_size) + BATCH_FRAMING_BYTES + 5 * rows
    return max(config.max_message_mb * MIB, largest_batch)


def server_options(config: CloudConfig, vocab_size: int) -> list[tuple[str, int]]:
    """gRPC's server options. SO_REUSEPORT off: gRPC turns it on by default, and a second cloud started on a port
    already served then says "serving" and takes half of the new connections; without it the second bind fails."""
    limit = message_limit(config, vocab_size)
    return [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0), *server_keepalive_options(config.peer_timeout_s)]


def bind_port(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    """The port gRPC bound for `address`; OSError naming the address when it could not (gRPC returns 0 or raises
    RuntimeError, by version)."""
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError as e:
        raise OSError(f"could not listen on {address}: the port is in use or the address is not this machine's "
                      f"({e})") from None
    if port == 0:
        raise OSError(f"could not listen on {address}: the port is in use or the address is not this machine's")
    return port


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


async def start_server(service: PicoSpecService, address: str) -> tuple[grpc.aio.Server, int]:
    """Start serving on address ("host:port", port 0 = pick one); return the server and its port. TLS, client
    certificates and tokens as the service's config says (a setting that cannot work raises
    ConnectionSettingsError, a ValueError, before anything listens)."""
    config = service.config
    limit = message_limit(config, service.info.vocab_size)
    if limit > config.max_message_mb * MIB:
        log.info("message limit raised from %d MiB to %.1f MiB: a dense batch of %d drafts over %d tokens must fit",
                 config.max_message_mb, limit / MIB, config.max_draft_len, service.info.vocab_size)
    credentials = service.certificates.credentials() if service.certificates is not None else None
    warning = exposure_warning(split_host(address), credentials is not None, service.auth is not None,
                               bool(config.tls_ca))
    if warning:
        log.warning("%s", warning)
    interceptors = None if service.auth is None else [
        AuthInterceptor(service.auth, on_refused=lambda: service.metrics.on_refused("unauthenticated"))]
    server = grpc.aio.server(options=server_options(config, service.info.vocab_size), interceptors=interceptors)
    add_service(service, server)
    service.health = await add_operations_services(server)
    port = bind_port(server, address, credentials)
    service.metrics.serve(split_host(address), config.metrics_port)  # a port in use fails before gRPC serves
    await server.start()
    for name in HEALTH_SERVICES:  # the model is loaded (the service holds it) and the port listens
        await service.health.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port


HEALTH_SERVICES = ("", SERVICE_NAME)  # "": the server as a whole, as grpc_health_probe asks by default


async def add_operations_services(server: grpc.aio.Server) -> "health.aio.HealthServicer":
    """The gRPC health service (NOT_SERVING until start_server has the port, and again from the drain) and
    server reflection for PicoSpec and health. Both are callable without a token (auth.TOKEN_EXEMPT_SERVICES)."""
    servicer = health.aio.HealthServicer()
    for name in HEALTH_SERVICES:
        await servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    return servicer
