"""picospec-bench pipeline: measured tokens/s of every mode beside what the performance model (docs/design.md
§5) predicts from the same run's measured component times (issue 4).

Same testbed as `picospec-bench sweep` (cloud and edge in their own namespaces on their own cores, a kernel-
shaped link between them, the link's RTT measured by TCP ping-pong). Default: the default pair, RTT 0, 50 and
200 ms, unshaped bandwidth; columns cloud, edge, sync (dense), early-exit, picospec (APPROXIMATE) and pipeline
with the best exact verification (--pipeline-verify, default coupled; adaptive draft length).

The model, per run, from that run's own measurements: a = per-token acceptance, accepted drafts over accepted
drafts plus rejections (what the i.i.d. model means; the stats' acceptance_rate also counts the drafts sent
after a rejection as failures); g = mean draft length; t_draft = edge seconds per draft token made; t_verify =
cloud seconds per verification pass; t_rtt = the link's measured RTT plus, on a rate-limited link, the round's
bytes at that rate:
- cloud: 1 / t_decode (the cloud's seconds per token; tokens stream, only the first one waits a round trip);
- edge: 1 / t_draft;
- sync: stop_and_wait_rate(a, g, t_draft, t_rtt, t_verify);
- early-exit: the same, with the drafting of tokens pre-drafted from hints (made while waiting) taken off the
  round: t_draft * (1 - predrafted_used / drafted). `model_spec` keeps the plain formula's figure;
- pipeline, picospec: pipelined_rate(a, g, t_draft, t_rtt, t_verify); where the cloud decoded some tokens on
  its own (decode-ahead, `coupled`/greedy) those are charged at t_decode: rate = 1 / (s * t_decode + (1 - s) /
  pipelined_rate), s = the cloud's share of the tokens (= the plain figure when s = 0).
The model is a steady-state rate (no prefill), so it is compared with the measured decode rate (tokens after
the first one over the time after it); cells more than --flag-pct apart are flagged.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from picospec.bench.grid import Column, Condition, fmt_num, grid, parse_columns, parse_floats, pick_prompts
from picospec.bench.options import add_common_args, settings_from, settings_json
from picospec.bench.report import cells, fmt, markdown_table, median_or_none, pyplot, write_csv
from picospec.bench.runner import keep_partial, run_grid
from picospec.bench.testbed import Testbed
from picospec.shared.perf_model import pipelined_rate, stop_and_wait_rate

DEFAULT_RTTS = "0,50,200"


def default_columns(pipeline_verify: str) -> str:
    return f"cloud,edge,sync,early-exit,picospec,pipeline:{pipeline_verify}"


# ----------------------------------------------------------------------------------------------- the model (pure)

@dataclass(frozen=True)
class Components:
    """Measured component times of one run, in seconds."""

    mode: str
    rtt_s: float                    # the link's measured RTT
    net_s: float = 0.0              # transfer time of one round's bytes at the link's rate (0 when unshaped)
    t_draft: float | None = None    # edge seconds per draft token made
    t_verify: float | None = None   # cloud seconds per verification pass (at the mean draft length)
    t_decode: float | None = None   # cloud seconds per token decoded on its own
    a: float | None = None          # acceptance rate
    g: float | None = None          # mean draft length (drafts per verification round)
    predrafted_share: float = 0.0   # early-exit: share of sent drafts made ahead from a hint
    cloud_share: float = 0.0        # pipeline decode-ahead: share of tokens the cloud decoded alone


def interp_cost(verify_at: dict[str, float | None] | None, g: float) -> float | None:
    """The cloud's fitted cost of one pass with g drafts (g may be fractional): linear between integers."""
    if not verify_at:
        return None
    lo, hi = math.floor(g), math.ceil(g)
    a, b = verify_at.get(str(lo)), verify_at.get(str(hi))
    if a is None or b is None:
        return None
    return a + (b - a) * (g - lo)


