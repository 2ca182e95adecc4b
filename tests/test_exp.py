"""The kernels' vectorisable exponential against a correctly rounded reference, in ulps.

The kernels compute ``exp(t)`` for ``t <= 0`` with their own polynomial (so that it
vectorises); ``exp_array(t, out)`` runs it alone: ``out[j] = exp(t[j])`` for C-contiguous
1-D float32 or float64 arrays. Needs no compiler: the numba version is always tested, the
Cython one when the extension is built.

The reference: float32 against ``np.exp`` in float64 (its error, < 1 ulp of float64, is
2**-29 of a float32 ulp); float64 against ``np.exp`` in x87 long double (64-bit mantissa:
its error is ~2**-11 of a float64 ulp) when the platform has it, and against mpmath on a
sample. NOT against ``np.exp`` in float64: NumPy's AVX-512 float64 exp is itself off by up
to 0.70 ulp on this machine.

Measured on x86-64 with AVX-512 (numba and Cython alike) over the dense grid, with the
fitted polynomials (float32 degree 6, float64 degree 11; docs/DESIGN.md): max 0.879 ulp
(float32, at t = -59.91194) and 0.930 ulp (float64, at t = -286.60548), mean signed error
+0.005 and -0.0005 ulp. The bounds asserted are 1 ulp and a mean of 0.1 ulp; a coefficient
off by 1% (c2 = 0.495) is thousands of ulps off.

Contract below the accurate range: the kernels flush to 0 below ``FLUSH`` (-87 for
float32, -708 for float64: the results there would be at most a few smallest normals,
nothing next to the row sum s >= 1); between ``FLUSH`` and the log of the smallest normal
a result may be 0 or accurate; below the log of half the smallest subnormal it must be 0
(that is the correctly rounded value); exp(-inf) = 0 exactly and NaN stays NaN.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fastxent import _dispatch

# The exponentials under test; if the kernels rename ``exp_array``, only these two lines change.
from fastxent._numba_kernels import exp_array as numba_exp_array

cython_exp_array = getattr(_dispatch.KERNELS.get("cython"), "exp_array", None)

IMPLEMENTATIONS = [
    pytest.param(numba_exp_array, id="numba"),
    pytest.param(
        cython_exp_array,
        id="cython",
        marks=pytest.mark.skipif(
            cython_exp_array is None, reason=f"Cython backend not built: {_dispatch.UNAVAILABLE.get('cython')}"
        ),
    ),
]
DTYPES = (np.float32, np.float64)

#: the bound on |result - exp(t)| in ulps of exp(t), on [FLUSH, 0]
MAX_ULP = 1.0
#: the bound on the mean signed error over the dense grid: the rounding errors of a sound
#: polynomial fall on both sides; a biased one (a coefficient off) shifts them all one way
MAX_MEAN_ULP = 0.1

#: mantissa bits (with the implicit one) of each dtype
PRECISION = {np.dtype(np.float32): 24, np.dtype(np.float64): 53}
#: the kernels' flush threshold: accurate on [FLUSH, 0], may be 0 below
FLUSH = {np.dtype(np.float32): -87.0, np.dtype(np.float64): -708.0}
#: log of the smallest normal: below it a result is at most the smallest normal
LOG_TINY = {np.dtype(np.float32): math.log(2.0**-126), np.dtype(np.float64): math.log(2.0**-1022)}
#: log of half the smallest subnormal: below it the correctly rounded exp is 0
LOG_ZERO = {np.dtype(np.float32): math.log(2.0**-150), np.dtype(np.float64): -1075 * math.log(2.0)}

#: whether long double has at least a 64-bit mantissa (x87 extended or IEEE quad)
EXTENDED_LONG_DOUBLE = np.finfo(np.longdouble).nmant >= 63


def run(exp_array, t):
    t = np.ascontiguousarray(t)
    out = np.full_like(t, np.nan)
    exp_array(t, out)
    return out


def exact_exp(t):
    """exp(t) in a precision far beyond t's dtype, and the ulps its own error may add."""
    if t.dtype == np.float32:
        return np.exp(t.astype(np.float64)), 0.0
    if EXTENDED_LONG_DOUBLE:
        return np.exp(t.astype(np.longdouble)), 0.0
    return np.exp(t), 1.0  # float64 np.exp: itself < 1 ulp off


