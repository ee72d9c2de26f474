"""The output law on a real model (SmolLM2-135M, vocabulary 49,152) under sampling: tests/law.py's PIT test.

Real vocabulary means the paths the tiny pair cannot reach: the dense payload compressed with zstd at full
vocabulary, split-exact's tails drawn from a real long tail, top-k and top-p cutting real distributions. Each
test is one exact scheme at one setting of {T=1; T=0.7, top-k 20, top-p 0.9} and pools GENERATIONS x NEW_TOKENS
= 240 tokens: half from `sync`, half from the jittered `pipeline` with decode-ahead on. Each KS statistic
detects a PIT shift of detectable_shift(240) = 0.187 at 90%, false-alarm rate 1e-3 per test (4e-5 and 0.209 in dense
and split-exact, whose pipelined tokens depend on timing: tests/law.py): a
smoke test of the real-vocabulary paths, with the tiny pair's 2,000-token tests carrying the power. The draft
is the target's first DRAFT_LAYERS layers: it agrees with the target rarely but enough that drafts are
accepted and rejections and corrections happen, as each test asserts, and it keeps the test cheap (the law
does not depend on the draft, only the mix of paths does).
"""
from __future__ import annotations


import pytest

from picospec.bench.jitter import Jitter
from picospec.shared.config import EXACT_VERIFY_MODES
from picospec.shared.models import load_model
from tests.conftest import edge, run, serving, skip_large
from tests.law import ALPHA, ALPHA_TIMED, T07_TOPK_TOPP, T1, LawCheck, Warping

pytestmark = pytest.mark.parallel  # make test runs these two at a time (pyproject.toml: markers)

GENERATIONS = 12
NEW_TOKENS = 20
DRAFT_LAYERS = 8
PROMPTS = ("<|im_start|>user\nName three fruits.<|im_end|>\n<|im_start|>assistant\n",
           "def merge_sorted(a, b):\n", "The old lighthouse keeper looked out over the")
WARPINGS = {"T1": T1, "T0.7-k20-p0.9": T07_TOPK_TOPP}


@pytest.fixture(scope="module")
def smol():
    return load_model("smollm2-135m-instruct", progress=False)


@pytest.fixture(scope="module")
def smol_draft(smol):
    return load_model(f"smollm2-135m-instruct:layers={DRAFT_LAYERS}", progress=False)


async def _generate(smol, draft, verify: str, warping: Warping, law: LawCheck) -> dict[str, int]:
    totals = {"rounds": 0, "accepted": 0, "drafted": 0, "rejections": 0, "residual_bytes": 0}
    async with serving(smol) as (service, addr):
        service.hooks = Jitter(11, 0.001)
        async with edge(addr, draft, max_new_tokens=NEW_TOKENS, ignore_eos=True, verify=verify, residual_top_k=8,
                        tail_samples=2, decode_ahead="on", **warping.edge_kwargs()) as client:
            client.hooks = Jitter(12, 0.001)
            for seed in range(GENERATIONS):
                mode = "sync" if seed % 2 == 0 else "pipeline"
                prompt_ids = smol.tokenizer(PROMPTS[seed % len(PROMPTS)])["input_ids"]
                gen = client.generate(prompt_ids, mode=mode, seed=seed, draft_len=1 + seed % 4)
                ids = await gen.collect()
                assert len(ids) == NEW_TOKENS
                law.add(prompt_ids, ids)
                for k in totals:
                    totals[k] += getattr(gen.stats, k)
    return totals


@skip_large
@pytest.mark.parametrize("warping", WARPINGS.values(), ids=WARPINGS.keys())
@pytest.mark.parametrize("verify", EXACT_VERIFY_MODES)
def test_smollm2_sampling_follows_the_target_law(smol, smol_draft, verify, warping):
    # the pipeline's batch ends follow timing, so outside coupled the tokens differ from run to run (tests/law.py)
    law = LawCheck(smol.model, warping, ranking=smol_draft.model, alpha=ALPHA_TIMED if verify != "coupled" else ALPHA)
    totals = run(_generate(smol, smol_draft, verify, warping, law))
    assert totals["rounds"] > 0 and 0 < totals["accepted"] < totals["drafted"], totals
    if verify == "split-exact":  # corrections sampled on the edge from the real top-K and tail draws
        assert totals["rejections"] > 0 and totals["residual_bytes"] > 0, totals
    law.assert_matches(f"SmolLM2 {verify} at {warping} (sync and pipeline)")
