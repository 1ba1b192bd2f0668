"""Perplexity and KL divergence over a text, as llama.cpp's ``llama-perplexity`` computes them.

    from torchless.perplexity import perplexity
    r = perplexity(model, text, ctx=512)                     # r.ppl, r.ppl_uncertainty
    perplexity(base_model, text, save_logits="base.npz")     # the base's log-probabilities
    r = perplexity(model, kl_divergence="base.npz")          # r.kld.mean, r.kld.same_top ...

The definitions are llama-perplexity's (tools/perplexity/perplexity.cpp):

- The whole text is tokenized once, with BOS if the tokenizer adds one. It is cut into
  ``n_chunk = len(tokens) // ctx`` non-overlapping windows of ``ctx`` tokens (at least two
  windows are needed); when the tokenizer adds BOS, each window's first token is replaced
  by BOS. Each window is evaluated from an empty cache.
- Of each window, the logits at positions ``first = ctx // 2`` .. ``ctx - 2`` score the next
  token: ``ctx - 1 - first`` tokens per window. PPL = exp(mean NLL); its uncertainty is
  ``ppl * sqrt((mean(NLL²) - mean(NLL)²) / (count - 1))``.
- A base file stores, for every scored token, the base model's log-probabilities over the
  vocabulary in llama.cpp's compact form: a float32 ``scale`` and ``min_log_prob`` and one
  uint16 per vocabulary entry, ``log p = scale * q + min_log_prob`` (logits more than 16
  below the maximum are stored as 0). KLD(base ‖ model) per token sums ``p_base *
  (log p_base - log p)`` over the entries with ``log p_base > -16``; "same top" counts the
  tokens where the two argmaxes agree; Δp is ``p(token) - p_base(token)``.

Base files come in two containers holding the same numbers: ``.npz`` (arrays, see
:func:`save_base`), or, for any other name, llama-perplexity's own ``--kl-divergence-base``
binary file, so that torchless can score against a llama.cpp base and llama.cpp against a
torchless one. When scoring against a base, the tokens (and ``ctx``) come from the base file.
"""
from __future__ import annotations

import math
import sys
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .errors import TorchlessError

MAGIC = b"_logits_"


class PerplexityError(TorchlessError):
    """The text, the options or a base file cannot give a perplexity."""


# ---- base files ---------------------------------------------------------------------------
@dataclass
class BaseLogProbs:
    """A base model's compact log-probabilities (see the module docstring).

    ``tokens``: int32 ``[n_chunk * n_ctx]`` (the text's tokens, before BOS replacement);
    ``scale``, ``min_log_prob``: float32 ``[n_chunk, n_scored]``; ``q``: uint16
    ``[n_chunk, n_scored, n_vocab]`` (may be a memory map).
    """

    n_ctx: int
    n_vocab: int
    tokens: np.ndarray
    scale: np.ndarray
    min_log_prob: np.ndarray
    q: np.ndarray

    @property
    def n_chunk(self) -> int:
        return len(self.tokens) // self.n_ctx


