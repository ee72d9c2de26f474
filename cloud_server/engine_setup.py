"""Which engine the cloud runs its target on, and building it: transformers' own cache per session (`hf`), the static
KV-slot engine (`static`, with CUDA graphs on a GPU and cross-session batching), or llama.cpp on the GGUF itself
(`llama.cpp`, sessions as sequences of one context when batching). Pure decisions over the config, and one factory."""
from __future__ import annotations

import dataclasses

from picospec.cloud_server.engine import EngineOptions, StaticEngine
from picospec.cloud_server.engine.llama_engine import LlamaEngine
from picospec.shared.config import CloudConfig
from picospec.shared.llama_backend import GgufModel
from picospec.shared.models import LoadedModel, ModelError, resolve_engine as resolve_model_engine


def resolve_engine(config: CloudConfig) -> CloudConfig:
    """The config with `--engine auto` made concrete for loading: llama.cpp on a CPU cloud whose target is a GGUF it can
    run (a built-in or a .gguf path, no torch suffix) when llama-cpp-python is installed and neither batching nor a
    device map is asked for: the fastest exact engine measured on a CPU (docs/results/engines_cpu). Otherwise auto stays,
    and means what it did (static on cuda or with --batching on, else hf)."""
    if config.engine != "auto" or config.device != "cpu" or config.batching == "on" or config.device_mapped:
        return config
    if resolve_model_engine(config.target, "auto") == "llama.cpp":
        return dataclasses.replace(config, engine="llama.cpp")
    return config


def uses_static_engine(config: CloudConfig) -> bool:
    """--engine static, or auto on one CUDA device; a ModelError where static cannot work (a device map)."""
    mapped = config.device_mapped
    if config.engine == "llama.cpp":
        if config.device != "cpu" or mapped:
            raise ModelError("--engine llama.cpp runs on the cpu: not with --device cuda or --device-map")
        return False
    if (config.engine == "static" or config.batching == "on") and mapped:  # the cache lives on one device
        raise ModelError("the static engine (--engine static, --batching on) keeps the whole KV cache on one device: "
                         "use --engine hf --batching off with --device-map")
    if config.batching == "on" and config.engine == "hf":
        raise ModelError("--batching on needs the static engine (--engine static or auto) or --engine llama.cpp")
    return config.engine == "static" or (config.engine == "auto" and not mapped
                                         and (config.device == "cuda" or config.batching == "on"))


def uses_batching(config: CloudConfig) -> bool:
    return config.batching == "on" or (config.batching == "auto" and uses_static_engine(config))


MAX_GRAPH_ROWS = 64     # the widest batch captured as a CUDA graph; wider ones run eager
MAX_GRAPH_TOKENS = 256  # ... and no graph pads more tokens than this (rows x bucket): each keeps its own logits


def graph_rows(max_sessions: int, batching: bool) -> tuple[int, ...]:
    """Rows per captured pass: powers of two up to the first that holds every session (at most MAX_GRAPH_ROWS), so
    a batch of any size the cloud admits replays a graph (8 sessions: 1, 2, 4, 8; 24: up to 32); 1 without
    batching."""
    if not batching:
        return (1,)
    rows = [1]
    while rows[-1] < min(max_sessions, MAX_GRAPH_ROWS):
        rows.append(rows[-1] * 2)
    return tuple(rows)


def make_engine(target: LoadedModel, config: CloudConfig) -> StaticEngine | LlamaEngine | None:
    """The static engine where the config asks for it, or llama.cpp's with --batching on (every session a sequence
    of one context); one slot per session --max-sessions allows. None: each session a cache of its own."""
    if isinstance(target.model, GgufModel):
        if not uses_batching(config):
            return None
        # a session holds its prompt and budget (at most max_context) and one draft batch past them
        return LlamaEngine(target.model, config.max_sessions, config.max_context + config.max_draft_len + 1)
    if not uses_static_engine(config):
        return None
    options = EngineOptions(slots=config.max_sessions + 1, max_len=config.max_context, graphs=config.device == "cuda",
                            batch_buckets=graph_rows(config.max_sessions, uses_batching(config)),
                            max_graph_tokens=MAX_GRAPH_TOKENS)
    return StaticEngine(target.model, options)
