"""Shared fixtures: one `backend` per available backend, and the one tolerance table."""

from __future__ import annotations

import os

# OpenMP worker threads (numba's "omp" layer, and torch's own libgomp) spin-wait after
# each parallel call by default, taking the other core from the next call on this
# 2-core machine; sleeping instead keeps the suite's run time steady. Set before the
# first parallel call starts the pools.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

import fastxent as fx  # noqa: E402
from fastxent import _reference  # noqa: E402

settings.register_profile("default", max_examples=100, deadline=None)
settings.register_profile("thorough", max_examples=2000, deadline=None)
settings.load_profile("default")

BACKENDS = fx.available_backends()

#: the one tolerance table: (rtol, atol) by the dtype the result is returned in. float32
#: kernels compute exp in float32 (< 1 ulp) and accumulate in float64; float16 results
#: are rounded to float16 at the end.
TOLERANCE = {
    np.dtype(np.float16): (2e-3, 2e-3),
    np.dtype(np.float32): (2e-5, 2e-6),
    np.dtype(np.float64): (1e-12, 1e-14),
}


def tolerance(dtype) -> dict:
    rtol, atol = TOLERANCE[np.dtype(dtype)]
    return {"rtol": rtol, "atol": atol}


def assert_close(actual, expected, dtype, *, scale: float = 1.0, err_msg: str = ""):
    """``actual`` within the dtype's tolerance of ``expected``; NaN/inf must match exactly.

    ``scale`` widens both tolerances (e.g. for sums over many rows)."""
    rtol, atol = TOLERANCE[np.dtype(dtype)]
    np.testing.assert_allclose(
        np.asarray(actual, dtype=np.float64),
        np.asarray(expected, dtype=np.float64),
        rtol=rtol * scale,
        atol=atol * scale,
        equal_nan=True,
        err_msg=err_msg,
    )


def reference_nd(x, target, **options):
    """``fastxent._reference.cross_entropy`` (float64) on (..., C) input: (loss, grad) shaped
    like the input."""
    x = np.asarray(x)
    target = np.asarray(target)
    n_classes = x.shape[-1]
    x2 = x.astype(np.float64).reshape(-1, n_classes)
    if target.dtype.kind == "f":
        t2 = target.astype(np.float64).reshape(-1, n_classes)
    else:
        t2 = target.astype(np.int64).reshape(-1)
    loss, grad = _reference.cross_entropy(x2, t2, **options)
    if options.get("reduction", "mean") == "none":
        loss = np.asarray(loss).reshape(x.shape[:-1])
    return loss, grad.reshape(x.shape)


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    """Runs a test once per available backend."""
    return request.param


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261124)
