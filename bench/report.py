"""From run records to what a network benchmark shows: per-cell summaries (medians, speedup over the fastest cloud
alone: `cloud` or `llama.cpp`, whichever is faster in the cell),
CSV, Markdown tables, plots, and the sweep's report files (JSON, CSV, Markdown, PNG)."""
from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from picospec.bench.grid import BASELINE_MODES, Column, bw_name, fmt_num

# per-run statistics kept in the CSVs (all of them stay in the JSON)
METRICS = ("tokens_per_s", "decode_tokens_per_s", "ttft_s", "itl_p50_s", "itl_p95_s", "generated_tokens", "rounds",
           "mean_accepted_len", "acceptance_rate", "mean_draft_len", "bytes_up_per_token", "bytes_down_per_token",
           "edge_busy_fraction", "cloud_busy_fraction", "wasted_draft_tokens", "cloud_tokens", "pipeline_bubble_s",
           "hint_hit_rate", "wall_s", "cloud_ms_per_token")


# ----------------------------------------------------------------------------------------------- summaries

def median_or_none(xs: Iterable[float | None]) -> float | None:
    vals = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.median(vals) if vals else None


def cells(samples: Sequence[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Samples grouped by (temperature, RTT, bandwidth, column), first-seen order: for each, the row fields every
    summary shares (identity, measured RTT, counts, first error) and the runs that completed (timed out or not)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for s in samples:
        groups.setdefault((s.get("temperature"), s["rtt_ms"], s["mbit"], s["column"]), []).append(s)
    for (temp, rtt, mbit, col), ss in groups.items():
        ok = [s for s in ss if not s.get("error") and not s.get("skipped")]
        yield {
            "temperature": temp, "rtt_ms": rtt, "mbit": mbit,
            "rtt_measured_ms": median_or_none(s.get("rtt_measured_ms") for s in ss),
            "column": col, "mode": ss[0]["mode"], "ran_mode": ss[0].get("ran_mode"), "verify_mode": ss[0].get("verify_mode"),
            "exact": ss[0].get("exact"),
            "runs": len(ok), "timed_out": sum(bool(s.get("timed_out")) for s in ok),
            "skipped": sum(bool(s.get("skipped")) for s in ss),
            "errors": sum(bool(s.get("error")) for s in ss),
            "error": next((s["error"] for s in ss if s.get("error")), None),
        }, ok


def ratio(x: float | None, base: float | None) -> float | None:
    """x / base, None where either is missing or base is 0."""
    return x / base if x is not None and base else None


# (metric, its ratio over the fastest cloud alone of the same cell and temperature): ratios of medians. The names keep
# "cloud" for the baseline: the faster of the `cloud` column and the `llama.cpp` column, metric by metric
SPEEDUPS = (("tokens_per_s", "speedup_vs_cloud"), ("decode_tokens_per_s", "decode_speedup_vs_cloud"))


def aggregate(samples: Sequence[dict[str, Any]], keys: Sequence[str] = METRICS) -> list[dict[str, Any]]:
    """One row per (temperature, cell, column): the median of each metric over its runs (timed-out runs
    included, at the rate of the part they completed), with counts, and the ratio of the end-to-end and the
    decode rate's medians over the fastest cloud alone of the same cell and temperature (the `cloud` and `llama.cpp`
    columns, the faster of them per metric; `baseline` names the one the decode rate is taken against), and the
    cloud compute per token over that baseline's (`cloud_cost_vs_cloud`: what an operator pays, below 1 is cheaper)."""
    rows = []
    for row, ok in cells(samples):
        for k in keys:
            row[k] = median_or_none(s.get(k) for s in ok)
        rows.append(row)
    baselines: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        if r["mode"] in BASELINE_MODES:
            baselines.setdefault((r["temperature"], r["rtt_ms"], r["mbit"]), []).append(r)
    for r in rows:
        bases = baselines.get((r["temperature"], r["rtt_ms"], r["mbit"]), [])
        for k, name in SPEEDUPS:
            r[name] = ratio(r.get(k), max((b[k] for b in bases if b.get(k) is not None), default=None))
        fastest = max((b for b in bases if b.get("decode_tokens_per_s") is not None),
                      key=lambda b: b["decode_tokens_per_s"], default={})
        r["baseline"] = fastest.get("column")
        r["cloud_cost_vs_cloud"] = ratio(r.get("cloud_ms_per_token"), fastest.get("cloud_ms_per_token"))
    return rows


def by_temperature(rows: Sequence[dict[str, Any]]) -> dict[float | None, list[dict[str, Any]]]:
    """Rows split into the report's blocks, one per temperature, in first-seen order."""
    blocks: dict[float | None, list[dict[str, Any]]] = {}
    for r in rows:
        blocks.setdefault(r.get("temperature"), []).append(r)
    return blocks


# ----------------------------------------------------------------------------------------------- CSV

def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Rows of dicts as CSV: columns in first-seen order, None as empty, floats to 6 significant digits,
    nested values as JSON."""
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]

    def cell(v: Any) -> Any:
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.6g}"
        if isinstance(v, (dict, list, tuple)):
            return json.dumps(v)
        return v

    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: cell(r.get(k)) for k in fields})


# ----------------------------------------------------------------------------------------------- Markdown tables

def markdown_table(head: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """A padded Markdown table (same look as bench/verify.py's)."""
    w = [max(len(x) for x in col) for col in zip(head, *body)]
    line = lambda row: "| " + " | ".join(c.ljust(n) for c, n in zip(row, w)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (n + 2) for n in w) + "|"] + [line(r) for r in body])


def fmt(v: Any, f: str = "{:.2f}") -> str:
    return "-" if v is None else f.format(v)


def rate_cell(r: dict[str, Any] | None, with_speedup: bool = True) -> str:
    """tokens/s of one (cell, column) with its speedup over cloud; † timed out, 'skip' or 'error'."""
    if r is None:
        return "-"
    if r["runs"] == 0:
        return "error" if r["errors"] else "skip" if r["skipped"] else "-"
    s = fmt(r["tokens_per_s"]) + ("†" if r["timed_out"] else "")
    if with_speedup and r.get("speedup_vs_cloud") is not None and r["mode"] != "cloud":
        s += f" ({r['speedup_vs_cloud']:.2f}x)"
    return s


def column_title(label: str, rows: Sequence[dict[str, Any]]) -> str:
    r = next((x for x in rows if x["column"] == label), None)
    return label + (" APPROX." if r is not None and r.get("exact") is False and r["mode"] != "edge" else "")


def pivot_table(rows: Sequence[dict[str, Any]], labels: Sequence[str]) -> str:
    """Rows: network conditions; columns: modes; cells: median tokens/s (speedup over cloud)."""
    by = {(r["rtt_ms"], r["mbit"], r["column"]): r for r in rows}
    conds = list(dict.fromkeys((r["rtt_ms"], r["mbit"]) for r in rows))
    head = ["RTT ms (measured)", "bandwidth"] + [column_title(lb, rows) for lb in labels]
    body = []
    for rtt, mbit in conds:
        meas = next((r["rtt_measured_ms"] for r in rows if (r["rtt_ms"], r["mbit"]) == (rtt, mbit)), None)
        body.append([f"{fmt_num(rtt)} ({fmt(meas, '{:.1f}')})", bw_name(mbit)]
                    + [rate_cell(by.get((rtt, mbit, lb))) for lb in labels])
    return markdown_table(head, body)


def status(r: dict[str, Any]) -> str | None:
    """What stands in a row with no completed run ('error', 'skip', '-'); None where there are runs."""
    if r["runs"]:
        return None
    return "error" if r["errors"] else "skip" if r["skipped"] else "-"


def main_table(rows: Sequence[dict[str, Any]], labels: Sequence[str]) -> str:
    """The sweep's main table, one temperature: per cell and column the medians of the decode rate (after the
    first token), TTFT and the end-to-end rate, with the decode and end-to-end ratios over cloud side by side:
    start-up (TTFT) and steady decoding are different costs, and one end-to-end figure hides which one moved."""
    by = {(r["rtt_ms"], r["mbit"], r["column"]): r for r in rows}
    head = ["RTT ms (measured)", "bandwidth", "column", "decode tok/s", "TTFT s", "e2e tok/s", "decode x fastest alone",
            "e2e x fastest alone", "cloud ms/token", "cloud cost x alone"]
    body = []
    for rtt, mbit in dict.fromkeys((r["rtt_ms"], r["mbit"]) for r in rows):
        meas = next((r["rtt_measured_ms"] for r in rows if (r["rtt_ms"], r["mbit"]) == (rtt, mbit)), None)
        for lb in labels:
            r = by.get((rtt, mbit, lb))
            if r is None:
                continue
            cut = "†" if r["timed_out"] else ""
            figs = ([status(r)] * 7 if status(r) else
                    [fmt(r.get("decode_tokens_per_s")) + cut, fmt(r.get("ttft_s"), "{:.3f}"), fmt(r.get("tokens_per_s")) + cut,
                     fmt(r.get("decode_speedup_vs_cloud"), "{:.2f}x"), fmt(r.get("speedup_vs_cloud"), "{:.2f}x"),
                     fmt(r.get("cloud_ms_per_token"), "{:.1f}"), fmt(r.get("cloud_cost_vs_cloud"), "{:.2f}x")])
            body.append([f"{fmt_num(rtt)} ({fmt(meas, '{:.1f}')})", bw_name(mbit), column_title(lb, rows), *figs])
    return markdown_table(head, body)


def bytes_table(rows: Sequence[dict[str, Any]], labels: Sequence[str]) -> str:
    """Bytes up/down per generated token per column (median over cells: they hardly depend on the network)."""
    body = []
    for lb in labels:
        rs = [r for r in rows if r["column"] == lb and r["runs"]]
        body.append([column_title(lb, rows), fmt(median_or_none(r["bytes_up_per_token"] for r in rs), "{:,.1f}"),
                     fmt(median_or_none(r["bytes_down_per_token"] for r in rs), "{:,.1f}"),
                     fmt(median_or_none(r["acceptance_rate"] for r in rs), "{:.3f}"),
                     fmt(median_or_none(r["mean_accepted_len"] for r in rs)),
                     fmt(median_or_none(r["mean_draft_len"] for r in rs))])
    return markdown_table(["column", "B up/token", "B down/token", "acceptance", "mean acc. len", "mean draft len"], body)


def detail_table(rows: Sequence[dict[str, Any]]) -> str:
    cols = [("tokens_per_s", "{:.2f}"), ("speedup_vs_cloud", "{:.2f}"), ("decode_tokens_per_s", "{:.2f}"),
            ("decode_speedup_vs_cloud", "{:.2f}"), ("ttft_s", "{:.2f}"), ("itl_p50_s", "{:.3f}"),
            ("itl_p95_s", "{:.3f}"), ("acceptance_rate", "{:.3f}"), ("mean_accepted_len", "{:.2f}"),
            ("mean_draft_len", "{:.2f}"), ("bytes_up_per_token", "{:,.0f}"), ("bytes_down_per_token", "{:,.0f}"),
            ("edge_busy_fraction", "{:.2f}"), ("cloud_busy_fraction", "{:.2f}"), ("wasted_draft_tokens", "{:.0f}"),
            ("cloud_tokens", "{:.0f}"), ("hint_hit_rate", "{:.2f}")]
    head = ["RTT ms", "bandwidth", "column", "runs", "tok/s", "x cloud", "decode tok/s", "decode x cloud", "TTFT s",
            "ITL p50 s", "ITL p95 s", "accept.", "acc. len", "draft len", "B up/tok", "B down/tok", "edge busy", "cloud busy", "wasted", "cloud tok", "hint hit"]
    body = [[fmt_num(r["rtt_ms"]), bw_name(r["mbit"]), r["column"], f"{r['runs']}" + (f" ({r['timed_out']}†)" if r["timed_out"] else "")]
            + [fmt(r.get(k), f) for k, f in cols] for r in rows]
    return markdown_table(head, body)


# ----------------------------------------------------------------------------------------------- plots

def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or None where matplotlib is not installed (then no plots)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_sweep(rows: Sequence[dict[str, Any]], labels: Sequence[str], out: Path, title: str,
               name: str = "sweep") -> list[Path]:
    plt = pyplot()
    if plt is None:
        return []
    written = []
    bws = list(dict.fromkeys(r["mbit"] for r in rows))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ok = [r for r in rows if r["runs"] and r["tokens_per_s"] is not None]

    def per_bw(key: str, ylabel: str, fname: str, skip_cloud: bool = False, log: bool = False) -> None:
        fig, axes = plt.subplots(1, len(bws), figsize=(4.2 * len(bws), 3.8), sharey=True, squeeze=False)
        for ax, bw in zip(axes[0], bws):
            for i, lb in enumerate(labels):
                pts = sorted((r["rtt_ms"], r[key]) for r in ok if r["mbit"] == bw and r["column"] == lb
                             and r.get(key) is not None and not (skip_cloud and r["mode"] == "cloud"))
                if pts:  # one colour per column in every figure
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=lb, color=colors[i % len(colors)])
            if skip_cloud:
                ax.axhline(1.0, color="grey", lw=0.8, ls="--")
            ax.set_title(bw_name(bw))
            ax.set_xlabel("RTT (ms)")
            if log:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel(ylabel)
        axes[0][-1].legend(fontsize=8)
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        written.append(out / fname)

    per_bw("tokens_per_s", "tokens/s (median)", f"{name}_tps_vs_rtt.png")
    per_bw("speedup_vs_cloud", "speedup over the fastest cloud alone", f"{name}_speedup.png", skip_cloud=True)
    written.append(_plot_bytes(plt, ok, labels, out / f"{name}_bytes.png"))
    return written


