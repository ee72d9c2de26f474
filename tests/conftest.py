"""Shared fixtures: real models from the registry, a real grpc.aio server on a loopback port."""
from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

import pytest

from cloud_server.server import PicoSpecService, start_server
from edge_client.client import EdgeClient
from shared.config import CloudConfig, EdgeConfig
from shared.models import LoadedModel, load_model


@pytest.fixture(scope="session")
def tiny_target() -> LoadedModel:
    return load_model("tiny-random", progress=False)


@pytest.fixture(scope="session")
def tiny_draft() -> LoadedModel:
    return load_model("tiny-random:layers=1", progress=False)


@contextlib.asynccontextmanager
async def serving(target: LoadedModel, **limits: object) -> AsyncIterator[tuple[PicoSpecService, str]]:
    """A cloud server on 127.0.0.1 with an OS-chosen port, torn down afterwards."""
    service = PicoSpecService(target, CloudConfig(target=target.name, **limits))
    server, port = await start_server(service, "127.0.0.1:0")
    try:
        yield service, f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=None)
        service.worker.shutdown(wait=True)


@contextlib.asynccontextmanager
async def edge(address: str, draft: LoadedModel, **cfg: object) -> AsyncIterator[EdgeClient]:
    cfg = {"wait_ready_s": 30.0, **cfg}
    async with EdgeClient(EdgeConfig(server=address, draft=draft.name, **cfg), draft) as client:
        yield client


def run(coro):
    return asyncio.run(coro)
