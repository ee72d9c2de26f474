"""Guards written for bugs the mutation harness (scripts/mutants.py, `make test-mutants`) planted and the suite
missed: each test names the bug it catches. Pure functions and the tiny pair only: seconds, not minutes.
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from picospec.edge_client.chain import ChainToken, EdgeChain
from picospec.edge_client.drafter import Drafter
from picospec.shared.protocol import ProtocolError, SessionState
from picospec.shared.rng import Stream, uniform
from picospec.shared.sampling import SamplingParams, process_logits, sample_from
from picospec.shared.verify import gumbel_argmax, verify_coupled, verify_dense
from tests.conftest import edge, run, serving
from tests.stat_util import pooled_chisquare, target_joint

ALPHA = 1e-3
# both cuts bind on the tiny pair at this prompt: dropping either moves the two-token law by TV >= 0.15 (checked below)
CUT = SamplingParams(temperature=0.7, top_k=8, top_p=0.85)
PROMPT = "the cat"


def _rows(seed: int, n: int, V: int = 12, spread: float = 1.5) -> tuple[torch.Tensor, torch.Tensor]:
    """n rows of a target p and a nearby draft q (so that drafts are often accepted)."""
    g = torch.Generator().manual_seed(seed)
    lp = torch.randn(n, V, generator=g) * spread
    lq = lp + 0.4 * torch.randn(n, V, generator=g)
    return torch.softmax(lp, -1), torch.softmax(lq, -1)


# ---------------------------------------------------------------------------------------------- coins by position

def test_coupled_verdicts_do_not_depend_on_batching():
    """Mutant c2 (the coupled verifier keys every position's noise by the batch start): a batch's verdict must be
    what verifying its positions one at a time gives, and the emitted token is the target's own Gumbel-max sample
    at that token's absolute position."""
    k, start, differing_batches = 4, 17, 0
    for seed in range(200):
        p, q = _rows(seed, k + 1)
        drafts = [gumbel_argmax(q[i], seed, start + i) for i in range(k)]
        batch = verify_coupled(p, drafts, seed, start)
        # one position at a time, each a batch of one starting at its own absolute position
        for i in range(k):
            single = verify_coupled(p[i : i + 2], [drafts[i]], seed, start + i)
            if single.rejected:
                expected = (i, single.token, True)
                break
        else:
            expected = (k, gumbel_argmax(p[k], seed, start + k), False)
        assert (batch.accepted, batch.token, batch.rejected) == expected, seed
        assert batch.token == gumbel_argmax(p[batch.accepted], seed, start + batch.accepted)
        differing_batches += batch.accepted >= 1
    assert differing_batches > 50  # the later positions of a batch were really exercised


def test_dense_verdicts_do_not_depend_on_batching():
    """The same for dense rejection sampling: coins are keyed by absolute position, not by place in the batch."""
    k, start, later, full = 4, 9, 0, 0
    for seed in range(200):
        p, q = _rows(seed, k + 1)
        drafts = [sample_from(q[i], uniform(seed, start + i, Stream.DRAFT)) for i in range(k)]
        batch = verify_dense(p, q[:k], drafts, seed, start)
        for i in range(k):
            single = verify_dense(p[i : i + 2], q[i : i + 1], [drafts[i]], seed, start + i)
            if single.rejected:
                expected = (i, single.token, True)
                break
        else:
            # the bonus by the coin contract (shared/rng.py), not by the function under test: a draw from p at the
            # position after the last draft, with that position's TARGET coin
            expected = (k, sample_from(p[k], uniform(seed, start + k, Stream.TARGET)), False)
        assert (batch.accepted, batch.token, batch.rejected) == expected, seed
        later += batch.accepted >= 1
        full += batch.accepted == k
    assert later > 50 and full > 10  # bonus tokens were checked too


# ---------------------------------------------------------------------------------------------- stale verdicts

def test_edge_refuses_a_verdict_for_a_stale_epoch():
    """Mutant e (EdgeChain.apply's epoch check relaxed): after a rejection ends epoch 0, a verdict that still
    claims epoch 0 must be refused, not applied to the new chain's drafts."""
    s = SessionState(prompt_ids=[1, 2, 3], max_new_tokens=10, eos_ids=frozenset({0}), vocab_size=50)
    e = EdgeChain(s)
    e.chain = [ChainToken(t, sent=True) for t in (5, 6, 7)]
    e.apply(start_pos=3, verified=3, accepted=1, token=9, rejected=True, committed_len=5, finished=False, epoch=0)
    assert e.epoch == 1 and s.tokens == [1, 2, 3, 5, 9]
    e.chain = [ChainToken(t, sent=True) for t in (11, 12)]  # the new chain, in flight
    with pytest.raises(ProtocolError, match="verdict for epoch 0, edge is in epoch 1"):
        e.apply(start_pos=5, verified=2, accepted=2, token=None, rejected=False, committed_len=7, finished=False, epoch=0)
    assert s.tokens == [1, 2, 3, 5, 9] and [c.token for c in e.chain] == [11, 12]  # nothing applied
    with pytest.raises(ProtocolError, match="verdict for epoch 2, edge is in epoch 1"):
        e.apply(start_pos=5, verified=2, accepted=2, token=None, rejected=False, committed_len=7, finished=False, epoch=2)
    a = e.apply(start_pos=5, verified=2, accepted=2, token=13, rejected=False, committed_len=8, finished=False, epoch=1)
    assert a.new_tokens == (11, 12, 13) and s.tokens[-3:] == [11, 12, 13]


# ---------------------------------------------------------------------------------------------- the draft's settings

def _tv(a: dict, b: dict) -> float:
    return 0.5 * sum(abs(a.get(c, 0.0) - b.get(c, 0.0)) for c in set(a) | set(b))


def test_drafter_q_is_the_drafts_processed_distribution_under_the_session_settings(tiny_draft):
    """Mutant f1 (the drafter ignores top_p): every q row the drafter sends, and samples from, is process_logits of
    the draft's own logits under the session's settings: same support, same values. Verification stays exact
    with any q that travels with its draft, so only this (and the edge-mode law below) can see the difference."""
    prompt = tiny_draft.tokenizer(PROMPT)["input_ids"]
    cut_somewhere = 0
    for seed in range(8):
        params = SamplingParams(CUT.temperature, CUT.top_k, CUT.top_p, seed)
        drafter = Drafter(tiny_draft.model, params)
        drafter.prefill(prompt)
        d = drafter.draft(prompt, 3)
        with torch.inference_mode():
            logits = tiny_draft.model(torch.tensor([prompt + d.token_ids])).logits[0, len(prompt) - 1 : len(prompt) + 2]
        expected = process_logits(logits, params)  # the torch function; the drafter's q is shared/draws.py's numpy
        q = torch.from_numpy(d.q)
        assert torch.equal(q > 0, expected > 0), seed
        assert torch.allclose(q, expected, atol=1e-5), seed
        uncut = process_logits(logits, SamplingParams(CUT.temperature, seed=seed))
        cut_somewhere += int(((uncut > 0) & (expected == 0)).any())
    assert cut_somewhere == 8  # the cut is not a no-op here


def _assert_either_cut_missing_is_visible(model, prompt, expected) -> None:
    """The test has power against a missing cut: dropping top-k or top-p moves the law by TV > 0.15."""
    for looser in (SamplingParams(CUT.temperature, CUT.top_k), SamplingParams(CUT.temperature, top_p=CUT.top_p)):
        assert _tv(expected, target_joint(model, prompt, looser)) > 0.15


def _assert_processed_law(seen, expected, n: int, what: str, whose: str) -> None:
    """No outcome outside the processed law's support, and chi-square at false-alarm rate ALPHA."""
    assert set(seen) <= set(expected), f"outcomes {whose} processed law never produces: {set(seen) - set(expected)}"
    pvalue, cells = pooled_chisquare(seen, expected, n)
    assert pvalue > ALPHA, f"{what} deviates from {whose} processed law (p={pvalue:.2e}, {cells} cells)"


async def _first_two_tokens(client, prompt: list[int], mode: str, n: int) -> Counter:
    """Counts of the generated token pairs over seeds 0..n-1."""
    seen: Counter = Counter()
    for seed in range(n):
        seen[tuple(await client.generate(prompt, mode=mode, seed=seed).collect())] += 1
    return seen


def test_edge_mode_samples_the_drafts_processed_law(tiny_draft):
    """Mutant f1 end to end: `--mode edge` with T=0.7, top-k and top-p emits the draft's own processed law over
    the first two tokens (chi-square, false-alarm rate ALPHA); the law without either cut is far from it."""
    prompt = tiny_draft.tokenizer(PROMPT)["input_ids"]
    expected = target_joint(tiny_draft, prompt, CUT)
    _assert_either_cut_missing_is_visible(tiny_draft, prompt, expected)
    n = 1500

    async def scenario():
        async with edge("127.0.0.1:1", tiny_draft, max_new_tokens=2, ignore_eos=True, temperature=CUT.temperature,
                        top_k=CUT.top_k, top_p=CUT.top_p) as client:  # edge mode needs no server
            return await _first_two_tokens(client, prompt, "edge", n)

    _assert_processed_law(run(scenario()), expected, n, "edge mode", "the draft's")


@pytest.mark.parallel
def test_sync_with_top_k_and_top_p_emits_the_targets_processed_law(tiny_target, tiny_draft):
    """Mutants f2 and f3 (the cloud processes the target's logits without top_p, or without top_k): `sync` with
    dense verification at T=0.7, top-k and top-p emits the target's processed law over the first two tokens. The
    suite's other sampling tests use top-p without top-k; dropping either cut here moves the law by TV > 0.15."""
    prompt = tiny_target.tokenizer(PROMPT)["input_ids"]
    expected = target_joint(tiny_target, prompt, CUT)
    _assert_either_cut_missing_is_visible(tiny_target, prompt, expected)
    n = 1500

    async def scenario():
        async with serving(tiny_target) as (_, addr), edge(addr, tiny_draft, max_new_tokens=2, draft_len=2, verify="dense",
                                                           temperature=CUT.temperature, top_k=CUT.top_k,
                                                           top_p=CUT.top_p, ignore_eos=True) as client:
            return await _first_two_tokens(client, prompt, "sync", n)

    _assert_processed_law(run(scenario()), expected, n, "sync output", "the target's")


def test_every_planted_bug_still_applies_to_the_tree():
    """`make test-mutants` plants each bug by its exact text: a change that moves that text must move the mutant with
    it (f2 had gone stale when the cloud's logits went through `on_cpu`, and the harness exited at it)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, str(root / "scripts" / "mutants.py"), "--list"], cwd=root, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
