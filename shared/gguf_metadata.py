"""A GGUF file's metadata without torch: what transformers needs to build a tokenizer from a GGUF, for an edge without
torch.

transformers (5.x) reads a GGUF's tokenizer through `transformers.integrations.gguf.reader.read_gguf_metadata`, in a
module that imports torch at its top (for the tensors it can also load) although metadata needs none. Where torch cannot
be imported, `provide_reader_to_transformers()` puts a module holding this file's `read_gguf_metadata` in that module's
place: `AutoTokenizer.from_pretrained(..., gguf_file=...)` then runs as it does with torch (tests/test_draws.py checks
that the two readers agree key for key, and that the tokenizers they make have one fingerprint).

Everything the file declares (counts, lengths) is checked against the file's size before anything is read or allocated:
a truncated or hostile GGUF is a ValueError, never a large allocation.
"""
from __future__ import annotations

import struct
import sys
import types
from collections.abc import Container
from pathlib import Path
from typing import Any

import numpy as np

from picospec.shared.model_names import torch_installed

GGUF_VERSIONS = (2, 3)
MAX_DIMS = 8  # ggml holds at most 4; anything above is a corrupt file
# the fixed-size value types: u8, i8, u16, i16, u32, i32, f32, bool, u64, i64, f64; 8 is a string, 9 an array
_FORMAT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
TRANSFORMERS_READER = "transformers.integrations.gguf.reader"


class _Blob:
    """The file's bytes (memory-mapped) and a read position; every read is checked against the end."""

    def __init__(self, path: str | Path) -> None:
        self.path, self.data, self.pos = str(path), np.memmap(path, mode="r", dtype=np.uint8), 0

    def take(self, size: int) -> memoryview:
        if size < 0 or self.pos + size > len(self.data):
            raise ValueError(f"{self.path}: truncated GGUF (needs {size} bytes at offset {self.pos}, "
                             f"the file has {len(self.data)})")
        out = memoryview(self.data[self.pos:self.pos + size])
        self.pos += size
        return out

    def unpack(self, fmt: str) -> tuple:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))

    def string(self) -> str:
        (length,) = self.unpack("<Q")
        return bytes(self.take(length)).decode("utf-8")

    def value(self, value_type: int, keep_strings: bool) -> Any:
        """One metadata value: arrays of numbers as lists; arrays of strings as lists when asked (a vocabulary, a merge
        table), else as their length (as transformers' reader does: nothing else needs them)."""
        if value_type in _FORMAT:
            return self.unpack(_FORMAT[value_type])[0]
        if value_type == 8:
            return self.string()
        if value_type != 9:
            raise ValueError(f"{self.path}: a metadata value of unknown type {value_type}")
        element_type, count = self.unpack("<IQ")
        if element_type in _FORMAT:
            width = struct.calcsize(_FORMAT[element_type])
            return list(struct.unpack(f"<{count}{_FORMAT[element_type][1]}", self.take(count * width)))
        if element_type != 8:
            raise ValueError(f"{self.path}: a metadata array of type {element_type}")
        if count * 8 > len(self.data) - self.pos:  # each string takes 8 bytes at least: bound before the loop
            raise ValueError(f"{self.path}: an array of {count} strings cannot fit in the file")
        if keep_strings:
            return [self.string() for _ in range(count)]
        for _ in range(count):
            (length,) = self.unpack("<Q")
            self.take(length)
        return count


def read_gguf_metadata(gguf_path: str, string_arrays: Container[str] = ()) -> tuple[dict[str, Any], tuple[str, ...]]:
    """(metadata by key, tensor names) of a GGUF file, reading no tensor data; as transformers' reader of that name."""
    blob = _Blob(gguf_path)
    if bytes(blob.take(4)) != b"GGUF":
        raise ValueError(f"{gguf_path} does not start with the GGUF magic bytes, so it is not a GGUF file.")
    version, tensor_count, metadata_count = blob.unpack("<IQQ")
    if version not in GGUF_VERSIONS:
        raise ValueError(f"{gguf_path} is GGUF v{version}; this reader handles v2 and v3.")
    metadata: dict[str, Any] = {}
    for _ in range(metadata_count):
        key = blob.string()
        (value_type,) = blob.unpack("<I")
        metadata[key] = blob.value(value_type, key in string_arrays)
    if "general.architecture" not in metadata:
        raise ValueError(f"{gguf_path} has no `general.architecture` in its metadata.")
    names = []
    for _ in range(tensor_count):
        names.append(blob.string())
        (dims,) = blob.unpack("<I")
        if dims > MAX_DIMS:
            raise ValueError(f"{gguf_path}: tensor {names[-1]!r} has {dims} dimensions")
        blob.take(8 * dims + 12)  # the shape, the ggml type and the data offset
    return metadata, tuple(names)


def provide_reader_to_transformers() -> None:
    """Where torch cannot be imported, let transformers read a GGUF's metadata: its reader module (which imports torch)
    is replaced by one holding `read_gguf_metadata` above, and its older reader (`load_gguf_checkpoint`, which builds the
    config of architectures the new one does not cover, reading metadata with the `gguf` package) is let past its check
    for torch, which only its tensors need (a tokenizer asks for none: return_tensors=False). Idempotent; a no-op where
    torch exists."""
    if torch_installed():
        return
    if TRANSFORMERS_READER not in sys.modules:
        shim = types.ModuleType(TRANSFORMERS_READER, "GGUF metadata without torch (picospec.shared.gguf_metadata)")
        shim.read_gguf_metadata = read_gguf_metadata
        sys.modules[TRANSFORMERS_READER] = shim
    from transformers import modeling_gguf_pytorch_utils as legacy  # imports torch only where it is available
    legacy.is_torch_available = lambda: True  # this module's own name: transformers elsewhere still sees no torch
