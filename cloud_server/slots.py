"""Session slots: how many sessions a server runs at once, counted in one place."""
from __future__ import annotations

import contextlib
from typing import AsyncIterator

import grpc

from picospec.cloud_server.handshake import Refusal


class SessionSlots:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        """Hold a slot for the body's duration; refuse with RESOURCE_EXHAUSTED when all are taken."""
        if self.active >= self.limit:
            raise Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED, f"server is at its limit of {self.limit} sessions")
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
