"""Fused loss+gradient, loss only and in place, per backend x dtype x shape.

Run with ``pytest bench/ --benchmark-only``; the JIT is warmed (one call) before timing,
and every backend of a group runs the same arrays. ``fastxent bench`` prints the same
comparison as one table, with PyTorch and the memory floor side by side.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastxent as fx

SHAPES = [(262144, 10), (65536, 128), (16384, 1000), (4096, 32000)]
BACKENDS = [b for b in fx.available_backends() if b != "numpy"]


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def shape(request):
    return request.param


@pytest.fixture(scope="module", params=["float32", "float64"])
def dtype(request):
    return np.dtype(request.param)


@pytest.fixture(scope="module")
def data(shape, dtype):
    rng = np.random.default_rng(0)
    n, n_classes = shape
    return rng.standard_normal(shape).astype(dtype), rng.integers(0, n_classes, n)


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_and_grad_out(benchmark, data, backend):
    x, y = data
    out = np.empty_like(x)
    fx.cross_entropy_with_grad(x, y, backend=backend, out=out)  # warm the JIT
    benchmark.group = f"loss+grad out= {x.shape[0]}x{x.shape[1]} {x.dtype}"
    benchmark(fx.cross_entropy_with_grad, x, y, backend=backend, out=out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_and_grad_fresh(benchmark, data, backend):
    x, y = data
    fx.cross_entropy_with_grad(x, y, backend=backend)
    benchmark.group = f"loss+grad fresh {x.shape[0]}x{x.shape[1]} {x.dtype}"
    benchmark(fx.cross_entropy_with_grad, x, y, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place(benchmark, data, backend):
    x, y = data
    buffer = x.copy()
    fx.cross_entropy_with_grad(buffer, y, backend=backend, out=buffer)
    benchmark.group = f"in place {x.shape[0]}x{x.shape[1]} {x.dtype}"
    benchmark(fx.cross_entropy_with_grad, buffer, y, backend=backend, out=buffer)


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_only(benchmark, data, backend):
    x, y = data
    fx.cross_entropy(x, y, backend=backend)
    benchmark.group = f"loss only {x.shape[0]}x{x.shape[1]} {x.dtype}"
    benchmark(fx.cross_entropy, x, y, backend=backend)


def test_memory_floor(benchmark, data):
    x, _ = data
    out = np.empty_like(x)
    benchmark.group = f"loss+grad out= {x.shape[0]}x{x.shape[1]} {x.dtype}"
    benchmark(np.copyto, out, x)


def test_torch_forward_backward(benchmark, data):
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    x, y = data
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def step():
        leaf = xt.detach().requires_grad_(True)
        F.cross_entropy(leaf, yt).backward()
        return leaf.grad

    torch.set_num_threads(fx.get_num_threads())
    step()
    benchmark.group = f"loss+grad out= {x.shape[0]}x{x.shape[1]} {x.dtype}"
    benchmark(step)
