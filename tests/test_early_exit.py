"""Early-exit hints (docs/design.md §4.5): the pure prediction, the backend's exit hook, and the modes end to end.

Two tiny targets: the random one, whose intermediate layer rarely agrees with its output (hints miss), and a
copy whose last layer is made a no-op (its attention and MLP output projections zeroed), so the exit layer's
tentative result is the final one and every hint is right (hints hit and pre-drafts are adopted). Either
way the output must be the target's own: greedily token for token, under sampling in distribution.
"""
from __future__ import annotations

import copy

import grpc
import pytest
import torch

from picospec.bench.jitter import Jitter
from picospec.cloud_server.early_exit import expected_outcome, layer_agreement
from picospec.shared.hf_backend import HFBackend
from picospec.shared.models import LoadedModel, load_model
from picospec.shared.rpc import picospec_pb2 as pb
from picospec.shared.sampling import SamplingParams, process_logits
from picospec.shared.schemes import scheme
from picospec.shared.verify import verify_coupled, verify_dense, verify_split
from tests.conftest import edge, run, serving
from tests.law import T1, LawCheck
from tests.test_e2e_tiny import PROMPT
from tests.test_pipeline import _greedy_reference
from tests.test_refusals import _exchange, _hello



@pytest.fixture(scope="module")
def noop_last_layer_target(tiny_target) -> LoadedModel:
    model = copy.deepcopy(tiny_target.model)
    last = model.model.layers[-1]
    with torch.no_grad():
        last.self_attn.o_proj.weight.zero_()
        last.mlp.down_proj.weight.zero_()
    return LoadedModel(name=tiny_target.name, model=model, tokenizer=tiny_target.tokenizer)


@pytest.fixture(scope="module")
def stranger_draft() -> LoadedModel:
    return load_model("tiny-random-b", progress=False)  # same tokenizer, unrelated weights: many rejections


# ---- pure parts ------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("mode", ["dense", "coupled", "split-exact", "split-topk"])
def test_expected_outcome_equals_the_verdict_when_tentative_is_final(mode, temperature):
    torch.manual_seed(0)
    params = SamplingParams(temperature=temperature, seed=3)
    for trial in range(30):
        k, vocab = 1 + trial % 5, 40
        logits = torch.randn(k + 1, vocab) * 3
        q = torch.softmax(torch.randn(k, vocab) * 3, -1)
        draft = [int(torch.multinomial(q[i], 1)) for i in range(k)]
        p = process_logits(logits, params)
        extras = list(q) if mode == "dense" else [float(q[i, x]) for i, x in enumerate(draft)]
        e = expected_outcome(logits, params, scheme(mode), draft, extras, params.seed, 17)
        if mode == "dense":
            v = verify_dense(p, q, draft, params.seed, 17)
            assert (e.accepted, e.token) == (v.accepted, v.token)
        elif mode == "coupled":
            v = verify_coupled(p, draft, params.seed, 17)
            assert (e.accepted, e.token) == (v.accepted, v.token)
        else:
            sv = verify_split(p, extras, draft, params.seed, 17)
            assert e.accepted == sv.accepted
            if sv.bonus is not None:
                assert e.token == sv.bonus
            else:  # the edge samples a split correction: known in advance only greedily
                assert e.token == (int(p[sv.accepted].argmax()) if temperature == 0 else None)
        top1 = torch.softmax(logits[: e.accepted + 1], -1).max(-1).values.min()
        assert e.confidence == pytest.approx(float(top1))


def test_expected_outcome_rejects_bad_shapes():
    with pytest.raises(ValueError, match="k \\+ 1"):
        expected_outcome(torch.zeros(3, 8), SamplingParams(), scheme("dense"), [1], [torch.ones(8) / 8], 0, 0)
    with pytest.raises(ValueError, match="unknown verify mode"):
        expected_outcome(torch.zeros(2, 8), SamplingParams(), scheme("magic"), [1], [None], 0, 0)


def test_a_hint_over_bad_draft_probabilities_logs_no_traceback(tiny_target, caplog):
    """Regression (picospec-bench fuzz): a split batch with q(x) outside (0, 1] and hints on made the hint path log a
    full traceback for every such batch before the pass refused it; now the pass alone refuses it (ValueError ->
    INVALID_ARGUMENT) and the hint path says nothing above debug level."""
    from picospec.cloud_server.drafts import DraftRun
    from picospec.cloud_server.target import TargetCache
    cache = TargetCache(tiny_target.model, SamplingParams(temperature=1.0), "split-exact", exit_layer=1,
                        exit_threshold=0.0)
    cache.prefill([3, 4, 5])
    with caplog.at_level("INFO", logger="picospec.cloud"), pytest.raises(ValueError, match="not in \\(0, 1\\]"):
        cache.verify_run([3, 4, 5], DraftRun(0, 3, [7, 8], [0.5, float("nan")]), on_hint=lambda e: None)
    assert not [r for r in caplog.records if r.exc_info], caplog.text


