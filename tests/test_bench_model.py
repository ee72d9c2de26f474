"""The pure parts of `picospec-bench sweep` and `picospec-bench pipeline`: column syntax, the grid, aggregation,
CSV and Markdown output, and the performance model's predictions (docs/design.md §5) from measured component
times. No models, no root."""
from __future__ import annotations

import argparse
import csv
import math
from types import SimpleNamespace

import pytest

from picospec.bench import grid as grid_module
from picospec.bench.edge_worker import _CountingEwma
from picospec.bench.grid import (DEFAULT_CELLS, DEFAULT_COLUMNS, PRESETS, PROMPTS, Column, Condition, conditions, grid,
                                 harder_or_equal, parse_cells, parse_column, parse_columns, parse_temperatures,
                                 pick_prompts)
from picospec.bench.options import temperatures_of
from picospec.bench.pipeline import Components, components, deviation, format_table, interp_cost, predict, summarize
from picospec.bench.report import (aggregate, block_name, by_temperature, main_table, markdown_table, pivot_table,
                                   report_markdown, write_csv)
from picospec.shared.config import EdgeConfig
from picospec.shared.perf_model import Estimates, pipelined_rate, stop_and_wait_rate, tokens_per_round


# ----------------------------------------------------------------------------------------------- columns and grid

def test_parse_column_fields_and_label():
    assert parse_column("sync") == Column("sync", "sync")
    assert parse_column("pipeline:coupled") == Column("pipeline:coupled", "pipeline", "coupled")
    assert parse_column("ours=pipeline:coupled:on:0") == Column("ours", "pipeline", "coupled", "on", 0)
    assert parse_column("early-exit::off") == Column("early-exit::off", "early-exit", None, "off")
    assert parse_column("ours=pipeline:coupled:on:0").overrides() == {"verify": "coupled", "hints": "on", "draft_len": 0}
    assert parse_column("cloud").overrides() == {}


@pytest.mark.parametrize("bad", ["warp", "sync:fast", "pipeline:coupled:maybe", "pipeline:coupled:on:x",
                                 "sync:dense:on:4:9"])
def test_parse_column_rejects_nonsense(bad):
    with pytest.raises(ValueError):
        parse_column(bad)


def test_parse_columns_rejects_duplicate_labels_and_parses_the_preset():
    with pytest.raises(ValueError, match="duplicate"):
        parse_columns("sync,sync")
    cols = parse_columns(PRESETS["paper-table1"])
    assert [c.label for c in cols] == ["cloud", "sync", "picospec", "ours"]
    assert [c.exact for c in cols] == [True, True, False, True]  # picospec is split-topk: APPROXIMATE


def test_exactness_of_columns():
    assert not Column("edge", "edge").exact
    assert Column("s", "sync").exact  # dense by default
    assert not Column("s", "sync", "split-topk").exact
    assert not Column("p", "picospec", "coupled").exact  # picospec forces split-topk


def test_grid_runs_easy_cells_first_and_harder_covers_the_rest():
    g = grid([100, 10], [0.1, 0, 10])
    assert g[0] == Condition(10, None) and g[1] == Condition(100, None)  # unshaped first, rising RTT
    assert [c.mbit for c in g] == [None, None, 10, 10, 0.1, 0.1]
    assert harder_or_equal(Condition(100, 1), Condition(10, 10))
    assert harder_or_equal(Condition(10, 10), Condition(10, None))
    assert not harder_or_equal(Condition(10, 1), Condition(100, 1))
    assert not harder_or_equal(Condition(100, None), Condition(100, 10))


def test_default_column_overrides_nothing_and_follows_the_edge_defaults(monkeypatch):
    d = parse_column("default")
    assert d == Column("default", "default") and d.overrides() == {} and d.request_mode is None
    assert d.resolved_mode == EdgeConfig().mode
    assert parse_column("d2=default:coupled").overrides() == {"verify": "coupled"}
    assert parse_column("sync").request_mode == "sync"
    # exactness is read from the defaults when it runs, not fixed here
    monkeypatch.setattr(grid_module, "EdgeConfig", lambda: SimpleNamespace(mode="sync", verify="split-topk"))
    assert d.resolved_mode == "sync" and not d.exact


