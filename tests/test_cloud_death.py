"""The cloud process dying mid-generation, as a real `picospec-cloud` process killed with SIGKILL.

A cloud that comes back is tests/test_resume.py's; here it stays dead. What this file proves: with --reconnect-s 0
the edge fails at once (with 1.5 s, once those have passed; well inside DEATH_DEADLINE_S, not at its generation
deadline) with `CloudLost`, an `EdgeError` whose message names the cloud's address and says the connection was lost; the tokens
it yielded before are the target's own greedy tokens (each was committed on both sides before it was yielded);
and the client stays usable (the draft alone still generates, a reconnect attempt fails fast and clearly) and
closes without hanging. The edge is in process, so its state can be inspected; the cloud is a separate process,
so its death is a real one (the kernel closes its sockets).
"""
from __future__ import annotations

import asyncio
import re
import subprocess
import time
from typing import Iterator, Sequence

import pytest
import torch

from picospec.edge_client.client import CloudLost, EdgeError
from tests.conftest import edge, run
from tests.proc_util import cloud_process

START_TIMEOUT_S = 120   # a cold start imports torch and transformers: seconds, more on a loaded machine
DEATH_DEADLINE_S = 20   # how long the edge may take to report the death
STEP_S = 60.0
TOKENS_BEFORE_KILL = 8


def greedy_reference(model, prompt_ids: Sequence[int], n: int) -> list[int]:
    """The target's greedy tokens by plain full forward passes (no cache)."""
    seq = list(prompt_ids)
    with torch.inference_mode():
        for _ in range(n):
            seq.append(int(model.model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt_ids):]


@pytest.fixture
def cloud() -> Iterator[tuple[subprocess.Popen[str], str]]:
    """A tiny-random cloud on an OS-chosen port; its address is read from its "serving" line, with a deadline."""
    with cloud_process("tiny-random", "--log-level", "WARNING", start_s=START_TIMEOUT_S) as started:
        yield started  # the test kills it first; cloud_process covers a test that failed before it could


async def tokens_until_death(gen, proc: subprocess.Popen[str]) -> tuple[list[int], BaseException | None, float]:
    """Read chunks until TOKENS_BEFORE_KILL tokens have arrived, SIGKILL the cloud, read on until the generation
    fails. Returns every token yielded, the failure, and the seconds from the kill to the failure."""
    got: list[int] = []
    while len(got) < TOKENS_BEFORE_KILL:
        got += await asyncio.wait_for(gen.__anext__(), STEP_S)
    proc.kill()
    proc.wait(timeout=15)
    killed_at = time.monotonic()
    try:
        while True:  # chunks committed before the death may still be queued: they are yielded first
            got += await asyncio.wait_for(gen.__anext__(), DEATH_DEADLINE_S)
    except StopAsyncIteration:
        return got, None, time.monotonic() - killed_at
    except asyncio.TimeoutError:
        pytest.fail(f"no error within {DEATH_DEADLINE_S} s of the cloud's death: a hang; state {gen.describe()}")
    except Exception as e:  # noqa: BLE001 - examined by the caller
        return got, e, time.monotonic() - killed_at


@pytest.mark.parametrize("mode,resume_s", [("pipeline", 0.0), ("sync", 1.5)])
def test_cloud_killed_mid_stream_is_a_clear_error_and_the_client_survives(tiny_target, tiny_draft, cloud, mode,
                                                                          resume_s):
    """--reconnect-s 0: no resume, the break is the error at once; 1.5: the edge tries to resume for 1.5 s, then
    gives up naming the server, its attempts and the last error (tests/test_resume.py: a cloud that comes back)."""
    proc, address = cloud
    prompt = list(tiny_target.tokenizer("hello world")["input_ids"])

    async def scenario():
        async with edge(address, tiny_draft, max_new_tokens=4000, ignore_eos=True, wait_ready_s=STEP_S,
                        reconnect_s=resume_s) as client:
            got, error, took = await tokens_until_death(client.generate(prompt, mode=mode), proc)
            alone = await asyncio.wait_for(client.generate(prompt, mode="edge", max_new_tokens=4).collect(), STEP_S)
            t0 = time.monotonic()
            with pytest.raises(EdgeError, match=f"cloud at {re.escape(address)} is not reachable"):
                await asyncio.wait_for(client.connect(wait_s=1.0), STEP_S)
            reconnect_s = time.monotonic() - t0
            await asyncio.wait_for(client.close(), STEP_S)  # the `async with` exit closes again: a no-op
            return got, error, took, alone, reconnect_s

    got, error, took, alone, reconnect_s = run(scenario())
    assert isinstance(error, CloudLost), f"{type(error).__name__}: {error}"
    assert f"lost the connection to the cloud at {address}" in str(error) and "UNAVAILABLE" in str(error)
    assert took < DEATH_DEADLINE_S
    if resume_s:
        assert "could not resume within --reconnect-s 1.5 s (" in str(error) and "attempts; last error:" in str(error)
        assert resume_s <= took < resume_s + 6
    assert len(got) >= TOKENS_BEFORE_KILL and got == greedy_reference(tiny_target, prompt, len(got))
    assert len(alone) == 4 and reconnect_s < 10
