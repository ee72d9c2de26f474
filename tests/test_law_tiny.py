"""The output law of every exact mode on the tiny pair, end to end over real gRPC: tests/law.py's PIT test.

Matrix: edge modes {sync, early-exit, pipeline (jittered, decode-ahead on)} x exact schemes {dense, split-exact,
coupled} x {T=1; T=0.7 with top-k 20 and top-p 0.9}, plus `cloud` mode against the target and `edge` mode
against the draft; at T=1 the pipeline as shipped (lengths chosen online), generations that end at a live EOS,
sessions the verification budget caps, and generations resumed after a cut. Each test pools GENERATIONS x NEW_TOKENS = 2,000 PIT values (seeds 0..GENERATIONS-1, draft
length 1..4 by seed), so each KS statistic detects a PIT shift of detectable_shift(2000) = 0.065 at 90%, with
false-alarm rate 1e-3 per test (4e-5 and 0.072 where the tokens depend on timing) (tests/law.py; the PIT is also ranked by q/p, q the tiny draft's law). The tiny pair is far apart (total variation ~0.45 per token), so rejections,
corrections, split-exact's tail draws and, in the pipeline, dead chains and rollbacks all happen; each test
asserts that speculation ran (rounds, accepted and rejected drafts) so that no test passes on the cloud's
tokens alone.
"""
from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

import pytest

from picospec.bench.jitter import Jitter
from picospec.edge_client.client import EdgeClient
from picospec.shared.config import EXACT_VERIFY_MODES
from picospec.shared.fingerprint import eos_token_ids
from picospec.shared.models import LoadedModel
from tests.conftest import edge, run, serving
from tests.law import ALPHA, ALPHA_TIMED, MIN_EVENT_TOKENS, T07_TOPK_TOPP, T1, LawCheck, Warping

GENERATIONS = 100
NEW_TOKENS = 20
PROMPTS = ("the cat", "def f(x):", "once upon a time")
WARPINGS = {"T1": T1, "T0.7-k20-p0.9": T07_TOPK_TOPP}
# the tiny target's most frequent token after PROMPTS at T=1 (about 4% of its tokens): an end-of-sequence id for the
# EOS law test, where it ends about half the generations early
LIVE_EOS = 44
# every law here runs beside another test (make test's parallel half): the tokens of the timed ones move with the
# machine's speed anyway, and what they assert beyond the law (speculation ran, chains died) holds however fast it runs
pytestmark = pytest.mark.parallel


class _CloudJitter(Jitter):
    async def before_decode_ahead(self) -> None:
        await asyncio.sleep(0.003)


@contextlib.asynccontextmanager
async def _law_client(target: LoadedModel, draft: LoadedModel, warping: Warping, *, jitter: bool = False,
                      limits: dict | None = None, ignore_eos: bool = True, **cfg: object) -> AsyncIterator[EdgeClient]:
    """One server (with `limits`) and one client, as every law run here has them: NEW_TOKENS a generation, corrections
    from the residual's top-2 and one tail draw (so split-exact asks for more), `warping`; with `jitter`, seeded
    delays on both sides (the cloud's also before each decode-ahead step)."""
    async with serving(target, **(limits or {})) as (service, addr):
        if jitter:
            service.hooks = _CloudJitter(3, 0.0005)
        async with edge(addr, draft, max_new_tokens=NEW_TOKENS, ignore_eos=ignore_eos, residual_top_k=2,
                        tail_samples=1, **warping.edge_kwargs(), **cfg) as client:
            if jitter:
                client.hooks = Jitter(4, 0.0005)
            yield client


async def _generate_all(target: LoadedModel, draft: LoadedModel, mode: str, warping: Warping,
                        law: LawCheck, jitter: bool = False, limits: dict | None = None, stats: tuple[str, ...] = (),
                        online: bool = False, eos_ids: frozenset[int] = frozenset(), **cfg: object) -> dict[str, int]:
    """GENERATIONS generations through one server (with `limits`) and one client; every token goes into `law`.
    Draft lengths 1..4 by seed, or chosen `online` by the edge's policy (draft_len 0, the default). EOS is ignored
    unless `eos_ids` (the draft's stop set) are given. Returns the sums of some statistics (and of `stats`), and
    `ended_at_eos`, the generations that stopped at an EOS."""
    totals = {k: 0 for k in ("rounds", "accepted", "drafted", "cloud_tokens", "tail_requests", "dead_chains",
                             "predrafted_used", *stats)}
    ended_at_eos = 0
    async with _law_client(target, draft, warping, jitter=jitter, limits=limits, ignore_eos=not eos_ids,
                           **cfg) as client:
        for seed in range(GENERATIONS):
            prompt_ids = target.tokenizer(PROMPTS[seed % len(PROMPTS)])["input_ids"]
            gen = client.generate(prompt_ids, mode=mode, seed=seed, draft_len=0 if online else 1 + seed % 4)
            ids = await gen.collect()
            stops = [i for i, t in enumerate(ids) if t in eos_ids]
            assert stops in ([], [len(ids) - 1]), f"seed {seed}: EOS inside {ids}"  # the last token, if any
            assert len(ids) == NEW_TOKENS or stops, f"seed {seed}: {len(ids)} tokens, none an EOS"
            ended_at_eos += bool(stops)
            law.add(prompt_ids, ids, gen.stats.token_kinds)
            for k in totals:
                totals[k] += getattr(gen.stats, k)
    return {**totals, "ended_at_eos": ended_at_eos}


