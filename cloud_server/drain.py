"""Stopping the cloud without dropping work: the first SIGTERM (or SIGINT) drains, a second one stops at once.

    1. health NOT_SERVING for every service at once, and new sessions refused UNAVAILABLE ("draining"), so
       balancers and edges move to another replica (an edge resumes there, docs/design.md §4.1);
    2. running sessions get up to --grace-s to finish on their own;
    3. the ones still running are ended UNAVAILABLE "the cloud is shutting down (--grace-s N elapsed)"
       (`shutdown_message`; an edge with --reconnect-s resumes elsewhere), and the server stops;
    4. the process exits 0: a drain is an orderly stop, whatever the sessions did.
A second signal during 2 ends the sessions at once (step 3 with "a second signal"). Each step is logged.
"""
from __future__ import annotations

import asyncio
import logging
import signal
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from picospec.cloud_server.server import PicoSpecService

log = logging.getLogger("picospec.cloud")
ENDED_S = 5.0    # after the sessions are told to end, how long their calls get to carry the status to the edges
AT_ONCE_S = 0.5  # the same after a second signal


def shutdown_message(grace_s: float, second_signal: bool = False) -> str:
    """The status message of a session the drain ends (what the edge shows its user)."""
    if second_signal:
        return "the cloud is shutting down (stopped at once by a second signal during the drain)"
    return f"the cloud is shutting down (--grace-s {grace_s:g} elapsed)"


class StopSignals:
    """The stop signals received: the first starts the drain (`first`), any later one ends it (`again`)."""

    def __init__(self) -> None:
        self.first = asyncio.Event()
        self.again = asyncio.Event()
        self.names: list[str] = []

    def received(self, signum: int) -> None:
        self.names.append(signal.Signals(signum).name)
        (self.again if self.first.is_set() else self.first).set()
        if self.again.is_set():
            log.warning("%s during the drain: stopping at once", self.names[-1])


async def wait_any(*events: asyncio.Event, timeout: float | None) -> None:
    """Until one of `events` is set, or `timeout` seconds."""
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


async def drain(service: "PicoSpecService", server, signals: StopSignals, grace_s: float) -> None:
    """Steps 1 to 3 above, then stop the gRPC server (and the metrics endpoint)."""
    running = service.slots.active
    log.info("%s: draining: health NOT_SERVING, new sessions refused; %d running get up to %g s (--grace-s)",
             signals.names[0] if signals.names else "stop", running, grace_s)
    await service.begin_drain()
    await wait_any(service.slots.idle, signals.again, timeout=grace_s)
    if service.slots.active:
        n = service.end_sessions(shutdown_message(grace_s, signals.again.is_set()))
        log.warning("ending %d sessions still running: %s", n, service.shutdown_refusal)
        await wait_any(service.slots.idle, timeout=AT_ONCE_S if signals.again.is_set() else ENDED_S)
    else:
        log.info("drain: every session finished")
    await server.stop(grace=0.0 if signals.again.is_set() else 1.0)
    service.metrics.close()
    log.info("stopped")
