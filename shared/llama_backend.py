"""llama.cpp as a model backend: a GGUF file run as shipped (no float32 copy), behind the same KV-cache interface.

Terms:
  * `GgufModel` is the weights, loaded once per process (memory-mapped, shared by every session);
  * `LlamaCppBackend` is one sequence's KV cache over them: a llama.cpp context of its own (sequence 0), created on
    the first `reset` with room for the tokens it will hold. Rollback is llama.cpp's sequence removal
    (`llama_memory_seq_rm` of the positions past the kept prefix): O(1) bookkeeping, no recompute;
  * token trees put each node in a sequence of its own in the same context (shared/llama_tree.py), so the context
    holds up to 256 sequences over one shared (unified) cache.

The logits come back as float32 numpy arrays [n, V]: the edge samples from them in numpy (shared/draws.py) and never
loads torch; the cloud takes them as tensors without a copy (cloud_server/target.py:on_cpu). llama-cpp-python is
imported only when a GGUF is loaded: torch-only installs never need it.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

from picospec.shared.backend import PrefixCache, fit_width
from picospec.shared.llama_tree import TREE_SEQS

if TYPE_CHECKING:
    from picospec.shared.llama_tree import LlamaTreeKV

GGUF_MAGIC = b"GGUF"
N_BATCH = 512           # tokens per llama_decode call: a longer forward (a prompt) goes in pieces of this
CTX_ROUND = 256         # contexts are sized in multiples of this many tokens
DEFAULT_N_CTX = 4096    # a backend that is not told how long its sequence gets


class LlamaCppError(RuntimeError):
    """llama.cpp refused a file, a context or a decode; the message says which and why."""


def llama_cpp_module():
    """llama_cpp with its backends registered and its logging silenced, or a LlamaCppError that says how to install
    it (the edge and cloud may run without it). Everything that runs llama.cpp gets it here first (llama-cpp-python's
    own `Llama` included: with the wheel `make install` builds, no CPU code is registered until this loads it)."""
    try:
        import llama_cpp
    except ImportError as e:
        raise LlamaCppError("the llama.cpp engine needs llama-cpp-python: `make install` builds it, or "
                            "pip install llama-cpp-python (see README: engines)") from e
    _init_llama_cpp(llama_cpp)
    return llama_cpp


def gpu_offload_refusal(gpu_layers: int) -> str | None:
    """Why `gpu_layers` layers cannot go to a GPU with the llama-cpp-python installed (None: they can, or none asked)."""
    if gpu_layers and not llama_cpp_module().llama_supports_gpu_offload():
        return ("this llama-cpp-python build has no GPU backend (rebuild it with one, e.g. CMAKE_ARGS=\"-DGGML_CUDA=on\": "
                "deploy/README.md)")
    return None


def check_gguf_header(path: Path) -> None:
    """A clear error for a path that is not a GGUF file, before llama.cpp (which only says 'failed') reads it."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise LlamaCppError(f"{path}: cannot read the GGUF file: {e.strerror}") from e
    if magic != GGUF_MAGIC:
        raise LlamaCppError(f"{path}: not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})")


_backend_lock = threading.Lock()
_backend_ready = False
_SILENT_LOG = None  # llama.cpp's log callback, set once


def _init_llama_cpp(llama_cpp) -> None:
    """llama_backend_init once per process, with llama.cpp's own logging silenced (it writes to stderr)."""
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            global _SILENT_LOG
            # kept referenced for the process's life: llama.cpp calls it from C (ggml's loader logs through it too)
            _SILENT_LOG = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
            llama_cpp.llama_log_set(_SILENT_LOG, ctypes.c_void_p(0))
            _load_backends(Path(llama_cpp.__file__).parent / "lib")
            llama_cpp.llama_backend_init()
            _backend_ready = True


