"""picospec-bench serve: N concurrent edge sessions against one cloud, for N in --sessions (default 1,2,4,8,16),
with the cloud's batched verification on and off, for each edge mode in --mode (default: the speculative
pipeline and the cloud alone, side by side).

One cloud process (`--threads 1`, pinned to --cloud-core, default 0, Prometheus metrics on) per batching
configuration; the edges are session workers (bench/session_worker.py: the EdgeClient API, one client and
channel per session, the draft loaded once per process, one torch thread) pinned to --edge-core (default 1),
--edge-procs processes with the sessions dealt round-robin. For each N every session runs --gens generations
back to back (--ignore-eos semantics: every generation is --max-new-tokens long), each session its own
prompt (the built-in ones in turn) and seed; all sessions start together.

Modes: `--mode pipeline,cloud` (comma-separated); at each N the modes run one after the other on the same cloud
process, so that they meet the same machine. Every mode's row also gives its ratios to `cloud` at the same
batching and N (aggregate rate, per-session p50, cloud compute per token), where `cloud` ran.

Reported per (mode, batching, N): aggregate tokens/s (all tokens generated over the span from the first start to the
last end), per-session decode tokens/s (after the first token) p50 and p95 (and p5, the slow tail) over the
generations, TTFT p50 and p95, and from the cloud's metrics over that N's runs: the mean batch size and tokens
per model pass (the batching engine's histograms; n/a with batching off), drafts and committed tokens per
verification pass of one session, each side's CPU use, and the cloud's compute per generated token (its
picospec_cloud_compute_seconds over picospec_cloud_tokens_emitted: what an operator pays).

Batching: `--batching on,off` (default both) passes `--batching X` (and --max-batch-tokens, --max-wait-ms where
given) to the cloud. The cloud's `--help` is read once at start; a cloud that does not know `--batching` runs
only `off`, without the flag, and the report says so: an `on` column is never made up.

GPU: `--target random:qwen2.5-7b --device cuda --dtype bfloat16 --sessions 1,2,4,8,16,32,64` (the flags go to
the cloud as they are; the edges stay on the CPU core).

Writes OUT/serve.json (settings, rows, every generation), serve.md and serve.png (aggregate and per-session
rate against sessions).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from picospec.bench import fleet as fl
from picospec.bench.grid import DEFAULT_DRAFT, DEFAULT_TARGET, PROMPTS
from picospec.bench.report import fmt, markdown_table, pyplot, ratio
from picospec.bench.runner import Progress
from picospec.shared.config import EDGE_MODES

BATCHING_FLAG = "--batching"
# the batching histograms (cloud_server/metrics.py, observed once per model pass with --batching on): sessions' rows
# and tokens in one pass, and the longest wait of a pass's rows
BATCH_ROWS_METRIC = "picospec_cloud_batch_rows"
BATCH_TOKENS_METRIC = "picospec_cloud_batch_tokens"
BATCH_WAIT_METRIC = "picospec_cloud_batch_wait_seconds"
BATCH_PASS_METRIC = "picospec_cloud_batch_pass_seconds"          # wall time of one pass
BATCH_PASS_CPU_METRIC = "picospec_cloud_batch_pass_cpu_seconds"  # the engine thread's CPU time in it
DRAFTS_METRIC = "picospec_cloud_pass_drafts"
COMMITTED_METRIC = "picospec_cloud_pass_committed_tokens"
COMPUTE_METRIC = "picospec_cloud_compute_seconds_total"  # counters: passes and decode steps, prefill apart
TOKENS_METRIC = "picospec_cloud_tokens_emitted_total"
CAPPED_METRIC = "picospec_cloud_verify_capped_drafts_total"
BASELINE_MODE = "cloud"
STARTUP_S = 1.0  # from sending a run to its sessions' common start: the workers connect every session meanwhile


@dataclass
class ServeConfig:
    target: str = DEFAULT_TARGET
    draft: str = DEFAULT_DRAFT
    sessions: tuple[int, ...] = (1, 2, 4, 8, 16)
    batching: tuple[str, ...] = ("on", "off")
    gens: int = 2                  # generations per session per N
    max_new_tokens: int = 64
    modes: tuple[str, ...] = ("pipeline", BASELINE_MODE)
    verify: str = "coupled"
    temperature: float = 0.0
    seed: int = 0
    edge_procs: int = 4            # edge worker processes (sessions dealt round-robin over them)
    cloud_core: int | None = 0
    edge_core: int | None = 1
    device: str | None = None      # passed to the cloud where given
    engine: str | None = None
    dtype: str | None = None
    max_batch_tokens: int | None = None
    max_wait_ms: float | None = None
    gen_timeout_s: float = 900.0   # one generation's deadline: many sessions share one CPU core's target passes
    run_timeout_s: float = 3600.0  # one N's runs
    out: Path = Path("bench_out/serve")
    quiet: bool = False
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- pure parts

def batching_plan(asked: Sequence[str], supported: bool) -> tuple[list[str], str | None]:
    """The configurations to run and a note: without cloud support only `off` runs (never a made-up `on`)."""
    if supported:
        return list(asked), None
    note = ("the cloud has no --batching flag (batched verification is not in this build): only batching `off` "
            "ran, without the flag; no `on` figures")
    return (["off"] if "off" in asked or "on" in asked else []), note


def cloud_flags(cfg: ServeConfig, batching: str, supported: bool) -> list[str]:
    """What the cloud is started with beyond the common flags: room for every session, batching, device."""
    flags = fl.cloud_limits(max(cfg.sessions), cfg.max_new_tokens)
    if supported:
        flags += [BATCHING_FLAG, batching]
        if cfg.max_batch_tokens is not None:
            flags += ["--max-batch-tokens", str(cfg.max_batch_tokens)]
        if cfg.max_wait_ms is not None:
            flags += ["--max-wait-ms", f"{cfg.max_wait_ms:g}"]
    for flag, value in (("--device", cfg.device), ("--dtype", cfg.dtype), ("--engine", cfg.engine)):
        if value:
            flags += [flag, value]
    return flags


def summarize(records: Sequence[dict[str, Any]], batching: str, n: int, means: dict[str, float | None],
              mode: str = "pipeline") -> dict[str, Any]:
    """One (mode, batching, N) row from its generation records and the cloud's histogram means over its runs."""
    ok = [r for r in records if not r.get("error")]
    tokens = sum(r.get("generated_tokens") or 0 for r in ok)
    span = (max(r["end"] for r in records) - min(r["start"] for r in records)) if records else 0.0
    decode = [r.get("decode_tokens_per_s") for r in ok]
    ttft = [r.get("ttft_s") for r in ok]
    return {
        "mode": mode, "batching": batching, "sessions": n, "generations": len(records), "failures": len(records) - len(ok),
        "errors": sorted({r["error"] for r in records if r.get("error")})[:5],
        "tokens": tokens, "span_s": span, "aggregate_tokens_per_s": tokens / span if span > 0 else None,
        "decode_tokens_per_s_p5": fl.percentile(decode, 0.05), "decode_tokens_per_s_p50": fl.percentile(decode, 0.5),
        "decode_tokens_per_s_p95": fl.percentile(decode, 0.95),
        "ttft_s_p50": fl.percentile(ttft, 0.5), "ttft_s_p95": fl.percentile(ttft, 0.95),
        "e2e_tokens_per_s_p50": fl.percentile([r.get("tokens_per_s") for r in ok], 0.5),
        # None where the cloud observed no batched pass (batching off, or a cloud without the histograms)
        "mean_batch_size": means.get(BATCH_ROWS_METRIC), "tokens_per_pass": means.get(BATCH_TOKENS_METRIC),
        "batch_wait_s": means.get(BATCH_WAIT_METRIC),
        "drafts_per_pass": means.get(DRAFTS_METRIC), "committed_per_pass": means.get(COMMITTED_METRIC),
        "cloud_histogram_means": means,
    }