def _row_stride(n_vocab: int) -> int:
    return 2 * ((n_vocab + 1) // 2) + 4  # uint16 per row in llama.cpp's file


def load_base(path) -> BaseLogProbs:
    """Read a base file: ``.npz`` written by :func:`save_base`, or llama-perplexity's
    ``--kl-divergence-base`` file (memory-mapped)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError as e:
        raise PerplexityError(f"cannot read base file {str(path)!r}: {e}") from None
    if head[:8] == MAGIC:
        return _load_llamacpp(path, head)
    if head[:4] != b"PK\x03\x04":
        raise PerplexityError(f"{str(path)!r} is neither a .npz base file nor a "
                              "llama-perplexity --kl-divergence-base file")
    try:
        with np.load(path) as z:
            n_ctx, n_vocab = int(z["n_ctx"]), int(z["n_vocab"])
            b = BaseLogProbs(n_ctx, n_vocab, z["tokens"].astype(np.int32).ravel(),
                             z["scale"].astype(np.float32), z["min_log_prob"].astype(np.float32),
                             z["q"])
    except (KeyError, ValueError, zipfile.BadZipFile, OSError) as e:
        raise PerplexityError(f"base file {str(path)!r} is not a perplexity base: {e}") from None
    n_scored = n_ctx - 1 - n_ctx // 2
    want = (b.n_chunk, n_scored)
    if (b.q.dtype != np.uint16 or b.q.shape != want + (n_vocab,) or b.scale.shape != want
            or b.min_log_prob.shape != want or len(b.tokens) != b.n_chunk * n_ctx):
        raise PerplexityError(f"base file {str(path)!r} has inconsistent array shapes")
    return b


def _load_llamacpp(path: Path, head: bytes) -> BaseLogProbs:
    if len(head) < 20:
        raise PerplexityError(f"base file {str(path)!r} is truncated (header)")
    n_ctx, n_vocab, n_chunk = np.frombuffer(head[8:20], "<i4")
    n_ctx, n_vocab, n_chunk = int(n_ctx), int(n_vocab), int(n_chunk)
    if n_ctx < 4 or n_vocab < 1 or n_chunk < 1:
        raise PerplexityError(f"base file {str(path)!r} has a bad header (n_ctx={n_ctx}, "
                              f"n_vocab={n_vocab}, n_chunk={n_chunk})")
    nv, n_scored = _row_stride(n_vocab), n_ctx - 1 - n_ctx // 2
    tok_off = 20
    rows_off = tok_off + 4 * n_chunk * n_ctx
    size = path.stat().st_size
    need = rows_off + 2 * n_chunk * n_scored * nv
    if size < need:
        raise PerplexityError(f"base file {str(path)!r} is truncated: {size} bytes, its "
                              f"header needs {need}")
    tokens = np.fromfile(path, "<i4", n_chunk * n_ctx, offset=tok_off)
    rows = np.memmap(path, "<u2", "r", rows_off, (n_chunk, n_scored, nv))
    sm = np.ascontiguousarray(rows[:, :, :4]).view("<f4")  # [n_chunk, n_scored, 2]
    return BaseLogProbs(n_ctx, n_vocab, tokens, sm[..., 0].copy(), sm[..., 1].copy(),
                        rows[:, :, 4:4 + n_vocab])


class _BaseWriter:
    """Streams a base file chunk by chunk (llama.cpp's layout), or collects one for ``.npz``."""

    def __init__(self, path, n_ctx: int, n_vocab: int, tokens: np.ndarray):
        self.path = Path(path)
        self.npz = self.path.suffix == ".npz"
        self.n_ctx, self.n_vocab, self.tokens = n_ctx, n_vocab, tokens
        self.parts: list = []
        if not self.npz:
            self.f = open(self.path, "wb")
            n_chunk = len(tokens) // n_ctx
            self.f.write(MAGIC + np.array([n_ctx, n_vocab, n_chunk], "<i4").tobytes())
            self.f.write(np.asarray(tokens, "<i4").tobytes())

    def add(self, scale, min_log_prob, q) -> None:
        if self.npz:
            self.parts.append((scale, min_log_prob, q))
            return
        n = len(scale)
        rows = np.zeros((n, _row_stride(self.n_vocab)), "<u2")
        rows[:, :4] = np.stack([scale, min_log_prob], 1).astype("<f4").view("<u2")
        rows[:, 4:4 + self.n_vocab] = q
        self.f.write(rows.tobytes())

    def close(self) -> None:
        if not self.npz:
            self.f.close()
            return
        save_base(self.path, BaseLogProbs(
            self.n_ctx, self.n_vocab, np.asarray(self.tokens, np.int32),
            np.stack([p[0] for p in self.parts]), np.stack([p[1] for p in self.parts]),
            np.stack([p[2] for p in self.parts])))


def save_base(path, base: BaseLogProbs) -> None:
    """Write ``base`` as ``.npz`` (arrays ``n_ctx``, ``n_vocab``, ``tokens``, ``scale``,
    ``min_log_prob``, ``q``; uncompressed)."""
    with open(path, "wb") as f:
        np.savez(f, n_ctx=np.int32(base.n_ctx), n_vocab=np.int32(base.n_vocab),
                 tokens=np.asarray(base.tokens, np.int32), scale=base.scale,
                 min_log_prob=base.min_log_prob, q=base.q)


# ---- the per-token numbers, llama.cpp's float operations -----------------------------------
def _softmax_parts(logits: np.ndarray):
    """Row max (float32), argmax (first), log of the float64 sum of float32 exps."""
    mx = logits.max(axis=1)
    e = np.exp(logits - mx[:, None])  # float32, as expf
    lse = np.log(e.sum(axis=1, dtype=np.float64))
    return mx, logits.argmax(axis=1), lse


def nll_rows(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of ``targets`` under each row of ``logits`` (float64)."""
    mx, _, lse = _softmax_parts(logits)
    lt = logits[np.arange(len(targets)), targets]
    return (mx.astype(np.float64) + lse) - lt


def compact_rows(logits: np.ndarray):
    """llama.cpp's compact log-probabilities of each row: ``(scale, min_log_prob, q)``."""
    mx = logits.max(axis=1)
    mn = np.maximum(logits.min(axis=1), mx - np.float32(16))
    _, _, lse = _softmax_parts(logits)
    lse32 = lse.astype(np.float32)
    min_lp = (mn - mx) - lse32
    scale = (mx - mn) / np.float32(65535)
    q = np.zeros(logits.shape, np.uint16)
    ok = scale != 0
    inv = np.float32(1) / np.where(ok, scale, np.float32(1))
    v = np.rint(inv[:, None] * (logits - mn[:, None]))  # float32, ties to even, as ggml's
    keep = (logits > mn[:, None]) & ok[:, None]
    q[keep] = v[keep].astype(np.uint16)
    return scale.astype(np.float32), min_lp.astype(np.float32), q


def kld_rows(logits: np.ndarray, targets: np.ndarray, scale, min_log_prob, q):
    """Per row: KLD(base ‖ model), the model's NLL, the base's NLL, same argmax, Δp."""
    n = len(targets)
    mx, imax, lse = _softmax_parts(logits)
    lse32 = lse.astype(np.float32)
    r = np.arange(n)
    nll = (mx + lse32) - logits[r, targets]  # float32, as llama.cpp's
    lpb = scale[:, None] * q.astype(np.float32) + min_log_prob[:, None]  # float32
    nll_base = -lpb[r, targets]
    top = (mx + lse32)[:, None]
    terms = np.where(lpb > np.float32(-16), np.exp(lpb) * (lpb - logits + top), np.float32(0))
    kld = terms.sum(axis=1, dtype=np.float64)
    same = imax == lpb.argmax(axis=1)
    dp = np.exp(-nll) - np.exp(-nll_base)
    return kld, nll.astype(np.float64), nll_base.astype(np.float64), same, dp.astype(np.float32)


# ---- statistics ---------------------------------------------------------------------------
def _mean_unc(x: np.ndarray):
    """llama.cpp's mean_and_uncertainty: mean and sqrt(var / (n - 1)) (0 for n <= 10)."""
    n = len(x)
    if n < 1:
        return 0.0, 0.0
    f = float(x.sum()) / n
    df = float((x * x).sum()) / n - f * f
    return f, (math.sqrt(df / (n - 1)) if df > 0 and n > 10 else 0.0)


def _percentile(sorted_vals: np.ndarray, fraction: float) -> float:
    """llama.cpp's percentile: linear between the two nearest sorted values."""
    p = np.float32(fraction) * np.float32(len(sorted_vals) - 1)
    ip = int(p)
    p = float(p - ip)
    j = min(ip + 1, len(sorted_vals) - 1)
    return (1 - p) * float(sorted_vals[ip]) + p * float(sorted_vals[j])


def _median(sorted_vals: np.ndarray) -> float:
    n = len(sorted_vals)
    if n % 2 == 0:
        return 0.5 * (float(sorted_vals[n // 2]) + float(sorted_vals[n // 2 - 1]))
    return float(sorted_vals[n // 2])


@dataclass
class KLDStats:
    """The ``--kl-divergence`` numbers (names as llama-perplexity prints them)."""

    ppl_base: float
    ppl_base_uncertainty: float
    ln_ppl_ratio: float            # Mean ln(PPL(Q)/PPL(base))
    ln_ppl_ratio_uncertainty: float
    ppl_diff: float                # Δppl: Mean PPL(Q) - PPL(base)
    ppl_diff_uncertainty: float
    ppl_correlation: float         # Cor(ln(PPL(Q)), ln(PPL(base)))
    mean: float                    # Mean KLD
    mean_uncertainty: float
    median: float
    p99: float
    p999: float
    p90: float
    max: float
    min: float
    same_top: float                # "Same top p": fraction of tokens with the same argmax
    same_top_uncertainty: float
    rms_dp: float                  # RMS Δp (fraction, not %)
    rms_dp_uncertainty: float
    mean_dp: float


@dataclass
class PerplexityResult:
    ppl: float
    ppl_uncertainty: float
    mean_nll: float
    n_tokens: int       # scored tokens
    n_chunks: int
    ctx: int
    n_text_tokens: int  # tokens of the whole text
    seconds: float
    kld: KLDStats | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _kld_stats(nll, nll_base, kld, same, dp) -> KLDStats:
    n = len(kld)
    lp, lp_u = _mean_unc(nll)
    lb, lb_u = _mean_unc(nll_base)
    cov = 0.0
    if n >= 10:
        cov = (float((nll * nll_base).sum()) / n - (float(nll.sum()) / n)
               * (float(nll_base.sum()) / n)) / (n - 1)
    ppl, ppl_b = math.exp(lp), math.exp(lb)
    ratio_u = math.sqrt(max(lp_u * lp_u + lb_u * lb_u - 2 * cov, 0.0))
    ppl_u, ppl_b_u = ppl * lp_u, ppl_b * lb_u
    diff_u = math.sqrt(max(ppl_u ** 2 + ppl_b_u ** 2 - 2 * ppl * ppl_b * cov, 0.0))
    k, k_u = _mean_unc(kld)
    ks = np.sort(kld.astype(np.float32))
    dp64 = dp.astype(np.float64)
    mse, mse_u = _mean_unc(dp64 * dp64)
    rms = math.sqrt(mse)
    top = float(same.sum()) / n
    return KLDStats(
        ppl_base=ppl_b, ppl_base_uncertainty=ppl_b_u, ln_ppl_ratio=lp - lb,
        ln_ppl_ratio_uncertainty=ratio_u, ppl_diff=ppl - ppl_b, ppl_diff_uncertainty=diff_u,
        ppl_correlation=cov / (lp_u * lb_u) if lp_u * lb_u else float("nan"),
        mean=k, mean_uncertainty=k_u, median=_median(ks), p99=_percentile(ks, 0.99),
        p999=_percentile(ks, 0.999), p90=_percentile(ks, 0.90), max=float(ks[-1]),
        min=float(ks[0]), same_top=top,
        same_top_uncertainty=math.sqrt(top * (1 - top) / (n - 1)) if n > 1 else 0.0,
        rms_dp=rms, rms_dp_uncertainty=0.5 / rms * mse_u if rms else 0.0,
        mean_dp=_mean_unc(dp64)[0])


# ---- the run ------------------------------------------------------------------------------
def bos_of(model) -> int | None:
    """The BOS id llama-perplexity would put at each window's start (None: no BOS)."""
    tok = getattr(model, "tokenizer", None)
    bos = getattr(tok, "bos_id", None)
    if tok is None or bos is None:
        return None
    add = getattr(tok, "add_bos", None)
    if add is None:
        ids = model.encode("a", add_special_tokens=True)
        add = bool(ids) and ids[0] == bos
    return int(bos) if add else None


class _Progress:
    """One updating line on a terminal: windows done, running PPL, time left."""

    def __init__(self, total: int, stream):
        self.total, self.stream, self.t0 = total, stream, time.perf_counter()

    def update(self, done: int, ppl: float) -> None:
        el = time.perf_counter() - self.t0
        eta = el / done * (self.total - done)
        w = 30
        bar = "#" * round(w * done / self.total)
        self.stream.write(f"\r[{bar:<{w}}] {done}/{self.total} windows  ppl {ppl:.4f}  "
                          f"{el:.0f}s elapsed, ~{eta:.0f}s left ")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


def perplexity(model, text: str | None = None, *, tokens=None, ctx: int = 512,
               batch: int | None = None, chunks: int | None = None, save_logits=None,
               kl_divergence=None, progress=None) -> PerplexityResult:
    """Perplexity of ``model`` over ``text`` (or pre-made ``tokens``), llama-perplexity's way.

    ``ctx``: window length; ``batch``: tokens per prefill call (default: the whole window;
    a smaller batch divides the window into pieces, as llama.cpp's ``-b``); ``chunks``: at
    most this many windows. ``save_logits``: write the base file of this run there.
    ``kl_divergence``: a base file (path or :class:`BaseLogProbs`) to compare against; its
    tokens and window length are used, and ``text``/``tokens``, when given, must give the
    same tokens. ``progress``: a stream for a progress line (``None``: none).
    """
    from .state import InferenceState

    if save_logits is not None and kl_divergence is not None:
        raise PerplexityError("save_logits and kl_divergence cannot be combined")
    t0 = time.perf_counter()
    base = None
    if kl_divergence is not None:
        base = (kl_divergence if isinstance(kl_divergence, BaseLogProbs)
                else load_base(kl_divergence))
        if base.n_vocab != model.config.vocab_size:
            raise PerplexityError(f"the base has a vocabulary of {base.n_vocab}, the model "
                                  f"{model.config.vocab_size}")
        ctx = base.n_ctx
    if not isinstance(ctx, int) or ctx < 4:
        raise PerplexityError(f"ctx must be an int >= 4, got {ctx!r}")
    if tokens is None and text is not None:
        if not isinstance(text, str):
            raise PerplexityError("text must be a str")
        tokens = model.encode(text, add_special_tokens=True)
    if base is not None:
        if tokens is not None:
            tk = np.asarray(tokens, np.int64)[: len(base.tokens)]
            diff = np.flatnonzero(tk != base.tokens[: len(tk)])
            if len(tk) < len(base.tokens) or len(diff):
                at = int(diff[0]) if len(diff) else len(tk)
                raise PerplexityError(f"the text's tokens differ from the base file's at "
                                      f"token {at}; score against the base alone (no text)")
        tokens = base.tokens
    if tokens is None:
        raise PerplexityError("give a text, tokens or a kl_divergence base")
    tokens = np.asarray(tokens, np.int64)
    if len(tokens) < 2 * ctx:
        raise PerplexityError(f"at least {2 * ctx} tokens are needed for a context of {ctx}; "
                              f"the text gives {len(tokens)}")
    n_chunk = len(tokens) // ctx
    if chunks is not None:
        if chunks < 1:
            raise PerplexityError(f"chunks must be >= 1, got {chunks}")
        n_chunk = min(n_chunk, chunks)
    batch = ctx if batch is None else batch
    if not isinstance(batch, int) or batch < 1:
        raise PerplexityError(f"batch must be a positive int, got {batch!r}")
    first = ctx // 2
    bos = bos_of(model)
    writer = (_BaseWriter(save_logits, ctx, model.config.vocab_size, tokens[: n_chunk * ctx])
              if save_logits is not None else None)
    bar = _Progress(n_chunk, progress) if progress is not None else None
    nll_all, kparts = [], []
    state = InferenceState(model.config, max_seq_len=ctx)
    try:
        for c in range(n_chunk):
            ids = [int(t) for t in tokens[c * ctx:(c + 1) * ctx]]
            if bos is not None:
                ids[0] = bos
            state.reset()
            rows = []
            for j in range(0, ctx, batch):
                piece = ids[j:j + batch]
                if j + len(piece) <= first:
                    model.prefill(state, piece)
                else:
                    rows.append(model.prefill(state, piece, all_logits=True,
                                              logits_from=max(0, first - j)))
            logits = np.ascontiguousarray(np.concatenate(rows)[:-1], np.float32)
            targets = np.asarray(ids[first + 1:], np.int64)
            if base is not None:
                qc = base.q[c]
                k = _blocks(lambda a, b: kld_rows(logits[a:b], targets[a:b],
                                                  base.scale[c, a:b], base.min_log_prob[c, a:b],
                                                  np.asarray(qc[a:b])), len(targets))
                kparts.append(k)
                nll_all.append(k[1])
            else:
                nll_all.append(nll_rows(logits, targets))
                if writer is not None:
                    writer.add(*_blocks(lambda a, b: compact_rows(logits[a:b]), len(targets)))
            if bar is not None:
                nl = np.concatenate(nll_all)
                bar.update(c + 1, math.exp(float(nl.sum()) / len(nl)))
    finally:
        if bar is not None:
            bar.close()
        if writer is not None and writer.npz is False:
            writer.close()
    if writer is not None and writer.npz:
        writer.close()
    nll = np.concatenate(nll_all)
    mean, unc = _mean_unc_ppl(nll)
    res = PerplexityResult(ppl=math.exp(mean), ppl_uncertainty=unc * math.exp(mean),
                           mean_nll=mean, n_tokens=len(nll), n_chunks=n_chunk, ctx=ctx,
                           n_text_tokens=len(tokens), seconds=time.perf_counter() - t0)
    if base is not None:
        kld, nl, nb, same, dp = (np.concatenate([k[i] for k in kparts]) for i in range(5))
        res.kld = _kld_stats(nl, nb, kld, same, dp)
    return res


def _blocks(fn, n: int, rows: int = 32):
    """``fn(a, b)`` over row blocks (a large vocabulary's temporaries stay small), joined."""
    parts = [fn(a, min(a + rows, n)) for a in range(0, n, rows)]
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(len(parts[0])))


def _mean_unc_ppl(nll: np.ndarray):
    """llama-perplexity's final estimate: mean NLL and sqrt(var / (count - 1))."""
    n = len(nll)
    m = float(nll.sum()) / n
    v = float((nll * nll).sum()) / n - m * m
    return m, (math.sqrt(v / (n - 1)) if v > 0 and n > 1 else 0.0)


def format_result(r: PerplexityResult) -> str:
    """The human-readable summary the CLI prints (llama-perplexity's labels)."""
    lines = [f"windows: {r.n_chunks} x {r.ctx} tokens, {r.n_tokens} scored "
             f"({r.n_text_tokens} tokens in the text), {r.seconds:.1f} s",
             f"Final estimate: PPL = {r.ppl:.4f} +/- {r.ppl_uncertainty:.5f}"]
    k = r.kld
    if k is not None:
        lines += [
            f"Mean PPL(base)                : {k.ppl_base:10.6f} ± {k.ppl_base_uncertainty:10.6f}",
            f"Mean ln(PPL(Q)/PPL(base))     : {k.ln_ppl_ratio:10.6f} ± "
            f"{k.ln_ppl_ratio_uncertainty:10.6f}",
            f"Mean PPL(Q)-PPL(base)         : {k.ppl_diff:10.6f} ± {k.ppl_diff_uncertainty:10.6f}",
            f"Mean    KLD: {k.mean:10.6f} ± {k.mean_uncertainty:10.6f}",
            f"Maximum KLD: {k.max:10.6f}",
            f"99.9%   KLD: {k.p999:10.6f}",
            f"99.0%   KLD: {k.p99:10.6f}",
            f"Median  KLD: {k.median:10.6f}",
            f"RMS Δp    : {100 * k.rms_dp:6.3f} ± {100 * k.rms_dp_uncertainty:5.3f} %",
            f"Same top p: {100 * k.same_top:6.3f} ± {100 * k.same_top_uncertainty:5.3f} %",
        ]
    return "\n".join(lines)


def default_progress():
    """stderr when it is a terminal (the CLI's progress line), else None."""
    return sys.stderr if sys.stderr.isatty() else None
