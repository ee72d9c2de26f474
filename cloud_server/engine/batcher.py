"""Batched verification across sessions: one engine thread runs every session's ready rows as one pass.

Sessions' model jobs run on threads of their own (cloud_server/worker.py with batching on); when a job needs a pass
it submits its row here and blocks. The engine thread owns the device: whenever it is free it takes what is
queued, oldest first, up to `max_batch_tokens` tokens, and runs it as one `StaticEngine.run` (or
`LlamaEngine.run`: one llama_decode over the rows, cloud_server/engine/llama_engine.py). Rows that arrive
while a pass runs form the next batch. When fewer rows are queued than sessions are open, a free engine holds the
pass a little (a fraction of a pass, `hold_s`) for the sessions its last pass served, which are about to submit
again; a lone session pays no delay. A row's wait is bounded by the pass ahead of it, that hold and the rows
queued before it; `max_wait_s` is that bound's target: each batch's oldest wait is recorded, and the stats count
rows past it.

A row with an early-exit hook runs alone (its hook reads one row's hidden state mid-pass), and so does a row longer
than the largest graph bucket (a prompt's piece: the rows of a pass are padded to its longest, and a decode row
padded to a prompt's length would cost the prompt's pass and could pad past its slot's end). Each row's result is
its own: rows share matrix products, never keys (each attends only to its own slot), so a session's tokens are
the ones it would get alone (tests/test_batching.py).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from picospec.cloud_server.engine.model import Row, StaticEngine

if TYPE_CHECKING:
    from picospec.cloud_server.engine.llama_engine import LlamaEngine


@dataclass(frozen=True)
class BatchOptions:
    max_batch_tokens: int = 512   # most tokens (padding excluded) in one pass; a longer row still runs, alone
    max_wait_s: float = 0.25      # the target bound on a row's time in the queue (counted when exceeded)
    hold: float = 0.1             # a free engine waits for company up to this fraction of its last pass (hold_s)


def hold_s(queued: int, open_sessions: int, free_for_s: float, last_pass_s: float | None, options: BatchOptions
           ) -> float:
    """How much longer a free engine holds its next pass for more rows: 0 runs it now.

    Without a hold the sessions split into groups that alternate: the ones served by a pass need a few ms to
    turn its logits into a verdict and submit their next rows, and by then the engine has started on the rows that
    queued meanwhile, so they wait a whole pass for the next. Held for a small part of a pass, they join. It holds
    only while fewer rows are queued than sessions are open (a lone session never waits), for at most
    `hold` x the last pass's time and never past `max_wait_s` since the engine became free (`free_for_s` ago)."""
    if queued >= open_sessions or last_pass_s is None:
        return 0.0
    return max(0.0, min(options.hold * last_pass_s, options.max_wait_s) - free_for_s)


@dataclass
class BatchStats:
    passes: int = 0
    rows: int = 0
    tokens: int = 0
    max_wait_s: float = 0.0
    rows_over_wait: int = 0  # rows that waited in the queue past max_wait_s
    busy_s: float = 0.0      # wall time in passes
    cpu_s: float = 0.0       # the engine thread's CPU time in passes (on CUDA: launches and the wait for the device)

    @property
    def mean_rows(self) -> float:
        return self.rows / self.passes if self.passes else 0.0


@dataclass
class _Request:
    row: Row
    queued_at: float
    done: threading.Event = field(default_factory=threading.Event)
    result: torch.Tensor | None = None
    share_s: float = 0.0  # this row's part of its pass's time (pass time x its tokens / the pass's tokens)
    error: BaseException | None = None


def alone(row: Row, max_shared_row: int) -> bool:
    """A row that runs in a pass of its own: one with an early-exit hook (it reads one row's hidden state), or one
    longer than `max_shared_row` (a prompt's piece: every row of a pass is padded to its longest)."""
    return row.exit is not None or len(row.token_ids) > max_shared_row


def take_batch(queue: Sequence[_Request], max_tokens: int, max_shared_row: int = 32) -> int:
    """How many of the queue's oldest requests the next pass takes: at least one; then while the tokens fit and
    no row must run alone."""
    if alone(queue[0].row, max_shared_row):
        return 1
    taken, tokens = 1, len(queue[0].row.token_ids)
    for req in queue[1:]:
        n = len(req.row.token_ids)
        if alone(req.row, max_shared_row) or tokens + n > max_tokens:
            break
        taken, tokens = taken + 1, tokens + n
    return taken


