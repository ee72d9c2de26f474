"""The cloud's capacity and each session's verification budget (cloud_server/capacity.py), and decode-ahead on idle
capacity only (cloud_server/ahead.py): pure functions of numbers, no gRPC, no models."""
from __future__ import annotations

from typing import Callable

import grpc
import pytest

from picospec.cloud_server.ahead import decode_hold_s
from picospec.cloud_server.capacity import BUDGET_SLACK_STEPS, CloudCapacity, VerifyBudget, drafts_allowed
from picospec.shared.fingerprint import tokenizer_fingerprint
from picospec.shared.models import load_gguf_model
from picospec.shared.perf_model import PassCosts
from picospec.shared.protocol import PROTOCOL_VERSION
from picospec.shared.rpc import picospec_pb2 as pb
from picospec.shared.rpc import picospec_pb2_grpc as pb_grpc
from tests.conftest import edge, run, serving
from tests.test_limits import greedy_reference
from tests.test_llama_cpp import SMOL, skip_large

# llama.cpp, one CPU core, the Qwen 1.5B target: seconds per pass over n drafts (n = 0: a decode step)
LLAMA_PASS_S = {0: 0.0775, 1: 0.142, 2: 0.175, 4: 0.253, 8: 0.637}


def _costs(table: dict[int, float]) -> PassCosts:
    costs = PassCosts()
    for n, t in table.items():
        costs.add(n, t)
    return costs


def test_a_session_within_its_budget_gets_every_waiting_draft_verified():
    costs = _costs(LLAMA_PASS_S)
    # 40 tokens for 2.0 s: 0.05 s a token, under the 0.0775 s the cloud alone spends
    assert drafts_allowed(2.0, 40, 8, 0.0775, costs, factor=1.0) == 8
    assert drafts_allowed(0.0, 0, 8, None, costs, factor=1.0) == 8   # nothing measured yet
    assert drafts_allowed(99.0, 0, 8, 0.0775, costs, factor=0.0) == 8  # budget off
    assert drafts_allowed(99.0, 0, 0, 0.0775, costs, factor=1.0) == 0  # nothing waits


def test_an_overspent_session_is_held_to_the_pass_its_allowance_pays_for_down_to_none():
    costs = _costs(LLAMA_PASS_S)
    # 10 tokens committed (one more credited ahead) and the slack: spending `left` less than that leaves `left`
    limit = 0.0775 * 11 + BUDGET_SLACK_STEPS * 0.0775
    assert drafts_allowed(limit - 0.26, 10, 8, 0.0775, costs, factor=1.0) == 4   # a pass of 4 (0.253 s) fits, 8 not
    assert drafts_allowed(limit - 0.15, 10, 8, 0.0775, costs, factor=1.0) == 1   # of 1 (0.142 s)
    assert drafts_allowed(limit - 0.10, 10, 8, 0.0775, costs, factor=1.0) == 0   # none: the cloud decodes the token


def test_an_always_wrong_edge_costs_the_cloud_no_more_than_the_cloud_alone_plus_the_slack():
    """Simulate the budget against an edge that sends 8 drafts every step, all rejected at the first: a pass commits
    one token (the correction); a capped step is a decode step, which commits one too."""
    costs, decode = _costs(LLAMA_PASS_S), LLAMA_PASS_S[0]
    budget = VerifyBudget(1.0)
    for _ in range(500):
        n = drafts_allowed(budget.spent_s, budget.tokens, 8, decode, costs, budget.factor)
        budget.charge(LLAMA_PASS_S[n] if n in LLAMA_PASS_S else costs(n), 1)
    assert budget.spent_s <= decode * budget.tokens + BUDGET_SLACK_STEPS * decode + 1e-9
    assert budget.spent_s >= decode * budget.tokens  # and it still got every token (one step each at least)
    unbounded = 500 * LLAMA_PASS_S[8]
    assert budget.spent_s < unbounded / 7


def test_capacity_measures_decode_others_load_and_who_wants_the_model():
    now = [100.0]
    cap = CloudCapacity(window_s=5.0, clock=lambda: now[0])
    assert cap.decode_s is None
    cap.on_compute("a", 8, 0.9)
    assert cap.decode_s == pytest.approx(0.1)  # no decode measured: the least one can cost, 0.9 s / 9 positions
    cap.on_compute("a", 0, 0.2)
    assert cap.decode_s == pytest.approx(0.2)
    cap.on_compute("b", 0, 1.0)
    assert cap.others_load("a") == pytest.approx(1.0 / 5) and cap.others_load("b") == pytest.approx(1.1 / 5)
    now[0] += 6.0
    assert cap.others_load("a") == 0.0  # out of the window
    assert not cap.others_working("a")
    with cap.working("b"):
        assert cap.others_working("a") and not cap.others_working("b")
    assert not cap.others_working("a")


