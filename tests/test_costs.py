"""The online draft-length choice from measured costs (shared/perf_model.py, docs/design.md §4.4): the cloud's pass
time kept per size, acceptance by depth and by draft confidence, and the choice that maximises the modelled rate.
Pure: no models, no gRPC."""
from __future__ import annotations

import pytest

from picospec.shared.perf_model import (AHEAD_WAIT, SPECULATION_MARGIN, ConfidenceAcceptance, DepthAcceptance,
                                        Estimates, Ewma, PassCosts, choose_draft_len, expected_tokens, modelled_rate,
                                        pipelined_rate, stop_and_wait_rate, tokens_per_round)

# measured on this project's 2-core machine, one thread: the fp32 Qwen2.5-1.5B target's pass over n drafts (n = 0:
# one decode step), seconds (the figures). Note pass(8) < pass(2): a step, not a line.
FP32_PASS_S = {0: 0.529, 2: 1.062, 4: 0.956, 8: 1.057, 16: 1.535}


def _estimates(passes: dict[int, float], a: float, *, draft_s: float = 0.053, rtt_s: float = 0.05) -> Estimates:
    est = Estimates()
    for n, t in passes.items():
        est.passes.add(n, t)
    est.draft_s.add(draft_s)
    est.rtt_samples.append(rtt_s)
    est.acceptance.add(a)
    return est


def test_expected_tokens_matches_the_iid_closed_form_and_uses_each_depth():
    for a in (0.0, 0.3, 0.8, 1.0):
        for g in (1, 4, 9):
            assert expected_tokens([a] * g) == pytest.approx(tokens_per_round(a, g))
    assert expected_tokens([0.9, 0.5, 0.0, 1.0]) == pytest.approx(1 + 0.9 + 0.45)  # nothing past a sure rejection
    acc, t = [0.7] * 5, (0.05, 0.1, 0.6)
    assert modelled_rate(acc, *t, pipelined=True) == pytest.approx(pipelined_rate(0.7, 5, *t))
    assert modelled_rate(acc, *t, pipelined=False) == pytest.approx(stop_and_wait_rate(0.7, 5, *t))


def test_pass_costs_keep_each_size_as_measured_and_read_unseen_sizes_off_the_seen_ones():
    costs = PassCosts(alpha=0.5)
    assert costs(3) is None
    for n, t in FP32_PASS_S.items():
        costs.add(n, t)
    assert [costs(n) for n in FP32_PASS_S] == list(FP32_PASS_S.values())  # a step survives: pass(8) < pass(2)
    assert costs(6) == pytest.approx((0.956 + 1.057) / 2)                  # between two seen sizes: interpolated
    # past the largest: its cost plus the mean growth per draft over the sizes seen ((1.535 - 0.529) / 16)
    assert costs(32) == pytest.approx(1.535 + 16 * (1.535 - 0.529) / 16)
    costs.add(4, 1.056)
    assert costs.measured(4) == pytest.approx(1.006)                       # an EWMA per size
    assert costs.measured(5) is None and costs.to_dict()["16"] == 1.535
    lone = PassCosts()
    lone.add(3, 0.4)
    assert lone(0) == lone(1) == lone(12) == 0.4  # one size seen: no fewer positions costs more, none costs less yet


def test_unseen_sizes_grow_as_steeply_as_the_seen_ones_and_stay_flat_where_they_are_flat():
    """llama.cpp on one CPU core (Qwen 1.5B Q4_K_M, measured here): decode 77.5 ms, a pass of 1 draft 142 ms; the
    pass of 8 then measured 637 ms. Guessing the largest seen (142 ms) had the policy probe long batches that lost;
    the slope guesses 594 ms. A GPU-like flat table stays flat past its largest size."""
    steep = PassCosts()
    steep.add(0, 0.0775)
    steep.add(1, 0.142)
    assert steep(8) == pytest.approx(0.0775 + 8 * 0.0645) and abs(steep(8) - 0.637) < 0.05
    flat = PassCosts()
    for n, t in {0: 0.020, 4: 0.020, 8: 0.020}.items():
        flat.add(n, t)
    assert flat(16) == pytest.approx(0.020)
    falling = PassCosts()
    falling.add(2, 1.0)
    falling.add(8, 0.9)
    assert falling(16) == pytest.approx(0.9)  # a step down is never extrapolated below the largest seen