def components(rec: dict[str, Any], rtt_s: float, mbit: float | None) -> Components:
    """The model's inputs from one run record (stats + the worker's `extra` component times)."""
    st, ex, mode = rec.get("stats") or {}, rec.get("extra") or {}, rec.get("ran_mode") or rec["mode"]
    gen = st.get("generated_tokens") or 0
    if mode == "cloud":
        return Components(mode, rtt_s, t_decode=ex["cloud_s"] / gen if gen else None)
    if mode == "edge":
        return Components(mode, rtt_s, t_draft=ex["draft_s"] / gen if gen else None)
    made, rounds, sent = st.get("draft_tokens_made") or 0, st.get("rounds") or 0, st.get("drafted_tokens") or 0
    cloud_tokens = st.get("cloud_tokens") or 0
    g = st.get("mean_draft_len")
    t_draft = ex["draft_s"] / made if made else None
    if cloud_tokens:  # passes of two kinds (verify, decode): the cost per size tells them apart
        t_decode = interp_cost(ex.get("verify_at"), 0)
        t_verify = (interp_cost(ex.get("verify_at"), g) if g else None) or ex["cloud_s"] / max(1, rounds + cloud_tokens)
    else:
        t_decode = None
        t_verify = ex["cloud_s"] / rounds if rounds else None
    net = 0.0
    if mbit and rounds:
        net = 8.0 * ((st.get("bytes_up") or 0) + (st.get("bytes_down") or 0)) / rounds / (mbit * 1e6)
    a = ex.get("acceptance_iid")  # per-token, as the model means it (see bench.edge_worker._run_one)
    return Components(mode, rtt_s, net, t_draft, t_verify, t_decode, st.get("acceptance_rate") if a is None else a, g,
                      predrafted_share=(st.get("predrafted_used") or 0) / sent if sent else 0.0,
                      cloud_share=cloud_tokens / gen if gen else 0.0)


def _inv(x: float | None) -> float | None:
    return 1.0 / x if x else None


def predict(c: Components) -> dict[str, Any]:
    """{model: tokens/s the model gives for this run, model_spec: the plain figure of docs/design.md §5,
    how: which formula}."""
    if c.mode == "cloud":
        r = _inv(c.t_decode)
        return {"model": r, "model_spec": r, "how": "1/t_decode"}
    if c.mode == "edge":
        r = _inv(c.t_draft)
        return {"model": r, "model_spec": r, "how": "1/t_draft"}
    t_rtt = c.rtt_s + c.net_s
    if c.a is None or not c.g or c.t_draft is None or c.t_verify is None:
        # no verification rounds: the pipeline let the cloud decode alone (draft length 0)
        r = _inv(c.t_decode) if c.cloud_share else None
        return {"model": r, "model_spec": None, "how": "1/t_decode (no rounds)" if r else "no data"}
    if c.mode in ("sync", "early-exit"):
        spec = stop_and_wait_rate(c.a, c.g, c.t_draft, t_rtt, c.t_verify)
        if c.mode == "early-exit" and c.predrafted_share > 0:
            adj = stop_and_wait_rate(c.a, c.g, c.t_draft * (1.0 - c.predrafted_share), t_rtt, c.t_verify)
            return {"model": adj, "model_spec": spec, "how": "stop-and-wait, hint pre-drafts off the round"}
        return {"model": spec, "model_spec": spec, "how": "stop-and-wait"}
    spec = pipelined_rate(c.a, c.g, c.t_draft, t_rtt, c.t_verify)
    if c.cloud_share > 0 and c.t_decode:
        mix = 1.0 / (c.cloud_share * c.t_decode + (1.0 - c.cloud_share) / spec)
        return {"model": mix, "model_spec": spec, "how": "pipelined + decode-ahead share at t_decode"}
    return {"model": spec, "model_spec": spec, "how": "pipelined"}


def deviation(measured: float | None, model: float | None) -> float | None:
    """model / measured - 1 (positive: the model is optimistic)."""
    if not measured or model is None:
        return None
    return model / measured - 1.0