def cloud_cost(deltas: dict[str, tuple[float, float]]) -> dict[str, float | None]:
    """The cloud's compute per generated token over a run (ms), and the drafts its budget kept out of passes."""
    compute, _ = deltas.get(COMPUTE_METRIC, (0.0, 0.0))
    tokens, _ = deltas.get(TOKENS_METRIC, (0.0, 0.0))
    return {"cloud_ms_per_token": 1e3 * compute / tokens if tokens else None,
            "capped_drafts": deltas.get(CAPPED_METRIC, (0.0, 0.0))[0]}


def compare_to_baseline(rows: Sequence[dict[str, Any]]) -> None:
    """Add each row's ratios to the cloud alone's row at the same batching and N (aggregate rate, per-session p50,
    cloud compute per token); None where the cloud alone did not run or a figure is missing."""
    base = {(r["batching"], r["sessions"]): r for r in rows if r["mode"] == BASELINE_MODE}
    for r in rows:
        b = base.get((r["batching"], r["sessions"]), {})
        r["aggregate_x_cloud"] = ratio(r["aggregate_tokens_per_s"], b.get("aggregate_tokens_per_s"))
        r["p50_x_cloud"] = ratio(r["decode_tokens_per_s_p50"], b.get("decode_tokens_per_s_p50"))
        r["cloud_cost_x_cloud"] = ratio(r.get("cloud_ms_per_token"), b.get("cloud_ms_per_token"))


