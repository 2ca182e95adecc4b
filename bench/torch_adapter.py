"""Forward+backward through ``fastxent.torch.cross_entropy`` vs PyTorch and vs the raw kernel.

Run: ``python bench/torch_adapter.py [--rounds 21] [--threads 2]`` (a script, not collected by
pytest). For each shape (float32 logits, int64 class indices), one round times, interleaved
(the order rotating from round to round):

- torch:   ``F.cross_entropy(x, y).backward()`` on a leaf ``x``;
- adapter: ``fastxent.torch.cross_entropy(x, y).backward()`` on the same tensors;
- raw:     ``fastxent.cross_entropy_with_grad(x.numpy(), y.numpy())`` on the same memory;
- minimal: the smallest possible ``torch.autograd.Function`` around the raw call (forward
  calls it and keeps the gradient, backward returns it): PyTorch's own cost of an autograd
  op, the floor of any adapter's overhead.

Each contender allocates its gradient inside the timed region and frees the previous one
outside it (``x.grad = None``). Both torch and fastxent use ``--threads`` threads. Prints min
and median per contender, the adapter's overhead over the raw kernel and its speed-up over
PyTorch. ``--shapes 1024x1000,4096x256`` times other shapes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import fastxent as fx
import fastxent.torch as fxt

SHAPES = ((65536, 128), (16384, 1000), (4096, 32000))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shapes", default=",".join(f"{n}x{c}" for n, c in SHAPES), help="NxC,NxC,...")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fx.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads (torch and fastxent), {args.rounds} rounds")
    print(f"{'shape':>14} {'contender':>8} {'min ms':>8} {'median ms':>10}")
    for shape in args.shapes.split(","):
        n, c = (int(v) for v in shape.split("x"))
        times = measure(n, c, args.rounds)
        for name, ts in times.items():
            print(f"{f'{n}x{c}':>14} {name:>8} {1e3 * min(ts):8.2f} {1e3 * statistics.median(ts):10.2f}")
        best = {name: min(ts) for name, ts in times.items()}
        med = {name: statistics.median(ts) for name, ts in times.items()}
        print(
            f"{'':>14} adapter/raw - 1: {100 * (best['adapter'] / best['raw'] - 1):+.1f}% (min), "
            f"{100 * (med['adapter'] / med['raw'] - 1):+.1f}% (median); "
            f"minimal autograd.Function/raw - 1: {100 * (med['minimal'] / med['raw'] - 1):+.1f}% (median); "
            f"speed-up vs torch: {best['torch'] / best['adapter']:.2f}x (min), "
            f"{med['torch'] / med['adapter']:.2f}x (median)"
        )


class _Minimal(torch.autograd.Function):
    """The least an autograd op around the raw kernel can do."""

    @staticmethod
    def forward(ctx, x, y):
        loss, grad = fx.cross_entropy_with_grad(x.detach().numpy(), y)
        ctx.grad = torch.from_numpy(grad)
        return torch.tensor(loss)

    @staticmethod
    def backward(ctx, grad_output):
        grad, ctx.grad = ctx.grad, None
        return grad, None


def measure(n: int, c: int, rounds: int) -> dict[str, list[float]]:
    """Seconds per forward+backward of each contender on one (n, c) problem, interleaved."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, generator=gen).requires_grad_()
    y = torch.randint(0, c, (n,), generator=gen)
    x_np, y_np = x.detach().numpy(), y.numpy()

    def run_torch():
        F.cross_entropy(x, y).backward()

    def run_adapter():
        fxt.cross_entropy(x, y).backward()

    def run_raw():
        return fx.cross_entropy_with_grad(x_np, y_np)

    def run_minimal():
        _Minimal.apply(x, y_np).backward()

    contenders = {"torch": run_torch, "adapter": run_adapter, "raw": run_raw, "minimal": run_minimal}
    times = {name: [] for name in contenders}
    for f in contenders.values():  # warm up (JIT cache, allocator)
        f()
        f()
    order = list(contenders)
    for r in range(rounds):
        # rotate the order each round, so that each contender follows each other one equally
        # often (the one after torch inherits memory freed in 4 kB pages, e.g. for huge pages)
        for name in order[r % len(order) :] + order[: r % len(order)]:
            f = contenders[name]
            x.grad = None  # the previous gradient is freed outside the timed region
            start = time.perf_counter()
            result = f()
            times[name].append(time.perf_counter() - start)
            del result  # likewise
    x.grad = None
    return times


if __name__ == "__main__":
    main()