def test_acceptance_by_depth_counts_each_verdict_once_per_depth_it_reached():
    depth = DepthAcceptance(alpha=0.5, min_samples=2)
    depth.add_verdict(accepted=2, rejected=True)   # depths 1, 2 accepted; depth 3 rejected; depth 4 never judged
    depth.add_verdict(accepted=4, rejected=False)
    assert depth.at(1, overall=0.1) == 1.0 and depth.at(2, overall=0.1) == 1.0
    assert depth.at(3, overall=0.1) == pytest.approx(0.5)
    assert depth.at(4, overall=0.1) == 0.1  # one sample: too few, the overall acceptance stands in
    assert depth.profile(3, 0.1) == [1.0, 1.0, 0.5] and depth.to_dict() == {"1": 1.0, "2": 1.0, "3": 0.5}


def test_acceptance_by_confidence_is_calibrated_per_bucket_once_measured():
    conf = ConfidenceAcceptance(min_samples=4)
    assert conf.estimate(0.15) == 0.15  # nothing measured: the draft's own probability
    for accepted in (True, True, True, False):
        conf.add(0.12, accepted)       # bucket [0.1, 0.2)
    assert conf.estimate(0.19) == 0.75 and conf.estimate(0.25) == 0.25
    assert conf.to_dict() == {">=0.1": 0.75}


def test_a_flat_step_makes_long_batches_pay_where_a_line_would_not():
    # GPU-like: up to 8 drafts cost what one does, 16 twice that. The least-squares line through these sizes
    # (t = 18.1 ms + 1.18 ms per draft) charges every draft; the table sees the flat step and drafts 8.
    passes = {0: 0.020, 1: 0.021, 2: 0.021, 4: 0.021, 8: 0.022, 16: 0.040}
    est = _estimates(passes, a=0.8, draft_s=0.002, rtt_s=0.03)
    choice = choose_draft_len(est, 16, pipelined=False, allow_zero=False, default=4)
    assert choice.g == 8, choice
    line = lambda n: 0.0181 + 0.00118 * n  # noqa: E731 - the least-squares line through `passes`
    by_line = max(range(1, 17), key=lambda g: stop_and_wait_rate(0.8, g, 0.002, 0.03, line(g)))
    true_rate = lambda g: stop_and_wait_rate(0.8, g, 0.002, 0.03, est.passes(g))  # noqa: E731
    assert by_line != 8 and true_rate(by_line) < true_rate(8)


def test_the_cloud_decodes_alone_when_the_measured_costs_say_speculation_loses():
    est = _estimates(FP32_PASS_S, a=0.5)
    choice = choose_draft_len(est, 12, pipelined=True, allow_zero=True, default=4)
    assert choice.g == 0 and choice.rate == pytest.approx(1 / 0.529) and choice.best_speculative < choice.rate
    assert choose_draft_len(est, 12, pipelined=True, allow_zero=False, default=4).g >= 1  # nobody else would decode
    est.acceptance = Ewma(0.1)
    est.acceptance.add(0.9)
    assert choose_draft_len(est, 12, pipelined=True, allow_zero=True, default=4).g >= 6


def test_speculation_must_beat_the_cloud_alone_by_the_margin_not_merely_match_it():
    """A modelled gain inside the model's own error (here about 20 %: on one CPU core a batch of one modelled at 1.22x
    the cloud alone ran at 0.80x) leaves the decoding to the cloud; a clear one (about 57 %) speculates. A pass of
    any size costs two decode steps, as on one CPU core in fp32, and each waits for half the decode-ahead step it
    finds (AHEAD_WAIT)."""
    passes = {0: 0.4, 1: 0.8, 2: 0.8, 4: 0.8, 8: 0.8}

    def choice_at(a: float):
        return choose_draft_len(_estimates(passes, a=a, draft_s=0.05, rtt_s=0.0), 8, pipelined=True, allow_zero=True,
                                default=4)

    marginal, clear = choice_at(0.78), choice_at(0.85)
    assert marginal.decode_alone < marginal.best_speculative < marginal.decode_alone * SPECULATION_MARGIN
    assert marginal.g == 0
    assert clear.best_speculative > clear.decode_alone * SPECULATION_MARGIN and clear.g >= 1


