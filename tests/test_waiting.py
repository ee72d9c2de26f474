"""An edge that talks while it waits for the cloud: the retry schedule and messages (pure), the client's retries
against a port where nothing listens, and the CLI's stderr within seconds of starting."""
from __future__ import annotations

import asyncio
import os
import subprocess
import time
import sys
from pathlib import Path

import pytest

from picospec.edge_client.client import EdgeError
from picospec.edge_client.waiting import WaitProgress, retry_delay_s, should_report
from tests.conftest import edge, run
from tests.proc_util import free_port

BIN = Path(sys.executable).parent


def _closed_port() -> str:
    return f"127.0.0.1:{free_port()}"


def test_retry_schedule_doubles_to_two_seconds():
    assert [retry_delay_s(a) for a in range(1, 7)] == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0]


def test_progress_is_reported_first_then_every_five_seconds():
    def at(s: float) -> WaitProgress:
        return WaitProgress("h:1", 3, s, "refused")

    assert should_report(at(0.1), None) and not should_report(at(4.0), 0.1) and should_report(at(5.2), 0.1)
    assert at(0).first_message() == "waiting for the cloud at h:1 (retrying, Ctrl-C to stop)"
    give_up = at(61).give_up_message()
    assert "h:1 is not reachable after 61 s (3 attempts; last error: refused)" in give_up and "--server" in give_up


def test_client_retries_reports_each_failure_and_gives_up_naming_what_it_tried(tiny_draft):
    server, seen = _closed_port(), []

    async def scenario():
        async with edge(server, tiny_draft) as client:
            t0 = time.monotonic()
            with pytest.raises(EdgeError, match=rf"cloud at {server} is not reachable after \d+ s \(\d+ attempts; "
                                                r"last error: .+\)"):
                await client.connect(wait_s=2.0, on_retry=seen.append)
            return time.monotonic() - t0

    took = run(scenario())
    assert 2.0 <= took < 6.0, took
    assert len(seen) >= 3 and seen[0].elapsed_s < 1.0, seen  # the first failure is known within a second
    assert [p.attempts for p in seen] == list(range(1, len(seen) + 1))


@pytest.mark.parametrize("mode", ["cloud", "sync", "pipeline"])
def test_a_generation_cancelled_while_it_waits_for_the_cloud_ends_as_cancelled(tiny_draft, mode):
    """Cancelled before any session began (still connecting): the stats end as "cancelled", as they do for one
    cancelled mid-session (found by picospec-bench stress, whose hang path cancels at any moment)."""
    async def scenario():
        async with edge(_closed_port(), tiny_draft, wait_ready_s=30.0) as client:
            gen = client.generate([1, 2, 3], mode=mode)
            task = asyncio.ensure_future(gen.collect())
            await asyncio.sleep(0.3)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return gen.stats

    stats = run(scenario())
    assert stats.finish_reason == "cancelled" and stats.finished_at is not None


def test_cli_says_it_is_waiting_within_seconds_and_fails_clearly():
    """The probe runs before torch is imported and beside the draft's load: the user hears within seconds."""
    server = _closed_port()
    t0 = time.monotonic()
    proc = subprocess.Popen([BIN / "picospec-edge", "--server", server, "--draft", "tiny-random", "--prompt", "hi",
                             "--mode", "sync", "--wait-ready-s", "7"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    for line in proc.stderr:
        lines.append((time.monotonic() - t0, line))
    assert proc.wait(timeout=120) != 0
    err = "".join(line for _, line in lines)
    first = f"picospec-edge: waiting for the cloud at {server} (retrying, Ctrl-C to stop)"
    said_at = next(t for t, line in lines if first in line)
    assert said_at < 3.0, (said_at, err)   # 0.25 s unloaded; the process start and grpc's import dominate
    assert f"still waiting for the cloud at {server}" in err, err
    assert f"cloud at {server} is not reachable after" in err, err
    assert "Traceback" not in err, err


def test_a_cloud_that_comes_up_later_is_found_within_seconds(tiny_target, tiny_draft):
    """The edge starts first; the cloud starts on that port after the edge reported its first failed attempt."""
    from picospec.cloud_server.grpc_setup import start_server
    from picospec.cloud_server.server import PicoSpecService
    from picospec.shared.config import CloudConfig

    server, seen = _closed_port(), []

    async def scenario():
        first_failure = asyncio.Event()

        def on_retry(p: WaitProgress) -> None:
            seen.append(p)
            first_failure.set()

        async with edge(server, tiny_draft) as client:
            waiting = asyncio.ensure_future(client.connect(wait_s=30.0, on_retry=on_retry))
            await asyncio.wait_for(first_failure.wait(), 10)
            service = PicoSpecService(tiny_target, CloudConfig(target=tiny_target.name))
            cloud, _ = await start_server(service, server)
            t0 = time.monotonic()
            try:
                info = await asyncio.wait_for(waiting, 30)
                return info, time.monotonic() - t0
            finally:
                await cloud.stop(grace=None)
                service.worker.shutdown(wait=True)

    info, after = run(scenario())
    assert info.target_model == tiny_target.name and seen
    assert after < 5.0, after  # the reconnect backoff is capped at 2 s (gRPC's own grows to 120 s)
