"""Thread count for the Numba kernels: ``TORCHLESS_NUM_THREADS`` or ``set_num_threads(n)``."""
import os

import numba


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