def test_default_columns_are_the_goals_columns():
    cols = parse_columns(DEFAULT_COLUMNS)
    assert [c.label for c in cols] == ["llama.cpp", "cloud", "sync", "picospec", "default", "best"]
    assert cols[0] == Column("llama.cpp", "llama.cpp") and cols[0].exact
    assert cols[2] == Column("sync", "sync", "dense")
    assert cols[5] == Column("best", "pipeline", "coupled", None, 0) and cols[5].exact
    assert not cols[3].exact
    with pytest.raises(ValueError, match="takes no verify"):
        parse_columns("llama.cpp:coupled")


def test_ratios_are_against_the_fastest_cloud_alone_and_cost_against_its_cost():
    """llama.cpp alone decodes faster than the project's cloud here, cloud alone starts sooner: each ratio takes the
    faster baseline for its own metric; the cost ratio takes the cost of the one that decodes fastest."""
    def rec(col, mode, e2e, decode, cost):
        return {"temperature": 0.0, "rtt_ms": 0.0, "mbit": None, "column": col, "mode": mode, "tokens_per_s": e2e,
                "decode_tokens_per_s": decode, "cloud_ms_per_token": cost}
    samples = [rec("llama.cpp", "llama.cpp", 9.0, 10.0, 100.0), rec("cloud", "cloud", 9.5, 8.0, 125.0),
               rec("ours", "pipeline", 12.0, 15.0, 60.0)]
    rows = {r["column"]: r for r in aggregate(samples, keys=("tokens_per_s", "decode_tokens_per_s",
                                                              "cloud_ms_per_token"))}
    ours = rows["ours"]
    assert ours["decode_speedup_vs_cloud"] == pytest.approx(1.5) and ours["speedup_vs_cloud"] == pytest.approx(12 / 9.5)
    assert ours["baseline"] == "llama.cpp" and ours["cloud_cost_vs_cloud"] == pytest.approx(0.6)
    assert rows["cloud"]["decode_speedup_vs_cloud"] == pytest.approx(0.8)


def test_cells_parse_in_running_order_and_the_defaults_are_the_three_goal_cells():
    assert parse_cells(DEFAULT_CELLS) == [Condition(10, 100), Condition(50, 10), Condition(200, 1)]
    assert parse_cells(" 0x0 ") == [Condition(0, None)]
    assert parse_cells("50X10,50x10") == [Condition(50, 10)]
    for bad in ("50", "50x", "x10", "ax1", "-1x10", "10x-1", ",", "nanx1"):
        with pytest.raises(ValueError):
            parse_cells(bad)


def test_conditions_pick_cells_or_a_cross_product():
    assert conditions(None, None, None) == parse_cells(DEFAULT_CELLS)
    assert conditions("0x0", None, None) == [Condition(0, None)]
    assert conditions(None, "0", "0") == [Condition(0, None)]
    assert len(conditions(None, "10,50", None)) == 8  # with the default rates
    assert conditions(None, "10,50", "1") == [Condition(10, 1), Condition(50, 1)]
    with pytest.raises(ValueError, match="not both"):
        conditions("0x0", "0", None)


def test_temperatures_and_prompts():
    assert parse_temperatures("0,1") == [0.0, 1.0] and parse_temperatures("1, 1,0.7") == [1.0, 0.7]
    for bad in ("", "-1", "0,nan"):
        with pytest.raises(ValueError):
            parse_temperatures(bad)
    assert temperatures_of(argparse.Namespace(temperatures="0,1")) == [0.0, 1.0]
    assert temperatures_of(argparse.Namespace(temperature=0.5)) == [0.5]
    assert [p.label for p in pick_prompts(3)] == ["chat", "code", "prose"]
    assert len({p.label for p in PROMPTS}) == len(PROMPTS)