def annotate(samples: Sequence[dict[str, Any]], links: dict[Condition, dict[str, Any]]) -> None:
    """Add the components and the model's figures to every run record (in place)."""
    for s in samples:
        if s.get("skipped") or s.get("error"):
            continue
        cond = Condition(s["rtt_ms"], s["mbit"])
        meas = links.get(cond, {}).get("rtt_measured_ms")
        rtt_s = (meas if meas is not None else s["rtt_ms"]) / 1000.0
        c = components(s, rtt_s, s["mbit"])
        s["components"] = asdict(c)
        m = predict(c)
        s.update({"model_tokens_per_s": m["model"], "model_spec_tokens_per_s": m["model_spec"], "model_how": m["how"]})


def summarize(samples: Sequence[dict[str, Any]], flag_pct: float) -> list[dict[str, Any]]:
    """One row per (cell, column): medians of measured and modelled rates and of the model's inputs."""
    rows = []
    for row, ok in cells(samples):
        comp = lambda k: median_or_none((s.get("components") or {}).get(k) for s in ok)  # noqa: E731
        row |= {
            "tokens_per_s": median_or_none(s.get("tokens_per_s") for s in ok),
            "decode_tokens_per_s": median_or_none(s.get("decode_tokens_per_s") for s in ok),
            "model_tokens_per_s": median_or_none(s.get("model_tokens_per_s") for s in ok),
            "model_spec_tokens_per_s": median_or_none(s.get("model_spec_tokens_per_s") for s in ok),
            "model_how": next((s.get("model_how") for s in ok if s.get("model_how")), None),
            "a": comp("a"), "g": comp("g"), "t_draft_s": comp("t_draft"), "t_verify_s": comp("t_verify"),
            "t_decode_s": comp("t_decode"), "net_s": comp("net_s"), "cloud_share": comp("cloud_share"),
            "predrafted_share": comp("predrafted_share"),
            "mean_accepted_len": median_or_none(s.get("mean_accepted_len") for s in ok),
        }
        row["deviation"] = deviation(row["decode_tokens_per_s"], row["model_tokens_per_s"])
        row["flag"] = row["deviation"] is not None and abs(row["deviation"]) > flag_pct / 100.0
        rows.append(row)
    return rows


def format_table(rows: Sequence[dict[str, Any]], flag_pct: float) -> str:
    head = ["column", "RTT ms (meas.)", "bandwidth", "tok/s", "decode tok/s", "model tok/s", "model/meas.", "",
            "a", "g", "t_draft ms", "t_verify ms", "t_decode ms", "cloud share"]
    body = []
    for r in rows:
        dev = r["deviation"]
        if not r["runs"]:
            body.append([r["column"], fmt_num(r["rtt_ms"]), "-", "error" if r["error"] else "skip"] + ["-"] * 10)
            continue
        ms = lambda k: fmt(r[k] * 1000 if r[k] is not None else None, "{:.0f}")  # noqa: E731
        body.append([
            r["column"] + (" APPROX." if r["exact"] is False and r["mode"] != "edge" else ""),
            f"{fmt_num(r['rtt_ms'])} ({fmt(r['rtt_measured_ms'], '{:.1f}')})",
            "unshaped" if not r["mbit"] else f"{fmt_num(r['mbit'])} Mbit/s",
            fmt(r["tokens_per_s"]) + ("†" if r["timed_out"] else ""), fmt(r["decode_tokens_per_s"]),
            fmt(r["model_tokens_per_s"]), fmt(None if dev is None else 1 + dev),
            f"<- >{flag_pct:g}%" if r["flag"] else "",
            fmt(r["a"], "{:.3f}"), fmt(r["g"]), ms("t_draft_s"), ms("t_verify_s"), ms("t_decode_s"),
            fmt(r["cloud_share"]),
        ])
    return markdown_table(head, body)


