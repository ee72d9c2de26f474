"""The cloud gRPC service: handshake checks, sessions, and the stream loop. Model work runs off the event loop."""
from __future__ import annotations

import asyncio
import collections
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
import time
from typing import AsyncIterator, Callable, Protocol, TypeVar

import grpc
from google.protobuf.message import DecodeError

from cloud_server.session import Q_SUM_TOLERANCE, ResidualPayload, TargetSession
from shared.codec import PayloadError, decode_probs
from shared.config import CloudConfig
from shared.early_exit import ExpectedOutcome
from shared.fingerprint import Fingerprint, eos_token_ids, tokenizer_fingerprint
from shared.models import LoadedModel
from shared.protocol import PROTOCOL_VERSION, DraftRun, ProtocolError, SessionState
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


class CloudHooks(Protocol):
    """Test hooks: called before each message goes out (e.g. to delay it). Production passes none.

    Optional: `before_decode_ahead()` is awaited before each decode-ahead step, so a test can let drafts arrive
    first (the tiny test models decode faster than anything reaches the cloud, which would hide speculation)."""

    async def before_send(self, msg: pb.CloudMessage) -> None: ...


@dataclass(frozen=True)
class SessionRecord:
    session_id: str
    committed: list[int]
    cache_tokens: list[int]  # what the target's KV cache held after the session: committed[:-1]
    dead_chains: int


_END = object()  # outbox sentinel: the stream ends normally
DRAIN_S = 10.0  # after the final verdict, how long the edge gets to close its side of the stream


def waits_for(state: SessionState) -> str:
    """What a verifier with nothing to verify waits for: the edge owes it that (never the other way round)."""
    if state.awaiting_resolution:
        return f"the edge's correction at position {state.committed_len} (epoch {state.epoch})"
    return f"drafts of epoch {state.epoch} from position {state.committed_len}"


