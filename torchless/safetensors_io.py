"""Reading safetensors files: header validation, then zero-copy views of a memory map.

The format is an 8-byte little-endian header length, a JSON header mapping tensor names to
``{dtype, shape, data_offsets}``, then the raw data. Everything is checked before any tensor
is handed out, so a truncated or corrupt file fails with a :class:`CorruptFileError` that
names the file and the tensor.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from .errors import CorruptFileError, UnsupportedError
from .weights import Weight

DTYPES = {
    "F32": ("f32", np.float32, 4),
    "F16": ("f16", np.float16, 2),
    "BF16": ("bf16", np.uint16, 2),
}
OTHER_DTYPE_SIZES = {"F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                     "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
MAX_HEADER = 100 * 1024 * 1024


@dataclass
class TensorEntry:
    name: str
    dtype: str
    shape: tuple
    start: int  # absolute byte offset in the file
    nbytes: int
    path: str


def read_header(path: str) -> tuple[list[TensorEntry], dict]:
    """Parse and validate a safetensors header. Returns (entries, __metadata__)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CorruptFileError(f"{path}: file is {size} bytes, too short for safetensors")
            n = int.from_bytes(head, "little")
            if n <= 0 or n > MAX_HEADER or 8 + n > size:
                raise CorruptFileError(
                    f"{path}: header length {n} is impossible for a file of {size} bytes "
                    "(truncated or not a safetensors file)"
                )
            raw = f.read(n)
    except OSError as exc:
        raise CorruptFileError(f"{path}: cannot read: {exc}") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFileError(f"{path}: header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise CorruptFileError(f"{path}: header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    data_len = size - data_start
    entries = []
    for name, info in header.items():
        try:
            dtype = info["dtype"]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptFileError(f"{path}: malformed header entry for tensor {name!r}") from exc
        itemsize = DTYPES[dtype][2] if dtype in DTYPES else OTHER_DTYPE_SIZES.get(dtype)
        if itemsize is None:
            raise CorruptFileError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        if any(s < 0 for s in shape):
            raise CorruptFileError(f"{path}: tensor {name!r} has a negative dimension {shape}")
        expected = int(np.prod(shape, dtype=np.int64)) * itemsize
        if begin < 0 or end < begin or end - begin != expected:
            raise CorruptFileError(
                f"{path}: tensor {name!r} ({dtype} {list(shape)}) should take {expected} bytes "
                f"but its offsets say {begin}..{end}"
            )
        if end > data_len:
            raise CorruptFileError(
                f"{path}: tensor {name!r} ends at byte {data_start + end} but the file has only "
                f"{size} bytes (truncated?)"
            )
        entries.append(TensorEntry(name, dtype, shape, data_start + begin, end - begin, path))
    return entries, meta


class SafetensorsFile:
    """One safetensors file, memory-mapped once; tensors are views (lazy) or copies (eager)."""

    def __init__(self, path: str):
        self.path = path
        entries, self.metadata = read_header(path)
        self.entries = {e.name: e for e in entries}
        self._map = None

    def _mm(self):
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._map

    def weight(self, name: str, copy: bool = False) -> Weight:
        e = self.entries[name]
        if e.dtype not in DTYPES:
            raise UnsupportedError(
                f"{self.path}: tensor {name!r} has dtype {e.dtype}; "
                "weights must be F32, F16 or BF16"
            )
        kind, np_dtype, _ = DTYPES[e.dtype]
        if copy:
            # Eager: read straight into RAM (no mapped pages left behind in the RSS).
            arr = np.empty(e.shape, dtype=np_dtype)
            with open(self.path, "rb") as f:
                f.seek(e.start)
                got = f.readinto(arr.reshape(-1).view(np.uint8))
            if got != e.nbytes:
                raise CorruptFileError(f"{self.path}: tensor {name!r} is truncated")
        else:
            raw = self._mm()[e.start:e.start + e.nbytes]
            arr = np.asarray(raw.view(np_dtype).reshape(e.shape))  # a view of the map
        return Weight(name, kind, e.shape, arr)
