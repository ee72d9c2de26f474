"""Session slots: how many sessions a server runs at once, in all and per client, counted in one place; and the
drain (SIGTERM: no new sessions while the running ones finish, cloud_server/drain.py)."""
from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import AsyncIterator

import grpc

from picospec.cloud_server.handshake import Refusal

DRAINING = "the cloud is draining (shutting down): it starts no new sessions; retry on another replica"


class SessionSlots:
    def __init__(self, limit: int, per_client: int = 0) -> None:
        self.limit = limit
        self.per_client = per_client  # 0: no limit of its own
        self.active = 0
        self.by_client: collections.Counter[str] = collections.Counter()
        self.draining = False
        self.idle = asyncio.Event()  # set while no slot is held (the drain waits on it)
        self.idle.set()

    def drain(self) -> None:
        """From now on refuse every new session UNAVAILABLE; the ones holding slots go on."""
        self.draining = True

    @contextlib.asynccontextmanager
    async def hold(self, client: str = "") -> AsyncIterator[None]:
        """Hold a slot for the body's duration; refuse UNAVAILABLE while draining, and RESOURCE_EXHAUSTED when
        all are taken, or when `client` already holds its --max-sessions-per-client."""
        if self.draining:
            raise Refusal(grpc.StatusCode.UNAVAILABLE, DRAINING, "draining")
        if self.active >= self.limit:
            raise Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, f"server is at its limit of {self.limit} sessions",
                          "limit")
        if self.per_client and self.by_client[client] >= self.per_client:
            raise Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"client {client!r} is at its limit of {self.per_client} concurrent sessions "
                          "(--max-sessions-per-client)", "per-client")
        self.active += 1
        self.by_client[client] += 1
        self.idle.clear()
        try:
            yield
        finally:
            self.active -= 1
            self.by_client[client] -= 1
            if not self.by_client[client]:
                del self.by_client[client]
            if not self.active:
                self.idle.set()

    async def wait_idle(self, timeout: float | None) -> bool:
        """Wait until no slot is held, at most `timeout` seconds; whether none is."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.idle.wait(), timeout)
        return self.active == 0
