"""One Speculate session on the cloud after its handshake: the target cache, the draft queue, and two tasks.

    reader:    edge messages -> admit drafts into the queue (or answer a tail request) -> wake the verifier
    verifier:  take what has arrived (as much as the session's verification budget allows) -> one pass on the
               model worker -> commit -> verdict to the outbox; with nothing to verify and decode-ahead on, or with
               drafts the budget allows none of, decode a token alone and send that instead
    stream():  yields the outbox to the gRPC handler until the session ends (or raises what went wrong)

Both tasks run on the event loop and touch the model only through the session's lane of the model worker
(cloud_server/worker.py): its jobs run one at a time, in order, even those whose awaiting task was cancelled.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Protocol

import grpc

from picospec.cloud_server.ahead import batch_due_at, check_next_batch_in, decode_hold_s
from picospec.cloud_server.capacity import CloudCapacity, VerifyBudget, drafts_allowed
from picospec.cloud_server.drafts import DraftQueue, DraftRun
from picospec.cloud_server.early_exit import ExpectedOutcome
from picospec.cloud_server.handshake import Refusal, SessionSpec
from picospec.cloud_server.metrics import SessionMeter
from picospec.cloud_server.target import TargetCache
from picospec.cloud_server.worker import Lane
from picospec.shared.config import CloudConfig
from picospec.shared.perf_model import Ewma
from picospec.shared.protocol import ProtocolError, SessionState
from picospec.shared.rpc import picospec_pb2 as pb
from picospec.shared.schemes import ResidualPayload

log = logging.getLogger("picospec.cloud")
_END = object()  # outbox sentinel: the stream ends normally
DRAIN_S = 10.0   # after the final verdict, how long the edge gets to close its side of the stream


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


def waits_for(state: SessionState) -> str:
    """What a verifier with nothing to verify waits for: the edge owes it that (never the other way round)."""
    if state.awaiting_resolution:
        return f"the edge's correction at position {state.committed_len} (epoch {state.epoch})"
    return f"drafts of epoch {state.epoch} from position {state.committed_len}"


class CloudSession:
    def __init__(self, sid: str, spec: SessionSpec, cache: TargetCache, lane: Lane, limits: CloudConfig,
                 vocab_size: int, hooks: "CloudHooks | None" = None, meter: SessionMeter | None = None,
                 capacity: CloudCapacity | None = None) -> None:
        self.sid, self.cache, self.lane, self.limits, self.vocab_size = sid, cache, lane, limits, vocab_size
        self.hooks = hooks
        self.meter = meter if meter is not None else SessionMeter()  # the metrics (a no-op one when they are off)
        self.capacity = capacity if capacity is not None else CloudCapacity()  # the server's, shared by its sessions
        self.budget = VerifyBudget(limits.verify_budget, limits.verify_budget_slack)
        self.held_back = 0  # drafts the budget kept out of the step about to run
        self.queued_since: float | None = None  # admission of the oldest batch not yet taken into a pass
        self.state = spec.state
        self.queue = DraftQueue(self.state)
        self.decode_ahead = spec.decode_ahead
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.wake = asyncio.Event()
        self.edge_done = False
        self.idle_s = 0.0  # time with nothing to do since the last verdict: the pipeline bubble
        self.batch_due_at: float | None = None  # when the edge's next batch is due (cloud_server/ahead.py)
        self.decode_step = Ewma(0.3)            # seconds per decode-ahead step, as measured
        self.decoding_since: float | None = None  # a decode-ahead step is running (started then)
        self.arrived_while_decoding: float | None = None  # when the first batch arrived during that step
        self.waiting_for: str | None = None  # what the verifier waits for from the edge, while it waits

    async def prefill(self, first_token: bool) -> tuple[float, int | None]:
        """Cache the prompt; with `first_token`, also decode and commit the first token in the same pass."""
        if not first_token:
            return await self.lane.run(self.cache.prefill, list(self.state.tokens)), None
        token, seconds = await self.lane.run(self.cache.prefill_with_first_token, list(self.state.tokens))
        self.queue.commit_own(token)
        self.meter.committed(len(self.state.generated))
        return seconds, token

    async def stream(self, request_iterator: AsyncIterator[pb.EdgeMessage]) -> AsyncIterator[pb.CloudMessage]:
        reader = asyncio.create_task(self._guard(self._read(request_iterator), reader=True))
        verifier = asyncio.create_task(self._guard(self._verify(), reader=False))
        try:
            while (item := await self.outbox.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
            if self.state.finished is not None:
                # the edge may still be writing drafts it made before it saw the end: let it close its side
                # first, so that its writes never race the end of the call (bounded by DRAIN_S)
                await asyncio.wait([reader], timeout=DRAIN_S)
        finally:
            reader.cancel()
            verifier.cancel()

    async def record(self, sink: Callable[[SessionRecord], None]) -> None:
        """Settle the cache and hand the end state to `sink`, in one worker job: the call awaiting it may be
        cancelled (the edge hung up), and the settling and the record must happen regardless."""
        def settle() -> None:
            self.cache.settle(self.state.committed_len)
            sink(SessionRecord(self.sid, list(self.state.tokens), list(self.cache.backend.tokens),
                               self.queue.dead_chains))
        await self.lane.run(settle)

    def describe(self) -> dict[str, object]:
        """The protocol state as the cloud sees it (logged when an edge hangs up, e.g. on a stall it detected)."""
        st, q = self.state, self.queue
        run = q.pending or q.verifying
        return {"epoch": st.epoch, "committed_len": st.committed_len, "awaiting_resolution": st.awaiting_resolution,
                "pending": len(q.pending.token_ids) if q.pending else 0, "verifying": q.verifying is not None,
                "drafts_from": run.start_pos if run else None, "decode_ahead": self.decode_ahead,
                "edge_done": self.edge_done, "cloud_waits_for": self.waiting_for}

    async def _guard(self, job, *, reader: bool) -> None:
        """Run a task; its failure goes to the outbox (the stream raises it), its end wakes the other task."""
        try:
            await job
            if not reader:
                self.outbox.put_nowait(_END)
        except BaseException as e:  # noqa: BLE001 - handed to the stream, which ends the call with a status
            self.outbox.put_nowait(e)
        finally:
            if reader:
                self.edge_done = True
                self.wake.set()

    # ---- reader ------------------------------------------------------------------------------------------
    async def _read(self, request_iterator: AsyncIterator[pb.EdgeMessage]) -> None:
        async for msg in request_iterator:
            self.meter.received(msg)
            kind = msg.WhichOneof("kind")
            if kind == "cancel":
                log.info("session %s cancelled by the edge: %s; cloud state: %s", self.sid, msg.cancel.reason,
                         self.describe())
                self.outbox.put_nowait(_END)
                return
            if kind == "tail_request":
                await self._answer_tail(msg.tail_request)
            elif kind == "draft":
                await self._admit(msg.draft)
            else:
                raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"unexpected {kind or 'empty'} message mid-stream")

    async def _answer_tail(self, tr: pb.TailRequest) -> None:
        st = self.state
        if tr.epoch < st.epoch:
            return  # stale: asked before a verdict the edge had not yet seen
        if tr.epoch > st.epoch:
            raise ProtocolError(f"tail request from future epoch {tr.epoch} (current {st.epoch})")
        payload = await self.lane.run(self.cache.more_tail, tr.position, tr.have, st.committed_len)
        self.outbox.put_nowait(pb.CloudMessage(tail=pb.TailSamples(epoch=tr.epoch, position=tr.position, payload=payload)))

    async def _admit(self, b: pb.DraftBatch) -> None:
        st = self.state
        check_next_batch_in(b.next_batch_in_s)
        if st.finished is not None or b.epoch < st.epoch:
            return  # drafted before the edge saw the final verdict, or before a rejection: not even decoded
        if b.parent_index:
            self._admit_tree(b)
            return
        resolved = b.resolved_token if b.HasField("resolved_token") else None
        # decoding a dense q payload is real work (up to 32 x V floats): off the loop
        extras = await asyncio.to_thread(self.cache.scheme.decode_extras, b, self.vocab_size)
        if st.finished is not None or b.epoch < st.epoch:
            return  # the verifier finished the session or rejected meanwhile: the batch went stale while decoded
        if resolved is not None and st.awaiting_resolution:
            self.cache.check_resolved(resolved)
        self.queue.admit(b.epoch, b.start_pos, list(b.token_ids), extras, self.limits.max_draft_len, resolved)
        now = time.perf_counter()
        if self.queued_since is None and self.queue.pending is not None:
            self.queued_since = now
        self.batch_due_at = batch_due_at(now, b.next_batch_in_s)
        if self.decoding_since is not None and self.arrived_while_decoding is None:
            self.arrived_while_decoding = now
        if st.finished is not None:  # the edge's correction ended the session
            self._verdict(st.committed_len, 0, 0, None, False, 0.0)
        self.wake.set()

    def _admit_tree(self, b: pb.DraftBatch) -> None:
        """A token tree (coupled only, without decode-ahead: docs/design.md §3.7); refused INVALID_ARGUMENT otherwise."""
        if not self.cache.scheme.supports_trees:
            raise ProtocolError(f"token trees need the coupled mode, not {self.cache.scheme.name}")
        if not self.cache.supports_trees:
            raise ProtocolError("this cloud's cache cannot verify token trees (they need transformers' DynamicCache, "
                                "the static engine or llama.cpp)")
        if self.decode_ahead:
            raise ProtocolError("token trees need decode_ahead off: a tree is verified against the prefix it grew from")
        if b.HasField("resolved_token") or b.draft_probs or b.q_payload:
            raise ProtocolError("a token tree carries token ids and parent indices only")
        self.queue.admit_tree(b.epoch, b.start_pos, list(b.token_ids), list(b.parent_index), self.limits.max_draft_len)
        if self.queued_since is None and self.queue.pending is not None:
            self.queued_since = time.perf_counter()
        self.wake.set()

    # ---- verifier ----------------------------------------------------------------------------------------
    async def _verify(self) -> None:
        while self.state.finished is None:
            run = await self._next_run()
            if run is not None:
                await self._pass(run)
            elif self.held_back and not self.state.awaiting_resolution:
                await self._decode_one()  # over budget: the cloud's own token, the drafts checked against it
            elif self._may_decode_ahead():
                hold = decode_hold_s(time.perf_counter(), self.batch_due_at, self.decode_step.value,
                                     contended=self.capacity.others_working(self.sid))
                if hold > 0:
                    await self._idle(timeout=hold)  # a batch is due before a step would end: verify it first
                else:
                    await self._decode_one()
            elif self.edge_done:
                return
            else:
                await self._idle()

    def _may_decode_ahead(self) -> bool:
        st = self.state
        return self.decode_ahead and not st.awaiting_resolution and not self.edge_done and st.finished is None

    async def _next_run(self) -> DraftRun | None:
        run = self.queue.take(self._drafts_allowed())
        hook = getattr(self.hooks, "before_decode_ahead", None)
        if run is None and not self.held_back and hook is not None and self._may_decode_ahead():
            await hook()
            run = self.queue.take(self._drafts_allowed())  # drafts that arrived meanwhile go first
        return run

    def _drafts_allowed(self) -> int:
        """The most drafts (or tree nodes) the next pass may verify; sets `held_back` to those of the waiting ones the
        session's budget keeps out."""
        run, most = self.queue.pending, self.limits.max_draft_len
        self.held_back = 0
        if run is None:
            return most
        waiting = min(len(run.token_ids), most)
        allowed = drafts_allowed(self.budget.spent_s, self.budget.tokens, waiting, self.capacity.decode_s,
                                 self.capacity.passes, self.budget.factor, self.budget.slack_steps)
        # down to none only where our own token is the one verification would emit (and never for a tree: the pass
        # over its root is what lets the next one grow); verifying in smaller pieces changes nothing anywhere
        own = self.cache.scheme.own_token_is_emitted(self.cache.params.greedy) and run.parents is None
        floor = 0 if own else 1
        allowed = max(allowed, min(floor, waiting))
        self.held_back = waiting - allowed
        return allowed

    def _spent(self, drafts: int, seconds: float, tokens: int, held_back: int) -> None:
        """Model time spent on this session (a pass over `drafts`, 0: a decode step, that committed `tokens`, with
        `held_back` drafts kept out of it by the budget): its budget, the server's costs and load, the metrics."""
        self.budget.charge(seconds, tokens)
        self.capacity.on_compute(self.sid, drafts, seconds)
        if held_back:
            self.meter.on_capped(held_back)

    async def _idle(self, timeout: float | None = None) -> None:
        """Wait for the edge (drafts, a correction, its end), or at most `timeout` seconds."""
        t0 = time.perf_counter()
        self.waiting_for = waits_for(self.state)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.wake.wait(), timeout)
        self.wake.clear()
        self.waiting_for = None
        self.idle_s += time.perf_counter() - t0

    async def _decode_one(self) -> None:
        """Decode-ahead: a token from the committed prefix, committed unless the edge's correction came first."""
        committed = list(self.state.tokens)
        started = self.decoding_since = time.perf_counter()
        held_back = self.held_back
        try:
            with self.capacity.working(self.sid):
                token, dt = await self.lane.run(self.cache.decode_next, committed)
        finally:
            ended = time.perf_counter()
            waited = ended - self.arrived_while_decoding if self.arrived_while_decoding else 0.0
            self.decoding_since = self.arrived_while_decoding = None
        self.decode_step.add(ended - started)  # the worker's time for it, queueing behind other sessions included
        self.meter.on_compute(dt)  # spent whether or not its token is still at the front
        st = self.state
        at_front = not (st.committed_len != len(committed) or st.awaiting_resolution or st.finished)
        self._spent(0, dt, int(at_front), held_back)
        if not at_front:
            return  # the edge's correction arrived meanwhile: this token is not at the front
        self.queue.commit_own(token)
        if not held_back:
            self.meter.on_decode_ahead()
        await self.lane.run(self.cache.settle, st.committed_len)
        self._verdict(len(committed), 0, 0, token, False, dt, waited_s=waited, capped=held_back)

    async def _pass(self, run: DraftRun) -> None:
        queued_since, self.queued_since = self.queued_since, (time.perf_counter() if self.queue.pending else None)
        held_back = self.held_back
        with self.capacity.working(self.sid):
            out = await self.lane.run(self.cache.verify_run, list(self.state.tokens), run, self._hint_sender(run))
        pass_started = time.perf_counter() - out.compute_s  # after any wait behind other sessions' model work (and
        # their part of a batched pass: compute_s is this session's share)
        c = self.queue.finish_pass(run, out.accepted, out.token, out.rejected, out.path)
        self._spent(len(run.token_ids), out.compute_s, len(c.new_tokens) if c is not None else 0, held_back)
        if self.queue.pending is None:
            self.queued_since = None  # nothing waits (a rejection or a new chain may have dropped what did)
        if c is None:
            return  # the edge abandoned that chain while we verified it
        self.meter.on_pass(len(run.token_ids), c.accepted, len(c.new_tokens), out.compute_s,
                           pass_started - queued_since if queued_since is not None else 0.0)
        if self.state.awaiting_resolution:
            self.cache.open_rejection = out.rejection
        await self.lane.run(self.cache.settle, self.state.committed_len)
        self._verdict(run.start_pos, len(run.token_ids), c.accepted, c.token, c.rejected, out.compute_s,
                      out.rejection.payload if out.rejection else None, run.epoch, path=out.path[: c.accepted],
                      capped=held_back)

    def _hint_sender(self, run: DraftRun) -> Callable[[ExpectedOutcome], None] | None:
        """Called from the model thread mid-pass: queue the hint on the loop so it leaves before the verdict."""
        if not self.cache.exit_layer or run.parents is not None:  # no hints for trees (they run stop-and-wait)
            return None
        loop = asyncio.get_running_loop()

        def send(e: ExpectedOutcome) -> None:
            hint = pb.Hint(epoch=run.epoch, start_pos=run.start_pos, verified=len(run.token_ids),
                           expected_accepted=e.accepted, expected_token=e.token, confidence=e.confidence)
            loop.call_soon_threadsafe(self.outbox.put_nowait, pb.CloudMessage(hint=hint))
        return send

    def _verdict(self, start: int, verified: int, accepted: int, token: int | None, rejected: bool, compute_s: float,
                 res: "ResidualPayload | None" = None, epoch: int | None = None, waited_s: float = 0.0,
                 path: tuple[int, ...] = (), capped: int = 0) -> None:
        st = self.state
        self.meter.committed(len(st.generated))
        if rejected:
            self.batch_due_at = None  # the edge's chain died: its next batch starts from our verdict, not its plan
        self.outbox.put_nowait(pb.CloudMessage(verdict=pb.Verdict(
            epoch=st.epoch if epoch is None else epoch, start_pos=start, accepted=accepted, token=token,
            committed_len=st.committed_len, next_epoch=st.epoch, finished=st.finished is not None,
            finish_reason=st.finished.value if st.finished else "", verify_s=compute_s, rejected=rejected,
            verified=verified, idle_s=self.idle_s, waited_s=waited_s,
            residual_payload=res.topk if res else b"", tail_mass=res.tail_mass if res else 0.0,
            tail_payload=res.tail if res else b"", path=path, capped=capped,
            decode_step_s=self.capacity.passes.measured(0) or 0.0, others_load=self.capacity.others_load(self.sid),
        )))
        self.idle_s = 0.0