def test_decode_ahead_waits_for_a_due_batch_while_another_session_wants_the_model():
    # a batch due in 0.3 s, a step of 0.1 s: free to step now alone; contended, wait for the batch (up to due + step)
    assert decode_hold_s(10.0, 10.3, 0.1) == 0.0
    assert decode_hold_s(10.0, 10.3, 0.1, contended=True) == pytest.approx(0.4)
    assert decode_hold_s(10.0, None, 0.1, contended=True) == 0.0   # no batch planned: the edge needs our tokens
    assert decode_hold_s(10.5, 10.3, 0.1, contended=True) == 0.0   # the batch is a step late: the plan lapsed


# ---- a hostile edge against a real server --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol_gguf():
    return load_gguf_model(SMOL, threads=1, progress=False)


def _hello(target, prompt: list[int], new: int) -> pb.Hello:
    fp = tokenizer_fingerprint(target.tokenizer)
    return pb.Hello(protocol_version=PROTOCOL_VERSION, vocab_size=int(target.model.config.vocab_size),
                    verify_mode="coupled", prompt_ids=prompt, max_new_tokens=new, ignore_eos=True,
                    tokenizer=pb.TokenizerFingerprint(num_tokens=fp.num_tokens, sha256=fp.sha256),
                    sampling=pb.SamplingParams(temperature=0.0, top_p=1.0))


async def _hostile_session(addr: str, hello: pb.Hello, wrong: Callable[[int], int], max_draft_len: int,
                           tree: bool = False) -> list[pb.Verdict]:
    """A raw edge that sends the longest batch the cloud allows, stop-and-wait, every draft wrong (`wrong(pos)` is a
    token the target does not choose at pos). Every verdict kills its chain; it starts the next in a new epoch.
    With `tree`, each batch is instead a token tree of as many nodes: wrong siblings under the committed prefix."""
    verdicts = []
    end = len(hello.prompt_ids) + hello.max_new_tokens
    async with grpc.aio.insecure_channel(addr) as channel:
        call = pb_grpc.PicoSpecStub(channel).Speculate(timeout=120)
        await call.write(pb.EdgeMessage(hello=hello))
        ready = (await call.read()).ready
        committed, epoch = ready.prompt_len, 0
        while True:
            n = min(max_draft_len, end - committed)
            if tree:  # n different tokens at the next position, none of them the target's
                drafts = [(wrong(committed) + i) % hello.vocab_size for i in range(n)]
                batch = pb.DraftBatch(epoch=epoch, start_pos=committed, token_ids=drafts, parent_index=[-1] * n)
            else:
                batch = pb.DraftBatch(epoch=epoch, start_pos=committed, token_ids=[wrong(committed + i) for i in range(n)])
            await call.write(pb.EdgeMessage(draft=batch))
            v = (await call.read()).verdict
            assert v.accepted == 0 and (v.rejected or v.capped), v
            verdicts.append(v)
            committed, epoch = v.committed_len, max(v.next_epoch, epoch + 1)
            if v.finished:
                await call.done_writing()
                return verdicts


def test_an_always_wrong_edge_gets_the_targets_output_from_passes_the_budget_caps_to_decode_steps(tiny_target):
    """Budget forced to almost nothing: after the slack, every step is a decode step of the cloud's (verified 0,
    capped 32), and the tokens are the target's own. With the budget off the same edge has all 32 verified each time."""
    prompt = tiny_target.tokenizer("hello world")["input_ids"]
    ref = greedy_reference(tiny_target, prompt, 40)
    vocab = int(tiny_target.model.config.vocab_size)
    wrong = lambda pos: (ref[pos - len(prompt)] + 1) % vocab  # noqa: E731

    async def scenario(budget: float):
        async with serving(tiny_target, verify_budget=budget) as (_, addr):
            verdicts = await _hostile_session(addr, _hello(tiny_target, prompt, 40), wrong, 32)
            return verdicts, [v.token for v in verdicts]  # nothing accepted: each verdict commits its own token

    capped, committed = run(scenario(1e-6))
    assert committed == ref
    assert sum(v.verified > 0 for v in capped) <= BUDGET_SLACK_STEPS + 1  # within the slack, then none
    assert all(v.verified == 0 and v.capped > 0 for v in capped[-20:])
    free, committed = run(scenario(0.0))
    assert committed == ref and all(v.verified > 0 and v.capped == 0 for v in free)