# ----------------------------------------------------------------------------------------------- aggregation, output

def _sample(col: str, mode: str, tps: float, **kw) -> dict:
    return {"rtt_ms": 50.0, "mbit": None, "rtt_measured_ms": 50.3, "column": col, "mode": mode, "exact": True,
            "tokens_per_s": tps, "bytes_up_per_token": 10.0, "bytes_down_per_token": 20.0, **kw}


def test_aggregate_takes_medians_and_speedups_and_counts_cut_runs():
    samples = [_sample("cloud", "cloud", x) for x in (2.0, 3.0, 10.0)]
    samples += [_sample("ours", "pipeline", x) for x in (4.0, 5.0)] + [_sample("ours", "pipeline", 6.0, timed_out=True)]
    samples += [_sample("sync", "sync", 1.0, error="boom"), _sample("sync", "sync", None, skipped=True)]
    rows = {r["column"]: r for r in aggregate(samples, keys=("tokens_per_s",))}
    assert rows["cloud"]["tokens_per_s"] == 3.0 and rows["cloud"]["speedup_vs_cloud"] == 1.0
    assert rows["ours"]["tokens_per_s"] == 5.0 and rows["ours"]["speedup_vs_cloud"] == pytest.approx(5 / 3)
    assert rows["ours"]["runs"] == 3 and rows["ours"]["timed_out"] == 1
    assert rows["sync"]["runs"] == 0 and rows["sync"]["errors"] == 1 and rows["sync"]["skipped"] == 1
    assert rows["sync"]["tokens_per_s"] is None and rows["sync"]["error"] == "boom"


def test_write_csv_round_trips(tmp_path):
    rows = [{"a": 1, "b": None, "c": 0.123456789}, {"a": 2, "d": {"x": 1}, "c": 3.0}]
    path = tmp_path / "t.csv"
    write_csv(rows, path)
    with open(path) as f:
        got = list(csv.DictReader(f))
    assert list(got[0]) == ["a", "b", "c", "d"]  # first-seen order, union of keys
    assert got[0] == {"a": "1", "b": "", "c": "0.123457", "d": ""}
    assert got[1]["d"] == '{"x": 1}' and got[1]["b"] == ""


def test_markdown_tables_are_aligned_and_mark_what_they_should():
    t = markdown_table(["x", "long header"], [["1", "2"], ["333333333333", "4"]])
    lines = t.splitlines()
    assert len({len(line) for line in lines}) == 1 and lines[1].startswith("|---")
    samples = [_sample("cloud", "cloud", 2.0), _sample("ours", "pipeline", 3.0, timed_out=True),
               _sample("pico", "picospec", 2.5, exact=False), _sample("sync", "sync", None, skipped=True)]
    p = pivot_table(aggregate(samples, keys=("tokens_per_s",)), ["cloud", "ours", "pico", "sync"])
    assert "3.00† (1.50x)" in p and "2.50 (1.25x)" in p and "pico APPROX." in p and "| skip" in p
    assert "50 (50.3)" in p and "unshaped" in p


def _rates(col: str, mode: str, tps: float, decode: float, ttft: float, temperature: float = 0.0, **kw) -> dict:
    return _sample(col, mode, tps, decode_tokens_per_s=decode, ttft_s=ttft, temperature=temperature, **kw)


