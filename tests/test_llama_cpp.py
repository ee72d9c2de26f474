"""The llama.cpp engine (shared/llama_backend.py): a GGUF run as shipped, as the draft and as the target.

References are independent of the backend under test: llama-cpp-python's own `Llama` over the same file
(tests/llama_reference.py) for logits, greedy generation and the output law; transformers for the torch side.
SmolLM2-135M (98 MB) carries most tests; the default Qwen pair (a real 0.5B draft for the 1.5B) the law test with
real disagreement between draft and target.
"""
from __future__ import annotations

import asyncio
import os
import random
import shutil

import grpc
import numpy as np
import pytest
import torch

from picospec.bench.jitter import Jitter
from picospec.shared.backend import make_backend
from picospec.shared.hf_backend import HFBackend
from picospec.shared.llama_backend import GgufModel, LlamaCppBackend, LlamaCppError
from picospec.shared.models import (ModelError, gguf_file, is_gguf_name, load_gguf_model, load_model,
                                    resolve_engine)
from tests.conftest import SKIP_LARGE, edge, run, serving, skip_large
from tests.law import ALPHA_TIMED, T1, LawCheck
from tests.llama_reference import BATCH_NOISE, LlamaReference

SMOL = "smollm2-135m-instruct"
PROMPTS = ("The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village by the sea,")


@pytest.fixture(scope="module")
def smol_gguf():
    return load_gguf_model(SMOL, threads=1, progress=False)


@pytest.fixture(scope="module")
def smol_reference():
    return LlamaReference(gguf_file(SMOL, progress=False))


@pytest.fixture(scope="module")
def smol_torch_draft():
    """The torch target's first 8 layers: a draft that disagrees with SmolLM2 often (rejections on every prompt)."""
    return load_model(f"{SMOL}:layers=8", progress=False)


# ---------------------------------------------------------------------------------------------- the backend

def test_backend_logits_equal_llama_cpp_own(smol_gguf, smol_reference):
    ids = smol_gguf.tokenizer(PROMPTS[2])["input_ids"]
    b = smol_gguf.model.backend(n_ctx=64)
    b.reset()
    ours = torch.from_numpy(np.concatenate([b.forward(ids[:5]), b.forward(ids[5:9], num_logits=2),
                                            b.forward(ids[9:])]))                                 # [n - 2, V]
    ref = smol_reference(torch.tensor([ids])).logits[0]                                             # [n, V]
    expected = torch.cat([ref[:5], ref[7:9], ref[9:]])
    assert ours.shape == expected.shape and ours.dtype == torch.float32
    assert torch.allclose(ours, expected, atol=2e-2, rtol=0), (ours - expected).abs().max()
    assert (ours.argmax(-1) == expected.argmax(-1)).all()


def test_rollback_storm_matches_a_fresh_cache(smol_gguf):
    """Random truncations and extensions: after each, the logits equal those of a cache that ran the sequence once
    (up to the noise of batching the positions differently)."""
    rng = random.Random(7)
    ids = smol_gguf.tokenizer(" ".join(PROMPTS * 3))["input_ids"]
    b, fresh = smol_gguf.model.backend(n_ctx=32), smol_gguf.model.backend(n_ctx=256)  # 32: grows past it
    b.reset()
    b.forward(ids[:3])
    for _ in range(40):
        b.truncate(rng.randrange(1, b.length + 1))
        end = min(len(ids), b.length + rng.randrange(1, 6))
        got = b.forward(ids[b.length:end])
        fresh.reset()
        want = fresh.forward(ids[:end])[-len(got):]
        assert b.tokens == ids[:end]
        # equal up to llama.cpp's batch noise (a stale entry left in the cache moves them by several units)
        assert np.abs(got - want).max() <= BATCH_NOISE
    assert b.n_ctx >= len(ids) > 32
    b.close()
    fresh.close()


