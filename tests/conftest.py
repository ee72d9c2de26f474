"""Shared fixtures: real models from the registry, a real grpc.aio server on a loopback port."""
from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

import pytest

from picospec.cloud_server.grpc_setup import start_server
from picospec.cloud_server.server import PicoSpecService
from picospec.edge_client.client import EdgeClient
from picospec.shared.config import CloudConfig, EdgeConfig
from picospec.shared.models import LoadedModel, load_model

# ---- CI: fixed hypothesis examples, and no silent skips ------------------------------------------------------------
import datetime
import os

from hypothesis import settings as _hypothesis_settings

CI = os.environ.get("CI", "").lower() == "true"

# make test runs the tests marked `parallel` two at a time (pytest-xdist workers): one torch thread per worker, so
# the two workers share the two cores instead of four threads contending for them
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    torch.set_num_threads(1)
# "ci": the same examples on every run (derandomize, no example database), a deadline, a bounded count; tests that
# set their own max_examples or deadline keep them. HYPOTHESIS_PROFILE picks one explicitly (e.g. ci, locally).
_hypothesis_settings.register_profile("ci", derandomize=True, database=None, deadline=datetime.timedelta(seconds=5),
                                      max_examples=100, print_blob=True)
_hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if CI else "default"))

# Skips that are allowed under CI=true: the CUDA test on a machine without a GPU, and the large-model tests when the
# run asked for that itself (PICOSPEC_SKIP_LARGE=1, make test-fast). Any other skip fails the test under CI.
CI_ALLOWED_SKIPS = ("no CUDA device", "PICOSPEC_SKIP_LARGE=1")
SKIP_LARGE = os.environ.get("PICOSPEC_SKIP_LARGE") == "1"
# the large-model tests (the GGUFs `make models` prepares), skipped by make test-fast
skip_large = pytest.mark.skipif(SKIP_LARGE, reason="PICOSPEC_SKIP_LARGE=1 (make test-fast)")


def skip_or_fail(reason: str) -> None:
    """pytest.skip outside CI; under CI=true, fail with the same reason (what could not run was not tested)."""
    if CI:
        pytest.fail(f"CI=true: cannot run, and CI does not skip: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if not (CI and rep.skipped) or hasattr(rep, "wasxfail"):
        return
    reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
    if not any(allowed in reason for allowed in CI_ALLOWED_SKIPS):
        rep.outcome = "failed"
        rep.longrepr = f"CI=true: skipped tests fail in CI; this one skipped with: {reason}"


@pytest.fixture(scope="session")
def tiny_target() -> LoadedModel:
    return load_model("tiny-random", progress=False)


@pytest.fixture(scope="session")
def tiny_draft() -> LoadedModel:
    return load_model("tiny-random:layers=1", progress=False)


class PassBeforeDecodeAhead:
    """Cloud test hooks: in each session the cloud decodes ahead only once it has verified a pass (or 2 s on), so a
    pipeline session both verifies drafts and decodes ahead on any machine, however loaded: an ordering, not a clock
    (the tiny target decodes faster than drafts arrive, and would otherwise decode everything alone). Sessions one at
    a time. `jitter`: seeded delays on the cloud's messages as well (bench/jitter.py)."""

    def __init__(self, jitter: object | None = None) -> None:
        self.verified = asyncio.Event()
        self.jitter = jitter

    async def before_send(self, msg: object) -> None:
        kind = msg.WhichOneof("kind")
        if kind == "ready":  # a new session
            self.verified.clear()
        elif kind == "verdict" and msg.verdict.verified > 0:
            self.verified.set()
        if self.jitter is not None:
            await self.jitter.before_send(msg)

    async def before_decode_ahead(self) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.verified.wait(), 2.0)  # an edge choosing length 0 sends nothing at first


@contextlib.asynccontextmanager
async def serving(target: LoadedModel, **limits: object) -> AsyncIterator[tuple[PicoSpecService, str]]:
    """A cloud server on 127.0.0.1 with an OS-chosen port, torn down afterwards.

    The verification budget is off unless a test asks for it: the tiny models' passes take well under a millisecond,
    where it would act on timer noise, and the tests of the protocol's paths count verdicts of each kind. Its own
    tests (test_capacity.py) turn it on."""
    limits = {"verify_budget": 0.0, **limits}
    service = PicoSpecService(target, CloudConfig(target=target.name, **limits))
    server, port = await start_server(service, "127.0.0.1:0")
    try:
        yield service, f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=None)
        service.metrics.close()
        service.worker.shutdown(wait=True)


@contextlib.asynccontextmanager
async def edge(address: str, draft: LoadedModel, **cfg: object) -> AsyncIterator[EdgeClient]:
    cfg = {"wait_ready_s": 30.0, **cfg}
    async with EdgeClient(EdgeConfig(server=address, draft=draft.name, **cfg), draft) as client:
        yield client


def run(coro):
    return asyncio.run(coro)
