"""picospec-bench: benchmarks that print tables (and write JSON/PNG), never tests.

    picospec-bench verify [...]     every verification mode side by side on one pair (see --help)
    picospec-bench sweep [...]      modes x RTT x bandwidth over a kernel-shaped namespace link (root);
                                    --preset paper-table1: the PicoSpec paper's Table 1 on our models
    picospec-bench pipeline [...]   measured tokens/s of every mode beside the model of docs/design.md §5 (root)
    picospec-bench exits [...]      calibrate the early-exit layer and threshold on a target
    picospec-bench stress [...]     hundreds of short jittered generations: reports hangs, errors, greedy mismatches
    picospec-bench fuzz [...]       100,000 hostile messages at a live cloud: clear statuses, no crash, bounded memory
    picospec-bench engine [...]     target pass time by size: transformers, the static engine, CUDA graphs (GPU)
    picospec-bench serve [...]      N concurrent edge sessions (1..16) against one cloud, batching on and off:
                                    aggregate and per-session tokens/s, TTFT, batch size
    picospec-bench soak [...]       64 sessions x 10 minutes of mixed generations: failures, the cloud's memory over time
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    commands = {name: f"picospec.bench.{name}" for name in ("verify", "exits", "sweep", "pipeline", "stress", "fuzz", "engine",
                                                            "serve", "soak")}
    if not argv or argv[0] not in commands:
        sys.exit(__doc__)
    import importlib

    importlib.import_module(commands[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    main()
