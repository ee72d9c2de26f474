"""Session slots: how many sessions a server runs at once, in all and per client, counted in one place; and the
retry hint a refused edge gets (when a slot is likely to be free); and the drain (SIGTERM: no new sessions while
the running ones finish, cloud_server/drain.py)."""
from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from typing import AsyncIterator

import grpc

from picospec.cloud_server.handshake import Refusal
from picospec.shared.perf_model import Ewma

RETRY_AFTER_BOUNDS_S = (0.1, 5.0)  # the hint's range: not a busy loop, not a long sleep past a freed slot
ENDING_WAIT_S = 5.0  # how long a new session waits for a slot whose session is past its last message (settling)


def retry_after_s(mean_session_s: float | None, limit: int) -> float:
    """When a slot is likely to be free, from the sessions' mean duration D: with `limit` sessions running at
    ages spread over D, the next one ends about D / (limit + 1) from now. 1 s before any session has ended."""
    if mean_session_s is None:
        return 1.0
    low, high = RETRY_AFTER_BOUNDS_S
    return min(high, max(low, mean_session_s / (limit + 1)))


DRAINING = "the cloud is draining (shutting down): it starts no new sessions; retry on another replica"


def _decrement(counts: collections.Counter[str], key: str) -> None:
    """One fewer for `key`, dropping it at zero (the counters list only clients that hold something)."""
    counts[key] -= 1
    if not counts[key]:
        del counts[key]


def worth_waiting(full: bool, any_ending: bool, client_full: bool, client_ending: bool) -> bool:
    """Whether a new session refused now should rather wait: every limit that stops it (the server's, its
    client's) has a slot whose session is past its last message, which frees once it has settled (milliseconds,
    up to a model pass in flight)."""
    return (full or client_full) and (any_ending or not full) and (client_ending or not client_full)


class HeldSlot:
    """A held slot; `ending()` marks its session as past its last message, only settling before it lets go."""

    def __init__(self, slots: "SessionSlots", client: str) -> None:
        self.slots, self.client, self.is_ending = slots, client, False

    def ending(self) -> None:
        if not self.is_ending:
            self.is_ending = True
            self.slots.ending[self.client] += 1


class SessionSlots:
    def __init__(self, limit: int, per_client: int = 0) -> None:
        self.limit = limit
        self.per_client = per_client  # 0: no limit of its own
        self.active = 0
        self.by_client: collections.Counter[str] = collections.Counter()
        self.session_s = Ewma(0.2)  # how long sessions hold a slot
        # per client: held slots whose sessions have ended and only settle (milliseconds) before they let go
        self.ending: collections.Counter[str] = collections.Counter()
        self.draining = False
        self.idle = asyncio.Event()  # set while no slot is held (the drain waits on it)
        self.idle.set()
        self.freed = asyncio.Event()  # set (and replaced) each time a slot is given back

    def drain(self) -> None:
        """From now on refuse every new session UNAVAILABLE; the ones holding slots go on."""
        self.draining = True

    @contextlib.asynccontextmanager
    async def hold(self, client: str = "") -> AsyncIterator[HeldSlot]:
        """Hold a slot for the body's duration; refuse UNAVAILABLE while draining, and RESOURCE_EXHAUSTED when
        all are taken, or when `client` already holds its --max-sessions-per-client. Where the slot it needs is
        ending (a client's next generation right after its last one), it waits for it first, at most
        ENDING_WAIT_S, and a refusal after that hints the shortest retry."""
        await self._wait_for_ending(client)
        if self.draining:
            raise Refusal(grpc.StatusCode.UNAVAILABLE, DRAINING, reason="draining")
        soon = RETRY_AFTER_BOUNDS_S[0]
        if self.active >= self.limit:
            hint = soon if sum(self.ending.values()) else retry_after_s(self.session_s.value, self.limit)
            raise Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"server is at its limit of {self.limit} sessions; retry in about {hint:.1f} s",
                          retry_after_s=hint, reason="limit")
        if self.per_client and self.by_client[client] >= self.per_client:
            hint = soon if self.ending[client] else retry_after_s(self.session_s.value, self.per_client)
            raise Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"client {client!r} is at its limit of {self.per_client} concurrent sessions "
                          f"(--max-sessions-per-client); retry in about {hint:.1f} s", retry_after_s=hint,
                          reason="per-client")
        self.active += 1
        self.by_client[client] += 1
        self.idle.clear()
        started, held = time.perf_counter(), HeldSlot(self, client)
        try:
            yield held
        finally:
            if held.is_ending:
                _decrement(self.ending, client)
            self.session_s.add(time.perf_counter() - started)
            self.active -= 1
            _decrement(self.by_client, client)
            if not self.active:
                self.idle.set()
            self.freed.set()  # wakes the sessions waiting for an ending slot (_wait_for_ending)
            self.freed = asyncio.Event()

    async def _wait_for_ending(self, client: str) -> None:
        deadline = time.perf_counter() + ENDING_WAIT_S
        while not self.draining and self._stopped_by_ending_slots(client):
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.freed.wait(), left)

    def _stopped_by_ending_slots(self, client: str) -> bool:
        client_full = bool(self.per_client) and self.by_client[client] >= self.per_client
        return worth_waiting(self.active >= self.limit, bool(self.ending), client_full, bool(self.ending[client]))

    async def wait_idle(self, timeout: float | None) -> bool:
        """Wait until no slot is held, at most `timeout` seconds; whether none is."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.idle.wait(), timeout)
        return self.active == 0
