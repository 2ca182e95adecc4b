"""Throughput of concurrent Python threads, each running the kernels on ONE kernel thread.

fastxent's kernels release the GIL (numba ``nogil=True``, Cython ``with nogil``), and on a
thread-safe numba layer (tbb, omp) no lock is taken, so two Python threads should get
close to twice the calls per second of one. On numba's workqueue layer fastxent
serialises the numba calls (the layer aborts on concurrent use), so there expect ~1x.

    python bench/threads_throughput.py [--backend numba] [--seconds 3] [--rows 2048 --classes 4096]

Not a test: timings on a shared machine are noisy. Prints calls/s for 1 and 2 threads.
"""

from __future__ import annotations

import argparse
import os
import threading
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

import fastxent as fx  # noqa: E402


def throughput(n_threads: int, seconds: float, backend: str, x: np.ndarray, y: np.ndarray) -> float:
    counts = [0] * n_threads
    barrier = threading.Barrier(n_threads + 1)
    stop = threading.Event()

    def worker(k: int) -> None:
        fx.set_num_threads(1)  # per thread: one kernel thread each
        out = np.empty_like(x)
        fx.cross_entropy_with_grad(x, y, out=out, backend=backend)  # warm
        barrier.wait()
        while not stop.is_set():
            fx.cross_entropy_with_grad(x, y, out=out, backend=backend)
            counts[k] += 1

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default=None, choices=fx.available_backends())
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--classes", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.rows, args.classes)).astype(np.float32)
    y = rng.integers(0, args.classes, args.rows)
    backends = [args.backend] if args.backend else list(fx.available_backends())
    print(f"cross_entropy_with_grad float32 {args.rows} x {args.classes}, 1 kernel thread per Python thread")
    if "numba" in fx.available_backends():
        import numba

        fx.cross_entropy(x[:2], y[:2], backend="numba")  # launch the layer to name it
        print(f"numba threading layer: {numba.threading_layer()}")
    for backend in backends:
        one = max(throughput(1, args.seconds, backend, x, y) for _ in range(args.repeats))
        two = max(throughput(2, args.seconds, backend, x, y) for _ in range(args.repeats))
        print(f"{backend:>6}: 1 thread {one:8.1f} calls/s, 2 threads {two:8.1f} calls/s, speed-up {two / one:.2f}x")


if __name__ == "__main__":
    main()
