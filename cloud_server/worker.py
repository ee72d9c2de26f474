"""The model worker: the one place where the target model and the sessions' KV caches are touched.

Every model step and every cache access of every session (prefill, verification passes, decode-ahead, cache
settling, the end-of-session record) goes through `ModelWorker.run`, which runs it on the worker's single
thread. So model work is serialised, no two jobs ever touch a cache at once, and the asyncio loop never blocks
on a model. Sessions submit work and await it; this is the seam where batched verification across sessions
will go (a worker that gathers ready work into one forward pass).
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

T = TypeVar("T")


class ModelWorker:
    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="target-model")

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """Run fn(*args) on the model thread and await its result."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def shutdown(self, wait: bool = True) -> None:
        self._executor.shutdown(wait=wait)
