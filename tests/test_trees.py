"""Token trees in `coupled` mode (docs/design.md §3.7): the pure helpers, the tree-masked KV cache, the size policy,
and end to end over real gRPC with the tiny pair: identical output to chains and to the cloud's own Gumbel-max
decoding, more committed per pass, malformed trees refused."""
from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from picospec.edge_client.policy import plan_session
from picospec.shared.hf_backend import HFBackend
from picospec.shared.perf_model import Estimates, choose_tree_nodes, tree_tokens
from picospec.shared.protocol import ProtocolError
from picospec.shared.rpc import picospec_pb2 as pb
from picospec.shared.sampling import SamplingParams, process_logits
from picospec.shared.schemes import scheme
from picospec.shared.tree_cache import TreeKV
from picospec.shared.trees import (ROOT, ancestor_mask, chain_parents, check_path, check_tree, match_path, path_to,
                                   verify_coupled_tree, walk)
from picospec.shared.verify import gumbel_argmax, verify_coupled
from tests.conftest import edge, run, serving
from tests.test_refusals import _exchange, _hello

# a tree of 6 nodes:  root -> 11 (0) -> 20 (2) -> 30 (4)
#                          |           -> 21 (3)
#                          -> 12 (1) -> 31 (5)
TOKENS = [11, 12, 20, 21, 30, 31]
PARENTS = [ROOT, ROOT, 0, 0, 2, 1]


# ---- pure helpers ------------------------------------------------------------------------------------------------

BAD_TREES = {
    "parent after child": ([1, 2, 3], [ROOT, 2, 0], "must come before"),
    "own parent": ([1, 2], [ROOT, 1], "must come before"),
    "below the root": ([1, 2], [ROOT, -2], "must come before"),
    "too few parents": ([1, 2], [ROOT], "1 parent indices for 2"),
    "too many nodes": (list(range(7)), [ROOT] * 7, r"allowed 1\.\.6"),
    "empty": ([], [], r"allowed 1\.\.6"),
    "too deep": ([1, 2, 3, 4], chain_parents(4), "at most 3 levels"),
    "twin siblings": ([5, 5], [ROOT, ROOT], "repeats token 5"),
}


def test_check_tree_gives_depths():
    assert check_tree(TOKENS, PARENTS, max_nodes=6, max_depth=3) == [0, 0, 1, 1, 2, 1]


@pytest.mark.parametrize("case", BAD_TREES.values(), ids=BAD_TREES.keys())
def test_check_tree_refuses_what_the_walk_cannot_use(case):
    tokens, parents, match = case
    with pytest.raises(ProtocolError, match=match):
        check_tree(tokens, parents, max_nodes=6, max_depth=3)


def test_ancestor_mask_paths_and_matching():
    m = ancestor_mask(PARENTS)  # [6, 6]
    assert m[4].nonzero().flatten().tolist() == [0, 2, 4]  # 30 sees 11, 20 and itself
    assert m[5].nonzero().flatten().tolist() == [1, 5]
    assert m[1].nonzero().flatten().tolist() == [1]
    assert path_to(PARENTS, 4) == [0, 2, 4] and path_to(PARENTS, ROOT) == []
    assert match_path(TOKENS, PARENTS, [11, 20, 30, 99]) == [0, 2, 4]
    assert match_path(TOKENS, PARENTS, [12, 20]) == [1]
    assert match_path(TOKENS, PARENTS, [99]) == []
    check_path(PARENTS, [0, 3])
    for bad in ([2], [0, 1], [0, 2, 5], [7]):
        with pytest.raises(ProtocolError, match="does not descend"):
            check_path(PARENTS, bad)


