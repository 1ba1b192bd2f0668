#!/usr/bin/env python
"""Convert the tiny HF fixtures to GGUF with llama.cpp's own converter (``convert_hf_to_gguf.py``).

The files written here (``tests/fixtures_gguf/<name>.gguf``) let
``tests/loading/test_gguf_models.py`` check that torchless reads GGUF files *as llama.cpp writes
them* -- tensor layouts (permuted q/k, Gemma's +1 norms, Phi-3's fused ``ffn_up``, Llama 3's
``rope_freqs``), metadata keys and the tokenizer -- and computes the same logits as transformers
does from the original safetensors (``reference.npz``).

How to run (needs torch + transformers, like the converter itself; this script never downloads or
builds llama.cpp -- point it at a checkout or an unpacked ``llama-cpp-python`` sdist)::

    python scripts/make_gguf_fixtures.py --converter /path/to/llama.cpp/convert_hf_to_gguf.py
    LLAMA_CPP_CONVERTER=/path/to/convert_hf_to_gguf.py python scripts/make_gguf_fixtures.py
    python scripts/make_gguf_fixtures.py --only qwen3 --only gemma2     # a subset

Outputs (``--outtype f32`` unless noted)::

    llama2_mha llama3_gqa mistral_window qwen2_tied qwen3 gemma gemma2 gemma3_text phi3
    mixtral qwen3_moe olmoe  (mixtures of experts: the converter stacks the per-expert
                              tensors into 3-D ffn_{gate,up,down}_exps)
    llama3_gqa-f16.gguf  (--outtype f16)
    qwen2_tied-q8_0.gguf (--outtype q8_0)
    qwen3_moe-q8_0.gguf  (--outtype q8_0: 3-D block-quantized expert tensors)

Each conversion runs in its own Python process (``--worker``) with the converter's bundled
``gguf-py`` first on ``sys.path`` (the converter may need a newer ``gguf`` than the PyPI one), and
with the converter imported as a module so the patches below can be applied before its ``main()``
runs. The script prints which fixtures converted (with sizes) and which failed, with the reason.

Converter patches, all about the *tokenizer* of our tiny fixtures (none touches tensors or
hyper-parameters, so the files are what llama.cpp would produce for a real model of that shape):

1. ``TextModel.get_vocab_base_pre`` -> ``"gpt-2"``.  For byte-level BPE vocabularies the converter
   encodes a fixed check string with the HF tokenizer, hashes the ids and looks the hash up in a
   table of known released models, to pick llama.cpp's pre-tokenizer (``tokenizer.ggml.pre``).
   Our fixtures' tokenizers are trained on a few sentences (vocab <= 320), so their hash is in no
   table and the converter raises "BPE pre-tokenizer was not recognized". Their pre-tokenizer is
   a plain ``ByteLevel(use_regex=True)`` with no normalizer, i.e. exactly GPT-2's regex, which
   llama.cpp's loader selects for ``tokenizer.ggml.pre = "gpt-2"`` (``LLAMA_VOCAB_PRE_TYPE_GPT2``
   in ``src/llama-vocab.cpp``). The patch checks that ``tokenizer.json`` really has that
   pre-tokenizer and otherwise defers to the original method.
2. ``GemmaModel.set_vocab`` / ``Gemma2Model.set_vocab`` -> ``_set_vocab_gpt2()`` when there is no
   ``tokenizer.model``.  Gemma 1/2 conversion only knows SentencePiece (``tokenizer.model``),
   which our fixtures do not have (they carry a byte-level BPE ``tokenizer.json``). Gemma 3's
   converter already falls back to ``_set_vocab_gpt2`` in that case; we do the same for 1/2.
   This also skips Gemma 1's hard-coded CodeGemma FIM ids (67-70, 107), which name real tokens
   only in Google's 256k vocabulary.
3. ``Phi3MiniModel.set_vocab`` -> ``_set_vocab_gpt2()`` when there is no ``tokenizer.model``.
   The converter takes the GPT-2 path only for ``tokenizer_class == "GPT2Tokenizer"`` (Phi-4) and
   otherwise requires SentencePiece; ours says ``PreTrainedTokenizerFast``.

Two more patches, for Gemma 2/3 hyper-parameters that a GGUF file cannot carry. Real Gemma
checkpoints never need them; our fixtures use non-default values on purpose, so that the HF tests
prove those values are honoured. Both keep the function the file computes *in llama.cpp* equal to
the HF model, so the GGUF tests can compare against the same ``reference.npz``:

4. ``query_pre_attn_scalar`` (Gemma 2 and 3).  llama.cpp ignores it and scales queries by
   ``head_dim ** -0.5`` (``(hidden / heads) ** -0.5`` for the 27B layer counts 46 / 62):
   ``f_attention_scale`` in ``src/models/gemma2.cpp`` / ``gemma3.cpp``. The fixtures use 24 with
   ``head_dim`` 16. The ratio ``c = (24 ** -0.5) / (16 ** -0.5)`` is folded into the weights, an
   exact re-parametrisation: Gemma 2 -- the ``attn_q`` rows (``q = c Wq x``; attention logits are
   linear in q before the soft-cap); Gemma 3 -- the ``attn_q_norm`` weight (stored with its +1
   already added), because the per-head RMSNorm after ``attn_q`` would cancel a scaled
   projection, while RoPE is linear in q.
5. Gemma 3's sliding-layer pattern.  The converter writes no pattern and llama.cpp then assumes
   5 sliding layers out of every 6 (``load_swa_pattern(ml, 6)``); the 4-layer fixture uses a
   pattern of 4 (``layer_types``: 3 sliding, then 1 global), so with the default all 4 layers
   would slide. When ``layer_types`` differs from the default, the patch writes the per-layer
   bool array ``gemma3.attention.sliding_window_pattern`` -- the key ``load_swa_pattern``
   reads first, and the same form the converter writes for Cohere 2 / EXAONE 4.

Not patchable, and left as llama.cpp does it: ``MistralForCausalLM`` is converted to the ``llama``
architecture, which has no sliding window in llama.cpp, so ``mistral_window.gguf`` attends to
the full context (the tests compare it with the reference only up to the window length).

Sizes: the fixtures are ~0.4-0.7 MB of float32 weights each, so the whole directory is ~5 MB.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
OUT = ROOT / "tests" / "fixtures_gguf"

# (fixture, outtype, output file name)
JOBS = [(n, "f32", f"{n}.gguf") for n in (
    "llama2_mha", "llama3_gqa", "mistral_window", "qwen2_tied", "qwen3", "gemma", "gemma2",
    "gemma3_text", "phi3", "mixtral", "qwen3_moe", "olmoe", "qwen2_moe")] + [
    ("llama3_gqa", "f16", "llama3_gqa-f16.gguf"),
    ("qwen2_tied", "q8_0", "qwen2_tied-q8_0.gguf"),
    ("qwen3_moe", "q8_0", "qwen3_moe-q8_0.gguf"),
]


# ---- worker: one conversion, in its own process ---------------------------------------------
def _plain_gpt2_pretokenizer(model_dir: Path) -> bool:
    """True if tokenizer.json pre-tokenizes exactly as GPT-2 (ByteLevel regex, no normalizer)."""
    try:
        tj = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    pre = tj.get("pre_tokenizer") or {}
    return (tj.get("normalizer") is None and pre.get("type") == "ByteLevel"
            and pre.get("use_regex", True) and not pre.get("add_prefix_space", False))


def _patch_converter(log) -> None:
    from conversion import base

    orig_pre = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer):
        # Patch 1 (see the module docstring): an unknown-hash tiny vocabulary with GPT-2's
        # pre-tokenizer gets llama.cpp's GPT-2 regex.
        try:
            return orig_pre(self, tokenizer)
        except NotImplementedError:
            if not _plain_gpt2_pretokenizer(Path(self.dir_model)):
                raise
            log("patch: BPE pre-tokenizer hash not recognised; tokenizer.json is a plain "
                "ByteLevel(GPT-2 regex) -> tokenizer.ggml.pre = 'gpt-2'")
            return "gpt-2"

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre

    def gpt2_without_spm(cls, what):
        orig = cls.set_vocab

        def set_vocab(self):
            if (Path(self.dir_model) / "tokenizer.model").is_file():
                return orig(self)
            log(f"patch: {what}: no tokenizer.model -> byte-level BPE vocab from tokenizer.json")
            return self._set_vocab_gpt2()

        cls.set_vocab = set_vocab

    # Patches 2 and 3.
    from conversion import gemma, phi

    gpt2_without_spm(gemma.GemmaModel, "Gemma")
    gpt2_without_spm(gemma.Gemma2Model, "Gemma 2")
    gpt2_without_spm(phi.Phi3MiniModel, "Phi-3")

    # Patch 4: fold a query_pre_attn_scalar that llama.cpp cannot represent into the weights.
    def fold_query_scale(cls, what, target, n_layers_27b):
        orig = cls.modify_tensors

        def modify_tensors(self, data_torch, name, bid):
            c = _query_scale_fold(self.hparams, n_layers_27b)
            for new_name, t in orig(self, data_torch, name, bid):
                if c != 1.0 and new_name.endswith(target):
                    if bid == 0:
                        log(f"patch: {what}: query_pre_attn_scalar "
                            f"{self.hparams['query_pre_attn_scalar']} differs from llama.cpp's "
                            f"fixed rule -> {target} scaled by {c:.6g}")
                    t = t * c
                yield new_name, t

        cls.modify_tensors = modify_tensors

    fold_query_scale(gemma.Gemma2Model, "Gemma 2", "attn_q.weight", 46)
    fold_query_scale(gemma.Gemma3Model, "Gemma 3", "attn_q_norm.weight", 62)

    # Patch 5: Gemma 3's layer pattern, when it is not llama.cpp's default of 6.
    orig_g3 = gemma.Gemma3Model.set_gguf_parameters

    def set_gguf_parameters(self):
        orig_g3(self)
        types = self.hparams.get("layer_types")
        if types and self.hparams.get("sliding_window_pattern") != 1:
            swa = [t == "sliding_attention" for t in types]
            if swa != [il % 6 < 5 for il in range(len(swa))]:
                log(f"patch: Gemma 3: layer_types {swa} differ from llama.cpp's default "
                    "pattern of 6 -> attention.sliding_window_pattern written")
                self.gguf_writer.add_sliding_window_pattern(swa)

    gemma.Gemma3Model.set_gguf_parameters = set_gguf_parameters


def _query_scale_fold(hp: dict, n_layers_27b: int) -> float:
    """Factor c with c * (llama.cpp's attention scale) == query_pre_attn_scalar ** -0.5."""
    import math

    H, nH = hp["hidden_size"], hp["num_attention_heads"]
    D = hp.get("head_dim") or H // nH
    q = hp.get("query_pre_attn_scalar")
    if q is None:
        return 1.0
    # llama.cpp src/models/gemma2.cpp / gemma3.cpp load_arch_hparams: f_attention_scale
    llama_scale = (H / nH) ** -0.5 if hp["num_hidden_layers"] == n_layers_27b else D ** -0.5
    c = (q ** -0.5) / llama_scale
    return 1.0 if math.isclose(c, 1.0, rel_tol=1e-12) else c


def worker(converter: Path, model_dir: Path, outtype: str, outfile: Path) -> int:
    vendor = converter.resolve().parent
    # The converter's own gguf-py first (it may need a newer gguf than PyPI's), then its
    # `conversion` package.
    sys.path[:0] = [str(vendor / "gguf-py"), str(vendor)]
    import torch

    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location("convert_hf_to_gguf", converter)
    conv = importlib.util.module_from_spec(spec)
    sys.modules["convert_hf_to_gguf"] = conv
    spec.loader.exec_module(conv)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    _patch_converter(log)
    outfile.parent.mkdir(parents=True, exist_ok=True)
    sys.argv = [str(converter), str(model_dir), "--outtype", outtype, "--outfile", str(outfile)]
    conv.main()
    return 0


# ---- driver -------------------------------------------------------------------------------------
def _reason(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "error" in ln.lower():
            return ln
    return lines[-1] if lines else "no output"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--converter", type=Path, default=None,
                    help="llama.cpp's convert_hf_to_gguf.py (default: $LLAMA_CPP_CONVERTER)")
    ap.add_argument("--fixtures", type=Path, default=FIXTURES)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--only", action="append", default=None,
                    help="fixture name or output file name (repeatable)")
    ap.add_argument("--verbose", action="store_true", help="show the converter's log")
    ap.add_argument("--worker", nargs=4, metavar=("CONVERTER", "MODEL_DIR", "OUTTYPE", "OUTFILE"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        c, m, t, o = args.worker
        return worker(Path(c), Path(m), t, Path(o))

    converter = args.converter or os.environ.get("LLAMA_CPP_CONVERTER")
    if converter is None:
        ap.error("give --converter PATH or set LLAMA_CPP_CONVERTER (llama.cpp's "
                 "convert_hf_to_gguf.py; this script does not download llama.cpp)")
    converter = Path(converter)
    if not converter.is_file():
        ap.error(f"converter not found: {converter}")
    print(f"converter: {converter}")

    known = {j[0] for j in JOBS} | {j[2] for j in JOBS}
    unknown = sorted(set(args.only or ()) - known)
    if unknown:
        ap.error(f"unknown --only {unknown}; choose from {sorted(known)}")
    jobs = [j for j in JOBS if not args.only or j[0] in args.only or j[2] in args.only]
    ok, failed = [], []
    for name, outtype, fname in jobs:
        src = args.fixtures / name
        dst = args.out / fname
        t0 = time.time()
        if not (src / "config.json").is_file():
            failed.append((fname, f"no fixture at {src}"))
            continue
        tmp = dst.with_suffix(".gguf.tmp")
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--worker", str(converter), str(src),
             outtype, str(tmp)],
            check=False, capture_output=True, text=True, env=dict(os.environ, PYTHONHASHSEED="0"))
        if args.verbose:
            sys.stderr.write(proc.stderr)
        patches = [ln for ln in proc.stderr.splitlines() if ln.startswith("patch:")]
        if proc.returncode == 0 and tmp.is_file():
            tmp.replace(dst)
            ok.append((fname, dst.stat().st_size))
            notes = "; ".join(p[len("patch: "):] for p in patches)
            print(f"  ok      {fname:24s} {dst.stat().st_size / 1e3:8.1f} kB  "
                  f"({time.time() - t0:.1f}s)" + (f"  {notes}" if notes else ""))
        else:
            tmp.unlink(missing_ok=True)
            failed.append((fname, _reason(proc.stderr)))
            print(f"  FAILED  {fname:24s} {_reason(proc.stderr)}")
    total = sum(s for _, s in ok)
    print(f"\nconverted {len(ok)}/{len(jobs)} ({total / 1e6:.2f} MB): "
          + ", ".join(f for f, _ in ok))
    if failed:
        print("failed:")
        for f, why in failed:
            print(f"  {f}: {why}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
