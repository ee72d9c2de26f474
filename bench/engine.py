"""picospec-bench engine: what one target pass costs by size, on each backend, and what speculation would gain.

For every target x dtype it times pass(n), n tokens appended to a cache of --context tokens (n = 1 is decode),
on each backend:
  * hf: transformers with its DynamicCache (the cloud's `--engine hf`);
  * eager: the static engine without graphs (cloud_server/engine; the CPU path);
  * graphs: the static engine with CUDA graphs per bucket (CUDA only).
Then, from those times, the speedup the performance model (docs/design.md §5) predicts (shared/perf_model.py) at the acceptance the real
pair measured (by default the `sync` column of the committed fp32 sweep, per prompt): once verification-bound
(drafting and the network free: what the cloud allows) and once with --draft-ms per draft token and --rtt-ms.

    picospec-bench engine --targets random:qwen2.5-1.5b,random:qwen2.5-7b --device cuda --dtypes bfloat16,float32
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from picospec.shared.perf_model import PassCosts, modelled_rate

ACCEPTANCE_CSV = Path(__file__).resolve().parent.parent / "docs/results/sweep_fp32/sweep_runs.csv"
BACKENDS = ("hf", "eager", "graphs")


@dataclass
class Timing:
    target: str
    dtype: str
    backend: str
    pass_s: dict[int, float]  # n -> median seconds of a pass of n tokens


@dataclass(frozen=True)
class Prediction:
    prompt: str
    acceptance: float
    verify_bound: float  # speedup over decode alone, drafting and network free
    verify_bound_g: int
    with_edge: float     # speedup with --draft-ms and --rtt-ms, pipelined
    with_edge_g: int


def measured_acceptance(path: Path, column: str = "sync", temperature: str = "0") -> dict[str, float]:
    """Median acceptance per prompt of one column of a sweep's runs CSV (the real pair, measured)."""
    by_prompt: dict[str, list[float]] = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            if row["column"] == column and row["temperature"] == temperature and row["acceptance_rate"]:
                by_prompt.setdefault(row["prompt_label"], []).append(float(row["acceptance_rate"]))
    return {p: statistics.median(v) for p, v in by_prompt.items()}