def table(rows: Sequence[dict[str, Any]]) -> str:
    head = ["mode", "batching", "sessions", "gens", "fail", "aggregate tok/s", "x cloud", "decode tok/s p50",
            "x cloud", "p95", "p5", "TTFT p50 s", "TTFT p95 s", "cloud ms/token", "x cloud", "mean batch",
            "tokens/pass", "drafts/pass", "committed/pass", "cloud CPU", "edge CPU", "engine busy",
            "cloud ms/token beside passes"]
    body = [[r.get("mode", "-"), r["batching"], str(r["sessions"]), str(r["generations"]), str(r["failures"]),
             fmt(r["aggregate_tokens_per_s"]), fmt(r.get("aggregate_x_cloud")), fmt(r["decode_tokens_per_s_p50"]),
             fmt(r.get("p50_x_cloud")), fmt(r["decode_tokens_per_s_p95"]),
             fmt(r["decode_tokens_per_s_p5"]), fmt(r["ttft_s_p50"], "{:.3f}"), fmt(r["ttft_s_p95"], "{:.3f}"),
             fmt(r.get("cloud_ms_per_token"), "{:.1f}"), fmt(r.get("cloud_cost_x_cloud")), _na(r["mean_batch_size"]), _na(r["tokens_per_pass"]),
             fmt(r["drafts_per_pass"]), fmt(r["committed_per_pass"]), fmt(r.get("cloud_cpu_util")),
             fmt(r.get("edge_cpu_util")), _na(r.get("engine_busy")), _na(r.get("cloud_ms_per_token_beside_passes"))]
            for r in rows]
    return markdown_table(head, body)


