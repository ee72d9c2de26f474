"""The container checks' verdicts (.ci/docker_test.sh, .ci/arm64_test.sh), one place for both scripts.

    python .ci/checks.py link FILE --rtt-ms 50 --rate-mbit 10 --tol 0.15 --prefix docker_test
        FILE: `picospec.netlab.measure client --json` output; each of RTT, rate up and rate down within tol
    python .ci/checks.py greedy FILE --speculated sync,pipeline --floor 0.25 --prefix docker_test [--table]
        FILE: `picospec-edge --mode cloud,sync,pipeline --json` output; every mode's token ids equal the cloud
        mode's (the target's own greedy), and each --speculated mode made rounds with accepted drafts and an
        acceptance rate >= floor
Exit 0 when every check holds, 1 otherwise; one line per check on stdout, prefixed.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def _objects(path: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in open(path) if line.startswith("{")]


def check_link(m: dict[str, float], rtt_ms: float, rate_mbit: float, tol: float) -> list[tuple[str, bool]]:
    checks = [("rtt_ms", m["rtt_ms"], rtt_ms), ("up_mbit", m["up_mbit"], rate_mbit),
              ("down_mbit", m["down_mbit"], rate_mbit)]
    return [(f"{name}: measured {got:.2f}, configured {want:g} "
             f"({'ok' if abs(got - want) <= tol * want else 'OUT OF RANGE'}, tolerance {tol:.0%})",
             abs(got - want) <= tol * want) for name, got, want in checks]


def check_greedy(runs: dict[str, dict[str, Any]], speculated: list[str], floor: float) -> list[tuple[str, bool]]:
    ref = runs["cloud"]["token_ids"]
    lines = [("the cloud-mode run produced tokens", bool(ref))]
    for mode, run in runs.items():
        if mode == "cloud":
            continue
        st, same = run["stats"], run["token_ids"] == ref
        lines.append((f"{mode}: {len(run['token_ids'])} tokens, {'equal to' if same else 'DIFFERENT FROM'} the "
                      f"target's own greedy (cloud mode); {st['wall_s']:.2f} s", same))
        if mode in speculated:
            acceptance = st["acceptance_rate"] or 0.0
            ok = st["rounds"] > 0 and st["accepted_tokens"] > 0 and acceptance >= floor
            lines.append((f"{mode}: {st['rounds']} rounds, {st['accepted_tokens']}/{st['drafted_tokens']} drafts "
                          f"accepted, acceptance {acceptance:.2f} ({'ok' if ok else 'NO SPECULATION'}: needs rounds "
                          f"> 0, accepted drafts and acceptance >= {floor})", ok))
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=".ci/checks.py")
    p.add_argument("what", choices=("link", "greedy"))
    p.add_argument("file")
    p.add_argument("--prefix", default="check")
    p.add_argument("--rtt-ms", type=float)
    p.add_argument("--rate-mbit", type=float)
    p.add_argument("--tol", type=float, default=0.15)
    p.add_argument("--speculated", default="sync,pipeline")
    p.add_argument("--floor", type=float, default=0.0)
    p.add_argument("--table", action="store_true", help="greedy: also print the statistics table")
    args = p.parse_args(argv)
    objects = _objects(args.file)
    if args.what == "link":
        lines = check_link(objects[-1], args.rtt_ms, args.rate_mbit, args.tol)
    else:
        runs = {o["mode"]: o for o in objects}
        lines = check_greedy(runs, [m for m in args.speculated.split(",") if m], args.floor)
        lines.append((f"text: {runs['cloud']['text']!r}", True))
    for text, _ in lines:
        print(f"{args.prefix}: {text}")
    if args.what == "greedy" and args.table:
        from picospec.edge_client.cli import format_legend, format_table
        print(format_table(objects))
        print(format_legend(objects))
    return 0 if all(ok for _, ok in lines) else 1


if __name__ == "__main__":
    sys.exit(main())