def ulp_error(approx, exact, dtype):
    """Signed error of ``approx`` in ulps of the dtype at ``exact`` (normal range)."""
    _, exponent = np.frexp(exact)
    ulp = np.ldexp(np.ones_like(exact), exponent - PRECISION[np.dtype(dtype)])
    return (approx.astype(exact.dtype) - exact) / ulp


def reduction_boundaries(dtype, lo, width=16):
    """Points around t = -(k + 1/2) ln 2, where the range reduction switches k and |r| is
    largest (the polynomial's worst case), ``width`` ulps on each side, down to ``lo``."""
    centres = -(np.arange(int(-lo / math.log(2.0)) + 1) + 0.5) * math.log(2.0)
    centres = centres[centres >= lo].astype(dtype)
    steps = np.arange(-width, width + 1)
    spacing = np.spacing(np.abs(centres)).astype(dtype)
    return (centres[:, None] + steps[None, :] * spacing[:, None]).reshape(-1).astype(dtype)


def dense_grid(dtype):
    """A dense grid of [FLUSH, 0]: even steps, random points, the range-reduction edges,
    and near 0 (where exp(t) crosses 1/2 and 1, the ulp changes size)."""
    lo = FLUSH[np.dtype(dtype)]
    rng = np.random.default_rng(7)
    t = np.concatenate(
        [
            np.linspace(lo, 0.0, 1_000_001),
            rng.uniform(lo, 0.0, 500_000),
            -rng.random(200_000),
            -(10.0 ** rng.uniform(-12, 0, 50_000)),
        ]
    ).astype(dtype)
    t = np.concatenate([t, reduction_boundaries(dtype, lo)])
    return t[(t >= lo) & (t <= 0)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("exp_array", IMPLEMENTATIONS)
def test_ulp_error_on_dense_grid(exp_array, dtype):
    t = dense_grid(dtype)
    got = run(exp_array, t)
    exact, allowance = exact_exp(t)
    err = ulp_error(got, exact, dtype)
    worst = int(np.argmax(np.abs(err)))
    max_ulp = float(np.abs(err[worst]))
    mean_ulp = float(np.mean(err))
    assert max_ulp <= MAX_ULP + allowance, (
        f"max error {max_ulp:.3f} ulp at t = {t[worst]!r}: {got[worst]!r}, exp = {exact[worst]!r}"
    )
    if not allowance:
        assert abs(mean_ulp) <= MAX_MEAN_ULP, f"mean signed error {mean_ulp:+.4f} ulp: biased (max {max_ulp:.3f})"
    assert np.all((got > 0) & (got <= 1)), "exp(t) for t <= 0 must lie in (0, 1]"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("exp_array", IMPLEMENTATIONS)
def test_ulp_error_against_mpmath(exp_array, dtype):
    """A sample against mpmath at 128 bits (the float64 reference where long double is
    plain double, and a check of the long double reference where it is not)."""
    mpmath = pytest.importorskip("mpmath")
    lo = FLUSH[np.dtype(dtype)]
    rng = np.random.default_rng(11)
    t = np.concatenate(
        [
            rng.uniform(lo, 0.0, 3000),
            -rng.random(1000),
            reduction_boundaries(dtype, lo, width=1)[::3],
            [lo, 0.0, -np.finfo(dtype).eps],
        ]
    ).astype(dtype)
    got = run(exp_array, t)
    p = PRECISION[np.dtype(dtype)]
    worst = 0.0
    with mpmath.workprec(128):
        for tj, gj in zip(t.tolist(), got.tolist(), strict=True):
            exact = mpmath.exp(mpmath.mpf(tj))
            _, exponent = mpmath.frexp(exact)
            err = float(abs(mpmath.mpf(gj) - exact) / mpmath.ldexp(1, int(exponent) - p))
            if err > worst:
                worst, worst_t = err, tj
    assert worst <= MAX_ULP, f"max error {worst:.3f} ulp at t = {worst_t!r}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("exp_array", IMPLEMENTATIONS)
def test_edge_cases(exp_array, dtype):
    dtype = np.dtype(dtype)
    finfo = np.finfo(dtype)
    lo, log_tiny, log_zero = (dtype.type(table[dtype]) for table in (FLUSH, LOG_TINY, LOG_ZERO))
    inf = dtype.type(np.inf)

    # exp(0) = exp(-0) = 1 exactly; tiny negatives round to 1 or the float just below it
    assert np.all(run(exp_array, np.array([0.0, -0.0], dtype)) == 1)
    tiny = -np.array(
        [finfo.smallest_subnormal, finfo.smallest_normal, 1e-30, finfo.eps / 4, finfo.eps / 2, finfo.eps, 1e-4], dtype
    )
    got = run(exp_array, tiny)
    exact, allowance = exact_exp(tiny)
    assert np.all(got <= 1)
    assert np.max(np.abs(ulp_error(got, exact, dtype))) <= MAX_ULP + allowance, got
    assert np.all(got[:3] == 1), "exp of a tiny negative rounds to 1"

    # the flush threshold itself and the floats just above it: accurate
    at = np.array([lo, np.nextafter(lo, inf), np.nextafter(np.nextafter(lo, inf), inf)], dtype)
    got = run(exp_array, at)
    exact, allowance = exact_exp(at)
    assert np.max(np.abs(ulp_error(got, exact, dtype))) <= MAX_ULP + allowance, (at, got)

    # just below it, down to the log of the smallest normal: 0 or accurate
    below = np.array([np.nextafter(lo, -inf), lo - 0.01, (lo + log_tiny) / 2, log_tiny + 1e-6], dtype)
    below = below[below >= log_tiny]
    got = run(exp_array, below)
    exact, allowance = exact_exp(below)
    accurate = np.abs(ulp_error(got, exact, dtype)) <= MAX_ULP + allowance
    assert np.all((got == 0) | accurate), (below, got)

    # below the smallest normal: at most the smallest normal, never negative
    subnormal = np.array([np.nextafter(log_tiny, -inf), log_tiny - 1, (log_tiny + log_zero) / 2], dtype)
    got = run(exp_array, subnormal)
    assert np.all((got >= 0) & (got <= finfo.smallest_normal)), (subnormal, got)

    # below the log of half the smallest subnormal, -inf included: exactly 0
    zero = np.array([np.nextafter(log_zero, -inf), log_zero - 1, -1e4, -1e30, -finfo.max, -np.inf], dtype)
    zero = zero[zero < log_zero]
    got = run(exp_array, zero)
    assert np.all(got == 0), (zero, got)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("exp_array", IMPLEMENTATIONS)
def test_nan_stays_in_its_lane(exp_array, dtype):
    """NaN gives NaN, in every position of a vector, without touching its neighbours."""
    rng = np.random.default_rng(3)
    t = -rng.uniform(0, 20, 67).astype(dtype)
    nan_at = np.array([0, 1, 7, 15, 16, 31, 32, 33, 63, 66])
    t[nan_at] = np.nan
    t[40] = -np.inf
    got = run(exp_array, t)
    assert np.array_equal(np.flatnonzero(np.isnan(got)), nan_at)
    assert got[40] == 0
    finite = np.isfinite(t)
    exact, allowance = exact_exp(t[finite])
    assert np.max(np.abs(ulp_error(got[finite], exact, dtype))) <= MAX_ULP + allowance