def _na(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


NOTES = ("aggregate tok/s: every token generated at that N over the span from the first generation's start to the "
         "last one's end. x cloud: the ratio to the `cloud` mode's row (the cloud alone) at the same batching and N. "
         "cloud ms/token: the cloud's model time in passes and decode steps (prefill apart) per generated token. decode tok/s: one generation's rate after its first token; p50/p95/p5 over all generations "
         "at that N (p5 is the slow tail). TTFT: from the request to the first token (admission and prefill "
         "included). mean batch, tokens/pass: sessions' rows and tokens per model pass of the batching engine "
         f"({BATCH_ROWS_METRIC}, {BATCH_TOKENS_METRIC}; n/a: no batched pass, as with batching off). drafts/pass, "
         "committed/pass: per verification pass of one session "
         f"({DRAFTS_METRIC}, {COMMITTED_METRIC}), means over that N's runs. cloud CPU, edge CPU: CPU seconds per "
         "second of the cloud process and of all edge processes over that N's runs (1.00 = a whole core: that side "
         "is the bottleneck). engine busy: the batching engine's time in passes per second of the generations' span "
         f"({BATCH_PASS_METRIC}; 1.00 = the model is the bottleneck). cloud ms/token beside passes: the cloud's CPU "
         f"time outside the engine thread's passes ({BATCH_PASS_CPU_METRIC}) per generated token: the session code, "
         "gRPC, the batcher and sampling, what would bound the cloud if passes were free (n/a: batching off).")


def report_markdown(settings: dict[str, Any], rows: Sequence[dict[str, Any]]) -> str:
    s = settings
    parts = [f"# picospec-bench serve\n\n{s['target']} <- {s['draft']}; modes {', '.join(s['modes'])} ({s['verify']}), "
             f"T={s['temperature']:g}, {s['max_new_tokens']} tokens x {s['gens']} generation(s) per session; "
             f"cloud on core {s['cloud_core']}, {s['edge_procs_used']} edge process(es) on core {s['edge_core']}.",
             NOTES, *[f"**Note**: {n}" for n in s.get("notes", [])], table(rows)]
    return "\n\n".join(parts) + "\n"


def plot(rows: Sequence[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Left: aggregate tokens/s against sessions; middle: per-session decode rate p50 (bars p5..p95); right: the
    cloud's compute per generated token. A line per (mode, batching)."""
    plt = pyplot()
    if plt is None:
        return None
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(14, 4))
    for mode, batching in dict.fromkeys((r.get("mode", "-"), r["batching"]) for r in rows):
        rs = sorted((r for r in rows if r.get("mode", "-") == mode and r["batching"] == batching
                     and r["generations"] > r["failures"]), key=lambda r: r["sessions"])
        xs, label = [r["sessions"] for r in rs], f"{mode}, batching {batching}"
        a.plot(xs, [r["aggregate_tokens_per_s"] for r in rs], marker="o", label=label)
        mid = [r["decode_tokens_per_s_p50"] or 0 for r in rs]
        lo = [m - (r["decode_tokens_per_s_p5"] or m) for m, r in zip(mid, rs)]
        hi = [(r["decode_tokens_per_s_p95"] or m) - m for m, r in zip(mid, rs)]
        b.errorbar(xs, mid, yerr=[lo, hi], marker="o", capsize=3, label=label)
        c.plot(xs, [r.get("cloud_ms_per_token") or float("nan") for r in rs], marker="o", label=label)
    for ax, ylabel in ((a, "aggregate tokens/s"), (b, "per-session decode tokens/s\n(p50, bars p5-p95)"),
                       (c, "cloud compute ms per generated token")):
        ax.set_xscale("log", base=2)
        ns = sorted({r["sessions"] for r in rows})
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_ylim(bottom=0)  # rates from zero: a small dip must not look like a collapse
        ax.set_xlabel("concurrent sessions")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- running

def _spec(cfg: ServeConfig, mode: str) -> dict[str, Any]:
    return {"prompt": PROMPTS[0].text, "chat": True, "mode": mode, "seed": cfg.seed,
            "overrides": {"verify": cfg.verify, "temperature": cfg.temperature, "max_new_tokens": cfg.max_new_tokens,
                          "ignore_eos": True, "timeout_s": cfg.gen_timeout_s}}


def run_n(cfg: ServeConfig, fleet: fl.Fleet, cloud: fl.CloudProc, mode: str, batching: str, n: int,
          bar: Progress | None, records: list[dict[str, Any]]) -> dict[str, Any]:
    """N sessions x --gens generations of one mode, all started together (each session its own prompt); its row."""
    recs: list[dict[str, Any]] = []
    name = f"{mode} batching {batching} N={n}"
    # all sessions connect first and start together a moment later (STARTUP_S: time to connect them all)
    plan = {"kind": "fixed", "gens": cfg.gens, "spec": _spec(cfg, mode), "prompts": [p.text for p in PROMPTS],
            "start_at": time.monotonic() + STARTUP_S + 0.05 * n}

    def on_gen(ev: dict[str, Any]) -> None:
        ev.update(mode=mode, batching=batching, sessions=n)
        recs.append(ev)
        if bar is not None:
            bar.step(name, f"error: {ev['error'][:50]}" if ev["error"] else
                     f"{fmt(ev.get('decode_tokens_per_s'))} tok/s")
            if ev["error"]:
                bar.write(f"{name} session {ev['session']}: {ev['error']}")

    before, cpu0, t0 = cloud.metrics(), _cpu(fleet, cloud), time.monotonic()
    problems = fl.drive(fleet, f"{mode}-{batching}-{n}", cloud.address, fl.split_sessions(n, len(fleet.procs)), plan,
                        on_gen, timeout_s=cfg.run_timeout_s)
    cpu1, wall = _cpu(fleet, cloud), time.monotonic() - t0
    after = cloud.metrics()
    records += recs
    row = summarize(recs, batching, n, fl.histogram_means(before, after), mode)
    # which side is saturated: CPU seconds per second of each side (1.0 = its whole core)
    util = {"cloud_cpu_util": (cpu1[0] - cpu0[0]) / wall, "edge_cpu_util": (cpu1[1] - cpu0[1]) / wall}
    deltas = fl.histogram_deltas(before, after)
    share = engine_share(deltas, cpu1[0] - cpu0[0], row["span_s"], row["tokens"])
    return {**row, **util, **share, **cloud_cost(deltas), "problems": problems}


def engine_share(deltas: dict[str, tuple[float, float]], cloud_cpu_s: float, span_s: float, tokens: int
                 ) -> dict[str, float | None]:
    """How busy the batching engine was over a run (its passes' wall time per second of the generations' span: 1.0 =
    the model is the bottleneck), and the cloud's CPU time per generated token outside the model passes (the session
    code, gRPC, the batcher, sampling): what would bound the cloud if passes were free. None without batched passes."""
    busy, passes = deltas.get(BATCH_PASS_METRIC, (0.0, 0.0))
    engine_cpu, _ = deltas.get(BATCH_PASS_CPU_METRIC, (0.0, 0.0))
    if not passes or not tokens or span_s <= 0:
        return {"engine_busy": None, "cloud_ms_per_token_beside_passes": None}
    return {"engine_busy": busy / span_s,
            "cloud_ms_per_token_beside_passes": max(0.0, cloud_cpu_s - engine_cpu) / tokens * 1e3}


def _cpu(fleet: fl.Fleet, cloud: fl.CloudProc) -> tuple[float, float]:
    return fl.cpu_seconds([cloud.pid]), fl.cpu_seconds([p.pid for p in fleet.procs])


def warm_up(cfg: ServeConfig, fleet: fl.Fleet, cloud: fl.CloudProc) -> None:
    """A short generation per worker, not measured: a fresh cloud's first passes and each worker's first
    generation pay one-off costs (allocations, lazy initialisation, the first channel)."""
    spec = _spec(cfg, cfg.modes[0])
    spec["overrides"] = {**spec["overrides"], "max_new_tokens": min(8, cfg.max_new_tokens)}
    groups = [[w] for w in range(len(fleet.procs))]
    fl.drive(fleet, "warm-up", cloud.address, groups, {"kind": "fixed", "gens": 1, "spec": spec}, lambda ev: None,
             timeout_s=cfg.run_timeout_s)


def run_serve(cfg: ServeConfig) -> dict[str, Any]:
    """Every batching configuration x every N; writes serve.json, serve.md, serve.png into cfg.out."""
    t0 = time.perf_counter()
    cfg.out.mkdir(parents=True, exist_ok=True)
    pinned = fl.pinning_possible()
    cloud_core, edge_core = (cfg.cloud_core, cfg.edge_core) if pinned else (None, None)
    n_procs = min(cfg.edge_procs, max(cfg.sessions))
    logdir = cfg.out / "serve_logs"
    rows: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []
    with fl.edge_fleet(n_procs, cfg.draft, edge_core, logdir) as fleet:
        supported = fl.flag_supported(fl.cloud_help(), BATCHING_FLAG)  # while the workers load their drafts
        configs, note = batching_plan(cfg.batching, supported)
        cfg.notes += [note] if note else []
        cfg.notes += [] if pinned else ["fewer than 2 cores or no taskset: nothing pinned"]
        bar = None if cfg.quiet else Progress(sum(cfg.sessions) * cfg.gens * len(configs) * len(cfg.modes))
        try:
            for batching in configs:
                with fl.cloud_process(cfg.target, cloud_core, logdir / f"cloud_batching_{batching}.log",
                                      cloud_flags(cfg, batching, supported)) as cloud:
                    fleet.wait_ready()
                    warm_up(cfg, fleet, cloud)
                    rows += [run_n(cfg, fleet, cloud, mode, batching, n, bar, records)
                             for n in cfg.sessions for mode in cfg.modes]
        finally:
            if bar is not None:
                bar.close()
    compare_to_baseline(rows)
    settings = {**asdict(cfg), "out": str(cfg.out), "cloud_core": cloud_core, "edge_core": edge_core,
                "edge_procs_used": n_procs, "batching_supported": supported, "batching_ran": configs,
                "elapsed_s": time.perf_counter() - t0}
    return write_outputs(settings, rows, records, cfg.out)


def write_outputs(settings: dict[str, Any], rows: list[dict[str, Any]], records: list[dict[str, Any]],
                  out: Path) -> dict[str, Any]:
    result = {"settings": settings, "rows": rows, "generations": records}
    (out / "serve.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "serve.md").write_text(report_markdown(settings, rows))
    title = f"picospec-bench serve: {settings['target']} <- {settings['draft']}, {settings['max_new_tokens']} tokens"
    plot(rows, out / "serve.png", title)
    return result


def parse_args(argv: list[str] | None) -> ServeConfig:
    d = ServeConfig()
    p = argparse.ArgumentParser(prog="picospec-bench serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default=d.target, help=f"the cloud's model (default {d.target}; on a GPU e.g. random:qwen2.5-7b)")
    p.add_argument("--draft", default=d.draft, help=f"the edges' draft (default {d.draft})")
    p.add_argument("--sessions", default=",".join(map(str, d.sessions)), help="concurrent session counts, comma-separated")
    p.add_argument("--batching", default=",".join(d.batching), help="cloud batching configurations: on, off or both")
    p.add_argument("--gens", type=int, default=d.gens, help="generations per session at each count, back to back")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--mode", "--modes", dest="modes", default=",".join(d.modes),
                   help="edge modes, comma-separated: each runs at every N (cloud = the cloud alone, the baseline)")
    p.add_argument("--verify", default=d.verify)
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--edge-procs", type=int, default=d.edge_procs, help="edge worker processes (sessions dealt over them)")
    p.add_argument("--cloud-core", type=int, default=d.cloud_core)
    p.add_argument("--edge-core", type=int, default=d.edge_core)
    p.add_argument("--device", default=None, help="passed to the cloud (cpu, cuda)")
    p.add_argument("--dtype", default=None, help="passed to the cloud (float32, float16, bfloat16)")
    p.add_argument("--engine", default=None, help="passed to the cloud (auto, static, hf, llama.cpp); batching "
                   "on needs static or llama.cpp (auto with batching on is static)")
    p.add_argument("--max-batch-tokens", type=int, default=None, help="passed to the cloud with batching on")
    p.add_argument("--max-wait-ms", type=float, default=None, help="passed to the cloud with batching on")
    p.add_argument("--gen-timeout-s", type=float, default=d.gen_timeout_s, help="deadline of one generation")
    p.add_argument("--run-timeout-s", type=float, default=d.run_timeout_s, help="cut one session count's runs after this long")
    p.add_argument("--out", type=Path, default=d.out)
    a = p.parse_args(argv)
    try:
        sessions = tuple(fl.parse_list(a.sessions, int))
        batching = tuple(fl.parse_list(a.batching))
        modes = tuple(fl.parse_list(a.modes))
    except ValueError as e:
        p.error(str(e))
    if not sessions or min(sessions) < 1 or not set(batching) <= {"on", "off"} or not batching or a.gens < 1:
        p.error("--sessions: positive counts; --batching: on and/or off; --gens at least 1")
    unknown = [m for m in modes if m not in EDGE_MODES]
    if not modes or unknown:
        p.error(f"--mode: choose from {', '.join(EDGE_MODES)}" + (f" (not {unknown[0]!r})" if unknown else ""))
    return ServeConfig(**{k: v for k, v in vars(a).items() if k not in ("sessions", "batching", "modes")},
                       sessions=sessions, batching=batching, modes=modes)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    result = run_serve(cfg)
    print(report_markdown(result["settings"], result["rows"]))
    print(f"wrote {cfg.out / 'serve.json'}, {cfg.out / 'serve.md'}, {cfg.out / 'serve.png'}")
    if not any(r["generations"] > r["failures"] for r in result["rows"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