def test_logits_width_padding_and_out_of_width_ids(smol_gguf):
    """A session wider than the GGUF: logits padded with -inf; an id past the model's width is fed as id 0."""
    width = smol_gguf.model.config.vocab_size
    b = make_backend(smol_gguf.model, logits_width=width + 64)
    assert isinstance(b, LlamaCppBackend)
    b.reset()
    out = b.forward([1, 2, width + 10])
    assert out.shape == (3, width + 64) and np.isneginf(out[:, width:]).all()
    b.reset()
    assert np.array_equal(b.forward([1, 2, 0])[:, :width], out[:, :width])


def test_engine_names_and_refusals(tmp_path):
    assert is_gguf_name(SMOL) and not is_gguf_name(f"{SMOL}:int8") and not is_gguf_name("tiny-random")
    assert resolve_engine(SMOL, "auto") == "llama.cpp" and resolve_engine(f"{SMOL}:int8", "auto") == "torch"
    with pytest.raises(ModelError, match="as shipped"):
        gguf_file(f"{SMOL}:int8")
    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ModelError, match="not a GGUF file"):
        load_gguf_model(str(not_gguf), progress=False)
    truncated = tmp_path / "truncated.gguf"
    with open(gguf_file(SMOL, progress=False), "rb") as src, open(truncated, "wb") as dst:
        dst.write(src.read(5_000_000))
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ModelError, match="could not load"):
        load_gguf_model(str(truncated), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written beside it


def test_gpu_layers_need_a_gpu_build_of_llama_cpp():
    with pytest.raises(LlamaCppError, match="no GPU backend"):
        GgufModel(gguf_file(SMOL, progress=False), gpu_layers=2)


# /proc/cpuinfo's flag -> the feature llama.cpp reports when its CPU code uses it (x86-64; arm64's: asimddp, sve)
CPU_FLAG_FEATURES = {"avx2": "AVX2", "fma": "FMA", "f16c": "F16C", "avx512f": "AVX512", "avx512vbmi": "AVX512_VBMI",
                     "avx512_vnni": "AVX512_VNNI", "avx512_bf16": "AVX512_BF16", "asimddp": "DOTPROD", "sve": "SVE"}


def test_the_best_cpu_variant_of_llama_cpp_is_the_one_loaded():
    """make install's wheel carries llama.cpp's CPU code once per instruction-set level (scripts/build_llama_cpp.sh)
    and the engines load the best this CPU runs, not the wheel's floor: a build for AVX2 alone decoded the 1.5B target
    1.2x slower on this AVX-512 machine (docs/results/llama_cpu_variants)."""
    import llama_cpp

    from picospec.shared.llama_backend import cpu_features

    lib = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    variants = [n for n in os.listdir(lib) if n.startswith("libggml-cpu-")]
    assert len(variants) > 3, f"{lib}: no CPU variants ({variants}): a wheel not built by scripts/build_llama_cpp.sh"
    with open("/proc/cpuinfo") as f:
        flags = {w for line in f if line.startswith(("flags", "Features")) for w in line.split(":", 1)[1].split()}
    expected = {feature for flag, feature in CPU_FLAG_FEATURES.items() if flag in flags}
    assert expected, f"none of {sorted(CPU_FLAG_FEATURES)} in /proc/cpuinfo: a CPU this test does not know"
    loaded = set(cpu_features())
    assert expected <= loaded, f"the CPU has {sorted(expected - loaded)} but llama.cpp's loaded code does not use them"


def test_a_corrupted_cached_gguf_is_reassembled_from_its_packages(tmp_path, monkeypatch):
    """The assembled built-in is re-hashed on every load: a flipped byte is never run, the file is rebuilt."""
    monkeypatch.setenv("PICOSPEC_CACHE", str(tmp_path))
    path = gguf_file(SMOL, progress=False)
    with open(path, "r+b") as f:
        f.seek(4096)
        byte = f.read(1)
        f.seek(4096)
        f.write(bytes([byte[0] ^ 0xFF]))
    again = gguf_file(SMOL, progress=False)
    with open(again, "rb") as f:
        f.seek(4096)
        assert f.read(1) == byte
    shutil.rmtree(tmp_path / "gguf")


def test_a_gguf_assembled_before_is_served_from_a_read_only_cache(monkeypatch):
    """A container mounts the model cache read-only: a GGUF (and its tokenizer) checked there loads without the lock
    file assembling takes, which a read-only mount refuses (EROFS)."""
    from picospec.shared import models

    gguf_file(SMOL, progress=False)  # assembled (and its tokenizer saved) in the usual cache
    models.gguf_tokenizer(SMOL, progress=False)

    def read_only(path):
        raise OSError(30, "Read-only file system", str(path))
    monkeypatch.setattr(models, "_lock", read_only)
    assert gguf_file(SMOL, progress=False).is_file()
    assert len(models.load_tokenizer(SMOL, engine="llama.cpp", progress=False)) == 49152


def test_the_gguf_tokenizer_is_the_converted_models(smol_gguf):
    """The fingerprint the handshake compares: the GGUF's tokenizer and the torch copy's are one tokenizer."""
    from picospec.shared.fingerprint import eos_token_ids, tokenizer_fingerprint

    torch_smol = load_model(SMOL, progress=False)
    assert tokenizer_fingerprint(smol_gguf.tokenizer) == tokenizer_fingerprint(torch_smol.tokenizer)
    assert eos_token_ids(smol_gguf.model, smol_gguf.tokenizer) == eos_token_ids(torch_smol.model, torch_smol.tokenizer)
    assert smol_gguf.model.config.vocab_size == torch_smol.model.config.vocab_size


# ---------------------------------------------------------------------------------------------- end to end, greedy

def test_cloud_alone_on_llama_cpp_equals_llama_cpp_greedy(smol_gguf, smol_reference):
    n = 32

    async def scenario():
        out = []
        async with serving(smol_gguf, engine="llama.cpp") as (_, addr), \
                edge(addr, smol_gguf, max_new_tokens=n, ignore_eos=True) as client:
            for prompt in PROMPTS:
                ids = smol_gguf.tokenizer(prompt)["input_ids"]
                gen = client.generate(ids, mode="cloud")
                out.append((ids, await gen.collect(), gen.stats.to_dict()))
        return out

    for ids, tokens, st in run(scenario()):
        assert tokens == smol_reference.greedy(ids, n), smol_gguf.tokenizer.decode(ids)
        assert st["cloud_ms_per_token"] > 0


# stop-and-wait runs the same passes however fast the machine is (beside another test: make test's parallel half); the
# pipeline's passes follow timing, and so, through llama.cpp's batch noise, may its near-ties
_ANY_SPEED = pytest.mark.parallel


@pytest.mark.parametrize("mode,verify", [
    pytest.param("sync", "dense", marks=_ANY_SPEED), pytest.param("sync", "split-exact", marks=_ANY_SPEED),
    pytest.param("sync", "coupled", marks=_ANY_SPEED), ("pipeline", "coupled"), ("pipeline", "dense"),
    pytest.param("early-exit", "coupled", marks=_ANY_SPEED)])
def test_speculation_with_a_llama_cpp_draft_and_target_equals_llama_cpp_greedy(smol_gguf, smol_reference,
                                                                               smol_torch_draft, mode, verify):
    """The llama.cpp target verifies a torch draft that is often wrong (rejections on every prompt): every token is
    the target's argmax up to llama.cpp's batch noise (its logits move by up to BATCH_NOISE with the batch a position
    ran in, so a near-tie may go either way; llama.cpp's own speculative decoding shares this), and most are exactly
    its own greedy tokens. The llama.cpp draft drafts for a torch target: exactly transformers' greedy output.
    Early-exit hints are refused by a llama.cpp cloud (no tentative logits mid-pass), so that case runs the llama.cpp
    draft against the torch target."""
    n = 24
    torch_smol = load_model(SMOL, progress=False)

    async def scenario(target, draft, engine):
        out = []
        async with serving(target, engine=engine) as (_, addr), \
                edge(addr, draft, max_new_tokens=n, ignore_eos=True, verify=verify, draft_len=3,
                     decode_ahead="off") as client:
            for prompt in PROMPTS:
                ids = target.tokenizer(prompt)["input_ids"]
                gen = client.generate(ids, mode=mode)
                out.append((ids, await gen.collect(), gen.stats.to_dict()))
        return out

    if mode != "early-exit":
        same = 0
        for ids, tokens, st in run(scenario(smol_gguf, smol_torch_draft, "llama.cpp")):
            gaps = smol_reference.top_gaps(ids, tokens)
            assert max(gaps) <= BATCH_NOISE, (smol_gguf.tokenizer.decode(ids), gaps)
            same += sum(gap == 0.0 for gap in gaps)
            assert st["rounds"] > 0 and st["drafted_tokens"] > st["accepted_tokens"], st
        # most tokens exactly the top of llama.cpp's logits over the sequence: not of its own greedy generation (a
        # token a call), which parts from those at near-ties (with the AVX-512 code after 24, 13 and 5 of 24 tokens
        # on these prompts, where every token here was the top of the former)
        assert same >= 0.9 * 3 * n, f"only {same} of {3 * n} tokens are the top of llama.cpp's logits over the sequence"
    with torch.inference_mode():
        for ids, tokens, st in run(scenario(torch_smol, smol_gguf, "hf")):
            ref = torch_smol.model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n, min_new_tokens=n)
            assert tokens == ref[0, len(ids):].tolist(), smol_gguf.tokenizer.decode(ids)
            assert st["rounds"] > 0 and st["accepted_tokens"] > 0, st


