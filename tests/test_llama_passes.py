"""bench/llama_passes: the pass-cost table, and with --neighbour the same model timed alone, beside another model
decoding on another core (a process of its own, gone afterwards), and alone again. Timings are not asserted."""
from __future__ import annotations

import json
import os

import pytest

from picospec.bench import llama_passes
from tests.conftest import skip_large

SMOL = "smollm2-135m-instruct"


@skip_large
def test_passes_are_timed_alone_beside_a_neighbour_and_alone_again(tmp_path, capsys, monkeypatch):
    started = []
    real_neighbour = llama_passes.neighbour

    def watched(name, core, threads):
        started.append((name, core))
        return real_neighbour(name, core, threads)

    monkeypatch.setattr(llama_passes, "neighbour", watched)
    out = tmp_path / "passes.json"
    llama_passes.main(["--models", SMOL, "--sizes", "1,2", "--repeats", "2", "--context", "8", "--neighbour", SMOL,
                       "--neighbour-core", str(min(os.sched_getaffinity(0))), "--out", str(out)])
    table = json.loads(out.read_text())["ms"]
    labels = [f"{SMOL} (alone)", f"{SMOL} ({SMOL} decoding on core {min(os.sched_getaffinity(0))})",
              f"{SMOL} (alone again)"]
    assert list(table) == labels and started == [(SMOL, min(os.sched_getaffinity(0)))]
    assert all(set(row) == {"1", "2"} and all(ms > 0 for ms in row.values()) for row in table.values())
    printed = capsys.readouterr().out
    assert all(f"| {label} |" in printed for label in labels), printed


def test_a_neighbour_that_cannot_start_is_an_error_not_a_hang():
    with pytest.raises(RuntimeError, match="did not start"):
        with llama_passes.neighbour("no-such-model", min(os.sched_getaffinity(0)), 1):
            pass
