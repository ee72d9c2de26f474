"""The output law of every exact mode on the tiny pair, end to end over real gRPC: tests/law.py's PIT test.

Matrix: edge modes {sync, early-exit, pipeline (jittered, decode-ahead on)} x exact schemes {dense, split-exact,
coupled} x {T=1; T=0.7 with top-k 20 and top-p 0.9}, plus `cloud` mode against the target and `edge` mode
against the draft. Each test pools GENERATIONS x NEW_TOKENS = 2,000 PIT values (seeds 0..GENERATIONS-1, draft
length 1..4 by seed), so each KS statistic detects a PIT shift of detectable_shift(2000) = 0.065 at 90%, with
false-alarm rate 1e-3 per test (tests/law.py; the PIT is also ranked by q/p, q the tiny draft's law). The tiny pair is far apart (total variation ~0.45 per token), so rejections,
corrections, split-exact's tail draws and, in the pipeline, dead chains and rollbacks all happen; each test
asserts that speculation ran (rounds, accepted and rejected drafts) so that no test passes on the cloud's
tokens alone.
"""
from __future__ import annotations

import asyncio

import pytest

from picospec.bench.jitter import Jitter
from picospec.shared.config import EXACT_VERIFY_MODES
from picospec.shared.models import LoadedModel
from tests.conftest import edge, run, serving
from tests.law import MIN_EVENT_TOKENS, T07_TOPK_TOPP, T1, LawCheck, Warping

GENERATIONS = 100
NEW_TOKENS = 20
PROMPTS = ("the cat", "def f(x):", "once upon a time")
WARPINGS = {"T1": T1, "T0.7-k20-p0.9": T07_TOPK_TOPP}


class _CloudJitter(Jitter):
    async def before_decode_ahead(self) -> None:
        await asyncio.sleep(0.003)


async def _generate_all(target: LoadedModel, draft: LoadedModel, mode: str, warping: Warping,
                        law: LawCheck, jitter: bool = False, limits: dict | None = None, stats: tuple[str, ...] = (),
                        **cfg: object) -> dict[str, int]:
    """GENERATIONS generations through one server (with `limits`) and one client; every token goes into `law`.
    Returns the sums of some statistics (and of `stats`)."""
    totals = {k: 0 for k in ("rounds", "accepted", "drafted", "cloud_tokens", "tail_requests", "dead_chains",
                             "predrafted_used", *stats)}
    async with serving(target, **(limits or {})) as (service, addr):
        if jitter:
            service.hooks = _CloudJitter(3, 0.0005)
        async with edge(addr, draft, max_new_tokens=NEW_TOKENS, ignore_eos=True, residual_top_k=2, tail_samples=1,
                        **warping.edge_kwargs(), **cfg) as client:
            if jitter:
                client.hooks = Jitter(4, 0.0005)
            for seed in range(GENERATIONS):
                prompt_ids = target.tokenizer(PROMPTS[seed % len(PROMPTS)])["input_ids"]
                gen = client.generate(prompt_ids, mode=mode, seed=seed, draft_len=1 + seed % 4)
                ids = await gen.collect()
                assert len(ids) == NEW_TOKENS, f"seed {seed}: {len(ids)} tokens, ignore_eos asks for {NEW_TOKENS}"
                law.add(prompt_ids, ids, gen.stats.token_kinds)
                for k in totals:
                    totals[k] += getattr(gen.stats, k)
    return totals


def _law(target: LoadedModel, draft: LoadedModel, warping: Warping, verify: str) -> LawCheck:
    """The law check of a run with the draft `draft`: corrections tested under the residual in the schemes that
    draw them from it."""
    return LawCheck(target.model, warping, ranking=draft.model, residual_corrections=verify != "coupled")


def _assert_events_tested(law: LawCheck, verify: str) -> None:
    """Each event was tested apart (enough of its tokens), so a bug in it is not diluted among all tokens."""
    counts = law.event_counts()
    wanted = ("first", "bonus", "after_rejection") + (("correction",) if verify != "coupled" else ())
    assert all(counts[e] >= MIN_EVENT_TOKENS for e in wanted), counts


def _assert_speculated(totals: dict[str, int], verify: str, warping: Warping) -> None:
    assert totals["rounds"] >= GENERATIONS and totals["accepted"] > 0, f"no speculation happened: {totals}"
    assert totals["accepted"] < totals["drafted"], f"nothing was ever rejected: {totals}"
    if verify == "split-exact" and warping is T1:
        assert totals["tail_requests"] > 0, "the ask-for-more tail path never ran"


@pytest.mark.parametrize("warping", WARPINGS.values(), ids=WARPINGS.keys())
@pytest.mark.parametrize("verify", EXACT_VERIFY_MODES)
@pytest.mark.parametrize("mode", ["sync", "early-exit"])
def test_stop_and_wait_modes_follow_the_target_law(tiny_target, tiny_draft, mode, verify, warping):
    law = _law(tiny_target, tiny_draft, warping, verify)
    hints = {"hints": "on", "exit_threshold": 0.0} if mode == "early-exit" else {}
    totals = run(_generate_all(tiny_target, tiny_draft, mode, warping, law, verify=verify, **hints))
    _assert_speculated(totals, verify, warping)
    _assert_events_tested(law, verify)
    law.assert_matches(f"{mode}/{verify} at {warping}")