def test_a_llama_cpp_cloud_refuses_early_exit_hints(smol_gguf, smol_torch_draft):
    async def scenario():
        async with serving(smol_gguf, engine="llama.cpp") as (_, addr), \
                edge(addr, smol_torch_draft, max_new_tokens=8) as client:
            ids = smol_gguf.tokenizer(PROMPTS[0])["input_ids"]
            with pytest.raises(Exception, match="early-exit hints need a torch engine"):
                await client.generate(ids, mode="early-exit").collect()

    run(scenario())


def test_a_llama_cpp_draft_of_another_tokenizer_is_refused_at_connect(smol_gguf, tiny_target):
    async def scenario():
        async with serving(tiny_target) as (_, addr), edge(addr, smol_gguf, max_new_tokens=4) as client:
            with pytest.raises(Exception, match="tokenizer"):
                await client.generate([5, 6, 7], mode="sync").collect()

    run(scenario())


def test_sessions_batched_in_one_llama_cpp_context_get_llama_cpp_greedy(smol_gguf, smol_reference, smol_torch_draft):
    """--batching on with the llama.cpp target: six sessions (speculative in every exact mode, and the cloud alone)
    through four slots of one context, their rows decoded together: every token within llama.cpp's batch noise of
    its top logit and most exactly llama.cpp's own greedy tokens; rejections crop each session's sequence alone; a
    slot given back is found clean by the next session; the sessions shared passes. Token trees are refused."""
    n = 20
    sessions = [("pipeline", "coupled", 0), ("sync", "dense", 3), ("cloud", "coupled", 0), ("sync", "split-exact", 2),
                ("pipeline", "dense", 4), ("sync", "coupled", 2)]

    async def scenario():
        async with serving(smol_gguf, engine="llama.cpp", batching="on", max_sessions=4, max_context=256,
                           max_wait_ms=2000.0) as (service, addr):
            async def one(i: int, mode: str, verify: str, g: int):
                ids = smol_gguf.tokenizer(PROMPTS[i % 3] + " " * (i // 3))["input_ids"]
                async with edge(addr, smol_torch_draft, max_new_tokens=n, ignore_eos=True, verify=verify,
                                draft_len=g, decode_ahead="off", admission_wait_s=120.0) as client:
                    gen = client.generate(ids, mode=mode)
                    return ids, await gen.collect(), gen.stats.to_dict()

            out = await asyncio.gather(*(one(i, *s) for i, s in enumerate(sessions)))
            async with edge(addr, smol_torch_draft, max_new_tokens=4, verify="coupled") as client:
                with pytest.raises(Exception, match="cannot verify token trees"):
                    await client.generate(out[0][0], mode="sync", tree_budget=4).collect()
            return out, service.batcher.stats

    out, stats = run(scenario())
    same = 0
    for (ids, tokens, st), (mode, _, _) in zip(out, sessions):
        gaps = smol_reference.top_gaps(ids, tokens)
        assert len(tokens) == n and max(gaps) <= BATCH_NOISE, (smol_gguf.tokenizer.decode(ids), gaps)
        same += sum(gap == 0.0 for gap in gaps)
        if mode != "cloud":
            assert st["rounds"] > 0 and st["drafted_tokens"] > st["accepted_tokens"], st  # rejections, crops
    assert same >= 0.9 * 6 * n, f"only {same} of {6 * n} tokens are the top of llama.cpp's logits over the sequence"
    assert stats.mean_rows > 1, "the sessions never shared a pass"


def test_sessions_batched_in_one_llama_cpp_context_follow_the_targets_law(smol_gguf, smol_reference, smol_torch_draft):
    """T=1 with --batching on: three sessions at once through one llama.cpp context (their rows decoded together,
    each cropped on its own rejections), six generations each in the three exact modes, stop-and-wait and
    pipelined: the output law is the llama.cpp target's (tests/law.py). Which rows share a pass moves llama.cpp's
    logits by its batch noise, so the tokens depend on timing: tested at ALPHA_TIMED."""
    law = LawCheck(smol_reference, T1, ranking=smol_torch_draft.model, alpha=ALPHA_TIMED)  # coupled among the modes
    verify_modes = ("dense", "split-exact", "coupled")

    async def scenario():
        async with serving(smol_gguf, engine="llama.cpp", batching="on", max_sessions=3, max_context=256,
                           max_wait_ms=2000.0) as (service, addr):
            async def session(i: int) -> list[tuple[list[int], list[int], list[str]]]:
                out = []
                async with edge(addr, smol_torch_draft, max_new_tokens=24, ignore_eos=True, temperature=1.0,
                                verify=verify_modes[i], decode_ahead="off", admission_wait_s=120.0) as client:
                    for seed in range(6):
                        ids = smol_gguf.tokenizer(PROMPTS[(i + seed) % 3])["input_ids"]
                        gen = client.generate(ids, mode="pipeline" if seed % 2 else "sync", seed=10 * i + seed,
                                              draft_len=2 + seed % 2)
                        out.append((ids, await gen.collect(), list(gen.stats.token_kinds)))
                return out

            runs = await asyncio.gather(*(session(i) for i in range(3)))
            return [r for rs in runs for r in rs], service.batcher.stats

    generations, stats = run(scenario())
    for ids, tokens, kinds in generations:
        law.add(ids, tokens, kinds)
    assert stats.mean_rows > 1, "the sessions never shared a pass"
    law.assert_matches("sessions batched in one llama.cpp context, T=1")


# ---------------------------------------------------------------------------------------------- token trees

def _path_to(node: int, tokens: list[int], parents: list[int]) -> list[int]:
    """The tokens from the root down to node."""
    path = []
    while node != -1:
        path.append(tokens[node])
        node = parents[node]
    return path[::-1]


def _below(node: int, top: int, parents: list[int]) -> bool:
    """node lies strictly below top."""
    while parents[node] != -1:
        node = parents[node]
        if node == top:
            return True
    return False


@pytest.mark.parallel
def test_tree_nodes_see_exactly_their_path(smol_gguf):
    """Each node's logits are a linear forward's of its path (llama.cpp's sequences hide siblings and cousins), over
    random trees extended in several calls; reroot moves one root into line and keeps the nodes under it, which grow
    on; after drop the cache is linear again (its next forward and a rollback are a fresh cache's). A tree given up
    without keep leaves nothing behind for the next one. Equal up to llama.cpp's batch noise, which moves a linear
    cache's logits as much (a position's logits depend on the batch it ran in); a node that saw one token more or
    less than its path is off by more than the noise and twice its own path's difference (checked)."""
    prompt = smol_gguf.tokenizer(PROMPTS[1])["input_ids"]
    model = smol_gguf.model

    def linear(seq: list[int]) -> np.ndarray:
        return model.backend(n_ctx=128).prefill(seq)                                  # [V]

    def check(kv, rows, first: int) -> None:
        for i, row in enumerate(rows):
            path = _path_to(first + i, kv.tokens, kv.parents)
            off = np.abs(row - linear(b.tokens + path)).max()
            assert off <= BATCH_NOISE, (first + i, path)
            assert np.abs(row - linear(b.tokens + [7] + path)).max() > max(BATCH_NOISE, 2 * off)  # one more: far off

    rng = random.Random(5)
    b = model.backend(n_ctx=128)
    b.prefill(prompt)
    b.tree(room=8).extend([7, 8, 9], [-1, 0, 0])  # given up: its sequences must not leak into the next tree
    for _ in range(3):
        kv = b.tree(room=40)
        for size in (3, 1, 5):  # parents anywhere before, in this call or an earlier one
            first = len(kv.tokens)
            rows = kv.extend([rng.randrange(100, 40000) for _ in range(size)],
                             [rng.randrange(-1, first + i) for i in range(size)])                # [size, V]
            check(kv, rows, first)
        tokens, parents = list(kv.tokens), list(kv.parents)
        root = rng.choice([i for i in range(len(tokens)) if parents[i] == -1])
        under = [i for i in range(len(tokens)) if _below(i, root, parents)]
        moved = kv.reroot([root], under)
        assert b.tokens[-1] == tokens[root] and kv.tokens == [tokens[i] for i in under]
        assert [kv.parents[moved[i]] for i in under] == [-1 if parents[i] == root else moved[parents[i]] for i in under]
        first = len(kv.tokens)
        check(kv, kv.extend([77, 78], [-1, first]), first)  # the kept nodes grow on under the new root
        kv.drop()
        assert np.abs(b.forward([42], num_logits=1)[-1] - linear(b.tokens[:-1] + [42])).max() <= BATCH_NOISE
    assert b.length == len(prompt) + 6
    b.truncate(len(prompt))
    assert np.abs(b.forward([9])[-1] - linear(prompt + [9])).max() <= BATCH_NOISE


def test_a_llama_cpp_tree_refuses_what_it_cannot_hold(smol_gguf):
    prompt = smol_gguf.tokenizer(PROMPTS[0])["input_ids"]
    b = smol_gguf.model.backend(n_ctx=64)
    b.prefill(prompt)
    kv = b.tree(room=8)
    assert b.n_ctx >= len(prompt) + 8
    kv.extend([5] * 200, [-1] * 200)  # room is a size hint: the context grows no further while a tree is held
    with pytest.raises(ValueError, match="at most 255 nodes"):
        kv.extend([5] * 56, [-1] * 56)
    with pytest.raises(ValueError, match="not an earlier node"):
        kv.extend([5], [200])
    for _ in range(2):  # 55 more nodes fit the sequence ids, not the context: refused, and the tree left as it was
        with pytest.raises(LlamaCppError, match="no room left in the context"):
            kv.extend([5] * 55, [-1] * 55)
    assert len(kv.tokens) == 200 and kv.extend([6], [3]).shape[0] == 1
    kv.keep([3, 200])
    assert b.tokens == prompt + [5, 6]


def test_token_trees_with_a_llama_cpp_draft_and_a_llama_cpp_target(smol_gguf, smol_reference, smol_torch_draft):
    """Trees both ways, greedy: the llama.cpp draft grows trees (with idle-time growth and re-rooting) for the torch
    target, exactly transformers' greedy output; the llama.cpp target verifies a torch draft's trees, every token
    within llama.cpp's batch noise of its top logit and most exactly llama.cpp's own greedy tokens."""
    n = 24
    torch_smol = load_model(SMOL, progress=False)

    async def scenario(target, draft, engine):
        out = []
        async with serving(target, engine=engine) as (_, addr), \
                edge(addr, draft, max_new_tokens=n, ignore_eos=True, verify="coupled", decode_ahead="off") as client:
            for prompt in PROMPTS:
                ids = target.tokenizer(prompt)["input_ids"]
                gen = client.generate(ids, mode="sync", tree_budget=6)
                out.append((ids, await gen.collect(), gen.stats.to_dict()))
        return out

    with torch.inference_mode():
        for ids, tokens, st in run(scenario(torch_smol, smol_gguf, "hf")):
            ref = torch_smol.model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n, min_new_tokens=n)
            assert tokens == ref[0, len(ids):].tolist(), smol_gguf.tokenizer.decode(ids)
            assert st["rounds"] > 0 and st["drafted_tokens"] > st["accepted_tokens"] > 0, st
    same = 0
    for ids, tokens, st in run(scenario(smol_gguf, smol_torch_draft, "llama.cpp")):
        gaps = smol_reference.top_gaps(ids, tokens)
        assert max(gaps) <= BATCH_NOISE, (smol_gguf.tokenizer.decode(ids), gaps)
        same += next((i for i, (a, b) in enumerate(zip(tokens, smol_reference.greedy(ids, n))) if a != b), n)
        assert st["drafted_tokens"] > st["accepted_tokens"] + st["rounds"], st
    assert same >= 2 * n, f"only {same} of {3 * n} tokens before the first difference from llama.cpp's greedy"


# ---------------------------------------------------------------------------------------------- the law, T = 1

@pytest.fixture(scope="module")
def qwen_pair():
    """The default pair on llama.cpp, and llama-cpp-python's own `Llama` over each GGUF (the law's reference, and
    the q/p ranking), loaded once for the module."""
    if SKIP_LARGE:
        pytest.skip("PICOSPEC_SKIP_LARGE=1 (make test-fast)")
    target = load_gguf_model("qwen2.5-coder-1.5b-instruct", threads=1, progress=False)
    draft = load_gguf_model("qwen2.5-coder-0.5b-instruct", threads=1, progress=False)
    return (target, draft, LlamaReference(gguf_file(target.name, progress=False), n_ctx=256),
            LlamaReference(gguf_file(draft.name, progress=False), n_ctx=256))


@skip_large
@pytest.mark.parallel
@pytest.mark.parametrize("verify", ["coupled", "dense", "split-exact", "coupled-trees"])
def test_qwen_pair_on_llama_cpp_follows_the_llama_cpp_targets_law(qwen_pair, verify):
    """The default pair, both on llama.cpp, at T=1: the output law is the llama.cpp target's (its teacher-forced
    logits from `Llama`, tests/law.py's PIT test), with a real draft (acceptance about 0.7), sync and the jittered
    pipeline with decode-ahead; 10 generations x 20 tokens. `coupled-trees`: token trees of 6 nodes (stop-and-wait,
    no decode-ahead), grown on the llama.cpp draft and verified on the llama.cpp target (shared/llama_tree.py).
    llama.cpp's logits move with the batch a position runs in, and the pipeline's batches (and what a tree's idle
    growth computes) follow timing, so the tokens differ from run to run: tested at ALPHA_TIMED."""
    trees = verify == "coupled-trees"
    target, draft, target_ref, draft_ref = qwen_pair
    law = LawCheck(target_ref, T1, ranking=draft_ref, alpha=ALPHA_TIMED)
    prompts = [target.tokenizer.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True,
                                                    tokenize=True, return_dict=True)["input_ids"]
               for c in ("Write a Python function that reverses a string.", "Name three rivers in Europe.")]
    totals = {"rounds": 0, "accepted": 0, "drafted": 0}

    async def scenario():
        async with serving(target, engine="llama.cpp") as (service, addr):
            service.hooks = Jitter(3, 0.001)
            async with edge(addr, draft, max_new_tokens=20, ignore_eos=True, verify="coupled" if trees else verify,
                            temperature=1.0, decode_ahead="off" if trees else "on") as client:
                client.hooks = Jitter(4, 0.001)
                for seed in range(10):
                    ids = list(prompts[seed % 2])
                    shape = dict(tree_budget=6) if trees else dict(draft_len=2 + seed % 3)
                    gen = client.generate(ids, mode="sync" if seed % 2 or trees else "pipeline", seed=seed, **shape)
                    law.add(ids, await gen.collect())
                    for k in totals:
                        totals[k] += getattr(gen.stats, k)

    run(scenario())
    assert totals["rounds"] > 0 and 0 < totals["accepted"] < totals["drafted"], totals
    law.assert_matches(f"Qwen pair on llama.cpp, {verify}, T=1")


