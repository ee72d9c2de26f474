"""Running a benchmark grid on a testbed: every column on every prompt, `runs` times, in every cell; one flat
record per run, a progress bar, skipping where a column already timed out in an easier cell, and keeping what
was measured when the runs stop early."""
from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, Iterator, Sequence

from picospec.bench.grid import Column, Condition, bw_name, fmt_num, harder_or_equal
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


def sample_record(cond: Condition, link: dict[str, Any], col: Column, run: int, prompt_i: int, seed: int,
                  r: dict[str, Any]) -> dict[str, Any]:
    """One run as a flat record (stats keys at the top level, the whole stats dict kept under `stats`)."""
    st = r.get("stats") or {}
    rec: dict[str, Any] = {
        "rtt_ms": cond.rtt_ms, "mbit": cond.mbit, "rtt_measured_ms": link.get("rtt_measured_ms"),
        "link_method": link.get("method"), "column": col.label, "mode": col.mode,
        "verify_mode": st.get("verify_mode", col.verify), "exact": st.get("exact", col.exact),
        "run": run, "prompt": prompt_i, "seed": seed, "timed_out": bool(r.get("timed_out")),
        "error": None if r.get("ok") else r.get("error", "failed"),
    }
    rec.update({k: st.get(k) for k in METRICS})
    rec["extra"] = r.get("extra")
    rec["stats"] = st
    return rec


def run_grid(bed: Testbed, conds: Sequence[Condition], cols: Sequence[Column], prompts: Sequence[str], runs: int,
             seed: int, samples: list[dict[str, Any]],
             on_cell: Callable[[Condition, dict[str, Any]], None] | None = None) -> None:
    """Every column on every prompt `runs` times in every cell; appends one record per run (skipped ones too)
    to `samples` as it goes, so that the caller keeps what was measured when a long sweep is interrupted."""
    cut: list[tuple[Condition, str]] = []  # (cell, column) where a run timed out
    bar = Progress(len(conds) * len(cols) * len(prompts) * runs)
    try:
        for cond in conds:
            link = bed.shape(cond)
            bar.write(f"{cond.name}: link {link['method']}, measured RTT "
                      f"{fmt(link.get('rtt_measured_ms'), '{:.1f}')} ms")
            if on_cell:
                on_cell(cond, link)
            for run in range(runs):
                for pi, prompt in enumerate(prompts):
                    for col in cols:
                        sd = seed + 1000 * run + pi  # the same seed for every column: same coins, fair comparison
                        desc = f"{fmt_num(cond.rtt_ms)}ms {bw_name(cond.mbit)} {col.label}"
                        if any(lb == col.label and harder_or_equal(cond, c) for c, lb in cut):
                            samples.append({**sample_record(cond, link, col, run, pi, sd, {"ok": True}), "skipped": True})
                            bar.step(desc, "skipped (timed out here or where easier)")
                            continue
                        r = bed.run(col, prompt, sd)
                        rec = sample_record(cond, link, col, run, pi, sd, r)
                        samples.append(rec)
                        if rec["timed_out"]:
                            cut.append((cond, col.label))
                        note = (f"error: {rec['error'][:60]}" if rec["error"] else
                                f"{fmt(rec['tokens_per_s'])} tok/s" + (" (timed out)" if rec["timed_out"] else ""))
                        if rec["error"]:
                            bar.write(f"{desc}: {rec['error']}")
                        bar.step(desc, note)
    finally:
        bar.close()


@contextlib.contextmanager
def keep_partial(settings: dict[str, Any]) -> Iterator[None]:
    """Ctrl-C or a broken testbed ends the runs, not the report: what was measured is still written."""
    try:
        yield
    except (KeyboardInterrupt, BenchError) as e:
        settings["interrupted"] = f"{type(e).__name__}: {e}"
        print(f"\nstopped early ({settings['interrupted']}); writing what was measured", file=sys.stderr)