def test_aggregate_gives_decode_and_e2e_ratios_of_medians_per_temperature():
    samples = [_rates("cloud", "cloud", x, 2 * x, 1.0) for x in (1.0, 2.0, 9.0)]            # medians 2, 4
    samples += [_rates("best", "pipeline", x, 3 * x, 2.0) for x in (2.0, 3.0, 4.0)]         # medians 3, 9
    samples += [_rates("cloud", "cloud", 5.0, 5.0, 1.0, temperature=1.0),
                _rates("best", "pipeline", 4.0, 10.0, 3.0, temperature=1.0)]
    rows = aggregate(samples, keys=("tokens_per_s", "decode_tokens_per_s", "ttft_s"))
    blocks = by_temperature(rows)
    assert list(blocks) == [0.0, 1.0]
    best0 = next(r for r in blocks[0.0] if r["column"] == "best")
    assert best0["speedup_vs_cloud"] == pytest.approx(3 / 2)
    assert best0["decode_speedup_vs_cloud"] == pytest.approx(9 / 4)  # ratio of medians, not median of ratios
    best1 = next(r for r in blocks[1.0] if r["column"] == "best")
    assert (best1["speedup_vs_cloud"], best1["decode_speedup_vs_cloud"]) == (pytest.approx(0.8), pytest.approx(2.0))


def test_main_table_holds_the_three_medians_and_both_ratios():
    samples = [_rates("cloud", "cloud", 2.0, 2.5, 1.25), _rates("best", "pipeline", 3.0, 5.0, 0.75, timed_out=True),
               _rates("pico", "picospec", 2.5, 2.5, 2.0, exact=False), _rates("sync", "sync", None, None, None, skipped=True)]
    rows = aggregate(samples, keys=("tokens_per_s", "decode_tokens_per_s", "ttft_s"))
    t = main_table(rows, ["cloud", "best", "pico", "sync"])
    head = t.splitlines()[0]
    assert [h.strip() for h in head.strip("|").split("|")][3:] == ["decode tok/s", "TTFT s", "e2e tok/s",
                                                                    "decode x fastest alone", "e2e x fastest alone",
                                                                    "cloud ms/token", "cloud cost x alone"]
    best = next(line for line in t.splitlines() if "| best" in line)
    assert [c.strip() for c in best.strip("|").split("|")][3:] == ["5.00†", "0.750", "3.00†", "2.00x", "1.50x", "-",
                                                                   "-"]
    assert "pico APPROX." in t and t.count("| skip") == 7 and "50 (50.3)" in t


def test_report_has_a_block_per_temperature_and_names_what_default_ran():
    samples = [_rates("cloud", "cloud", 2.0, 2.5, 1.0, temperature=t) for t in (0.0, 1.0)]
    samples += [_rates("default", "default", 2.0, 3.0, 1.0, temperature=t, ran_mode="pipeline", verify_mode="dense")
                for t in (0.0, 1.0)]
    rows = aggregate(samples)  # every metric, as the sweep does: the bytes and details tables need them
    settings = {"target": "t", "draft": "d", "max_new_tokens": 8, "temperatures": "0,1", "prompts": 3, "runs": 1,
                "prompt_labels": ["chat", "code", "prose"]}
    md = report_markdown("sweep", settings, ["cloud", "default"], rows)
    assert md.count("## T=0") == 1 and md.count("## T=1") == 1 and md.count("decode x cloud") >= 2
    assert "(chat, code, prose)" in md and "`default` ran mode pipeline, verify dense" in md
    assert block_name("sweep", 1.0, 2) == "sweep_T1" and block_name("sweep", 1.0, 1) == "sweep"


# ----------------------------------------------------------------------------------------------- the model

def test_performance_formulas_against_values_worked_out_by_hand():
    """docs/design.md §5 at points where the arithmetic is done by hand, so the formulas are not their own oracle."""
    assert tokens_per_round(0.0, 4) == 1.0                       # nothing accepted: the cloud's token only
    assert tokens_per_round(1.0, 4) == 5.0                       # everything accepted: g drafts + the bonus
    assert tokens_per_round(0.5, 2) == pytest.approx(1.75)       # 1 + 0.5 + 0.25
    assert tokens_per_round(0.75, 4) == pytest.approx(3.05078125)  # 781/256
    assert stop_and_wait_rate(0.5, 2, 0.1, 0.2, 0.3) == pytest.approx(1.75 / 0.7)  # 2 x 0.1 + 0.2 + 0.3 = 0.7 s
    # pipelined, drafting slower than the round trip: E[T] = 0.25 x max(1.0, 0.5) + 0.75 x (1.0 + 0.2 + 0.3) = 1.375
    assert pipelined_rate(0.5, 2, 0.5, 0.2, 0.3) == pytest.approx(1.75 / 1.375)
    # pipelined, everything accepted and drafting hidden under the round trip: one round per RTT + verify
    assert pipelined_rate(1.0, 3, 0.01, 0.2, 0.3) == pytest.approx(4 / 0.5)