def test_the_cloud_resolves_auto_to_llama_cpp_only_where_it_can_run():
    """--engine auto: llama.cpp for a GGUF target on a CPU cloud without batching or a device map; as before elsewhere.
    A service handed a GGUF model runs llama.cpp whatever the config said: with --batching on, every session a
    sequence of one context (LlamaEngine); --device cuda refused."""
    from picospec.cloud_server.engine_setup import resolve_engine, uses_static_engine
    from picospec.cloud_server.server import PicoSpecService
    from picospec.shared.config import CloudConfig
    from picospec.cloud_server.engine.llama_engine import LlamaEngine

    assert resolve_engine(CloudConfig(target=SMOL)).engine == "llama.cpp"
    for config in (CloudConfig(target=f"{SMOL}:int8"), CloudConfig(target="tiny-random"),
                   CloudConfig(target=SMOL, batching="on"), CloudConfig(target=SMOL, device="cuda"),
                   CloudConfig(target=SMOL, engine="hf")):
        assert resolve_engine(config).engine == config.engine
    with pytest.raises(ModelError, match="not with --device cuda"):
        uses_static_engine(CloudConfig(target=SMOL, engine="llama.cpp", device="cuda"))
    assert uses_static_engine(CloudConfig(target=SMOL, engine="llama.cpp", batching="on")) is False
    smol = load_gguf_model(SMOL, progress=False)
    alone = PicoSpecService(smol, CloudConfig(target=SMOL))
    assert alone.engine is None and alone.batcher is None
    batched = PicoSpecService(smol, CloudConfig(target=SMOL, batching="on", max_sessions=3, max_context=512))
    try:
        assert isinstance(batched.engine, LlamaEngine) and batched.batcher is not None
        assert (batched.engine.slots, batched.engine.max_len) == (3, 512 + batched.config.max_draft_len + 1)
    finally:
        batched.batcher.close()


def test_cloud_compute_per_token_is_the_cloud_time_over_the_tokens():
    from picospec.edge_client.stats import GenerationStats

    st = GenerationStats(mode="cloud", prompt_tokens=3)
    st.cloud_s, st.prefill_cloud_s = 0.5, 9.0  # prefill apart
    st.on_tokens(10)
    assert st.to_dict()["cloud_ms_per_token"] == pytest.approx(50.0)
