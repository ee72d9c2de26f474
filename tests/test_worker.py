"""The model worker's lanes (cloud_server/worker.py), without gRPC or models: a session's jobs run one at a time in
order, a cancelled await does not let the next job overtake the one still running, and sessions' lanes run side by
side only with a thread per session."""
from __future__ import annotations

import asyncio
import threading

import pytest

from picospec.cloud_server.worker import ModelWorker
from tests.conftest import run

SHORT_S = 0.2  # long enough for a job that could run to have run


async def _blocked(lane_run, order: list[str], name: str) -> tuple[asyncio.Future, threading.Event]:
    """A job on the lane that has started and holds until the returned event is set."""
    started, let_go = threading.Event(), threading.Event()

    def job() -> None:
        started.set()
        let_go.wait(10)
        order.append(name)

    task = asyncio.ensure_future(lane_run(job))
    assert await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
    return task, let_go


def test_a_job_whose_await_was_cancelled_still_ends_before_the_lanes_next_job():
    async def scenario() -> list[str]:
        worker = ModelWorker(thread_per_session=True)
        lane, order = worker.lane(), []
        try:
            task, let_go = await _blocked(lane.run, order, "pass")
            task.cancel()  # the call ended: nobody awaits the pass any more, but it is still running
            close = asyncio.ensure_future(lane.run(order.append, "close"))
            done, _ = await asyncio.wait({close}, timeout=SHORT_S)
            assert not done and order == [], "the close ran beside the pass"
            let_go.set()
            await close
            return order
        finally:
            lane.close()
            worker.shutdown()

    assert run(scenario()) == ["pass", "close"]


@pytest.mark.parametrize("thread_per_session", [True, False])
def test_sessions_lanes_run_side_by_side_only_with_a_thread_per_session(thread_per_session: bool):
    async def scenario() -> tuple[bool, list[str]]:
        worker = ModelWorker(thread_per_session=thread_per_session)
        first, second, order = worker.lane(), worker.lane(), []
        try:
            _, let_go = await _blocked(first.run, order, "first")
            other = asyncio.ensure_future(second.run(order.append, "second"))
            done, _ = await asyncio.wait({other}, timeout=SHORT_S)
            let_go.set()
            await other
            return bool(done), order
        finally:
            first.close()
            second.close()
            worker.shutdown()

    ran_beside, order = run(scenario())
    assert ran_beside == thread_per_session
    assert order == (["second", "first"] if thread_per_session else ["first", "second"])


def test_a_shut_down_worker_refuses_new_jobs_on_every_lane():
    async def scenario() -> None:
        worker = ModelWorker(thread_per_session=True)
        lane = worker.lane()
        worker.shutdown()
        with pytest.raises(RuntimeError):
            await lane.run(lambda: None)

    run(scenario())
