"""Small helpers about the installed backends: OpenMP, and compiling every kernel ahead of time."""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed

from . import _dispatch


def openmp_enabled() -> bool:
    """Whether the Cython backend loaded and was built with OpenMP (else it runs serially).

    The numba backend's threading layer is a separate matter: ``numba.threading_layer()``.
    """
    extension = _dispatch.KERNELS.get("cython")
    return bool(extension is not None and extension.openmp_enabled())


def _warm_up_in_child(name: str, function: str, dtype: str) -> float:
    """A worker process's share of ``precompile``: compile into numba's on-disk cache."""
    import numpy as np

    start = time.perf_counter()
    _dispatch.KERNELS[name].warm_up(function, np.dtype(dtype))
    return time.perf_counter() - start


def precompile(
    backend: str | None = None,
    *,
    progress: Callable[[int, int, str, float], None] | None = None,
    jobs: int | None = None,
) -> int:
    """Compile (or load from numba's cache) every kernel specialisation the API uses.

    The numba kernels compile lazily, on the first call with a given dtype, and are cached
    on disk; a process that must not pay a compile on its first real call (a server's
    warm-up, a container build) calls this once. What it compiles comes from the dispatch
    table (``_dispatch.precompile_plan``): every backend function for float32 and float64.

    ``jobs`` worker processes (default: one per core, at most 2; 1 compiles here) compile
    into numba's on-disk cache side by side; this process then loads every kernel from it.
    ``progress(done, total, what, seconds)`` is called after each; ``fastxent precompile``
    prints it. Returns how many kernel specialisations the numba backend now holds.
    """
    names = [backend] if backend is not None else list(_dispatch.available_backends())
    if backend is not None:
        _dispatch.kernels_for(backend)  # a clear error for an unknown or missing backend
    plan = [(name, function, dtype) for name in names for function, dtype in _dispatch.precompile_plan(name)]
    if jobs is None:
        jobs = min(2, os.cpu_count() or 1)
    if jobs > 1 and len(plan) > 1 and _cache_is_on():
        context = multiprocessing.get_context("spawn")  # fork is unsafe after OpenMP started
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
            # the largest first, so that the two workers finish together
            futures = {pool.submit(_warm_up_in_child, n, f, d.str): (n, f, d) for n, f, d in plan}
            for done, future in enumerate(as_completed(futures), 1):
                seconds = future.result()
                if progress is not None:
                    name, function, dtype = futures[future]
                    progress(done, len(plan), f"{name} {function} {dtype} (worker)", seconds)
    for done, (name, function, dtype) in enumerate(plan, 1):  # here: from the cache, or compiled
        start = time.perf_counter()
        _dispatch.KERNELS[name].warm_up(function, dtype)
        if progress is not None and not (jobs > 1 and _cache_is_on()):
            progress(done, len(plan), f"{name} {function} {dtype}", time.perf_counter() - start)
    numba_module = _dispatch.KERNELS.get("numba")
    return numba_module.compiled_count() if numba_module is not None and "numba" in names else 0


def _cache_is_on() -> bool:
    """Whether numba compiles at all and caches to disk (else workers would be wasted)."""
    import numba

    return not numba.config.DISABLE_JIT
