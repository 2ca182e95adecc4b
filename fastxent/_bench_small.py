"""``fastxent bench --small``: the latency of small calls (8 x 10 to 1024 x 1000) against
PyTorch and NumPy.

At these sizes a call is microseconds, so the fixed costs show: argument checks, dispatch,
allocation, waking threads. Each contender's time is the mean of a burst of back-to-back
calls (enough for about 2 ms), the bursts interleaved over the contenders and rotated each
round, and the table shows the median burst. Calls under ``_spec.SMALL_CALL_ELEMENTS``
logits run fastxent's kernels on one thread whatever ``--threads`` says; PyTorch runs with
``--threads``.

The NumPy row is what a NumPy user writes: a float32 log-softmax with ``max``, ``exp``,
``sum``, ``log``, and the gradient ``softmax - onehot`` divided by N.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from . import _api
from ._info import cpu_name
from ._progress import Progress
from ._spec import SMALL_CALL_ELEMENTS

SHAPES = ((8, 10), (64, 10), (8, 1000), (64, 1000), (256, 1000), (1024, 100), (1024, 1000))
ONE_THREAD_TORCH = "torch fwd+bwd, 1 thread"
#: the burst of back-to-back calls each timing sample averages over, in seconds
BURST_S = 2e-3


@dataclass
class SmallRow:
    shape: tuple[int, int]
    name: str
    median_us: float
    spread_pct: float
    vs_torch: float | None
    vs_numpy: float | None
    times_us: list[float]


def numpy_loss_and_grad(x: np.ndarray, y: np.ndarray) -> tuple[np.floating, np.ndarray]:
    """Mean cross-entropy and its gradient in plain NumPy, in the logits' dtype."""
    z = x - x.max(axis=1, keepdims=True)
    e = np.exp(z)
    s = e.sum(axis=1, keepdims=True)
    rows = np.arange(x.shape[0])
    loss = np.mean(np.log(s[:, 0]) - z[rows, y])
    grad = e / s
    grad[rows, y] -= 1
    grad /= x.shape[0]
    return loss, grad


def _contenders(x: np.ndarray, y: np.ndarray, notes: list[str]) -> dict[str, Callable[[], object]]:
    out = np.empty_like(x)
    found: dict[str, Callable[[], object]] = {
        "fastxent loss+grad": functools.partial(_api.cross_entropy_with_grad, x, y),
        "fastxent loss+grad out=": functools.partial(_api.cross_entropy_with_grad, x, y, out=out),
        "fastxent loss only": functools.partial(_api.cross_entropy, x, y),
        "numpy loss+grad": functools.partial(numpy_loss_and_grad, x, y),
    }
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        notes.append("torch not installed: no PyTorch rows")
        return found
    import fastxent.torch as fxt

    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def torch_fwd_bwd():
        leaf = xt.detach().requires_grad_(True)
        F.cross_entropy(leaf, yt).backward()
        return leaf.grad

    def adapter_fwd_bwd():
        leaf = xt.detach().requires_grad_(True)
        fxt.cross_entropy(leaf, yt).backward()
        return leaf.grad

    found["fastxent.torch fwd+bwd"] = adapter_fwd_bwd
    found["torch fwd+bwd"] = torch_fwd_bwd
    if torch.get_num_threads() > 1:  # torch does not lower its thread count for small calls: show both
        found[ONE_THREAD_TORCH] = torch_fwd_bwd
    return found


def _burst(call: Callable[[], object], count: int, one_thread: bool = False) -> float:
    """Mean seconds of ``count`` back-to-back calls; ``one_thread``: with torch on one thread."""
    if one_thread:
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return _burst(call, count)
        finally:
            torch.set_num_threads(threads)
    start = time.perf_counter()
    for _ in range(count):
        call()
    return (time.perf_counter() - start) / count


