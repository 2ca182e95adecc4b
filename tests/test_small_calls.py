"""Small calls run on one thread (fastxent._spec.SMALL_CALL_ELEMENTS): below the size where
a second thread can only lose when the other core is busy, the kernels lower the thread
count to 1 for the call and restore it after; larger calls keep every thread."""

from __future__ import annotations

import numpy as np
import pytest

import fastxent as fx
from fastxent import _dispatch
from fastxent._spec import SMALL_CALL_ELEMENTS

pytestmark = pytest.mark.skipif(fx.get_num_threads() < 2, reason="needs 2 threads to lower")


def counts_set(monkeypatch, backend):
    """Record every thread count the backend is set to during a call."""
    seen: list[int] = []
    if backend == "numba":
        import numba

        real = numba.set_num_threads
        monkeypatch.setattr(numba, "set_num_threads", lambda n: (seen.append(n), real(n))[1])
    else:
        extension = _dispatch.KERNELS["cython"].extension
        real = extension.set_num_threads
        monkeypatch.setattr(extension, "set_num_threads", lambda n: (seen.append(n), real(n))[1])
    return seen


@pytest.mark.parametrize("backend", [b for b in ("numba", "cython") if b in _dispatch.KERNELS])
def test_small_calls_run_on_one_thread_and_restore_the_count(monkeypatch, rng, backend):
    threads = fx.get_num_threads()
    x = rng.standard_normal((64, 100)).astype(np.float32)  # 6400 logits
    y = rng.integers(0, 100, 64)
    seen = counts_set(monkeypatch, backend)
    small = fx.cross_entropy_with_grad(x, y, backend=backend)
    assert seen == [1, threads]
    assert fx.get_num_threads() == threads
    seen.clear()
    n = SMALL_CALL_ELEMENTS // 100 + 1  # just above the limit
    big_x = rng.standard_normal((n, 100)).astype(np.float32)
    big_y = rng.integers(0, 100, n)
    big_x[:64], big_y[:64] = x, y
    big = fx.cross_entropy_with_grad(big_x, big_y, backend=backend, reduction="none")
    assert seen == []  # every thread
    # one thread or two: the same rows, the same bits (thread-count invariance)
    np.testing.assert_array_equal(fx.cross_entropy_with_grad(x, y, backend=backend, reduction="none")[1], big[1][:64])
    assert np.isfinite(small[0])


def test_limited_gives_each_pool_its_own_count_back():
    """``_threads.limited(n)``: every pool above n runs n threads inside the block and gets its
    own count back after (also after an exception); a pool at n or fewer is left alone."""
    from fastxent import _threads

    counts = {"a": 4, "b": 2, "c": 1}
    calls = []

    def pool(name):
        def set_(k):
            calls.append((name, k))
            counts[name] = k

        return (lambda: counts[name]), set_

    pools = [pool("a"), pool("b"), pool("c")]
    with _threads.limited(2, pools):
        assert counts == {"a": 2, "b": 2, "c": 1}
    assert counts == {"a": 4, "b": 2, "c": 1}
    assert calls == [("a", 2), ("a", 4)]
    with pytest.raises(RuntimeError), _threads.limited(1, pools):
        assert counts == {"a": 1, "b": 1, "c": 1}
        raise RuntimeError
    assert counts == {"a": 4, "b": 2, "c": 1}
