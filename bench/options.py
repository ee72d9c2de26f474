"""The command-line options `picospec-bench sweep` and `picospec-bench pipeline` share, and what they become:
the testbed's settings, and the settings recorded in the JSON."""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from picospec.bench.grid import DEFAULT_DRAFT, DEFAULT_MBITS, DEFAULT_RTTS, DEFAULT_TARGET, PROMPTS, fmt_num, parse_temperatures
from picospec.bench.testbed import BenchSettings, Testbed


def add_common_args(p: argparse.ArgumentParser, *, rtts: str | None, mbits: str | None, prompts: int,
                    max_new_tokens: int, runs: int, temperatures: str | None = None) -> None:
    """rtts/mbits None: no default (the command has another, e.g. sweep's --cells). temperatures given: a
    `--temperatures` list with that default instead of the single `--temperature`."""
    p.add_argument("--target", default=DEFAULT_TARGET,
                   help=f"the cloud's model (default {DEFAULT_TARGET}; e.g. {DEFAULT_TARGET}:int8 for the int8 cloud)")
    p.add_argument("--draft", default=DEFAULT_DRAFT, help=f"the edge's draft model (default {DEFAULT_DRAFT})")
    p.add_argument("--engine", default="auto", choices=("auto", "hf", "static", "llama.cpp"),
                   help="the cloud's --engine (default auto)")
    p.add_argument("--draft-engine", default="auto", choices=("auto", "llama.cpp", "torch"),
                   help="the edge's --draft-engine (default auto)")
    p.add_argument("--baseline-gguf", default="",
                   help="the GGUF the `llama.cpp` column runs alone (default: the target's own name, without "
                        "suffixes such as :int8: the file the target was made from)")
    p.add_argument("--rtt-ms", default=rtts, help="comma-separated RTTs in ms"
                   + _list_default(rtts, "--mbit", DEFAULT_MBITS) + "; 0 = no delay stage")
    p.add_argument("--mbit", default=mbits, help="comma-separated rates each way in Mbit/s"
                   + _list_default(mbits, "--rtt-ms", DEFAULT_RTTS) + "; 0 = unshaped")
    p.add_argument("--runs", type=int, default=runs, help="runs per prompt, column and cell (the median is reported)")
    labels = ", ".join(pr.label for pr in PROMPTS)
    p.add_argument("--prompts", type=int, default=prompts, help=f"how many of the {len(PROMPTS)} built-in prompts, "
                   f"first ones first ({labels}; default {prompts})")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    if temperatures is None:
        p.add_argument("--temperature", type=float, default=1.0,
                       help="sampling temperature (default 1: dense then ships whole distributions, as in the papers)")
    else:
        p.add_argument("--temperatures", default=temperatures,
                       help=f"comma-separated sampling temperatures, each a block of the report (default {temperatures})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-timeout-s", type=float, default=120.0, help="cut a run after this long (rate over the part done)")
    p.add_argument("--port", type=int, default=BenchSettings.port)
    p.add_argument("--edge-core", type=int, default=0)
    p.add_argument("--cloud-core", type=int, default=1)
    p.add_argument("--no-netns", action="store_true", help="plain loopback, no shaping (only RTT 0, unshaped)")
    p.add_argument("--out", default="bench_out")


def _list_default(default: str | None, other: str, other_list: tuple[float, ...]) -> str:
    """Help text for --rtt-ms/--mbit: their default, or (where the command has none: sweep's --cells) how they
    make a cross product with the other flag."""
    if default:
        return f" (default {default})"
    return f"; crossed with {other} (given alone: with {other} {','.join(map(fmt_num, other_list))})"


def temperatures_of(args: argparse.Namespace) -> list[float]:
    """The temperatures to run: --temperatures where the command has it, else the one --temperature."""
    return parse_temperatures(args.temperatures) if hasattr(args, "temperatures") else [args.temperature]


def settings_from(args: argparse.Namespace) -> BenchSettings:
    return BenchSettings(target=args.target, draft=args.draft, max_new_tokens=args.max_new_tokens,
                         temperature=temperatures_of(args)[0], port=args.port, edge_core=args.edge_core,
                         cloud_core=args.cloud_core, run_timeout_s=args.run_timeout_s, netns=not args.no_netns,
                         out=Path(args.out), engine=args.engine, draft_engine=args.draft_engine,
                         baseline_gguf=args.baseline_gguf or args.target.split(":")[0])


def settings_json(args: argparse.Namespace, bed: Testbed) -> dict[str, Any]:
    s = {k: v for k, v in vars(args).items()}
    s.update({"edge_core": bed.s.edge_core, "cloud_core": bed.s.cloud_core, "ignore_eos": True,
              "cpus": sorted(os.sched_getaffinity(0)), "llama_cpp_cpu": llama_cpp_cpu(), **bed.info})
    return s


def llama_cpp_cpu() -> str | None:
    """Which of llama.cpp's CPU code the runs used ("AVX2 ... AVX512_BF16"), None without llama-cpp-python: a
    llama.cpp figure means little without it (an AVX2-only build decodes 1.2x slower on an AVX-512 CPU)."""
    from picospec.shared.llama_backend import LlamaCppError, cpu_features

    try:
        return " ".join(cpu_features())
    except LlamaCppError:
        return None
