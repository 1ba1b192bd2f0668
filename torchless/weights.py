"""One weight tensor as the engine sees it: its storage kind, its logical shape, its raw data.

The data is whatever the file holds, never upcast on load: ``f32`` float32, ``f16`` float16,
``bf16`` uint16 bit patterns, and the block-quantized GGUF kinds (``q8_0``, ``q4_0``,
``q4_1``, ``q5_0``, ``q5_1``, ``iq4_nl``, ``q2_k``, ``q3_k``, ``q4_k``, ``q5_k``, ``q6_k``,
``iq4_xs``, ``tq1_0``, ``tq2_0``) as uint8 rows of blocks. For a lazily loaded
model the array is a view of a memory map, so reading it pages the file in.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FLOAT_KINDS = ("f32", "f16", "bf16")
QUANT_KINDS = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl", "q2_k", "q3_k", "q4_k",
               "q5_k", "q6_k", "iq4_xs", "tq1_0", "tq2_0")


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """Widen bfloat16 bit patterns (uint16) to float32 exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 bit patterns (round to nearest even), as torch does."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((u >> 16) & 1) + np.uint32(0x7FFF)
    out = ((u + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = 0x7FC0
    return out


@dataclass
class Weight:
    """A tensor in its stored format.

    ``shape`` is the logical (NumPy-order) shape: ``[out, in]`` for a linear layer.
    For quantized kinds ``data`` is uint8 of shape ``[rows, bytes_per_row]`` where
    ``rows = prod(shape[:-1])``.
    """

    name: str
    kind: str
    shape: tuple
    data: np.ndarray

    def __post_init__(self):
        self.shape = tuple(int(s) for s in self.shape)
        self.rows = 1
        for s in self.shape[:-1]:
            self.rows *= s
        self.cols = self.shape[-1] if self.shape else 1
        self._kernel_view = None

    @property
    def is_quantized(self) -> bool:
        return self.kind in QUANT_KINDS

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def kernel_view(self) -> np.ndarray:
        """The data as the 2-D array kernels take (f16 as uint16 bits), made once."""
        v = self._kernel_view
        if v is None:
            d = self.data.view(np.uint16) if self.kind == "f16" else self.data
            v = d if d.ndim == 2 else d.reshape(self.rows, -1)
            self._kernel_view = v
        return v

    def to_f32(self) -> np.ndarray:
        """The whole tensor as float32 (a new array unless already float32)."""
        if self.kind == "f32":
            return np.asarray(self.data, dtype=np.float32)
        if self.kind == "f16":
            return self.data.astype(np.float32)
        if self.kind == "bf16":
            return bf16_to_f32(self.data)
        from .kernels import quant

        flat = quant.dequantize(self.kind, self.data.reshape(self.rows, -1), self.cols)
        return flat.reshape(self.shape)

    def rows_f32(self, index) -> np.ndarray:
        """Rows ``index`` (int or int array) of a 2-D weight as float32, e.g. embedding lookup."""
        idx = np.atleast_1d(np.asarray(index, dtype=np.int64))
        out = Weight(self.name, self.kind, (len(idx), self.cols), self.data[idx]).to_f32()
        return out[0] if np.ndim(index) == 0 else out

    def __repr__(self) -> str:
        return f"Weight({self.name!r}, {self.kind}, shape={tuple(self.shape)})"

    @classmethod
    def from_array(cls, name: str, array: np.ndarray) -> "Weight":
        """Wrap a NumPy float array (float32 or float16) as a weight."""
        if array.dtype == np.float32:
            return cls(name, "f32", tuple(array.shape), array)
        if array.dtype == np.float16:
            return cls(name, "f16", tuple(array.shape), array)
        raise TypeError(f"cannot wrap dtype {array.dtype} for {name}")


class Experts:
    """The ``E`` same-shape 2-D weights of one projection of a mixture of experts.

    ``experts[e]`` is expert ``e``'s :class:`Weight` ``[rows, cols]``. From a 3-D tensor
    (GGUF's ``ffn_*_exps`` ``[E, rows, cols]``) they are views into its one buffer; from a
    Hugging Face checkpoint they are the per-expert tensors as loaded (views of the file's
    pages when lazy). ``shape`` is ``(E, rows, cols)``.
    """

    def __init__(self, name: str, experts: list):
        if not experts:
            raise ValueError(f"{name}: no experts")
        kinds = {w.kind for w in experts}
        shapes = {tuple(w.shape) for w in experts}
        if len(kinds) != 1 or len(shapes) != 1 or len(experts[0].shape) != 2:
            from .errors import TensorShapeError

            raise TensorShapeError(f"{name}: experts differ in storage kind or shape "
                                   f"({sorted(kinds)}, {sorted(shapes)})")
        self.name = name
        self.experts = list(experts)
        self.kind = experts[0].kind
        self.rows, self.cols = experts[0].shape
        self.shape = (len(experts), self.rows, self.cols)

    @classmethod
    def from_3d(cls, w: Weight) -> "Experts":
        """Per-expert views of a 3-D weight ``[E, rows, cols]`` (no copy)."""
        if len(w.shape) != 3:
            from .errors import TensorShapeError

            raise TensorShapeError(f"{w.name}: expert tensor must be 3-D, got {list(w.shape)}")
        E, rows, cols = w.shape
        flat = w.data.reshape(E * rows, -1)
        return cls(w.name, [Weight(f"{w.name}[{e}]", w.kind, (rows, cols),
                                   flat[e * rows:(e + 1) * rows]) for e in range(E)])

    @property
    def is_quantized(self) -> bool:
        return self.kind in QUANT_KINDS

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self.experts)

    def __len__(self) -> int:
        return len(self.experts)

    def __getitem__(self, e: int) -> Weight:
        return self.experts[e]

    def to_f32(self) -> np.ndarray:
        return np.stack([w.to_f32() for w in self.experts])

    def __repr__(self) -> str:
        return f"Experts({self.name!r}, {self.kind}, shape={self.shape})"
