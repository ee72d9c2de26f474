"""Partitions (issue 13 item 3): the link between edge and cloud cut mid-generation, then restored.

`--on-partition wait` (the default) keeps the output exact: the edge reconnects once the link is back and the
tokens are the uncut run's (greedy pipeline; sync/dense at T = 1 with a seed: tests/test_resume.py says which modes
resume token-identically). `--on-partition edge` keeps the output flowing: the draft goes on alone while the link is
down, its tokens are marked (stats, spans, each chunk's source), the generation is reported not exact, and
speculation resumes once the cloud answers again, from every token so far.

The pure decisions are unit-tested first. The real test builds two network namespaces joined by a veth pair
(netlab/netns.py, root only; unshaped), runs a tiny-random `picospec-cloud` in one and an edge driver
(tests/partition_edge.py) in the other, and cuts the link by taking the edge's end down. The edge pauses after
PAUSE_AFTER tokens and the test cuts while it waits, so the cut always lands mid-generation. Outside CI it skips when
network namespaces do not work; under CI=true that fails (tests/conftest.py skip_or_fail).
"""
from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

import pytest

from picospec.edge_client.resume import (MIN_CONNECT_S, REJOIN_CONNECT_S, after_draft_token, break_action,
                                         chunk_source, piece_connect_s, rejoin_budget_s)
from picospec.edge_client.stats import GenerationStats, add_span, clip_spans, inexact_reason
from picospec.netlab.netns import Link, shaped_link
from picospec.netlab.shaping import LinkSpec, netns_usable
from picospec.shared.config import EdgeConfig, add_config_args, config_from_args
from tests.proc_util import checkout_env
from tests.conftest import skip_or_fail

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MAX_NEW = 300
PAUSE_AFTER = 20
CUT_S = 3.0          # the link is down this long; --peer-timeout-s 2 notices the break within about 2 s of it
PACE_S = 0.04       # the edge's draft-only tokens come at most this often (a slow device, see partition_edge.py)
DEADLINE_S = 150.0


# ---- the pure pieces ---------------------------------------------------------------------------------------------
def test_break_action_follows_the_policy():
    assert break_action("wait", 30.0, finished=False) == "wait"
    assert break_action("wait", 0.0, finished=False) == "fail"
    assert break_action("wait", 0.0, finished=True) == "fail"      # today's order: --reconnect-s 0 fails at once
    assert break_action("wait", 30.0, finished=True) == "done"
    assert break_action("edge", 30.0, finished=False) == "draft"
    assert break_action("edge", 0.0, finished=False) == "draft"    # never fails: the draft can always finish it
    assert break_action("edge", 0.0, finished=True) == "done"
    with pytest.raises(ValueError, match="unknown partition policy"):
        break_action("hope", 1.0, finished=False)


def test_the_reconnect_budget_counts_from_the_break():
    assert rejoin_budget_s(30.0, lost_at=100.0, now=100.0) == 30.0
    assert rejoin_budget_s(30.0, lost_at=100.0, now=112.5) == 17.5
    assert rejoin_budget_s(30.0, lost_at=100.0, now=140.0) == 0.0
    assert rejoin_budget_s(0.0, lost_at=100.0, now=100.0) == 0.0


def test_a_piece_after_a_break_waits_for_the_cloud_within_the_outages_budget():
    assert piece_connect_s("wait", 60.0, None, 30.0, now=5.0) == 60.0     # the first piece: --wait-ready-s
    assert piece_connect_s("edge", 60.0, None, 30.0, now=5.0) == 60.0
    assert piece_connect_s("wait", 60.0, 100.0, 30.0, now=110.0) == 20.0  # what is left of --reconnect-s
    assert piece_connect_s("edge", 60.0, 100.0, 30.0, now=110.0) == REJOIN_CONNECT_S  # the draft could go on
    assert piece_connect_s("wait", 60.0, 100.0, 30.0, now=140.0) == MIN_CONNECT_S


def test_after_a_draft_token_the_draft_ends_rejoins_or_goes_on():
    assert after_draft_token(True, "connected") == "end"           # the draft finished it: nothing to resume
    assert after_draft_token(False, "connected") == "rejoin"
    assert after_draft_token(False, "trying") == "draft"
    assert after_draft_token(False, "gave_up") == "draft"          # --reconnect-s spent: the draft finishes alone


