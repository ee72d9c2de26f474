"""picospec-bench stress, short: the tiny pair over the whole grid in process (jitter on both sides, draft length
steered to 0 with decode-ahead), and the split modes through a real picospec-cloud process. No hangs, no errors,
greedy output equal to the target's own, and speculation happened. Each generation is bounded by hang_s, so a
regression shows up as a reported HANG, never as a test that does not end; the last test checks that path itself."""
from __future__ import annotations

from pathlib import Path

from picospec.bench.stress import STRESS_MODES, StressConfig, StressReport, failures_text, run_stress
from picospec.edge_client.client import Generation
from picospec.shared.config import VERIFY_MODES

TINY = {"target": "tiny-random", "draft": "tiny-random:layers=1"}
HANG_S = 15.0  # a tiny generation takes well under a second


def _assert_clean(report: StressReport) -> None:
    c = report.counts
    assert c["hang"] == c["error"] == c["mismatch"] == 0, failures_text(report.records)
    assert c["ok"] == len(report.records) > 0


def _rounds(report: StressReport, **match: object) -> int:
    return sum(r["stats"]["rounds"] for r in report.records if all(r[k] == v for k, v in match.items()))


def test_stress_in_process_whole_grid(tmp_path: Path) -> None:
    report = run_stress(StressConfig(**TINY, transports=("inproc",), runs=1, hang_s=HANG_S, jitter_ms=2.0,
                                     out=tmp_path, quiet=True))
    _assert_clean(report)
    recs = report.records
    for mode in STRESS_MODES:
        verifies = ("split-topk",) if mode == "picospec" else VERIFY_MODES
        for verify in verifies:
            for sampling in ("greedy", "T=1,top-p=0.9"):
                assert any(r["mode"] == mode and r["verify"] == verify and r["sampling"] == sampling for r in recs)
        assert _rounds(report, mode=mode) > 0, f"no speculation in {mode}"
    for verify in VERIFY_MODES:
        assert {r["decode_ahead"] for r in recs if r["mode"] == "pipeline" and r["verify"] == verify} == {"on", "off"}
        assert _rounds(report, mode="pipeline", verify=verify, decode_ahead="off") > 0
    assert {r["ignore_eos"] for r in recs} == {False, True}
    steered = [r for r in recs if r["mode"] == "pipeline" and r["draft_len"] == 0 and r["decode_ahead"] == "on"]
    assert any(r["stats"]["draft_len_chosen"].get("0", 0) for r in steered), "draft length 0 was never chosen"
    assert (tmp_path / "stress.json").exists() and (tmp_path / "stress.md").exists()


def test_stress_split_modes_through_a_cloud_process(tmp_path: Path) -> None:
    report = run_stress(StressConfig(**TINY, modes=("pipeline", "picospec"), verify=("split-topk", "split-exact"),
                                     transports=("procs",), runs=1, hang_s=HANG_S, jitter_ms=2.0, out=tmp_path,
                                     cloud_start_s=300.0, quiet=True))
    _assert_clean(report)
    assert len(report.records) == 18  # pipeline: 2 verify x 2 samplings x 2 draft lengths x 2 decode-ahead; picospec: 2
    assert _rounds(report, mode="pipeline") > 0 and _rounds(report, mode="picospec") > 0
    assert "serving tiny-random" in (tmp_path / "cloud_procs.log").read_text()



def test_a_generation_past_hang_s_is_reported_as_a_hang_with_a_state_dump(tmp_path: Path) -> None:
    """The hang path itself: with a limit far below a generation's time, runs are HANGs, dumped while they wait,
    then cancelled cleanly (the next run on the same client and server starts as usual)."""
    report = run_stress(StressConfig(**TINY, modes=("pipeline",), verify=("split-exact",), transports=("inproc",),
                                     runs=2, max_new_tokens=64, hang_s=0.01, out=tmp_path, quiet=True))
    recs = report.records
    assert len(recs) == 16 and {r["outcome"] for r in recs} <= {"hang", "ok"}
    # 64 tokens take far longer than 10 ms; without ignore_eos the tiny target may stop at once
    assert report.counts["hang"] >= sum(r["ignore_eos"] for r in recs) == 8
    for r in (r for r in recs if r["outcome"] == "hang"):
        state = r["state"]
        assert state["stats"]["finish_reason"] is None and r["stats"]["finish_reason"] == "cancelled"
        assert not hasattr(Generation, "describe") or "edge_describe" in state
    assert "State dump of the first hang" in (tmp_path / "stress.md").read_text()
