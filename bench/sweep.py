"""picospec-bench sweep: decoding modes across a grid of network conditions (docs/design.md §8), on a real shaped link.

Each side runs in its own network namespace on its own core: the cloud (`picospec-cloud --threads 1`) in the
"cloud" namespace on core 1, an edge worker (the same EdgeClient that `picospec-edge` uses, the draft loaded
once) in the "edge" namespace on core 0, joined by a veth pair shaped in the kernel by netlab (netem where the
kernel has it, else tbf for the rate plus an NFQUEUE delay stage). One link serves the whole sweep: between
cells its shaping is replaced in place, so neither model is reloaded. RTT 0 is that same namespace link with
no delay stage (not plain loopback), so every cell crosses the same path.

Cells (network conditions): `--cells RTTxMBIT,...` (default 50x10,200x1,10x100: RTT 50 ms at 10 Mbit/s,
200 ms at 1 Mbit/s, 10 ms at 100 Mbit/s each way; Mbit 0 = unshaped), or the cross product of `--rtt-ms` and
`--mbit`. For every cell, after the link's RTT has been measured (netlab.measure's TCP ping-pong from the edge
namespace), each column runs every prompt at every temperature (`--temperatures`, default 0,1) `--runs` times
with --ignore-eos (every run generates the same number of tokens); temperatures and columns are interleaved per
prompt so that slow drift of the machine hits all alike. Per temperature, cell and column the median over
prompts x runs is reported. A run that exceeds --run-timeout-s is cut and its rate taken over the part it
completed (marked †); that column is then skipped, at that temperature, in every cell with at least that RTT
and at most that bandwidth (it can only be slower there).

Columns (--modes, comma-separated): `[LABEL=]MODE[:VERIFY[:HINTS[:DRAFT_LEN]]]`, e.g. `sync` (dense),
`pipeline:coupled`, `ours=pipeline:coupled:on:0` (0 = adaptive draft length). Empty fields keep the edge's
defaults; MODE `default` is the edge's default mode, so a bare `default` column overrides nothing and follows
EdgeConfig's defaults. Default columns: cloud, sync (dense), picospec (the paper's, APPROXIMATE), default, and
best (pipeline, coupled, draft length chosen online). `--preset paper-table1`: the shape of the PicoSpec paper's
Table 1 on our models: cloud, sync (vanilla, dense), picospec and ours (pipeline, coupled, adaptive, hints on).

The report keeps start-up and decoding apart: per cell and column the medians of the decode rate (tokens/s
after the first token), TTFT and the end-to-end rate, and the decode and end-to-end ratios over `cloud`.
`--target qwen2.5-coder-1.5b-instruct:int8` measures against the int8 cloud (any model name the cloud takes).

Writes OUT/NAME.json (settings, link, every run), NAME.csv (per temperature, cell and column), NAME_runs.csv,
NAME.md (a block per temperature) and PNGs: NAME_decode_speedup.png and NAME_ttft.png (per cell and column, a
panel per temperature), and per temperature (suffix _T0, _T1 when there are several) tokens/s against RTT per
bandwidth, speedup over `cloud` and bytes per token per column. NAME is sweep, or paper_table1 with the preset.
Needs root (network namespaces, tc, iptables); `--no-netns` runs unshaped on loopback (--cells 0x0 only).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from picospec.bench import edge_worker
from picospec.bench.grid import (DEFAULT_CELLS, DEFAULT_COLUMNS, DEFAULT_TEMPERATURES, PRESETS, conditions, parse_columns,
                                 pick_prompts)
from picospec.bench.options import add_common_args, settings_from, settings_json, temperatures_of
from picospec.bench.report import aggregate, write_sweep_report
from picospec.bench.runner import keep_partial, run_grid
from picospec.bench.testbed import Testbed


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--edge-worker"]:  # the worker's former entry point: `python -m picospec.bench.edge_worker` now
        return edge_worker.main(argv[1:])
    p = argparse.ArgumentParser(prog="picospec-bench sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, rtts=None, mbits=None, prompts=3, max_new_tokens=128, runs=3, temperatures=DEFAULT_TEMPERATURES)
    p.add_argument("--cells", default=None, help=f"network cells RTT_MSxMBIT, comma-separated (default {DEFAULT_CELLS}); "
                   "instead of the --rtt-ms x --mbit cross product")
    p.add_argument("--modes", default=None,
                   help=f"columns, [LABEL=]MODE[:VERIFY[:HINTS[:DRAFT_LEN]]]; MODE default = the edge's (default {DEFAULT_COLUMNS})")
    p.add_argument("--preset", choices=sorted(PRESETS), help="paper-table1: cloud, sync, picospec and ours side by side")
    args = p.parse_args(argv)
    if args.preset and args.modes:
        p.error("--preset chooses the columns: give --preset or --modes, not both")
    try:
        cols = parse_columns(PRESETS[args.preset] if args.preset else (args.modes or DEFAULT_COLUMNS))
        conds = conditions(args.cells, args.rtt_ms, args.mbit)
        temps = temperatures_of(args)
    except ValueError as e:
        p.error(str(e))
    if args.no_netns and any(c.rtt_ms or c.mbit for c in conds):
        p.error("--no-netns is plain loopback: only --cells 0x0 (or --rtt-ms 0 --mbit 0)")
    prompts = pick_prompts(args.prompts)
    name = "paper_table1" if args.preset == "paper-table1" else "sweep"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    samples: list[dict[str, Any]] = []
    settings = {**vars(args), "temperatures": ",".join(f"{t:g}" for t in temps), "prompt_labels": [pr.label for pr in prompts],
                "cells_run": [c.name for c in conds]}
    with keep_partial(settings), Testbed(settings_from(args), out / f"{name}_logs") as bed:
        settings.update(settings_json(args, bed))
        run_grid(bed, conds, cols, prompts, args.runs, args.seed, samples, temperatures=temps)
    settings["elapsed_s"] = time.perf_counter() - t0
    if not samples:
        sys.exit(f"picospec-bench sweep: nothing measured ({settings.get('interrupted', 'no runs')})")
    rows = aggregate(samples)
    write_sweep_report(name, settings, cols, rows, samples, out)

if __name__ == "__main__":
    main()