def test_layer_agreement_counts_coverage_and_agreement():
    final = torch.tensor([[0.0, 9.0], [9.0, 0.0], [0.0, 9.0]])
    tentative = torch.tensor([[0.0, 9.0], [0.0, 9.0], [0.0, 0.1]])  # agrees, disagrees, agrees unsure
    rows = layer_agreement(final, tentative, [0.0, 0.9])
    assert rows[0]["coverage"] == 1.0 and rows[0]["agreement"] == pytest.approx(2 / 3)
    assert rows[1]["coverage"] == pytest.approx(2 / 3) and rows[1]["agreement"] == pytest.approx(0.5)


def test_backend_exit_hook_sees_tentative_logits_and_changes_nothing(tiny_target, noop_last_layer_target):
    ids = tiny_target.tokenizer(PROMPT)["input_ids"]
    plain = HFBackend(noop_last_layer_target.model).forward(ids, num_logits=3)
    backend = HFBackend(noop_last_layer_target.model)
    seen: list[torch.Tensor] = []
    with backend.early_exit(1, 3, seen.append):
        hooked = backend.forward(ids, num_logits=3)
    assert torch.equal(hooked, plain)  # the hook only reads
    assert len(seen) == 1 and torch.allclose(seen[0], plain, atol=1e-5)  # the no-op last layer: tentative = final
    backend.forward([5], num_logits=1)
    assert len(seen) == 1, "the hook must be gone after the block"
    with pytest.raises(ValueError, match="exit layer 2 outside 1..1"):
        with backend.early_exit(2, 1, seen.append):
            pass


# ---- end to end ------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,verify", [("early-exit", "dense"), ("early-exit", "coupled"), ("early-exit", "split-exact"),
                                         ("early-exit", "split-topk"), ("pipeline", "dense"), ("pipeline", "coupled"),
                                         ("pipeline", "split-exact")])
def test_greedy_with_hints_equals_target_under_jitter(tiny_target, noop_last_layer_target, stranger_draft, mode, verify):
    prompt_ids = tiny_target.tokenizer("hello world")["input_ids"]

    async def scenario(target):
        outs, stats = [], []
        async with serving(target) as (service, addr):
            service.hooks = Jitter(5, 0.003)
            async with edge(addr, stranger_draft, max_new_tokens=32, ignore_eos=True, verify=verify, hints="on",
                            exit_threshold=0.0, decode_ahead="off") as client:
                for seed in range(2):
                    client.hooks = Jitter(200 + seed, 0.003)
                    gen = client.generate(prompt_ids, mode=mode, draft_len=2 + seed)
                    outs.append(await gen.collect())
                    stats.append(gen.stats.to_dict())
        return outs, stats

    for target, all_right in [(noop_last_layer_target, True), (tiny_target, False)]:
        outs, stats = run(scenario(target))
        ref = _greedy_reference(target, prompt_ids, 32)
        assert all(o == ref for o in outs)
        hits = sum(s["hint_hits"] for s in stats)
        misses = sum(s["hint_misses"] for s in stats)
        assert all(s["hints"] > 0 and s["exit_layer"] == 1 for s in stats)
        if all_right:  # every hint is right (whether a pre-draft was ready in time is a race: the law test below
            assert hits > 0 and misses == 0  # asserts adoption over 100 generations)
        else:
            assert misses > 0


@pytest.mark.parallel
@pytest.mark.parametrize("mode,verify", [("early-exit", "dense"), ("early-exit", "coupled"), ("pipeline", "coupled")])
def test_sampling_with_hints_matches_target_distribution(noop_last_layer_target, stranger_draft, mode, verify):
    """Pre-drafts adopted after hits must leave the output law alone: tests/law.py's PIT test over 100
    generations of 20 tokens (2,000 values: detects a PIT shift of 0.065 at 90%, false-alarm rate 1e-3)."""
    target = noop_last_layer_target
    prompt_ids = target.tokenizer(PROMPT)["input_ids"]
    law = LawCheck(target.model, T1, ranking=stranger_draft.model)
    n = 100

    async def scenario():
        used = 0
        async with serving(target) as (_, addr):
            async with edge(addr, stranger_draft, max_new_tokens=20, verify=verify, temperature=1.0, ignore_eos=True,
                            residual_top_k=2, tail_samples=1, hints="on", exit_threshold=0.0, decode_ahead="off") as client:
                for seed in range(n):
                    gen = client.generate(prompt_ids, mode=mode, seed=seed, draft_len=1 + seed % 2)
                    law.add(prompt_ids, await gen.collect())
                    used += gen.stats.predrafted_used
        return used

    used = run(scenario())
    assert used > n, "pre-drafts must have been adopted for this test to mean anything"
    law.assert_matches(f"{mode}/{verify} with hints")


def test_exit_layer_out_of_range_is_refused(tiny_target):
    async def scenario():
        async with serving(tiny_target) as (_, addr):
            hello = _hello(tiny_target)
            hello.exit_layer, hello.exit_threshold = 2, 0.5  # the tiny target has 2 layers: exits are 1..1
            return await _exchange(addr, [pb.EdgeMessage(hello=hello)])

    _, err = run(scenario())
    assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "exit layer in 1..1" in err.details()
