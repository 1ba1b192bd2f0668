"""Thread count for the Numba kernels: ``TORCHLESS_NUM_THREADS`` or ``set_num_threads(n)``."""
import os

# Numba's OpenMP workers spin after each kernel by default (libgomp: ~300k iterations),
# taking the cores OpenBLAS needs for prefill's matrix products; fully passive waiting
# (OMP_WAIT_POLICY=PASSIVE) instead costs decode a futex wake-up per kernel. A short spin
# keeps the workers hot between a decode step's kernels and lets them sleep through a long
# BLAS call (BENCHMARKS.md, "OpenMP waiting"). Set before Numba starts its thread pool; the
# user's OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import numba  # noqa: E402


def set_num_threads(n: int | None = None) -> int:
    """Use ``n`` threads (default: TORCHLESS_NUM_THREADS, else every core). Returns the count."""
    if n is None:
        env = os.environ.get("TORCHLESS_NUM_THREADS")
        n = int(env) if env else numba.config.NUMBA_NUM_THREADS
    n = max(1, min(int(n), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    return n


if os.environ.get("TORCHLESS_NUM_THREADS"):
    set_num_threads()
