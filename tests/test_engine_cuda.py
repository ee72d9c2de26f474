"""The static engine on CUDA: captured graphs give what eager passes give, and what transformers gives, and a
greedy decode through graphs is the target's own. Skipped without a GPU (an allowed skip, also under CI).

Imports nothing from tests/conftest.py, so that a bare GPU machine runs it with `pytest --noconftest`."""
from __future__ import annotations

import pytest
import torch

from picospec.cloud_server.engine import EngineOptions, StaticEngine
from picospec.shared.hf_backend import HFBackend
from picospec.shared.models import load_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device: the engine's graphs need a GPU (allowed skip, also under CI)")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _ids(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(3, min(vocab, 5000), (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_graph_passes_equal_eager_and_transformers(dtype, tolerance):
    model = load_model("random:qwen2.5-0.5b:layers=4", device="cuda", dtype=dtype, progress=False).model
    opts = EngineOptions(slots=3, max_len=1200, buckets=(1, 2, 4, 8, 16, 32))
    graphs, eager = StaticEngine(model, opts), StaticEngine(model, EngineOptions(**{**opts.__dict__, "graphs": False}))
    assert graphs.graphs and not eager.graphs
    seq = _ids(1100, model.config.vocab_size, 0)
    g, e, h = graphs.backend(), eager.backend(), HFBackend(model, "cuda")
    for be in (g, e, h):
        be.prefill(seq[:600])
    for n, start in ((1, 600), (3, 601), (16, 604), (32, 620), (5, 1000)):  # 3 and 5: padded to buckets 4 and 8
        outs = [be.logits_at(seq[:start + n], start - 1) for be in (g, e, h)]
        assert _rel(outs[0], outs[1]) < tolerance, (n, start)
        assert _rel(outs[0], outs[2]) < tolerance, (n, start)


def test_greedy_through_graphs_is_the_targets_own():
    """tiny-random's peaked distributions: argmax is far from ties, so float32 passes of any size agree."""
    model = load_model("tiny-random", device="cuda", progress=False).model
    engine = StaticEngine(model, EngineOptions(slots=2, max_len=512))
    prompt = _ids(20, 64, 1)
    with torch.inference_mode():
        ref = model.generate(torch.tensor([prompt], device="cuda"), do_sample=False, max_new_tokens=60,
                             min_new_tokens=60, pad_token_id=0)[0, len(prompt):].tolist()
    be, out = engine.backend(), []
    logits = be.prefill(prompt)
    eos_free = logits.clone()
    for _ in range(60):
        eos_free = logits.clone()
        eos_free[1] = float("-inf")  # min_new_tokens above: generate never picks EOS
        out.append(int(eos_free.argmax()))
        logits = be.forward([out[-1]])[-1]
    assert out == ref
    # a verification-sized pass over the same tokens picks the same argmaxes (drafts all accepted under greedy)
    rows = be.logits_at(prompt + out, len(prompt) - 1)[:-1].clone()
    rows[:, 1] = float("-inf")
    assert rows.argmax(-1).tolist() == out


def test_batched_rows_in_a_graph_equal_each_row_alone():
    """Three sessions' rows of 1, 3 and 5 tokens replay the (4 rows, 8 tokens) graph: the padding row and the
    padded tokens change no real row's logits."""
    from picospec.cloud_server.engine.model import Row

    model = load_model("random:qwen2.5-0.5b:layers=4", device="cuda", dtype=torch.float32, progress=False).model
    opts = EngineOptions(slots=5, max_len=600, buckets=(1, 8), batch_buckets=(1, 4))
    graphs, eager = StaticEngine(model, opts), StaticEngine(model, EngineOptions(**{**opts.__dict__, "graphs": False}))
    rows = []
    for i, n in enumerate((1, 3, 5)):
        seq = _ids(300 + 40 * i + n, model.config.vocab_size, 10 + i)
        for engine in (graphs, eager):
            engine.backend().prefill(seq[:-n])
        rows.append(Row(i, seq[-n:], len(seq) - n))
    assert graphs._graph_for(3, 5, max(r.start for r in rows) + 5) is graphs.graphs[(4, 8, 512)]
    together = graphs.run(rows)
    for row, got in zip(rows, together):
        assert _rel(got, eager.run([row])[0]) < 1e-4


