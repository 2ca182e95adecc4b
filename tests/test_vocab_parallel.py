"""fastxent.torch.vocab_parallel_cross_entropy on 2 processes over gloo (tcp on 127.0.0.1):
the loss and every shard's gradient equal F.cross_entropy + autograd on the whole logits
in float64, and the communication is a few all-reduces of per-row statistics."""

from __future__ import annotations

import socket

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

N, C, WORLD = 24, 60, 2
CASES = [
    {"reduction": "mean"},
    {"reduction": "sum", "label_smoothing": 0.1},
    {"reduction": "none", "weight": True, "ignore_index": 3},
    {"reduction": "mean", "weight": True, "label_smoothing": 0.2, "ignore_index": -100},
]
EXTENDED = {"z_loss": 1e-2, "softcap": 4.0, "logit_scale": 1.5}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _problem():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(N, C, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, C, (N,), generator=g)
    y[::5] = 3  # the class that one case ignores
    w = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    return x, y, w


def _worker(rank: int, port: int, results) -> None:
    import fastxent as fx
    import fastxent.torch as fxt

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        x, y, w = _problem()
        width = C // WORLD
        out = []
        calls = []
        original = dist.all_reduce
        dist.all_reduce = lambda tensor, *a, **k: (calls.append(tuple(tensor.shape)), original(tensor, *a, **k))[1]
        for case in CASES:
            options = {k: v for k, v in case.items() if k != "weight"}
            weight = w if case.get("weight") else None
            shard = x[:, rank * width : (rank + 1) * width].clone().requires_grad_()
            loss = fxt.vocab_parallel_cross_entropy(shard, y, weight=weight, **options)
            loss.backward(torch.ones_like(loss))
            out.append((loss.detach().numpy(), shard.grad.numpy()))
        # extensions, with an explicit (unequal) layout: rank 0 holds 0..21, rank 1 22..59
        start, stop = (0, 22) if rank == 0 else (22, C)
        shard = x[:, start:stop].clone().requires_grad_()
        loss = fxt.vocab_parallel_cross_entropy(shard, y, class_start=start, num_classes=C, **EXTENDED)
        loss.backward()
        expected_loss, expected_grad = fx.cross_entropy_with_grad(x.numpy(), y.numpy(), **EXTENDED)
        out.append((loss.detach().numpy(), shard.grad.numpy(), expected_loss, expected_grad[:, start:stop]))
        results[rank] = (out, calls)
    finally:
        dist.destroy_process_group()


def test_two_ranks_on_gloo_equal_the_unsharded_loss_and_gradients():
    port = _free_port()
    manager = mp.get_context("spawn").Manager()
    results = manager.dict()
    mp.start_processes(_worker, args=(port, results), nprocs=WORLD, join=True, start_method="spawn")
    x, y, w = _problem()
    width = C // WORLD
    for rank in range(WORLD):
        out, calls = results[rank]
        for case, (loss, grad) in zip(CASES, out[: len(CASES)], strict=True):
            options = {k: v for k, v in case.items() if k != "weight"}
            leaf = x.clone().requires_grad_()
            expected = torch.nn.functional.cross_entropy(leaf, y, weight=w if case.get("weight") else None, **options)
            expected.backward(torch.ones_like(expected))
            np.testing.assert_allclose(loss, expected.detach().numpy(), rtol=1e-12, atol=1e-14, err_msg=str(case))
            np.testing.assert_allclose(
                grad, leaf.grad[:, rank * width : (rank + 1) * width].numpy(), rtol=1e-11, atol=1e-14, err_msg=str(case)
            )
        loss, grad, expected_loss, expected_grad = out[-1]
        np.testing.assert_allclose(loss, expected_loss, rtol=1e-12)
        np.testing.assert_allclose(grad, expected_grad, rtol=1e-11, atol=1e-14)
        # per call: one MAX (N,) and one SUM (N, 4) of statistics; never the logits
        assert calls == [(N,), (N, 4)] * (len(CASES) + 1)


def test_without_an_initialised_group_is_a_clear_error():
    import fastxent.torch as fxt

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is already initialised here")
    with pytest.raises(RuntimeError, match="init_process_group"):
        fxt.vocab_parallel_cross_entropy(torch.zeros(2, 3), torch.tensor([0, 1]))