def test_walk_descends_while_a_child_carries_the_choice():
    def choices(table):
        return lambda node: table[node]
    # the cloud picks 11, 21: descends to node 3, a leaf, and its choice there is the bonus
    w = walk(TOKENS, PARENTS, choices({ROOT: 11, 0: 21, 3: 40}))
    assert (w.path, w.token, w.rejected) == ((0, 3), 40, False)
    # the cloud picks 12, then something no child carries: a correction
    w = walk(TOKENS, PARENTS, choices({ROOT: 12, 1: 7}))
    assert (w.path, w.token, w.rejected) == ((1,), 7, True)
    w = walk(TOKENS, PARENTS, choices({ROOT: 3}))
    assert (w.path, w.token, w.rejected) == ((), 3, True)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_chain_tree_is_verified_as_the_chain(temperature):
    """A tree of one branch is today's batch: the same verdict as verify_coupled, over many random cases."""
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=temperature)
    for seed in range(200):
        k = 1 + seed % 5
        logits = torch.randn(k + 1, 12, generator=g) * 2  # [k+1, V]
        p = process_logits(logits, params)
        drafts = [gumbel_argmax(p[i], seed, 10 + i) if i < k - 1 else int(torch.randint(12, (1,), generator=g))
                  for i in range(k)]
        v = verify_coupled(p, drafts, seed, 10)
        w = verify_coupled_tree(p, drafts, chain_parents(k), seed, 10)
        assert (len(w.path), w.token, w.rejected) == (v.accepted, v.token, v.rejected)
        assert list(w.path) == list(range(v.accepted))


def test_tree_walk_emits_the_targets_own_gumbel_choices():
    """Whatever the tree, the committed tokens are the target's Gumbel-max choice at each position along the path
    (position = start + depth), so they equal what the cloud alone would emit."""
    g = torch.Generator().manual_seed(1)
    for seed in range(100):
        p = torch.softmax(torch.randn(len(TOKENS) + 1, 40, generator=g), -1)  # [n+1, V]
        w = verify_coupled_tree(p, TOKENS, PARENTS, seed, 7)
        rows = [0] + [i + 1 for i in w.path]  # the rows along the committed path
        emitted = [TOKENS[i] for i in w.path] + [w.token]
        assert emitted == [gumbel_argmax(p[r], seed, 7 + d) for d, r in enumerate(rows)]


# ---- the tree-masked KV cache --------------------------------------------------------------------------------------

