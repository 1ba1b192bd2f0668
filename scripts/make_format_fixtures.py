#!/usr/bin/env python
"""Quantize the tiny Llama of ``tests/format_models.py`` with llama.cpp's ``llama-quantize``,
for the block formats ``gguf.quants`` cannot quantize (the K-quants, the IQ4 formats).

``tests/loading/test_block_formats.py`` loads ``tests/fixtures_formats/llama-<fmt>.gguf``
and checks that torchless computes the logits of the same model with the weights
``gguf.quants``-dequantized to float32. The float model is drawn by
``format_models.float_model`` (seeded), written as F32 GGUF, then quantized with ``--pure``
(every matrix in the format, the embedding and output too). The script never builds or
downloads llama.cpp::

    python scripts/make_format_fixtures.py --quantize /path/to/llama.cpp/build/bin/llama-quantize
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from format_models import float_model, write_gguf  # noqa: E402

FORMATS = ("q2_k", "q3_k", "iq4_nl", "iq4_xs")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quantize", required=True, help="path of llama-quantize")
    ap.add_argument("--out", default=str(ROOT / "tests" / "fixtures_formats"))
    ap.add_argument("--only", action="append", choices=FORMATS)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "llama-f32.gguf"
        write_gguf(src, float_model())
        for fmt in args.only or FORMATS:
            dst = out / f"llama-{fmt}.gguf"
            r = subprocess.run([args.quantize, "--pure", str(src), str(dst), fmt.upper()],
                               capture_output=True, text=True)
            if r.returncode:
                print(f"{fmt}: llama-quantize failed:\n{r.stderr[-2000:]}")
                return 1
            print(f"{fmt}: {dst} ({dst.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
