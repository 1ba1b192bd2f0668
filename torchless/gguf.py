"""Our own reader of GGUF files (llama.cpp's single-file model format), versions 2 and 3.

Layout (all little-endian)::

    magic "GGUF" | version u32 | tensor_count u64 | kv_count u64
    kv_count x  (key: string, value_type u32, value)
    tensor_count x (name: string, n_dims u32, ne[n_dims] u64, ggml_type u32, offset u64)
    padding to `general.alignment` (default 32)
    data section: each tensor at data_start + offset (offset a multiple of the alignment)

    string = length u64 + UTF-8 bytes;  array = elem_type u32 + count u64 + elements

``ne`` lists dimensions fastest-varying first, so the logical (NumPy) shape is ``ne``
reversed. The file is memory-mapped read-only; :meth:`GGUFFile.tensor` returns zero-copy
(read-only) views of the map. Everything wrong with a file raises a
:class:`~torchless.errors.TorchlessError` subclass naming the file and the problem.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .errors import (
    ConfigError,
    CorruptFileError,
    MissingTensorError,
    TorchlessError,
    UnsupportedError,
)
from .weights import Weight

if TYPE_CHECKING:  # typing.Self needs Python 3.11 at run time
    from typing import Self

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
MAX_ARRAY_NESTING = 8

# GGUF metadata value types
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = (
    range(13)
)

VALUE_TYPE_NAMES = {
    UINT8: "uint8",
    INT8: "int8",
    UINT16: "uint16",
    INT16: "int16",
    UINT32: "uint32",
    INT32: "int32",
    FLOAT32: "float32",
    BOOL: "bool",
    STRING: "string",
    ARRAY: "array",
    UINT64: "uint64",
    INT64: "int64",
    FLOAT64: "float64",
}

# fixed-size scalar types: struct format and NumPy dtype
_SCALARS = {
    UINT8: ("<B", np.dtype("<u1")),
    INT8: ("<b", np.dtype("<i1")),
    UINT16: ("<H", np.dtype("<u2")),
    INT16: ("<h", np.dtype("<i2")),
    UINT32: ("<I", np.dtype("<u4")),
    INT32: ("<i", np.dtype("<i4")),
    FLOAT32: ("<f", np.dtype("<f4")),
    BOOL: ("<B", np.dtype("<u1")),
    UINT64: ("<Q", np.dtype("<u8")),
    INT64: ("<q", np.dtype("<i8")),
    FLOAT64: ("<d", np.dtype("<f8")),
}

# ggml tensor types we read: id -> (our kind, elements per block, bytes per block)
GGML_TYPES = {
    0: ("f32", 1, 4),
    1: ("f16", 1, 2),
    2: ("q4_0", 32, 18),
    3: ("q4_1", 32, 20),
    6: ("q5_0", 32, 22),
    7: ("q5_1", 32, 24),
    8: ("q8_0", 32, 34),
    10: ("q2_k", 256, 84),
    11: ("q3_k", 256, 110),
    12: ("q4_k", 256, 144),
    13: ("q5_k", 256, 176),
    14: ("q6_k", 256, 210),
    20: ("iq4_nl", 32, 18),
    23: ("iq4_xs", 256, 136),
    34: ("tq1_0", 256, 54),
    35: ("tq2_0", 256, 66),
    30: ("bf16", 1, 2),
}

# every ggml type we know of: id -> (name, elements per block, bytes per block)
GGML_TYPE_INFO = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}  # fmt: skip
GGML_TYPE_NAMES = {i: t[0] for i, t in GGML_TYPE_INFO.items()}

_MISSING = object()
_U64 = struct.Struct("<Q")


def ggml_type_name(type_id: int) -> str:
    return GGML_TYPE_NAMES.get(type_id, f"unknown type {type_id}")


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One entry of the tensor table.

    ``shape`` is the logical NumPy-order shape (``ne`` reversed); ``offset`` is relative
    to the data section (``data_offset`` is absolute in the file). ``nbytes`` is None only
    for a ggml type id unknown to torchless (``kind`` then raises UnsupportedError).
    """

    name: str
    ggml_type: int
    shape: tuple
    offset: int
    nbytes: int | None
    data_offset: int
    file: str = ""

    @property
    def type_name(self) -> str:
        return ggml_type_name(self.ggml_type)

    @property
    def supported(self) -> bool:
        return self.ggml_type in GGML_TYPES

    @property
    def kind(self) -> str:
        """Our kind string ('f32', 'q4_k', ...); UnsupportedError for other ggml types."""
        t = GGML_TYPES.get(self.ggml_type)
        if t is None:
            raise UnsupportedError(
                f"{self.file}: tensor {self.name!r} has ggml type {self.type_name}, which "
                f"torchless does not support (supported: "
                f"{', '.join(ggml_type_name(i) for i in GGML_TYPES)})"
            )
        return t[0]

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class _Cursor:
    """Bounds-checked little-endian reads from a buffer."""

    __slots__ = ("buf", "end", "path", "pos")

    def __init__(self, buf, pos: int, end: int, path: str):
        self.buf, self.pos, self.end, self.path = buf, pos, end, path

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.end:
            raise CorruptFileError(
                f"{self.path}: truncated or corrupt file: {what} at byte {self.pos} "
                f"needs {n} bytes, but only {max(0, self.end - self.pos)} remain"
            )

    def scalar(self, vtype: int, what: str):
        fmt, dt = _SCALARS[vtype]
        self.need(dt.itemsize, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += dt.itemsize
        return v

    def u32(self, what: str) -> int:
        return self.scalar(UINT32, what)

    def u64(self, what: str) -> int:
        return self.scalar(UINT64, what)

    def raw_string(self, what: str) -> bytes:
        n = self.u64(f"length of {what}")
        if n > self.end - self.pos:
            raise CorruptFileError(
                f"{self.path}: corrupt file: {what} at byte {self.pos} claims {n} bytes, "
                f"past the end of the file ({self.end - self.pos} bytes remain)"
            )
        b = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return b

    def name(self, what: str) -> str:
        raw = self.raw_string(what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CorruptFileError(
                f"{self.path}: corrupt file: {what} is not valid UTF-8: {raw[:40]!r}"
            ) from None


def _min_size(vtype: int) -> int:
    """Fewest bytes one value of this type can take (for sanity checks of counts)."""
    if vtype in _SCALARS:
        return _SCALARS[vtype][1].itemsize
    if vtype == STRING:
        return 8
    return 12  # nested array: type + count


class GGUFFile:
    """A GGUF file opened read-only through a memory map.

    Attributes: ``path``, ``version``, ``metadata`` (key -> Python value: int/float/bool/
    str, numeric arrays as NumPy arrays, string arrays as lists of str, nested arrays as
    lists), ``metadata_types`` (key -> type name such as ``'uint32'`` or
    ``'array[string]'``), ``tensor_infos`` (name -> :class:`GGUFTensorInfo`, file order),
    ``alignment``, ``data_start``, ``file_size``.
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        self._mm = None
        self.metadata: dict = {}
        self.metadata_types: dict = {}
        self.tensor_infos: dict = {}
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(24)
            if len(head) < 4 or head[:4] != GGUF_MAGIC:
                if len(head) < 4:
                    raise CorruptFileError(f"{self.path}: not a GGUF file (only {len(head)} bytes)")
                raise CorruptFileError(
                    f"{self.path}: not a GGUF file (magic {head[:4]!r}, expected {GGUF_MAGIC!r})"
                )
            if len(head) >= 8:
                (version,) = struct.unpack_from("<I", head, 4)
                if version not in SUPPORTED_VERSIONS:
                    hint = ""
                    if struct.unpack_from(">I", head, 4)[0] in SUPPORTED_VERSIONS:
                        hint = " (this looks like a big-endian GGUF file)"
                    raise UnsupportedError(
                        f"{self.path}: unsupported GGUF version {version}{hint}; "
                        f"torchless reads versions {', '.join(map(str, SUPPORTED_VERSIONS))}"
                    )
            if len(head) < 24:
                raise CorruptFileError(
                    f"{self.path}: truncated GGUF file: {len(head)} bytes, "
                    "the header alone needs 24"
                )
            try:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as e:
                raise CorruptFileError(f"{self.path}: cannot memory-map the file: {e}") from e
        self.file_size = size
        try:
            self._parse()
        except TorchlessError:
            self.close()
            raise
        except (
            struct.error,
            IndexError,
            ValueError,
            OverflowError,
            MemoryError,
            UnicodeDecodeError,
            RecursionError,
            KeyError,
            TypeError,
        ) as e:  # safety net: should not happen
            self.close()
            raise CorruptFileError(
                f"{self.path}: corrupt GGUF file ({type(e).__name__}: {e})"
            ) from e
        except BaseException:
            self.close()
            raise

    # ---------------------------------------------------------------- parsing
    def _parse(self) -> None:
        path = self.path
        mm = self._mm
        cur = _Cursor(mm, 4, self.file_size, path)
        self.version = cur.u32("version")
        n_tensors = cur.u64("tensor count")
        n_kv = cur.u64("metadata count")
        remaining = self.file_size - cur.pos
        if n_kv * 13 > remaining:  # key length 8 + type 4 + at least one byte of value
            raise CorruptFileError(
                f"{path}: corrupt header: {n_kv} metadata entries cannot fit "
                f"in the {remaining} bytes left"
            )
        if n_tensors * 24 > remaining:  # name length 8 + n_dims 4 + type 4 + offset 8
            raise CorruptFileError(
                f"{path}: corrupt header: {n_tensors} tensors cannot fit "
                f"in the {remaining} bytes left"
            )

        for i in range(n_kv):
            key = cur.name(f"metadata key #{i}")
            vtype = cur.u32(f"value type of metadata {key!r}")
            if key in self.metadata:
                raise CorruptFileError(f"{path}: corrupt file: metadata key {key!r} appears twice")
            value, tname = self._read_value(cur, vtype, key, 0)
            self.metadata[key] = value
            self.metadata_types[key] = tname

        align = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if "general.alignment" in self.metadata:
            if self.metadata_types["general.alignment"] not in (
                "uint32",
                "int32",
                "uint64",
                "int64",
                "uint16",
                "uint8",
                "int16",
                "int8",
            ):
                raise CorruptFileError(
                    f"{path}: general.alignment must be an integer, "
                    f"got {self.metadata_types['general.alignment']}"
                )
            if align <= 0 or align & (align - 1):
                raise CorruptFileError(
                    f"{path}: general.alignment must be a power of two, got {align}"
                )
        self.alignment = int(align)

        raw_infos, seen = [], set()
        for i in range(n_tensors):
            name = cur.name(f"name of tensor #{i}")
            n_dims = cur.u32(f"n_dims of tensor {name!r}")
            if n_dims > MAX_DIMS:
                raise CorruptFileError(
                    f"{path}: tensor {name!r} has {n_dims} dimensions, at most {MAX_DIMS} allowed"
                )
            ne = [cur.u64(f"dimension {j} of tensor {name!r}") for j in range(n_dims)]
            for d in ne:
                if d >= 1 << 63:
                    raise CorruptFileError(f"{path}: tensor {name!r} has an absurd dimension {d}")
            gtype = cur.u32(f"type of tensor {name!r}")
            offset = cur.u64(f"offset of tensor {name!r}")
            if name in seen:
                raise CorruptFileError(f"{path}: tensor {name!r} appears twice")
            seen.add(name)
            raw_infos.append((name, tuple(reversed(ne)), gtype, offset))
        self.data_start = -(-cur.pos // self.alignment) * self.alignment

        for name, shape, gtype, offset in raw_infos:
            self.tensor_infos[name] = self._make_info(name, shape, gtype, offset)

    def _read_value(self, cur: _Cursor, vtype: int, key: str, depth: int):
        if vtype in _SCALARS:
            v = cur.scalar(vtype, f"value of {key!r}")
            if vtype == BOOL:
                v = bool(v)
            return v, VALUE_TYPE_NAMES[vtype]
        if vtype == STRING:
            return self._string_value(cur, key), "string"
        if vtype == ARRAY:
            if depth >= MAX_ARRAY_NESTING:
                raise CorruptFileError(
                    f"{self.path}: metadata {key!r} nests arrays more than {MAX_ARRAY_NESTING} deep"
                )
            etype = cur.u32(f"element type of array {key!r}")
            count = cur.u64(f"length of array {key!r}")
            if etype not in VALUE_TYPE_NAMES:
                raise CorruptFileError(
                    f"{self.path}: metadata array {key!r} has unknown element type {etype}"
                )
            if count * _min_size(etype) > cur.end - cur.pos:
                raise CorruptFileError(
                    f"{self.path}: corrupt file: array {key!r} claims {count} elements of type "
                    f"{VALUE_TYPE_NAMES[etype]}, past the end of the file"
                )
            if etype in _SCALARS:
                dt = _SCALARS[etype][1]
                arr = np.frombuffer(self._mm, dtype=dt, count=count, offset=cur.pos)
                cur.pos += count * dt.itemsize
                arr = (
                    arr.astype(bool) if etype == BOOL else arr.astype(dt.newbyteorder("="))
                )  # copies
                return arr, f"array[{VALUE_TYPE_NAMES[etype]}]"
            if etype == STRING:
                return self._string_array(cur, key, count), "array[string]"
            items, tname = [], "array[array]"
            for _ in range(count):  # each element is itself an array: elem_type, count, values
                v, sub = self._read_value(cur, ARRAY, key, depth + 1)
                items.append(v)
                tname = f"array[{sub}]"
            return items, tname
        raise CorruptFileError(f"{self.path}: metadata {key!r} has unknown value type {vtype}")

    def _string_array(self, cur: _Cursor, key: str, count: int) -> list:
        """``count`` strings (the hot path for vocabularies: no per-item method calls)."""
        buf, pos, end = self._mm, cur.pos, cur.end
        unpack = _U64.unpack_from
        out = [None] * count
        for i in range(count):
            if pos + 8 > end:
                cur.pos = pos
                cur.need(8, f"length of string #{i} in {key!r}")
            (n,) = unpack(buf, pos)
            pos += 8
            if n > end - pos:
                raise CorruptFileError(
                    f"{self.path}: corrupt file: string #{i} in {key!r} at byte {pos} claims "
                    f"{n} bytes, past the end of the file ({end - pos} bytes remain)"
                )
            out[i] = buf[pos : pos + n].decode("utf-8", "surrogateescape")
            pos += n
        cur.pos = pos
        return out

    def _string_value(self, cur: _Cursor, key: str) -> str:
        raw = cur.raw_string(f"string in {key!r}")
        # keep undecodable bytes recoverable (s.encode('utf-8', 'surrogateescape'))
        return raw.decode("utf-8", errors="surrogateescape")

    def _make_info(self, name: str, shape: tuple, gtype: int, offset: int) -> GGUFTensorInfo:
        path = self.path
        if offset % self.alignment:
            raise CorruptFileError(
                f"{path}: tensor {name!r} has offset {offset}, "
                f"not a multiple of the alignment {self.alignment}"
            )
        n = 1
        for d in shape:
            n *= d
        nbytes = None  # unknown for a ggml type id we have never heard of
        t = GGML_TYPE_INFO.get(gtype)
        if t is not None:
            tname, epb, bpb = t
            cols = shape[-1] if shape else 1
            if cols % epb:
                raise CorruptFileError(
                    f"{path}: tensor {name!r} ({tname}) has rows of {cols} elements, "
                    f"not a multiple of the block size {epb}"
                )
            nbytes = n // epb * bpb
        data_offset = self.data_start + offset
        if nbytes is not None and data_offset + nbytes > self.file_size:
            raise CorruptFileError(
                f"{path}: tensor {name!r} data (bytes {data_offset}..{data_offset + nbytes}) "
                f"lies past the end "
                f"of the file ({self.file_size} bytes); the file is truncated or corrupt"
            )
        return GGUFTensorInfo(name, gtype, shape, offset, nbytes, data_offset, path)

    # ---------------------------------------------------------------- access
    @property
    def closed(self) -> bool:
        return self._mm is None

    def get(self, key: str, expected_type=None, default=_MISSING):
        """Metadata value of ``key``.

        ``expected_type`` (a type or tuple of types) is checked: ``int`` accepts any integer
        (not bool), ``float`` any number, ``bool``/``str`` only themselves, ``list`` any
        array (returned as a list), ``np.ndarray`` a numeric array. A wrong type raises
        ConfigError. A missing key returns ``default``, or raises ConfigError without one.
        """
        if key not in self.metadata:
            if default is _MISSING:
                raise ConfigError(f"{self.path}: GGUF metadata has no key {key!r}")
            return default
        value = self.metadata[key]
        if expected_type is None:
            return value
        types = expected_type if isinstance(expected_type, tuple) else (expected_type,)
        for t in types:
            ok, v = _coerce(value, t)
            if ok:
                return v
        names = " or ".join(getattr(t, "__name__", str(t)) for t in types)
        raise ConfigError(
            f"{self.path}: GGUF metadata {key!r} should be {names}, "
            f"but holds {self.metadata_types.get(key)} {_short(value)}"
        )

    @property
    def architecture(self) -> str:
        return self.get("general.architecture", str)

    def __contains__(self, name) -> bool:
        return name in self.tensor_infos

    def tensor(self, name: str) -> Weight:
        """The tensor ``name`` as a :class:`Weight` viewing the memory map (read-only, no copy)."""
        info = self.tensor_infos.get(name)
        if info is None:
            raise MissingTensorError(f"{self.path}: no tensor named {name!r}")
        kind = info.kind
        if self._mm is None:
            raise TorchlessError(f"{self.path}: the GGUF file is closed")
        _, epb, bpb = GGML_TYPES[info.ggml_type]
        if kind == "f32":
            data = self._view(np.dtype("<f4"), info.n_elements, info.data_offset).reshape(
                info.shape
            )
        elif kind == "f16":
            data = self._view(np.dtype("<f2"), info.n_elements, info.data_offset).reshape(
                info.shape
            )
        elif kind == "bf16":
            data = self._view(np.dtype("<u2"), info.n_elements, info.data_offset).reshape(
                info.shape
            )
        else:
            cols = info.shape[-1] if info.shape else 1
            rows = info.n_elements // cols if cols else 0
            row_bytes = cols // epb * bpb
            data = self._view(np.dtype(np.uint8), info.nbytes, info.data_offset).reshape(
                rows, row_bytes
            )
        return Weight(name, kind, tuple(info.shape), data)

    def _view(self, dtype, count: int, offset: int) -> np.ndarray:
        if count == 0:
            a = np.empty(0, dtype=dtype)
            a.flags.writeable = False
            return a
        return np.frombuffer(self._mm, dtype=dtype, count=count, offset=offset)

    def close(self) -> None:
        """Release the memory map. Views handed out earlier keep the mapping alive until freed."""
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # tensors still view it; the OS unmaps once they are gone

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"GGUFFile({self.path!r}, version={getattr(self, 'version', '?')}, "
            f"{len(self.metadata)} metadata keys, {len(self.tensor_infos)} tensors)"
        )


def _short(value) -> str:
    r = repr(value)
    return r if len(r) <= 60 else r[:57] + "..."


def _coerce(value, t):
    """(True, converted value) when ``value`` is acceptable as type ``t``."""
    if t is bool:
        return (isinstance(value, bool), value)
    if t is int:
        if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
            return True, int(value)
        return False, None
    if t is float:
        if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
            value, (bool, np.bool_)
        ):
            return True, float(value)
        return False, None
    if t is str:
        return (isinstance(value, str), value)
    if t is list:
        if isinstance(value, np.ndarray):
            return True, value.tolist()
        return (isinstance(value, list), value)
    if t is np.ndarray:
        return (isinstance(value, np.ndarray), value)
    return (isinstance(value, t), value)
