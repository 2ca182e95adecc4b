"""A fresh gradient (no ``out=``) and the torch adapter's gradient against ``out=``, each
call right after a PyTorch fwd+bwd has freed its buffers (docs/DESIGN.md, "Fresh gradients").

    python bench/fresh_gradient.py 4096 32000 7
    FASTXENT_GRADIENT_CACHE=0 python bench/fresh_gradient.py 4096 32000 7   # the code before

Rounds interleaved (fresh, out=, adapter, torch, each preceded by torch's step); medians and
bests. Needs torch.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import fastxent as fx
import fastxent.torch as fxt


def main(n: int, c: int, rounds: int) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, c), dtype=np.float32)
    y = rng.integers(0, c, n)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    out = np.empty_like(x)

    def torch_step():
        leaf = xt.detach().requires_grad_(True)
        F.cross_entropy(leaf, yt).backward()
        return leaf.grad

    def adapter():
        leaf = xt.detach().requires_grad_(True)
        fxt.cross_entropy(leaf, yt).backward()
        return leaf.grad

    calls = {
        "fresh": lambda: fx.cross_entropy_with_grad(x, y),
        "out": lambda: fx.cross_entropy_with_grad(x, y, out=out),
        "adapter": adapter,
        "torch": torch_step,
    }
    for call in calls.values():  # warm-up: compile or load, first touch of out
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            torch_step()  # torch frees its buffers right before
            start = time.perf_counter()
            result = call()
            times[name].append(time.perf_counter() - start)
            del result
    median = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
    best = {k: 1e3 * min(v) for k, v in times.items()}
    print(f"{n}x{c} float32, {fx.get_num_threads()} threads, {rounds} rounds")
    print("  median ms: " + ", ".join(f"{k} {v:.1f}" for k, v in median.items()))
    print("  best ms:   " + ", ".join(f"{k} {v:.1f}" for k, v in best.items()))
    print(
        f"  fresh / out= {median['fresh'] / median['out']:.2f}x median, {best['fresh'] / best['out']:.2f}x best; "
        f"adapter / out= {median['adapter'] / median['out']:.2f}x median"
    )


if __name__ == "__main__":
    args = [int(v) for v in sys.argv[1:4]]
    main(*(args + [4096, 32000, 7][len(args) :]))
