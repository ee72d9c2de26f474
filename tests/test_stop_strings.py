"""Stop strings end a generation in every mode exactly where the mode's own decoding would end it: the text up to
the first occurrence (across token boundaries), the tokens up to the one that completed it, finish reason "stop",
and the cloud's session freed. Real gRPC on loopback; the tiny pair for every mode, SmolLM2 (byte-level BPE) for
stop strings that cut through its multi-character tokens; the CLI's --stop through the console script."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import edge, serving
from picospec.shared.config import EDGE_MODES
from picospec.shared.models import LoadedModel, load_model
from test_limits import STEP_S, all_sessions_recorded, observe_slots

BIN = Path(sys.executable).parent
N_NEW = 40


def ids(model: LoadedModel, text: str) -> list[int]:
    return list(model.tokenizer(text)["input_ids"])


def boundary_stop(tokenizer, token_ids: list[int], after: int) -> str:
    """A stop string that cuts through a token boundary at or after token `after`: the last two characters before
    the boundary and the first one after it (with single-character tokens it spans three tokens)."""
    for k in range(max(1, after), len(token_ids)):
        before = tokenizer.decode(token_ids[:k], skip_special_tokens=True)
        after_text = tokenizer.decode(token_ids[: k + 1], skip_special_tokens=True)[len(before):]
        if len(before.strip()) >= 2 and after_text.strip():
            return before[-2:] + after_text[:1]
    raise AssertionError("no token boundary with text on both sides")


def expected_cut(tokenizer, token_ids: list[int], stop: str) -> tuple[str, list[int]]:
    """What the mode's own decoding gives with the stop string: the text before it, and the shortest token prefix
    whose text contains it."""
    full = tokenizer.decode(token_ids, skip_special_tokens=True)
    for n in range(1, len(token_ids) + 1):
        if stop in tokenizer.decode(token_ids[:n], skip_special_tokens=True):
            return full[: full.find(stop)], token_ids[:n]
    raise AssertionError(f"{stop!r} not in {full!r}")


async def _reference_and_stopped(client, prompt: list[int], mode: str, tokenizer, after: int):
    ref = client.generate(prompt, mode=mode)
    await asyncio.wait_for(ref.collect(), STEP_S)
    stop = boundary_stop(tokenizer, ref.token_ids, after)
    text, tokens = expected_cut(tokenizer, ref.token_ids, stop)
    gen = client.generate(prompt, mode=mode, stop=[stop, "never appears in this text"])
    streamed = "".join([p async for p in gen.stream_text()])
    assert (gen.text, gen.token_ids) == (text, tokens), (mode, stop)
    assert streamed == text and gen.stats.finish_reason == "stop"
    assert gen.stats.generated == len(tokens)
    return gen


@pytest.mark.parametrize("mode", EDGE_MODES)
def test_stop_string_ends_every_mode_where_its_own_decoding_would(tiny_target, tiny_draft, mode: str) -> None:
    async def main() -> None:
        async with serving(tiny_target) as (service, address):
            slots = observe_slots(service)
            async with edge(address, tiny_draft, max_new_tokens=N_NEW, temperature=0.0, ignore_eos=True) as client:
                gens = [await _reference_and_stopped(client, ids(tiny_draft, "the quick brown fox"), mode,
                                                     tiny_draft.tokenizer, after)
                        for after in (1, 12, 25)]     # in the first batch, in the middle, late
            await all_sessions_recorded(service, slots)   # the stopped sessions were closed and freed
            assert service.active_sessions == 0
            # the session's own ending ran inside the stop, not later in the background, where it would overwrite it
            assert [g.stats.finish_reason for g in gens] == ["stop"] * 3

    asyncio.run(main())


@pytest.fixture(scope="module")
def smol() -> LoadedModel:
    return load_model("smollm2-135m-instruct", progress=False)


@pytest.fixture(scope="module")
def smol_draft() -> LoadedModel:
    return load_model("smollm2-135m-instruct:int8", progress=False)


@pytest.mark.parametrize("mode", ["sync", "pipeline"])
def test_stop_string_through_bpe_tokens_on_a_real_model(smol, smol_draft, mode: str) -> None:
    async def main() -> None:
        async with serving(smol) as (_, address):
            async with edge(address, smol_draft, max_new_tokens=24, temperature=0.0) as client:
                prompt = ids(smol_draft, "Write a Python function that adds two numbers.\n")
                await _reference_and_stopped(client, prompt, mode, smol_draft.tokenizer, after=6)

    asyncio.run(main())


def test_cli_stop_flag(tiny_target, tiny_draft) -> None:
    """--stop on the console script: the JSON result ends before the stop string, finish reason "stop"."""
    async def main() -> None:
        async with serving(tiny_target) as (_, address):
            async with edge(address, tiny_draft, max_new_tokens=N_NEW, temperature=0.0, ignore_eos=True) as client:
                ref = client.generate(ids(tiny_draft, "hello"), mode="cloud")
                await ref.collect()
            stop = ref.text[8:11]
            args = [str(BIN / "picospec-edge"), "--server", address, "--draft", "tiny-random:layers=1", "--prompt",
                    "hello", "--max-new-tokens", str(N_NEW), "--temperature", "0", "--ignore-eos", "--mode",
                    "cloud,sync", "--stop", stop, "--stop", "zzzz", "--json"]
            proc = await asyncio.create_subprocess_exec(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), 120)
            assert proc.returncode == 0, err.decode()
            runs = [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]
            assert [r["text"] for r in runs] == [ref.text[: ref.text.find(stop)]] * 2
            assert {r["stats"]["finish_reason"] for r in runs} == {"stop"}

    asyncio.run(main())