def test_unseen_longer_batches_are_probed_then_judged_by_their_measurement():
    est = _estimates({0: 0.5, 1: 0.52}, a=0.8, draft_s=0.01)
    first = choose_draft_len(est, 12, pipelined=True, allow_zero=True, default=4)
    assert first.g > 1  # longer sizes assumed to grow as gently as the ones seen: worth a try
    est.passes.add(first.g, 3.0)  # measured: far dearer
    second = choose_draft_len(est, 12, pipelined=True, allow_zero=True, default=4)
    assert second.g < first.g


def test_batches_grow_by_doubling_past_the_largest_measured_pass():
    """Flat costs and certain acceptance would take the longest length at once; it is reached 2, 4, 8, 12 instead,
    each size measured (here: as flat as guessed) before the next doubling."""
    est = _estimates({0: 0.5, 1: 0.5}, a=1.0, draft_s=0.001, rtt_s=0.0)
    seen = []
    for _ in range(5):
        g = choose_draft_len(est, 12, pipelined=False, allow_zero=True, default=4).g
        seen.append(g)
        est.passes.add(g, 0.5)
    assert seen == [2, 4, 8, 12, 12]


# llama.cpp, one CPU core, Qwen2.5-Coder-1.5B Q4_K_M target (docs/results/engines_cpu): pass over n drafts, seconds
LLAMA_PASS_S = {0: 0.0775, 1: 0.142, 2: 0.175, 4: 0.253, 8: 0.637}
# torch int8 of the same target, one CPU core (README: engines, 2026-12-07): nearly flat in the batch's size
INT8_PASS_S = {0: 0.075, 1: 0.077, 2: 0.0775, 4: 0.080, 8: 0.105}


def test_the_rate_objective_never_spends_more_cloud_compute_per_token_than_the_cloud_alone():
    """The cloud has room: the fastest length whose modelled cloud seconds per token are within one decode step. With
    the int8 target's flat passes at acceptance 0.9 and a 37 ms draft that is a real batch; with llama.cpp's steep
    ones even 0.97 stays inside the margin once a batch waits for the decode-ahead step it finds (the default pair
    speculated there and lost, docs/results/llama_cpu_variants); at 0.5 every length costs more per token than
    decoding, so the cloud decodes alone (or, without decode-ahead, the cheapest length)."""
    good = choose_draft_len(_estimates(INT8_PASS_S, a=0.9, draft_s=0.037, rtt_s=0.0), 8, pipelined=True,
                            allow_zero=True, default=4)
    assert good.objective == "rate" and good.g >= 2
    assert good.cloud_s_per_token <= good.alone_s_per_token == 0.075
    assert good.rate >= good.decode_alone * SPECULATION_MARGIN
    steep = choose_draft_len(_estimates(LLAMA_PASS_S, a=0.97, draft_s=0.037, rtt_s=0.0), 8, pipelined=True,
                             allow_zero=True, default=4)
    assert steep.g == 0 and steep.decode_alone < steep.best_speculative < steep.decode_alone * SPECULATION_MARGIN
    poor = _estimates(LLAMA_PASS_S, a=0.5, draft_s=0.037, rtt_s=0.0)
    assert choose_draft_len(poor, 8, pipelined=True, allow_zero=True, default=4).g == 0
    forced = choose_draft_len(poor, 8, pipelined=True, allow_zero=False, default=4)
    costs = {g: LLAMA_PASS_S[g] / expected_tokens([0.5] * g) for g in (1, 2, 4)}
    assert forced.g == min(costs, key=costs.get) and forced.cloud_s_per_token == pytest.approx(min(costs.values()))


