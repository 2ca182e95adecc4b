"""The Cython backend against a previous build of its extension (and numba), in one process.

    python bench/cython_vs_previous.py PATH/TO/OLD/_cy_xent.cpython-*.so [--rounds 7]
        [--threads 1,2] [--shapes 262144x10,65536x32,16384x128,4096x1000,512x32000]

Loads the old extension under another module name next to the current one, and times
float32 class-index targets, loss+grad into a preallocated gradient and loss only, at the
kernel interface (no validation): the old extension through the positional interface of
version 1 (``xent_index(x, y, weight, weight_total, ignore_index, eps, grad_scale, loss,
grad, write_grad)``), the current one and numba through ``Params``. Each round runs every
contender once, in a fresh random order, as the mean of several calls; the table shows the
best of the rounds, in ms. Build the old extension from another checkout (for instance
``git show main:kernels/_cy_xent.pyx``, built with this setup.py) or keep a copy of the .so
before rebuilding. Not a test: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import functools
import importlib.machinery
import importlib.util
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

import fastxent as fx  # noqa: E402
from fastxent import _dispatch  # noqa: E402
from fastxent._spec import LossSpec  # noqa: E402


def _load_previous(path: str):
    name = "fastxent_previous._cy_xent"  # the same init symbol, another module name
    loader = importlib.machinery.ExtensionFileLoader(name, path)
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _read_only(a: np.ndarray) -> np.ndarray:
    view = a.view()
    view.flags.writeable = False
    return view


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("previous", help="path of the previous _cy_xent extension module")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--shapes", default="262144x10,65536x32,16384x128,4096x1000,512x32000")
    args = parser.parse_args()
    previous = _load_previous(args.previous)
    current = _dispatch.KERNELS["cython"]
    numba_kernels = _dispatch.KERNELS.get("numba")
    rng = np.random.default_rng(0)
    print("| N x C | threads | mode | previous | current | numba | current / previous |")
    print("|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        n, c = (int(v) for v in shape.split("x"))
        x = _read_only((rng.standard_normal((n, c)) * 3).astype(np.float32))
        y = _read_only(rng.integers(0, c, n).astype(np.int64))
        weight = _read_only(np.empty(0, np.float32))
        params = LossSpec.create("index").params(n_classes=c, weight_total=float(c), grad_scale=1 / n, weighted=False)
        loss, grad, dummy = np.empty(n), np.empty((n, c), np.float32), np.empty((1, c), np.float32)
        old_args = (x, y, weight, c, -100, 0.0, 1 / n, loss)
        calls = {
            ("previous", "loss+grad"): functools.partial(previous.xent_index, *old_args, grad, True),
            ("previous", "loss only"): functools.partial(previous.xent_index, *old_args, dummy, False),
            ("current", "loss+grad"): functools.partial(current.xent_index, x, y, weight, params, loss, grad),
            ("current", "loss only"): functools.partial(current.xent_index, x, y, weight, params, loss),
        }
        if numba_kernels is not None:
            calls[("numba", "loss+grad")] = functools.partial(
                numba_kernels.xent_index, x, y, weight, params, loss, grad
            )
            calls[("numba", "loss only")] = functools.partial(numba_kernels.xent_index, x, y, weight, params, loss)
        repeats = max(1, int(2e7 // (n * c)))
        for threads in (int(t) for t in args.threads.split(",")):
            fx.set_num_threads(threads)
            previous.set_num_threads(threads)
            best = dict.fromkeys(calls, float("inf"))
            for call in calls.values():
                call()
            order = np.random.default_rng(threads)
            keys = list(calls)
            for _ in range(args.rounds):
                for index in order.permutation(len(keys)):
                    key = keys[index]
                    start = time.perf_counter()
                    for _ in range(repeats):
                        calls[key]()
                    best[key] = min(best[key], (time.perf_counter() - start) / repeats)
            for mode in ("loss+grad", "loss only"):
                old, new = best[("previous", mode)] * 1e3, best[("current", mode)] * 1e3
                numba_ms = best.get(("numba", mode), float("nan")) * 1e3
                print(f"| {n} x {c} | {threads} | {mode} | {old:.2f} | {new:.2f} | {numba_ms:.2f} | {new / old:.2f} |")


if __name__ == "__main__":
    main()
