"""The edge's draws in numpy (shared/draws.py) against the torch functions they stand in for (shared/sampling.py,
shared/verify.py, shared/rng.py): bit for bit where integers decide (hash bits, inverse-CDF indices, Gumbel-max
choices, float16 rounding, the codec's bytes), to float32 rounding where a softmax decides (the values of q, never
its support). And the edge on llama.cpp end to end with torch made unimportable."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from picospec.shared import draws
from picospec.shared.codec import Precision, encode_list, encode_probs
from picospec.shared.rng import Stream, gumbel_noise, gumbel_noise_array, uniform, uniforms, uniforms_array
from picospec.shared.sampling import SamplingParams, process_logits, sample_from
from picospec.shared.verify import gumbel_argmax
from tests.conftest import skip_large
from tests.proc_util import checkout_env, cloud_process

pytestmark = pytest.mark.parallel  # make test runs these two at a time (pyproject.toml: markers)

SETTINGS = [SamplingParams(0.0), SamplingParams(1.0), SamplingParams(0.7, top_k=5), SamplingParams(1.3, top_p=0.8),
            SamplingParams(0.9, top_k=50, top_p=0.95), SamplingParams(2.0, top_k=1), SamplingParams(1.0, top_p=0.01)]


def _logits(seed: int, shape: tuple[int, ...], scale: float = 3.0) -> np.ndarray:
    """Random logits with ties and -inf entries (the shapes a real row takes: repeated values, masked ids)."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * scale).astype(np.float32)
    x[..., 3] = x[..., 7]                       # a tie
    x[..., rng.integers(0, shape[-1], 5)] = -np.inf
    return x


@pytest.mark.parametrize("params", SETTINGS, ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}")
@pytest.mark.parametrize("shape", [(1000,), (3, 4096)])
def test_process_logits_keeps_the_torch_support_and_values(params, shape):
    for seed in range(5):
        x = _logits(seed, shape)
        ours, theirs = draws.process_logits(x, params), process_logits(torch.from_numpy(x), params).numpy()
        assert ours.dtype == np.float32 and ours.shape == x.shape
        assert np.array_equal(ours > 0, theirs > 0), seed          # the same tokens can be drawn
        assert np.allclose(ours, theirs, atol=1e-6, rtol=1e-5), np.abs(ours - theirs).max()
        assert np.allclose(ours.sum(-1, dtype=np.float64), 1.0, atol=1e-5)
        if params.greedy:
            assert np.array_equal(ours, theirs)                        # one-hot at the first argmax


@pytest.mark.parametrize("precision", list(Precision))
def test_quantize_is_the_torch_round_trip_bit_for_bit(precision):
    q = draws.process_logits(_logits(1, (4, 2000)), SamplingParams(1.0))
    torch_q = torch.from_numpy(q)
    expected = torch_q.to(torch.float16).to(torch.float32) if precision is Precision.F16 else torch_q
    assert np.array_equal(draws.quantize(q, precision), expected.numpy())


def test_inverse_cdf_draws_land_where_torch_lands():
    """The same index for the same row and uniform, including rows with zeros, u near 0 and 1, and float64 rows."""
    rng = np.random.default_rng(0)
    for trial in range(300):
        row = draws.process_logits(_logits(trial, (int(rng.integers(2, 3000)),)), SETTINGS[trial % len(SETTINGS)])
        if trial % 3 == 0:
            row = row.astype(np.float64) * 0.37    # unnormalised, float64 (the residual rows are)
        for u in (rng.random(), 1e-12, 1.0 - 1e-16, 0.5):
            assert draws.sample_from(row, u) == sample_from(torch.from_numpy(row), u), (trial, u)
    with pytest.raises(ValueError, match="no mass"):
        draws.sample_from(np.zeros(5, dtype=np.float32), 0.5)


