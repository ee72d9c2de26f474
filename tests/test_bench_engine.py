"""picospec-bench engine's pure parts: the acceptance it reads, and the speedup it predicts from pass times."""
from __future__ import annotations

import pytest

from picospec.bench.engine import ACCEPTANCE_CSV, best_speedup, measured_acceptance, parse_acceptance, render_rows, RowsTiming


def test_acceptance_is_read_from_the_committed_sweep_per_prompt():
    acc = measured_acceptance(ACCEPTANCE_CSV)
    assert set(acc) == {"chat", "code", "prose"}
    assert acc["code"] > 0.8 > acc["chat"] > 0.2  # the coder pair agrees on code, barely elsewhere
    assert parse_acceptance("chat=0.37, code=0.9") == {"chat": 0.37, "code": 0.9}
    with pytest.raises(ValueError, match="outside"):
        parse_acceptance("code=1.0")


def test_flat_passes_make_long_drafts_pay_and_dear_passes_or_a_slow_edge_do_not():
    flat = {1: 0.010, 2: 0.010, 4: 0.010, 8: 0.010, 16: 0.010, 32: 0.010}
    speedup, g = best_speedup(flat, 0.9, 0.0, 0.0)
    assert g == 31 and speedup == pytest.approx((1 - 0.9 ** 32) / 0.1, rel=1e-6)  # every position free
    steep = {n: 0.010 * n for n in flat}  # a pass costs its size: speculation cannot pay
    assert best_speedup(steep, 0.9, 0.0, 0.0) == (1.0, 0)
    assert best_speedup(flat, 0.9, 0.020, 0.020)[1] == 0  # an edge slower than the cloud's decode: decode alone


def test_rows_table_states_the_aggregate_over_one_row():
    lines = render_rows([RowsTiming("t", "bf16", "graphs", 5, {1: 0.010, 8: 0.012})])
    assert any("| 8 | 12.00 | 3,333 | 6.67x |" in line for line in lines)
