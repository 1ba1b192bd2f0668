"""Scalar bit-casts Numba lacks: bfloat16 / float16 bit patterns (uint16) to float32."""
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic


@intrinsic
def _u32_as_f32(typingctx, v):
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def _u16_as_half_to_f32(typingctx, v):
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


@njit(inline="always", cache=True)
def bf16_to_f32(b):
    """bfloat16 bits -> float32 (exact)."""
    return _u32_as_f32(np.uint32(b) << np.uint32(16))


@njit(inline="always", cache=True)
def f16_to_f32(b):
    """IEEE half bits -> float32 (exact)."""
    return _u16_as_half_to_f32(np.uint16(b))