def test_interp_cost_is_linear_between_integers():
    at = {"0": 0.5, "1": 0.6, "2": 0.8, "3": None}
    assert interp_cost(at, 1) == 0.6
    assert interp_cost(at, 1.5) == pytest.approx(0.7)
    assert interp_cost(at, 2.5) is None and interp_cost(None, 1) is None


def test_cloud_and_edge_are_one_over_their_step_time():
    assert predict(Components("cloud", 0.2, t_decode=0.5))["model"] == 2.0
    assert predict(Components("edge", 0.2, t_draft=0.1))["model"] == pytest.approx(10.0)
    rec = {"mode": "cloud", "stats": {"generated_tokens": 10}, "extra": {"cloud_s": 5.0}}
    assert components(rec, 0.05, None).t_decode == 0.5


def test_sync_is_stop_and_wait_from_the_runs_own_measurements():
    rec = {"mode": "sync",
           "stats": {"generated_tokens": 40, "rounds": 10, "drafted_tokens": 40, "draft_tokens_made": 50,
                     "acceptance_rate": 0.5, "mean_draft_len": 4.0, "cloud_tokens": 0, "bytes_up": 4000, "bytes_down": 1000},
           "extra": {"draft_s": 5.0, "cloud_s": 12.0, "acceptance_iid": 0.75}}
    c = components(rec, 0.1, None)
    assert (c.a, c.g, c.t_draft, c.t_verify, c.net_s) == (0.75, 4.0, 0.1, 1.2, 0.0)  # per-token a, not acceptance_rate
    # by hand: (1 - 0.75^5) / (1 - 0.75) = 781/256 = 3.05078125 tokens a round, 4 x 0.1 + 0.1 + 1.2 = 1.7 s a round
    assert predict(c)["model"] == pytest.approx(3.05078125 / 1.7, rel=1e-12)
    assert predict(c)["model"] == pytest.approx(1.7945772058823529, rel=1e-12)
    # on a 1 Mbit/s link a round's 500 bytes take 4 ms more
    assert components(rec, 0.1, 1.0).net_s == pytest.approx(8 * 500 / 1e6)
    rec["extra"].pop("acceptance_iid")
    assert components(rec, 0.1, None).a == 0.5  # falls back to the stats' figure


def test_early_exit_takes_predrafted_tokens_off_the_round():
    c = Components("early-exit", 0.1, t_draft=0.1, t_verify=1.0, a=0.8, g=4.0, predrafted_share=0.25)
    m = predict(c)
    # by hand: (1 - 0.8^5) / 0.2 = 3.3616 tokens a round; stop-and-wait takes 4 x 0.1 + 0.1 + 1.0 = 1.5 s a round,
    # and with a quarter of the drafts made during the previous pass, 3 x 0.1 + 0.1 + 1.0 = 1.4 s
    assert m["model_spec"] == pytest.approx(3.3616 / 1.5, rel=1e-12)
    assert m["model"] == pytest.approx(3.3616 / 1.4, rel=1e-12)
    assert (m["model_spec"], m["model"]) == (pytest.approx(2.2410666666666668), pytest.approx(2.4011428571428572))