def pass_shares(pass_s: float, batch: Sequence[_Request]) -> list[float]:
    """A shared pass's seconds split between its rows by their tokens (padding charged to nobody): the shares add up
    to the pass, so sessions batched together are charged the model time once, not once each."""
    tokens = [len(req.row.token_ids) for req in batch]
    total = sum(tokens)
    return [pass_s * n / total for n in tokens]


@dataclass(frozen=True)
class PassRecord:
    """One model pass of the batcher, as its observer gets it."""

    rows: int
    tokens: int           # padding excluded
    oldest_wait_s: float  # the longest a row of it waited in the queue
    pass_s: float         # wall time of the pass
    cpu_s: float          # the engine thread's CPU time in it: with the rest of the process's, what the cloud's
                          # session code costs beside the model (picospec-bench serve)


PassObserver = Callable[[PassRecord], None]


class Batcher:
    def __init__(self, engine: "StaticEngine | LlamaEngine", options: BatchOptions = BatchOptions(),
                 on_pass: PassObserver | None = None) -> None:
        self.engine, self.options, self.on_pass = engine, options, on_pass
        self.stats = BatchStats()
        self._queue: list[_Request] = []
        self._cond = threading.Condition()
        self._closed = False
        self._free_since = time.perf_counter()  # when the engine last finished a pass
        self._last_pass_s: float | None = None
        self._thread = threading.Thread(target=self._loop, name="engine-batcher", daemon=True)
        self._thread.start()

    def submit(self, row: Row) -> tuple[torch.Tensor, float]:
        """Run `row` in the next pass that has room for it; its logits (as StaticEngine.run gives them) and its share
        of the pass's seconds (`pass_shares`): what the cloud's compute accounting charges the row's session."""
        req = _Request(row, time.perf_counter())
        with self._cond:
            if self._closed:
                raise RuntimeError("the engine's batcher has stopped")
            self._queue.append(req)
            self._cond.notify()
        req.done.wait()
        if req.error is not None:
            raise req.error
        return req.result, req.share_s

    def close(self) -> None:
        """Stop after the pass in flight; rows still queued fail with RuntimeError."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=60)

    def _next(self) -> list[_Request] | None:
        with self._cond:
            while not self._closed:
                if not self._queue:
                    self._cond.wait()
                    continue
                free_for = time.perf_counter() - self._free_since
                delay = hold_s(len(self._queue), self.engine.slots_in_use, free_for, self._last_pass_s, self.options)
                if delay <= 0.0:
                    break
                self._cond.wait(delay)  # a row submitted meanwhile wakes it to look again
            if self._closed:
                for req in self._queue:
                    req.error = RuntimeError("the engine's batcher has stopped")
                    req.done.set()
                self._queue.clear()
                return None
            n = take_batch(self._queue, self.options.max_batch_tokens, self.engine.max_shared_row)
            batch, self._queue = self._queue[:n], self._queue[n:]
            return batch

    def _loop(self) -> None:
        while (batch := self._next()) is not None:
            started, cpu_started = time.perf_counter(), time.thread_time()
            waits = [started - req.queued_at for req in batch]
            try:
                results = self.engine.run([req.row for req in batch])
                for req, out in zip(batch, results):
                    req.result = out
            except BaseException as e:  # noqa: BLE001 - handed to every waiting job, which raises it as its own
                for req in batch:
                    req.error = e
            self._free_since = time.perf_counter()
            self._last_pass_s = self._free_since - started
            self._record(batch, waits, self._last_pass_s, time.thread_time() - cpu_started)
            for req, share in zip(batch, pass_shares(self._last_pass_s, batch)):  # the time `busy_s` counts, split
                req.share_s = share
                req.done.set()

    def _record(self, batch: list[_Request], waits: list[float], pass_s: float, cpu_s: float) -> None:
        record = PassRecord(len(batch), sum(len(req.row.token_ids) for req in batch), max(waits), pass_s, cpu_s)
        st = self.stats
        st.passes += 1
        st.rows += record.rows
        st.tokens += record.tokens
        st.max_wait_s = max(st.max_wait_s, record.oldest_wait_s)
        st.rows_over_wait += sum(w > self.options.max_wait_s for w in waits)
        st.busy_s += pass_s
        st.cpu_s += cpu_s
        if self.on_pass is not None:
            self.on_pass(record)