@pytest.mark.parametrize("warping", WARPINGS.values(), ids=WARPINGS.keys())
def test_coupled_token_trees_follow_the_target_law(tiny_target, tiny_draft, warping):
    """Token trees (docs/design.md §3.7) of 6 nodes: alternatives are taken as well as the main chain."""
    law = LawCheck(tiny_target.model, warping, ranking=tiny_draft.model)
    totals = run(_generate_all(tiny_target, tiny_draft, "sync", warping, law, verify="coupled", tree_budget=6))
    _assert_speculated(totals, "coupled", warping)
    law.assert_matches(f"sync/coupled trees at {warping}")


@pytest.mark.parametrize("warping", WARPINGS.values(), ids=WARPINGS.keys())
@pytest.mark.parametrize("verify", EXACT_VERIFY_MODES)
@pytest.mark.parametrize("decode_ahead", ["off", "on"])
def test_pipeline_under_jitter_follows_the_target_law(tiny_target, tiny_draft, decode_ahead, verify, warping):
    """Decode-ahead off: every token goes through verification. On: the cloud's own tokens race the edge's
    drafts for the same positions, chains die and roll back; the law must not notice. On the tiny pair the
    cloud decodes as fast as the edge drafts, so the cloud's hook lets drafts arrive before each step it
    decodes alone (otherwise it would decode nearly everything and the race would hardly be run)."""
    law = _law(tiny_target, tiny_draft, warping, verify)
    totals = run(_generate_all(tiny_target, tiny_draft, "pipeline", warping, law, jitter=True, verify=verify,
                               decode_ahead=decode_ahead))
    if decode_ahead == "off":
        assert totals["cloud_tokens"] == 0
        _assert_speculated(totals, verify, warping)
    else:
        assert totals["accepted"] > 0 and totals["cloud_tokens"] > 0 and totals["dead_chains"] > 0, totals
    law.assert_matches(f"pipeline/{verify}/decode-ahead {decode_ahead} at {warping}")


@pytest.mark.parametrize("verify", EXACT_VERIFY_MODES)
def test_sessions_the_verification_budget_caps_follow_the_target_law(tiny_target, tiny_draft, verify):
    """A budget of almost nothing (cloud_server/capacity.py): each session's passes run within a slack of 3 decode
    steps, then coupled's cloud decodes tokens itself while drafts wait, and they are checked against its tokens,
    and dense and split-exact verify one draft per pass (stop-and-wait, no decode-ahead asked for). The law must
    not notice."""
    law = _law(tiny_target, tiny_draft, T1, verify)
    totals = run(_generate_all(tiny_target, tiny_draft, "sync", T1, law, limits={"verify_budget": 1e-6, "verify_budget_slack": 3},
                               verify=verify, stats=("capped_drafts",)))
    _assert_speculated(totals, verify, T1)
    assert totals["capped_drafts"] > 0, totals
    if verify == "coupled":  # capped down to the cloud's own tokens; elsewhere to passes of one draft (session.py)
        assert totals["cloud_tokens"] > GENERATIONS, totals
    else:
        assert totals["cloud_tokens"] == 0, totals
    law.assert_matches(f"sync/{verify} with its passes capped by the budget at {T1}")


@pytest.mark.parametrize("warping", WARPINGS.values(), ids=WARPINGS.keys())
def test_cloud_mode_follows_the_target_law(tiny_target, tiny_draft, warping):
    law = LawCheck(tiny_target.model, warping, ranking=tiny_draft.model)
    totals = run(_generate_all(tiny_target, tiny_draft, "cloud", warping, law))
    assert totals["drafted"] == 0
    law.assert_matches(f"cloud at {warping}")


@pytest.mark.parametrize("warping", WARPINGS.values(), ids=WARPINGS.keys())
def test_edge_mode_follows_the_draft_law_not_the_target(tiny_target, tiny_draft, warping):
    """The draft alone samples its own law; the same check against the target must fail (the test has teeth)."""
    law = LawCheck(tiny_draft.model, warping, ranking=tiny_target.model)
    against_target = LawCheck(tiny_target.model, warping, ranking=tiny_draft.model)
    run(_generate_all(tiny_target, tiny_draft, "edge", warping, _Both(law, against_target)))
    law.assert_matches(f"edge at {warping}")
    with pytest.raises(AssertionError):
        against_target.assert_matches("edge against the target")


class _Both:
    """Feeds one generation to two checks."""

    def __init__(self, *checks: LawCheck) -> None:
        self.checks = checks

    def add(self, prompt_ids: list[int], generated: list[int], kinds: list[str] | None = None) -> None:
        for c in self.checks:
            c.add(prompt_ids, generated, kinds)