def test_tree_forward_matches_linear_forwards_and_keep_gathers_the_path(tiny_target):
    model, prefix = tiny_target.model, [5, 9, 13, 2, 7]
    b = HFBackend(model)
    b.forward(prefix[:-1])
    kv = TreeKV(b)
    # the prefix's last token as a chain node, the tree hanging under it: one forward for all
    logits = kv.extend([prefix[-1]] + TOKENS, [ROOT] + [0 if p == ROOT else p + 1 for p in PARENTS])  # [7, V]
    for node in range(len(TOKENS)):
        ref = HFBackend(model).forward(prefix + [TOKENS[i] for i in path_to(PARENTS, node)])[-1]
        torch.testing.assert_close(logits[node + 1], ref, atol=1e-4, rtol=1e-4)
    kv.keep([0, 1, 3, 5])  # the prefix's last token, 11, 20, 30
    assert b.tokens == prefix + [11, 20, 30]
    ref = HFBackend(model)
    ref.forward(prefix + [11, 20, 30])
    for mine, theirs in zip(b.cache.layers, ref.cache.layers):
        torch.testing.assert_close(mine.keys, theirs.keys, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(mine.values, theirs.values, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b.forward([40]), ref.forward([40]), atol=1e-4, rtol=1e-4)  # linear again


def test_tree_grown_node_by_node_and_keep_rejects_a_broken_path(tiny_target):
    model, prefix = tiny_target.model, [5, 9, 13]
    b = HFBackend(model)
    b.forward(prefix)
    kv = TreeKV(b)
    kv.extend([11], [ROOT])
    kv.extend([12], [ROOT])
    last = kv.extend([31], [1])[-1]  # under 12, although 11 was cached in between
    torch.testing.assert_close(last, HFBackend(model).forward(prefix + [12, 31])[-1], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="does not descend"):
        kv.keep([0, 2])
    kv.keep([1, 2])
    assert b.tokens == prefix + [12, 31] and b.cache.get_seq_length() == 5


# ---- the size policy and the plan -----------------------------------------------------------------------------------

def _estimates(pass_costs: dict[int, float], acceptance: float = 0.5) -> Estimates:
    est = Estimates()
    est.acceptance.add(acceptance)
    est.draft_s.add(0.001)
    est.rtt_samples.append(0.05)
    for n, s in pass_costs.items():
        est.passes.add(n, s)
    return est


def test_tree_size_follows_the_cost_of_a_pass():
    assert choose_tree_nodes(Estimates(), 16, default=8).nodes == 8  # no estimates yet: the default
    assert choose_tree_nodes(Estimates(), 4, default=8).nodes == 4
    flat = _estimates({1: 0.5, 16: 0.5})  # a GPU: 16 positions cost what 1 does
    assert choose_tree_nodes(flat, 16, default=1).nodes >= 8
    steep = _estimates({1: 0.5, 2: 1.0, 16: 8.0})  # every position costs a decode step: speculation barely pays
    assert choose_tree_nodes(steep, 16, default=1).nodes <= 2
    assert tree_tokens([0.5, 0.5], 0) == pytest.approx(1.75)
    assert tree_tokens([0.5, 0.5], 2) > tree_tokens([0.5, 0.5], 1) > tree_tokens([0.5, 0.5], 0)


def test_plan_runs_trees_stop_and_wait_in_coupled_only():
    common = dict(greedy=False, draft_len=0, max_draft_len=12, decode_ahead="auto", hints="auto",
                  draft_confidence=0.2, cloud_max_draft_len=10, cloud_exit_layer=1)
    p = plan_session("pipeline", scheme=scheme("coupled"), tree_budget=16, **common)
    assert (p.tree_budget, p.tree_online, p.pipelined, p.decode_ahead, p.hints) == (10, True, False, False, False)
    assert plan_session("sync", scheme=scheme("coupled"), tree_budget=8, **common).tree_online is False
    assert plan_session("pipeline", scheme=scheme("dense"), tree_budget=8, **common).tree_budget == 0
    assert plan_session("pipeline", scheme=scheme("coupled"), **common).tree_budget == 0  # the default: chains


# ---- end to end ------------------------------------------------------------------------------------------------------

def _gumbel_reference(model, prompt: list[int], n: int, params: SamplingParams) -> list[int]:
    """The target decoding alone with the coupled noise: argmax(log p' + G(seed, position, .)) at each position."""
    b, seq = HFBackend(model), list(prompt)
    for _ in range(n):
        p = process_logits(b.logits_at(seq, len(seq) - 1), params)[-1]
        seq.append(gumbel_argmax(p, params.seed, len(seq)))
    return seq[len(prompt):]


RUNS = {"chain4": dict(mode="sync", draft_len=4), "tree8": dict(mode="sync", tree_budget=8),
        "tree16-online": dict(mode="pipeline", tree_budget=16)}


async def _generate_all(target, draft, prompt_ids, cloud: dict | None = None,
                        **cfg) -> dict[str, tuple[list[int], dict]]:
    out = {}
    async with serving(target, **(cloud or {})) as (_, addr), edge(addr, draft, ignore_eos=True, **cfg) as client:
        for name, kw in RUNS.items():
            gen = client.generate(prompt_ids, **kw)
            out[name] = (await gen.collect(), gen.stats.to_dict())
    return out


@pytest.mark.parametrize("temperature,seed,prompt", [(0.0, 0, "hello world"), (1.0, 1, "the cat"),
                                                     (1.0, 2, "abc def")])
def test_trees_emit_exactly_what_chains_and_the_cloud_alone_emit(tiny_target, tiny_draft, temperature, seed, prompt):
    prompt_ids = tiny_target.tokenizer(prompt)["input_ids"]
    params = SamplingParams(temperature=temperature, seed=seed)
    ref = _gumbel_reference(tiny_target.model, prompt_ids, 40, params)
    out = run(_generate_all(tiny_target, tiny_draft, prompt_ids, max_new_tokens=40, temperature=temperature, seed=seed))
    for name in RUNS:
        tokens, st = out[name]
        assert tokens == ref, name
        assert st["generated_tokens"] == 40 and st["finish_reason"] == "length"
        assert st["rounds"] == sum(st["accepted_len_hist"].values())


def test_a_tree_commits_more_per_pass_than_a_chain_on_the_same_seeds(tiny_target, tiny_draft):
    """Trees of 2g nodes against chains of g (a tree holds the chain of its first ceil(n/2) levels, so on the same
    positions it never commits less), and of the same node count, summed over seeds, greedy and sampled."""
    totals: dict[str, list[int]] = {}

    async def scenario(temperature: float, seed: int, prompt: str) -> None:
        prompt_ids = tiny_target.tokenizer(prompt)["input_ids"]
        async with serving(tiny_target) as (_, addr), edge(addr, tiny_draft, max_new_tokens=48, ignore_eos=True,
                                                          temperature=temperature, seed=seed) as client:
            for name, kw in (("chain4", dict(draft_len=4)), ("chain8", dict(draft_len=8)),
                             ("tree8", dict(tree_budget=8)), ("tree16", dict(tree_budget=16))):
                gen = client.generate(prompt_ids, mode="sync", **kw)
                await gen.collect()
                st = gen.stats.to_dict()
                t = totals.setdefault(f"{name}@T{temperature}", [0, 0, 0])
                t[0] += st["generated_tokens"] - st["prefill_tokens"]
                t[1] += st["rounds"]
                t[2] += st["tree_alternatives_taken"]

    for temperature in (0.0, 1.0):
        for seed, prompt in ((0, "hello world"), (1, "the cat"), (2, "abc def")):
            run(scenario(temperature, seed, prompt))
    per_pass = {k: tokens / rounds for k, (tokens, rounds, _) in totals.items()}
    print("tokens per pass:", {k: round(v, 3) for k, v in sorted(per_pass.items())})
    for t in ("T0.0", "T1.0"):
        assert per_pass[f"tree8@{t}"] > per_pass[f"chain4@{t}"]
        assert per_pass[f"tree16@{t}"] > per_pass[f"chain8@{t}"]
        # where the gain comes from: verdicts whose path went through an alternative (a chain has none)
        assert totals[f"tree8@{t}"][2] > 0 and totals[f"chain8@{t}"][2] == 0, totals


# ---- malformed trees -------------------------------------------------------------------------------------------------

def _tree(ids, parents, epoch=0, start=3) -> pb.EdgeMessage:
    return pb.EdgeMessage(draft=pb.DraftBatch(epoch=epoch, start_pos=start, token_ids=list(ids), parent_index=list(parents)))


def _coupled(target, **over) -> pb.EdgeMessage:
    return pb.EdgeMessage(hello=_hello(target, verify_mode="coupled", **over))


BAD_TREES = {
    "parent after child": (lambda t: [_coupled(t), _tree([1, 2, 3], [-1, 2, 0])], "must come before"),
    "parent far out of range": (lambda t: [_coupled(t), _tree([1, 2], [-1, 2**30])], "must come before"),
    "negative parent": (lambda t: [_coupled(t), _tree([1, 2], [-1, -7])], "must come before"),
    "parents for some nodes only": (lambda t: [_coupled(t), _tree([1, 2, 3], [-1, 0])], "2 parent indices for 3"),
    "too many nodes": (lambda t: [_coupled(t), _tree(range(40), [-1] * 40)], r"allowed 1\.\.32"),
    "deeper than the budget": (lambda t: [_coupled(t), _tree(range(9), chain_parents(9))], "at most 8 levels"),
    "twin siblings": (lambda t: [_coupled(t), _tree([4, 4], [-1, -1])], "repeats token 4"),
    "id out of range": (lambda t: [_coupled(t), _tree([1, 99], [-1, 0])], "outside the vocabulary"),
    "wrong position": (lambda t: [_coupled(t), _tree([1], [-1], start=5)], "committed length is 3"),
    "future epoch": (lambda t: [_coupled(t), _tree([1], [-1], epoch=4)], "future epoch"),
    "in dense mode": (lambda t: [pb.EdgeMessage(hello=_hello(t)), _tree([1], [-1])], "need the coupled mode"),
    "with decode-ahead": (lambda t: [_coupled(t, decode_ahead=True), _tree([1], [-1])], "decode_ahead off"),
}


@pytest.mark.parametrize("case", list(BAD_TREES))
def test_malformed_trees_are_refused_clearly(tiny_target, case):
    build, match = BAD_TREES[case]

    async def scenario():
        async with serving(tiny_target) as (_, addr):
            return await _exchange(addr, build(tiny_target))

    replies, err = run(scenario())
    assert err is not None, f"{case}: no error; replies {replies}"
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (case, err.code(), err.details())
    assert match in err.details() or __import__("re").search(match, err.details()), (case, err.details())


def test_a_tree_by_hand_is_served_with_its_path(tiny_target):
    """The control for the refusals: a valid tree gets a verdict naming the committed path."""
    async def scenario():
        async with serving(tiny_target) as (_, addr):
            return await _exchange(addr, [_coupled(tiny_target), _tree(TOKENS, PARENTS)])

    replies, err = run(scenario())
    assert err is None, err
    v = replies[1].verdict
    assert v.verified == len(TOKENS) and len(v.path) == v.accepted
    check_path(PARENTS, list(v.path))


def _assert_cache_is_linear(backend: HFBackend, model) -> None:
    """No tree entry left behind: the KV cache holds exactly `backend.tokens`, as a linear forward computes them."""
    ref = HFBackend(model)
    ref.forward(backend.tokens)
    for mine, theirs in zip(backend.cache.layers, ref.cache.layers):
        assert mine.keys.shape == theirs.keys.shape
        torch.testing.assert_close(mine.keys, theirs.keys, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(mine.values, theirs.values, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_both_caches_keep_only_the_committed_path(tiny_target, tiny_draft, temperature):
    prompt_ids = tiny_target.tokenizer("caches")["input_ids"]

    async def scenario():
        async with serving(tiny_target) as (service, addr):
            async with edge(addr, tiny_draft, max_new_tokens=30, ignore_eos=True, temperature=temperature) as client:
                gen = client.generate(prompt_ids, mode="sync", tree_budget=10)
                tokens = await gen.collect()
                await asyncio.get_running_loop().run_in_executor(client.executor, lambda: None)  # the drafter's settle
                for _ in range(500):
                    if not service.active_sessions and service.closed_sessions:
                        break
                    await asyncio.sleep(0.01)
                return tokens, service.closed_sessions[-1], gen.stats.drafter, gen.stats.to_dict()

    tokens, record, drafter, st = run(scenario())
    committed = prompt_ids + tokens
    assert record.committed == committed and record.cache_tokens == committed[:-1]
    assert st["drafted_tokens"] > st["accepted_tokens"] + st["rounds"]  # trees: more nodes than any path takes
    assert drafter.tree is None and drafter.backend.tokens == committed[:-1]
    _assert_cache_is_linear(drafter.backend, tiny_draft.model)


class _SlowVerdicts:
    """Cloud hook: every verdict leaves 30 ms late, as if the pass were long (the edge's idle time)."""

    async def before_send(self, msg: pb.CloudMessage) -> None:
        if msg.WhichOneof("kind") == "verdict":
            await asyncio.sleep(0.03)


def test_idle_time_grows_the_tree_and_the_next_tree_reuses_it(tiny_target):
    """With the target as its own draft every walk takes the main chain to its end and the cloud's token there is the
    draft's own next choice: the growth made while the cloud verified already expanded it, so the next tree starts
    from those expansions. The output is still the chain's (growth changes what is drafted, never what is emitted)."""
    prompt_ids = tiny_target.tokenizer("idle time")["input_ids"]

    async def scenario():
        out = {}
        async with serving(tiny_target) as (service, addr):
            service.hooks = _SlowVerdicts()
            async with edge(addr, tiny_target, max_new_tokens=40, ignore_eos=True, temperature=1.0, seed=5) as client:
                for name, kw in (("chain", dict(draft_len=4)), ("tree", dict(tree_budget=6))):
                    gen = client.generate(prompt_ids, mode="sync", **kw)
                    out[name] = (await gen.collect(), gen.stats.to_dict())
        return out

    out = run(scenario())
    (chain, _), (tree, st) = out["chain"], out["tree"]
    assert tree == chain
    assert st["tree_idle_forwards"] > 0 and st["tree_reused_expansions"] > 0, st


# ---- growth bookkeeping (edge_client/tree_builder.py), with a fake draft --------------------------------------------

def _fake_expand(calls: list):
    """Every node's candidates: tokens 1, 2, 3 (weights .6, .3, .1); kv indices count up."""
    def expand(kv_parent: int, token: int, pos: int):
        calls.append((kv_parent, token, pos))
        return len(calls) - 1, [(0.6, 1), (0.3, 2), (0.1, 3)]
    return expand


def test_grower_puts_the_main_chain_first_and_every_prefix_is_a_tree():
    from picospec.edge_client.tree_builder import TreeGrower

    calls: list = []
    g = TreeGrower(10, {(): (ROOT, [(0.6, 1), (0.3, 2), (0.1, 3)])}, main_levels=3, max_depth=5, stop_ids=frozenset())
    g.grow(9, _fake_expand(calls))
    assert g.keys[:3] == [(1,), (1, 1), (1, 1, 1)]  # the coupled choices, three levels, before any alternative
    assert g.coupled_choices() == [key[-1] == 1 for key in g.keys]  # token 1 is every node's first candidate
    assert not all(g.coupled_choices())
    for n in range(1, 10):
        check_tree(g.tokens[:n], g.parents[:n], max_nodes=9, max_depth=5)
    assert g.expansions == len(calls) and all(pos >= 11 for _, _, pos in calls)
    assert calls[0] == (ROOT, 1, 11)  # node (1,) sits at 10; its children at 11
    assert max(len(k) for k in g.keys) <= 5
    # idle growth: one forward at a time, capped by the node count
    before = g.expansions
    assert g.grow_one_expansion(40, _fake_expand(calls)) and g.expansions == before + 1
    while g.grow_one_expansion(40, _fake_expand(calls)):
        pass
    assert len(g.tokens) == 40  # adds one node per step, and stops at the cap


def test_grower_reuses_memoised_expansions_after_rerooting():
    from picospec.edge_client.tree_builder import TreeGrower, subtree_memo

    calls: list = []
    g = TreeGrower(0, {(): (ROOT, [(0.6, 1), (0.3, 2), (0.1, 3)])}, main_levels=2, max_depth=6, stop_ids=frozenset())
    g.grow(20, _fake_expand(calls))
    sub = subtree_memo(g.memo, (1, 1))  # the committed tokens went 1, 1
    assert () in sub and all(k == () or (1, 1) + k in g.memo for k in sub)
    again = TreeGrower(2, sub, main_levels=2, max_depth=6, stop_ids=frozenset())
    again.grow(4, _fake_expand(calls))
    assert again.reused > 0  # expansions under (1, 1) came from the memo, without a forward


def test_reroot_keeps_a_path_and_the_subtree_under_it(tiny_target):
    model, prefix = tiny_target.model, [5, 9, 13]
    b = HFBackend(model)
    b.forward(prefix)
    kv = TreeKV(b)
    kv.extend([11, 12, 20, 21, 30], [ROOT, ROOT, 0, 0, 2])  # 11 -> 20 -> 30, 11 -> 21, 12
    moved = kv.reroot([0], [2, 3, 4])  # commit 11; keep 20, 21, 30 as the new tree
    assert b.tokens == prefix + [11] and kv.tokens == [20, 21, 30] and kv.parents == [ROOT, ROOT, 0]
    assert moved == {2: 0, 3: 1, 4: 2}
    last = kv.extend([40], [moved[4]])[-1]  # under 11 -> 20 -> 30, computed from the gathered entries
    torch.testing.assert_close(last, HFBackend(model).forward(prefix + [11, 20, 30, 40])[-1], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="does not hang under"):
        kv.reroot([0], [3])  # 40 without its parent


def test_static_engine_tree_rows_match_linear_forwards_and_keep_moves_the_path(tiny_target):
    """The engine's tree rows (rotary position = depth, ancestors visible) and its compaction of the kept path,
    against transformers' linear forwards; a second session's chain row in the same pass is unaffected."""
    from picospec.cloud_server.engine import EngineOptions, StaticEngine
    from picospec.cloud_server.engine.backend import StaticTreeKV
    from picospec.cloud_server.engine.model import Row

    model, prefix = tiny_target.model, [5, 9, 13, 2, 7]
    engine = StaticEngine(model, EngineOptions(slots=3, max_len=64))
    b, other = engine.backend(), engine.backend()
    b.forward(prefix[:-1])
    other.forward([3, 4, 5, 6])
    kv = StaticTreeKV(b)
    tree_tokens, tree_parents = [prefix[-1]] + TOKENS, [ROOT] + [0 if p == ROOT else p + 1 for p in PARENTS]
    logits, chain = engine.run([Row(b.slot, tree_tokens, b.length, 0, None, tree_parents),
                                Row(other.slot, [8, 9], other.length)])
    kv.tokens = tree_tokens  # what extend records (the pass above ran the tree with another session's row)
    for node in range(len(TOKENS)):
        ref = HFBackend(model).forward(prefix + [TOKENS[i] for i in path_to(PARENTS, node)])[-1]
        torch.testing.assert_close(logits[node + 1], ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(chain, HFBackend(model).forward([3, 4, 5, 6, 8, 9])[-2:], atol=1e-4, rtol=1e-4)
    kv.keep([0, 1, 3, 5])  # the prefix's last token, 11, 20, 30
    assert b.tokens == prefix + [11, 20, 30]
    ref = HFBackend(model)
    ref.forward(prefix + [11, 20, 30])
    torch.testing.assert_close(b.forward([40]), ref.forward([40]), atol=1e-4, rtol=1e-4)  # linear again
    with pytest.raises(ValueError, match="once per pass"):
        kv2 = StaticTreeKV(b)
        kv2.extend([1], [ROOT])
        kv2.extend([2], [0])


@pytest.mark.parametrize("batching", ["off", "on"])
def test_trees_on_the_static_engine_emit_what_they_emit_on_transformers(tiny_target, tiny_draft, batching):
    prompt_ids = tiny_target.tokenizer("the cat")["input_ids"]
    params = SamplingParams(temperature=1.0, seed=1)
    ref = _gumbel_reference(tiny_target.model, prompt_ids, 32, params)
    out = run(_generate_all(tiny_target, tiny_draft, prompt_ids, cloud=dict(engine="static", batching=batching),
                            max_new_tokens=32, temperature=1.0, seed=1))
    for name in RUNS:
        assert out[name][0] == ref, name
