"""Thread count of the parallel kernels: numba's pool and, when the compiled extension
loaded, its OpenMP pool (both set together, so every backend uses the same count)."""

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

    Like ``numba.set_num_threads`` (and ``omp_set_num_threads`` for the Cython backend)
    this applies to calls made from the calling thread.
    """
    n = operator.index(n)
    limit = _max_threads()
    if not 1 <= n <= limit:
        raise ValueError(f"number of threads must be between 1 and {limit}, got {n}")
    if "numba" in KERNELS:
        import numba

        numba.set_num_threads(n)
    if "cython" in KERNELS:
        KERNELS["cython"].set_num_threads(n)  # a no-op when built without OpenMP


def get_num_threads() -> int:
    """The number of threads the kernels use for calls from this thread (numba's count
    when numba loaded, else the OpenMP count of the Cython backend, else 1)."""
    if "numba" in KERNELS:
        import numba

        return int(numba.get_num_threads())
    if "cython" in KERNELS:
        return int(KERNELS["cython"].get_num_threads())
    return 1
