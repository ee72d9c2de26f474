"""Running a benchmark grid on a testbed: every column on every prompt, `runs` times, in every cell; one flat
record per run, a progress bar, skipping where a column already timed out in an easier cell, and keeping what
was measured when the runs stop early."""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from picospec.bench.grid import Column, Condition, Prompt, bw_name, fmt_num, harder_or_equal
from picospec.bench.report import METRICS, fmt
from picospec.bench.testbed import BenchError, Testbed


class Progress:
    """tqdm on stderr where installed, else one line per run."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0
        try:
            from tqdm import tqdm

            self.bar: Any = tqdm(total=total, file=sys.stderr, unit="run", dynamic_ncols=True)
        except ImportError:
            self.bar = None

    def step(self, desc: str, note: str = "", n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.set_description(desc, refresh=False)
            self.bar.set_postfix_str(note, refresh=False)
            self.bar.update(n)
        else:
            print(f"[{self.done}/{self.total}] {desc} {note}", file=sys.stderr, flush=True)

    def write(self, msg: str) -> None:
        (self.bar.write if self.bar is not None else lambda m: print(m, file=sys.stderr, flush=True))(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass(frozen=True)
class RunKey:
    """Which run a record is: its place in the grid and the seed it ran with."""

    cond: Condition
    col: Column
    temperature: float | None
    run: int
    prompt_i: int
    prompt_label: str
    seed: int


def sample_record(k: RunKey, link: dict[str, Any], r: dict[str, Any]) -> dict[str, Any]:
    """One run as a flat record (stats keys at the top level, the whole stats dict kept under `stats`).
    `mode` is the column's (`default` stays `default`); `ran_mode` what the edge ran."""
    st = r.get("stats") or {}
    cond, col = k.cond, k.col
    rec: dict[str, Any] = {
        "rtt_ms": cond.rtt_ms, "mbit": cond.mbit, "temperature": k.temperature,
        "rtt_measured_ms": link.get("rtt_measured_ms"),
        "link_method": link.get("method"), "column": col.label, "mode": col.mode,
        "ran_mode": st.get("mode", col.resolved_mode),
        "verify_mode": st.get("verify_mode", col.verify), "exact": st.get("exact", col.exact),
        "run": k.run, "prompt": k.prompt_i, "prompt_label": k.prompt_label, "seed": k.seed,
        "timed_out": bool(r.get("timed_out")),
        "error": None if r.get("ok") else r.get("error", "failed"),
    }
    rec.update({k: st.get(k) for k in METRICS})
    rec["extra"] = r.get("extra")
    rec["stats"] = st
    return rec


def run_grid(bed: Testbed, conds: Sequence[Condition], cols: Sequence[Column], prompts: Sequence[Prompt], runs: int,
             seed: int, samples: list[dict[str, Any]],
             on_cell: Callable[[Condition, dict[str, Any]], None] | None = None,
             temperatures: Sequence[float | None] = (None,)) -> None:
    """Every column on every prompt at every temperature `runs` times in every cell; appends one record per run
    (skipped ones too) to `samples` as it goes, so that the caller keeps what was measured when a long sweep
    is interrupted. Temperatures and columns are interleaved per prompt: slow drift of the machine hits all alike.
    Temperature None: the testbed's own."""
    cut: list[tuple[Condition, str, float | None]] = []  # (cell, column, temperature) where a run timed out
    bar = Progress(len(conds) * len(cols) * len(prompts) * len(temperatures) * runs)
    try:
        for cond in conds:
            link = bed.shape(cond)
            bar.write(f"{cond.name}: link {link['method']}, measured RTT "
                      f"{fmt(link.get('rtt_measured_ms'), '{:.1f}')} ms")
            if on_cell:
                on_cell(cond, link)
            for run in range(runs):
                for pi, prompt in enumerate(prompts):
                    for t in temperatures:
                        for col in cols:
                            # the same seed for every column: same coins, fair comparison
                            k = RunKey(cond, col, t, run, pi, prompt.label, seed + 1000 * run + pi)
                            _run_one(bed, k, prompt.text, link, cut, samples, bar)
    finally:
        bar.close()


def _run_one(bed: Testbed, k: RunKey, text: str, link: dict[str, Any], cut: list[tuple[Condition, str, float | None]],
             samples: list[dict[str, Any]], bar: Progress) -> None:
    """One run (or its skip, where the column timed out in an easier cell at this temperature), recorded."""
    desc = f"{fmt_num(k.cond.rtt_ms)}ms {bw_name(k.cond.mbit)}" + ("" if k.temperature is None else f" T={k.temperature:g}") \
        + f" {k.col.label}"
    if any(lb == k.col.label and t == k.temperature and harder_or_equal(k.cond, c) for c, lb, t in cut):
        samples.append({**sample_record(k, link, {"ok": True}), "skipped": True})
        bar.step(desc, "skipped (timed out here or where easier)")
        return
    r = bed.run(k.col, text, k.seed, k.temperature)
    rec = sample_record(k, link, r)
    samples.append(rec)
    if rec["timed_out"]:
        cut.append((k.cond, k.col.label, k.temperature))
    note = (f"error: {rec['error'][:60]}" if rec["error"] else
            f"{fmt(rec['tokens_per_s'])} tok/s" + (" (timed out)" if rec["timed_out"] else ""))
    if rec["error"]:
        bar.write(f"{desc}: {rec['error']}")
    bar.step(desc, note)


@contextlib.contextmanager
def keep_partial(settings: dict[str, Any]) -> Iterator[None]:
    """Ctrl-C or a broken testbed ends the runs, not the report: what was measured is still written."""
    try:
        yield
    except (KeyboardInterrupt, BenchError) as e:
        settings["interrupted"] = f"{type(e).__name__}: {e}"
        print(f"\nstopped early ({settings['interrupted']}); writing what was measured", file=sys.stderr)