def _load_backends(lib_dir: Path) -> None:
    """Register the best of the wheel's CPU variants. A wheel built by scripts/build_llama_cpp.sh holds llama.cpp's CPU
    code once per instruction-set level (libggml-cpu-haswell.so, -zen4, ...) and registers none until asked: ggml
    scores each against this CPU and loads the best (and any GPU backend library lying beside them). A wheel with the
    CPU code linked in (an older build, a CUDA build for a Jetson) has no variant files and needs nothing."""
    if not any(lib_dir.glob("libggml-cpu-*")):
        return
    # the ggml that libllama links (by its soname): wheels hold copies, not links, so llama-cpp-python's own handle
    # (libggml.so) is another instance of the library, with a registry libllama never reads
    libggml = ctypes.CDLL(str(lib_dir / "libggml.so.0"))
    load_all = libggml.ggml_backend_load_all_from_path
    load_all.argtypes, load_all.restype = [ctypes.c_char_p], None
    load_all(str(lib_dir).encode())
    count = libggml.ggml_backend_dev_count
    count.argtypes, count.restype = [], ctypes.c_size_t
    if count() == 0:
        raise LlamaCppError(f"none of llama.cpp's CPU variants in {lib_dir} loads on this CPU (a wheel for another "
                            "architecture?)")


def cpu_features() -> list[str]:
    """The instruction sets llama.cpp's loaded CPU code uses, as it reports them ("AVX2", "AVX512_VNNI", ...)."""
    info = llama_cpp_module().llama_print_system_info().decode(errors="replace")
    return re.findall(r"([A-Z][A-Z0-9_]*) = 1", info)


@dataclass(frozen=True)
class GgufConfig:
    """What the rest of the code reads of a model's config (as transformers' `model.config`)."""

    vocab_size: int          # logits width: every entry of the GGUF's token list (Qwen pads past its tokenizer)
    num_hidden_layers: int
    name_or_path: str


@dataclass(frozen=True)
class GgufGenerationConfig:
    eos_token_id: tuple[int, ...]


@dataclass
class GgufModel:
    """A GGUF file loaded by llama.cpp (on the CPU, or `gpu_layers` of it on a GPU). `backend()` gives each session
    its own KV cache over it."""

    path: Path
    threads: int = 1
    gpu_layers: int = 0  # layers offloaded to a GPU (a CUDA, Metal or Vulkan build of llama.cpp); -1 = all
    config: GgufConfig = field(init=False)
    generation_config: GgufGenerationConfig = field(init=False)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        check_gguf_header(self.path)
        lc = llama_cpp_module()
        from llama_cpp import _internals

        refusal = gpu_offload_refusal(self.gpu_layers)
        if refusal:
            raise LlamaCppError(f"--gpu-layers {self.gpu_layers}: {refusal}; 0 runs on the CPU")
        params = lc.llama_model_default_params()
        params.n_gpu_layers = self.gpu_layers if self.gpu_layers >= 0 else 1 << 30
        try:
            self._model = _internals.LlamaModel(path_model=str(self.path), params=params, verbose=False)
        except ValueError as e:
            raise LlamaCppError(f"{self.path}: llama.cpp could not load it (truncated, corrupt, or an architecture "
                                f"this llama.cpp does not know): {e}") from e
        vocab = self._model.vocab
        eos = {int(lc.llama_vocab_eos(vocab))} - {-1}
        self.config = GgufConfig(int(lc.llama_vocab_n_tokens(vocab)), int(lc.llama_model_n_layer(self._model.model)),
                                 str(self.path))
        self.generation_config = GgufGenerationConfig(tuple(sorted(eos)))

    def backend(self, logits_width: int = 0, n_ctx: int = 0) -> "LlamaCppBackend":
        return LlamaCppBackend(self, logits_width, n_ctx)

    def new_context(self, n_ctx: int):
        """A llama.cpp context for one sequence of at most n_ctx tokens (its KV cache allocated now)."""
        lc = llama_cpp_module()
        from llama_cpp import _internals

        params = lc.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = min(N_BATCH, n_ctx)
        params.n_seq_max = TREE_SEQS + 1  # the linear sequence and a tree's nodes (shared/llama_tree.py) ...
        params.kv_unified = True           # ... in one cache: a node's sequence shares the linear part's cells
        params.n_threads = params.n_threads_batch = self.threads
        params.no_perf = True
        # flash attention accumulates in float16 on the CPU: off, so a position's logits barely depend on how the
        # tokens were batched (they moved by up to 1.7 with it on), and match llama-cpp-python's own `Llama`
        params.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
        try:
            return _internals.LlamaContext(model=self._model, params=params, verbose=False)
        except ValueError as e:
            raise LlamaCppError(f"llama.cpp could not make a {n_ctx}-token context for {self.path.name}: {e}") from e

    def eval(self) -> "GgufModel":  # the torch model's interface where callers use it
        return self