def test_with_decode_ahead_a_batch_is_modelled_to_wait_for_the_step_it_finds():
    """A batch of one, stop and wait: its round is drafting plus the pass, and with decode-ahead AHEAD_WAIT of a decode
    step more (time only: the modelled cloud compute per token is the pass's)."""
    est = _estimates(LLAMA_PASS_S, a=0.97, draft_s=0.037, rtt_s=0.0)
    ahead = choose_draft_len(est, 1, pipelined=False, allow_zero=True, default=4)
    without = choose_draft_len(est, 1, pipelined=False, allow_zero=False, default=4)
    assert without.g == 1 and without.rate == pytest.approx(expected_tokens([0.97]) / (0.037 + 0.142))
    assert ahead.best_speculative == pytest.approx(expected_tokens([0.97]) / (0.037 + 0.142 + AHEAD_WAIT * 0.0775))
    assert without.cloud_s_per_token == pytest.approx(0.142 / expected_tokens([0.97]))


def test_a_loaded_cloud_gets_the_cheapest_length_that_is_no_slower_than_the_cloud_alone():
    """Flat GPU-like costs: unloaded, the fastest length (long); loaded (others keep the model busy), the cheapest per
    token among those at least as fast as decoding alone. Both modelled, and the choice says which objective."""
    passes = {0: 0.020, 1: 0.021, 2: 0.021, 4: 0.022, 8: 0.030, 16: 0.060}
    est = _estimates(passes, a=0.8, draft_s=0.004, rtt_s=0.0)
    free = choose_draft_len(est, 16, pipelined=False, allow_zero=True, default=4)
    est.others_load = 0.9
    busy = choose_draft_len(est, 16, pipelined=False, allow_zero=True, default=4)
    assert free.objective == "rate" and busy.objective == "cost"
    assert busy.rate >= busy.decode_alone and busy.cloud_s_per_token * SPECULATION_MARGIN <= busy.alone_s_per_token
    assert busy.cloud_s_per_token <= free.cloud_s_per_token and free.rate >= busy.rate
    options = [(g, stop_and_wait_rate(0.8, g, 0.004, 0.0, est.passes(g)), est.passes(g) / tokens_per_round(0.8, g))
               for g in range(1, 17)]
    cheapest = min((o for o in options if o[1] >= 1 / 0.020), key=lambda o: o[2])
    assert busy.g == cheapest[0]


def test_the_cloud_stated_decode_cost_stands_in_until_the_edge_measures_one():
    """Without decode-ahead the edge never times a decode step; the cloud's verdicts say what one costs it."""
    est = _estimates({1: 0.142, 4: 0.253}, a=0.5, draft_s=0.037, rtt_s=0.0)
    assert est.decode_s is None and choose_draft_len(est, 8, pipelined=True, allow_zero=True, default=4).g > 0
    est.passes.anchor = 0.0775
    assert est.decode_s == 0.0775 and choose_draft_len(est, 8, pipelined=True, allow_zero=True, default=4).g == 0
    # it anchors the growth per draft: one size measured (4) no longer reads as flat past it
    lone = PassCosts()
    lone.add(4, 0.253)
    assert lone(8) == 0.253
    lone.anchor = 0.0775
    assert lone(8) == pytest.approx(0.253 + 4 * (0.253 - 0.0775) / 4) and lone(0) == 0.0775
    est.passes.add(0, 0.05)
    assert est.decode_s == 0.05  # its own measurement wins


def test_the_default_stands_until_every_estimate_exists_and_the_estimates_are_reported():
    est = Estimates()
    assert choose_draft_len(est, 12, pipelined=True, allow_zero=True, default=4).g == 4
    est = _estimates(FP32_PASS_S, a=0.7)
    d = est.to_dict()
    assert d["pass_s"]["8"] == 1.057 and d["decode_s"] == 0.529 and d["acceptance"] == 0.7
    assert set(d) >= {"rtt_s", "draft_s_per_token", "acceptance_by_depth", "acceptance_by_confidence", "last_choice"}