def _law(target: LoadedModel, draft: LoadedModel, warping: Warping, verify: str, timed: bool = False) -> LawCheck:
    """The law check of a run with the draft `draft`: corrections tested under the residual in the schemes that
    draw them from it. `timed`: batch ends depend on timing (the pipeline, online lengths, the budget), so outside
    coupled the tokens differ from run to run; tested at ALPHA_TIMED (tests/law.py counts these as TIMED_TESTS)."""
    alpha = ALPHA_TIMED if timed and verify != "coupled" else ALPHA
    return LawCheck(target.model, warping, ranking=draft.model, residual_corrections=verify != "coupled", alpha=alpha)


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
    assert (totals["predrafted_used"] > 0) == (mode == "early-exit"), totals  # pre-drafts adopted after hits
    _assert_events_tested(law, verify)
    law.assert_matches(f"{mode}/{verify} at {warping}")


TREE_ENGINES = {"transformers": {}, "static-batched": {"engine": "static", "batching": "on"}}


@pytest.mark.parametrize("engine", TREE_ENGINES, ids=TREE_ENGINES.keys())
@pytest.mark.parametrize("warping", WARPINGS.values(), ids=WARPINGS.keys())
def test_coupled_token_trees_follow_the_target_law(tiny_target, tiny_draft, warping, engine):
    """Token trees (docs/design.md §3.7) of up to 6 nodes, sized online: alternatives are taken as well as the main
    chain; on transformers' cache and on the static engine with batching on (its tree rows, §15)."""
    law = LawCheck(tiny_target.model, warping, ranking=tiny_draft.model)
    totals = run(_generate_all(tiny_target, tiny_draft, "sync", warping, law, limits=TREE_ENGINES[engine],
                               verify="coupled", tree_budget=6, stats=("tree_alternatives",)))
    _assert_speculated(totals, "coupled", warping)
    assert totals["tree_alternatives"] >= GENERATIONS // 10, totals  # paths through alternatives, not chains alone
    law.assert_matches(f"sync/coupled trees on {engine} at {warping}")


@pytest.mark.parametrize("warping", WARPINGS.values(), ids=WARPINGS.keys())
@pytest.mark.parametrize("verify", EXACT_VERIFY_MODES)
@pytest.mark.parametrize("decode_ahead", ["off", "on"])
def test_pipeline_under_jitter_follows_the_target_law(tiny_target, tiny_draft, decode_ahead, verify, warping):
    """Decode-ahead off: every token goes through verification. On: the cloud's own tokens race the edge's
    drafts for the same positions, chains die and roll back; the law must not notice. On the tiny pair the
    cloud decodes as fast as the edge drafts, so the cloud's hook lets drafts arrive before each step it
    decodes alone (otherwise it would decode nearly everything and the race would hardly be run)."""
    law = _law(tiny_target, tiny_draft, warping, verify, timed=True)
    totals = run(_generate_all(tiny_target, tiny_draft, "pipeline", warping, law, jitter=True, verify=verify,
                               decode_ahead=decode_ahead))
    if decode_ahead == "off":
        assert totals["cloud_tokens"] == 0
        _assert_speculated(totals, verify, warping)
    else:
        assert totals["accepted"] > 0 and totals["cloud_tokens"] > 0 and totals["dead_chains"] > 0, totals
    law.assert_matches(f"pipeline/{verify}/decode-ahead {decode_ahead} at {warping}")


@pytest.mark.parametrize("verify", EXACT_VERIFY_MODES)
def test_the_default_online_pipeline_follows_the_target_law(tiny_target, tiny_draft, verify):
    """The pipeline as shipped: draft lengths chosen online by the policy (docs/design.md §4.4: its estimates, the
    confidence pause, length 0 with shadow drafts), decode-ahead where it is the default (coupled), under jitter."""
    law = _law(tiny_target, tiny_draft, T1, verify, timed=True)
    totals = run(_generate_all(tiny_target, tiny_draft, "pipeline", T1, law, jitter=True, online=True, verify=verify))
    assert totals["accepted"] > 0 and totals["accepted"] < totals["drafted"], totals
    assert (totals["cloud_tokens"] > 0) == (verify == "coupled"), totals  # decode-ahead's auto: coupled only
    law.assert_matches(f"pipeline/{verify} as shipped (online lengths) at {T1}")