class LlamaCppBackend(PrefixCache):
    """One sequence's KV cache in a llama.cpp context of its own. Not thread-safe: one caller at a time."""

    supports_trees = True

    def __init__(self, model: GgufModel, logits_width: int = 0, n_ctx: int = 0) -> None:
        """logits_width: as HFBackend's (the session's width when this model's differs). n_ctx: the most tokens the
        sequence should hold (the context is sized to it, rounded up; a longer sequence moves to a larger context)."""
        self.model = model
        self.own_width = model.config.vocab_size
        self.vocab_size = logits_width or self.own_width
        self.n_ctx = -(-(n_ctx or DEFAULT_N_CTX) // CTX_ROUND) * CTX_ROUND
        self.tokens: list[int] = []
        self._ctx = None
        self._batch = None       # a batch of one sequence (the linear forwards)
        self._tree_batch = None  # a batch whose tokens may carry many sequence ids (tree nodes)

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers

    def reset(self) -> None:
        self.tokens = []
        if self._ctx is None:
            from llama_cpp import _internals

            self._ctx = self.model.new_context(self.n_ctx)
            self._batch = _internals.LlamaBatch(n_tokens=min(N_BATCH, self.n_ctx), embd=0, n_seq_max=1, verbose=False)
        else:
            self._ctx.kv_cache_clear()

    def close(self) -> None:
        """Free the context (its KV cache); a later reset makes a new one."""
        for part in (self._batch, self._tree_batch, self._ctx):
            if part is not None:
                part.close()
        self._batch = self._tree_batch = self._ctx = None
        self.tokens = []

    def forward(self, token_ids: Sequence[int], num_logits: int = 0) -> np.ndarray:
        """Append tokens to the cache; float32 logits [num_logits or n, V] for the last num_logits of them (0 = all)."""
        if self._ctx is None:
            self.reset()
        n = len(token_ids)
        if n == 0:
            raise ValueError("forward needs at least one token")
        if self.length + n > self.n_ctx:
            self._grow(self.length + n)
        keep = n if not 0 < num_logits < n else num_logits
        ids = [t if 0 <= t < self.own_width else 0 for t in token_ids]  # a padding id past this model's width: as HF
        rows: list[np.ndarray] = []
        for start in range(0, n, N_BATCH):
            piece = ids[start:start + N_BATCH]
            first_out = max(0, n - keep - start)  # this piece's first position whose logits are wanted
            pos0 = self.length + start
            rows.append(self._decode(self._batch, piece, range(pos0, pos0 + len(piece)), [[0]] * len(piece), first_out))
        self.tokens.extend(int(t) for t in token_ids)
        logits = np.concatenate([r for r in rows if len(r)])  # [keep, V_own]
        return fit_width(logits, self.vocab_size)

    def _grow(self, needed: int) -> None:
        """A context at least twice as large, the held tokens run into it again: rare (n_ctx is sized to the session),
        and it keeps a sequence longer than foreseen working rather than failing it."""
        held = list(self.tokens)
        self.close()
        self.n_ctx = -(-max(needed, 2 * self.n_ctx) // CTX_ROUND) * CTX_ROUND
        self.reset()
        if held:
            self.forward(held, num_logits=1)

    def _decode(self, batch, piece: list[int], positions: Sequence[int], seq_ids: Sequence[Sequence[int]],
                first_out: int) -> np.ndarray:
        """One llama_decode of `piece` (decode's terms); logits [outputs, V_own] of its positions from first_out."""
        return decode(self._ctx, batch, piece, positions, seq_ids, [i >= first_out for i in range(len(piece))],
                      self.own_width)

    # ------------------------------------------------------------------ token trees (shared/llama_tree.py)

    def tree(self, room: int = 0) -> "LlamaTreeKV":
        """Tree nodes after the cached tokens; room: the most nodes held at once."""
        from picospec.shared.llama_tree import LlamaTreeKV

        return LlamaTreeKV(self, room)

    def open_tree(self, room: int) -> None:
        """Ready the context for a tree of up to `room` nodes: large enough, and no sequence but the linear one left
        (a tree given up without `keep` leaves its nodes' sequences behind)."""
        if self._ctx is None:
            self.reset()
        if self.length + room > self.n_ctx:
            self._grow(self.length + room)
        self._ctx.kv_cache_seq_keep(0)
        if self._tree_batch is None:
            from llama_cpp import _internals

            self._tree_batch = _internals.LlamaBatch(n_tokens=min(N_BATCH, self.n_ctx), embd=0,
                                                     n_seq_max=TREE_SEQS + 1, verbose=False)

    def decode_nodes(self, tokens: list[int], positions: list[int], seq_ids: list[list[int]]) -> np.ndarray:
        """Tree nodes in one llama_decode (shared/llama_tree.py says which sequences); logits [n, V_own]. A context
        with no cell left for them is refused by llama.cpp itself (decode: "no room left in the context")."""
        if len(tokens) > min(N_BATCH, self.n_ctx):  # the batch's arrays hold no more
            raise LlamaCppError(f"{len(tokens)} tree nodes in one call: at most {min(N_BATCH, self.n_ctx)} here")
        return self._decode(self._tree_batch, tokens, positions, seq_ids, 0)

    def copy_sequence(self, source: int, dest: int) -> None:
        """The cells of sequence `source` join sequence `dest` (no data moves)."""
        self._ctx.kv_cache_seq_cp(source, dest, -1, -1)

    def remove_sequence(self, seq: int) -> None:
        self._ctx.kv_cache_seq_rm(seq, -1, -1)

    def _drop_after(self, length: int) -> None:
        if not self._ctx.kv_cache_seq_rm(0, length, -1):
            raise LlamaCppError(f"llama.cpp could not drop the cache past position {length}")

    @contextlib.contextmanager
    def early_exit(self, layer: int, rows: int, on_logits: Callable[[np.ndarray], None]) -> Iterator[None]:
        raise LlamaCppError("early-exit hints need the torch engine (--engine hf or static): llama.cpp runs the "
                            "layers as one graph")
        yield  # pragma: no cover


def decode(ctx, batch, tokens: Sequence[int], positions: Sequence[int], seq_ids: Sequence[Sequence[int]],
           wanted: Sequence[bool], width: int) -> np.ndarray:
    """One llama_decode in `ctx`: token i at positions[i] in the sequences seq_ids[i] (its first the one it attends
    with); float32 logits [sum(wanted), width] of the wanted tokens, in order. `batch` holds at least len(tokens)."""
    b = batch.batch
    b.n_tokens = len(tokens)
    for i, (t, pos, seqs, out) in enumerate(zip(tokens, positions, seq_ids, wanted)):
        b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, pos, len(seqs), out
        for j, s in enumerate(seqs):
            b.seq_id[i][j] = s
    code = llama_cpp_module().llama_decode(ctx.ctx, b)
    if code != 0:
        raise LlamaCppError(f"llama_decode returned {code} for {len(tokens)} tokens at position {positions[0]}"
                            + (" (no room left in the context)" if code == 1 else ""))
    outputs = sum(bool(w) for w in wanted)
    if outputs == 0:
        return np.zeros((0, width), dtype=np.float32)
    return np.ctypeslib.as_array(ctx.get_logits(), shape=(outputs * width,)).reshape(outputs, width).copy()


def default_threads() -> int:
    """llama.cpp threads when none are asked for: the cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
