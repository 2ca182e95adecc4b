"""Command line: ``fastxent bench`` (the benchmark table) and ``fastxent demo``."""

from __future__ import annotations

import argparse
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


def main(argv: list[str] | None = None) -> int:
    from fastxent import _bench

    parser = argparse.ArgumentParser(prog="fastxent", description="fused softmax cross-entropy on the CPU")
    commands = parser.add_subparsers(dest="command")
    bench = commands.add_parser("bench", help="time fastxent against PyTorch, JAX and the memory floor")
    _bench.add_arguments(bench)
    commands.add_parser("demo", help="compute a loss and gradient and check them against the reference")
    commands.add_parser("precompile", help="compile every kernel into numba's cache (a warm-up for fresh machines)")
    args = parser.parse_args(argv)
    if args.command == "bench":
        # OpenMP pools (numba's and torch's own) spin after each parallel call by default,
        # stealing the core the next contender needs; sleeping is fairer to both. Only if
        # the user has not chosen; must happen before the first parallel call.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        return _bench.main(args)
    if args.command == "demo":
        return demo()
    if args.command == "precompile":
        import time

        import fastxent as fx
        from fastxent._info import _print_progress

        start = time.perf_counter()
        count = fx.precompile(progress=_print_progress)
        print(
            f"{count} numba kernel specialisations compiled or loaded from the cache in "
            f"{time.perf_counter() - start:.1f} s (backends: {', '.join(fx.available_backends())})"
        )
        return 0
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
