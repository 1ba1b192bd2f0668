"""Random GGUF block bytes for the kernel, reader and engine tests (importable from every test
folder: pytest puts this folder on sys.path when it loads tests/conftest.py)."""
import numpy as np

from torchless.kernels import quant as Q

# byte offsets of the half-float fields (d, dmin) inside one block
F16_FIELDS = {
    "q8_0": [0], "q4_0": [0], "q4_1": [0, 2], "q5_0": [0], "q5_1": [0, 2], "iq4_nl": [0],
    "q2_k": [80, 82], "q3_k": [108], "q4_k": [0, 2], "q5_k": [0, 2], "q6_k": [208],
    "iq4_xs": [0], "tq1_0": [52], "tq2_0": [64],
}


def random_blocks(kind, rows, nblocks, rng, wild_scales=False):
    """``[rows, nblocks * bytes_per_block]`` random block bytes whose half-float scale fields
    are finite: in [-1, 1], or with ``wild_scales`` any finite half (subnormals included)."""
    _, bpb = Q.BLOCK_INFO[kind]
    b = rng.integers(0, 256, (rows, nblocks, bpb), dtype=np.uint8)
    for off in F16_FIELDS[kind]:
        if wild_scales:  # exponent field != 31
            bits = rng.integers(0, 1 << 16, (rows, nblocks), dtype=np.uint32).astype(np.uint16)
            bits = np.where((bits & 0x7C00) == 0x7C00, bits & 0x83FF, bits).astype("<u2")
        else:
            bits = rng.uniform(-1, 1, (rows, nblocks)).astype("<f2").view("<u2")
        b[..., off] = bits & 0xFF
        b[..., off + 1] = bits >> 8
    return b.reshape(rows, nblocks * bpb)
