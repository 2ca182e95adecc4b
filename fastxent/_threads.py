"""Thread count of the parallel kernels: numba's pool and, when the compiled extension
loaded, its OpenMP pool (both set together, so every backend uses the same count)."""

from __future__ import annotations

import contextlib
import operator
import os
from collections.abc import Callable, Iterator, Sequence

from ._dispatch import KERNELS

#: a thread pool's count for the calling thread: (get, set), e.g. numba's get_num_threads
#: and set_num_threads, or the extension's OpenMP pair
Pool = tuple[Callable[[], int], Callable[[int], None]]


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
    for _, set_pool in loaded_pools():  # (the extension's: a no-op when built without OpenMP)
        set_pool(n)


def get_num_threads() -> int:
    """The number of threads the kernels use for calls from this thread (numba's count
    when numba loaded, else the OpenMP count of the Cython backend, else 1)."""
    pools = loaded_pools()
    return int(pools[0][0]()) if pools else 1


def loaded_pools() -> list[Pool]:
    """The (get, set) count pairs of every pool that loaded: numba's, the extension's OpenMP."""
    pools: list[Pool] = []
    if "numba" in KERNELS:
        import numba

        pools.append((numba.get_num_threads, numba.set_num_threads))
    if "cython" in KERNELS:
        pools.append((KERNELS["cython"].get_num_threads, KERNELS["cython"].set_num_threads))
    return pools


@contextlib.contextmanager
def limited(n: int, pools: Sequence[Pool] | None = None) -> Iterator[None]:
    """At most ``n`` threads in each of ``pools`` (default: every loaded pool) for the
    kernels this thread calls inside the block; each pool gets its own count back after.
    The counts are per calling thread, so calls from other threads are unaffected. A pool
    already at ``n`` or fewer is left alone."""
    restore: list[tuple[Callable[[int], None], int]] = []
    for get, set_ in loaded_pools() if pools is None else pools:
        before = int(get())
        if before > n:
            set_(n)
            restore.append((set_, before))
    try:
        yield
    finally:
        for set_, before in reversed(restore):
            set_(before)