def run(shapes=SHAPES, threads: int = 1, repeat: int = 7, seed: int = 0, progress: bool = True):
    """Latency of every contender on every shape; returns ``(header, rows, notes)``."""
    from . import _bench
    from ._threads import set_num_threads

    set_num_threads(threads)
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:
        pass
    notes: list[str] = []
    rows: list[SmallRow] = []
    rng = np.random.default_rng(seed)
    bar = Progress(len(shapes), f"bench --small, {threads} threads", unit="shape") if progress else None
    for n, n_classes in shapes:
        x = rng.standard_normal((n, n_classes), dtype=np.float32)
        y = rng.integers(0, n_classes, n)
        contenders = _contenders(x, y, notes)
        counts = {}
        for name, call in contenders.items():  # warm-up; the burst size from one timed call
            one = name == ONE_THREAD_TORCH
            _burst(call, 1, one)
            counts[name] = max(1, int(BURST_S / max(_burst(call, 3, one), 1e-7)))
        times: dict[str, list[float]] = {name: [] for name in contenders}
        names = list(contenders)
        for round_index in range(repeat):
            first = round_index % len(names)
            for name in names[first:] + names[:first]:
                times[name].append(_burst(contenders[name], counts[name], name == ONE_THREAD_TORCH))
        medians = {name: float(np.median(t)) for name, t in times.items()}
        for name in names:
            t = medians[name]
            q25, q75 = np.percentile(times[name], [25, 75])
            both = "+bwd" in name or "+grad" in name  # loss and gradient: comparable with the peers
            # the faster of torch's thread counts: the comparison a careful torch user would make
            torch_times = [medians[k] for k in ("torch fwd+bwd", ONE_THREAD_TORCH) if k in medians]
            torch_time = min(torch_times) if both and torch_times else None
            numpy_time = medians["numpy loss+grad"] if both else None
            rows.append(
                SmallRow(
                    shape=(n, n_classes),
                    name=name,
                    median_us=1e6 * t,
                    spread_pct=100 * (q75 - q25) / t,
                    vs_torch=torch_time / t if torch_time and not name.startswith("torch") else None,
                    vs_numpy=numpy_time / t if numpy_time and name != "numpy loss+grad" else None,
                    times_us=[1e6 * v for v in times[name]],
                )
            )
        if bar is not None:
            bar.step(f"{n}x{n_classes}")
    if bar is not None:
        bar.__exit__(None, None, None)
    header = {
        "cpu": cpu_name(),
        "threads": threads,
        "dtype": "float32",
        "repeat": repeat,
        "versions": _bench._versions(),
        "small_call_elements": SMALL_CALL_ELEMENTS,
    }
    return header, rows, notes


def format_table(header: dict[str, Any], rows: list[SmallRow], notes: list[str]) -> str:
    lines = [
        f"fastxent bench --small: {header['cpu']}, {header['threads']} threads (torch; fastxent's kernels use one "
        f"thread below {header['small_call_elements']} logits), float32, median of {header['repeat']} interleaved "
        "bursts of back-to-back calls",
        "'vs torch' and 'vs numpy' are torch fwd+bwd's (the faster of its thread counts) and the NumPy loss+grad's "
        "time over the row's (loss+grad rows)",
        "",
        f"{'shape':>10}  {'contender':<26} {'median us':>10} {'spread':>7} {'vs torch':>9} {'vs numpy':>9}",
    ]
    last = None
    for row in rows:
        shape = f"{row.shape[0]}x{row.shape[1]}" if row.shape != last else ""
        if row.shape != last and last is not None:
            lines.append("")
        last = row.shape
        vs_torch = f"{row.vs_torch:8.1f}x" if row.vs_torch else f"{'':>9}"
        vs_numpy = f"{row.vs_numpy:8.1f}x" if row.vs_numpy else f"{'':>9}"
        lines.append(f"{shape:>10}  {row.name:<26} {row.median_us:10.1f} {row.spread_pct:6.1f}% {vs_torch} {vs_numpy}")
    lines += [f"note: {note}" for note in dict.fromkeys(notes)]
    return "\n".join(lines)


def main(args: Any) -> int:
    import json

    from ._bench import DEFAULT_SHAPES
    from ._threads import get_num_threads

    threads = args.threads if args.threads is not None else get_num_threads()
    shapes = SHAPES if args.shapes is DEFAULT_SHAPES else args.shapes  # --shapes given: those
    header, rows, notes = run(shapes, threads, args.repeat)
    print(format_table(header, rows, notes), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": [asdict(r) for r in rows], "notes": notes}, f, indent=1)
    return 0