class _VerifyLoop:
    """One Speculate session after its handshake: admission of drafts, verification passes, decode-ahead."""

    def __init__(self, service: "PicoSpecService", session: TargetSession, decode_ahead: bool, outbox: asyncio.Queue) -> None:
        self.service, self.session, self.state = service, session, session.state
        self.decode_ahead = decode_ahead
        self.outbox = outbox
        self.wake = asyncio.Event()
        self.edge_done = False
        self.idle_s = 0.0  # time with nothing to do since the last verdict: the pipeline bubble
        self.waiting_for: str | None = None  # what the verifier waits for from the edge, while it waits

    def describe(self) -> dict[str, object]:
        """The protocol state as the cloud sees it (logged when an edge hangs up, e.g. on a stall it detected)."""
        st = self.state
        run = st.pending or st.verifying
        return {"epoch": st.epoch, "committed_len": st.committed_len, "awaiting_resolution": st.awaiting_resolution,
                "pending": len(st.pending.token_ids) if st.pending else 0, "verifying": st.verifying is not None,
                "drafts_from": run.start_pos if run else None, "decode_ahead": self.decode_ahead,
                "edge_done": self.edge_done, "cloud_waits_for": self.waiting_for}

    async def read(self, request_iterator: AsyncIterator[pb.EdgeMessage]) -> None:
        try:
            await self._read(request_iterator)
        except BaseException as e:  # noqa: BLE001 - handed to the stream, which aborts with a status
            self.outbox.put_nowait(e)
        finally:
            self.edge_done = True
            self.wake.set()

    async def _read(self, request_iterator: AsyncIterator[pb.EdgeMessage]) -> None:
        state, session, limits = self.state, self.session, self.service.config
        async for msg in request_iterator:
            kind = msg.WhichOneof("kind")
            if kind == "cancel":
                log.info("session cancelled by the edge: %s; cloud state: %s", msg.cancel.reason, self.describe())
                self.outbox.put_nowait(_END)
                return
            if kind == "tail_request":
                tr = msg.tail_request
                if tr.epoch < state.epoch:
                    continue  # stale: asked before a verdict the edge had not yet seen
                if tr.epoch > state.epoch:
                    raise ProtocolError(f"tail request from future epoch {tr.epoch} (current {state.epoch})")
                payload = await self.service._run(session.more_tail, tr.position, tr.have)
                self.outbox.put_nowait(pb.CloudMessage(tail=pb.TailSamples(epoch=tr.epoch, position=tr.position, payload=payload)))
                continue
            if kind != "draft":
                raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"unexpected {kind or 'empty'} message mid-stream")
            b = msg.draft
            if state.finished is not None:
                continue  # drafted before the edge saw the final verdict
            if b.epoch < state.epoch:
                continue  # stale: drafted before a rejection; not even decoded
            resolved = b.resolved_token if b.HasField("resolved_token") else None
            extras = await self._extras(b)
            if resolved is not None and state.awaiting_resolution:
                session.check_resolved(resolved)
            state.admit(b.epoch, b.start_pos, list(b.token_ids), extras, limits.max_draft_len, resolved)
            if state.finished is not None:  # the edge's correction ended the session
                self._verdict(state.committed_len, 0, 0, None, False, 0.0)
            self.wake.set()

    async def _extras(self, b: pb.DraftBatch) -> list:
        """What travels with each draft token: its q row (dense), q(x) (split modes), nothing (coupled)."""
        mode, k = self.session.verify_mode, len(b.token_ids)
        if mode == "dense":
            if not k:
                return []
            q = await asyncio.to_thread(decode_probs, b.q_payload, vocab_size=self.service.vocab_size, max_rows=k,
                                        max_sum_error=Q_SUM_TOLERANCE)
            if q.shape[0] != k:
                raise ValueError(f"q payload has {q.shape[0]} rows for {k} draft tokens")
            return list(q)
        if mode in ("split-topk", "split-exact"):
            if len(b.draft_probs) != k:
                raise ValueError(f"{len(b.draft_probs)} draft probabilities for {k} draft tokens")
            return list(b.draft_probs)
        return [None] * k

    async def verify(self) -> None:
        try:
            await self._verify()
            self.outbox.put_nowait(_END)
        except BaseException as e:  # noqa: BLE001
            self.outbox.put_nowait(e)

    async def _verify(self) -> None:
        state, session, run_model = self.state, self.session, self.service._run
        limit = self.service.config.max_draft_len
        while state.finished is None:
            run = state.take(limit)
            if run is None and self.decode_ahead and not state.awaiting_resolution and not self.edge_done:
                hook = getattr(self.service.hooks, "before_decode_ahead", None)
                if hook is not None:
                    await hook()
                    run = state.take(limit)  # drafts that arrived meanwhile go first
            if run is None:
                if self.decode_ahead and not state.awaiting_resolution and not self.edge_done and state.finished is None:
                    committed = list(state.tokens)
                    token, dt = await run_model(session.decode_next, committed)
                    if state.committed_len != len(committed) or state.awaiting_resolution or state.finished:
                        continue  # the edge's correction arrived meanwhile: this token is not at the front
                    state.commit_own(token)
                    session.settle_cache()
                    self._verdict(len(committed), 0, 0, token, False, dt)
                    continue
                if self.edge_done:
                    return
                t0 = time.perf_counter()
                self.waiting_for = waits_for(state)
                await self.wake.wait()
                self.waiting_for = None
                self.wake.clear()
                self.idle_s += time.perf_counter() - t0
                continue
            out = await run_model(session.verify_run, list(state.tokens), run, self._hint_sender(run))
            c = state.finish_pass(run, out.accepted, out.token, out.rejected)
            if c is None:
                continue  # the edge abandoned that chain while we verified it
            if state.awaiting_resolution:
                session.open_residual = out.open_residual
            session.settle_cache()
            self._verdict(run.start_pos, len(run.token_ids), c.accepted, c.token, c.rejected, out.compute_s, out.residual, run.epoch)

    def _hint_sender(self, run: "DraftRun") -> Callable[[ExpectedOutcome], None] | None:
        """Called from the model thread mid-pass: queue the hint on the loop so it leaves before the verdict."""
        if not self.session.exit_layer:
            return None
        loop = asyncio.get_running_loop()

        def send(e: ExpectedOutcome) -> None:
            hint = pb.Hint(epoch=run.epoch, start_pos=run.start_pos, verified=len(run.token_ids),
                           expected_accepted=e.accepted, expected_token=e.token, confidence=e.confidence)
            loop.call_soon_threadsafe(self.outbox.put_nowait, pb.CloudMessage(hint=hint))
        return send

    def _verdict(self, start: int, verified: int, accepted: int, token: int | None, rejected: bool, compute_s: float,
                 res: "ResidualPayload | None" = None, epoch: int | None = None) -> None:
        st = self.state
        self.outbox.put_nowait(pb.CloudMessage(verdict=pb.Verdict(
            epoch=st.epoch if epoch is None else epoch, start_pos=start, accepted=accepted, token=token,
            committed_len=st.committed_len, next_epoch=st.epoch, finished=st.finished is not None,
            finish_reason=st.finished.value if st.finished else "", verify_s=compute_s, rejected=rejected,
            verified=verified, idle_s=self.idle_s,
            residual_payload=res.topk if res else b"", tail_mass=res.tail_mass if res else 0.0,
            tail_payload=res.tail if res else b"",
        )))
        self.idle_s = 0.0


