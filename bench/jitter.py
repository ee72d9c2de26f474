"""Seeded timing hooks for the wire (fault injection for tests and `picospec-bench stress`; production passes none).

`Jitter` is both an EdgeHooks and a CloudHooks: before each message goes out and after each arrives it sleeps a
seeded random 0..max_s (nothing two times in three), so drafting, verification and the wire interleave differently
from seed to seed, reproducibly, without a sleep in the program under test.
"""
from __future__ import annotations

import asyncio
import random
from typing import Any


class Jitter:
    def __init__(self, seed: int, max_s: float) -> None:
        self.rng, self.max_s = random.Random(seed), max_s

    async def _pause(self) -> None:
        d = self.rng.choice([0.0, 0.0, self.rng.uniform(0, self.max_s)])
        await asyncio.sleep(d)  # 0 still yields: other tasks get to run first

    async def before_send(self, msg: Any) -> None:
        await self._pause()

    async def after_receive(self, msg: Any) -> None:
        await self._pause()