def test_an_always_wrong_tree_is_cut_to_its_root_by_the_budget(tiny_target):
    """Token trees answer to the budget too: a tree of 32 wrong siblings is cut to one node per pass (a tree's pass
    is what lets the next one grow, so never to none), and the tokens are still the target's own."""
    prompt = tiny_target.tokenizer("hello world")["input_ids"]
    ref = greedy_reference(tiny_target, prompt, 40)
    vocab = int(tiny_target.model.config.vocab_size)
    wrong = lambda pos: (ref[pos - len(prompt)] + 1) % vocab  # noqa: E731
    hello = _hello(tiny_target, prompt, 40)
    hello.decode_ahead = False  # trees are verified against the prefix they grew from

    async def scenario(budget: float):
        async with serving(tiny_target, verify_budget=budget) as (_, addr):
            verdicts = await _hostile_session(addr, hello, wrong, 32, tree=True)
            return verdicts, [v.token for v in verdicts]

    capped, committed = run(scenario(1e-6))
    assert committed == ref
    assert sum(v.verified > 1 for v in capped) <= BUDGET_SLACK_STEPS + 1  # within the slack, then the root alone
    tail = [(v.verified, v.capped) for v in capped[-20:]]  # the last tree has one node: nothing to cap there
    assert all(verified == 1 for verified, _ in tail) and all(cut > 0 for _, cut in tail[:-1]), tail
    free, committed = run(scenario(0.0))
    assert committed == ref and all(v.verified > 1 and v.capped == 0 for v in free[:-1])


@skip_large
def test_a_hostile_edge_costs_a_llama_cpp_cloud_what_the_cloud_alone_would(smol_gguf):
    """SmolLM2 on llama.cpp, where a pass costs about in proportion to its positions: an edge sending 32 wrong drafts
    per batch costs the cloud many times the cloud alone's compute without the budget, and about the same with it."""
    prompt = smol_gguf.tokenizer("Write a short poem about the sea.")["input_ids"]
    new = 48

    async def scenario():
        async with serving(smol_gguf, verify_budget=1.0) as (_, addr):
            async with grpc.aio.insecure_channel(addr) as channel:
                chunks = [c async for c in pb_grpc.PicoSpecStub(channel).CloudGenerate(_hello(smol_gguf, prompt, new))]
            ref = [t for c in chunks for t in c.token_ids]
            alone_s = sum(c.decode_s for c in chunks)  # the first chunk's token came with the prefill: 0 here
            vocab = int(smol_gguf.model.config.vocab_size)
            wrong = lambda pos: (ref[pos - len(prompt)] + 1) % vocab  # noqa: E731
            held = await _hostile_session(addr, _hello(smol_gguf, prompt, new), wrong, 32)
        async with serving(smol_gguf, verify_budget=0.0) as (_, addr):
            free = await _hostile_session(addr, _hello(smol_gguf, prompt, new), wrong, 32)
        return alone_s, held, free

    alone_s, held, free = run(scenario())
    per_step = alone_s / (new - 1)
    held_s, free_s = sum(v.verify_s for v in held), sum(v.verify_s for v in free)
    assert free_s > 3 * alone_s, (free_s, alone_s)  # the test can fail: unbounded, a hostile edge is expensive
    assert held_s <= 1.5 * alone_s + BUDGET_SLACK_STEPS * per_step, (held_s, alone_s, per_step)
    assert sum(v.capped > 0 for v in held) > new // 2



def test_an_edge_drafting_trees_gets_the_targets_tokens_when_the_budget_cuts_them(tiny_target, tiny_draft):
    """The real edge's tree rounds (coupled, --tree-budget) against a budget of almost nothing: its trees are cut to
    their first nodes, the edge takes verdicts over fewer nodes than it sent, and the tokens are the target's."""
    prompt = tiny_target.tokenizer("hello world")["input_ids"]
    ref = greedy_reference(tiny_target, prompt, 32)

    async def scenario():
        async with serving(tiny_target, verify_budget=1e-6, verify_budget_slack=2) as (_, addr):
            async with edge(addr, tiny_draft, max_new_tokens=32, ignore_eos=True, verify="coupled",
                            tree_budget=6) as client:
                gen = client.generate(prompt, mode="sync")
                return await gen.collect(), gen.stats

    tokens, stats = run(scenario())
    assert tokens == ref
    assert stats.rounds > 0 and stats.capped_drafts > 0, stats.to_dict()
