"""Numba kernels. Each takes contiguous float32 activations and writes into ``out``.

``matmul``: weight x activation products for every storage kind.
``ops``: norms, activations, RoPE and attention.
``quant``: the block-quantized formats (GGUF layouts).
"""