def _plot_bytes(plt: Any, ok: Sequence[dict[str, Any]], labels: Sequence[str], path: Path) -> Path:
    """Bars of wire bytes up and down per generated token per column (median over cells)."""
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(labels)), 4))
    xs = range(len(labels))
    up = [median_or_none(r["bytes_up_per_token"] for r in ok if r["column"] == lb) for lb in labels]
    down = [median_or_none(r["bytes_down_per_token"] for r in ok if r["column"] == lb) for lb in labels]
    ax.bar([i - 0.2 for i in xs], [u or 0 for u in up], 0.4, label="up")
    ax.bar([i + 0.2 for i in xs], [d or 0 for d in down], 0.4, label="down")
    ax.set_yscale("symlog", linthresh=1)
    ax.set_xticks(list(xs), list(labels), rotation=20)
    ax.set_ylabel("bytes per generated token")
    ax.set_title("Wire bytes per generated token (median over cells)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cell_name(r: dict[str, Any]) -> str:
    return f"RTT {fmt_num(r['rtt_ms'])} ms\n{bw_name(r['mbit'])}"


def temperature_name(t: float | None) -> str:
    return "T as configured" if t is None else f"T={t:g}"


def plot_bars_per_cell(blocks: dict[float | None, list[dict[str, Any]]], labels: Sequence[str], key: str,
                       ylabel: str, path: Path, title: str, skip_cloud: bool = False) -> Path | None:
    """Grouped bars, one panel per temperature: a group per cell, a bar per column (one colour per column in
    every panel). skip_cloud: for ratios over cloud, which is 1 by definition (a dashed line instead)."""
    plt = pyplot()
    if plt is None:
        return None
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    shown = [lb for lb in labels if not (skip_cloud and any(r["column"] == lb and r["mode"] == "cloud"
                                                           for rs in blocks.values() for r in rs))]
    n_cells = max(len({(r["rtt_ms"], r["mbit"]) for r in rows}) for rows in blocks.values())
    panel_w = max(4.5, 1.0 + 0.3 * n_cells * max(1, len(shown)))
    fig, axes = plt.subplots(1, len(blocks), figsize=(panel_w * len(blocks), 4.2), sharey=True, squeeze=False)
    width = 0.8 / max(1, len(shown))
    for ax, (t, rows) in zip(axes[0], blocks.items()):
        conds = list(dict.fromkeys((r["rtt_ms"], r["mbit"]) for r in rows))
        for i, lb in enumerate(shown):
            vals = [next((r.get(key) for r in rows if (r["rtt_ms"], r["mbit"], r["column"]) == (*c, lb) and r["runs"]),
                         None) for c in conds]
            ax.bar([j + (i - (len(shown) - 1) / 2) * width for j in range(len(conds))], [v or 0 for v in vals], width,
                   label=lb, color=colors[labels.index(lb) % len(colors)])
        if skip_cloud:
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xticks(range(len(conds)), [cell_name({"rtt_ms": c[0], "mbit": c[1]}) for c in conds], fontsize=8)
        ax.set_title(temperature_name(t))
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------- the sweep's files

def block_name(name: str, t: float | None, n_blocks: int) -> str:
    """File stem of one temperature's per-block plots: the plain name when there is one block (as before)."""
    return name if n_blocks == 1 or t is None else f"{name}_T{t:g}"


def report_title(settings: dict[str, Any]) -> str:
    temps = settings.get("temperatures", settings.get("temperature"))
    labels = settings.get("prompt_labels")
    prompts = f"{settings['prompts']} prompt(s)" + (f" ({', '.join(labels)})" if labels else "")
    return (f"{settings['target']} <- {settings['draft']}, {settings['max_new_tokens']} tokens, T={temps}, "
            f"{prompts} x {settings['runs']} run(s)")


NOTES = ("decode tok/s: the rate after the first token; TTFT: time to the first token; e2e tok/s: generated "
         "tokens over the whole wall time. x fastest alone (x cloud in the detail table): the ratio of this column's "
         "median to the fastest cloud alone's in the same cell, the faster of `cloud` (the project's target alone) "
         "and `llama.cpp` (llama.cpp running the target's GGUF alone on the cloud's core, no network) "
         "(ratio of medians over prompts x runs). cloud ms/token: the cloud's compute (passes and decode steps, "
         "prefill apart) per generated token; cloud cost x alone: that over the fastest cloud alone's. † a run exceeded the run timeout: the rate over the part it "
         "completed. skip: not run, it timed out in an easier cell. APPROX.: not lossless (split-topk; the draft "
         "alone). `default`: the edge with no overrides (EdgeConfig's defaults).")


def default_notes(rows: Sequence[dict[str, Any]]) -> list[str]:
    """What each `default` column ran (its settings are whatever EdgeConfig's defaults were), one line each."""
    seen = dict.fromkeys((r["column"], r.get("ran_mode"), r.get("verify_mode")) for r in rows
                         if r["mode"] == "default" and r["runs"])
    return [f"`{lb}` ran mode {m}" + (f", verify {v}" if v else "") + " (the edge's defaults)." for lb, m, v in seen]


def report_markdown(name: str, settings: dict[str, Any], labels: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    """The sweep's Markdown: a block per temperature (main table, bytes, details)."""
    where = ("both sides on plain loopback, unshaped (--no-netns)" if settings.get("no_netns")
             else "each side in its own namespace on its own core")
    cpu = f" llama.cpp's CPU code: {settings['llama_cpp_cpu']}." if settings.get("llama_cpp_cpu") else ""
    parts = [f"# picospec-bench {name.replace('_', ' ')}\n\n{report_title(settings)}; medians, {where}.{cpu}", NOTES,
             *default_notes(rows)]
    if settings.get("interrupted"):
        parts.append(f"**Incomplete**: stopped early ({settings['interrupted']}).")
    for t, rs in by_temperature(rows).items():
        tn = temperature_name(t)
        parts += [f"## {tn}\n\n" + main_table(rs, labels), f"### Bytes on the wire ({tn})\n\n" + bytes_table(rs, labels),
                  f"### Details ({tn}, medians)\n\n" + detail_table(rs)]
    return "\n\n".join(parts) + "\n"


def write_plots(name: str, settings: dict[str, Any], labels: Sequence[str], rows: Sequence[dict[str, Any]],
                out: Path) -> list[Path]:
    """Per temperature the RTT and bytes plots; across temperatures decode-rate speedup and TTFT per cell."""
    blocks, title = by_temperature(rows), report_title(settings)
    pngs: list[Path] = []
    for t, rs in blocks.items():
        pngs += plot_sweep(rs, labels, out, f"{title}; {temperature_name(t)}", block_name(name, t, len(blocks)))
    pngs.append(plot_bars_per_cell(blocks, labels, "decode_speedup_vs_cloud", "decode rate / fastest alone's",
                                   out / f"{name}_decode_speedup.png",
                                   f"Decode rate over the fastest cloud alone\n{title}",
                                   skip_cloud=True))
    pngs.append(plot_bars_per_cell(blocks, labels, "ttft_s", "time to first token (s, median)", out / f"{name}_ttft.png",
                                   f"Time to first token\n{title}"))
    return [x for x in pngs if x is not None]


def write_sweep_report(name: str, settings: dict[str, Any], cols: Sequence[Column], rows: list[dict[str, Any]],
                       samples: list[dict[str, Any]], out: Path) -> None:
    """OUT/NAME.json (settings, columns, rows, every run), NAME.csv, NAME_runs.csv, NAME.md and the plots;
    prints the main tables and what was written."""
    labels = [c.label for c in cols]
    (out / f"{name}.json").write_text(json.dumps({"settings": settings, "columns": [asdict(c) for c in cols],
                                                  "rows": rows, "runs": samples}, indent=1, default=str))
    write_csv(rows, out / f"{name}.csv")
    write_csv([{k: v for k, v in s.items() if k not in ("stats", "extra")} for s in samples], out / f"{name}_runs.csv")
    (out / f"{name}.md").write_text(report_markdown(name, settings, labels, rows))
    for t, rs in by_temperature(rows).items():
        print(f"{temperature_name(t)}\n{main_table(rs, labels)}\n")
    pngs = write_plots(name, settings, labels, rows, out)
    files = [out / f"{name}.json", out / f"{name}.csv", out / f"{name}_runs.csv", out / f"{name}.md", *pngs]
    print(f"wrote {', '.join(str(x) for x in files)}")
