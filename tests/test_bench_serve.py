"""picospec-bench serve and soak: the pure parts (percentiles, spreading sessions, the cloud's flags and metrics,
rows, the memory rule, the reports) without models, then one short run of each command on the tiny models
through a real cloud process and edge worker processes (about 20 s each)."""
from __future__ import annotations

from pathlib import Path

import pytest

from picospec.bench import fleet as fl
from picospec.bench import serve, soak
from picospec.bench.session_worker import more, spec_for
from picospec.shared.config import EDGE_MODES, VERIFY_MODES

TINY = {"target": "tiny-random", "draft": "tiny-random:layers=1"}


# ---------------------------------------------------------------------------------------------- fleet helpers

def test_percentile_interpolates_and_ignores_missing_values() -> None:
    assert fl.percentile([], 0.5) is None and fl.percentile([None], 0.5) is None
    assert fl.percentile([3.0], 0.95) == 3.0
    assert fl.percentile([1.0, None, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert fl.percentile([4.0, 1.0, 3.0, 2.0], 0.0) == 1.0 and fl.percentile([4.0, 1.0, 3.0, 2.0], 1.0) == 4.0
    assert fl.percentile(list(map(float, range(101))), 0.95) == pytest.approx(95.0)


def test_sessions_are_dealt_round_robin_over_the_workers_used() -> None:
    assert fl.split_sessions(1, 4) == [[0]]
    assert fl.split_sessions(5, 2) == [[0, 2, 4], [1, 3]]
    assert fl.split_sessions(4, 4) == [[0], [1], [2], [3]]
    groups = fl.split_sessions(64, 4)
    assert sorted(s for g in groups for s in g) == list(range(64)) and {len(g) for g in groups} == {16}


def test_a_flag_is_found_in_help_output_only_as_a_whole_word() -> None:
    help_text = "  --batching {on,off}   batch verification\n  --max-wait-ms MAX_WAIT_MS\n"
    assert fl.flag_supported(help_text, "--batching") and fl.flag_supported(help_text, "--max-wait-ms")
    assert not fl.flag_supported("  --batching-mode X\n  --no-batching\n", "--batching")
    assert not fl.flag_supported("", "--batching")


def test_histogram_means_are_taken_over_what_was_observed_between_two_scrapes() -> None:
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    reg = CollectorRegistry()
    h = Histogram("picospec_cloud_pass_drafts", "d", ("mode",), buckets=(1, 2, 4, 8), registry=reg)
    h.labels("coupled").observe(100)  # before the window: must not count
    before = fl.histogram_totals(generate_latest(reg).decode())
    h.labels("coupled").observe(2)
    h.labels("dense").observe(4)  # labels are summed
    after = fl.histogram_totals(generate_latest(reg).decode())
    assert after["picospec_cloud_pass_drafts"] == (106.0, 3.0)
    assert fl.histogram_means(before, after) == {"picospec_cloud_pass_drafts": 3.0}
    assert fl.histogram_means(after, after) == {"picospec_cloud_pass_drafts": None}


# ---------------------------------------------------------------------------------------------- serve

def test_without_cloud_support_only_off_runs_and_the_report_says_so() -> None:
    assert serve.batching_plan(["on", "off"], True) == (["on", "off"], None)
    configs, note = serve.batching_plan(["on", "off"], False)
    assert configs == ["off"] and "no --batching" in note
    cfg = serve.ServeConfig(sessions=(1, 8), max_batch_tokens=256, max_wait_ms=2.5, device="cuda", dtype="bfloat16")
    assert serve.cloud_flags(cfg, "on", True) == ["--max-sessions", "8", "--max-context", "320", "--batching", "on", "--max-batch-tokens", "256",
                                                  "--max-wait-ms", "2.5", "--device", "cuda", "--dtype", "bfloat16"]
    assert "--batching" not in serve.cloud_flags(cfg, "off", False)


def _gen(session: int, start: float, end: float, tokens: int, decode: float, ttft: float, error: str | None = None) -> dict:
    return {"session": session, "start": start, "end": end, "generated_tokens": tokens, "decode_tokens_per_s": decode,
            "ttft_s": ttft, "tokens_per_s": tokens / (end - start), "error": error}


def test_a_row_aggregates_over_the_whole_span_and_takes_percentiles_per_generation() -> None:
    recs = [_gen(0, 10.0, 12.0, 20, 12.0, 0.1), _gen(1, 10.0, 14.0, 20, 6.0, 0.3),
            _gen(2, 10.5, 11.0, 0, 0.0, 0.0, error="EdgeError: boom")]
    means = {serve.DRAFTS_METRIC: 3.5, serve.COMMITTED_METRIC: 2.0, serve.BATCH_ROWS_METRIC: 2.5,
             serve.BATCH_TOKENS_METRIC: 9.0}
    row = serve.summarize(recs, "on", 3, means)
    assert row["generations"] == 3 and row["failures"] == 1 and row["errors"] == ["EdgeError: boom"]
    assert row["tokens"] == 40 and row["span_s"] == 4.0 and row["aggregate_tokens_per_s"] == 10.0
    assert row["decode_tokens_per_s_p50"] == 9.0 and row["decode_tokens_per_s_p95"] == pytest.approx(11.7)
    assert row["ttft_s_p95"] == pytest.approx(0.29)
    assert (row["mean_batch_size"], row["tokens_per_pass"]) == (2.5, 9.0)
    assert (row["drafts_per_pass"], row["committed_per_pass"]) == (3.5, 2.0)
    bare = serve.summarize(recs[:1], "off", 1, {})
    assert bare["mean_batch_size"] is None and bare["tokens_per_pass"] is None and bare["drafts_per_pass"] is None


def test_the_engines_share_splits_the_clouds_cpu_into_passes_and_the_rest() -> None:
    deltas = {serve.BATCH_PASS_METRIC: (6.0, 300.0), serve.BATCH_PASS_CPU_METRIC: (5.0, 300.0)}
    share = serve.engine_share(deltas, cloud_cpu_s=7.0, span_s=8.0, tokens=1000)
    assert share["engine_busy"] == 0.75                                   # 6 s of passes in 8 s
    assert share["cloud_ms_per_token_beside_passes"] == pytest.approx(2.0)  # (7 - 5) s over 1,000 tokens
    assert serve.engine_share({}, 7.0, 8.0, 1000) == {"engine_busy": None, "cloud_ms_per_token_beside_passes": None}
    assert serve.engine_share(deltas, 7.0, 8.0, 0)["engine_busy"] is None


def test_the_serve_report_shows_n_a_where_the_cloud_has_no_batch_metric() -> None:
    rows = [serve.summarize([_gen(0, 0.0, 2.0, 10, 5.0, 0.2)], "off", 1, {serve.DRAFTS_METRIC: 3.0})]
    settings = {"target": "t", "draft": "d", "modes": ("pipeline",), "verify": "coupled", "temperature": 0.0,
                "max_new_tokens": 10, "gens": 1, "cloud_core": 0, "edge_core": 1, "edge_procs_used": 1,
                "notes": ["only off ran"]}
    md = serve.report_markdown(settings, rows)
    line = next(x for x in md.splitlines() if x.startswith("| pipeline | off"))
    assert line.count("| n/a") == 4 and "5.00" in line and "3.00" in line  # batch size, tokens, engine columns
    assert "**Note**: only off ran" in md


def test_each_mode_is_compared_with_the_cloud_alone_at_the_same_batching_and_sessions() -> None:
    """The cloud's compute per token comes from its counters' growth over the run; ratios to the `cloud` row."""
    deltas = {serve.COMPUTE_METRIC: (3.0, 0.0), serve.TOKENS_METRIC: (40.0, 0.0), serve.CAPPED_METRIC: (7.0, 0.0)}
    assert serve.cloud_cost(deltas) == {"cloud_ms_per_token": 75.0, "capped_drafts": 7.0}
    assert serve.cloud_cost({})["cloud_ms_per_token"] is None
    rows = [{"mode": m, "batching": b, "sessions": n, "aggregate_tokens_per_s": agg, "decode_tokens_per_s_p50": p50,
             "cloud_ms_per_token": ms}
            for m, b, n, agg, p50, ms in (("cloud", "on", 4, 20.0, 5.0, 100.0), ("pipeline", "on", 4, 30.0, 7.5, 50.0),
                                          ("pipeline", "on", 8, 30.0, 7.5, 50.0))]
    serve.compare_to_baseline(rows)
    assert (rows[1]["aggregate_x_cloud"], rows[1]["p50_x_cloud"], rows[1]["cloud_cost_x_cloud"]) == (1.5, 1.5, 0.5)
    assert rows[0]["aggregate_x_cloud"] == 1.0
    assert rows[2]["aggregate_x_cloud"] is None  # no cloud row at N = 8
    assert serve.parse_args(["--mode", "pipeline,cloud"]).modes == ("pipeline", "cloud")
    with pytest.raises(SystemExit):
        serve.parse_args(["--mode", "pipelin"])


def test_a_fixed_plan_gives_every_session_its_seed_and_prompt() -> None:
    plan = {"kind": "fixed", "gens": 2, "spec": {"prompt": "x", "mode": "sync", "seed": 7, "overrides": {}},
            "prompts": ["a", "b"]}
    assert [spec_for(plan, s, k)["seed"] for s, k in ((0, 0), (0, 1), (3, 1))] == [7, 8, 3008]
    assert [spec_for(plan, s, 0)["prompt"] for s in range(3)] == ["a", "b", "a"]
    assert plan["spec"]["seed"] == 7  # the plan itself is not changed
    assert more(plan, 1, None) and not more(plan, 2, None)


# ---------------------------------------------------------------------------------------------- soak

def test_soak_specs_are_a_pure_function_and_mix_modes_lengths_and_sampling() -> None:
    specs = [soak.soak_spec(0, s, k, 64) for s in range(16) for k in range(16)]
    assert specs == [soak.soak_spec(0, s, k, 64) for s in range(16) for k in range(16)]
    assert soak.soak_spec(1, 0, 0, 64) != soak.soak_spec(0, 0, 0, 64) or soak.soak_spec(1, 0, 1, 64) != soak.soak_spec(0, 0, 1, 64)
    assert {s["mode"] for s in specs} == {m for m, _ in soak.SOAK_MODES} and {s["mode"] for s in specs} <= set(EDGE_MODES) - {"edge"}
    assert {s["overrides"]["verify"] for s in specs} == set(VERIFY_MODES)
    assert {s["overrides"]["temperature"] for s in specs} == {0.0, 1.0}
    lengths = {s["overrides"]["max_new_tokens"] for s in specs}
    assert min(lengths) == 1 and max(lengths) == 64 and len(lengths) >= 4
    assert any(s["fresh_client"] for s in specs) and not all(s["fresh_client"] for s in specs)
    assert max(s["overrides"]["max_new_tokens"] for s in (soak.soak_spec(0, 0, k, 6) for k in range(50))) <= 6


def test_the_memory_rule_compares_the_end_with_the_first_sample_after_warm_up() -> None:
    mib = 1024 * 1024
    flat = [(0.0, 300 * mib), (5.0, 400 * mib), (10.0, 420 * mib), (60.0, 430 * mib), (65.0, 440 * mib)]
    v = soak.memory_verdict(flat, warmup_s=10.0, tolerance=0.10)
    assert v["baseline"] == 420 * mib and v["end"] == 440 * mib and v["peak"] == 440 * mib and v["ok"] is True
    assert v["change"] == pytest.approx(20 / 420)
    grown = flat + [(70.0, 470 * mib)]
    assert soak.memory_verdict(grown, 10.0, 0.10)["ok"] is False
    shrunk = flat + [(70.0, 370 * mib)]
    assert soak.memory_verdict(shrunk, 10.0, 0.10)["ok"] is False
    undecided = soak.memory_verdict(flat, warmup_s=100.0, tolerance=0.10)
    assert undecided["ok"] is None and "warm-up" in undecided["why"]
    assert soak.memory_verdict([], 1.0, 0.1)["ok"] is None


def test_failures_group_by_reason_and_the_soak_report_renders() -> None:
    assert soak.failure_reason("EdgeError: no answer from the cloud at 127.0.0.1:5051 for 5 s") == \
        soak.failure_reason("EdgeError: no answer from the cloud at 127.0.0.1:6001 for 7 s")
    mib = 1024 * 1024
    recs = [{"session": 0, "k": 0, "mode": "sync", "generated_tokens": 8, "decode_tokens_per_s": 4.0, "error": None},
            {"session": 1, "k": 0, "mode": "cloud", "generated_tokens": 0, "error": "EdgeError: lost 'x'"},
            {"session": 1, "k": 1, "mode": "cloud", "generated_tokens": 0, "error": "EdgeError: lost 'y'"}]
    cfg = soak.SoakConfig(sessions=2, minutes=1.0, warmup_s=10.0)
    s = soak.summarize(recs, ["worker 1: exited (1)"], [(0.0, 100 * mib), (10.0, 100 * mib), (60.0, 105 * mib)], cfg, 60.0)
    assert s["generations"] == 3 and s["failures"] == 3 and s["tokens"] == 8
    assert s["failure_reasons"] == {"EdgeError: lost '…'": 2, "worker 1: exited (1)": 1}
    assert s["memory"]["ok"] is True
    settings = {"target": "t", "draft": "d", "sessions": 2, "minutes": 1.0, "warmup_s": 10.0, "tolerance": 0.1,
                "cloud_core": 0, "edge_core": 1, "edge_procs_used": 1, "rss_loaded": 90 * mib}
    md = soak.report_markdown(settings, s)
    assert "PASS" in md and "+5.0%" in md and "2 x EdgeError: lost '…'" in md and "| sync" in md


# ---------------------------------------------------------------------------------------------- end to end

def test_serve_runs_sessions_against_a_cloud_process(tmp_path: Path) -> None:
    cfg = serve.ServeConfig(**TINY, sessions=(1, 2), max_new_tokens=8, gens=1, modes=("sync", "cloud"), edge_procs=2,
                            out=tmp_path, quiet=True)  # sync: passes for certain (the pipeline may decode ahead alone)
    result = serve.run_serve(cfg)
    rows = result["rows"]
    ran = result["settings"]["batching_ran"]
    assert ran == (["on", "off"] if result["settings"]["batching_supported"] else ["off"])
    assert [(r["mode"], r["batching"], r["sessions"]) for r in rows] == [(m, b, n) for b in ran for n in (1, 2)
                                                                           for m in ("sync", "cloud")]
    for r in rows:
        assert r["failures"] == 0, r["errors"]
        assert r["generations"] == r["sessions"] and r["tokens"] == 8 * r["sessions"]
        assert r["aggregate_tokens_per_s"] > 0 and r["decode_tokens_per_s_p50"] > 0 and r["ttft_s_p95"] > 0
        assert r["cloud_ms_per_token"] > 0 and r["cloud_cost_x_cloud"] > 0  # read from the cloud's counters
        assert (r["committed_per_pass"] is not None) == (r["mode"] == "sync")  # passes only where drafts are verified
        assert r["cloud_cpu_util"] > 0 and r["edge_cpu_util"] >= 0
    # the edge drafts only in sync; in cloud mode it may use under one clock tick (10 ms) for 8 tokens, read as 0
    assert sum(r["edge_cpu_util"] for r in rows if r["mode"] == "sync") > 0
    for r in rows:
        assert (r["mean_batch_size"] is not None) == (r["batching"] == "on")  # batched passes only with batching on
    assert all(r["aggregate_x_cloud"] == 1.0 for r in rows if r["mode"] == "cloud")
    assert {g["worker"] for g in result["generations"] if g["sessions"] == 2} == {0, 1}
    assert all((tmp_path / f).exists() for f in ("serve.json", "serve.md", "serve.png"))


def test_soak_runs_mixed_generations_and_watches_the_clouds_memory(tmp_path: Path) -> None:
    cfg = soak.SoakConfig(**TINY, sessions=4, minutes=8 / 60, warmup_s=3.0, rss_every_s=1.0, max_tokens=16,
                          edge_procs=1, out=tmp_path, quiet=True)
    result = soak.run_soak(cfg)
    s = result["summary"]
    assert s["failures"] == 0, s["failure_reasons"]
    assert s["generations"] >= 8 and s["sessions_started"] == 4 and len({r["mode"] for r in result["generations"]}) >= 3
    assert len(result["rss"]) >= 5 and s["memory"]["baseline"] and s["memory"]["ok"] is not None
    assert all((tmp_path / f).exists() for f in ("soak.json", "soak.md", "soak.png"))
