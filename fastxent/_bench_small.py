"""``fastxent bench --small``: the latency of small calls (8 x 10 up to 1024 x 1000 logits,
float32, loss and gradient), where per-call overhead and thread start-up, not bandwidth,
set the time: fastxent (``out=``, and a fresh gradient), eager PyTorch (forward+backward)
and the plain NumPy reference. Median of interleaved rounds, each round timing enough
repetitions of a call for ~20 ms."""

from __future__ import annotations

import statistics
import time

import numpy as np

SHAPES = ((8, 10), (64, 10), (64, 1000), (256, 1000), (1024, 1000))


def _contenders(x: np.ndarray, y: np.ndarray, threads: int) -> dict:
    import fastxent as fx
    from fastxent import _reference

    out = np.empty_like(x)
    calls = {
        "fastxent out=": lambda: fx.cross_entropy_with_grad(x, y, out=out),
        "fastxent (fresh grad)": lambda: fx.cross_entropy_with_grad(x, y),
        "numpy reference": lambda: _reference.cross_entropy(x, y),
    }
    try:
        import torch
    except ImportError:
        return calls
    torch.set_num_threads(threads)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def torch_call():
        leaf = xt.detach().requires_grad_()
        torch.nn.functional.cross_entropy(leaf, yt).backward()
        return leaf.grad

    calls["torch fwd+bwd"] = torch_call
    return calls


def run(threads: int, rounds: int = 5) -> list[tuple[tuple[int, int], str, float]]:
    """``(shape, contender, median microseconds per call)`` for every shape and contender."""
    rng = np.random.default_rng(0)
    rows = []
    for n, c in SHAPES:
        x = rng.standard_normal((n, c), dtype=np.float32)
        y = rng.integers(0, c, n)
        calls = _contenders(x, y, threads)
        repeats = {}
        for name, call in calls.items():
            call()
            start = time.perf_counter()
            call()
            repeats[name] = max(1, int(0.02 / max(time.perf_counter() - start, 1e-7)))
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(rounds):
            for name, call in calls.items():
                start = time.perf_counter()
                for _ in range(repeats[name]):
                    call()
                times[name].append((time.perf_counter() - start) / repeats[name])
        rows += [((n, c), name, 1e6 * statistics.median(values)) for name, values in times.items()]
    return rows


def format_table(rows, threads: int, rounds: int) -> str:
    lines = [
        f"small calls, float32 loss+grad, {threads} threads, median of {rounds} interleaved rounds "
        "(microseconds per call)",
        f"{'shape':>10}  {'contender':<24} {'us':>9} {'vs torch':>9}",
    ]
    torch_us = {shape: us for shape, name, us in rows if name == "torch fwd+bwd"}
    for shape, name, us in rows:
        ratio = f"{torch_us[shape] / us:.1f}x" if shape in torch_us and name != "torch fwd+bwd" else ""
        lines.append(f"{shape[0]:>5}x{shape[1]:<4}  {name:<24} {us:9.1f} {ratio:>9}")
    return "\n".join(lines)


def main(args) -> int:
    import fastxent as fx

    threads = args.threads or fx.get_num_threads()
    fx.set_num_threads(threads)
    rows = run(threads, args.repeat)
    print(format_table(rows, threads, args.repeat))
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump([{"shape": s, "name": n, "us": u} for s, n, u in rows], f, indent=1)
    return 0
