"""Session slots: how many sessions a server runs at once, in all and per client, counted in one place."""
from __future__ import annotations

import collections
import contextlib
from typing import AsyncIterator

import grpc

from picospec.cloud_server.handshake import Refusal


class SessionSlots:
    def __init__(self, limit: int, per_client: int = 0) -> None:
        self.limit = limit
        self.per_client = per_client  # 0: no limit of its own
        self.active = 0
        self.by_client: collections.Counter[str] = collections.Counter()

    @contextlib.asynccontextmanager
    async def hold(self, client: str = "") -> AsyncIterator[None]:
        """Hold a slot for the body's duration; refuse with RESOURCE_EXHAUSTED when all are taken, or when
        `client` already holds its --max-sessions-per-client."""
        if self.active >= self.limit:
            raise Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, f"server is at its limit of {self.limit} sessions")
        if self.per_client and self.by_client[client] >= self.per_client:
            raise Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"client {client!r} is at its limit of {self.per_client} concurrent sessions "
                          "(--max-sessions-per-client)")
        self.active += 1
        self.by_client[client] += 1
        try:
            yield
        finally:
            self.active -= 1
            self.by_client[client] -= 1
            if not self.by_client[client]:
                del self.by_client[client]
