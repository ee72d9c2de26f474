"""The static engine (cloud_server/engine) on the CPU: the same logits as transformers' own cache, pass by pass, alone
and batched; slots; graph selection; early exits; `random:` shapes; and a cloud running on it end to end.
The CUDA half (graphs against eager) is tests/test_engine_cuda.py."""
from __future__ import annotations

import asyncio
import copy

import pytest
import torch

from picospec.cloud_server.engine import EngineOptions, StaticEngine
from picospec.cloud_server.engine.model import PREFILL_CHUNK, Row
from picospec.shared.hf_backend import HFBackend
from picospec.shared.models import RANDOM_SHAPES, ModelError, _random_shape, parse_model_name
from tests.conftest import edge, run, serving

PUBLISHED_PARAMETERS = {  # the real models' parameter counts: the shapes are theirs
    "qwen2.5-0.5b": 494_032_768, "qwen2.5-1.5b": 1_543_714_304, "qwen2.5-7b": 7_615_616_512,
    "llama-3.1-8b": 8_030_261_248,
}


def _seq(n: int, seed: int = 0) -> list[int]:
    return torch.randint(3, 64, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture()
def engine(tiny_target) -> StaticEngine:
    return StaticEngine(tiny_target.model, EngineOptions(slots=4, max_len=1400))


def test_every_pass_equals_transformers_cache(engine, tiny_target):
    seq = _seq(1300)
    ours, theirs = engine.backend(), HFBackend(tiny_target.model)
    torch.testing.assert_close(ours.prefill(seq[:1100]), theirs.prefill(seq[:1100]))  # chunked: 512 + 512 + 76
    torch.testing.assert_close(ours.forward(seq[1100:1105]), theirs.forward(seq[1100:1105]))
    ours.truncate(1102), theirs.truncate(1102)  # rollback: our stale keys at 1102.. are overwritten, never read
    torch.testing.assert_close(ours.forward(seq[1102:1110], 3), theirs.forward(seq[1102:1110], 3))
    torch.testing.assert_close(ours.logits_at(seq[:1200], 1150), theirs.logits_at(seq[:1200], 1150))
    assert ours.tokens == theirs.tokens == seq[:1200]


def test_chunked_pass_returns_logits_reaching_into_an_earlier_piece(engine, tiny_target):
    seq = _seq(PREFILL_CHUNK + 10)  # the last piece has 10 tokens; ask for 40 rows of logits
    ours, theirs = engine.backend(), HFBackend(tiny_target.model)
    got = ours.forward(seq, num_logits=40)
    torch.testing.assert_close(got, theirs.forward(seq, num_logits=40))
    assert got.shape == (40, 64)


def test_rows_batched_in_one_pass_equal_each_row_alone(engine):
    a, b, c = engine.backend(), engine.backend(), engine.backend()
    seqs = [_seq(80, 1), _seq(30, 2), _seq(50, 3)]
    for be, s in zip((a, b, c), seqs):
        be.prefill(s[:-6])
    rows = [Row(be.slot, s[len(s) - 6:len(s) - 6 + k], len(s) - 6, num_logits=m)
            for be, s, k, m in zip((a, b, c), seqs, (1, 4, 6), (0, 0, 2))]
    alone = [engine.run([r])[0] for r in rows]
    packed = []
    engine._packed = lambda rows, n, pack=engine._packed: packed.append(n) or pack(rows, n)
    together = engine.run(rows)
    assert packed == [6]  # rows of unequal length: the token-wise work ran on their 11 real tokens, not 3 x 6
    for x, y in zip(alone, together):  # ...and each row's logits are what it gives alone
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    assert [t.shape[0] for t in together] == [1, 4, 2]
    equal = [Row(be.slot, s[len(s) - 6:len(s) - 3], len(s) - 6) for be, s in zip((a, b, c), seqs)]
    for x, y in zip([engine.run([r])[0] for r in equal], engine.run(equal)):  # equal lengths: padded path
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    assert packed == [6]


def test_slots_are_bounded_and_given_back(engine):
    held = [engine.backend() for _ in range(3)]  # 4 slots, one of them scratch
    with pytest.raises(RuntimeError, match="all 3 engine slots are in use"):
        engine.backend()
    held[1].close()
    held[1].close()  # idempotent
    with pytest.raises(RuntimeError, match="given back"):
        held[1].forward([5])
    assert engine.backend().slot == held[1].slot
    with pytest.raises(ValueError, match="not held"):
        engine.release(held[1].slot + 100)


def test_rows_outside_the_cache_or_on_scratch_are_refused(engine):
    slot = engine.acquire()
    with pytest.raises(ValueError, match="max_len 1400"):
        engine.run([Row(slot, [5, 6], 1399)])
    with pytest.raises(ValueError, match="not a session slot"):
        engine.run([Row(engine.scratch, [5], 0)])
    with pytest.raises(ValueError, match="outside"):
        engine.run([Row(slot, [], 0)])
    with pytest.raises(ValueError, match="at most 512 tokens"):
        engine.run([Row(slot, [5] * 513, 0)])
    with pytest.raises(ValueError, match="cannot give logits for 3"):  # packed, it would read the row before
        engine.run([Row(slot, [5] * 4, 0), Row(slot, [5, 6], 10, num_logits=3)])


def test_graph_choice_is_the_smallest_that_fits(engine):
    """Selection only (no CUDA here): a pass goes to the smallest bucket whose padding still lies within the keys it
    reads; nothing fits -> eager."""
    engine.graphs = {(1, n, k): f"g{n}/{k}" for n in (1, 4, 16) for k in (512, 1024, 1432)}
    assert engine.kv_buckets() == [512, 1024, 1400 + 32]
    assert engine._graph_for(1, 1, 10) == "g1/512"
    assert engine._graph_for(1, 3, 300) == "g4/512"
    assert engine._graph_for(1, 3, 511) == "g4/512"   # start 508, padded to 4: positions up to 511, 512 keys
    assert engine._graph_for(1, 3, 512) == "g4/1024"  # start 509: padding reaches position 512
    assert engine._graph_for(1, 16, 1400) == "g16/1432"
    assert engine._graph_for(1, 17, 100) is None
    assert engine._graph_for(2, 1, 10) is None


def test_early_exit_hands_the_same_tentative_logits_as_transformers(engine, tiny_target):
    seq = _seq(40)
    got, want = [], []
    ours, theirs = engine.backend(), HFBackend(tiny_target.model)
    ours.prefill(seq[:30]), theirs.prefill(seq[:30])
    with ours.early_exit(1, 3, got.append):
        ours.forward(seq[30:35])
    with theirs.early_exit(1, 3, want.append):
        theirs.forward(seq[30:35])
    assert len(got) == len(want) == 1
    torch.testing.assert_close(got[0], want[0])
    with pytest.raises(ValueError, match="exit layer"):
        with ours.early_exit(2, 1, got.append):
            pass


def test_other_architectures_are_refused(tiny_target):
    model = copy.copy(tiny_target.model)
    model.config = copy.deepcopy(model.config)
    model.config.model_type = "gemma3"
    with pytest.raises(ValueError, match="runs llama, qwen2 models, not 'gemma3'"):
        StaticEngine(model)


@pytest.mark.parametrize("shape", sorted(RANDOM_SHAPES))
def test_random_shapes_have_the_real_models_parameters(shape):
    model, tokenizer = _random_shape(f"random:{shape}", torch.bfloat16, "meta")  # no memory: shapes only
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMETERS[shape]
    assert len(tokenizer) == RANDOM_SHAPES[shape]["tokenizer_size"] <= model.config.vocab_size
    assert tokenizer.decode(tokenizer("hi")["input_ids"]) == "hi"


def test_random_qwen_shapes_share_a_tokenizer_as_the_real_family_does():
    """So a random:qwen2.5-0.5b draft serves a random:qwen2.5-7b target (fingerprints equal, widths reconciled)."""
    from picospec.shared.fingerprint import tokenizer_fingerprint

    prints = {tokenizer_fingerprint(_random_shape(f"random:{s}", torch.bfloat16, "meta")[1])
              for s in ("qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b")}
    assert len(prints) == 1


def test_random_names_parse_and_unknown_shapes_are_refused():
    assert parse_model_name("random:qwen2.5-7b:layers=2") == ("random:qwen2.5-7b", [("layers", "2")])
    with pytest.raises(ModelError, match="unknown shape"):
        parse_model_name("random:gpt-5")


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_cloud_on_the_engine_generates_what_it_does_on_transformers(tiny_target, tiny_draft, temperature):
    """Same coins, same logits (bit for bit on the CPU): every mode's output is the same token for token on either
    backend; slots come back after each session, so one slot serves sessions one after another."""
    prompt = tiny_target.tokenizer("the engine")["input_ids"]

    async def scenario(engine: str) -> tuple[dict[str, list[int]], object]:
        async with serving(tiny_target, engine=engine, max_sessions=1) as (service, addr), \
                edge(addr, tiny_draft, max_new_tokens=24, ignore_eos=True, temperature=temperature, seed=7) as client:
            out = {m: await client.generate(prompt, mode=m).collect() for m in ("cloud", "sync", "pipeline")}
            for _ in range(500):  # the cloud ends the last call after the edge has its tokens
                if service.active_sessions == 0:
                    break
                await asyncio.sleep(0.01)
            return out, service.engine and service.engine.slot_pool.free

    on_engine, free_slots = run(scenario("static"))
    on_hf, no_engine = run(scenario("hf"))
    assert on_engine == on_hf and no_engine is None
    assert free_slots == [0]
    if temperature == 0.0:  # and both are the target's own greedy tokens (EOS included: the edge ignores it)
        backend, ref = HFBackend(tiny_target.model), []
        logits = backend.prefill(prompt)
        for _ in range(24):
            ref.append(int(logits.argmax()))
            logits = backend.forward([ref[-1]])[-1]
        assert on_engine["cloud"] == on_engine["pipeline"] == ref
