"""Distillation loss + gradient: fastxent against PyTorch (eager and torch.compile).

The peer is what a PyTorch user writes: ``log_softmax`` of the student and of the teacher
(each divided by T), ``F.kl_div(..., log_target=True, reduction="batchmean") * T**2`` (beta = 0;
the reverse KL at beta = 1; Liger-Kernel's JSD written in torch ops in between), forward and
backward through the student. Also the copy floor: one pass that reads the two N x C inputs
and writes one N x C output (numba, parallel), the least any fused kernel moves.

    python bench/distillation.py [--shapes 4096x32000,16384x1000] [--beta 0 0.5] [--rounds 7] [--threads 2]

Everything runs in one process with the same thread count (torch.set_num_threads,
fastxent.set_num_threads), each round timing every contender once in turn (interleaved);
the table shows medians over the rounds. Not a test: timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import math
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402


def _torch_loss(torch, F, beta: float, temperature: float):
    def loss(student, teacher):
        lq = F.log_softmax(student / temperature, dim=-1)
        lp = F.log_softmax(teacher / temperature, dim=-1)
        if beta == 0:
            value = F.kl_div(lq, lp, reduction="batchmean", log_target=True)
        elif beta == 1:
            value = F.kl_div(lp, lq, reduction="batchmean", log_target=True)
        else:  # Liger-Kernel's chunked_loss/jsd_loss.py, in torch ops
            lm = torch.logsumexp(torch.stack([lq + math.log(1 - beta), lp + math.log(beta)]), dim=0)
            value = beta * F.kl_div(lm, lp, reduction="batchmean", log_target=True) + (1 - beta) * F.kl_div(
                lm, lq, reduction="batchmean", log_target=True
            )
        return value * temperature**2

    return loss


def _copy_floor():
    import numba

    @numba.njit(parallel=True, cache=True)
    def read_two_write_one(a, b, out):
        for i in numba.prange(a.shape[0]):
            for c in range(a.shape[1]):
                out[i, c] = a[i, c] + b[i, c]

    return read_two_write_one


def _contenders(torch, F, fx, floor_kernel, student, teacher, out, beta, temperature, compile_):
    """name -> a call, for one shape and beta."""
    st, tt = torch.from_numpy(student), torch.from_numpy(teacher)
    contenders = {"copy floor": lambda: floor_kernel(student, teacher, out)}
    for backend in ("numba", "cython"):
        if backend in fx.available_backends():
            contenders[f"fastxent {backend} out="] = lambda b=backend: fx.distillation_loss_with_grad(
                student, teacher, beta=beta, temperature=temperature, out=out, backend=b
            )
    losses = {"torch eager fwd+bwd": _torch_loss(torch, F, beta, temperature)}
    if compile_:
        import torch._dynamo

        torch._dynamo.reset()
        compiled = torch.compile(_torch_loss(torch, F, beta, temperature), dynamic=False, fullgraph=True)
        losses["torch.compile fwd+bwd"] = compiled
    for name, loss in losses.items():

        def fwd_bwd(loss=loss):
            leaf = st.detach().requires_grad_(True)
            loss(leaf, tt).backward()
            return leaf.grad

        contenders[name] = fwd_bwd
    return contenders


def run(shapes, betas, rounds: int, threads: int, temperature: float, compile_: bool) -> None:
    import torch
    import torch.nn.functional as F

    import fastxent as fx

    torch.set_num_threads(threads)
    fx.set_num_threads(threads)
    floor_kernel = _copy_floor()
    print(
        f"threads {threads}, median of {rounds} interleaved rounds, float32, T = {temperature}; "
        f"torch {torch.__version__}; backends {', '.join(fx.available_backends())}"
    )
    for n, n_classes in shapes:
        rng = np.random.default_rng(0)
        student = rng.standard_normal((n, n_classes), dtype=np.float32)
        teacher = 2 * rng.standard_normal((n, n_classes), dtype=np.float32)
        out = np.empty_like(student)
        for beta in betas:
            contenders = _contenders(torch, F, fx, floor_kernel, student, teacher, out, beta, temperature, compile_)
            for function in contenders.values():  # warm: JIT, compile, caches, page faults
                function()
                function()
            times: dict[str, list[float]] = {name: [] for name in contenders}
            for _ in range(rounds):
                for name, function in contenders.items():
                    start = time.perf_counter()
                    function()
                    times[name].append(time.perf_counter() - start)
            median = {name: float(np.median(values)) * 1e3 for name, values in times.items()}
            print(f"\n{n} x {n_classes}, beta = {beta}", flush=True)
            for name, ms in median.items():
                ratios = []
                if not name.startswith(("torch", "copy")):
                    for peer in ("torch eager fwd+bwd", "torch.compile fwd+bwd"):
                        if peer in median:
                            ratios.append(f"{median[peer] / ms:5.1f}x {peer.split(' fwd')[0]}")
                    ratios.append(f"{ms / median['copy floor']:4.2f}x the floor")
                print(f"  {name:24s} {ms:9.2f} ms   {'   '.join(ratios)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="4096x32000,16384x1000")
    parser.add_argument("--beta", type=float, nargs="+", default=[0.0, 0.5])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--no-compile", action="store_true", help="leave out torch.compile")
    args = parser.parse_args()
    shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",")]
    run(shapes, args.beta, args.rounds, args.threads, args.temperature, not args.no_compile)


if __name__ == "__main__":
    main()
