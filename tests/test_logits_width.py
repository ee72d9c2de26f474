"""A draft and a target that share a tokenizer but pad their logits to different widths (Qwen2.5-0.5B: 151,936;
Qwen2.5-7B: 152,064) speculate together: the session speaks the target's width, the draft's logits are cut or
padded with -inf to it, and a padding id the target emits is fed to the draft as id 0 (shared/backend.py). The
output stays the target's: greedy token for token, and its law under sampling (tests/law.py), with padding ids
included when the target gives them mass. Real gRPC on loopback, the tiny pair resized to 80 logits."""
from __future__ import annotations

import asyncio

import pytest

from picospec.shared.fingerprint import session_logits_width
from picospec.shared.models import LoadedModel, load_model
from tests.conftest import edge, serving
from tests.law import T1, LawCheck

WIDE = 80          # the tiny tokenizer has 64 tokens, the tiny models 64 logits
GENERATIONS = 50
NEW_TOKENS = 20
PROMPTS = ("the cat", "def f(x):", "once upon a time")


def test_session_width_is_the_targets_when_no_real_token_is_lost() -> None:
    assert session_logits_width(151_936, 152_064, 151_665) == 152_064   # Qwen2.5 0.5B drafting for 7B
    assert session_logits_width(152_064, 151_936, 151_665) == 151_936   # and the other way round
    assert session_logits_width(64, 64, 64) == 64
    with pytest.raises(ValueError, match="vocabulary width mismatch: draft logits have 64 entries, target 80"):
        session_logits_width(64, 80, 70)


def _widened(name: str) -> LoadedModel:
    loaded = load_model(name, progress=False)
    loaded.model.resize_token_embeddings(WIDE)  # new rows drawn around the old ones: real mass on padding ids
    return loaded


@pytest.fixture(scope="module")
def wide_target() -> LoadedModel:
    return _widened("tiny-random")


@pytest.fixture(scope="module")
def wide_draft() -> LoadedModel:
    return _widened("tiny-random:layers=1")


async def _greedy(target: LoadedModel, draft: LoadedModel) -> dict[str, list[int]]:
    async with serving(target) as (_, address):
        async with edge(address, draft, max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True) as client:
            prompt = target.tokenizer(PROMPTS[0])["input_ids"]
            return {mode: await client.generate(prompt, mode=mode).collect() for mode in ("cloud", "sync", "pipeline")}


async def _sampled(target: LoadedModel, draft: LoadedModel, verify: str, law: LawCheck) -> tuple[int, list[int]]:
    accepted, tokens = 0, []
    async with serving(target) as (_, address):
        async with edge(address, draft, max_new_tokens=NEW_TOKENS, ignore_eos=True, verify=verify,
                        **T1.edge_kwargs()) as client:
            for seed in range(GENERATIONS):
                prompt = target.tokenizer(PROMPTS[seed % len(PROMPTS)])["input_ids"]
                gen = client.generate(prompt, mode="sync", seed=seed, draft_len=1 + seed % 4)
                law.add(prompt, await gen.collect())
                accepted, tokens = accepted + gen.stats.accepted, tokens + gen.token_ids
            assert client.logits_width == target.model.config.vocab_size  # set at connect, from the cloud's Info
    return accepted, tokens


@pytest.mark.parametrize("wider", ["draft", "target"])
def test_greedy_across_widths_is_the_targets_own(tiny_target, tiny_draft, wide_target, wide_draft, wider) -> None:
    target, draft = (tiny_target, wide_draft) if wider == "draft" else (wide_target, tiny_draft)
    runs = asyncio.run(_greedy(target, draft))
    assert runs["sync"] == runs["cloud"] and runs["pipeline"] == runs["cloud"], runs


@pytest.mark.parametrize("wider, verify", [("draft", "dense"), ("target", "dense"), ("target", "coupled")])
def test_sampling_across_widths_follows_the_targets_law(tiny_target, tiny_draft, wide_target, wide_draft,
                                                        wider, verify) -> None:
    target, draft = (tiny_target, wide_draft) if wider == "draft" else (wide_target, tiny_draft)
    law = LawCheck(target.model, T1)
    accepted, tokens = asyncio.run(_sampled(target, draft, verify, law))
    assert accepted > 0, "no draft was ever accepted: the widths were not reconciled"
    if wider == "target":  # the padding ids carry mass here: the target emitted some, and the draft carried on
        assert any(t >= 64 for t in tokens), "no padding id was emitted: the clamp path did not run"
    law.assert_matches(f"{verify}, the {wider} wider")