def test_pipeline_is_pipelined_rate_and_charges_decode_ahead_at_decode_cost():
    c = Components("picospec", 0.05, t_draft=0.1, t_verify=1.0, a=0.7, g=4.0)
    # by hand: (1 - 0.7^5) / 0.3 = 2.7731 tokens a round; the whole batch is accepted with 0.7^4 = 0.2401, and then
    # drafting (0.4 s) hides under the round trip + verify (1.05 s); otherwise 0.4 + 0.05 + 1.0 = 1.45 s:
    # E[T] = 0.2401 x 1.05 + 0.7599 x 1.45 = 1.35396 s
    spec = 2.7731 / 1.35396
    assert predict(c)["model"] == pytest.approx(spec, rel=1e-12)
    assert predict(c)["model"] == pytest.approx(2.0481402700227482, rel=1e-12)
    mixed = Components("pipeline", 0.05, t_draft=0.1, t_verify=1.0, t_decode=0.5, a=0.7, g=4.0, cloud_share=0.5)
    # half the tokens at the cloud's 0.5 s, half at the pipelined rate: 1 / (0.25 + 0.5 / spec)
    assert predict(mixed)["model"] == pytest.approx(2.0237838942386634, rel=1e-12)
    assert predict(mixed)["model_spec"] == pytest.approx(spec, rel=1e-12)
    # no verification rounds at all: the cloud decoded alone
    alone = Components("pipeline", 0.05, t_decode=0.5, cloud_share=1.0)
    assert predict(alone)["model"] == 2.0


def test_pipeline_components_use_the_cost_fit_when_the_cloud_also_decoded():
    rec = {"mode": "pipeline",
           "stats": {"generated_tokens": 40, "rounds": 5, "drafted_tokens": 10, "draft_tokens_made": 12,
                     "acceptance_rate": 0.8, "mean_draft_len": 2.0, "cloud_tokens": 20},
           "extra": {"draft_s": 1.2, "cloud_s": 15.0, "acceptance_iid": 0.8,
                     "verify_at": {"0": 0.5, "1": 0.6, "2": 0.7, "3": 0.8}}}
    c = components(rec, 0.05, None)
    assert (c.t_decode, c.t_verify, c.cloud_share, c.t_draft) == (0.5, 0.7, 0.5, pytest.approx(0.1))


def test_deviation_summary_and_flag():
    assert deviation(10.0, 12.0) == pytest.approx(0.2)
    assert deviation(None, 1.0) is None and deviation(1.0, None) is None
    base = {"rtt_ms": 50.0, "mbit": None, "rtt_measured_ms": 50.2, "mode": "sync", "exact": True}
    samples = [{**base, "column": "sync", "tokens_per_s": 1.8, "decode_tokens_per_s": 2.0, "model_tokens_per_s": 2.6,
                "components": {"a": 0.8, "g": 4.0, "t_draft": 0.1, "t_verify": 1.0}},
               {**base, "column": "ok", "tokens_per_s": 1.8, "decode_tokens_per_s": 2.0, "model_tokens_per_s": 2.2,
                "components": {}}]
    rows = {r["column"]: r for r in summarize(samples, flag_pct=20)}
    assert rows["sync"]["flag"] and rows["sync"]["deviation"] == pytest.approx(0.3)
    assert not rows["ok"]["flag"]
    table = format_table(list(rows.values()), 20)
    assert table.count("<- >20%") == 1 and "1.30" in table and "1000" in table  # t_verify in ms


def test_counting_ewma_counts_trials_and_keeps_the_estimate():
    est = Estimates()
    c = _CountingEwma.wrap(est)
    for x in (1.0, 1.0, 0.0, 1.0):
        est.acceptance.add(x)
    plain = Estimates()
    for x in (1.0, 1.0, 0.0, 1.0):
        plain.acceptance.add(x)
    assert c.rate == 0.75 and c.trials == 4
    assert est.to_dict()["acceptance"] == plain.to_dict()["acceptance"]
    assert math.isclose(est.acceptance.value, plain.acceptance.value)
