"""What a new user sees on bad input (issue 29's closing table): every usage case of tests/test_first_hour.py run
through the real console scripts, with the exit status, the lines on stderr and the seconds before the error; then
a one-shot edge's start-up against a running cloud (the small pair, 40 tokens), wall time split into what comes
before the first token.

    .venv/bin/python scripts/first_hour_table.py --out docs/results/first_hour

The tests assert these (one line, no traceback, exit 2, under 5 s); this script only measures and tables them.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.proc_util import cloud_process  # noqa: E402
from tests.test_first_hour import ARGPARSE_USAGE, CLOUD_USAGE, EDGE_USAGE  # noqa: E402

BIN = Path(sys.executable).parent
SMALL = "smollm2-135m-instruct"


def _case(argv: list[str], stdin: str = "") -> dict:
    started = time.monotonic()
    r = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    return {"command": " ".join(Path(a).name if i == 0 else a for i, a in enumerate(argv)), "status": r.returncode,
            "lines": len(lines), "traceback": "Traceback" in r.stderr, "seconds": time.monotonic() - started,
            "says": lines[-1] if lines else ""}


def usage_cases(tmp: Path) -> list[dict]:
    edge, cloud = str(BIN / "picospec-edge"), str(BIN / "picospec-cloud")
    rows = [_case([edge, "--draft", "tiny-random", *([] if "--prompt" in f else ["--prompt", "hi"]), *f])
            for f, _ in EDGE_USAGE]
    rows.append(_case([edge, "--draft", "tiny-random", "--prompt-file", str(tmp / "missing.txt")]))
    rows.append(_case([edge, "--draft", "tiny-random", "--prompt", "-"], stdin=""))
    rows += [_case([cloud, "--target", "tiny-random", "--port", "0", *f]) for f, _ in CLOUD_USAGE]
    rows += [_case([str(BIN / c[0]), *c[1:]]) for c, _ in ARGPARSE_USAGE]
    return rows


def one_shot_startup(runs: int) -> list[dict]:
    """A one-shot `picospec-edge` (the small pair, the draft on llama.cpp, 40 tokens) against a cloud already
    serving: wall time, and how much of it came before the generation started."""
    out = []
    with cloud_process(SMALL) as (_, address):
        for _ in range(runs):
            started = time.monotonic()
            r = subprocess.run([str(BIN / "picospec-edge"), "--server", address, "--draft", SMALL, "--threads", "1",
                                "--prompt", "Write a haiku about the sea.", "--max-new-tokens", "40", "--json"],
                               capture_output=True, text=True, timeout=300)
            wall = time.monotonic() - started
            assert r.returncode == 0, r.stderr[-2000:]
            stats = json.loads(r.stdout.splitlines()[-1])["stats"]
            generation = stats["generated_tokens"] / stats["tokens_per_s"]
            out.append({"wall_s": wall, "generation_s": generation, "before_s": wall - generation,
                        "ttft_s": stats["ttft_s"]})
    return out


def imports_s() -> float:
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", "import picospec.edge_client.cli"], check=True)
    return time.monotonic() - started


def report(rows: list[dict], startup: list[dict], import_s: float) -> str:
    lines = ["# What a new user sees on bad input", "",
             "`python scripts/first_hour_table.py` on this project's 2-core machine: each command run once through "
             "the real console script (tiny built-in models; nothing listens at the default --server). status 2: "
             "a usage error. lines: lines on stderr. seconds: from start to exit, imports included.", "",
             "| command | status | lines | traceback | seconds | what it says |", "|---|---|---|---|---|---|"]
    for r in rows:
        says = r["says"].replace("|", "\\|")
        lines.append(f"| `{r['command']}` | {r['status']} | {r['lines']} | {'yes' if r['traceback'] else 'no'} | "
                     f"{r['seconds']:.2f} | {says} |")
    med = {k: statistics.median(s[k] for s in startup) for k in startup[0]}
    lines += ["", "## A one-shot edge's start-up", "",
              f"`picospec-edge --server ... --draft {SMALL} --prompt ... --max-new-tokens 40` against a cloud already "
              f"serving (the draft on llama.cpp, one thread), {len(startup)} runs, medians: wall {med['wall_s']:.2f} s, "
              f"of which {med['before_s']:.2f} s before the generation (imports, the draft's load, connecting, the "
              f"handshake) and {med['generation_s']:.2f} s generating (TTFT {med['ttft_s']:.2f} s). Importing the "
              f"edge's CLI alone: {import_s:.2f} s. (Issue 29 measured 14-20 s wall on 2026-12-06.)", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = usage_cases(args.out)
    startup = one_shot_startup(args.runs)
    text = report(rows, startup, imports_s())
    (args.out / "README.md").write_text(text)
    (args.out / "first_hour.json").write_text(json.dumps({"usage": rows, "startup": startup}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
