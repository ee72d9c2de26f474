"""The online draft-length choice from measured costs (shared/perf_model.py, docs/design.md §4.4): the cloud's pass
time kept per size, acceptance by depth and by draft confidence, and the choice that maximises the modelled rate.
Pure: no models, no gRPC."""
from __future__ import annotations

import pytest

from picospec.shared.perf_model import (ConfidenceAcceptance, DepthAcceptance, Estimates, Ewma, PassCosts,
                                        SPECULATION_MARGIN, choose_draft_len, expected_tokens, modelled_rate,
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
    assert costs(32) == 1.535                                              # past the largest: optimistic, to probe
    costs.add(4, 1.056)
    assert costs.measured(4) == pytest.approx(1.006)                       # an EWMA per size
    assert costs.measured(5) is None and costs.to_dict()["16"] == 1.535
    lone = PassCosts()
    lone.add(3, 0.4)
    assert lone(0) == lone(1) == lone(12) == 0.4  # one size seen: no fewer positions costs more, none costs less yet


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
    choice = choose_draft_len(est, 16, pipelined=False, allow_zero=True, default=4)
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
    """A modelled gain inside the model's own error (here about 3 %) leaves the decoding to the cloud; a clear one
    (about 17 %) speculates. A pass of any size costs two decode steps, as on one CPU core in fp32."""
    passes = {0: 0.4, 1: 0.8, 2: 0.8, 4: 0.8, 8: 0.8}

    def choice_at(a: float):
        return choose_draft_len(_estimates(passes, a=a, draft_s=0.05, rtt_s=0.0), 8, pipelined=True, allow_zero=True,
                                default=4)

    marginal, clear = choice_at(0.65), choice_at(0.7)
    assert marginal.decode_alone < marginal.best_speculative < marginal.decode_alone * SPECULATION_MARGIN
    assert marginal.g == 0
    assert clear.best_speculative > clear.decode_alone * SPECULATION_MARGIN and clear.g >= 1


def test_unseen_longer_batches_are_probed_then_judged_by_their_measurement():
    est = _estimates({0: 0.5, 1: 0.6}, a=0.8, draft_s=0.01)
    first = choose_draft_len(est, 12, pipelined=True, allow_zero=True, default=4)
    assert first.g > 1  # longer sizes assumed as cheap as the largest seen: worth a try
    est.passes.add(first.g, 3.0)  # measured: far dearer
    second = choose_draft_len(est, 12, pipelined=True, allow_zero=True, default=4)
    assert second.g < first.g


def test_the_default_stands_until_every_estimate_exists_and_the_estimates_are_reported():
    est = Estimates()
    assert choose_draft_len(est, 12, pipelined=True, allow_zero=True, default=4).g == 4
    est = _estimates(FP32_PASS_S, a=0.7)
    d = est.to_dict()
    assert d["pass_s"]["8"] == 1.057 and d["decode_s"] == 0.529 and d["acceptance"] == 0.7
    assert set(d) >= {"rtt_s", "draft_s_per_token", "acceptance_by_depth", "acceptance_by_confidence", "last_choice"}