def parse_acceptance(text: str) -> dict[str, float]:
    """"chat=0.37,code=0.9" -> {"chat": 0.37, "code": 0.9}."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        a = float(value)
        if not 0.0 <= a < 1.0:
            raise ValueError(f"acceptance {part!r} outside [0, 1)")
        out[name] = a
    return out


def best_speedup(pass_s: dict[int, float], a: float, t_draft: float, t_rtt: float) -> tuple[float, int]:
    """Max over draft lengths g (a pass of g drafts has g + 1 positions) of the modelled pipelined rate, over the
    rate of decoding alone (1 / pass(1)); g = 0 (decode alone) is 1.0."""
    costs = PassCosts()
    for n, t in pass_s.items():
        costs.add(n - 1, t)
    best, best_g = 1.0, 0
    for g in range(1, max(pass_s)):
        rate = modelled_rate([a] * g, t_draft, t_rtt, costs(g), pipelined=True)
        if rate * pass_s[1] > best:
            best, best_g = rate * pass_s[1], g
    return best, best_g


def predictions(t: Timing, acceptance: dict[str, float], draft_s: float, rtt_s: float) -> list[Prediction]:
    out = []
    for prompt, a in acceptance.items():
        vb, vb_g = best_speedup(t.pass_s, a, 0.0, 0.0)
        we, we_g = best_speedup(t.pass_s, a, draft_s, rtt_s)
        out.append(Prediction(prompt, a, vb, vb_g, we, we_g))
    return out


def time_passes(forward: Callable[[list[int]], object], truncate: Callable[[int], None], context: int,
                sizes: Sequence[int], repeats: int, sync: Callable[[], None], vocab: int) -> dict[int, float]:
    """Median seconds of forward(n tokens) after truncating back to `context`, per n; two untimed passes first."""
    ids = torch.randint(0, min(vocab, 1000), (max(sizes),)).tolist()
    out = {}
    for n in sizes:
        samples = []
        for i in range(repeats + 2):
            truncate(context)
            sync()
            t0 = time.perf_counter()
            forward(ids[:n])
            sync()
            if i >= 2:
                samples.append(time.perf_counter() - t0)
        out[n] = statistics.median(samples)
    return out


def _sync(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)


def time_target(name: str, dtype: str, args: argparse.Namespace) -> tuple[list[Timing], list[RowsTiming]]:
    """Load `name` once; time each backend asked for on it (graphs only on CUDA)."""
    from picospec.shared.hf_backend import HFBackend
    from picospec.cloud_server.engine import EngineOptions, StaticEngine
    from picospec.shared.models import load_model

    _say(f"{name} {dtype}: loading on {args.device}")
    model = load_model(name, device=args.device, dtype=getattr(torch, dtype), progress=False).model
    sizes, context = args.sizes, args.context
    vocab = int(model.config.vocab_size)
    context_ids = torch.randint(0, min(vocab, 1000), (context,)).tolist()
    out = []
    for backend in args.backends:
        if backend == "graphs" and torch.device(args.device).type != "cuda":
            continue
        t0 = time.perf_counter()
        if backend == "hf":
            be = HFBackend(model, args.device)
        else:
            opts = EngineOptions(slots=2, max_len=context + max(sizes), buckets=tuple(sizes), graphs=backend == "graphs")
            be = StaticEngine(model, opts).backend()
        be.prefill(context_ids)
        _say(f"{name} {dtype} {backend}: ready in {time.perf_counter() - t0:.1f}s; timing passes of {sizes}")
        pass_s = time_passes(be.forward, be.truncate, context, sizes, args.repeats, _sync(args.device), vocab)
        out.append(Timing(name, dtype, backend, pass_s))
        _say("  " + "  ".join(f"pass({n}) {1e3 * t:.2f} ms" for n, t in pass_s.items()))
        del be
    rows = time_rows(model, name, dtype, args) if args.rows else []
    del model
    if torch.device(args.device).type == "cuda":
        torch.cuda.empty_cache()
    return out, rows


@dataclass
class RowsTiming:
    target: str
    dtype: str
    backend: str
    size: int                     # tokens per row (a verification of size - 1 drafts)
    pass_s: dict[int, float]      # rows -> median seconds of one pass over that many sessions' rows


def time_rows(model: torch.nn.Module, name: str, dtype: str, args: argparse.Namespace) -> list[RowsTiming]:
    """One pass over B sessions' rows of --rows-size tokens each (each on its own slot with --context cached), for
    B in --rows: what batched verification costs on the engine, graphs (CUDA) and eager."""
    from picospec.cloud_server.engine import EngineOptions, StaticEngine
    from picospec.cloud_server.engine.model import Row

    out, size, sync = [], args.rows_size, _sync(args.device)
    vocab = int(model.config.vocab_size)
    ids = torch.randint(0, min(vocab, 1000), (args.context + size,)).tolist()
    for backend in [b for b in args.backends if b != "hf"]:
        if backend == "graphs" and torch.device(args.device).type != "cuda":
            continue
        pass_s = {}
        for rows in args.rows:
            opts = EngineOptions(slots=rows + 1, max_len=args.context + size, buckets=(size,), batch_buckets=(rows,),
                                 graphs=backend == "graphs")
            engine = StaticEngine(model, opts)
            slots = [engine.backend() for _ in range(rows)]
            for be in slots:
                be.prefill(ids[:args.context])
            batch = [Row(be.slot, ids[args.context:], args.context) for be in slots]
            samples = []
            for i in range(args.repeats + 2):
                sync()
                t0 = time.perf_counter()
                engine.run(batch)
                sync()
                samples.append(time.perf_counter() - t0)
            pass_s[rows] = statistics.median(samples[2:])
            _say(f"{name} {dtype} {backend}: {rows} rows x {size} tokens: {1e3 * pass_s[rows]:.2f} ms a pass")
            del engine, slots
        out.append(RowsTiming(name, dtype, backend, size, pass_s))
    return out


def render_rows(timings: list[RowsTiming]) -> list[str]:
    lines = ["", "One pass over B sessions' rows (batched verification), ms; aggregate = rows x tokens per second, "
             "against one row's.", "", "| target | dtype | backend | tokens/row | B | pass ms | aggregate tok/s | x one row |",
             "|---|---|---|---|---|---|---|---|"]
    for t in timings:
        one = t.pass_s[min(t.pass_s)] / min(t.pass_s)
        for rows, sec in t.pass_s.items():
            lines.append(f"| {t.target} | {t.dtype} | {t.backend} | {t.size} | {rows} | {1e3 * sec:.2f} | "
                         f"{rows * t.size / sec:,.0f} | {one * rows / sec:.2f}x |")
    return lines


def render(timings: list[Timing], preds: dict[tuple[str, str, str], list[Prediction]], args: argparse.Namespace,
           device_name: str) -> str:
    sizes = args.sizes
    lines = [f"# picospec-bench engine: {device_name}", "",
             f"Pass times in ms, n tokens appended to a {args.context}-token cache, median of {args.repeats}. "
             "`random:` targets are random weights in the real shapes (timing only).", "",
             "| target | dtype | backend | " + " | ".join(f"n={n}" for n in sizes) + " | pass(16)/decode | decode vs eager |",
             "|---|---|---|" + "---|" * len(sizes) + "---|---|"]
    eager = {(t.target, t.dtype): t.pass_s[1] for t in timings if t.backend == "eager"}
    for t in timings:
        ratio16 = f"{t.pass_s[16] / t.pass_s[1]:.2f}" if 16 in t.pass_s else "n/a"
        e = eager.get((t.target, t.dtype))
        vs = f"{e / t.pass_s[1]:.2f}x" if e else "n/a"
        lines.append(f"| {t.target} | {t.dtype} | {t.backend} | "
                     + " | ".join(f"{1e3 * t.pass_s[n]:.2f}" for n in sizes) + f" | {ratio16} | {vs} |")
    lines += ["", f"Modelled speedup over decoding alone (docs/design.md §5, pipelined, i.i.d. acceptance a, best draft length g "
              f"in brackets): verification-bound (drafting and network free), and with {args.draft_ms:g} ms per draft "
              f"token and {args.rtt_ms:g} ms RTT. Acceptance: {args.acceptance_source}.", "",
              "| target | dtype | backend | prompt | a | verification-bound | with edge |", "|---|---|---|---|---|---|---|"]
    for (target, dtype, backend), ps in preds.items():
        for p in ps:
            lines.append(f"| {target} | {dtype} | {backend} | {p.prompt} | {p.acceptance:.2f} | "
                         f"{p.verify_bound:.2f}x (g={p.verify_bound_g}) | {p.with_edge:.2f}x (g={p.with_edge_g}) |")
    return "\n".join(lines) + "\n"


def plot(timings: list[Timing], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for t in timings:
        ns = sorted(t.pass_s)
        ax.plot(ns, [1e3 * t.pass_s[n] for n in ns], marker="o", label=f"{t.target} {t.dtype} {t.backend}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens in the pass (n)")
    ax.set_ylabel("ms per pass")
    ax.set_title("Target pass time by size")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="picospec-bench engine", description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default="random:qwen2.5-1.5b", help="comma-separated target names (default "
                   "random:qwen2.5-1.5b; the real ones where their weights are installed)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated weight dtypes")
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated, of " + ", ".join(BACKENDS))
    p.add_argument("--sizes", default="1,2,4,8,16,32", help="pass sizes n (1 = decode; each is a graph bucket)")
    p.add_argument("--context", type=int, default=512, help="tokens already cached before each timed pass")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--acceptance", default="", help="per prompt, e.g. chat=0.37,code=0.9 (default: measured, "
                   f"the sync column at T=0 of {ACCEPTANCE_CSV.relative_to(ACCEPTANCE_CSV.parents[3])})")
    p.add_argument("--draft-ms", type=float, default=20.0, help="edge milliseconds per draft token for the "
                   "'with edge' prediction")
    p.add_argument("--rtt-ms", type=float, default=20.0)
    p.add_argument("--rows", default="", help="also time one pass over B sessions' rows, for B in this comma-separated "
                   "list (batched verification; e.g. 1,2,4,8,16,32,64)")
    p.add_argument("--rows-size", type=int, default=5, help="tokens per row with --rows (5 = a verification of 4 drafts)")
    p.add_argument("--threads", type=int, default=0, help="torch threads on the CPU (0 = torch's default)")
    p.add_argument("--out", default="bench_out/engine")
    args = p.parse_args(argv)
    args.targets = [t for t in args.targets.split(",") if t]
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    args.backends = [b for b in args.backends.split(",") if b]
    args.sizes = sorted({int(n) for n in args.sizes.split(",")} | {1})
    args.rows = sorted({int(n) for n in args.rows.split(",") if n})
    if bad := [b for b in args.backends if b not in BACKENDS]:
        p.error(f"unknown backend {bad[0]!r}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.acceptance:
        acceptance, args.acceptance_source = parse_acceptance(args.acceptance), "given with --acceptance"
    else:
        acceptance = measured_acceptance(ACCEPTANCE_CSV)
        args.acceptance_source = ("measured on the real pair (qwen2.5-coder 0.5b int8 drafting for 1.5b fp32), the "
                                  "`sync` column at T=0 of docs/results/sweep_fp32")
    measured = [time_target(name, dtype, args) for name in args.targets for dtype in args.dtypes]
    timings = [t for ts, _ in measured for t in ts]
    rows = [r for _, rs in measured for r in rs]
    preds = {(t.target, t.dtype, t.backend): predictions(t, acceptance, args.draft_ms / 1e3, args.rtt_ms / 1e3)
             for t in timings}
    cuda = torch.device(args.device).type == "cuda"
    device_name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} torch threads"
    text = render(timings, preds, args, device_name) + ("\n".join(render_rows(rows)) + "\n" if rows else "")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "engine.md").write_text(text)
    (out / "engine.json").write_text(json.dumps({
        "device": device_name, "torch": torch.__version__, "context": args.context, "repeats": args.repeats,
        "acceptance": acceptance, "acceptance_source": args.acceptance_source, "draft_ms": args.draft_ms,
        "rtt_ms": args.rtt_ms, "timings": [asdict(t) for t in timings], "rows": [asdict(r) for r in rows],
        "predictions": {"|".join(k): [asdict(p) for p in v] for k, v in preds.items()}}, indent=1))
    plot(timings, out / "engine.png")
    print(text)


if __name__ == "__main__":
    main()
