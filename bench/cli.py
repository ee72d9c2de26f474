"""picospec-bench: benchmarks that print tables (and write JSON/PNG), never tests.

    picospec-bench verify [...]   every verification mode side by side on one pair (see --help)
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"verify": "bench.verify"}
    if not argv or argv[0] not in commands:
        sys.exit(__doc__)
    import importlib

    importlib.import_module(commands[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    main()