def test_spans_join_clip_and_name_each_chunks_source():
    spans = add_span(add_span(add_span([], 5, 6), 6, 7), 9, 12)
    assert spans == [(5, 7), (9, 12)] and add_span(spans, 12, 12) == spans
    with pytest.raises(ValueError):
        add_span(spans, 10, 11)
    assert clip_spans(spans, 10) == [(5, 7), (9, 10)] and clip_spans(spans, 5) == []
    assert [chunk_source(spans, a, b) for a, b in ((0, 5), (5, 6), (6, 7), (7, 9), (9, 12), (12, 12))] == \
        ["cloud", "draft", "draft", "cloud", "draft", "cloud"]


def test_stats_say_which_tokens_are_the_drafts_and_why_not_exact():
    st = GenerationStats(mode="pipeline", verify_mode="dense", exact=True)
    st.on_tokens(4)
    assert st.to_dict()["exact"] is True and st.to_dict()["inexact_reason"] is None
    st.on_tokens(3)
    st.on_draft_only(4, 5)
    st.on_draft_only(5, 7)
    d = st.to_dict()
    assert d["exact"] is False and d["draft_only_tokens"] == 3 and d["draft_only_spans"] == [[4, 7]]
    assert "3 tokens (positions 4-6) are the draft's own" in d["inexact_reason"]
    st.drop_tail(2)  # a stop string cut the output: the spans follow
    assert st.to_dict()["draft_only_spans"] == [[4, 5]]
    assert inexact_reason("picospec", "split-topk", []) == "split-topk verification is approximate"
    assert inexact_reason("edge", None, []).startswith("the draft alone")


def test_on_partition_is_a_flag_and_an_environment_variable():
    import argparse
    p = argparse.ArgumentParser()
    add_config_args(p, EdgeConfig)
    assert config_from_args(EdgeConfig, p.parse_args([]), environ={}).on_partition == "wait"
    assert config_from_args(EdgeConfig, p.parse_args(["--on-partition", "edge"]), environ={}).on_partition == "edge"
    assert config_from_args(EdgeConfig, p.parse_args([]), environ={"PICOSPEC_ON_PARTITION": "edge"}).on_partition \
        == "edge"
    with pytest.raises(SystemExit):
        config_from_args(EdgeConfig, p.parse_args([]), environ={"PICOSPEC_ON_PARTITION": "pray"})


def test_the_front_ends_show_the_drafts_tokens():
    """The CLI's table and legend, the chat's footer and the OpenAI server's `timings` carry the partition."""
    from picospec.edge_client import openai_api
    from picospec.edge_client.chat import format_footer
    from picospec.edge_client.cli import format_legend, format_table
    st = GenerationStats(mode="pipeline", verify_mode="dense", exact=True)
    st.on_tokens(10)
    st.on_draft_only(3, 7)
    st.finish("length")
    d = st.to_dict()
    table, legend = format_table([{"mode": "pipeline", "stats": d}]), format_legend([{"mode": "pipeline", "stats": d}])
    assert "| draft-only tokens (cloud unreachable) | 4 " in table and "APPROXIMATE" in table
    assert "APPROXIMATE: 4 tokens (positions 3-6) are the draft's own" in legend
    assert "4 draft-only tokens (cloud unreachable)" in format_footer(d)
    t = openai_api.timings(d, seed=0)
    assert (t["exact"], t["draft_only_tokens"], t["draft_only_spans"]) == (False, 4, [[3, 7]]) and t["inexact_reason"]


# ---- a real partition ----------------------------------------------------------------------------------------------
GREEDY = {"mode": "pipeline", "verify": "dense", "temperature": 0.0, "max_new_tokens": MAX_NEW}
SAMPLED = {"mode": "sync", "verify": "dense", "temperature": 1.0, "seed": 7, "max_new_tokens": MAX_NEW}
RUNS = [
    {"name": "ref_greedy", "kw": GREEDY},
    {"name": "wait_greedy", "kw": {**GREEDY, "on_partition": "wait"}, "pause_after": PAUSE_AFTER},
    {"name": "ref_sampled", "kw": SAMPLED},
    {"name": "wait_sampled", "kw": {**SAMPLED, "on_partition": "wait"}, "pause_after": PAUSE_AFTER},
    {"name": "edge_greedy", "kw": {**GREEDY, "on_partition": "edge"}, "pause_after": PAUSE_AFTER,
     "pace_draft_s": PACE_S},
]



