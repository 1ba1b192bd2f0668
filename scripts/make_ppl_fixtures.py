#!/usr/bin/env python
"""Record llama-perplexity on a tiny GGUF fixture, for tests/test_perplexity.py.

    python scripts/make_ppl_fixtures.py --bin <llama.cpp build>/bin

Runs ``llama-perplexity`` (llama.cpp from PyPI's llama-cpp-python 0.3.36 sdist) on
tests/fixtures_gguf/llama2_mha.gguf over the first 3000 characters of
tests/data/devils_dictionary.txt (``-c 64 -b 64 --chunks 8 -fa off -ctk f32 -ctv f32``:
float32 KV cache, so that the f32 model's numbers are the float32 model's), saving its
``--kl-divergence-base`` file; quantizes the fixture to Q4_0 with ``llama-quantize``; and
runs ``llama-perplexity --kl-divergence`` of the Q4_0 file against that base. Writes
tests/data/llama2_mha_llamacpp_base.kld, tests/data/llama2_mha-q4_0.gguf and
tests/data/llama2_mha_llamacpp_ppl.json (the printed numbers and the commands).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data"
MODEL = ROOT / "tests" / "fixtures_gguf" / "llama2_mha.gguf"
CHARS, CTX, CHUNKS = 3000, 64, 8
NUM = r"(-?[0-9.]+(?:e[-+]?[0-9]+)?)"


def exit_delay_env(env: dict) -> dict:
    """``env`` with LD_PRELOAD of bench/exit_delay.c, built once with the system's C compiler:
    llama.cpp's logger thread otherwise often loses llama-perplexity's last lines at exit."""
    so = Path(tempfile.gettempdir()) / "torchless_exit_delay.so"
    if not so.exists():
        src = Path(__file__).resolve().parent.parent / "bench" / "exit_delay.c"
        subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(so), str(src)], check=True)
    return dict(env, LD_PRELOAD=str(so))


def run(cmd, want, env):
    for _ in range(5):  # llama.cpp's asynchronous logger sometimes drops the last lines
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        out = p.stdout + p.stderr
        if p.returncode == 0 and want in out:
            return out
    raise SystemExit(f"{cmd[0]} failed:\n{out[-2000:]}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", type=Path, required=True, help="llama.cpp build/bin directory")
    a = ap.parse_args(argv)
    env = exit_delay_env(dict(os.environ, LD_LIBRARY_PATH=str(a.bin)))
    text = (DATA / "devils_dictionary.txt").read_text(encoding="utf-8")[:CHARS]
    base = DATA / "llama2_mha_llamacpp_base.kld"
    q4 = DATA / "llama2_mha-q4_0.gguf"
    common = ["-c", str(CTX), "-b", str(CTX), "-t", "1", "-fa", "off", "-ctk", "f32",
              "-ctv", "f32"]
    with tempfile.TemporaryDirectory() as tmp:
        tf = Path(tmp) / "text.txt"
        tf.write_text(text, encoding="utf-8")
        cmd1 = [str(a.bin / "llama-perplexity"), "-m", str(MODEL), "-f", str(tf), *common,
                "--chunks", str(CHUNKS), "--kl-divergence-base", str(base)]
        out1 = run(cmd1, "Final estimate", env)
        subprocess.run([str(a.bin / "llama-quantize"), str(MODEL), str(q4), "Q4_0", "1"],
                       check=True, capture_output=True, env=env)
        cmd2 = [str(a.bin / "llama-perplexity"), "-m", str(q4), "-f", str(tf), *common,
                "--kl-divergence-base", str(base), "--kl-divergence"]
        out2 = run(cmd2, "Same top p", env)
    m = re.search(r"Final estimate: PPL = " + NUM + r" \+/- " + NUM, out1)
    chunks = [float(x) for x in re.findall(r"\[\d+\]" + NUM, out1)]

    def grab(label):
        return float(re.search(re.escape(label) + r"\s*:\s*" + NUM, out2).group(1))

    rec = {
        "text_chars": CHARS, "ctx": CTX, "chunks": CHUNKS,
        "commands": [" ".join(Path(c).name if i in (0,) else c for i, c in enumerate(cmd))
                     for cmd in (cmd1, cmd2)],
        "ppl": float(m.group(1)), "ppl_uncertainty": float(m.group(2)), "ppl_by_chunk": chunks,
        "q4_0": {"ppl": grab("Mean PPL(Q)"), "ppl_base": grab("Mean PPL(base)"),
                 "ln_ppl_ratio": grab("Mean ln(PPL(Q)/PPL(base))"),
                 "ppl_diff": grab("Mean PPL(Q)-PPL(base)"), "kld_mean": grab("Mean    KLD"),
                 "kld_max": grab("Maximum KLD"), "kld_p99": grab("99.0%   KLD"),
                 "kld_median": grab("Median  KLD"), "rms_dp_pct": grab("RMS Δp"),
                 "same_top_pct": grab("Same top p")},
    }
    (DATA / "llama2_mha_llamacpp_ppl.json").write_text(json.dumps(rec, indent=1) + "\n")
    print(json.dumps(rec, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
