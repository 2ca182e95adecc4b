"""``fastxent bench --linear``: the fused linear cross-entropy (loss and the three gradients)
against torch.nn.functional.linear_cross_entropy unchunked and chunked, and the three GEMMs
alone; time and extra peak memory, each contender in a fresh process.

Extra peak memory is the process's peak RSS (``ru_maxrss``) during the timed calls minus
its RSS just before them, with the inputs allocated and one warm-up call done: what one
forward+backward needs beyond its inputs. The time is the median of the rounds. Both numba
and the BLAS run at the bench's thread count (``--threads``); which BLAS ran is reported
(threadpoolctl for NumPy's, ``torch.__config__`` for torch's). "fastxent (NumPy)" multiplies
with NumPy's BLAS and is compared with "three GEMMs alone" (NumPy's); fastxent.torch
multiplies with torch's and is compared with "three GEMMs (torch)".
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import textwrap

DEFAULT_SHAPE = (2048, 512, 65536)  # N, H, V

_CHILD = textwrap.dedent(
    """
    import json, resource, sys, time
    import numpy as np
    n, h, v, which, repeat, threads, chunk_rows = sys.argv[1:8]
    n, h, v, repeat, threads = int(n), int(h), int(v), int(repeat), int(threads)
    chunk_rows = int(chunk_rows) or None
    import torch
    torch.set_num_threads(threads)
    import fastxent as fx
    fx.set_num_threads(threads)
    from fastxent._info import numpy_blas, torch_blas
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(threads)
    except ImportError:
        pass
    blas = [f"{i.get('internal_api')} {i.get('version')} {i.get('architecture') or ''}".strip() for i in numpy_blas()]
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((n, h), dtype=np.float32)
    weight = (rng.standard_normal((v, h), dtype=np.float32) * 0.05)
    target = rng.integers(0, v, n)
    ht, wt, yt = torch.from_numpy(hidden), torch.from_numpy(weight), torch.from_numpy(target)
    F = torch.nn.functional

    def torch_call(options):
        a, b = ht.detach().requires_grad_(), wt.detach().requires_grad_()
        F.linear_cross_entropy(a, b, yt, options=options).backward()
        return a.grad, b.grad

    def gemms():
        logits = hidden @ weight.T
        return logits @ weight, logits.T @ hidden

    def gemms_torch():
        logits = ht @ wt.T
        return logits @ wt, logits.T @ ht

    def fastxent_torch():
        import fastxent.torch as fxt
        a, b = ht.detach().requires_grad_(), wt.detach().requires_grad_()
        fxt.linear_cross_entropy(a, b, yt, chunk_rows=chunk_rows).backward()
        return a.grad, b.grad

    calls = {
        "fastxent (NumPy)": lambda: fx.linear_cross_entropy_with_grad(hidden, weight, target, chunk_rows=chunk_rows),
        "fastxent.torch": fastxent_torch,
        "torch unchunked": lambda: torch_call(None),
        "torch chunked": lambda: torch_call(torch.nn.LinearCrossEntropyOptions()),
        "three GEMMs alone": gemms,
        "three GEMMs (torch)": gemms_torch,
    }
    call = calls[which]
    result = call()  # warm-up (compiles, first-touch of BLAS buffers)
    del result
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    before = rss()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - start)
        del result
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    torch_info = torch_blas() or {}
    blas.append(f"torch: {torch_info.get('blas')} ({torch_info.get('threads')} threads)")
    print(json.dumps({"times": times, "extra_bytes": max(0, peak - before), "blas": blas}))
    """
)

CONTENDERS = (
    "fastxent (NumPy)",
    "fastxent.torch",
    "torch unchunked",
    "torch chunked",
    "three GEMMs alone",
    "three GEMMs (torch)",
)


def run(
    shape=DEFAULT_SHAPE, threads: int = 2, repeat: int = 3, chunk_rows: int | None = None, contenders=CONTENDERS
) -> dict:
    """Each contender in its own process; returns the numbers by contender. ``chunk_rows``:
    fastxent's (None: its default, ``_linear._chunk_rows``)."""
    n, h, v = shape
    results = {}
    for name in contenders:
        completed = subprocess.run(
            [
                sys.executable,
                "-c",
                _CHILD,
                str(n),
                str(h),
                str(v),
                name,
                str(repeat),
                str(threads),
                str(chunk_rows or 0),
            ],
            capture_output=True,
            text=True,
        )
        if completed.returncode != 0:
            reason = (completed.stderr.strip().splitlines() or ["failed"])[-1]
            print(f"note: {name} skipped ({reason})", file=sys.stderr)
            continue
        results[name] = json.loads(completed.stdout.strip().splitlines()[-1])
    return results


def format_table(shape, threads: int, repeat: int, results: dict, chunk_rows: int | None = None) -> str:
    n, h, v = shape
    logits_bytes = n * v * 4
    from ._linear import _chunk_rows

    rows = _chunk_rows(chunk_rows, n, v, h)
    lines = [
        f"fused linear cross-entropy, fwd+bwd: N={n} H={h} V={v} float32, {threads} threads, median of {repeat} "
        f"(each contender a fresh process); logits would be {logits_bytes / 1e9:.2f} GB; fastxent's chunks: "
        f"{rows} rows ({rows * v * 4 / 2**20:.0f} MiB of logits)",
        f"BLAS: {'; '.join(next(iter(results.values()))['blas']) if results else '?'}",
        f"{'contender':<22} {'seconds':>8} {'extra peak MB':>14} {'vs torch unchunked':>19}",
    ]
    base = results.get("torch unchunked")
    for name, record in results.items():
        median = statistics.median(record["times"])
        ratio = "" if base is None else f"{statistics.median(base['times']) / median:.2f}x"
        lines.append(f"{name:<22} {median:8.2f} {record['extra_bytes'] / 1e6:14.0f} {ratio:>19}")
    return "\n".join(lines)


def main(args) -> int:
    shape = tuple(args.linear_shape) if getattr(args, "linear_shape", None) else DEFAULT_SHAPE
    threads = args.threads or 2
    repeat = args.repeat
    chunk_rows = getattr(args, "linear_chunk_rows", None)
    results = run(shape, threads, repeat, chunk_rows)
    print(format_table(shape, threads, repeat, results, chunk_rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": shape, "threads": threads, "chunk_rows": chunk_rows, "results": results}, f, indent=1)
    return 0 if results else 1
