#!/usr/bin/env python3
"""Planted bugs, caught: a small mutation harness for the exactness and protocol contracts (`make test-mutants`).

For each mutant: copy the working tree (tracked files plus untracked, non-ignored ones; never .venv) into a
temporary directory, apply ONE realistic bug there as an exact search/replace (it must match exactly once, or
the harness stops with "mutant N no longer applies"), and run the test subset chosen to catch it with
`.venv/bin/python -m pytest -x -q` from the copy's root, under a time limit. Before running the tests the harness
checks that the copy's code is what gets imported (it prints where `picospec.shared.verify` resolves; PYTHONPATH also points at
the copy, so subprocesses the tests start import it too). The working tree itself is never modified.

A mutant whose subset passes (or runs out of time) has survived: the run fails (exit 1). Afterwards the tests
that caught mutants are run once more on an unmutated copy: a "catch" by a test that fails anyway means nothing,
so that fails the run too. The table goes to stdout and to bench_out/mutants.md.

    .venv/bin/python scripts/mutants.py                # all mutants
    .venv/bin/python scripts/mutants.py --only a1,d    # some of them
    .venv/bin/python scripts/mutants.py --fast         # the fast subset: mutants whose catching tests are pure (minutes)
    .venv/bin/python scripts/mutants.py --list         # what they are, and whether each still applies
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = ROOT / ".venv" / "bin" / "python"
LOGS = ROOT / "bench_out" / "mutants"  # one pytest log per mutant: the folder beside --out, named as it without .md
FROM_GIT: tuple[str, ...] = ()  # --from-git


@dataclass(frozen=True)
class Mutant:
    key: str
    what: str
    file: str
    search: str
    replace: str
    tests: tuple[str, ...]   # pytest node ids or files, cheapest likely catcher first (-x stops at the first failure)
    limit_s: int = 240
    fast: bool = False       # in the fast subset (--fast, `make test-mutants-fast`): pure tests only, seconds each


LAW_TINY = "tests/test_law_tiny.py"  # the output law end to end over real gRPC (tiny pair)
CONDITIONED = "tests/test_verify_conditioned.py"  # whole draft batches against an independent reference, by stratum
JOINT, BONUS, CORRECTION = (f"{CONDITIONED}::test_the_joint_law_of_a_batch", f"{CONDITIONED}::test_the_bonus_after_a_full_acceptance",
                            f"{CONDITIONED}::test_the_correction_after_a_partial_acceptance_at_every_position")
# the same file's seed-by-seed checks (well under a second): the cheapest catchers, the laws (about 10 s each) behind them
COINS = f"{CONDITIONED}::test_rejection_verdicts_follow_their_coins_seed_by_seed"
GUMBEL = f"{CONDITIONED}::test_coupled_verdicts_are_the_full_vocabulary_gumbel_max_seed_by_seed"

MUTANTS: list[Mutant] = [
    Mutant(
        "a1", "dense residual ignores q: norm(max(0, p - q)) becomes norm(p)",
        "shared/verify.py",
        "        residual = torch.clamp(p[i].double() - q[i].double(), min=0.0)\n",
        "        residual = p[i].double()\n",
        ("tests/test_verify_math.py::test_dense_verification_emits_p",),

        fast=True,
    ),
    Mutant(
        "a2", "split-exact residual sampler accepts every proposal (max(0, 1 - q(y)/p(y)) dropped)",
        "shared/draws.py",
        "            if py > 0.0 and float(u[i, 1]) * py < py - float(q[y]):\n",
        "            if py > 0.0:\n",
        ("tests/test_verify_modes.py::test_split_exact_emits_p[far-t1]",
         "tests/test_verify_modes.py::test_split_exact_emits_p[flat_tail-t1]"),
    ),
    Mutant(
        "b", "split-exact residual cut to the top-K: proposals never come from the tail",
        "shared/draws.py",
        "    p_head = head_mass / (head_mass + hint.tail_mass)\n",
        "    p_head = 1.0  # the top-K taken as the whole of p\n",
        ("tests/test_verify_modes.py::test_split_exact_emits_p[far-t1]",
         "tests/test_verify_modes.py::test_split_exact_emits_p[flat_tail-t1]"),
    ),
    Mutant(
        "c1", "Gumbel noise keyed by position + 1 (shared/rng.py, the numpy noise both sides use on a CPU)",
        "shared/rng.py",
        "    bits = _with_tokens_u32(_prefix(seed, position, int(Stream.GUMBEL)), np.asarray(token_ids).astype(np.uint32))\n",
        "    bits = _with_tokens_u32(_prefix(seed, position + 1, int(Stream.GUMBEL)), np.asarray(token_ids).astype(np.uint32))\n",
        ("tests/test_draws.py::test_uniforms_and_noise_are_the_tensor_functions_bit_for_bit",),

        fast=True,
    ),
    Mutant(
        "c2", "coupled verification keys every position's noise by the batch start",
        "shared/verify.py",
        "        y = gumbel_argmax(p[i], seed, start_pos + i)\n",
        "        y = gumbel_argmax(p[i], seed, start_pos)\n",
        # survived the suite before test_exactness_guards.py (the coupled law tests and both e2e coupled tests)
        (f"{GUMBEL}[6]", "tests/test_exactness_guards.py::test_coupled_verdicts_do_not_depend_on_batching",
         "tests/test_verify_modes.py::test_coupled_emits_p_and_accepts_at_least_the_bound[far-t1]"),
        fast=True,
    ),
    Mutant(
        "c3", "greedy coupled verification emits the draft's token at a rejection, not the cloud's argmax",
        "shared/verify.py",
        "            return Verdict(i, best[i], True)\n",
        "            return Verdict(i, x, True)\n",
        ("tests/test_verify_math.py::test_greedy_verdicts_from_argmaxes_alone_equal_the_coupled_ones",
         "tests/test_e2e_tiny.py"),
    ),
    Mutant(
        "h1", "a session's lane runs its jobs on several threads: a cancelled call's settling runs beside its pass",
        "cloud_server/worker.py",
        'ThreadPoolExecutor(max_workers=1, thread_name_prefix="target-session")',
        'ThreadPoolExecutor(max_workers=4, thread_name_prefix="target-session")',
        ("tests/test_worker.py::test_a_job_whose_await_was_cancelled_still_ends_before_the_lanes_next_job",
         "tests/test_batching.py::test_a_call_ended_with_a_step_in_flight_closes_its_cache_after_that_step"),
    ),
    Mutant(
        "l1", "llama.cpp rollback keeps the rejected drafts' cache entries (no sequence removal)",
        "shared/llama_backend.py",
        "        if not self._ctx.kv_cache_seq_rm(0, length, -1):\n",
        "        if False and not self._ctx.kv_cache_seq_rm(0, length, -1):\n",
        ("tests/test_llama_cpp.py::test_rollback_storm_matches_a_fresh_cache",),
    ),
    Mutant(
        "l2", "llama.cpp logits returned for the first positions of a pass instead of the last",
        "shared/llama_backend.py",
        "            first_out = max(0, n - keep - start)  # this piece's first position whose logits are wanted\n",
        "            first_out = 0 if start == 0 else n  # the piece's first positions (wrong rows)\n",
        ("tests/test_llama_cpp.py::test_backend_logits_equal_llama_cpp_own",),
    ),
    Mutant(
        "l3", "dense bonus token drawn with the coin that accepted the last draft (a coin reused across streams)",
        "shared/verify.py",
        "    return Verdict(k, sample_from(p[k], uniform(seed, start_pos + k, Stream.TARGET)), False)\n",
        "    return Verdict(k, sample_from(p[k], uniform(seed, start_pos + max(k - 1, 0), Stream.ACCEPT)), False)\n",
        # the conditioned pure tests first (the coins seed by seed, the bonus after k accepted drafts); the tiny pair's law last
        (f"{COINS}[dense]", f"{BONUS}[dense]",
         "tests/test_law_tiny.py::test_stop_and_wait_modes_follow_the_target_law[sync-dense-T1]"),
        limit_s=300,
        fast=True,
    ),
    Mutant(
        "d", "dense bonus token drawn from q instead of p",
        "shared/verify.py",
        "    return Verdict(k, sample_from(p[k], uniform(seed, start_pos + k, Stream.TARGET)), False)\n",
        "    return Verdict(k, sample_from(q[k - 1], uniform(seed, start_pos + k, Stream.TARGET)), False)\n",
        ("tests/test_verify_math.py::test_bonus_token_when_all_accepted_is_from_last_p_row",),

        fast=True,
    ),
    Mutant(
        "e", "edge applies a verdict of a stale epoch (EdgeChain.apply's epoch check relaxed to future epochs)",
        "edge_client/chain.py",
        "            if epoch != self.epoch:\n",
        "            if epoch > self.epoch:\n",
        # survived the suite before test_exactness_guards.py (test_protocol, test_refusals, test_pipeline)
        ("tests/test_exactness_guards.py::test_edge_refuses_a_verdict_for_a_stale_epoch", "tests/test_protocol.py"),
        fast=True,
    ),
    Mutant(
        "f1", "top-p on one side only: the drafter processes logits without top_p",
        "edge_client/drafter.py",
        "            q = quantize(process_logits(logits, self.params), self.precision)\n",
        "            q = quantize(process_logits(logits, SamplingParams(self.params.temperature, self.params.top_k,"
        " seed=self.params.seed)), self.precision)\n",
        # verification stays exact with any q that travels with its drafts, so no exactness test can see this one:
        # it survived the suite before test_exactness_guards.py (the e2e sampling tests at top-p 0.9 included)
        ("tests/test_exactness_guards.py::test_drafter_q_is_the_drafts_processed_distribution_under_the_session_settings",
         "tests/test_exactness_guards.py::test_edge_mode_samples_the_drafts_processed_law"),
    ),
    Mutant(
        "f2", "top-p on one side only: the cloud's target processes logits without top_p",
        "cloud_server/target.py",
        "        p = process_logits(on_cpu(logits), self.params)\n",
        "        p = process_logits(on_cpu(logits), SamplingParams(self.params.temperature, self.params.top_k,"
        " seed=self.params.seed))\n",
        ("tests/test_law_tiny.py::test_stop_and_wait_modes_follow_the_target_law[sync-dense-T0.7-k20-p0.9]",
         "tests/test_exactness_guards.py::test_sync_with_top_k_and_top_p_emits_the_targets_processed_law"),
        limit_s=300,
    ),
    Mutant(
        "f3", "top-k on one side only: the cloud's handshake drops the edge's top_k",
        "cloud_server/handshake.py",
        "        params = SamplingParams(s.temperature, s.top_k, s.top_p, s.seed)\n",
        "        params = SamplingParams(s.temperature, 0, s.top_p, s.seed)\n",
        # the suite's sampling tests before test_exactness_guards.py never set top_k
        ("tests/test_exactness_guards.py::test_sync_with_top_k_and_top_p_emits_the_targets_processed_law",),
        limit_s=300,
    ),
    Mutant(
        "g1", "codec: the declared-size bound removed (body_len > max_len no longer refused)",
        "shared/codec.py",
        "    if body_len > max_len:\n",
        "    if False:  # bound removed\n",
        ("tests/test_codec.py",),
    ),
    Mutant(
        "g2", "codec: the decompressed-size bound removed (zstd output read to the end)",
        "shared/codec.py",
        "stream_reader(io.BytesIO(raw)).read(body_len + 1)",
        "stream_reader(io.BytesIO(raw)).read()",
        ("tests/test_codec.py",),
    ),
    # ---- pure verification: whole batches, conditioned on the verdict (tests/test_verify_conditioned.py) ----
    Mutant(
        "v1", "dense correction drawn with the coin that rejected the draft (RESIDUAL coin replaced by ACCEPT)",
        "shared/verify.py",
        "        return Verdict(i, sample_from(residual, uniform(seed, pos, Stream.RESIDUAL)), True)\n",
        "        return Verdict(i, sample_from(residual, uniform(seed, pos, Stream.ACCEPT)), True)\n",
        (f"{COINS}[dense]", f"{CORRECTION}[dense]"),
        fast=True,
    ),
    Mutant(
        "v2", "dense residual built with the previous draft's q row (q[i - 1]: off by one position)",
        "shared/verify.py",
        "        residual = torch.clamp(p[i].double() - q[i].double(), min=0.0)\n",
        "        residual = torch.clamp(p[i].double() - q[max(i - 1, 0)].double(), min=0.0)\n",
        (f"{COINS}[dense]", f"{CORRECTION}[dense]"),
        fast=True,
    ),
    Mutant(
        "v3", "dense correction at position 0 only: the residual of the batch's first row whatever position rejected",
        "shared/verify.py",
        "        residual = torch.clamp(p[i].double() - q[i].double(), min=0.0)\n",
        "        residual = torch.clamp(p[0].double() - q[0].double(), min=0.0)\n",
        (f"{COINS}[dense]", f"{CORRECTION}[dense]"),
        fast=True,
    ),
    Mutant(
        "v4", "dense acceptance ratio inverted: accept with min(1, q(x)/p(x))",
        "shared/verify.py",
        "        if uniform(seed, pos, Stream.ACCEPT) * qx < px:\n",
        "        if uniform(seed, pos, Stream.ACCEPT) * px < qx:\n",
        (f"{COINS}[dense]", f"{JOINT}[dense]"),
        fast=True,
    ),
    Mutant(
        "v5", "dense acceptance ratio off by one position: p(x) read from the next row",
        "shared/verify.py",
        "        px, qx = float(p[i, x]), float(q[i, x])\n",
        "        px, qx = float(p[i + 1, x]), float(q[i, x])\n",
        (f"{COINS}[dense]", f"{JOINT}[dense]"),
        fast=True,
    ),
    Mutant(
        "v6", "dense bonus drawn from the last draft's row p[k - 1] instead of p[k]",
        "shared/verify.py",
        "    return Verdict(k, sample_from(p[k], uniform(seed, start_pos + k, Stream.TARGET)), False)\n",
        "    return Verdict(k, sample_from(p[max(k - 1, 0)], uniform(seed, start_pos + k, Stream.TARGET)), False)\n",
        (f"{COINS}[dense]", f"{BONUS}[dense]"),
        fast=True,
    ),
    Mutant(
        "v7", "split bonus drawn with the coin that accepted the last draft",
        "shared/verify.py",
        "    return SplitVerdict(k, sample_from(p[k], uniform(seed, start_pos + k, Stream.TARGET)))\n",
        "    return SplitVerdict(k, sample_from(p[k], uniform(seed, start_pos + max(k - 1, 0), Stream.ACCEPT)))\n",
        (f"{COINS}[split-exact]", f"{BONUS}[split-exact]"),
        fast=True,
    ),
    Mutant(
        "v8", "split acceptance ratio inverted: reject when u * p(x) >= q(x)",
        "shared/verify.py",
        "        if uniform(seed, start_pos + i, Stream.ACCEPT) * qx >= float(p[i, x]):\n",
        "        if uniform(seed, start_pos + i, Stream.ACCEPT) * float(p[i, x]) >= qx:\n",
        (f"{COINS}[split-exact]", f"{JOINT}[split-exact]"),
        fast=True,
    ),
    Mutant(
        "v9", "split acceptance at position 0's row only: p(x) read from the batch's first row",
        "shared/verify.py",
        "        if uniform(seed, start_pos + i, Stream.ACCEPT) * qx >= float(p[i, x]):\n",
        "        if uniform(seed, start_pos + i, Stream.ACCEPT) * qx >= float(p[0, x]):\n",
        (f"{COINS}[split-exact]", f"{JOINT}[split-exact]"),
        fast=True,
    ),
    Mutant(
        "v10", "split-exact residual sampler accepts a proposal with the coin that chose it (u0 for u1)",
        "shared/draws.py",
        "            if py > 0.0 and float(u[i, 1]) * py < py - float(q[y]):\n",
        "            if py > 0.0 and float(u[i, 0]) * py < py - float(q[y]):\n",
        (f"{CORRECTION}[split-exact]",),
        fast=True,
    ),
    Mutant(
        "v11", "coupled bonus drawn with the last draft's noise (position start + k - 1)",
        "shared/verify.py",
        "    return Verdict(k, gumbel_argmax(p[k], seed, start_pos + k), False)\n",
        "    return Verdict(k, gumbel_argmax(p[k], seed, start_pos + max(k - 1, 0)), False)\n",
        (f"{GUMBEL}[6]", f"{BONUS}[coupled]"),
        fast=True,
    ),
    Mutant(
        "v12", "coupled rejection emits the draft's token instead of the target's own sample",
        "shared/verify.py",
        "            return Verdict(i, y, True)\n",
        "            return Verdict(i, x, True)\n",
        (f"{GUMBEL}[6]", f"{JOINT}[coupled]"),
        fast=True,
    ),
    Mutant(
        "p1", "split correction sampled with the last accepted draft's q row (EdgeChain.apply: chain[accepted - 1])",
        "edge_client/chain.py",
        "                extra = self.chain[accepted].extra if accepted < len(self.chain) else None\n",
        "                extra = self.chain[max(accepted - 1, 0)].extra if accepted < len(self.chain) else None\n",
        (f"{CONDITIONED}::test_a_split_correction_takes_the_q_row_of_the_rejected_draft", f"{CORRECTION}[split-exact]"),
        fast=True,
    ),
    Mutant(
        "p2", "split correction sampled with the next draft's q row (EdgeChain.apply: chain[accepted + 1])",
        "edge_client/chain.py",
        "                extra = self.chain[accepted].extra if accepted < len(self.chain) else None\n",
        "                extra = self.chain[min(accepted + 1, len(self.chain) - 1)].extra if accepted < len(self.chain) else None\n",
        (f"{CONDITIONED}::test_a_split_correction_takes_the_q_row_of_the_rejected_draft", f"{CORRECTION}[split-exact]"),
        fast=True,
    ),
    # ---- coin streams: two streams made one (an IntEnum with a repeated value is an alias) ----
    Mutant(
        "n1", "rng: the RESIDUAL stream is the ACCEPT stream (a correction drawn with its rejection's coin)",
        "shared/rng.py",
        "    RESIDUAL = 3 ",
        "    RESIDUAL = 2 ",
        (f"{CONDITIONED}::test_every_coin_stream_is_its_own", f"{CORRECTION}[dense]"),
        fast=True,
    ),
    Mutant(
        "n2", "rng: the DRAFT stream is the ACCEPT stream (a draft accepted with the coin that drew it)",
        "shared/rng.py",
        "    DRAFT = 1 ",
        "    DRAFT = 2 ",
        (f"{CONDITIONED}::test_every_coin_stream_is_its_own", f"{JOINT}[dense]"),
        fast=True,
    ),
    Mutant(
        "n3", "rng: the TAIL stream is the PROPOSAL stream (split-exact tail draws reuse the residual sampler's coins)",
        "shared/rng.py",
        "    TAIL = 6 ",
        "    TAIL = 7 ",
        (f"{CONDITIONED}::test_every_coin_stream_is_its_own", f"{CORRECTION}[split-exact]"),
        fast=True,
    ),
    # ---- the system around verification: the draft queue, decode-ahead, epochs, caches, trees, batching, hints ----
    Mutant(
        "s1", "draft queue: drafts that contradict the cloud's own tokens are kept (_trim_pending never ends a chain)",
        "cloud_server/drafts.py",
        "        if run.token_ids[:n] != st.tokens[run.start_pos : run.start_pos + n]:\n",
        "        if False:  # (mutant) overtaken drafts always taken as agreeing\n",
        (f"{LAW_TINY}::test_pipeline_under_jitter_follows_the_target_law[on-dense-T1]",
         "tests/test_pipeline.py::test_greedy_pipeline_equals_target_under_jitter"),
        limit_s=300,
    ),
    Mutant(
        "s3", "epochs: a rejection no longer starts a new epoch (SessionState.commit, both sides)",
        "shared/protocol.py",
        "        if rejected:\n            self.epoch += 1\n",
        "        if rejected:\n            pass  # (mutant) the epoch stays\n",
        ("tests/test_pipeline.py::test_greedy_pipeline_equals_target_under_jitter", "tests/test_protocol.py"),
        limit_s=300,
    ),
    Mutant(
        "s4", "KV cache: a crop after a rejection keeps the dropped entries (HFBackend._drop_after does nothing)",
        "shared/hf_backend.py",
        "        self.cache.crop(length - self.length)  # negative = tokens to drop, in transformers 4 and 5\n",
        "        pass  # (mutant) the cache keeps every entry\n",
        ("tests/test_e2e_tiny.py::test_greedy_sync_equals_cloud_equals_target_generate",),
    ),
    Mutant(
        "s5", "tree attention: a node sees its parent only, not the ancestors above it (ancestor_mask)",
        "shared/trees.py",
        "            mask[i] = mask[p]  # a node sees what its parent sees, and itself\n",
        "            mask[i, p] = True  # (mutant) its parent only\n",
        ("tests/test_trees.py::test_ancestor_mask_paths_and_matching",),
        fast=True,
    ),
    Mutant(
        "s6", "batching: two sessions' rows of one pass get each other's logits (results handed out reversed)",
        "cloud_server/engine/batcher.py",
        "                for req, out in zip(batch, results):\n",
        "                for req, out in zip(batch, results[::-1]):  # (mutant)\n",
        ("tests/test_batching.py::test_concurrent_sessions_get_the_targets_greedy_tokens",),
        limit_s=300,
    ),
    Mutant(
        "s8", "batching: every session charged the whole of a pass it shared (its compute counted once per row)",
        "cloud_server/engine/batcher.py",
        "    return [pass_s * n / total for n in tokens]\n",
        "    return [pass_s for n in tokens]  # (mutant)\n",
        ("tests/test_batching.py::test_with_the_hold_sessions_that_submit_again_at_once_share_every_pass_and_its_cost",),
        limit_s=300,
    ),
    Mutant(
        "s7", "early exits: pre-drafts adopted whatever context the verdict committed (the context check dropped)",
        "edge_client/hints.py",
        "        if hinted and not chain.chain and chain.tokens == pre.context:\n",
        "        if hinted and not chain.chain:  # (mutant) any context\n",
        ("tests/test_early_exit.py::test_greedy_with_hints_equals_target_under_jitter",
         f"{LAW_TINY}::test_stop_and_wait_modes_follow_the_target_law[early-exit-dense-T1]"),
        limit_s=300,
    ),
    Mutant(
        "s9", "the cloud's own tokens (decode-ahead, the first token, the cloud alone) drawn with the previous "
              "position's TARGET coin (a coin a bonus token there already used)",
        "cloud_server/target.py",
        "        return sample_token(p, self.params.seed, len(committed), Stream.TARGET), self._clock() - t0\n",
        "        return sample_token(p, self.params.seed, len(committed) - 1, Stream.TARGET), self._clock() - t0\n",
        # the law tests cannot see it (each position's coin is still used once in a run of the cloud's own tokens);
        # the coin contract does
        ("tests/test_first_token.py::test_a_one_token_generation_ends_with_the_ready_and_draws_the_bonus_coin",),
    ),
    Mutant(
        "r1", "resume: a resumed piece starts from the original prompt (the tokens already yielded left out of it)",
        "edge_client/resume.py",
        "    return list(prompt) + list(committed), max_new_tokens - len(committed)\n",
        "    return list(prompt), max_new_tokens - len(committed)\n",
        ("tests/test_resume.py::test_resume_plan_extends_the_prompt_and_spends_the_rest_of_the_budget",
         f"{LAW_TINY}::test_generations_resumed_after_a_cut_follow_the_target_law[dense]"),
        fast=True,
    ),
    Mutant(
        "r2", "resume: after a break the piece goes on from the caller's tokens only (the broken piece's are drawn "
              "again with the same coins: yielded twice)",
        "edge_client/client.py",
        "            piece_prompt, remaining = resume_plan(prompt, committed, cfg.max_new_tokens)\n",
        "            piece_prompt, remaining = resume_plan(prompt, committed[:resumed_from], cfg.max_new_tokens)\n",
        ("tests/test_resume.py::test_killed_cloud_restarted_the_edge_resumes_exactly[pipeline-dense-0.0]",
         "tests/test_partition.py"),
        limit_s=300,
    ),
    Mutant(
        "t1", "llama.cpp trees: a node is not seen by its descendants decoded in the same call (its sequence ids)",
        "shared/llama_tree.py",
        "                seen_by[a - old].append(seqs[i])\n",
        "                pass  # (mutant) seen by itself only\n",
        ("tests/test_llama_cpp.py::test_tree_nodes_see_exactly_their_path",),
    ),
    Mutant(
        "t2", "llama.cpp trees: the kept path never joins the linear sequence (keep and reroot forget it)",
        "shared/llama_tree.py",
        "            b.copy_sequence(self.seqs[path[-1]], 0)",
        "            pass  # (mutant)",
        ("tests/test_llama_cpp.py::test_tree_nodes_see_exactly_their_path",),
    ),
    Mutant(
        "t3", "llama.cpp batching: a session's crop (a rejection's rollback, a slot given back) is never done",
        "cloud_server/engine/llama_engine.py",
        "            crops, self._crops = self._crops, {}\n",
        "            crops, self._crops = {}, {}  # (mutant)\n",
        ("tests/test_llama_cpp.py::test_sessions_batched_in_one_llama_cpp_context_get_llama_cpp_greedy",),
    ),
    Mutant(
        "t4", "llama.cpp batching: every row of a pass goes into the first row's sequence (sessions' keys mixed)",
        "cloud_server/engine/llama_engine.py",
        "            seqs += [[r.slot]] * n\n",
        "            seqs += [[rows[0].slot]] * n  # (mutant)\n",
        ("tests/test_llama_cpp.py::test_sessions_batched_in_one_llama_cpp_context_get_llama_cpp_greedy",),
    ),
    Mutant(
        "d1", "the edge's numpy inverse CDF ignores an unnormalised row's total (u, not u * total: a residual's law)",
        "shared/draws.py",
        '    idx = int(np.searchsorted(cdf, u * total, side="right"))\n',
        '    idx = int(np.searchsorted(cdf, u, side="right"))\n',
        ("tests/test_draws.py::test_inverse_cdf_draws_land_where_torch_lands",),
        fast=True,
    ),
    Mutant(
        "d2", "the edge's numpy top-k drops the tokens tied with the k-th (torch keeps them)",
        "shared/draws.py",
        "        logits = np.where(logits < kth, np.float32(-np.inf), logits)\n",
        "        logits = np.where(logits <= kth, np.float32(-np.inf), logits)\n",
        ("tests/test_draws.py::test_process_logits_keeps_the_torch_support_and_values",),
        fast=True,
    ),
]


# Not run by default (--only picks them): bugs that the hollow tests fixed alongside this harness guard against,
# for showing that each fixed test fails on its bug (--only KEY --tests TEST).
EXTRA: list[Mutant] = [
    Mutant(
        "x-gumbel-head", "gumbel_argmax scores the head only: tokens below GUMBEL_HEAD_P never win (shared/draws.py)",
        "shared/draws.py",
        "    return scored_argmax(p, np.sort(np.concatenate([head, lifted])), seed, pos)\n",
        "    return scored_argmax(p, head, seed, pos)\n",
        (f"{GUMBEL}[6000]",),
    ),
    Mutant(
        "x-list-limit", "codec: decode_list checks a list's length against MAX_LIST only, not the caller's max_len",
        "shared/codec.py",
        "_open(data, vocab_size, kinds=(Kind.LIST,), max_list=max_len)",
        "_open(data, vocab_size, kinds=(Kind.LIST,))",
        ("tests/test_codec.py::test_decode_list_inflates_no_more_than_its_own_limits",),
    ),
    Mutant(
        "x-round", "performance model: tokens per round counts g accepted drafts, not g + 1 tokens",
        "shared/perf_model.py",
        "(1.0 - a ** (g + 1)) / (1.0 - a)",
        "(1.0 - a ** g) / (1.0 - a)",
        ("tests/test_bench_model.py",),
    ),
    Mutant(
        "x-stream", "rng: the ACCEPT stream renumbered (every accept coin of every seed changes)",
        "shared/rng.py",
        "    ACCEPT = 2 ",
        "    ACCEPT = 8 ",
        ("tests/test_rng_sampling.py",),
    ),
]


# ---------------------------------------------------------------------------------------------- the copy

def tree_files(root: Path) -> list[str]:
    """Tracked and untracked non-ignored files that exist (git ls-files -co --exclude-standard), never .venv."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root, check=True,
                         capture_output=True).stdout.decode()
    files = [f for f in out.split("\0") if f and not f.startswith(".venv/")]
    return sorted({f for f in files if (root / f).is_file() or (root / f).is_symlink()})