@pytest.mark.parametrize("verify", EXACT_VERIFY_MODES)
def test_generations_that_end_at_eos_follow_the_target_law(tiny_target, tiny_draft, verify, monkeypatch):
    """EOS live: the target's stop set (the cloud's: it tells the edge in Ready) gets its most frequent token, so about
    half the generations end early, at an EOS drafted, corrected or given as a bonus, mid-batch. The tokens up to it
    follow the target's law, and nothing comes after it."""
    monkeypatch.setattr(tiny_target.model.generation_config, "eos_token_id", LIVE_EOS)
    eos_ids = eos_token_ids(tiny_target.model, tiny_target.tokenizer)
    assert LIVE_EOS in eos_ids
    law = _law(tiny_target, tiny_draft, T1, verify)
    totals = run(_generate_all(tiny_target, tiny_draft, "sync", T1, law, eos_ids=eos_ids, verify=verify))
    assert totals["ended_at_eos"] >= GENERATIONS // 4, totals
    _assert_speculated(totals, verify, T1)
    law.assert_matches(f"sync/{verify} ending at EOS at {T1}")


@pytest.mark.parametrize("verify", EXACT_VERIFY_MODES)
def test_sessions_the_verification_budget_caps_follow_the_target_law(tiny_target, tiny_draft, verify):
    """A budget of almost nothing (cloud_server/capacity.py): each session's passes run within a slack of 3 decode
    steps, then coupled's cloud decodes tokens itself while drafts wait, and they are checked against its tokens,
    and dense and split-exact verify one draft per pass (stop-and-wait, no decode-ahead asked for). The law must
    not notice."""
    law = _law(tiny_target, tiny_draft, T1, verify, timed=True)
    totals = run(_generate_all(tiny_target, tiny_draft, "sync", T1, law, limits={"verify_budget": 1e-6, "verify_budget_slack": 3},
                               verify=verify, stats=("capped_drafts",)))
    _assert_speculated(totals, verify, T1)
    assert totals["capped_drafts"] > 0, totals
    if verify == "coupled":  # capped down to the cloud's own tokens; elsewhere to passes of one draft (session.py)
        assert totals["cloud_tokens"] > GENERATIONS, totals
    else:
        assert totals["cloud_tokens"] == 0, totals
    law.assert_matches(f"sync/{verify} with its passes capped by the budget at {T1}")


async def _resumed_all(target: LoadedModel, draft: LoadedModel, law: LawCheck, **cfg: object) -> dict[str, int]:
    """GENERATIONS pipelined generations, each cut after 1..NEW_TOKENS-1 tokens (by seed) and resumed from them
    (`resume_from`: a new session from the prompt plus the tokens so far, edge_client/resume.py); the two pieces
    together go into `law`. Returns the sums of the resumed pieces' statistics."""
    totals = {"rounds": 0, "accepted": 0, "drafted": 0}
    async with _law_client(target, draft, T1, jitter=True, **cfg) as client:
        for seed in range(GENERATIONS):
            prompt_ids = target.tokenizer(PROMPTS[seed % len(PROMPTS)])["input_ids"]
            cut = 1 + seed % (NEW_TOKENS - 1)
            first = client.generate(prompt_ids, mode="pipeline", seed=seed, max_new_tokens=cut)
            done = await first.collect()
            rest = client.generate(prompt_ids, mode="pipeline", seed=seed, resume_from=done)
            tail = await rest.collect()
            assert len(done) == cut and len(done) + len(tail) == NEW_TOKENS, (seed, done, tail)
            law.add(prompt_ids, done + tail, first.stats.token_kinds + rest.stats.token_kinds)
            for k in totals:
                totals[k] += getattr(rest.stats, k)
    return totals


@pytest.mark.parametrize("verify", ["dense", "split-exact"])
def test_generations_resumed_after_a_cut_follow_the_target_law(tiny_target, tiny_draft, verify):
    """Resume (edge_client/resume.py) under sampling where the resumed tokens cannot be compared with an uninterrupted
    run's (the pipeline's batch ends follow timing; tests/test_resume.py checks identity where they can): each
    generation is cut after some tokens and a new session goes on from them, with the coins of their positions.
    The spliced output must follow the target's law, the tokens after the cut as much as those before."""
    law = _law(tiny_target, tiny_draft, T1, verify, timed=True)
    totals = run(_resumed_all(tiny_target, tiny_draft, law, verify=verify, draft_len=2, decode_ahead="off"))
    assert totals["rounds"] >= GENERATIONS and 0 < totals["accepted"] < totals["drafted"], totals
    law.assert_matches(f"pipeline/{verify} resumed after a cut at {T1}")


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
