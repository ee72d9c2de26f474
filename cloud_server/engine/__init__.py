"""The static engine: the target's forward pass over a preallocated KV cache, captured as CUDA graphs on a GPU.

Terms, defined once:
  * slot: one sequence's rows of the preallocated KV cache (`SlotCache`); a session holds one while it runs. The
    last slot is scratch: padding rows of a batch write there, and graphs are captured on it.
  * row: one sequence's tokens in a pass: its slot, its tokens and their absolute positions.
  * bucket: a pass size (tokens per row) that a CUDA graph was captured for; a row is padded up to the smallest
    bucket that holds it, with positions continuing past its real tokens. Padding writes KV entries past the row's
    length, which no real query sees (the mask lets a query at position p see keys 0..p of its own slot) and which
    the row's next real tokens overwrite.
  * eager: the same forward without graphs (every CPU pass; GPU passes larger than the largest bucket).

The model is the transformers model itself: its embedding, projections, norms, MLPs and LM head are called as
they are (so int8 and device-mapped modules work unchanged); only attention, rotary positions and the cache are
the engine's own. `StaticBackend` puts one slot behind the `ModelBackend` interface (shared/backend.py), so the
cloud's session code is the same on either backend.

    engine = StaticEngine(hf_model, EngineOptions(slots=9, max_len=8192, graphs=True))
    backend = engine.backend()   # a ModelBackend over a free slot; .close() gives the slot back
"""
from picospec.cloud_server.engine.backend import StaticBackend
from picospec.cloud_server.engine.model import EngineOptions, StaticEngine

__all__ = ["EngineOptions", "StaticEngine", "StaticBackend"]
