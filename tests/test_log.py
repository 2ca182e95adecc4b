"""The kernels' vectorisable logarithm (``fast_log``, used for ``log s`` of every row) against
a correctly rounded reference: mpmath at 120 bits where it is installed, else NumPy's log in
long double. No compiler needed: the numba version is tested when numba loaded, the Cython
one (the same fdlibm e_log.c, branch-free, in C) when the extension is built."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import BACKENDS

from fastxent import _dispatch


def _numba_log_array():
    from fastxent._numba_kernels import log_array

    return log_array


def _cython_log_array():
    return _dispatch.KERNELS["cython"].log_array


IMPLEMENTATIONS = [
    pytest.param(
        _numba_log_array,
        id="numba",
        marks=pytest.mark.skipif("numba" not in BACKENDS, reason="numba is not available"),
    ),
    pytest.param(
        _cython_log_array,
        id="cython",
        marks=pytest.mark.skipif(
            "cython" not in BACKENDS, reason=f"Cython backend not built: {_dispatch.UNAVAILABLE.get('cython')}"
        ),
    ),
]


def _log_reference(s: np.ndarray) -> np.ndarray:
    """log(s) to well below float64's half ulp, as long double (mpmath if available)."""
    try:
        import mpmath
    except ImportError:  # pragma: no cover - mpmath comes with sympy (torch)
        return np.log(s.astype(np.longdouble))
    mpmath.mp.prec = 120
    return np.array([mpmath.log(mpmath.mpf(float(v))) for v in s], dtype=object)


def _ulps(value: np.ndarray, exact: np.ndarray) -> np.ndarray:
    nearest = np.array([float(v) for v in exact])
    spacing = np.spacing(np.abs(nearest))
    spacing[nearest == 0] = np.finfo(np.float64).smallest_subnormal
    return np.array([abs(float(v - e)) for v, e in zip(value, exact, strict=True)]) / spacing


def _row_sums(rng) -> np.ndarray:
    return np.concatenate(
        [
            1.0 + rng.random(4000) * 1e-6,  # confident rows: s just above 1
            1.0 + rng.random(4000),
            rng.uniform(1.0, 2e5, 4000),  # the row sums of up to ~200k classes
            np.sqrt(2.0) * (1 + np.linspace(-1e-12, 1e-12, 101)),  # the split point of the mantissa
            2.0 ** np.arange(0, 60),
            [1.0, np.nextafter(1.0, 2.0), 1e300, 5e-324 * 2**52, 0.5, 0.75],
        ]
    )


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_fast_log_within_one_ulp(implementation):
    log_array = implementation()
    s = _row_sums(np.random.default_rng(11))
    out = np.empty_like(s)
    log_array(s, out)
    worst = float(np.max(_ulps(out, _log_reference(s))))
    assert worst <= 1.0, f"fast_log is {worst:.2f} ulp off"
    assert out[s == 1.0][0] == 0.0  # exactly: a row whose max stands alone has log s = 0


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_fast_log_propagates_nan(implementation):
    log_array = implementation()
    out = np.empty(2)
    log_array(np.array([np.nan, -np.nan]), out)
    assert np.isnan(out).all()


@pytest.mark.skipif(not {"numba", "cython"} <= set(BACKENDS), reason="needs the numba and cython backends")
def test_fast_log_backends_within_one_ulp_of_each_other():
    """The same formula; the two compilers may fuse different multiply-adds (measured: 0.6%
    of the values differ, by 1 ulp)."""
    s = np.concatenate([_row_sums(np.random.default_rng(12)), np.random.default_rng(13).uniform(1, 1e6, 100_000)])
    ours, theirs = np.empty_like(s), np.empty_like(s)
    _numba_log_array()(s, ours)
    _cython_log_array()(s, theirs)
    ulps = np.abs(ours.view(np.int64) - theirs.view(np.int64))
    assert np.max(ulps) <= 1
    assert np.mean(ulps) < 0.02
