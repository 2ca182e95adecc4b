"""Thread count of the parallel kernels (numba's pool; the OpenMP pool joins later)."""

from __future__ import annotations

import operator
import os

from ._dispatch import KERNELS


def _max_threads() -> int:
    if "numba" in KERNELS:
        import numba

        return int(numba.config.NUMBA_NUM_THREADS)
    return os.cpu_count() or 1


def set_num_threads(n: int) -> None:
    """Use ``n`` threads (1 <= n <= the number the pool was started with) in the kernels.

    Like ``numba.set_num_threads`` this applies to calls made from the calling thread.
    """
    n = operator.index(n)
    limit = _max_threads()
    if not 1 <= n <= limit:
        raise ValueError(f"number of threads must be between 1 and {limit}, got {n}")
    if "numba" in KERNELS:
        import numba

        numba.set_num_threads(n)


def get_num_threads() -> int:
    """The number of threads the kernels use for calls from this thread."""
    if "numba" in KERNELS:
        import numba

        return int(numba.get_num_threads())
    return 1
