"""`fastxent score` throughput against a plain sequential read of the same file, cold (the
file evicted from the page cache with posix_fadvise(DONTNEED) before each run) and warm;
and fastxent.dask.score on a 2-worker LocalCluster against the single-process path on the
same in-memory array.

    python bench/score.py [--rows 65536] [--classes 32000] [--dir /tmp] [--rounds 3]
                          [--dask-rows 16384] [--chunk-mb 0]   (--rows 0: Dask only)

Reports the median of the rounds (cold and warm runs interleaved) and the GB/s of each.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np


def evict(path: str) -> None:
    """Drop the file's pages from the page cache (clean pages: always possible)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=65536, help="rows of the file comparison (0: none)")
    parser.add_argument("--classes", type=int, default=32000)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dask-rows", type=int, default=16384, help="rows of the in-memory Dask comparison (0: none)")
    parser.add_argument(
        "--chunk-mb", type=int, default=0, help="row chunk size of the Dask array, in MB (0: Dask's 'auto', 128 MiB)"
    )
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    if args.rows:
        file_comparison(args, rng)
    if args.dask_rows:
        dask_comparison(args, rng)
    return 0


def file_comparison(args: argparse.Namespace, rng: np.random.Generator) -> None:
    """`fastxent score` on a .npy file against `cat` of it, cold and warm."""
    logits_path = os.path.join(args.dir, "fastxent-score-logits.npy")
    labels_path = os.path.join(args.dir, "fastxent-score-labels.npy")
    gigabytes = args.rows * args.classes * 4 / 1e9
    print(f"writing {args.rows} x {args.classes} float32 ({gigabytes:.2f} GB) to {logits_path}", file=sys.stderr)
    logits = np.lib.format.open_memmap(logits_path, mode="w+", dtype=np.float32, shape=(args.rows, args.classes))
    pool = rng.standard_normal(1 << 22, dtype=np.float32)
    for r0 in range(0, args.rows, 256):
        r1 = min(args.rows, r0 + 256)
        offsets = rng.integers(0, len(pool) - args.classes, r1 - r0)
        logits[r0:r1] = np.stack([pool[o : o + args.classes] for o in offsets]) * 3
    logits.flush()
    del logits
    np.save(labels_path, rng.integers(0, args.classes, args.rows))

    commands = {
        "cat FILE > /dev/null": ["cat", logits_path],
        "fastxent score": [sys.executable, "-m", "fastxent", "score", logits_path, labels_path],
    }
    times: dict[str, list[float]] = {f"{name} ({state})": [] for name in commands for state in ("cold", "warm")}
    timed(commands["fastxent score"])  # numba's cache, imports
    for _ in range(args.rounds):
        for name, command in commands.items():
            evict(logits_path)
            times[f"{name} (cold)"].append(timed(command))
            times[f"{name} (warm)"].append(timed(command))
    print(f"\n{args.rows} x {args.classes} float32, {gigabytes:.2f} GB, median of {args.rounds} interleaved rounds")
    print(f"{'':34} {'seconds':>8} {'GB/s':>7}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:34} {median:8.2f} {gigabytes / median:7.2f}")
    for state in ("cold", "warm"):
        ratio = statistics.median(times[f"fastxent score ({state})"]) / statistics.median(
            times[f"cat FILE > /dev/null ({state})"]
        )
        print(f"fastxent score / cat, {state}: {ratio:.2f}x")
    os.remove(logits_path)
    os.remove(labels_path)


def dask_comparison(args: argparse.Namespace, rng: np.random.Generator) -> None:
    """fastxent.dask.score on a 2-worker LocalCluster against the single process, in memory."""
    import dask.array as da
    from distributed import Client, LocalCluster

    import fastxent.dask as fxd
    from fastxent import _score

    x = rng.standard_normal((args.dask_rows, args.classes), dtype=np.float32)
    y = rng.integers(0, args.classes, args.dask_rows)
    chunk_rows: int | str = max(1, (args.chunk_mb << 20) // (4 * args.classes)) if args.chunk_mb else "auto"
    single, dask_times = [], []
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        logits_dask = client.persist(da.from_array(x, chunks=(chunk_rows, -1)))
        fxd.score(logits_dask, y)
        _score.score(x, y, progress=False)
        for _ in range(args.rounds):
            start = time.perf_counter()
            _score.score(x, y, progress=False)
            single.append(time.perf_counter() - start)
            start = time.perf_counter()
            fxd.score(logits_dask, y)
            dask_times.append(time.perf_counter() - start)
    print(
        f"\n{args.dask_rows} x {args.classes} float32 in memory: single process {statistics.median(single):.2f} s, "
        f"Dask 2-worker LocalCluster (data persisted on the workers) {statistics.median(dask_times):.2f} s: "
        f"{statistics.median(dask_times) / statistics.median(single):.2f}x (median of {args.rounds}; "
        f"{len(logits_dask.chunks[0])} row chunks of {logits_dask.chunks[0][0] * args.classes * 4 / 2**20:.0f} MiB)"
    )


if __name__ == "__main__":
    sys.exit(main())