def test_a_tree_row_through_a_graph_equals_linear_forwards():
    """A token tree (shared/trees.py) as one row replaying a graph: each node's logits are those of a linear
    forward of its path, and after compacting the kept path the slot continues as a linear cache."""
    from picospec.cloud_server.engine.model import Row
    from picospec.shared.trees import ROOT, path_to

    model = load_model("random:qwen2.5-0.5b:layers=4", device="cuda", dtype=torch.float32, progress=False).model
    engine = StaticEngine(model, EngineOptions(slots=2, max_len=600, buckets=(1, 8)))
    prefix = _ids(200, model.config.vocab_size, 3)
    tokens, parents = [prefix[-1], 11, 12, 20, 21, 30], [ROOT, 0, 0, 1, 2, 3]
    be = engine.backend()
    be.prefill(prefix[:-1])
    assert engine._graph_for(1, len(tokens), be.length + len(tokens)) is not None
    logits = engine.run([Row(be.slot, tokens, be.length, 0, None, parents)])[0]
    for node in range(len(tokens)):
        ref = HFBackend(model, "cuda").forward(prefix[:-1] + [tokens[i] for i in path_to(parents, node)])[-1]
        assert _rel(logits[node], ref) < 1e-4, node
    engine.compact(be.slot, [be.length + i for i in (0, 1, 3, 5)], be.length)
    be.tokens.extend([prefix[-1], 11, 20, 30])
    ref = HFBackend(model, "cuda")
    ref.forward(prefix + [11, 20, 30])
    assert _rel(be.forward([40])[-1], ref.forward([40])[-1]) < 1e-4


def test_a_batch_of_prefill_and_decode_rows_runs_eager_on_cuda():
    """What failed in cuDNN's attention on an H100 (serve, 16 sessions): 16 rows, prompts of ~90 tokens beside
    single decode tokens, in one eager pass; each row as it gives alone."""
    from picospec.cloud_server.engine.model import Row

    model = load_model("random:qwen2.5-0.5b:layers=2", device="cuda", dtype=torch.bfloat16, progress=False).model
    engine = StaticEngine(model, EngineOptions(slots=17, max_len=320, batch_buckets=(1, 2, 4, 8)))
    rows = []
    for i in range(16):
        be = engine.backend()
        seq = _ids(120, model.config.vocab_size, 40 + i)
        if i % 2:
            be.prefill(seq[:100])
            rows.append(Row(be.slot, seq[100:101], 100))
        else:
            rows.append(Row(be.slot, seq[:80 + i], 0))
    together = engine.run(rows)
    for row, got in zip(rows, together):
        assert torch.isfinite(got).all() and _rel(got, engine.run([row])[0]) < 3e-2


def test_the_clouds_engine_replays_a_graph_for_a_batch_of_every_admitted_session():
    """The cloud captures rows up to the first power of two holding --max-sessions (24 -> 32; rows were captured
    only up to 8, so wider batches ran eager): 20 sessions' decode rows replay the 32-row graph, padded with scratch
    rows, and each row gives what it gives alone."""
    from picospec.cloud_server.engine_setup import graph_rows
    from picospec.cloud_server.engine.model import Row

    model = load_model("random:qwen2.5-0.5b:layers=2", device="cuda", dtype=torch.float32, progress=False).model
    engine = StaticEngine(model, EngineOptions(slots=25, max_len=320, buckets=(1, 2, 4),
                                               batch_buckets=graph_rows(24, batching=True), max_graph_tokens=256))
    assert (32, 4, max(engine.kv_buckets())) in engine.graphs
    rows = []
    for i in range(20):
        be = engine.backend()
        seq = _ids(60, model.config.vocab_size, 80 + i)
        be.prefill(seq[:50])
        rows.append(Row(be.slot, seq[50:51 + i % 3], 50))  # 1 to 3 tokens: the 32-row graph of bucket 4
    assert engine._graph_for(len(rows), 3, 53).rows == 32
    together = engine.run(rows)
    for row, got in zip(rows, together):
        assert _rel(got, engine.run([row])[0]) < 1e-4