@pytest.fixture(scope="module")
def link() -> Iterator[Link]:
    ok, why = netns_usable()
    if not ok:
        skip_or_fail(f"no network namespaces here: {why}")
    with shaped_link(LinkSpec()) as lk:  # unshaped: the cut is what is tested
        yield lk


def _lines(proc: subprocess.Popen[str]) -> "queue.Queue[str | None]":
    """The process's stdout lines on a queue (None at EOF), so reads can have deadlines."""
    q: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            q.put(line)
        q.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return q


def drive(link: Link, edge: subprocess.Popen[str]) -> tuple[dict[str, list[dict]], dict[str, tuple[float, float]]]:
    """Read the edge's lines to the end; at each pause cut the link, let the edge go on, restore CUT_S later.
    Returns each run's events and each cut run's (cut, restore) times."""
    lines, events, cuts = _lines(edge), defaultdict(list), {}
    deadline, pending = time.monotonic() + DEADLINE_S, None  # pending: (run, cut at, restore at) while cut
    try:
        while time.monotonic() < deadline:
            wake = min(deadline, pending[2]) if pending else deadline
            try:
                line = lines.get(timeout=max(0.01, wake - time.monotonic()))
            except queue.Empty:
                line = ""
            if pending and time.monotonic() >= pending[2]:
                link.restore()
                cuts[pending[0]], pending = (pending[1], time.time()), None
            if line is None or not line.strip():
                if line is None:
                    break
                continue
            ev = json.loads(line)
            events[ev.get("run", "")].append(ev)
            if ev["event"] == "pause":
                link.cut()
                pending = (ev["run"], time.time(), time.monotonic() + CUT_S)
                edge.stdin.write("go\n")
                edge.stdin.flush()
            elif ev["event"] == "done":
                break
    finally:
        if pending:
            link.restore()
    return events, cuts


def figures(events: list[dict], cut: tuple[float, float]) -> tuple[float | None, int]:
    """Seconds from the restore to the first token from the cloud after it, and the draft-only tokens made while
    the link was down."""
    cut_at, restored_at = cut
    after = [e["t"] for e in events if e["event"] == "chunk" and e["source"] == "cloud" and e["t"] > restored_at]
    in_cut = sum(len(e["tokens"]) for e in events
                 if e["event"] == "chunk" and e["source"] == "draft" and cut_at <= e["t"] <= restored_at)
    return (after[0] - restored_at if after else None), in_cut


def end_of(events: list[dict]) -> dict:
    last = events[-1] if events else {}
    assert last.get("event") == "end", f"the run did not end: {last}"
    return last


