"""Every contender of ``fastxent bench`` per dtype x shape, as pytest-benchmark suites.

Run with ``pytest bench/ --benchmark-only``. The contenders come from the same registry as
``fastxent bench`` (``fastxent._bench._contenders``: fastxent's backends fresh, ``out=``, in
place and loss only, the extensions, the torch adapter, eager PyTorch, JAX and the memory
floor, whichever are installed), not a second list; torch.compile is left out here (its
compile per shape belongs to ``fastxent bench``). Each is called once (JIT warm-up) before
timing; the groups put one shape and dtype together.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastxent as fx
from fastxent import _bench

SHAPES = [(262144, 10), (65536, 128), (16384, 1000), (4096, 32000)]


def _registry(x: np.ndarray, y: np.ndarray) -> dict[str, _bench.Contender]:
    found = _bench._contenders(x, y, fx.get_num_threads(), [], with_reference=False, torch_compile=False)
    return {c.name: c for c in found}


#: the registry's names (which contenders exist here does not depend on the shape)
NAMES = list(_registry(np.zeros((4, 10), np.float32), np.zeros(4, np.int64)))


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def shape(request):
    return request.param


@pytest.fixture(scope="module", params=["float32", "float64"])
def dtype(request):
    return np.dtype(request.param)


@pytest.fixture(scope="module")
def contenders(shape, dtype):
    rng = np.random.default_rng(0)
    n, n_classes = shape
    x = rng.standard_normal(shape).astype(dtype)
    return x.shape, x.dtype, _registry(x, rng.integers(0, n_classes, n))


@pytest.mark.parametrize("name", NAMES)
def test_contender(benchmark, contenders, name):
    shape, dtype, registry = contenders
    contender = registry[name]
    contender.run()  # warm-up: JIT compile or cache load, first touch
    benchmark.group = f"{shape[0]}x{shape[1]} {dtype}"
    benchmark(contender.run)
