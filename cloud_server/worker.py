"""The model worker: the one place where the target model and the sessions' KV caches are touched.

Every model step and every cache access of every session (prefill, verification passes, decode-ahead, cache
settling, the end-of-session record, the engine slot's close) goes through a session's `Lane`, so the asyncio loop
never blocks on a model. A lane runs its session's jobs one at a time, in the order they were submitted, whatever
becomes of the tasks awaiting them: a pass whose call was cancelled (the edge hung up) still ends before the
session's settling or close starts, so no two jobs ever touch one cache at once, and an engine slot is never given
back under a pass still writing into it.

Without batching every lane is the worker's one thread: model work is serialised across sessions. With batching
(--batching on) each lane is a thread of its own, and every job's pass goes to the batcher
(cloud_server/engine/batcher.py), whose one thread runs the ready rows of all sessions as one forward pass; only that
thread touches the engine's cache.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

T = TypeVar("T")


async def _run_on(executor: ThreadPoolExecutor, fn: Callable[..., T], *args: object) -> T:
    return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)


class Lane:
    """One session's jobs, run one at a time in submission order (one thread: a FIFO). A cancelled await does not
    cancel a job that has started; the next job still waits for it."""

    def __init__(self, executor: ThreadPoolExecutor, lanes: set["Lane"] | None = None) -> None:
        """`lanes`: the worker's set of lanes with a thread of their own, this one among them; None for a lane on
        the worker's shared thread, which the lane neither owns nor stops."""
        self._executor, self._lanes = executor, lanes

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """Run fn(*args) after the session's earlier jobs and await its result."""
        return await _run_on(self._executor, fn, *args)

    def close(self, wait: bool = False) -> None:
        """No more jobs: a thread of its own ends once the jobs already submitted have (`wait`: wait for that)."""
        if self._lanes is not None:
            self._lanes.discard(self)
            self._executor.shutdown(wait=wait)


class ModelWorker:
    def __init__(self, thread_per_session: bool = False) -> None:
        self._shared = ThreadPoolExecutor(max_workers=1, thread_name_prefix="target-model")
        self._thread_per_session = thread_per_session
        self._lanes: set[Lane] = set()

    def lane(self) -> Lane:
        """A new session's lane: a thread of its own with batching, else the worker's one thread."""
        if not self._thread_per_session:
            return Lane(self._shared)
        lane = Lane(ThreadPoolExecutor(max_workers=1, thread_name_prefix="target-session"), self._lanes)
        self._lanes.add(lane)
        return lane

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """Run fn(*args) on the worker's own thread (work that belongs to no session) and await its result."""
        return await _run_on(self._shared, fn, *args)

    def shutdown(self, wait: bool = True) -> None:
        """Stop every thread; a job submitted afterwards raises RuntimeError."""
        for lane in list(self._lanes):
            lane.close(wait)
        self._shared.shutdown(wait=wait)
