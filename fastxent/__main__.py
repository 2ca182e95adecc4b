"""Command line: ``fastxent bench`` (the benchmark table), ``fastxent score``, ``fastxent
demo``, ``fastxent precompile`` and ``fastxent info``.

Conventions: results on stdout, progress and notes on stderr, ``--json`` for machines.
Every argument is checked before any work starts: a bad one is a usage error (exit 2,
one line, no traceback)."""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np


def demo() -> int:
    """Compute a loss and gradient with the fastest backend and check them against the reference."""
    import fastxent as fx
    from fastxent import _reference

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((512, 1000), dtype=np.float32)
    labels = rng.integers(0, 1000, 512)
    loss, grad = fx.cross_entropy_with_grad(logits, labels)
    ref_loss, ref_grad = _reference.cross_entropy(logits, labels)
    loss_error = abs(float(loss) - ref_loss) / abs(ref_loss)
    grad_error = float(np.max(np.abs(grad - ref_grad)))
    print(f"backends: {', '.join(fx.available_backends())}; threads: {fx.get_num_threads()}")
    print(f"cross_entropy(512 x 1000 float32) = {float(loss):.7f} (reference {ref_loss:.7f})")
    print(f"relative loss error {loss_error:.1e}, max gradient error {grad_error:.1e}")
    ok = loss_error < 1e-6 and grad_error < 1e-7
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


def _writable_file(parser: argparse.ArgumentParser, option: str, path: str) -> None:
    """A usage error unless ``path`` can be created or overwritten as a file."""
    target = os.path.abspath(path)
    folder = os.path.dirname(target)
    if os.path.isdir(target):
        parser.error(f"{option} {path}: is a directory")
    if not os.path.isdir(folder):
        parser.error(f"{option} {path}: no such directory {folder}")
    if not os.access(folder, os.W_OK) or (os.path.exists(target) and not os.access(target, os.W_OK)):
        parser.error(f"{option} {path}: not writable")


def _check_bench_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every argument of ``bench`` checked before any work (the benchmark takes minutes)."""
    import importlib.util

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if args.threads is not None and not 1 <= args.threads <= cores:
        parser.error(f"--threads {args.threads}: this machine gives this process {cores} cores (1..{cores})")
    if args.repeat < 1:
        parser.error(f"--repeat {args.repeat}: at least 1 timed round")
    if args.plot is not None and args.small:
        parser.error("--plot draws the main table's time per logit, not --small's latencies")
    if args.plot is not None:
        if importlib.util.find_spec("matplotlib") is None:
            parser.error("--plot needs matplotlib: pip install 'fastxent[bench]'")
        _writable_file(parser, "--plot", args.plot)
    if args.json is not None:
        _writable_file(parser, "--json", args.json)


def precompile() -> int:
    """``fastxent precompile``: every kernel of the dispatch table, with a progress bar."""
    import time

    import fastxent as fx
    from fastxent._progress import Progress

    bar: Progress | None = None

    def progress(done: int, total: int, what: str, seconds: float) -> None:
        nonlocal bar
        if bar is None:
            bar = Progress(total, "precompile", always_log=True, unit="kernel")
        bar.step(f"{what} ({seconds:.1f} s)")

    start = time.perf_counter()
    try:
        count = fx.precompile(progress=progress, load=False)  # this process ends next
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
    print(
        f"{count} numba kernel specialisations compiled or loaded from the cache in "
        f"{time.perf_counter() - start:.1f} s (backends: {', '.join(fx.available_backends())})"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    from fastxent import __version__, _bench, _score

    parser = argparse.ArgumentParser(
        prog="fastxent",
        description="fused softmax cross-entropy (loss and gradient) on the CPU, with PyTorch's numbers",
        epilog="results go to stdout, progress to stderr; `fastxent COMMAND -h` for a command's options",
    )
    parser.add_argument("--version", action="version", version=f"fastxent {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    bench = commands.add_parser(
        "bench",
        help="time fastxent against PyTorch, JAX and the memory floor",
        description="Time fastxent's loss+grad against eager PyTorch, torch.compile, JAX jit (when installed) "
        "and a parallel copy of the logits (the memory floor), rounds interleaved; print a table (stdout).",
    )
    _bench.add_arguments(bench)
    commands.add_parser(
        "demo",
        help="compute a loss and gradient and check them against the reference",
        description="Compute one 512 x 1000 loss and gradient with the fastest backend and check them "
        "against the float64 NumPy reference; exit 1 on a mismatch.",
    )
    commands.add_parser(
        "precompile",
        help="compile every kernel into numba's cache (a warm-up for fresh machines)",
        description="Compile every numba kernel specialisation of the dispatch table into numba's on-disk cache "
        "(this process and a worker process side by side), so that no later call pays a compile.",
    )
    info_command = commands.add_parser(
        "info",
        help="what fastxent runs on: versions, CPU, backends, threads, NumPy's and torch's BLAS",
        description="Print what this installation runs on: versions, the CPU and its vector extensions, the "
        "backends, threads and numba's threading layer and cache, NumPy's BLAS (threadpoolctl: library, version, "
        "the kernel it runs), torch's BLAS, the optional packages and the environment variables that change them. "
        "Paste it into a bug report.",
    )
    info_command.add_argument("--json", action="store_true", help="print it as JSON")
    score = commands.add_parser(
        "score",
        help="metrics of saved logits (.npy / Zarr), streamed: cross-entropy, perplexity, accuracy, ECE",
        description="Stream LOGITS (a memory-mapped .npy file or a Zarr array, never loaded whole) in row chunks "
        "against LABELS (class indices) and print cross_entropy, perplexity, accuracy, top5_accuracy, ece "
        "(15 bins) and rows; the result does not depend on --chunk-rows.",
    )
    _score.add_arguments(score)
    args = parser.parse_args(argv)
    if args.command == "score":
        return _score.main(score, args)
    if args.command == "bench":
        _check_bench_arguments(bench, args)
        # OpenMP pools (numba's and torch's own) spin after each parallel call by default,
        # stealing the core the next contender needs; sleeping is fairer to both. Only if
        # the user has not chosen; must happen before the first parallel call.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        return _bench.main(args)
    if args.command == "demo":
        return demo()
    if args.command == "precompile":
        code = precompile()
        if argv is None:  # this process's own command line: it ends here
            # Every kernel is in the cache's files; the interpreter's finalisation would only
            # free numba's compiler state (~0.7 s after a cold compile).
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code
    if args.command == "info":
        from fastxent._info import format_info, info

        found = info()
        print(json.dumps(found, indent=2) if args.json else format_info(found))
        return 0
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
