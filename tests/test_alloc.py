"""The cache of fresh gradient blocks (fastxent/_alloc.py): a dropped gradient's block is
reused by the next fresh gradient, never while any array, view or tensor still uses it."""

from __future__ import annotations

import gc
import os
import subprocess
import sys

import numpy as np
import pytest

import fastxent as fx
from fastxent import _alloc

N, C = 256, 512  # 512 KiB of float32: above the lowered threshold below


@pytest.fixture(autouse=True)
def small_threshold(monkeypatch):
    monkeypatch.setattr(_alloc, "MIN_BYTES", 1 << 16)
    monkeypatch.setattr(_alloc, "ENABLED", True)
    fx.release_memory()
    yield
    fx.release_memory()


def _data():
    rng = np.random.default_rng(0)
    return rng.standard_normal((N, C), dtype=np.float32), rng.integers(0, C, N)


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def _cached(a: np.ndarray) -> bool:
    """Whether ``a``'s memory is a block of the cache."""
    base = a
    while isinstance(base, np.ndarray):
        base = base.base
    return isinstance(base, _alloc._Lease)


def test_dropped_gradient_block_is_reused_and_results_are_right():
    x, y = _data()
    _, first = fx.cross_entropy_with_grad(x, y)
    address = _address(first)
    first[...] = np.nan  # whatever the block held must be overwritten
    del first
    gc.collect()
    assert _alloc.cached_bytes() == N * C * 4
    loss, second = fx.cross_entropy_with_grad(x, y)
    assert _address(second) == address  # the same pages, no new mapping
    assert _alloc.cached_bytes() == 0
    out = np.empty_like(x)
    loss_out, _ = fx.cross_entropy_with_grad(x, y, out=out)
    np.testing.assert_array_equal(second, out)
    assert loss == loss_out
    assert second.dtype == np.float32 and second.shape == (N, C) and second.flags.c_contiguous
    assert second.flags.writeable


def test_block_in_use_through_a_view_is_not_reused():
    x, y = _data()
    _, first = fx.cross_entropy_with_grad(x, y)
    keep = first[::2, 3:]  # a view outlives the array it came from
    expected = keep.copy()
    del first
    gc.collect()
    assert _alloc.cached_bytes() == 0
    _, second = fx.cross_entropy_with_grad(x + 1.0, (y + 1) % C)
    assert not np.shares_memory(second, keep)
    np.testing.assert_array_equal(keep, expected)
    del keep
    gc.collect()
    assert _alloc.cached_bytes() == N * C * 4


def test_block_in_use_through_a_torch_tensor_is_not_reused():
    torch = pytest.importorskip("torch")
    x, y = _data()
    _, first = fx.cross_entropy_with_grad(x, y)
    tensor = torch.from_numpy(first)
    expected = tensor.clone()
    del first
    gc.collect()
    assert _alloc.cached_bytes() == 0
    _, second = fx.cross_entropy_with_grad(x * 2.0, y)
    assert not np.shares_memory(second, tensor.numpy())
    assert torch.equal(tensor, expected)


def test_torch_adapter_gradient_comes_back_to_the_cache():
    torch = pytest.importorskip("torch")
    import fastxent.torch as fxt

    x, y = _data()
    leaf = torch.from_numpy(x).requires_grad_(True)
    fxt.cross_entropy(leaf, torch.from_numpy(y)).backward()
    expected = fx.cross_entropy_with_grad(x, y)[1]
    np.testing.assert_allclose(leaf.grad.numpy(), expected, rtol=0, atol=0)
    del expected
    gc.collect()
    before = _alloc.cached_bytes()
    leaf.grad = None
    gc.collect()
    assert _alloc.cached_bytes() == before + N * C * 4


def test_small_results_and_too_large_blocks_bypass_the_cache():
    x, y = _data()
    _, small = fx.cross_entropy_with_grad(x[:8], y[:8])
    assert not _cached(small)  # a plain np.empty
    _, big = fx.cross_entropy_with_grad(x, y)
    assert _cached(big)
    del big
    gc.collect()
    # a request under half the free block's size does not take it (nor waste it)
    _, quarter = fx.cross_entropy_with_grad(x[: N // 4], y[: N // 4])
    assert _alloc.cached_bytes() == N * C * 4
    del quarter


def test_at_most_max_free_blocks_are_kept_and_release_memory_frees_them():
    x, y = _data()
    grads = [fx.cross_entropy_with_grad(x, y)[1] for _ in range(_alloc.MAX_FREE_BLOCKS + 2)]
    del grads
    gc.collect()
    assert _alloc.cached_bytes() == _alloc.MAX_FREE_BLOCKS * N * C * 4
    assert fx.release_memory() == _alloc.MAX_FREE_BLOCKS * N * C * 4
    assert _alloc.cached_bytes() == 0


def test_environment_switch_turns_the_cache_off():
    code = (
        "import numpy as np, fastxent as fx; from fastxent import _alloc\n"
        "x = np.zeros((1024, 4096), np.float32); y = np.zeros(1024, np.int64)\n"
        "g = fx.cross_entropy_with_grad(x, y)[1]\n"
        "base = g.base.base if g.base is not None and g.base.base is not None else g.base\n"
        "print(_alloc.ENABLED, type(base).__name__)\n"
    )
    env = dict(os.environ, FASTXENT_GRADIENT_CACHE="0")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.split() == ["False", "ndarray"]


def test_with_two_free_blocks_the_newest_is_taken_without_comparing_arrays():
    """Blocks leave the free list by index: list.remove compared them with == (elementwise: a
    block-sized temporary and a ValueError), so the newest was skipped and the faults came back."""
    x, y = _data()
    first, second = fx.cross_entropy_with_grad(x, y)[1], fx.cross_entropy_with_grad(x, y)[1]
    newest = _address(second)
    del first
    gc.collect()
    del second
    gc.collect()
    assert len(_alloc._free) == 2
    assert _address(_alloc.empty((N, C), np.float32)) == newest


def test_free_blocks_hold_at_most_max_free_bytes(monkeypatch):
    monkeypatch.setattr(_alloc, "MAX_FREE_BYTES", N * C * 4 + 1)  # room for one block
    x, y = _data()
    grads = [fx.cross_entropy_with_grad(x, y)[1] for _ in range(2)]
    del grads
    gc.collect()
    assert _alloc.cached_bytes() == N * C * 4
