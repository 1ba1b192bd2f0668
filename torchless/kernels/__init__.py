"""Numba kernels. Each takes contiguous float32 activations and writes into ``out``.

``matmul``: weight x activation products for every storage kind.
``ops``: norms, activations, RoPE and attention.
``quant``: the block-quantized formats (GGUF layouts); ``quant_q8``: the same with 8-bit
activations. ``decode``: a whole decoder layer for one token in one call. ``batch``: one
token for each of several sequences (products over the rows, attention per sequence).

Numba's on-disk cache (``cache=True``) is keyed by each function's own source file, but a
cached kernel embeds the code of the kernels it calls from *other* files (``decode`` calls
all of them). After one of those files changes, the stale entry would still load -- and can
crash. :func:`_guard_cache` therefore keeps a fingerprint of all kernel sources next to the
cache and drops the kernels' cache entries when it changes.
"""
import hashlib
import os
from pathlib import Path

_HERE = Path(__file__).resolve().parent


def _fingerprint() -> str:
    import numba

    h = hashlib.sha256(numba.__version__.encode())
    for p in sorted(_HERE.glob("*.py")):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def _cache_dirs() -> list:
    """Where Numba may keep this folder's cache entries (in-tree, NUMBA_CACHE_DIR, user-wide)."""
    dirs = [_HERE / "__pycache__"]
    try:
        from numba.core import caching

        for cls in (caching.UserProvidedCacheLocator, caching.UserWideCacheLocator):
            loc = cls.from_function(_fingerprint, str(_HERE / "__init__.py"))
            if loc is not None:
                dirs.append(Path(loc.get_cache_path()))
    except Exception:  # pragma: no cover - Numba internals moved; the in-tree dir remains
        pass
    return dirs


def _guard_cache() -> None:
    fp = _fingerprint()
    names = {p.stem for p in _HERE.glob("*.py")}
    for d in _cache_dirs():
        stamp = d / "torchless-kernels.stamp"
        try:
            if not d.is_dir() or (stamp.exists() and stamp.read_text() == fp):
                continue
            for f in d.iterdir():
                if f.suffix in (".nbi", ".nbc") and f.name.split(".", 1)[0] in names:
                    f.unlink()
            stamp.write_text(fp)
        except OSError:  # read-only location: Numba will not write there either
            continue


if os.environ.get("TORCHLESS_KEEP_NUMBA_CACHE") != "1":
    _guard_cache()
