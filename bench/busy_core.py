"""Load balance: is 2 threads still no slower than 1 when another process keeps a core busy?

numba's default prange schedule splits the rows into one static block per thread, so the
thread whose core is shared with another process finishes last and everyone waits for
it: 2 threads can be slower than 1. fastxent hands out rows in chunks of ~32k logits
(``numba.set_parallel_chunksize``), so the thread on the free core takes more chunks.

    python bench/busy_core.py [--shapes 65536x128,16384x1000,4096x32000] [--repeat 15]

Starts one CPU-bound process (a Python spin loop) for the duration, then times
``cross_entropy_with_grad(out=)`` on the numba and cython backends at 1 and 2 threads,
interleaved, and prints the medians and the ratio t(2 threads) / t(1 thread): below 1.0
means 2 threads still help. Also prints numba with its default static schedule
(chunksize 0) for comparison. Not a test: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numba  # noqa: E402
import numpy as np  # noqa: E402

import fastxent as fx  # noqa: E402
from fastxent import _numba_kernels  # noqa: E402


def _spin(stop) -> None:
    while not stop.is_set():
        for _ in range(100_000):
            pass


def _static_schedule(x, y, out):
    """The numba kernel with numba's default schedule (chunk size 0: one block of rows per
    thread) instead of fastxent's chunks."""
    original = _numba_kernels._set_chunksize
    _numba_kernels._set_chunksize = lambda n: numba.set_parallel_chunksize(0)
    try:
        return fx.cross_entropy_with_grad(x, y, out=out, backend="numba")
    finally:
        _numba_kernels._set_chunksize = original


def _time_shape(n: int, n_classes: int, repeat: int, rng: np.random.Generator) -> None:
    x = rng.standard_normal((n, n_classes), dtype=np.float32)
    y = rng.integers(0, n_classes, n)
    out = np.empty_like(x)
    contenders = {
        f"fastxent[{b}]": functools.partial(fx.cross_entropy_with_grad, x, y, out=out, backend=b)
        for b in fx.available_backends()
        if b != "numpy"
    }
    if "numba" in fx.available_backends():
        contenders["numba static schedule"] = functools.partial(_static_schedule, x, y, out)
    times = {(name, t): [] for name in contenders for t in (1, 2)}
    for run in contenders.values():  # warm-up (and compile)
        run()
    for _ in range(repeat):
        for threads in (1, 2):
            fx.set_num_threads(threads)
            for name, run in contenders.items():
                start = time.perf_counter()
                run()
                times[name, threads].append(time.perf_counter() - start)
    fx.set_num_threads(os.cpu_count() or 1)
    for name in contenders:
        one, two = (1e3 * float(np.median(times[name, t])) for t in (1, 2))
        print(f"{f'{n}x{n_classes}':>12} {name:<22} {one:9.2f} {two:10.2f} {two / one:8.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="65536x128,16384x1000,4096x32000")
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]

    stop = multiprocessing.Event()
    busy = multiprocessing.Process(target=_spin, args=(stop,), daemon=True)
    busy.start()
    try:
        print(f"one spinning process on a {os.cpu_count()}-core machine; medians of {args.repeat}, ms")
        print(f"{'shape':>12} {'contender':<22} {'1 thread':>9} {'2 threads':>10} {'2t / 1t':>8}")
        rng = np.random.default_rng(0)
        for n, n_classes in shapes:
            _time_shape(n, n_classes, args.repeat, rng)
    finally:
        stop.set()
        busy.join(5)


if __name__ == "__main__":
    main()
