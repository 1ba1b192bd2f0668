"""Thread count for the Numba kernels: ``TORCHLESS_NUM_THREADS`` or ``set_num_threads(n)``."""
import os

# Numba's OpenMP workers spin after each kernel by default, taking the cores OpenBLAS needs
# for prefill's matrix products. Passive waiting measured +40-55 % prefill and no decode
# loss (BENCHMARKS.md). Set before Numba starts its thread pool; a user's value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