def test_uniforms_and_noise_are_the_tensor_functions_bit_for_bit():
    for seed, pos in [(0, 0), (2**64 - 1, 10**6), (12345, 77)]:
        assert np.array_equal(uniforms_array(seed, pos, Stream.PROPOSAL, 3, 500),
                              uniforms(seed, pos, Stream.PROPOSAL, 3, 500).numpy())
        assert uniforms_array(seed, pos, Stream.TAIL, 9, 1)[0] == uniform(seed, pos, Stream.TAIL, 9)
        ids = np.arange(0, 151936, 37)
        ours, theirs = gumbel_noise_array(seed, pos, ids), gumbel_noise(seed, pos, torch.from_numpy(ids)).numpy()
        # the same hash bits; numpy's log and torch's may differ in the last ulp
        assert np.allclose(ours, theirs, rtol=1e-15, atol=1e-15)
        # against the definition, one by one in plain Python (tests/test_rng_sampling.py checks hash32 itself)
        from picospec.shared.rng import hash32
        for t in ids[:50].tolist():
            u = (hash32(seed, pos, int(Stream.GUMBEL), t) + 0.5) / 2**32
            assert math.isclose(float(ours[t // 37]), -math.log(-math.log(u)), rel_tol=1e-15, abs_tol=1e-15)


def _full_gumbel_max(p: np.ndarray, seed: int, pos: int) -> int:
    """The definition: argmax over the whole support of log p + G, in torch (an independent path)."""
    pt = torch.from_numpy(p.astype(np.float64))
    ids = torch.nonzero(pt > 0).flatten()
    return int(ids[int(torch.argmax(torch.log(pt[ids]) + gumbel_noise(seed, pos, ids)))])


@pytest.mark.parametrize("temperature", [0.3, 1.0, 3.0])
def test_gumbel_argmax_is_the_full_support_argmax(temperature):
    for trial in range(40):
        p = draws.process_logits(_logits(trial, (20000,), scale=4.0), SamplingParams(temperature))
        expected = _full_gumbel_max(p, trial, 100 + trial)
        assert draws.gumbel_argmax(p, trial, 100 + trial) == expected, trial
        assert gumbel_argmax(torch.from_numpy(p), trial, 100 + trial) == expected  # the cloud's, on a CPU


def test_split_corrections_take_arrays_and_tensors_alike():
    """The edge passes numpy rows; tests and tools may pass tensors: the same token either way."""
    q = draws.process_logits(_logits(3, (500,)), SamplingParams(1.0))
    p = draws.process_logits(_logits(4, (500,)), SamplingParams(1.0))
    ids = np.argsort(-p)[:20]
    for seed in range(20):
        a = draws.resample_topk(q, ids, p[ids], seed, 9)
        b = draws.resample_topk(torch.from_numpy(q), torch.from_numpy(ids), torch.from_numpy(p[ids]), seed, 9)
        assert a == b and p[a] > 0 and a in ids
        tail = np.setdiff1d(np.flatnonzero(p > 0), ids)[:64]
        hint = draws.ResidualHint(np.sort(ids), p[np.sort(ids)], float(p[tail].sum()), tail, p[tail])
        try:
            y = draws.resample_exact(q, hint, seed, 9)
        except draws.NeedMoreTail:
            continue
        assert p[y] > q[y]  # the residual max(0, p - q) is positive there


def test_the_codec_writes_the_same_bytes_for_an_array_and_a_tensor():
    q = draws.process_logits(_logits(5, (3, 3000)), SamplingParams(0.8, top_k=40))
    for precision in Precision:
        assert encode_probs(q, precision=precision) == encode_probs(torch.from_numpy(q), precision=precision)
    ids, vals = np.array([5, 3, 5, 2999]), np.array([0.5, 0.25, 0.125, 0.125], dtype=np.float32)
    assert encode_list(ids, vals, 3000) == encode_list(torch.from_numpy(ids), torch.from_numpy(vals), 3000)


# ---------------------------------------------------------------------------------------------- the edge without torch

SMOL = "smollm2-135m-instruct"
NO_TORCH_EDGE = """
import sys
for name in ("torch", "torchvision", "torchaudio"):
    sys.modules[name] = None  # `import torch` now fails, and transformers sees no torch (as on an edge without it)
from picospec.edge_client.cli import main
rc = main(sys.argv[1:])
loaded = sorted(k for k, v in sys.modules.items() if v is not None and (k == "torch" or k.startswith("torch.")))
assert not loaded, loaded
sys.exit(rc)
"""


@skip_large
def test_an_edge_on_llama_cpp_runs_every_mode_without_torch():
    """picospec-edge drafting on llama.cpp with torch unimportable, against a torch cloud (batch-invariant, so
    greedy speculation must equal the cloud alone token for token): every verification mode, stop-and-wait and
    pipelined, greedy and sampled, and token trees (llama.cpp sequences, shared/llama_tree.py)."""
    with cloud_process(SMOL, "--engine", "hf") as (_, address):
        for verify, temperature, more in [("coupled", 0.0, []), ("dense", 0.0, []), ("split-exact", 1.0, []),
                                          ("split-topk", 1.0, []), ("coupled", 1.0, []),
                                          ("coupled", 0.0, ["--tree-budget", "6"])]:
            cmd = [sys.executable, "-c", NO_TORCH_EDGE, "--server", address, "--draft", SMOL, "--draft-engine",
                   "llama.cpp", "--threads", "1", "--prompt", "def fibonacci(n):", "--max-new-tokens", "16",
                   "--mode", "cloud,sync,pipeline", "--verify", verify, "--temperature", str(temperature),
                   "--seed", "5", "--json", *more]
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=checkout_env())
            assert r.returncode == 0, r.stderr[-3000:]
            assert "PyTorch was not found" not in r.stderr  # transformers' advisory is not the user's business
            runs = {run["mode"]: run for run in map(json.loads, r.stdout.splitlines())}  # one JSON line a mode
            assert runs["sync"]["stats"]["rounds"] > 0 and runs["sync"]["stats"]["drafted_tokens"] > 0, verify
            if temperature == 0.0:
                assert runs["sync"]["token_ids"] == runs["pipeline"]["token_ids"] == runs["cloud"]["token_ids"], verify


# ---------------------------------------------------------------------------------------- a GGUF's tokenizer without torch

TOKENIZER_PROBE = """
import json, sys, tempfile
from pathlib import Path
if sys.argv[1] == "block":
    for name in ("torch", "torchvision", "torchaudio"):
        sys.modules[name] = None
from picospec.shared import models
from picospec.shared.fingerprint import tokenizer_fingerprint
gguf = models.gguf_file(sys.argv[2], progress=False)
models.cache_root = lambda: Path(tempfile.mkdtemp())  # read from the GGUF itself, not from a saved copy
tok = models._gguf_tokenizer(gguf, "probe", False)
messages = [{"role": "user", "content": "Write def f(x): return x ** 2, naive unicode: na\\u00efve \\u65e5\\u672c"}]
print(json.dumps({"fingerprint": tokenizer_fingerprint(tok).sha256, "size": len(tok), "class": type(tok).__name__,
                  "chat": tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                  return_dict=False),
                  "raw": tok("  hello\\n\\tworld 123")["input_ids"], "eos": tok.eos_token_id,
                  "torch": any(k == "torch" and v is not None for k, v in sys.modules.items())}))
"""


@skip_large
def test_a_gguf_tokenizer_read_without_torch_is_the_one_read_with_it():
    """A fresh edge without torch reads its tokenizer from the GGUF (shared/gguf_metadata.py stands in for transformers'
    torch-importing reader): the same class, fingerprint, chat encoding and special ids as transformers' own read."""
    def probe(mode: str) -> dict:
        r = subprocess.run([sys.executable, "-c", TOKENIZER_PROBE, mode, SMOL], capture_output=True, text=True,
                           timeout=300, env=checkout_env())
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout.splitlines()[-1])
    without, with_torch = probe("block"), probe("torch")
    assert not without.pop("torch") and with_torch.pop("torch")
    assert without == with_torch


@skip_large
def test_the_gguf_metadata_reader_agrees_with_transformers_and_refuses_truncated_files(tmp_path):
    from transformers.integrations.gguf import read_gguf_metadata as theirs

    from picospec.shared.gguf_metadata import read_gguf_metadata as ours
    from picospec.shared.models import gguf_file
    path = gguf_file(SMOL, progress=False)
    wanted = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")
    assert ours(str(path), wanted) == theirs(str(path), wanted)
    metadata, names = ours(str(path), wanted)
    head = path.read_bytes()[: 4 << 20]  # the metadata (a 49,152-token vocabulary and its merges) is in the first MB
    for cut in (3, 20, 1000, 300_000, 1_500_000):
        truncated = tmp_path / f"cut{cut}.gguf"
        truncated.write_bytes(head[:cut])
        with pytest.raises(ValueError, match="truncated|cannot fit|magic"):
            ours(str(truncated), wanted)
    bad_count = bytearray(head)
    bad_count[16:24] = (2**62).to_bytes(8, "little")  # metadata_count: absurd, refused before any loop runs long
    (tmp_path / "count.gguf").write_bytes(bytes(bad_count))
    with pytest.raises(ValueError):
        ours(str(tmp_path / "count.gguf"), wanted)


BLOCKED_MAIN = """
import sys
for name in ("torch", "torchvision", "torchaudio"):
    sys.modules[name] = None
from picospec.{side}.cli import main
main(sys.argv[1:])
"""


def test_without_torch_the_cloud_and_a_torch_draft_say_what_to_install():
    """Where torch is not installed (an edge installed with the edge extra alone), what needs it says so in one line
    and names the extra that brings it, instead of an ImportError's traceback."""
    cloud = subprocess.run([sys.executable, "-c", BLOCKED_MAIN.format(side="cloud_server"), "--target", "tiny-random"],
                           capture_output=True, text=True, timeout=120, env=checkout_env())
    assert cloud.returncode == 2 and "Traceback" not in cloud.stderr, cloud.stderr
    assert "pip install 'picospec[cloud]'" in cloud.stderr.strip().splitlines()[-1]
    edge = subprocess.run([sys.executable, "-c", BLOCKED_MAIN.format(side="edge_client"), "--server", "127.0.0.1:9",
                           "--draft", "tiny-random", "--prompt", "hi", "--wait-ready", "0"],
                          capture_output=True, text=True, timeout=120, env=checkout_env())
    assert edge.returncode != 0 and "Traceback" not in edge.stderr, edge.stderr
    assert "pip install 'picospec[torch]'" in edge.stderr, edge.stderr


@skip_large
def test_the_edge_command_leaves_torch_out_where_it_is_installed():
    """Where torch is installed (this venv), transformers would import it for the tokenizer alone: `picospec-edge`
    with a llama.cpp draft keeps it out of its process (edge_client/cli.py:leave_torch_out), a torch draft not."""
    code = ("import sys\nfrom picospec.edge_client import cli\ncli.main(sys.argv[1:])\n"
            "print('torch', sys.modules.get('torch') is not None, file=sys.stderr)")
    base = ["--server", "127.0.0.1:1", "--prompt", "hi", "--max-new-tokens", "2", "--mode", "edge", "--threads", "1"]
    for draft, torch_expected in ((SMOL, False), ("tiny-random", True)):
        r = subprocess.run([sys.executable, "-c", code, *base, "--draft", draft], capture_output=True, text=True,
                           timeout=300, env=checkout_env())
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stderr.strip().splitlines()[-1] == f"torch {torch_expected}", (draft, r.stderr[-500:])