def plot(rows: Sequence[dict[str, Any]], labels: Sequence[str], path: Path, title: str) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, lb in enumerate(labels):
        rs = sorted((r for r in rows if r["column"] == lb and r["runs"]), key=lambda r: r["rtt_ms"])
        x = [r["rtt_measured_ms"] if r["rtt_measured_ms"] is not None else r["rtt_ms"] for r in rs]
        c = colors[i % len(colors)]
        ax.plot(x, [r["decode_tokens_per_s"] for r in rs], marker="o", color=c, label=f"{lb} measured")
        ax.plot(x, [r["model_tokens_per_s"] for r in rs], marker="x", ls="--", color=c, label=f"{lb} model")
    ax.set_xlabel("measured RTT (ms)")
    ax.set_ylabel("decode tokens/s (median)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="picospec-bench pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # defaults sized for ~16 minutes on the 2-core development machine with the default pair
    add_common_args(p, rtts=DEFAULT_RTTS, mbits="0", prompts=3, max_new_tokens=48, runs=1)
    p.add_argument("--pipeline-verify", default="coupled", help="verification mode of the pipeline column (default coupled)")
    p.add_argument("--modes", help="columns instead of the default (see picospec-bench sweep --help for the syntax)")
    p.add_argument("--flag-pct", type=float, default=20.0, help="flag cells where model and measurement differ by more")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cols: list[Column] = parse_columns(args.modes or default_columns(args.pipeline_verify))
        conds = grid(parse_floats(args.rtt_ms), parse_floats(args.mbit))
    except ValueError as e:
        p.error(str(e))
    if args.no_netns and any(c.rtt_ms or c.mbit for c in conds):
        p.error("--no-netns is plain loopback: only --rtt-ms 0 --mbit 0")
    prompts = pick_prompts(args.prompts)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    links: dict[Condition, dict[str, Any]] = {}
    t0 = time.perf_counter()
    samples: list[dict[str, Any]] = []
    settings = dict(vars(args))
    with keep_partial(settings), Testbed(settings_from(args), out / "pipeline_logs") as bed:
        settings.update(settings_json(args, bed))
        run_grid(bed, conds, cols, prompts, args.runs, args.seed, samples, on_cell=links.__setitem__,
                 temperatures=[args.temperature])
    settings["elapsed_s"] = time.perf_counter() - t0
    if not samples:
        sys.exit(f"picospec-bench pipeline: nothing measured ({settings.get('interrupted', 'no runs')})")
    annotate(samples, links)
    labels = [c.label for c in cols]
    order = {lb: i for i, lb in enumerate(labels)}
    rows = sorted(summarize(samples, args.flag_pct), key=lambda r: (order[r["column"]], r["mbit"] or 0, r["rtt_ms"]))
    title = (f"{args.target} <- {args.draft}, {args.max_new_tokens} tokens, T={args.temperature:g}, "
             f"{args.prompts} prompt(s) x {args.runs} run(s)")
    table = format_table(rows, args.flag_pct)
    notes = (f"tok/s: end to end (median over runs); decode tok/s: after the first token, what the steady-state "
             f"model predicts; model/meas. compares those two, `<-` marks a difference over {args.flag_pct:g}%. "
             "a: acceptance rate, g: mean draft length, cloud share: tokens the cloud decoded alone (decode-ahead). "
             "† cut at the run timeout. See `picospec-bench pipeline --help` for the formulas.")
    if settings.get("interrupted"):
        notes += f"\n\n**Incomplete**: stopped early ({settings['interrupted']})."
    (out / "pipeline.json").write_text(json.dumps({
        "settings": settings, "columns": [asdict(c) for c in cols], "links": {c.name: v for c, v in links.items()},
        "rows": rows, "runs": samples}, indent=1, default=str))
    write_csv(rows, out / "pipeline.csv")
    (out / "pipeline.md").write_text(f"# picospec-bench pipeline\n\n{title}\n\n{table}\n\n{notes}\n")
    print(table)
    print("\n" + notes)
    png = out / "pipeline.png"
    wrote = plot(rows, labels, png, title)
    print(f"\nwrote {out / 'pipeline.json'}, {out / 'pipeline.csv'}, {out / 'pipeline.md'}" + (f", {png}" if wrote else ""))


if __name__ == "__main__":
    main()