class PicoSpecService(pb_grpc.PicoSpecServicer):
    def __init__(self, target: LoadedModel, config: CloudConfig, hooks: "CloudHooks | None" = None) -> None:
        self.target = target
        self.hooks = hooks  # tests only: deterministic delays on outgoing messages
        self.config = config
        self.vocab_size = int(target.model.config.vocab_size)
        self.fingerprint = tokenizer_fingerprint(target.tokenizer)
        self.eos_ids = eos_token_ids(target.model, target.tokenizer)
        self.num_layers = int(target.model.config.num_hidden_layers)
        self.default_exit_layer = config.exit_layer or max(1, min(self.num_layers - 1, round(0.75 * self.num_layers)))
        # one model, one executor thread: model steps of all sessions are serialised, the loop stays free
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="target-model")
        self.active_sessions = 0
        # the last few sessions' end state: committed tokens and what the KV cache held (tests, debugging)
        self.closed_sessions: collections.deque[SessionRecord] = collections.deque(maxlen=16)

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
        if hello.exit_layer and not (1 <= hello.exit_layer < self.num_layers and 0.0 <= hello.exit_threshold <= 1.0):
            raise Refusal(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"early exit needs an exit layer in 1..{self.num_layers - 1} (got {hello.exit_layer}) and a threshold "
                f"in [0, 1] (got {hello.exit_threshold})",
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
            target_layers=self.num_layers,
            default_exit_layer=self.default_exit_layer,
        )

    async def Speculate(
        self, request_iterator: AsyncIterator[pb.EdgeMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.CloudMessage]:
        sid = uuid.uuid4().hex[:12]
        opened = False
        session: TargetSession | None = None
        tasks: list[asyncio.Task] = []
        try:
            first = await anext(request_iterator, None)
            if first is None or first.WhichOneof("kind") != "hello":
                raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, "the first message of a Speculate stream must be a Hello")
            state, params = self._open_session(first.hello, speculative=True)
            self.active_sessions += 1
            opened = True
            h = first.hello
            session = TargetSession(self.target.model, state, params, h.verify_mode, self.config.device,
                                    h.residual_top_k or self.config.residual_top_k, h.tail_samples or self.config.tail_samples,
                                    h.exit_layer, h.exit_threshold)
            prefill_s = await self._run(session.prefill)
            log.info("session %s: %d prompt tokens, mode %s%s, prefill %.3fs", sid, len(state.prompt_ids),
                     session.verify_mode, " + decode-ahead" if h.decode_ahead else "", prefill_s)
            yield await self._sending(pb.CloudMessage(ready=pb.Ready(
                session_id=sid, target_model=self.config.target, prompt_len=len(state.prompt_ids),
                prefill_s=prefill_s, eos_token_ids=sorted(state.eos_ids),
            )))
            # two tasks share the session on this event loop: the reader admits drafts as they arrive, the
            # verifier verifies whatever has arrived; both put replies on one outbox that this generator drains
            outbox: asyncio.Queue = asyncio.Queue()
            pass_loop = _VerifyLoop(self, session, h.decode_ahead, outbox)
            reader = asyncio.create_task(pass_loop.read(request_iterator))
            tasks = [reader, asyncio.create_task(pass_loop.verify())]
            while True:
                item = await outbox.get()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield await self._sending(item)
            if state.finished is not None:
                log.info("session %s finished (%s) after %d tokens", sid, state.finished.value, len(state.generated))
                # the edge may still be writing drafts it made before it saw the end: let it close its side
                # first, so that its writes never race the end of the call (bounded by DRAIN_S)
                await asyncio.wait([reader], timeout=DRAIN_S)
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
            for t in tasks:
                t.cancel()
            if opened:
                self.active_sessions -= 1
            if session is not None:
                await self._record(sid, session)

    async def _record(self, sid: str, session: TargetSession) -> None:
        """Settle the cache after the model executor is done with this session, and remember its end state.

        The record is made in the executor job itself: the stream's task may be cancelled while it waits (the
        call ends when the edge hangs up), and the settling must happen and be recorded regardless."""
        def settle() -> None:
            session.settle_cache()
            self.closed_sessions.append(SessionRecord(sid, list(session.state.tokens), list(session.backend.tokens),
                                                      session.state.dead_chains))
        try:
            await asyncio.shield(self._run(settle))
        except (RuntimeError, asyncio.CancelledError):  # executor shut down with the server, or the call ended
            pass

    async def _sending(self, msg: pb.CloudMessage) -> pb.CloudMessage:
        if self.hooks is not None:
            await self.hooks.before_send(msg)
        return msg

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
