"""The edge's half-close (edge_client/transport.py): a write nobody awaits must end without an exception whatever the
call raises under it; one left on the task is what asyncio logs as "Task exception was never retrieved" (`serve`
logged 8 in 60 requests, mostly after clients disconnected). No gRPC server: a stand-in call raises what gRPC's core
raised there."""
from __future__ import annotations

import asyncio

import grpc
import pytest

from picospec.edge_client.stats import GenerationStats
from picospec.edge_client.transport import StreamTransport


class ExecuteBatchError(Exception):
    """Stands in for grpc._cython.cygrpc.ExecuteBatchError, which a cancelled call's write raised: not one of the
    gRPC error classes the transport could name."""


class CallEndedUnderTheWrite:
    """A stand-in for a grpc.aio stream-stream call that ended while the half-close was being written."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    async def read(self):
        await asyncio.Event().wait()  # nothing more comes

    async def done_writing(self) -> None:
        await asyncio.sleep(0)
        raise self.error

    def cancel(self) -> bool:
        return True


@pytest.mark.parametrize("error", [ExecuteBatchError("Failed 'execute_batch': INTERNAL"),
                                   grpc.aio.UsageError("the call was cancelled"), asyncio.InvalidStateError()],
                         ids=["core-error", "grpc-usage", "invalid-state"])
def test_a_half_close_that_fails_in_the_background_ends_without_an_exception(error):
    async def scenario() -> BaseException | None:
        transport = StreamTransport(CallEndedUnderTheWrite(error), GenerationStats(mode="pipeline"), None, "cloud:1")
        transport.half_close()
        for _ in range(5):
            await asyncio.sleep(0)
        transport.close(cancel=True)
        assert transport.closing.done()
        return transport.closing.exception()  # what asyncio would log, unretrieved, when the task is collected

    assert asyncio.run(scenario()) is None
