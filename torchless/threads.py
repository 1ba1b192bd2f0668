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
# OpenBLAS's own workers (prefill's matrix products) spin for ~2**28 cycles after each call
# before they sleep; on two cores a spinning BLAS worker takes a core from the next decode
# step's Numba loops (a served model decoded at a third of its speed after each prefill).
# 2**4 cycles: they sleep at once. Read when NumPy loads OpenBLAS, so this only takes effect
# when torchless is imported first (the CLI and the server always are); the user's wins.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

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