# llama.cpp, one CPU core with its AVX-512 code (docs/results/llama_cpu_variants, 2026-12-07): a pass of n drafts costs
# about n + 1 decode steps
LLAMA_AVX512_PASS_S = {0: 0.048, 1: 0.094, 3: 0.182, 7: 0.439}


def test_where_no_acceptance_could_make_speculation_pay_the_choice_says_so():
    """can_pay: would some length qualify were every draft accepted? With llama.cpp's passes at about n + 1 decode
    steps, no (the edge then stops shadow-drafting: measuring acceptance cannot change the choice); with the int8
    target's flat ones, or llama.cpp's older flatter ones, yes, even while today's acceptance leaves it at 0; and
    yes until the estimates exist (the probing goes on)."""
    steep = choose_draft_len(_estimates(LLAMA_AVX512_PASS_S, a=0.9, draft_s=0.025, rtt_s=0.0), 12, pipelined=True,
                             allow_zero=True, default=1)
    assert steep.g == 0 and not steep.can_pay
    assert not choose_draft_len(_estimates({0: 0.048, 1: 0.094}, a=1.0, draft_s=0.025, rtt_s=0.0), 12,
                                pipelined=True, allow_zero=True, default=1).can_pay
    for passes in (INT8_PASS_S, LLAMA_PASS_S):
        poor = choose_draft_len(_estimates(passes, a=0.2, draft_s=0.025, rtt_s=0.0), 8, pipelined=True,
                                allow_zero=True, default=1)
        assert poor.g == 0 and poor.can_pay, passes
    assert choose_draft_len(Estimates(), 12, pipelined=True, allow_zero=True, default=1).can_pay
    # the bound is the objective's: loaded, a length would have to be SPECULATION_MARGIN cheaper per token, and at
    # pass(1) = 1.3 decode steps two sure tokens cost 0.65 of a step each (qualifies), at 1.9 steps 0.95 (does not)
    for pass1, pays in ((0.065, True), (0.095, False)):
        est = _estimates({0: 0.05, 1: pass1}, a=0.1, draft_s=0.025, rtt_s=0.0)
        est.others_load = 0.9
        loaded = choose_draft_len(est, 1, pipelined=True, allow_zero=True, default=1)
        assert loaded.objective == "cost" and loaded.g == 0 and loaded.can_pay is pays, pass1


def test_the_clouds_pass_costs_stand_in_for_sizes_not_measured_here_and_can_spare_the_probes():
    """PassCosts.prior (the cloud's pass costs from its Ready; its decode step is the anchor): read like measurements
    until this session measures a size itself. Before the session's own estimates exist, costs that leave no acceptance at which a length could qualify
    give length 0 at once (no probe batch); costs where some acceptance could give the default (the probes); no
    costs, the default."""
    costs = PassCosts()
    costs.prior, costs.anchor = {1: 0.094, 3: 0.182}, 0.048
    assert costs(1) == 0.094 and costs(2) == pytest.approx(0.138) and costs.sizes() == {1, 3} and costs(0) == 0.048
    costs.add(1, 0.060)
    assert costs(1) == 0.060 and costs.measured(1) == 0.060 and costs.measured(3) is None
    fresh = Estimates()
    assert choose_draft_len(fresh, 12, pipelined=True, allow_zero=True, default=1).g == 1
    fresh.passes.prior = {n: t for n, t in LLAMA_AVX512_PASS_S.items() if n > 0}
    fresh.passes.anchor = LLAMA_AVX512_PASS_S[0]
    spared = choose_draft_len(fresh, 12, pipelined=True, allow_zero=True, default=1)
    assert spared.g == 0 and not spared.can_pay and spared.decode_alone == pytest.approx(1 / 0.048)
    assert choose_draft_len(fresh, 12, pipelined=True, allow_zero=False, default=4).g == 4  # 0 not allowed: probe
    flat = Estimates()
    flat.passes.prior, flat.passes.anchor = {n: t for n, t in INT8_PASS_S.items() if n > 0}, INT8_PASS_S[0]
    probing = choose_draft_len(flat, 12, pipelined=True, allow_zero=True, default=1)
    assert probing.g == 1 and probing.can_pay and probing.rate is None