def copy_tree(root: Path, dst: Path) -> int:
    files = tree_files(root)
    for f in files:
        target = dst / f
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / f, target, follow_symlinks=False)
    return len(files)


def check_applies(root: Path, m: Mutant) -> str:
    """The file's text; exits with "mutant N no longer applies" unless the search text occurs exactly once."""
    path = root / m.file
    text = path.read_text() if path.is_file() else ""
    n = text.count(m.search)
    if n != 1:
        where = "file missing" if not path.is_file() else f"found {n} times"
        sys.exit(f"mutant {m.key} no longer applies: search text in {m.file} ({where}):\n{m.search}")
    return text


def env_for(copy: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_ADDOPTS")}
    # the copy first on sys.path, for pytest and for any process the tests start (console scripts included)
    env.update(PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1")
    return env


def imported_from(copy: Path, env: dict[str, str]) -> str:
    # the import system's resolution without running the module (no torch import: 2 s less per mutant); a copy whose
    # module resolves but fails to import makes pytest error out, which is no catch
    r = subprocess.run([str(PYTHON), "-c", "import importlib.util as u; print(u.find_spec('picospec.shared.verify').origin)"],
                       cwd=copy, env=env, capture_output=True, text=True, timeout=120)
    path = r.stdout.strip()
    if r.returncode != 0 or not Path(path).resolve().is_relative_to(copy.resolve()):
        sys.exit(f"the copy's code is not what gets imported: picospec.shared.verify.__file__ = {path!r}\n{r.stderr}")
    return path


# ---------------------------------------------------------------------------------------------- running

_FIRST_FAILURE = re.compile(r"^(?:FAILED|ERROR) (\S+)(.*)$", re.M)


def run_pytest(copy: Path, tests: tuple[str, ...], limit_s: int, env: dict[str, str]) -> tuple[str, str | None, float, str]:
    """(outcome: passed | failed | timeout | error, first failing test id, seconds, whole output)."""
    cmd = [str(PYTHON), "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: pytest and whatever it started
        out, _ = proc.communicate()
        return "timeout", None, time.monotonic() - t0, out
    secs = time.monotonic() - t0
    m = _FIRST_FAILURE.search(out)
    if proc.returncode == 0:
        return "passed", None, secs, out
    if m and proc.returncode == 1:
        return "failed", m.group(1), secs, out
    # exit 2-5: interrupted, internal error, usage error, nothing collected: not a catch
    return "error", None, secs, out


@dataclass
class Result:
    mutant: Mutant
    outcome: str
    caught_by: str | None
    seconds: float
    tail: str

    @property
    def caught(self) -> bool:
        return self.outcome == "failed" and self.caught_by is not None


def run_mutant(m: Mutant, scale: float, keep: bool) -> Result:
    """One mutant in a copy of its own; what it prints comes out as one block (mutants may run side by side)."""
    tmp = Path(tempfile.mkdtemp(prefix=f"picospec-mutant-{m.key}-"))
    lines = [f"[{m.key}] {m.what}"]
    try:
        n = copy_tree(ROOT, tmp)
        for f in FROM_GIT:
            (tmp / f).write_bytes(subprocess.run(["git", "show", f"HEAD:{f}"], cwd=ROOT, check=True,
                                                 capture_output=True).stdout)
            lines.append(f"      {f} taken from git HEAD in the copy")
        text = check_applies(tmp, m)
        (tmp / m.file).write_text(text.replace(m.search, m.replace, 1))
        env = env_for(tmp)
        where = imported_from(tmp, env)
        lines.append(f"      {m.file} mutated in a copy of {n} files; picospec.shared.verify.__file__ = {where}")
        outcome, first, secs, tail = run_pytest(tmp, m.tests, int(m.limit_s * scale), env)
        r = Result(m, outcome, first, secs, tail)
        log = LOGS / f"{m.key}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"mutant {m.key}: {m.what}\n{m.file}\n--- search\n{m.search}--- replace\n{m.replace}\n"
                       f"--- pytest -x -q {' '.join(m.tests)}\n{tail}")
        if r.caught:
            line = _FIRST_FAILURE.search(tail)
            lines.append(f"      caught in {secs:.1f} s: {line.group(0)[:300]}")
        else:
            lines.append(f"      SURVIVED ({outcome}) after {secs:.1f} s; the output's end:")
            lines.append("      " + tail[-2000:].replace("\n", "\n      "))
        lines.append(f"      log: {log}")
        return r
    finally:
        if keep:
            lines.append(f"      kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        print("\n".join(lines), flush=True)


def baseline(test_ids: list[str], limit_s: int) -> tuple[str, str | None, float, str]:
    """The catching tests on an unmutated copy: they must pass, or their catches mean nothing."""
    tmp = Path(tempfile.mkdtemp(prefix="picospec-mutant-baseline-"))
    try:
        copy_tree(ROOT, tmp)
        env = env_for(tmp)
        imported_from(tmp, env)
        return run_pytest(tmp, tuple(test_ids), limit_s, env)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def table(results: list[Result]) -> str:
    rows = [["mutant", "file", "bug", "caught", "caught by", "seconds"]]
    for r in results:
        caught_by = r.caught_by if r.caught else (r.outcome if r.outcome != "passed" else "-")
        rows.append([r.mutant.key, r.mutant.file, r.mutant.what, "yes" if r.caught else "NO", caught_by,
                     f"{r.seconds:.1f}"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    fmt = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, rows[1:])])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated mutant keys (default: all)")
    ap.add_argument("--list", action="store_true", help="list the mutants and check that each still applies")
    ap.add_argument("--keep", action="store_true", help="keep the mutated copies (their paths are printed)")
    ap.add_argument("--time-scale", type=float, default=float(os.environ.get("MUTANT_TIME_SCALE", "1")),
                    help="multiply every per-mutant time limit (slow machines)")
    ap.add_argument("--no-baseline", action="store_true", help="skip re-running the catching tests unmutated")
    ap.add_argument("--tests", help="run these tests (space-separated node ids) instead of each mutant's own subset")
    ap.add_argument("--from-git", metavar="PATHS",
                    help="comma-separated files to take from git HEAD in the copy (e.g. a test before it was fixed)")
    ap.add_argument("--fast", action="store_true",
                    help="only the fast subset (mutants caught by pure tests, seconds each): `make test-mutants-fast`")
    ap.add_argument("--jobs", type=int, default=1, help="mutants run side by side, each in its own copy (default 1; "
                    "the pure tests of --fast are single-threaded: one per core)")
    ap.add_argument("--out", help="the table (default bench_out/mutants.md, with --fast bench_out/mutants-fast.md)")
    args = ap.parse_args(argv)

    if args.out is None:
        args.out = str(ROOT / "bench_out" / ("mutants-fast.md" if args.fast else "mutants.md"))
    global LOGS
    LOGS = Path(args.out).with_suffix("")
    chosen = [m for m in MUTANTS if m.fast] if args.fast else MUTANTS
    if args.only:
        keys = args.only.split(",")
        known = MUTANTS + EXTRA
        unknown = set(keys) - {m.key for m in known}
        if unknown:
            ap.error(f"unknown mutants {sorted(unknown)}; have {[m.key for m in known]}")
        chosen = [m for m in known if m.key in keys]
    if args.tests:
        chosen = [dataclasses.replace(m, tests=tuple(args.tests.split())) for m in chosen]
    global FROM_GIT
    FROM_GIT = tuple(args.from_git.split(",")) if args.from_git else ()
    for m in chosen:  # fail loudly before any time is spent
        check_applies(ROOT, m)
    if args.list:
        for m in chosen:
            print(f"{m.key:3} {m.file:24} {m.what}\n    tests: {' '.join(m.tests)} (limit {m.limit_s} s)")
        return 0
    if not PYTHON.is_file():
        sys.exit(f"no virtualenv interpreter at {PYTHON} (make install)")

    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:  # each job waits on its own pytest process
        results = list(pool.map(lambda m: run_mutant(m, args.time_scale, args.keep), chosen))
    caught_ids = sorted({r.caught_by for r in results if r.caught})
    base_note = "baseline: not run (--no-baseline)"
    base_ok = True
    if caught_ids and not args.no_baseline:
        print(f"[baseline] the {len(caught_ids)} catching tests on an unmutated copy", flush=True)
        outcome, first, secs, tail = baseline(caught_ids, int(600 * args.time_scale))
        base_ok = outcome == "passed"
        base_note = (f"baseline: the {len(caught_ids)} catching tests pass on the unmutated tree ({secs:.1f} s)" if base_ok
                     else f"baseline: FAILED ({outcome}, {first}): a catch by a test that fails anyway means nothing")
        if not base_ok:
            print(tail[-3000:])
    total = time.monotonic() - t0
    survivors = [r.mutant.key for r in results if not r.caught]
    text = table(results)
    summary = (f"{len(results) - len(survivors)}/{len(results)} mutants caught"
               + (f"; SURVIVED: {', '.join(survivors)}" if survivors else "")
               + f"; {base_note}; total {total:.0f} s")
    print("\n" + text + "\n\n" + summary)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    target = "make test-mutants-fast" if args.fast and not args.only else "make test-mutants"
    out.write_text(f"# Mutation run (`{target}`)\n\n" + text + "\n\n" + summary + "\n")
    print(f"written to {out}")
    return 0 if not survivors and base_ok else 1


if __name__ == "__main__":
    sys.exit(main())
