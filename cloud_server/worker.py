"""The model worker: the one place where the target model and the sessions' KV caches are touched.

Every model step and every cache access of every session (prefill, verification passes, decode-ahead, cache
settling, the end-of-session record) goes through `ModelWorker.run`, so the asyncio loop never blocks on a model.
Without batching the worker has one thread: model work is serialised and no two jobs ever touch a cache at once.
With batching (--batching on) it has a thread per session: a session still runs one job at a time (it awaits
each), and every job's pass goes to the batcher (shared/engine/batcher.py), whose one thread runs the ready rows
of all sessions as one forward pass; only that thread touches the engine's cache.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

T = TypeVar("T")


class ModelWorker:
    def __init__(self, threads: int = 1) -> None:
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="target-model")

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """Run fn(*args) on a model thread and await its result."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def shutdown(self, wait: bool = True) -> None:
        self._executor.shutdown(wait=wait)