def test_a_cut_link_wait_resumes_exactly_and_edge_goes_on_with_the_draft(link: Link, tmp_path: Path):
    port = "50051"
    cloud_log = (tmp_path / "cloud.log").open("w")
    cloud = link.popen("cloud", [BIN / "picospec-cloud", "--target", "tiny-random", "--host", link.cloud_ip,
                                 "--port", port, "--threads", "1", "--peer-timeout-s", "2", "--log-level", "WARNING"],
                       stdout=cloud_log, stderr=subprocess.STDOUT, text=True, env=checkout_env())
    edge_log = tmp_path / "edge.log"
    edge = link.popen("edge", [sys.executable, "-m", "tests.partition_edge", f"{link.cloud_ip}:{port}",
                               json.dumps(RUNS)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                      stderr=edge_log.open("w"), text=True, env=checkout_env(), cwd=ROOT)
    t0 = time.monotonic()
    events, cuts = drive(link, edge)
    took = time.monotonic() - t0
    cloud.kill()  # at once: the link's teardown would give it a graceful stop's seconds
    logs = f"\nedge stderr:\n{edge_log.read_text()[-3000:]}\ncloud:\n{(tmp_path / 'cloud.log').read_text()[-2000:]}"
    assert "" in events and events[""][-1]["event"] == "done", f"the edge did not finish: {dict(events)}{logs}"
    check_wait(events, cuts, logs)
    check_edge(events, cuts, logs)
    print(f"\nall runs {took:.1f} s (processes started in between)")


def check_wait(events: dict[str, list[dict]], cuts: dict[str, tuple[float, float]], logs: str) -> None:
    """`wait`: the uncut run's tokens exactly, after a reconnect."""
    for name in ("greedy", "sampled"):
        ref, cut = end_of(events[f"ref_{name}"]), end_of(events[f"wait_{name}"])
        st = cut["stats"]
        assert len(ref["token_ids"]) == MAX_NEW and cut["token_ids"] == ref["token_ids"], name + logs
        assert st["reconnects"] >= 1 and st["exact"] is True and st["draft_only_tokens"] == 0, st
        recover_s, _ = figures(events[f"wait_{name}"], cuts[f"wait_{name}"])
        print(f"\nwait/{name}: restore -> first cloud token {recover_s:.2f} s; reconnects {st['reconnects']}, "
              f"time lost {st['reconnect_s']:.2f} s")


def check_edge(events: dict[str, list[dict]], cuts: dict[str, tuple[float, float]], logs: str) -> None:
    """`edge`: the full count, the draft's tokens marked and counted, not exact, and speculation after them."""
    run, end = events["edge_greedy"], end_of(events["edge_greedy"])
    st, spans = end["stats"], end["spans"]
    chunks = [e for e in run if e["event"] == "chunk"]
    assert len(end["token_ids"]) == MAX_NEW and st["generated_tokens"] == MAX_NEW, st
    assert [t for c in chunks for t in c["tokens"]] == end["token_ids"]
    drafted = sum(len(c["tokens"]) for c in chunks if c["source"] == "draft")
    assert drafted > 0 and drafted == st["draft_only_tokens"] == sum(e - s for s, e in spans), (st, spans)
    assert st["exact"] is False and "are the draft's own" in st["inexact_reason"]
    assert spans[0][0] >= PAUSE_AFTER and st["reconnects"] >= 1, (spans, st)
    # rejoined: tokens from the cloud after the last draft-only one
    assert spans[-1][1] < MAX_NEW and chunks[-1]["source"] == "cloud", (spans, chunks[-1]) + (logs,)
    recover_s, in_cut = figures(run, cuts["edge_greedy"])
    print(f"\nedge: {drafted} draft-only tokens in {spans} ({in_cut} while the link was down, {CUT_S:g} s); restore -> "
          f"first cloud token {recover_s:.2f} s; reconnects {st['reconnects']}, without the cloud "
          f"{st['reconnect_s']:.2f} s")


def test_edge_policy_the_draft_finishes_when_the_cloud_never_returns(tiny_target, tiny_draft):
    """The cloud process killed for good: under `edge` the generation still completes, the draft making the rest."""
    import asyncio

    from tests.conftest import edge, run
    from tests.proc_util import cloud_process

    prompt = list(tiny_target.tokenizer("hello world")["input_ids"])

    async def scenario(proc: subprocess.Popen[str], address: str) -> tuple[list[int], Any]:
        async with edge(address, tiny_draft, ignore_eos=True, reconnect_s=1.0, on_partition="edge") as client:
            gen = client.generate(prompt, mode="pipeline", max_new_tokens=120)
            got: list[int] = []
            while len(got) < 8:
                got += await asyncio.wait_for(gen.__anext__(), 60)
            proc.kill()
            proc.wait(timeout=15)
            await asyncio.wait_for(gen.collect(), 60)  # reads on to the end: gen.token_ids holds every token
            assert gen.token_ids[:len(got)] == got
            return gen.token_ids, gen

    with cloud_process("tiny-random", "--log-level", "WARNING") as (proc, address):
        got, gen = run(scenario(proc, address))
    d = gen.stats.to_dict()
    assert len(got) == 120 and d["generated_tokens"] == 120 and d["finish_reason"] == "length", d
    (start, end), = gen.draft_spans
    assert 8 <= start and end == 120 and d["draft_only_tokens"] == 120 - start and d["reconnects"] == 0, d
    assert d["exact"] is False and gen.last_chunk_source == "draft"
