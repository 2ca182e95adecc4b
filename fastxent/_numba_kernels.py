"""The hot row-parallel fused kernels (Numba). The same steps, in the same words, as
``_reference.py`` and ``kernels/_cy_xent.pyx``.

Row statistics are the primitive. Per row, in three phases:

  stats   (1) ``m = max_c x_c``                          (vectorised across classes or rows)
          (2) ``e_c = exp(x_c - m)`` into scratch, ``s = sum_c e_c``; the target logit
              ``x_y``; the smoothing sum ``sw = sum_c w_c (m - x_c)`` (index targets) or
              the target sums ``A = sum_c w_c t'_c``, ``B = sum_c w_c t'_c (m - x_c)``
              (probability targets)
  finish  (3) ``lse = m + log s``; index targets ``loss = (1-eps) w_y ((m - x_y) + log s)
              + eps/C (sw + W log s)``; probability targets ``loss = B + A log s``; the
              gradient coefficients ``a`` (index: ``(1-eps) w_y + eps W / C``; probability:
              ``A``), scaled by ``grad_scale / s``
  grad    (4) ``g_c = e_c a - b_c`` (index: ``b_c = grad_scale eps/C w_c``, then
              ``g_y -= grad_scale (1-eps) w_y``; probability: ``b_c = grad_scale w_c t'_c``)

One kernel per target kind (and storage dtype) runs them; the MODE, a run-time argument,
says which phases run and what is written:

- ``LOSS``: (1)-(3), per-row loss; nothing N x C is written;
- ``GRAD``: (1)-(4), per-row loss and the gradient into ``grad``: step (2) writes the
  exponentials into the gradient row itself, which step (4) rescales;
- ``IN_PLACE``: the same with ``grad`` the logits themselves: step (2) writes into the
  thread's scratch row and step (4) from it into the row, so no loop reads one name of
  the array while it writes another (LLVM's run-time overlap check fails for two names of
  one array, and sends the loop to its scalar copy, 4x slower);
- ``STATS``: (1)-(2) on a class shard (columns ``class_start..`` of the full class axis),
  the statistics into ``rowdata`` (columns ``STAT_*``), which merge exactly across shards
  (``_shards.merge_row_stats``);
- ``SHARD_GRAD``: (4) on a class shard, from the merged ``m`` and the coefficients that
  ``finish`` computed from the merged statistics (``rowdata`` columns ``COEF_*``).

The LAYOUT is chosen per call as well: for few classes (``C <= SMALL_C``, modes LOSS, GRAD
and IN_PLACE) LANES = 64 rows are transposed into scratch so that the SIMD lanes run over ROWS:
max, exp, sums, log, the loss and the gradient of those rows are then each one vector loop
over the classes, with no per-row scalar work but the stores of the per-row outputs; for
class-index targets with the options too (x', z-loss, statistics: _index_lanes). Otherwise one
row at a time, the lanes over the classes.

Accumulators (``s``, ``sw``, ``A``, ``B``) and the per-row loss are float64 for both
dtypes, as in scikit-learn's ``_loss``; the exponentials and the gradient are computed in
the input dtype. ``sum_c w_c (lse - x_c)`` is written ``sw + W log s`` so that it is a sum
of non-negative terms, without the cancellation of ``W lse - sum_c w_c x_c``.

Kernels never allocate and never validate: ``_api.py`` checks the inputs, casts them,
allocates every output (and the per-thread scratch), and hands the kernel plain arrays.
Labels are checked by ``label_stats`` before any kernel writes, so a bad label never leaves
``out=`` half written.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading

import numba
import numpy as np
from numba import prange, types
from numba.extending import overload

from ._jit import (
    COMPILE_IN_PROCESS_ENV,
    EXP_FASTMATH,
    FASTMATH,
    OUTLINED_OPTIONS,
    address_as,
    block_cfunc,
    call_by_address,
    child_process_environment,
    exact_helper,
    exp_helper,
    float_as_int,
    float_to_half,
    half_to_float,
    helper,
    int_as_float,
    kernel,
    kernel_math,
    lanes_to_rows16,
    load_cached_overload,
    outlined_helper,
    overload_options,
    pack_array,
    prefetch_for_write,
    rows_to_lanes16,
    two_to_the_rounded,
    unpack_array,
    wide_vectors,
)
from ._spec import (
    FORWARD_KL,
    OUT_CORRECT,
    OUT_ENTROPY,
    OUT_LSE,
    OUT_Z,
    REVERSE_KL,
    SMALL_CALL_ELEMENTS,
    STORAGE_BF16,
    STORAGE_NATIVE,
    Params,
    kernel_weight,
    no_gradient,
)

math = kernel_math  # noqa: F811 - the math module itself when compiled (see _jit.kernel_math)

# --- modes, layouts and the row-data columns (shared with _shards.py and the backends) ---
LOSS, GRAD, IN_PLACE, STATS, SHARD_GRAD = 0, 1, 2, 3, 4
#: STATS writes, per row: the max m, s = sum exp(x - m), the target logit (0 when the
#: target is not in this shard), and A, B (see the module docstring; for index targets A is
#: left 0 for the caller to fill with the shard's weight sum, B is sw)
STAT_M, STAT_S, STAT_TARGET, STAT_A, STAT_B = 0, 1, 2, 3, 4
N_STATS = 5
#: SHARD_GRAD reads, per row: the merged max, the gradient coefficient a * grad_scale / s,
#: and (index targets) the target term grad_scale (1-eps) w_y
COEF_M, COEF_A, COEF_Y = 0, 1, 2

#: rows at a time in the small-C layout, one per SIMD lane (the loops over them are vectors;
#: the kernels read the count from the lanes array, so LLVM does not unroll them away)
LANES = 64
#: classes up to which LOSS and GRAD run LANES rows across the lanes (read at call time)
SMALL_C = 32
#: logits per prange iteration (a block of whole rows); blocks go to the threads dynamically
BLOCK_ELEMENTS = 1 << 15


def rows_per_block(n_classes: int) -> int:
    """Whole rows per prange iteration: about BLOCK_ELEMENTS logits, a multiple of LANES."""
    rows = max(1, BLOCK_ELEMENTS // max(n_classes, 1))
    return rows - rows % LANES if rows >= LANES else rows


# --- the vectorisable exponential ---------------------------------------------------
# exp(t) for t <= 0 (and -inf, NaN), as 2**k * exp(r): k = rint(t / ln 2), r = t - k ln 2
# in two parts (Cody-Waite, so r is exact to the last bit), exp(r) by a polynomial
# 1 + r + c2 r**2 + ... fitted for the least maximum relative error on |r| <= ln2 / 2
# (float32 degree 6: 3e-9 = 0.05 ulp; float64 degree 11: 1.6e-17 = 0.07 ulp; the Taylor
# polynomials of the same accuracy need degrees 7 and 13, an FMA per element more and two
# more; the fit: docs/DESIGN.md), 2**k built in the exponent field.
# Below the smallest normal (t < LO) the result is 0: against s >= 1 such terms do not
# count, and exp(-inf) = 0 exactly. NaN propagates through r. Max error: < 1 ulp
# (tests/test_exp.py).

_F32 = np.float32
_EXP32_LOG2E = _F32(1.4426950408889634)
_EXP32_LN2_HI = _F32(0.693359375)
_EXP32_LN2_LO = _F32(-2.12194440e-4)
_EXP32_ROUND = _F32(12582912.0)  # 1.5 * 2**23: v + this rounds v to an integer
_EXP32_LO = _F32(-87.0)  # 2**-126 is the smallest normal float32
_EXP32_POLY = tuple(  # c6 ... c0
    _F32(v)
    for v in (
        0.001381461275741458,
        0.008368710055947304,
        0.04166838899254799,
        0.1666652113199234,
        0.4999999403953552,
        1.0,
        1.0,
    )
)

_EXP64_LOG2E = 1.4426950408889634
_EXP64_LN2_HI = 6.93145751953125e-1
_EXP64_LN2_LO = 1.42860682030941723212e-6
_EXP64_ROUND = 6755399441055744.0  # 1.5 * 2**52
_EXP64_LO = -708.0  # 2**-1022 is the smallest normal float64
_EXP64_POLY = (  # c11 ... c0
    2.5100375832561234e-08,
    2.7620075879983367e-07,
    2.7557268480310024e-06,
    2.4801521322368692e-05,
    0.00019841269863040545,
    0.0013888888917196719,
    0.008333333333330065,
    0.041666666666624164,
    0.16666666666666669,
    0.5000000000000001,
    1.0,
    1.0,
)


def fast_exp(t):
    """``exp(t)`` for ``t <= 0``, vectorisable; typed by ``t`` (float32 or float64)."""
    return math.exp(t)


@overload(fast_exp, jit_options=overload_options(EXP_FASTMATH))
def _fast_exp_overload(t):
    if t == types.float32:
        c6, c5, c4, c3, c2, c1, c0 = _EXP32_POLY

        def exp32(t):
            tc = t if t >= _EXP32_LO else _EXP32_LO  # NaN -> LO here; t carries the NaN on
            v = tc * _EXP32_LOG2E + _EXP32_ROUND
            k = v - _EXP32_ROUND
            r = (t - k * _EXP32_LN2_HI) - k * _EXP32_LN2_LO
            p = c6
            p = p * r + c5
            p = p * r + c4
            p = p * r + c3
            p = p * r + c2
            p = p * r + c1
            p = p * r + c0
            two_k = two_to_the_rounded(v)
            return _F32(0.0) if t < _EXP32_LO else p * two_k

        return exp32
    if t == types.float64:
        (c11, c10, c9, c8, c7, c6, c5, c4, c3, c2, c1, c0) = _EXP64_POLY

        def exp64(t):
            tc = t if t >= _EXP64_LO else _EXP64_LO
            v = tc * _EXP64_LOG2E + _EXP64_ROUND
            k = v - _EXP64_ROUND
            r = (t - k * _EXP64_LN2_HI) - k * _EXP64_LN2_LO
            p = c11
            p = p * r + c10
            p = p * r + c9
            p = p * r + c8
            p = p * r + c7
            p = p * r + c6
            p = p * r + c5
            p = p * r + c4
            p = p * r + c3
            p = p * r + c2
            p = p * r + c1
            p = p * r + c0
            two_k = two_to_the_rounded(v)
            return 0.0 if t < _EXP64_LO else p * two_k

        return exp64
    return None


@kernel(parallel=False)
def exp_array(t, out):
    """``out[j] = fast_exp(t[j])``: the exponential alone, for its accuracy test."""
    for j in range(t.shape[0]):
        out[j] = fast_exp(t[j])


# --- the vectorisable logarithm ------------------------------------------------------
# log(s) for the row sums s >= 1 (float64), fdlibm's e_log.c made branch-free: s = 2**k f
# with f in [sqrt(2)/2, sqrt(2)) (exponent and mantissa from the bits, musl's split), then
# with the exact t = f - 1, u = t / (2 + t):
#     log f = t - (t*t/2 - u (t*t/2 + R(u*u))),  R a degree-7 minimax fit (fdlibm's Lg1..Lg7)
# and ln2 in two parts. < 1 ulp (tests/test_log.py, against mpmath). NaN in, NaN out. All
# integer and float arithmetic, so it vectorises; the libm call it replaces was a scalar
# call per row, the bulk of the per-row cost for few classes.
_LOG_LN2_HI = 6.93147180369123816490e-01
_LOG_LN2_LO = 1.90821492927058770002e-10
_LOG_SQRT_HALF_BITS = 0x3FE6A09E667F3BCD  # sqrt(2)/2
_LOG_ONE_BITS = 0x3FF0000000000000
_LOG_MANTISSA = 0x000FFFFFFFFFFFFF
_LG1, _LG2, _LG3, _LG4 = (
    6.666666666666735130e-01,
    3.999999999940941908e-01,
    2.857142874366239149e-01,
    2.222219843214978396e-01,
)
_LG5, _LG6, _LG7 = 1.818357216161805012e-01, 1.531383769920937332e-01, 1.479819860511658591e-01


@exp_helper
def fast_log(s):
    """``log(s)`` for float64 ``s > 0`` (normal), vectorisable; NaN propagates."""
    bits = float_as_int(s) + np.int64(_LOG_ONE_BITS - _LOG_SQRT_HALF_BITS)
    k = np.float64((bits >> np.int64(52)) - np.int64(1023))
    f = int_as_float((bits & np.int64(_LOG_MANTISSA)) + np.int64(_LOG_SQRT_HALF_BITS))
    t = f - 1.0  # exact
    half_t2 = 0.5 * t * t
    u = t / (2.0 + t)
    z = u * u
    w = z * z
    r = z * (_LG1 + w * (_LG3 + w * (_LG5 + w * _LG7))) + w * (_LG2 + w * (_LG4 + w * _LG6))
    result = k * _LOG_LN2_HI - ((half_t2 - (u * (half_t2 + r) + k * _LOG_LN2_LO)) - t)
    return result if s == s else s


@kernel(parallel=False)
def log_array(s, out):
    """``out[j] = fast_log(s[j])``: the logarithm alone, for its accuracy test."""
    for j in range(s.shape[0]):
        out[j] = fast_log(s[j])


# --- the vectorisable hyperbolic tangent (the soft cap) ------------------------------
# tanh(u), in the logits' dtype, branch-free: for |u| < 0.625 the odd polynomial
# u + u z P(z), z = u*u, P a least-squares fit on Chebyshev nodes of (tanh(u)/u - 1)/z
# (float32: degree 4, 0.65 ulp; float64: degree 10, 1 ulp; the fit: docs/DESIGN.md); above,
# (1 - E) / (1 + E) with E = exp(-2|u|) <= exp(-1.25) (no cancellation; E = 0 for |u| = inf,
# so tanh(+-inf) = +-1), signed as u. Both are computed and one selected, so the loop over
# a row vectorises; a NaN fails ``|u| < 0.625`` and propagates through E. < 2 ulp in all
# (tests/test_options.py). numba's math.tanh is a scalar libm call per element.
_TANH_SMALL = 0.625
_TANH32_P = tuple(
    _F32(v)
    for v in (
        -0.3333328128411301,
        0.13331431753507272,
        -0.05373915650349337,
        0.02063786148878682,
        -0.005704042524499357,
    )
)
_TANH64_P = (
    -0.3333333333333285,
    0.1333333333326181,
    -0.05396825393125143,
    0.02186948757690888,
    -0.008863221019915003,
    0.003591989330005907,
    -0.0014549596701377823,
    0.0005863189498796016,
    -0.00022856857843357728,
    7.714872124279487e-05,
    -1.6074411107765176e-05,
)


def fast_tanh(u):
    """``tanh(u)``, vectorisable; typed by ``u`` (float32 or float64)."""
    return math.tanh(u)


@overload(fast_tanh, jit_options=overload_options(EXP_FASTMATH))
def _fast_tanh_overload(u):
    if u == types.float32:
        p0, p1, p2, p3, p4 = _TANH32_P
        one, two, small = _F32(1.0), _F32(2.0), _F32(_TANH_SMALL)

        def tanh32(u):
            t = abs(u)
            z = u * u
            poly = u + u * z * ((((p4 * z + p3) * z + p2) * z + p1) * z + p0)
            e = fast_exp(-two * t)
            big = (one - e) / (one + e)
            big = -big if u < 0 else big
            return poly if t < small else big

        return tanh32
    if u == types.float64:
        p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10 = _TANH64_P

        def tanh64(u):
            t = abs(u)
            z = u * u
            q = p10
            q = q * z + p9
            q = q * z + p8
            q = q * z + p7
            q = q * z + p6
            q = q * z + p5
            q = q * z + p4
            q = q * z + p3
            q = q * z + p2
            q = q * z + p1
            q = q * z + p0
            poly = u + u * z * q
            e = fast_exp(-2.0 * t)
            big = (1.0 - e) / (1.0 + e)
            big = -big if u < 0 else big
            return poly if t < _TANH_SMALL else big

        return tanh64
    return None


@kernel(parallel=False)
def tanh_array(u, out):
    """``out[j] = fast_tanh(u[j])``: the tangent alone, for its accuracy test."""
    for j in range(u.shape[0]):
        out[j] = fast_tanh(u[j])


# --- per-row steps -------------------------------------------------------------------


@helper
def _greater(a, b):
    return b if b > a else a


@helper
def row_max(row):
    """Step (1): ``max_c row_c``. A NaN reaches the results through ``exp`` in step (2)
    whether or not it is taken as the max. Short rows take a plain loop; long rows the
    integer-key version (vectorised)."""
    if row.shape[0] >= 64:
        return _row_max_long(row)
    return _row_max_short(row)


@helper
def _row_max_short(row):
    """``max_c row_c`` by a plain loop, for short rows."""
    m = row[0]
    for c in range(1, row.shape[0]):
        m = _greater(m, row[c])
    return m


def _row_max_long(row):
    """``max_c row_c`` for long rows (the overload below does the work)."""
    return np.max(row)


# A float max loop is a select chain that LLVM will not vectorise without ``nnan``. But
# IEEE floats are ordered like signed integers once the magnitude bits of the negative
# ones are flipped (``key = i ^ ((i >> (w-1)) & (2**(w-1) - 1))``, an involution), and an
# integer max is a reduction LLVM vectorises (measured 0.24 -> 0.14 ns a float32 element,
# one thread). -0.0 orders below +0.0, which neither changes exp(x - m) nor the sums; a
# NaN with the sign bit clear orders above +inf and becomes the max (its row's results
# are NaN either way: exp(NaN - m) reaches every one of them).
@overload(_row_max_long, jit_options=overload_options(FASTMATH))
def _row_max_long_overload(row):
    if row.dtype == types.float32:
        int_type, shift, magnitude = np.int32, np.int32(31), np.int32(0x7FFFFFFF)
    elif row.dtype == types.float64:
        int_type, shift, magnitude = np.int64, np.int64(63), np.int64(0x7FFFFFFFFFFFFFFF)
    else:
        return None
    lowest = int_type(np.iinfo(int_type).min)

    def row_max_by_keys(row):
        best = lowest
        for c in range(row.shape[0]):
            i = float_as_int(row[c])
            key = int_type(i ^ int_type(int_type(i >> shift) & magnitude))
            best = key if key > best else best
        return int_as_float(int_type(best ^ int_type(int_type(best >> shift) & magnitude)))

    return row_max_by_keys


@helper
def row_sum_exp(row, m, e_out):
    """Step (2): ``e_c = exp(row_c - m)`` into ``e_out`` (scratch or the gradient row), then
    ``s = sum_c e_c`` in float64. Two loops: with the float32 -> float64 sum inside the exp
    loop LLVM vectorised it poorly (0.65 ns an element against 0.51 in two loops, float32,
    C = 1000, one thread); the second re-reads the terms from L1/L2."""
    for c in range(row.shape[0]):
        e_out[c] = fast_exp(row[c] - m)
    s = 0.0
    for c in range(row.shape[0]):
        s += np.float64(e_out[c])  # (np.float64: as Python, a float32 term would make s float32)
    return s


@helper
def row_sum_exp_only(row, m):
    """Step (2) without the terms: ``s = sum_c exp(row_c - m)`` (logsumexp, log_softmax)."""
    s = 0.0
    for c in range(row.shape[0]):
        s += fast_exp(row[c] - m)
    return s


@helper
def row_smoothing_sum(row, m, weight, weighted):
    """Step (2), label smoothing: ``sw = sum_c w_c (m - row_c)``. A loop of its own, without
    a store, so that it sums in the same order in every mode."""
    sw = 0.0
    if weighted:
        for c in range(row.shape[0]):
            sw += weight[c] * (m - row[c])
    else:
        for c in range(row.shape[0]):
            sw += m - row[c]
    return sw


@helper
def row_target_sums(row, m, t, weight, p):
    """Step (2), probability targets: ``A = sum_c w_c t'_c``, ``B = sum_c w_c t'_c (m - row_c)``
    with ``t'_c = (1-eps) t_c + eps/C``, formed in float64 as in step (4), so that A and the
    gradient use the same t'."""
    a = 0.0
    b = 0.0
    for c in range(row.shape[0]):
        wt = p.keep * np.float64(t[c]) + p.spread
        if p.weighted:
            wt = np.float64(weight[c]) * wt
        a += wt
        b += wt * (m - row[c])
    return a, b


@exact_helper
def index_row_loss(m_minus_x_y, log_s, sw, w_y, keep, spread, smoothing, weight_total):
    """Step (3): ``(1-eps) w_y (lse - x_y) + eps/C (sw + W log s)``, rounded as written in every
    kernel and layout. ``lse - x_y`` is summed as ``(m - x_y) + log s``: no rounding of
    ``m + log s`` (which would cost the small losses of confident rows their digits)."""
    row_loss = keep * w_y * (m_minus_x_y + log_s)
    if smoothing:
        row_loss += spread * (sw + weight_total * log_s)
    return row_loss


@helper
def index_finish(m_minus_x_y, s, sw, w_y, p):
    """Step (3), class-index targets: ``(loss, a, y_term)`` with the gradient coefficient
    ``a = grad_scale ((1-eps) w_y + eps W / C) / s`` and the target's term
    ``y_term = grad_scale (1-eps) w_y``. Without smoothing W must not enter at all: 0 * W is
    NaN when a weight of a class no row uses is inf or NaN (PyTorch never reads it)."""
    row_loss = index_row_loss(m_minus_x_y, fast_log(s), sw, w_y, p.keep, p.spread, p.smoothing, p.weight_total)
    smoothing = p.spread * p.weight_total if p.smoothing else 0.0
    a = p.grad_scale * (p.keep * w_y + smoothing) / s
    return row_loss, a, p.grad_scale * p.keep * w_y


@helper
def probability_finish(s, a_sum, b_sum, p):
    """Step (3), probability targets: ``(loss, a)``: ``B + A log s`` and ``grad_scale A / s``."""
    return b_sum + a_sum * fast_log(s), p.grad_scale * a_sum / s


@helper
def index_grad_row(g, e, y_local, a, y_term, weight, p):
    """Step (4), class-index targets: ``g_c = e_c a - b w_c``, then ``g_y -= y_term`` when the
    target is in this row's columns (``y_local >= 0``)."""
    n_classes = g.shape[0]
    a_t = g.dtype.type(a)
    if p.smoothing:
        b = g.dtype.type(p.grad_scale * p.spread)
        if p.weighted:
            for c in range(n_classes):
                g[c] = e[c] * a_t - b * weight[c]
        else:
            for c in range(n_classes):
                g[c] = e[c] * a_t - b
    else:
        for c in range(n_classes):
            g[c] = e[c] * a_t
    if y_local >= 0:
        g[y_local] -= g.dtype.type(y_term)


@helper
def probability_grad_row(g, e, t, a, weight, p):
    """Step (4), probability targets, in float64: unnormalised targets make ``p_c A`` and
    ``w_c t'_c`` large and nearly equal, and their difference would keep only float32's
    absolute error."""
    if p.weighted:
        for c in range(g.shape[0]):
            g[c] = np.float64(e[c]) * a - p.grad_scale * (weight[c] * (p.keep * np.float64(t[c]) + p.spread))
    else:
        for c in range(g.shape[0]):
            g[c] = np.float64(e[c]) * a - p.grad_scale * (p.keep * np.float64(t[c]) + p.spread)


# --- 16-bit storage: bfloat16 and float16 bits, widened in registers ------------------
#: the kernels read and write 16-bit logits (Params.storage) in their float32 specialisation
STORAGE_16BIT = True


@helper
def widen16(bits, storage):
    """The float32 value of the 16-bit word ``bits``: bfloat16 (the top half of a float32:
    exact) or float16 (exact). Both are computed and one selected (vectorises)."""
    brain = int_as_float(np.int32(np.int32(bits) << np.int32(16)))
    return brain if storage == STORAGE_BF16 else half_to_float(bits)


@helper
def narrow_brain(v):
    """float32 ``v`` rounded to the nearest even bfloat16 word, as torch's ``.to(bfloat16)``:
    by the carry of ``0x7FFF + lsb`` into the top half; a NaN becomes 0x7FC0, as torch."""
    i = float_as_int(v)
    lsb = np.int32(np.int32(i >> np.int32(16)) & np.int32(1))
    rounded = np.int32(np.int32(i + np.int32(0x7FFF)) + lsb)
    brain = np.uint16(np.int32(rounded >> np.int32(16)) & np.int32(0xFFFF))
    return brain if v == v else np.uint16(0x7FC0)


@helper
def narrow16(v, storage):
    """float32 ``v`` rounded to the nearest even 16-bit word of ``storage``: narrow_brain, or
    float16 by the hardware conversion. Both are computed and one selected (vectorises)."""
    brain = narrow_brain(v)
    return brain if storage == STORAGE_BF16 else float_to_half(v)


def transform_row_max(row, out, p):
    """Steps (0) and (1), ``p.transformed``: ``x'_c = c tanh(a x_c / c)`` (``a x_c`` without a
    cap) into ``out`` (the thread's x' row), in the logits' dtype; returns ``m = max_c x'_c``,
    taken in the same loop (the overload below does the work; this body runs only under
    NUMBA_DISABLE_JIT)."""
    dt = out.dtype.type
    if row.dtype == np.uint16:
        row = np.array([widen16(bits, p.storage) for bits in row], out.dtype)
    if p.softcap > 0:
        out[:] = dt(p.softcap) * np.tanh(row * dt(p.logit_scale / p.softcap))
    else:
        out[:] = row * dt(p.logit_scale)
    return np.max(out)


# One loop writes x' and takes its max by the integer keys of _row_max_long (a float max
# would not vectorise): the x' row is then read again by step (2) only.
@overload(transform_row_max, jit_options=overload_options(FASTMATH))
def _transform_row_max_overload(row, out, p):
    if row.dtype == types.uint16:  # 16-bit words: the float32 kernels only (see _no_words)
        return _transform_16bit_row_max if out.dtype == types.float32 else _no_words
    if out.dtype == types.float32:
        int_type, shift, magnitude = np.int32, np.int32(31), np.int32(0x7FFFFFFF)
    elif out.dtype == types.float64:
        int_type, shift, magnitude = np.int64, np.int64(63), np.int64(0x7FFFFFFFFFFFFFFF)
    else:
        return None
    lowest = int_type(np.iinfo(int_type).min)
    dt = out.dtype

    def transform_row_max_by_keys(row, out, p):
        best = lowest
        if p.softcap > 0:
            cap = dt(p.softcap)
            scale = dt(p.logit_scale / p.softcap)  # a / c in float64, then rounded once
            for c in range(row.shape[0]):
                v = cap * fast_tanh(row[c] * scale)
                out[c] = v
                i = float_as_int(v)
                key = int_type(i ^ int_type(int_type(i >> shift) & magnitude))
                best = key if key > best else best
        else:
            a = dt(p.logit_scale)
            for c in range(row.shape[0]):
                v = row[c] * a
                out[c] = v
                i = float_as_int(v)
                key = int_type(i ^ int_type(int_type(i >> shift) & magnitude))
                best = key if key > best else best
        return int_as_float(int_type(best ^ int_type(int_type(best >> shift) & magnitude)))

    return transform_row_max_by_keys


def _transform_16bit_row_max(row, out, p):
    """transform_row_max of a row of 16-bit words (``p.storage``): widened, then as above."""
    best = np.int32(np.iinfo(np.int32).min)
    shift, magnitude = np.int32(31), np.int32(0x7FFFFFFF)
    storage = p.storage
    if p.softcap > 0:
        cap = np.float32(p.softcap)
        scale = np.float32(p.logit_scale / p.softcap)
        for c in range(row.shape[0]):
            v = cap * fast_tanh(widen16(row[c], storage) * scale)
            out[c] = v
            i = float_as_int(v)
            key = np.int32(i ^ np.int32(np.int32(i >> shift) & magnitude))
            best = key if key > best else best
    else:
        a = np.float32(p.logit_scale)
        for c in range(row.shape[0]):
            v = widen16(row[c], storage) * a
            out[c] = v
            i = float_as_int(v)
            key = np.int32(i ^ np.int32(np.int32(i >> shift) & magnitude))
            best = key if key > best else best
    return int_as_float(np.int32(best ^ np.int32(np.int32(best >> shift) & magnitude)))


def _no_words(row, out, *args):
    """The 16-bit steps in a float64 kernel: never run (16-bit logits compute in float32),
    compiled as nothing so that the float64 kernels do not carry their code."""
    return out[0]


@helper
def cap_ratio(xt_c, inv_cap):
    """``th = x'_c / c`` of ``dx'/dx = a (1 - th**2)``, and 0 without a cap (``inv_cap = 0``):
    then ``dx'/dx = a`` exactly, also where ``x'_c = -inf`` (a masked class), which
    ``-inf * 0`` would turn into a NaN gradient. A select, so the loops still vectorise."""
    return xt_c * inv_cap if inv_cap != 0 else inv_cap


@helper
def chain_factor(p):
    """``(a, 1/c)``, so that ``dx'/dx = a - a (x' / c)**2`` with or without a cap (1/c = 0)."""
    return p.logit_scale, (1.0 / p.softcap if p.softcap > 0 else 0.0)


@outlined_helper
def index_grad_row_chain(g, e, y_local, a, y_term, weight, p, xt):
    """Steps (4) and (4'), ``p.transformed``, class-index targets, in one loop:
    ``g_c = (e_c a - b w_c) dx'_c/dx_c``, ``dx'/dx = a_s (1 - th**2)`` with ``th = x'_c / c``
    (Liger-Kernel's; its absolute error is that of ``th``) or ``a_s``; then the target's term
    ``g_y -= y_term dx'_y/dx_y``. ``weight`` is a real (C,) array (ones when unweighted) and
    ``b = 0`` without smoothing, so one loop serves every option. ``e`` of length 0: the
    exponentials are in ``g`` itself (GRAD): two arguments naming one row would fail LLVM's
    run-time overlap check and run the scalar loop."""
    wide_vectors()
    dt = g.dtype.type
    scale, inv_cap = chain_factor(p)
    a_t, s_t, k_t = dt(a), dt(scale), dt(inv_cap)
    b = dt(p.grad_scale * p.spread) if p.smoothing else dt(0.0)
    if p.smoothing:  # (two loops each way: the same expression in every mode, the same bits)
        if e.shape[0] == 0:
            for c in range(g.shape[0]):
                th = cap_ratio(xt[c], k_t)
                g[c] = (g[c] * a_t - b * weight[c]) * (s_t - s_t * th * th)
        else:
            for c in range(g.shape[0]):
                th = cap_ratio(xt[c], k_t)
                g[c] = (e[c] * a_t - b * weight[c]) * (s_t - s_t * th * th)
    elif e.shape[0] == 0:  # no class weight read (an inf weight would make 0 * inf = NaN)
        for c in range(g.shape[0]):
            th = cap_ratio(xt[c], k_t)
            g[c] = (g[c] * a_t) * (s_t - s_t * th * th)
    else:
        for c in range(g.shape[0]):
            th = cap_ratio(xt[c], k_t)
            g[c] = (e[c] * a_t) * (s_t - s_t * th * th)
    if y_local >= 0:
        th = cap_ratio(xt[y_local], k_t)
        g[y_local] -= dt(y_term) * (s_t - s_t * th * th)


def index_grad_row_words(out, e, y_local, a, y_term, weight, p, xt):
    """Steps (4), (4') and (4''), 16-bit storage, in one loop: index_grad_row_chain's float32
    ``g_c`` (the same operations, so the same bits) rounded straight into the 16-bit words
    ``out``; the target's word is then recomputed with its term. Without a scale or cap
    ``dx'/dx = 1`` and the product is left out (exact either way). The float32 kernels only
    (the overload below)."""
    wide_vectors()
    dt = e.dtype.type
    storage = p.storage
    scale, inv_cap = chain_factor(p)
    a_t, s_t, k_t = dt(a), dt(scale), dt(inv_cap)
    b = dt(p.grad_scale * p.spread) if p.smoothing else dt(0.0)
    if p.softcap > 0 or p.logit_scale != 1.0:
        for c in range(out.shape[0]):
            th = cap_ratio(xt[c], k_t)
            g = (e[c] * a_t - b * weight[c]) if p.smoothing else e[c] * a_t
            out[c] = narrow16(np.float32(g * (s_t - s_t * th * th)), storage)
        if y_local >= 0:
            th = cap_ratio(xt[y_local], k_t)
            d = s_t - s_t * th * th
            g = ((e[y_local] * a_t - b * weight[y_local]) if p.smoothing else e[y_local] * a_t) * d
            out[y_local] = narrow16(np.float32(g - dt(y_term) * d), storage)
    else:  # the loops of index_grad_row, one per storage (the select of narrow16 costs both)
        if p.smoothing:
            for c in range(out.shape[0]):
                out[c] = narrow16(np.float32(e[c] * a_t - b * weight[c]), storage)
        elif storage == STORAGE_BF16:
            for c in range(out.shape[0]):
                out[c] = narrow_brain(np.float32(e[c] * a_t))
        else:
            for c in range(out.shape[0]):
                out[c] = float_to_half(np.float32(e[c] * a_t))
        if y_local >= 0:
            g = e[y_local] * a_t - b * weight[y_local] if p.smoothing else e[y_local] * a_t
            out[y_local] = narrow16(np.float32(g - dt(y_term)), storage)


@overload(index_grad_row_words, jit_options=overload_options(FASTMATH))
def _index_grad_row_words_overload(out, e, y_local, a, y_term, weight, p, xt):
    if e.dtype == types.float32:
        return index_grad_row_words  # (its own body, compiled as the implementation)
    return lambda out, e, y_local, a, y_term, weight, p, xt: None  # float64: never run


@outlined_helper
def probability_grad_row_chain(g, e, t, a, weight, p, xt):
    """Steps (4) and (4'), probability targets: ``g_c = (e_c A' - grad_scale w_c t'_c)
    dx'_c/dx_c``, the difference in float64 as probability_grad_row; ``e`` as in
    index_grad_row_chain."""
    wide_vectors()
    dt = g.dtype.type
    scale, inv_cap = chain_factor(p)
    s_t, k_t = dt(scale), dt(inv_cap)
    if e.shape[0] == 0:
        for c in range(g.shape[0]):
            th = cap_ratio(xt[c], k_t)
            diff = np.float64(g[c]) * a - p.grad_scale * (weight[c] * (p.keep * np.float64(t[c]) + p.spread))
            g[c] = dt(diff) * (s_t - s_t * th * th)
    else:
        for c in range(g.shape[0]):
            th = cap_ratio(xt[c], k_t)
            diff = np.float64(e[c]) * a - p.grad_scale * (weight[c] * (p.keep * np.float64(t[c]) + p.spread))
            g[c] = dt(diff) * (s_t - s_t * th * th)


@outlined_helper
def row_sum_exp_entropy(row, m, e_out):
    """Step (2) with the entropy's sum, ``p.stats``: ``e_c`` into ``e_out``, then in one loop
    ``s = sum_c e_c`` and ``h = sum_c e_c (m - x_c)`` (0 where ``e_c = 0``: 0 log 0 = 0),
    both in float64; the entropy is ``log s + h / s``."""
    wide_vectors()
    for c in range(row.shape[0]):
        e_out[c] = fast_exp(row[c] - m)
    s = 0.0
    h = 0.0
    for c in range(row.shape[0]):
        ec = e_out[c]
        s += np.float64(ec)
        h += np.float64(ec) * (np.float64(m) - np.float64(row[c])) if ec > 0 else 0.0
    return s, h


# --- long rows, a chunk at a time -----------------------------------------------------
# Steps (1) and (2) of a row of LONG_ROW classes or more run over chunks of ~CHUNK classes:
# per chunk k its max m_k and s_k = sum_{c in k} exp(x_c - m_k), the terms e'_c written as
# before; the chunks then merge as two class shards do (_shards.py), exactly in float64:
#     m = max_k m_k,   f_k = exp(m_k - m),   s = sum_k f_k s_k,
#     h = sum_k f_k (h_k + (m - m_k) s_k)          (the entropy's sum, p.stats)
# and step (4) takes each chunk's coefficient a f_k, so that e'_c a f_k = a exp(x_c - m).
# Why: the whole-row max pass streams a row from memory, and the exponentials then run
# from cache with no load in flight. One thread cannot keep memory busy alone (its copy
# runs at half the two threads' bandwidth), so the two phases added up (4096 x 32000
# float32, 2 threads: 1.74x the copy floor). A chunk's max loop reads it from memory and
# its exponentials follow at once from L1, while the hardware prefetcher already streams
# the next chunk: measured 1.74x -> 1.2-1.3x the floor. A chunk whose logits are all -inf
# contributes nothing (f_k = 0; its terms exp(-inf - 0) = 0), so masked classes stay
# exact; a NaN or +inf reaches every result through its chunk's sum, as before.
LONG_ROW = 4096
CHUNK = 512


@helper
def chunk_width(n_classes):
    """Classes per chunk: CHUNK, or more where a row would have over MAX_CHUNKS chunks
    (the chunk state lives in the thread's lanes array); a multiple of 16."""
    width = max(CHUNK, -(-n_classes // MAX_CHUNKS))
    return (width + 15) // 16 * 16


def chunk_max(src, out, p):
    """Step (1) of a chunk (with step (0) when ``p.transformed``): its max (the overload
    below does the work)."""
    return transform_row_max(src, out, p) if p.transformed or src.dtype == np.uint16 else np.max(src)


@overload(chunk_max, jit_options=overload_options(FASTMATH))
def _chunk_max_overload(src, out, p):
    if src.dtype == types.uint16:  # 16-bit words: always widened into x'
        return lambda src, out, p: transform_row_max(src, out, p)

    def chunk_max_native(src, out, p):
        if p.transformed:
            return transform_row_max(src, out, p)
        return row_max(src)

    return chunk_max_native


@helper
def steps_0_to_2(chunked, src, xt_out, row, e, chunks, p, dst):
    """Steps (0)-(2): ``(m, s, h)`` by chunked_steps or row_steps."""
    if chunked:
        return float32_chunked_steps(src, xt_out, row, e, chunks, p, dst)
    return row_steps(src, xt_out, row, e, chunks, p)


@outlined_helper
def row_steps(src, xt_out, row, e, chunks, p):
    """Steps (0)-(2) of a row in one piece: ``(m, s, h)``, the terms in ``e`` (loss only: the
    thread's scratch row; GRAD: the gradient row). ``src``, ``row`` as in chunked_steps.
    Outlined as chunked_steps is: with both inlined into the row's function, LLVM made
    the common path's loops 2x slower (C = 1000, one thread: 570 -> 1100 ns a row);
    apart, the call costs ~3% there."""
    wide_vectors()
    m = chunk_max(src, xt_out, p)
    if p.stats:  # (2) with the entropy's sum
        s, h = row_sum_exp_entropy(row, m, e)
        return m, s, h
    return m, row_sum_exp(row, m, e), 0.0  # (2); loss only: e is the thread's scratch row


def chunks_long_rows(row):
    """Whether long rows of ``row``'s dtype go by chunks: float32 only. The float64 kernels
    take every row whole, so that they carry no chunk code (it cost ~10 s of CPU per
    kernel specialisation to compile; float64 is rarely the dtype of a 32k-class row)."""
    return row.dtype == np.float32


@overload(chunks_long_rows, jit_options=overload_options(FASTMATH))
def _chunks_long_rows_overload(row):
    if row.dtype == types.float32:
        return lambda row: True
    return lambda row: False


def chunked_steps(src, xt_out, row, e, chunks, p, dst):
    """Steps (0)-(2) of a long row by chunks (see above): ``(m, s, h)``, with the terms
    ``e'_c`` in ``e`` and each chunk's factor ``f_k`` in ``chunks[k]`` for step (4). ``src``
    is the row as stored, ``row`` the one the steps read (x', or ``src`` itself). An ``e``
    shorter than the row (loss only) takes one chunk's terms at a time, an x' row
    (``xt_out``/``row``) shorter than ``src`` one chunk's x'. ``dst``: the 16-bit gradient
    row, whose lines each chunk prefetches for writing (length 0: none). The float32
    kernels only (chunks_long_rows; the overload below)."""
    wide_vectors()
    n_classes = src.shape[0]
    width = chunk_width(n_classes)
    n_chunks = (n_classes + width - 1) // width
    whole = row.shape[0] >= n_classes  # else x' has one chunk's room (plain 16-bit rows)
    # the row takes its own terms (plain in place): two names of one row would fail LLVM's
    # run-time overlap check and run the scalar loop
    in_place_terms = row.ctypes.data == e.ctypes.data
    sums = chunks[MAX_CHUNKS : 2 * MAX_CHUNKS]
    entropies = chunks[2 * MAX_CHUNKS : 3 * MAX_CHUNKS]
    m = row[0]
    for k in range(n_chunks):
        c0 = k * width
        c1 = min(c0 + width, n_classes)
        row_k = row[c0:c1] if whole else row[: c1 - c0]
        if dst.shape[0] != 0:  # the 16-bit gradient row's lines, fetched for writing here
            for c in range(c0, c1, _CACHE_LINE // dst.itemsize):
                prefetch_for_write(dst, c)
        m_k = chunk_max(src[c0:c1], xt_out[c0:c1] if whole else xt_out[: c1 - c0], p)
        if k == 0 or m_k > m:
            m = m_k
        shift = m_k if m_k != -np.inf else row.dtype.type(0.0)  # an all -inf chunk: e' = 0
        e_k = e[c0:c1] if e.shape[0] >= n_classes else e[: c1 - c0]  # (a chunk's room: loss only)
        if p.stats:
            s_k, h_k = row_sum_exp_entropy(row_k, shift, e_k)
        elif in_place_terms:  # one name for the row and its terms: the loop vectorises
            s_k, h_k = row_sum_exp(e_k, shift, e_k), 0.0
        else:
            s_k, h_k = row_sum_exp(row_k, shift, e_k), 0.0
        chunks[k] = m_k
        sums[k] = s_k
        entropies[k] = h_k
    s = 0.0
    h = 0.0
    for k in range(n_chunks):
        m_k = chunks[k]
        f_k = fast_exp(m_k - np.float64(m)) if m_k != -np.inf else 0.0
        chunks[k] = f_k
        s += f_k * sums[k]
        if p.stats:
            h += f_k * (entropies[k] + (np.float64(m) - m_k) * sums[k]) if f_k > 0 else 0.0
    return m, s, h


def float32_chunked_steps(src, xt_out, row, e, chunks, p, dst):
    """chunked_steps in the float32 kernels; in the float64 ones a stub never run."""
    return chunked_steps(src, xt_out, row, e, chunks, p, dst)


# The float32 implementation is chunked_steps' own body, with the outlined helpers' options
# (it is not inlined by numba), not a forwarder to an outlined chunked_steps: a forwarder
# is a library of its own that links chunked_steps and optimises it once more (with
# _index_grad_chunks below: the float32 class-index kernel's LLVM 5.1 -> 4.7 s of CPU, the
# same bits and speed; docs/DESIGN.md).
@overload(float32_chunked_steps, jit_options=OUTLINED_OPTIONS)
def _float32_chunked_steps_overload(src, xt_out, row, e, chunks, p, dst):
    if row.dtype == types.float32:
        return chunked_steps
    return lambda src, xt_out, row, e, chunks, p, dst: (row[0], 0.0, 0.0)  # float64: never run


@helper
def first_max_is(row, m, s, y_local):
    """Whether the first index of ``max_c row_c`` is ``y_local`` (``torch.argmax``: ties go to
    the first index, a NaN is the max). Vectorised as ``row_y == m`` and no ``c < y`` with
    ``row_c == m``; only a row whose sum is NaN (a NaN, or an infinite max) scans for a NaN."""
    if y_local < 0:
        return False
    if s != s:
        for c in range(row.shape[0]):
            if row[c] != row[c]:
                return c == y_local
    if row[y_local] != m:
        return False
    earlier = 0
    for c in range(y_local):
        earlier += 1 if row[c] == m else 0
    return earlier == 0


@outlined_helper
def row_outputs(i, row, m, s, h, y_local, kept, a, p, rowdata):
    """Step (3'), ``p.row_outputs``: ``lse = m + log s`` and the z-loss term ``z lse**2`` of
    a kept row into ``rowdata[i, OUT_*]``; with ``p.stats`` the entropy ``log s + h / s`` (``h``
    from row_sum_exp_entropy) and the argmax test. Returns the gradient coefficient ``a``
    plus the z-loss's ``z_grad_scale 2 z lse / s`` (so that step (4) adds ``2 z lse p_c``)."""
    log_s = fast_log(s)
    lse = np.float64(m) + log_s
    rowdata[i, OUT_LSE] = lse
    z_term = 0.0
    if kept and p.z_loss != 0:
        z_term = p.z_loss * lse * lse
        a += p.z_grad_scale * 2.0 * p.z_loss * lse / s
    elif kept:  # z = 0: still 0 lse**2, NaN where lse is NaN or infinite, as the reference's
        z_term = 0.0 * lse * lse  # and Cython's (the row's loss is NaN then too)
    rowdata[i, OUT_Z] = z_term
    if p.stats:
        rowdata[i, OUT_ENTROPY] = log_s + h / s
        rowdata[i, OUT_CORRECT] = 1.0 if kept and first_max_is(row, m, s, y_local) else 0.0
    return a


# --- one row at a time (lanes across the classes) ------------------------------------


def _index_grad_chunks(i, grad, grad16, e, y_local, a, y_term, weight, p, row, chunks, mode):
    """Step (4) of a long row, chunk k with the coefficient ``a f_k`` (chunked_steps), by the
    same per-row functions as a whole row, the target's term in its own chunk (float32
    only, as chunked_steps)."""
    wide_vectors()
    n_classes = row.shape[0]
    width = chunk_width(n_classes)
    for k in range((n_classes + width - 1) // width):
        c0 = k * width
        c1 = min(c0 + width, n_classes)
        a_k = a * chunks[k]
        y_k = y_local - c0 if y_local >= c0 and y_local < c1 else -1
        if p.storage != STORAGE_NATIVE:
            index_grad_row_words(grad16[i, c0:c1], e[c0:c1], y_k, a_k, y_term, weight[c0:c1], p, row[c0:c1])
        elif p.transformed:
            e_k = e[:0] if mode == GRAD else e[c0:c1]
            index_grad_row_chain(grad[i, c0:c1], e_k, y_k, a_k, y_term, weight[c0:c1], p, row[c0:c1])
        elif mode == GRAD:
            g = grad[i, c0:c1]
            index_grad_row(g, g, y_k, a_k, y_term, weight[c0:c1], p)
        else:
            index_grad_row(grad[i, c0:c1], e[c0:c1], y_k, a_k, y_term, weight[c0:c1], p)


def float32_index_grad_chunks(i, grad, grad16, e, y_local, a, y_term, weight, p, row, chunks, mode):
    """_index_grad_chunks in the float32 kernels; in the float64 ones a stub never run."""
    _index_grad_chunks(i, grad, grad16, e, y_local, a, y_term, weight, p, row, chunks, mode)


@overload(float32_index_grad_chunks, jit_options=OUTLINED_OPTIONS)
def _float32_index_grad_chunks_overload(i, grad, grad16, e, y_local, a, y_term, weight, p, row, chunks, mode):
    if row.dtype == types.float32:
        return _index_grad_chunks  # its body, as chunked_steps above
    return lambda i, grad, grad16, e, y_local, a, y_term, weight, p, row, chunks, mode: None  # float64


@helper
def _ignored_row(i, mode, narrow, loss, grad, grad16):
    """Row i's loss 0 and (unless loss only) its gradient 0, in its storage."""
    loss[i] = 0.0
    if mode != LOSS:
        if narrow:
            grad16[i, :] = 0
        else:
            grad[i, :] = 0


@outlined_helper
def _index_rows(r0, r1, x, y, weight, p, mode, loss, grad, rowdata, scratch, xt_out, xt, x16, grad16, chunks):
    """Steps (0)-(4) for each row i of r0..r1-1 with a class-index target. ``scratch`` (``e``
    in a row) is the thread's scratch row, ``xt_out``/``xt`` its x' row, written and read
    under two names (see the kernels). 16-bit storage (``p.storage``): the logits are
    ``x16`` and the gradient ``grad16`` (``x`` and ``grad`` are stand-ins never read); the
    mode is then LOSS or IN_PLACE. ``chunks``: the thread's chunk state for long rows
    (chunked_steps).

    The row's code is the loop's body (``continue`` ends a row), not a helper: see
    docs/DESIGN.md, "The row code in the loop"."""
    wide_vectors()
    for i in range(r0, r1):
        e = scratch  # (a row may put another name on it)
        narrow = p.storage != STORAGE_NATIVE
        row = xt if narrow else x[i]  # (x is a one-row stand-in then)
        label = y[i]
        ignored = label == p.ignore_index
        if ignored and mode != STATS and not p.stats:  # ignored rows: loss 0, gradient 0, y_i never read
            _ignored_row(i, mode, narrow, loss, grad, grad16)
            if p.row_outputs:
                rowdata[i, OUT_LSE] = 0.0
                rowdata[i, OUT_Z] = 0.0
            continue
        m = xt[0]  # (defined on every path: a variable set in one branch only would be
        # carried across the prange iterations, which numba's reduction analysis cannot follow)
        n_classes = row.shape[0]
        # (0)-(2), in one piece (row_steps) or a long row a chunk at a time (chunked_steps); from
        # here on the row is x'. SHARD_GRAD: (0) alone (the max and the sums come merged)
        chunked = chunks_long_rows(row) and n_classes >= LONG_ROW and (mode == LOSS or mode == GRAD or mode == IN_PLACE)
        # a long row whose x' (or logits) nothing reads after its own chunk: no scale, cap,
        # smoothing sum or statistics
        plain_chunks = chunked and not (p.transformed or p.smoothing or p.stats)
        # plain in place of a long row: the row itself takes each chunk's terms, as the gradient
        # row does with out= (the same specialisation of the steps, the row read under its
        # read-only name); a whole row of terms in scratch (128 KB more in L2) made in place
        # slower than out= (4096 x 32000, two threads: 53-57 ms against 40-45)
        in_row = mode == IN_PLACE and plain_chunks and not narrow
        if mode == GRAD or in_row:  # the exponentials go straight into the gradient row (see the docstring)
            e = grad[i]
        elif mode == LOSS and chunked:
            # loss only: no step (4) reads the terms, so each chunk's go to the same few KB of
            # scratch (in L1); a whole row of them (128 KB at C = 32000) left L1 chunk after
            # chunk: 4096 x 32000, one thread, 85-88 -> 61-64 ms
            e = e[: chunk_width(n_classes)]
        y_local = label - p.class_start
        if ignored or y_local < 0 or y_local >= n_classes:
            y_local = -1  # the target is not among these columns (a class shard), or ignored
        # x_y read before the steps where the row will not hold it after them: in place (the row
        # then holds the terms) and plain 16-bit rows (x' holds its last chunk only)
        x_y_apart = plain_chunks and (narrow or in_row)
        x_y = 0.0
        if x_y_apart and y_local >= 0:
            x_y = np.float64(widen16(x16[i, y_local], p.storage)) if narrow else np.float64(row[y_local])
        s = 0.0
        h = 0.0
        if mode == SHARD_GRAD:
            if narrow:
                transform_row_max(x16[i], xt_out, p)
                row = xt
            elif p.transformed:
                transform_row_max(row, xt_out, p)
                row = xt
        elif narrow:
            # a plain 16-bit long row reads x' only within its chunk (x'_y is the widened word):
            # one chunk's room of it stays in L1; a whole row of it (128 KB at C = 32000) did not.
            # The gradient's words are first written in step (4), after the row's exponentials:
            # their lines are fetched for writing during steps (1)-(2), chunk by chunk, instead
            # (4096 x 32000 bfloat16, loss+grad, one thread: 108.7 -> 94.7 ms, two 55.8 -> 49.2)
            room = chunk_width(n_classes) if plain_chunks else n_classes
            words_out = grad16[i] if mode == IN_PLACE else grad16[0, :0]
            m, s, h = steps_0_to_2(chunked, x16[i], xt_out[:room], xt[:room], e, chunks, p, words_out)
            row = xt
        elif p.transformed:
            m, s, h = steps_0_to_2(chunked, row, xt_out, xt, e, chunks, p, grad16[0, :0])
            row = xt
        else:
            m, s, h = steps_0_to_2(chunked, row, xt_out, row, e, chunks, p, grad16[0, :0])
        if mode == SHARD_GRAD:  # (4) from the merged statistics
            m = x.dtype.type(rowdata[i, COEF_M])
            row_sum_exp(row, m, e)
            if p.transformed:  # (e is the scratch row here: SHARD_GRAD writes the gradient apart)
                index_grad_row_chain(grad[i], e, y_local, rowdata[i, COEF_A], rowdata[i, COEF_Y], weight, p, row)
            else:
                index_grad_row(grad[i], e, y_local, rowdata[i, COEF_A], rowdata[i, COEF_Y], weight, p)
            continue
        if not x_y_apart and y_local >= 0:
            x_y = np.float64(row[y_local])
        sw = row_smoothing_sum(row, m, weight, p.weighted) if p.smoothing else 0.0
        if mode == STATS:
            rowdata[i, STAT_M] = m
            rowdata[i, STAT_S] = s
            rowdata[i, STAT_TARGET] = x_y
            rowdata[i, STAT_A] = 0.0
            rowdata[i, STAT_B] = sw
            continue
        # m - x_y is exact in float64 (np.float64, not float(): numba's float() of a float32
        # stays float32)
        w_y = np.float64(weight[y_local]) if p.weighted and y_local >= 0 else 1.0
        row_loss, a, y_term = index_finish(np.float64(m) - x_y, s, sw, w_y, p)  # (3)
        if p.row_outputs:  # (3'): lse, the z-loss, the statistics (ignored rows too, for those)
            a = row_outputs(i, row, m, s, h, y_local, not ignored, a, p, rowdata)
        if ignored:  # reached with p.stats only: the statistics are written, nothing else
            _ignored_row(i, mode, narrow, loss, grad, grad16)
            continue
        loss[i] = row_loss
        if mode == LOSS:
            continue
        if chunked:  # (in_row: the terms are in the gradient row, as with GRAD)
            mode_4 = GRAD if in_row else mode
            float32_index_grad_chunks(i, grad, grad16, e, y_local, a, y_term, weight, p, row, chunks, mode_4)
        elif narrow:  # (4), (4') in float32, (4'') rounded into the 16-bit words
            index_grad_row_words(grad16[i], e, y_local, a, y_term, weight, p, row)
        elif p.transformed:  # (4) and (4'): the chain rule through x', in one loop
            index_grad_row_chain(grad[i], e[:0] if mode == GRAD else e, y_local, a, y_term, weight, p, row)
        elif mode == GRAD:  # (4), one name of the row: e is grad[i]
            g = grad[i]
            index_grad_row(g, g, y_local, a, y_term, weight, p)
        else:  # IN_PLACE
            index_grad_row(grad[i], e, y_local, a, y_term, weight, p)


@outlined_helper
def _probability_rows(r0, r1, x, t, weight, p, mode, loss, grad, rowdata, scratch, xt_out, xt):
    """Steps (0)-(4) for each row i of r0..r1-1 with a probability target (native storage
    only); arguments as _index_rows.

    The row's code is the loop's body, as in _index_rows."""
    wide_vectors()
    for i in range(r0, r1):
        e = scratch  # (a row may put another name on it)
        row = x[i]
        ti = t[i]
        m = row[0]  # (defined on every path: a variable set in one branch only would be
        # carried across the prange iterations, which numba's reduction analysis cannot follow)
        if p.transformed:  # (0) and (1): from here on, the row is x'
            m = transform_row_max(row, xt_out, p)
            row = xt
        if mode == GRAD:  # the exponentials go straight into the gradient row
            e = grad[i]
        if mode == SHARD_GRAD:
            m = x.dtype.type(rowdata[i, COEF_M])
            row_sum_exp(row, m, e)
            if p.transformed:
                probability_grad_row_chain(grad[i], e, ti, rowdata[i, COEF_A], weight, p, row)
            else:
                probability_grad_row(grad[i], e, ti, rowdata[i, COEF_A], weight, p)
            continue
        if not p.transformed:
            m = row_max(row)  # (1)
        h = 0.0
        if p.stats:  # (2) with the entropy's sum
            s, h = row_sum_exp_entropy(row, m, e)
        else:
            s = row_sum_exp(row, m, e)  # (2)
        a_sum, b_sum = row_target_sums(row, m, ti, weight, p)
        if mode == STATS:
            rowdata[i, STAT_M] = m
            rowdata[i, STAT_S] = s
            rowdata[i, STAT_TARGET] = 0.0
            rowdata[i, STAT_A] = a_sum
            rowdata[i, STAT_B] = b_sum
            continue
        row_loss, a = probability_finish(s, a_sum, b_sum, p)  # (3)
        if p.row_outputs:  # (3')
            a = row_outputs(i, row, m, s, h, -1, True, a, p, rowdata)
        loss[i] = row_loss
        if mode == LOSS:
            continue
        if p.transformed:  # (4) and (4')
            probability_grad_row_chain(grad[i], e[:0] if mode == GRAD else e, ti, a, weight, p, row)
        elif mode == GRAD:  # (4), one name of the row: e is grad[i]
            g = grad[i]
            probability_grad_row(g, g, ti, a, weight, p)
        else:  # IN_PLACE
            probability_grad_row(grad[i], e, ti, a, weight, p)


# --- few classes: 64 rows across the SIMD lanes ---------------------------------------
# For C <= SMALL_C a row's loop over its classes is too short to fill a vector, and the
# per-row steps (the max's dependency chain, a log, a divide, the loss) would each cost a
# scalar operation per row: ~15 ns a row, 9-11x the memory floor at C = 10. So LANES = 64 rows are
# transposed into the thread's scratch (``buf[c * n_lanes + r] = x[r0 + r, c]``) and every
# step becomes a loop over the classes of a 64-long loop over the rows (four 16-wide vectors), which LLVM turns
# into whole vectors: the max, exp, the float64 sums, log, the loss, the coefficients and
# the gradient; the target's logit and term as selects over the classes. The transposes
# move 16 x 16 tiles through registers (_jit.rows_to_lanes16). The lane state lives in
# ``lanes`` (rows LANE_*, each LANES wide, float64). After the classes, the thread's scratch
# holds LANE_SCRATCH_ROWS rows of lanes in the logits' dtype: the max, and (class indices)
# the target class as a float (-1 for ignored rows and the pad lanes) and x_y.
#
# LANE_COLUMNS: how these loops must be written for LLVM to vectorise them. numba wraps a
# negative index around (``i < 0 ? i + n : i``), and LLVM must prove ``i >= 0`` to drop that
# select; it cannot for ``buf[c * n_lanes + r]`` with ``n_lanes`` read from a shape, or for
# ``y[r0 + r]``, and such loops ran scalar (the max) or as gathers (the labels). So the
# loops index a view with the loop variable alone (``column = buf[c * n_lanes : ...]``,
# ``column[r]``) and n_lanes is the constant LANES; and both operands of each select are
# loaded before it (a load on one side only is a branch). Measured (float32, 262144 x 10,
# one thread): loss 25.7 -> 14.0 ns a row, loss+grad out= 44.9 -> 22.9 (with the tiles).
LANE_S, LANE_SW, LANE_MXY, LANE_WY, LANE_A, LANE_LOSS = 0, 1, 2, 3, 4, 5
#: the options' lanes (index targets): lse, the entropy's sum h (then the entropy), the first
#: index of the max and of a NaN (C where there is none)
LANE_LSE, LANE_H, LANE_FIRST_MAX, LANE_FIRST_NAN = 6, 7, 8, 9
N_LANE_ROWS = 10
#: chunks a long row may have (chunked_steps keeps three numbers each in the thread's lanes
#: array, which the row layout does not otherwise use). Fixed at 7 * LANES // 3, not derived
#: from N_LANE_ROWS: it sets where a long row's chunks start (chunk_width), so the bits of
#: every row longer than CHUNK * MAX_CHUNKS classes would change with it
MAX_CHUNKS = 7 * LANES // 3
#: rows of lanes after the classes in the scratch: the max, the target class, x_y
LANE_SCRATCH_ROWS = 3


@helper
def _transpose_in(x, r0, k, buf, n_lanes):
    """Rows r0..r0+k-1 of x into ``buf[c * n_lanes + r]``; the lanes past k hold 0. By 16 x 16
    tiles in registers (``rows_to_lanes16``) instead of a scalar load and store per logit
    (measured with the other changes, see LANE_COLUMNS)."""
    n_classes = x.shape[1]
    for j in range(0, n_lanes, 16):  # (a tile past the k rows, k - j <= 0, loads only zeros)
        for part in range(0, n_classes, 16):
            rows_to_lanes16(x, r0 + j, part, k - j, min(16, n_classes - part), buf, part * n_lanes + j, n_lanes)


@helper
def _transpose_out(buf, n_lanes, g, r0, k):
    """``g[r0 + r, c] = buf[c * n_lanes + r]`` for the k rows: _transpose_in's way back."""
    n_classes = g.shape[1]
    for j in range(0, k, 16):
        for part in range(0, n_classes, 16):
            lanes_to_rows16(
                buf, part * n_lanes + j, n_lanes, min(16, n_classes - part), g, r0 + j, part, min(16, k - j)
            )


@helper
def _lanes_max(buf, n_classes, n_lanes):
    """Step (1) on the lanes' rows: ``m = max_c buf[c, r]``, in the logits' dtype, into the
    slot after the classes, ``buf[C * n_lanes + r]`` (exact: any order)."""
    m = buf[n_classes * n_lanes : (n_classes + 1) * n_lanes]
    for r in range(n_lanes):
        m[r] = buf[r]
    for c in range(1, n_classes):
        column = buf[c * n_lanes : (c + 1) * n_lanes]  # (see LANE_COLUMNS)
        for r in range(n_lanes):
            m[r] = _greater(m[r], column[r])
    return m


@outlined_helper
def _index_lanes(r0, k, x, y, weight, p, mode, loss, grad, rowdata, buf, x_kept, lanes):
    """Steps (0)-(4) for rows r0..r0+k-1 (k <= LANES) with class-index targets, every option
    of the row layout (the transformed logits, the z-loss, the row outputs and statistics)
    computed over the lanes as well. ``x_kept`` (LANES * C of scratch, with ``p.transformed``
    or ``p.stats``) keeps the lanes' x' for what reads it after step (2) overwrote it: the
    chain rule of step (4') and the entropy's sum."""
    wide_vectors()
    n_classes = x.shape[1]
    n_lanes = LANES  # a constant (see LANE_COLUMNS)
    if mode != LOSS:
        # the NEXT lanes' gradient rows, for writing: the scalar stores of the transposed-out
        # rows below otherwise wait on each line's write-allocate miss (with the hint: 35 ->
        # 26 ns a row at 262144 x 10, one thread; for the current rows: 29)
        flat = grad.reshape(grad.size)
        for j in range((r0 + k) * n_classes, min(flat.size, (r0 + 2 * k) * n_classes), 16):
            prefetch_for_write(flat, j)
    _transpose_in(x, r0, k, buf, n_lanes)
    if p.transformed:  # (0) over the lanes: from here on buf holds x'
        _lanes_transform(buf, n_classes, p)
    if p.transformed or p.stats:
        for j in range(n_classes * n_lanes):  # (a slice assignment would allocate)
            x_kept[j] = buf[j]
    # the smoothing sums need x, before step (2) overwrites buf
    m = _lanes_max(buf, n_classes, n_lanes)  # (1)
    if p.stats:  # the argmax test's first indices, before step (2)
        _lanes_first_indices(buf, n_classes, lanes)
    sw = lanes[LANE_SW]
    for r in range(n_lanes):
        sw[r] = 0.0
    if p.smoothing:
        for c in range(n_classes):
            column = buf[c * n_lanes : (c + 1) * n_lanes]
            if p.weighted:
                w = weight[c]
                for r in range(n_lanes):
                    sw[r] += w * (m[r] - column[r])
            else:
                for r in range(n_lanes):
                    sw[r] += m[r] - column[r]
    # the target's logit and weight, per row, as selects over the classes (vectorised like
    # the rest; a gather per row measured 6% of the Cython kernel's time at C = 10). Pad and
    # ignored lanes (target -1): 0, never stored. The target class and x_y are lanes of the
    # logits' dtype, in the two scratch rows after the max (LANE_SCRATCH_ROWS): half the
    # vectors of float64 lanes (class indices <= SMALL_C are exact in float32)
    dt = x.dtype.type
    target = buf[(n_classes + 1) * n_lanes : (n_classes + 2) * n_lanes]
    x_y = buf[(n_classes + 2) * n_lanes : (n_classes + 3) * n_lanes]
    for r in range(n_lanes):
        target[r] = dt(-1.0)
        x_y[r] = dt(0.0)
    labels = y[r0 : r0 + k]
    for r in range(k):
        label = labels[r]
        target[r] = dt(-1.0) if label == p.ignore_index else dt(label)
    m_minus_x_y = lanes[LANE_MXY]
    w_y = lanes[LANE_WY]
    for r in range(n_lanes):
        w_y[r] = 0.0 if p.weighted or target[r] < 0 else 1.0
    # (every select's operands are loaded before it: a load on one side only is a branch)
    for c in range(n_classes):
        class_index = dt(c)
        column = buf[c * n_lanes : (c + 1) * n_lanes]
        for r in range(n_lanes):
            x_c, x_y_r = column[r], x_y[r]
            x_y[r] = x_c if target[r] == class_index else x_y_r
        if p.weighted:
            w = np.float64(weight[c])
            for r in range(n_lanes):
                w_y_r = w_y[r]
                w_y[r] = w if target[r] == class_index else w_y_r
    for r in range(n_lanes):
        m_minus_x_y[r] = np.float64(m[r]) - np.float64(x_y[r]) if target[r] >= 0 else 0.0
    _lanes_exp(buf, n_classes, lanes)  # (2)
    s = lanes[LANE_S]
    a = lanes[LANE_A]
    row_loss = lanes[LANE_LOSS]
    smoothing = p.spread * p.weight_total if p.smoothing else 0.0
    log_s = lanes[LANE_LSE]  # (log s here; (3') turns it into lse)
    for r in range(n_lanes):  # (3), the same arithmetic as index_finish, the lanes at once
        log_s[r] = fast_log(s[r])
        row_loss[r] = index_row_loss(
            m_minus_x_y[r], log_s[r], sw[r], w_y[r], p.keep, p.spread, p.smoothing, p.weight_total
        )
        a[r] = p.grad_scale * (p.keep * w_y[r] + smoothing) / s[r]
    block_loss = loss[r0 : r0 + k]
    for r in range(k):
        block_loss[r] = 0.0 if target[r] < 0 else row_loss[r]
    if p.row_outputs:  # (3'), as row_outputs, the lanes at once
        _lanes_row_outputs(r0, k, buf, x_kept, n_classes, target, p, rowdata, lanes)
    if mode == LOSS:
        return
    b = dt(p.grad_scale * p.spread)
    scale, inv_cap = chain_factor(p)
    s_t, k_t = dt(scale), dt(inv_cap)
    for c in range(n_classes):  # (4): g = e a - b w_c, the lanes' rows at once
        if p.smoothing:
            b_c = b * weight[c] if p.weighted else b
        else:
            b_c = dt(0.0)
        column = buf[c * n_lanes : (c + 1) * n_lanes]
        if p.transformed:  # (4'): times dx'/dx = a - a (x'/c)**2, as index_grad_row_chain
            kept = x_kept[c * n_lanes : (c + 1) * n_lanes]
            for r in range(n_lanes):
                th = cap_ratio(kept[r], k_t)
                column[r] = (column[r] * dt(a[r]) - b_c) * (s_t - s_t * th * th)
        else:
            for r in range(n_lanes):
                column[r] = column[r] * dt(a[r]) - b_c
    y_term = x_y  # (x_y is spent)
    for r in range(n_lanes):
        y_term[r] = dt(p.grad_scale * p.keep * w_y[r])
    for c in range(n_classes):  # the target's term, and 0 for ignored rows, as selects; a loop
        # of its own, as index_grad_row's ``g[y] -= y_term`` after the row (the same rounding)
        class_index = dt(c)
        column = buf[c * n_lanes : (c + 1) * n_lanes]
        if p.transformed:
            kept = x_kept[c * n_lanes : (c + 1) * n_lanes]
            for r in range(n_lanes):
                g_c, y_term_r, target_r, th = column[r], y_term[r], target[r], cap_ratio(kept[r], k_t)
                g_c = g_c - y_term_r * (s_t - s_t * th * th) if target_r == class_index else g_c
                column[r] = g_c if target_r >= 0 else dt(0.0)
        else:
            for r in range(n_lanes):
                g_c, y_term_r, target_r = column[r], y_term[r], target[r]
                g_c = g_c - y_term_r if target_r == class_index else g_c
                column[r] = g_c if target_r >= 0 else dt(0.0)
    _transpose_out(buf, n_lanes, grad, r0, k)


@helper
def _lanes_transform(buf, n_classes, p):
    """Step (0) on the lanes' rows, in place: ``x' = c tanh(x a/c)`` (``a x`` without a cap),
    as transform_row_max's values."""
    dt = buf.dtype.type
    n_lanes = LANES
    if p.softcap > 0:
        cap = dt(p.softcap)
        scale = dt(p.logit_scale / p.softcap)  # a / c in float64, then rounded once
        for c in range(n_classes):
            column = buf[c * n_lanes : (c + 1) * n_lanes]
            for r in range(n_lanes):
                column[r] = cap * fast_tanh(column[r] * scale)
    else:
        a = dt(p.logit_scale)
        for c in range(n_classes):
            column = buf[c * n_lanes : (c + 1) * n_lanes]
            for r in range(n_lanes):
                column[r] = column[r] * a


@helper
def _lanes_first_indices(buf, n_classes, lanes):
    """For the argmax test (first_max_is): per lane the first class whose x' is the max, and
    the first that is a NaN (C where none is), into LANE_FIRST_MAX / LANE_FIRST_NAN; the
    classes from the last, so that the first match is the one kept (selects: vectorised)."""
    n_lanes = LANES
    m = buf[n_classes * n_lanes : (n_classes + 1) * n_lanes]
    first_max = lanes[LANE_FIRST_MAX]
    first_nan = lanes[LANE_FIRST_NAN]
    for r in range(n_lanes):
        first_max[r] = np.float64(n_classes)
        first_nan[r] = np.float64(n_classes)
    for c in range(n_classes - 1, -1, -1):
        column = buf[c * n_lanes : (c + 1) * n_lanes]
        index = np.float64(c)
        for r in range(n_lanes):
            x_c, m_r, max_r, nan_r = column[r], m[r], first_max[r], first_nan[r]
            first_max[r] = index if x_c == m_r else max_r
            first_nan[r] = index if x_c != x_c else nan_r


@helper
def _lanes_row_outputs(r0, k, e_buf, x_kept, n_classes, target, p, rowdata, lanes):
    """Step (3') on the lanes (row_outputs' arithmetic; LANE_LSE holds log s from step (3),
    one logarithm per lane): ``lse = m + log s``, the z-loss's ``z lse**2`` of a kept row and
    its gradient coefficient ``z_grad_scale 2 z lse / s`` added to LANE_A; with ``p.stats``
    the entropy ``log s + h / s`` (``h = sum_c e_c (m - x'_c)``, 0 where ``e_c = 0``, from
    the exponentials in ``e_buf`` and the kept x') and the argmax test. Then each row's
    outputs into ``rowdata[r0 + r, OUT_*]``; an ignored row writes 0 there, but its lse and
    entropy with ``p.stats``."""
    n_lanes = LANES
    m = e_buf[n_classes * n_lanes : (n_classes + 1) * n_lanes]
    s = lanes[LANE_S]
    a = lanes[LANE_A]
    lse = lanes[LANE_LSE]  # log s from step (3), lse below
    h = lanes[LANE_H]
    if p.stats:
        for r in range(n_lanes):
            h[r] = 0.0
        for c in range(n_classes):
            column = e_buf[c * n_lanes : (c + 1) * n_lanes]
            kept = x_kept[c * n_lanes : (c + 1) * n_lanes]
            for r in range(n_lanes):
                e_c, m_r, x_c = column[r], m[r], kept[r]
                h[r] += np.float64(e_c) * (np.float64(m_r) - np.float64(x_c)) if e_c > 0 else 0.0
        for r in range(n_lanes):
            h[r] = lse[r] + h[r] / s[r]
    for r in range(n_lanes):
        lse[r] = np.float64(m[r]) + lse[r]
    if p.z_loss != 0:
        for r in range(n_lanes):
            a[r] += p.z_grad_scale * 2.0 * p.z_loss * lse[r] / s[r]
    first_max = lanes[LANE_FIRST_MAX]
    first_nan = lanes[LANE_FIRST_NAN]
    out = rowdata[r0 : r0 + k]
    for r in range(k):  # (a row's outputs are a row of rowdata: scalar stores)
        kept_row = target[r] >= 0
        if kept_row or p.stats:
            out[r, OUT_LSE] = lse[r]
        else:
            out[r, OUT_LSE] = 0.0
        out[r, OUT_Z] = p.z_loss * lse[r] * lse[r] if kept_row else 0.0  # (as row_outputs)
        if p.stats:
            out[r, OUT_ENTROPY] = h[r]
            first = first_nan[r] if first_nan[r] < n_classes else first_max[r]
            out[r, OUT_CORRECT] = 1.0 if kept_row and first == np.float64(target[r]) else 0.0


@helper
def _lanes_exp(buf, n_classes, lanes):
    """Step (2) on the lanes' rows, whose max follows the classes in buf: ``buf <- exp(buf - m)``, then
    ``s`` into LANE_S. Two loops: with the float64 sum in the exp loop LLVM vectorises
    neither well."""
    n_lanes = LANES
    m = buf[n_classes * n_lanes : (n_classes + 1) * n_lanes]
    s = lanes[LANE_S]
    for r in range(n_lanes):
        s[r] = 0.0
    for c in range(n_classes):
        column = buf[c * n_lanes : (c + 1) * n_lanes]
        for r in range(n_lanes):
            column[r] = fast_exp(column[r] - m[r])
        for r in range(n_lanes):
            s[r] += column[r]


@outlined_helper
def _probability_lanes(r0, k, x, t, weight, p, mode, loss, grad, buf, tbuf, lanes):
    """Steps (1)-(4) for rows r0..r0+k-1 (k <= LANES) with probability targets."""
    wide_vectors()
    n_classes = x.shape[1]
    n_lanes = LANES
    _transpose_in(x, r0, k, buf, n_lanes)
    _transpose_in(t, r0, k, tbuf, n_lanes)
    m = _lanes_max(buf, n_classes, n_lanes)  # (1)
    a_sum = lanes[LANE_SW]
    b_sum = lanes[LANE_MXY]
    for r in range(n_lanes):
        a_sum[r] = 0.0
        b_sum[r] = 0.0
    for c in range(n_classes):  # (2) the target sums, in float64 (see row_target_sums)
        w = np.float64(weight[c]) if p.weighted else 1.0
        column, t_column = buf[c * n_lanes : (c + 1) * n_lanes], tbuf[c * n_lanes : (c + 1) * n_lanes]
        for r in range(n_lanes):
            wt = p.keep * np.float64(t_column[r]) + p.spread
            if p.weighted:
                wt = w * wt
            a_sum[r] += wt
            b_sum[r] += wt * (m[r] - column[r])
    _lanes_exp(buf, n_classes, lanes)  # (2)
    s = lanes[LANE_S]
    a = lanes[LANE_A]
    row_loss = lanes[LANE_LOSS]
    for r in range(n_lanes):  # (3)
        row_loss[r] = b_sum[r] + a_sum[r] * fast_log(s[r])
        a[r] = p.grad_scale * a_sum[r] / s[r]
    block_loss = loss[r0 : r0 + k]
    for r in range(k):
        block_loss[r] = row_loss[r]
    if mode == LOSS:
        return
    for c in range(n_classes):  # (4) in float64, as probability_grad_row
        w = np.float64(weight[c]) if p.weighted else 1.0
        column, t_column = buf[c * n_lanes : (c + 1) * n_lanes], tbuf[c * n_lanes : (c + 1) * n_lanes]
        for r in range(n_lanes):
            tc = p.keep * np.float64(t_column[r]) + p.spread
            if p.weighted:
                tc = w * tc
            column[r] = np.float64(column[r]) * a[r] - p.grad_scale * tc
    _transpose_out(buf, n_lanes, grad, r0, k)


# --- the kernels: one per target kind (and dtype), every mode and layout -------------
# The block functions are compiled apart (not inlined by numba): in one function with both
# layouts LLVM's inliner gave up on the exponential inside the lanes' loops, which then ran
# scalar (measured 1.5x slower at C = 10).


# --- the parallel loop over blocks of rows, and what it calls by address --------------
# A block (block_rows rows) is the unit of parallel work: _index_block / _probability_block.
# numba compiles a prange loop into four nested libraries (the function, the gufunc of its
# body and two wrappers), and each links in, optimises again and emits again all the code
# it calls: the whole row code (~24,000 instructions for float32 class indices) went
# through LLVM five times. So the parallel loop calls the block through a C function
# pointer instead (``call_by_address``): the block is one ``cfunc`` (cached like the
# kernels), compiled once, and the parallel kernel holds no row code. Its arguments travel
# as one int64 array (``packed``: the Params fields, mode, small, block_rows, then each
# array's address and shape, in the order of BLOCK_ARRAYS), filled by a serial kernel
# (_pack_block_arguments, each array by the intrinsic ``pack_array``) and read back by the
# block (``unpack_array``). Measured, float32 class indices from an empty cache (one
# process): 25.7-30.6 s -> 21.3-21.6 s (docs/DESIGN.md). Under NUMBA_DISABLE_JIT,
# _blocks_directly calls the blocks as Python.


def widen_rows16(x16, g0, k, out, w0, p):
    """Rows g0..g0+k-1 of the 16-bit words ``x16`` widened (exactly) into ``out``'s rows from
    ``w0``: the lanes layout's 16-bit rows (see _index_block). The float32 kernels only (the
    overload below)."""
    for r in range(k):
        words, wide = x16[g0 + r], out[w0 + r]
        for c in range(wide.shape[0]):
            wide[c] = widen16(words[c], p.storage)


@overload(widen_rows16, jit_options={**overload_options(FASTMATH), "_nrt": False})
def _widen_rows16_overload(x16, g0, k, out, w0, p):
    if out.dtype == types.float32:
        return widen_rows16  # (its own body, compiled as the implementation)
    return lambda x16, g0, k, out, w0, p: None  # float64: never run


def narrow_rows16(g, w0, k, grad16, g0, p):
    """``g``'s rows from ``w0`` rounded into rows g0..g0+k-1 of the 16-bit words ``grad16``
    (narrow16); the float32 kernels only, as widen_rows16."""
    for r in range(k):
        wide, words = g[w0 + r], grad16[g0 + r]
        for c in range(wide.shape[0]):
            words[c] = narrow16(wide[c], p.storage)


@overload(narrow_rows16, jit_options={**overload_options(FASTMATH), "_nrt": False})
def _narrow_rows16_overload(g, w0, k, grad16, g0, p):
    if g.dtype == types.float32:
        return narrow_rows16  # (its own body, compiled as the implementation)
    return lambda g, w0, k, grad16, g0, p: None  # float64: never run


@helper
def _index_block(b, thread, p, mode, small, block_rows, arrays):
    """Rows ``b * block_rows`` to the next block's of class-index targets, on kernel thread
    ``thread`` (its scratch rows and lanes state); ``arrays`` in the order of BLOCK_ARRAYS."""
    x, y, weight, loss, grad, rowdata, scratch, lanes, xt_out, xt, x16, grad16 = arrays
    n = x.shape[0] if p.storage == STORAGE_NATIVE else x16.shape[0]
    buf = scratch[thread]
    xt_row = thread * (xt.shape[0] // scratch.shape[0])  # see _transformed_rows
    r0 = b * block_rows
    r1 = min(n, r0 + block_rows)
    if small:
        narrow = p.storage != STORAGE_NATIVE
        # the lanes' scratch, then (a scale, a cap or statistics) the kept x' (_index_lanes)
        width = LANES * ((x.shape[1] if p.storage == STORAGE_NATIVE else x16.shape[1]) + LANE_SCRATCH_ROWS)
        for g0 in range(r0, r1, LANES):
            k = min(LANES, r1 - g0)
            # 16-bit storage (mode LOSS or IN_PLACE): the rows widened into the thread's
            # LANES rows of x' (exact), the float32 lanes in place there (read under the
            # read-only name, written under the other), the gradient rounded back into its
            # words: the float32 lanes kernel's gradient, rounded, as the Cython backend's
            # blocks. The row layout took 3.5-6x as long (262144 x 10 bfloat16, 2 threads,
            # loss+grad 14.3-18.2 -> 3.1-4.9 ms, loss only 12.4-13.1 -> 1.9-2.9 ms).
            # The lanes' row 0 is row g0 (one call of _index_lanes: LLVM inlines each)
            if narrow:
                widen_rows16(x16, g0, k, xt_out, xt_row, p)
                rows, g = xt[xt_row : xt_row + LANES], xt_out[xt_row : xt_row + LANES]
            else:
                rows, g = x[g0:], grad[g0:]
            _index_lanes(
                0, k, rows, y[g0:], weight, p, mode, loss[g0:], g, rowdata[g0:], buf[:width], buf[width:], lanes[thread]
            )
            if narrow and mode != LOSS:
                narrow_rows16(xt_out, xt_row, k, grad16, g0, p)
    else:
        chunks = lanes[thread].reshape(-1)  # (rows use the lanes state for long-row chunks)
        _index_rows(
            r0, r1, x, y, weight, p, mode, loss, grad, rowdata, buf, xt_out[xt_row], xt[xt_row], x16, grad16, chunks
        )


@helper
def _probability_block(b, thread, p, mode, small, block_rows, arrays):
    """_index_block for probability targets ``t`` (native storage only)."""
    x, t, weight, loss, grad, rowdata, scratch, lanes, xt_out, xt, _, _ = arrays
    n, n_classes = x.shape
    buf = scratch[thread]
    xt_row = thread * (xt.shape[0] // scratch.shape[0])  # see _transformed_rows
    r0 = b * block_rows
    r1 = min(n, r0 + block_rows)
    if small:
        width = LANES * (n_classes + LANE_SCRATCH_ROWS)
        for g0 in range(r0, r1, LANES):
            k = min(LANES, r1 - g0)
            _probability_lanes(g0, k, x, t, weight, p, mode, loss, grad, buf[:width], buf[width:], lanes[thread])
    else:
        _probability_rows(r0, r1, x, t, weight, p, mode, loss, grad, rowdata, buf, xt_out[xt_row], xt[xt_row])


#: the slots of ``packed`` before the arrays: the Params fields, then mode, small, block_rows
SLOT_MODE = len(Params._fields)
SLOT_SMALL = SLOT_MODE + 1
SLOT_BLOCK_ROWS = SLOT_MODE + 2
N_SCALAR_SLOTS = SLOT_MODE + 3
#: the arrays a block takes, in their order in ``packed`` (each: address, then its shape)
BLOCK_ARRAYS = ("x", "target", "weight", "loss", "grad", "rowdata", "scratch", "lanes", "xt_out", "xt", "x16", "grad16")
#: where the 16-bit logits are in BLOCK_ARRAYS (their rows are the block's rows in 16-bit storage)
ARRAY_X16 = BLOCK_ARRAYS.index("x16")
#: slots of ``packed``: the scalars and at most 4 per array (the lanes state is 3-D)
N_PACKED = N_SCALAR_SLOTS + 4 * len(BLOCK_ARRAYS)


@helper
def _pack_scalars(packed, p, mode, small, block_rows):
    """The Params fields (floats as their bits, bools as 0/1), mode, small, block_rows."""
    packed[0] = p.ignore_index
    packed[1] = p.class_start
    packed[2] = float_as_int(np.float64(p.eps))
    packed[3] = float_as_int(np.float64(p.keep))
    packed[4] = float_as_int(np.float64(p.spread))
    packed[5] = p.smoothing
    packed[6] = float_as_int(np.float64(p.weight_total))
    packed[7] = float_as_int(np.float64(p.grad_scale))
    packed[8] = p.weighted
    packed[9] = float_as_int(np.float64(p.z_loss))
    packed[10] = float_as_int(np.float64(p.z_grad_scale))
    packed[11] = float_as_int(np.float64(p.logit_scale))
    packed[12] = float_as_int(np.float64(p.softcap))
    packed[13] = p.transformed
    packed[14] = p.row_outputs
    packed[15] = p.stats
    packed[16] = p.storage
    packed[SLOT_MODE] = mode
    packed[SLOT_SMALL] = small
    packed[SLOT_BLOCK_ROWS] = block_rows


@helper
def _unpack_params(packed):
    """The Params of _pack_scalars, bit for bit."""
    return Params(
        packed[0],
        packed[1],
        int_as_float(packed[2]),
        int_as_float(packed[3]),
        int_as_float(packed[4]),
        packed[5] != 0,
        int_as_float(packed[6]),
        int_as_float(packed[7]),
        packed[8] != 0,
        int_as_float(packed[9]),
        int_as_float(packed[10]),
        int_as_float(packed[11]),
        int_as_float(packed[12]),
        packed[13] != 0,
        packed[14] != 0,
        packed[15] != 0,
        packed[16],
    )


@kernel(parallel=False)
def _pack_block_arguments(
    packed, p, mode, small, block_rows, x, target, weight, loss, grad, rowdata, scratch, lanes, xt_out, xt, x16, grad16
):
    """Fills ``packed`` for _blocks_by_address: the scalars, then each of BLOCK_ARRAYS (in
    order) as its address and shape. Typed by the arrays (one specialisation per dtype and
    target kind), but serial: it compiles in a fraction of a parallel kernel's time."""
    _pack_scalars(packed, p, mode, small, block_rows)
    k = pack_array(packed, N_SCALAR_SLOTS, x)
    k = pack_array(packed, k, target)
    k = pack_array(packed, k, weight)
    k = pack_array(packed, k, loss)
    k = pack_array(packed, k, grad)
    k = pack_array(packed, k, rowdata)
    k = pack_array(packed, k, scratch)
    k = pack_array(packed, k, lanes)
    k = pack_array(packed, k, xt_out)
    k = pack_array(packed, k, xt)
    k = pack_array(packed, k, x16)
    pack_array(packed, k, grad16)


@kernel
def _blocks_by_address(block_function, packed, n, block_rows):
    """The parallel loop: every block of ``block_rows`` of the ``n`` rows by the cfunc at
    ``block_function`` (see above), given the packed arguments. Its arguments are integers
    and one int64 array whatever the dtype and target kind, so it compiles once, not once
    for each (a parallel kernel is four levels of numba code: ~1.3 s of CPU each time)."""
    address = packed.ctypes.data
    for b in prange((n + block_rows - 1) // block_rows):
        call_by_address(block_function, b, numba.get_thread_id(), address)


@helper
def _unpack_arrays(packed, dtype, target_ndim):
    """The arrays of _blocks_by_address's ``packed``, as (mutable) C-contiguous arrays."""
    k = N_SCALAR_SLOTS
    x, k = unpack_array(packed, k, dtype, 2)
    if target_ndim == 1:
        target, k = unpack_array(packed, k, np.int64, 1)
    else:
        target, k = unpack_array(packed, k, dtype, 2)
    weight, k = unpack_array(packed, k, dtype, 1)
    loss, k = unpack_array(packed, k, np.float64, 1)
    grad, k = unpack_array(packed, k, dtype, 2)
    rowdata, k = unpack_array(packed, k, np.float64, 2)
    scratch, k = unpack_array(packed, k, dtype, 2)
    lanes, k = unpack_array(packed, k, np.float64, 3)
    xt_out, k = unpack_array(packed, k, dtype, 2)
    xt, k = unpack_array(packed, k, dtype, 2)
    x16, k = unpack_array(packed, k, np.uint16, 2)
    grad16, k = unpack_array(packed, k, np.uint16, 2)
    return x, target, weight, loss, grad, rowdata, scratch, lanes, xt_out, xt, x16, grad16


@helper
def _unpacked_scalars(address):
    """The packed arguments at ``address`` and their scalars: (packed, p, mode, small,
    block_rows). Each block function below unpacks its own kind's arrays: one helper
    taking the kind as a flag had numba copy both kinds' blocks into each (it inlines
    before it prunes the dead branch), ~0.3 s of CPU more per block function."""
    wide_vectors()
    packed = numba.carray(address_as(address, np.int64), N_PACKED)
    return packed, _unpack_params(packed), packed[SLOT_MODE], packed[SLOT_SMALL] != 0, packed[SLOT_BLOCK_ROWS]


# The block functions, one per target kind and compute dtype, compiled as ``cfunc`` on
# first use (block_function) and cached on disk as the kernels are.
def _index_block_float32(b, thread, address):
    packed, p, mode, small, block_rows = _unpacked_scalars(address)
    _index_block(b, thread, p, mode, small, block_rows, _unpack_arrays(packed, np.float32, 1))


def _index_block_float64(b, thread, address):
    packed, p, mode, small, block_rows = _unpacked_scalars(address)
    _index_block(b, thread, p, mode, small, block_rows, _unpack_arrays(packed, np.float64, 1))


def _probability_block_float32(b, thread, address):
    packed, p, mode, small, block_rows = _unpacked_scalars(address)
    _probability_block(b, thread, p, mode, small, block_rows, _unpack_arrays(packed, np.float32, 2))


def _probability_block_float64(b, thread, address):
    packed, p, mode, small, block_rows = _unpacked_scalars(address)
    _probability_block(b, thread, p, mode, small, block_rows, _unpack_arrays(packed, np.float64, 2))


BLOCK_FUNCTIONS = {
    ("index", np.dtype(np.float32)): _index_block_float32,
    ("index", np.dtype(np.float64)): _index_block_float64,
    ("probability", np.dtype(np.float32)): _probability_block_float32,
    ("probability", np.dtype(np.float64)): _probability_block_float64,
}
_COMPILED_BLOCKS: dict = {}
_LOAD_LOCK = threading.Lock()


# Why the first process computes the cached bits. numba links each helper it does not
# inline (_index_rows, row_steps, _distill_rows, fast_log, ...) into its caller as a copy that
# LLVM optimises again there. numba used to give each helper machine code of its own too, and
# in the process that compiled, the JIT bound the caller's calls to that code, while a later
# process, loading the caller from the cache, ran the caller's copies: optimised in different
# contexts, they rounded differently (float32 soft-cap gradients differed by 1 ulp in ~30% of
# the elements, float64 probability-target and beta = 1 distillation gradients by up to
# ~1e-12, a float32 score's lse by 1 ulp: docs/DESIGN.md). The helpers are link-only now
# (_jit.LINK_ONLY: no machine code of their own), so a block function (a cfunc) runs its own
# copies in every process, and is compiled here. A parallel kernel still compiles its loop
# body as a library of its own that the JIT binds to in the compiling process (the score
# kernel's lse still differed by 1 ulp), so the parallel kernels that call outlined helpers
# (the distillation's and the score's) are compiled in a child process into the cache and
# loaded from there (compiled_through_the_cache).


def _compile_in_child(statement: str) -> bool:
    """Run ``statement`` (with this module imported as ``k`` and NumPy as ``numpy``) in a
    child Python process (this one's interpreter, module path and environment, with
    COMPILE_IN_PROCESS_ENV set) to compile into numba's cache; False if it could not run
    or failed (the caller then compiles here)."""
    import subprocess
    import sys

    if not sys.executable or os.environ.get(COMPILE_IN_PROCESS_ENV) == "1":
        return False
    package = __name__.rpartition(".")[0]
    code = f"import numpy, {package}._numba_kernels as k; {statement}"
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], env=child_process_environment(), capture_output=True, timeout=1800
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def block_function(kind: str, dtype: np.dtype):
    """The compiled block function (a numba ``cfunc``) of ``kind`` and ``dtype``: from numba's
    cache, else compiled here (and cached)."""
    key = (kind, np.dtype(dtype))
    compiled = _COMPILED_BLOCKS.get(key)
    if compiled is None:
        with _LOAD_LOCK:
            compiled = _COMPILED_BLOCKS.get(key)
            if compiled is None:
                _COMPILED_BLOCKS[key] = compiled = block_cfunc(BLOCK_FUNCTIONS[key])
    return compiled


#: the functions whose kernels compile in a child process (``compiled_through_the_cache``):
#: ``precompile`` leaves them to its workers instead of compiling them in the caller
THROUGH_THE_CACHE: set[str] = set()


def compiled_through_the_cache(function: str):
    """Decorator for a parallel kernel that calls outlined helpers (after ``@kernel``): its
    overload for a new signature comes from numba's cache, compiled first by a child process
    (``warm_up(function, dtype of the first argument)``) when the cache lacks it (see above);
    when neither works, numba compiles it here as before. numba's dispatcher calls
    ``_compile_for_args`` only when no compiled overload matches the arguments, so a call
    that finds one pays nothing for this."""

    THROUGH_THE_CACHE.add(function)

    def install(dispatcher):
        if numba.config.DISABLE_JIT:
            return dispatcher
        compile_here = dispatcher._compile_for_args

        def compile_for_args(*args, **kws):
            with _LOAD_LOCK:
                signature = tuple(dispatcher.typeof_pyval(a) for a in args)
                dtype = np.dtype(args[0].dtype).str
                if not load_cached_overload(dispatcher, signature) and _compile_in_child(
                    f"k.warm_up({function!r}, numpy.dtype({dtype!r}))"
                ):
                    load_cached_overload(dispatcher, signature)
            return compile_here(*args, **kws)  # the loaded overload, or a compile here

        dispatcher._compile_for_args = compile_for_args
        return dispatcher

    return install


def _blocks_directly(block, p, mode, small, block_rows, *arrays):
    """NUMBA_DISABLE_JIT (the coverage run): the blocks in turn, as Python, each called
    directly (``block``: _index_block or _probability_block) instead of by address."""
    x, x16 = arrays[0], arrays[ARRAY_X16]
    n = x.shape[0] if p.storage == STORAGE_NATIVE else x16.shape[0]
    for b in range((n + block_rows - 1) // block_rows):
        block(b, 0, p, mode, small, block_rows, arrays)


@kernel(parallel=False)
def _finish_index_kernel(stats, y, weight, p, loss, coef):
    """Step (3) from merged row statistics (class shards): loss and the coefficients of (4)."""
    for i in range(stats.shape[0]):
        label = y[i]
        if label == p.ignore_index:
            loss[i] = 0.0
            coef[i, COEF_M] = stats[i, STAT_M]
            coef[i, COEF_A] = 0.0
            coef[i, COEF_Y] = 0.0
            continue
        w_y = np.float64(weight[label]) if p.weighted else 1.0
        m = stats[i, STAT_M]
        row_loss, a, y_term = index_finish(m - stats[i, STAT_TARGET], stats[i, STAT_S], stats[i, STAT_B], w_y, p)
        loss[i] = row_loss
        coef[i, COEF_M] = m
        coef[i, COEF_A] = a
        coef[i, COEF_Y] = y_term


@kernel(parallel=False)
def _finish_probability_kernel(stats, p, loss, coef):
    for i in range(stats.shape[0]):
        row_loss, a = probability_finish(stats[i, STAT_S], stats[i, STAT_A], stats[i, STAT_B], p)
        loss[i] = row_loss
        coef[i, COEF_M] = stats[i, STAT_M]
        coef[i, COEF_A] = a
        coef[i, COEF_Y] = 0.0


@kernel
def _logsumexp_kernel(x, out):
    """``out_i = m + log(sum_c exp(x_ic - m))``, steps (1)-(3); out (n,) of x's dtype."""
    for i in prange(x.shape[0]):
        wide_vectors()
        row = x[i]
        m = row_max(row)
        if math.isinf(m):  # as torch: all -inf -> log 0 = -inf; a +inf -> +inf (not inf - inf)
            out[i] = math.log(_sum_exp_unshifted(row))
        else:
            out[i] = m + math.log(row_sum_exp_only(row, m))


@compiled_through_the_cache("score_rows")
@kernel
def _score_rows_kernel(x, y, out):
    """Per row with a valid label ``y_i`` (fastxent score): ``out[i] = (lse, x_y, rank, m)``,
    the rank ``#{c: x_c > x_y} + #{c < y: x_c = x_y}`` (0: the first argmax, as
    torch.argmax). Steps (1)-(3) as logsumexp, in float64 (``fast_log``), and the rank's
    two counting loops, all over the row while it is in cache."""
    for i in prange(x.shape[0]):
        wide_vectors()
        row = x[i]
        label = y[i]
        m = row_max(row)
        x_y = row[label]
        ahead = 0
        for c in range(row.shape[0]):
            ahead += 1 if row[c] > x_y else 0
        tied_before = 0
        for c in range(label):
            tied_before += 1 if row[c] == x_y else 0
        if math.isinf(m):
            out[i, 0] = math.log(_sum_exp_unshifted(row))
        else:
            out[i, 0] = np.float64(m) + fast_log(row_sum_exp_only(row, m))
        out[i, 1] = x_y
        out[i, 2] = ahead + tied_before
        out[i, 3] = m


@exact_helper
def _sum_exp_unshifted(row):
    """``sum_c exp(row_c)`` with libm's exp, in order: the rare rows whose max is infinite."""
    s = 0.0
    for c in range(row.shape[0]):
        s += math.exp(row[c])
    return s


@helper
def _log_softmax_row(row, o):
    """``o_c = (row_c - m) - log(s)``: steps (1)-(3), then one write per element."""
    m = row_max(row)
    log_s = o.dtype.type(math.log(row_sum_exp_only(row, m)))
    for c in range(row.shape[0]):
        o[c] = (row[c] - m) - log_s


@helper
def _softmax_row(row, o):
    """``o_c = exp(row_c - m) / s``: steps (1)-(2) write e into o, then scale by 1/s."""
    m = row_max(row)
    s = row_sum_exp(row, m, o)
    inv_s = o.dtype.type(1.0 / s)
    for c in range(row.shape[0]):
        o[c] = o[c] * inv_s


# In place takes ONE array name: given two names for it, LLVM's run-time overlap check fails
# and every row runs the scalar loop (4x slower). So in place (``in_place``, a run-time
# flag: one parallel kernel, not two, ~0.7 s less to compile) each row is read and written
# as ``out[i]``, and ``x`` (then a read-only view of ``out``) is not read.
@kernel
def _log_softmax_kernel(x, out, in_place):
    for i in prange(x.shape[0]):
        wide_vectors()
        if in_place:
            _log_softmax_row(out[i], out[i])
        else:
            _log_softmax_row(x[i], out[i])


@kernel
def _softmax_kernel(x, out, in_place):
    for i in prange(x.shape[0]):
        wide_vectors()
        if in_place:
            _softmax_row(out[i], out[i])
        else:
            _softmax_row(x[i], out[i])


@helper
def label_stats(y, n_classes, ignore_index, weight):
    """Checks labels before any kernel runs and sums the "mean" denominator.

    Returns ``(first_bad, total)``: the first row whose label is neither ignore_index nor
    in [0, n_classes) (-1 if none), and ``D = sum_i [y_i != ignore_index] w[y_i]`` in
    float64 (the count of kept rows when weight has length 0), summed in row order.

    Without weights, one branch-free pass counts the kept rows and the bad labels (integer
    counts, which LLVM vectorises; ``total += 1.0`` in row order is a chain of dependent
    float64 additions); only when a label is bad does the row-order loop run, to find the
    first. ``float(count)`` is the row-order sum of ones exactly (below 2**53).
    """
    has_weight = weight.shape[0] != 0
    if not has_weight:
        kept = 0
        bad = 0
        for i in range(y.shape[0]):
            yi = y[i]
            keep = yi != ignore_index
            kept += keep
            bad += keep & ((yi < 0) | (yi >= n_classes))
        if bad == 0:
            return -1, float(kept)
    total = 0.0
    for i in range(y.shape[0]):
        yi = y[i]
        if yi == ignore_index:
            continue
        if yi < 0 or yi >= n_classes:
            return i, total
        total += weight[yi] if has_weight else 1.0
    return -1, total


# --- the backend interface (the same in _numpy_backend.py and _cy_backend.py) ---------
# Rows are handed to the threads one block (BLOCK_ELEMENTS logits) at a time, dynamically:
# numba's default splits the rows into one static block per thread, so a thread whose
# core is busy with another process would hold everyone up (2 threads slower than 1).

# Thread safety. numba picks its threading layer when the first parallel call launches it
# (tbb > omp > workqueue by default, or $NUMBA_THREADING_LAYER). "tbb" and "omp" may be
# entered from several Python threads at once; "workqueue" may not (numba terminates the
# process: "Concurrent access has been detected"). So once the layer is known, calls on
# "workqueue" (or an unknown layer) take ``_SERIAL_LOCK`` and run one at a time; calls on
# a thread-safe layer take no lock. ``set_parallel_chunksize`` launches the layer (and is
# thread-local), so the layer is known before the first kernel runs.
_THREAD_SAFE_LAYERS = frozenset({"tbb", "omp"})
_SERIAL_LOCK = threading.Lock()
_layer_thread_safe: bool | None = None  # None: not launched yet (or NUMBA_DISABLE_JIT)


def threading_layer() -> str | None:
    """numba's threading layer once launched (by the first parallel call), else None."""
    try:
        return numba.threading_layer()
    except ValueError:  # not launched yet
        return None


def _thread_safe() -> bool:
    global _layer_thread_safe
    if _layer_thread_safe is None:
        layer = threading_layer()
        if layer is not None:
            _layer_thread_safe = layer in _THREAD_SAFE_LAYERS
    return bool(_layer_thread_safe)


def _reset_lock_in_child() -> None:
    # a fork made while another thread held the lock would leave it locked forever
    global _SERIAL_LOCK
    _SERIAL_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_reset_lock_in_child)


def _set_chunksize(n: int) -> int:
    if numba.config.DISABLE_JIT:  # nothing runs in parallel: leave numba's pool unlaunched
        return 0
    return numba.set_parallel_chunksize(n)


def _run(kernel_function, elements_per_iteration, *args, elements=None):
    """Run a kernel whose prange iterations each cover ``elements_per_iteration`` logits
    (C for the row kernels), in chunks of about BLOCK_ELEMENTS logits. ``elements``: the
    logits of the call (default: the size of its largest 2-D array)."""
    if _thread_safe():
        _run_chunked(kernel_function, elements_per_iteration, args, elements)
    else:  # workqueue, or not launched yet: the chunk size too is set under the lock
        with _SERIAL_LOCK:
            _run_chunked(kernel_function, elements_per_iteration, args, elements)


def _run_chunked(kernel_function, elements_per_iteration, args, elements):
    previous = _set_chunksize(max(1, BLOCK_ELEMENTS // max(elements_per_iteration, 1)))  # launches the layer
    # a small call on one thread (SMALL_CALL_ELEMENTS: the largest 2-D array is the logits;
    # numba's count is per Python thread, so other threads' launches are unaffected)
    if elements is None:
        elements = max((a.size for a in args if isinstance(a, np.ndarray) and a.ndim == 2), default=0)
    small = elements < SMALL_CALL_ELEMENTS
    from ._threads import limited  # (here: _threads imports the dispatch table, which loads this module)

    try:
        with limited(1, [(numba.get_num_threads, numba.set_num_threads)]) if small else contextlib.nullcontext():
            kernel_function(*args)
    finally:
        _set_chunksize(previous)


# Per-thread scratch: a row (or 16 transposed rows) of the compute dtype per kernel thread,
# and the lane state of the small-C layout. Kept per Python thread and reused, so a call
# neither allocates nor page-faults it anew; two Python threads never share one.
_SCRATCH = threading.local()


def _scratch(dtype: np.dtype, width: int) -> tuple[np.ndarray, np.ndarray]:
    """``(buf, lanes)``: a (threads, >= width) array of ``dtype`` and the lanes' float64 state,
    each thread's part starting on its own cache line with a line of padding after it (two
    threads writing the two ends of one line made 2 threads slower than 1 at C = 10)."""
    threads = max(1, int(numba.config.NUMBA_NUM_THREADS))
    per_line = _CACHE_LINE // dtype.itemsize
    padded = (width + 2 * per_line - 1) // per_line * per_line  # >= width + one line, whole lines
    cache = _SCRATCH.__dict__.setdefault("rows", {})
    flat = cache.get(dtype)
    if flat is None or flat.shape[0] < threads * padded:
        flat = _aligned_empty(max(threads * padded, 1 << 12), dtype)
        cache[dtype] = flat
    lanes = _SCRATCH.__dict__.get("lanes")
    if lanes is None or lanes.shape[0] < threads:
        lanes = _aligned_empty(threads * (N_LANE_ROWS + 1) * LANES, np.dtype(np.float64))
        lanes = lanes.reshape(threads, N_LANE_ROWS + 1, LANES)  # row N_LANE_ROWS: padding
        _SCRATCH.lanes = lanes
    return flat[: threads * padded].reshape(threads, padded), lanes


_CACHE_LINE = 64


def _transformed_rows(dtype: np.dtype, n_classes: int, threads: int, rows: int = 1) -> np.ndarray:
    """The x' rows of step (0): (threads * k, C) exactly C wide (a row of x' is then typed
    and sized as a row of x), of which each kernel thread uses ``rows`` rows from row
    ``thread * k``; the rows after them keep two threads' rows off one cache line."""
    k = rows + -(-_CACHE_LINE // (n_classes * dtype.itemsize))
    cache = _SCRATCH.__dict__.setdefault("transformed", {})
    flat = cache.get(dtype)
    size = threads * k * n_classes
    if flat is None or flat.shape[0] < size:
        flat = _aligned_empty(max(size, 1 << 12), dtype)
        cache[dtype] = flat
    return flat[:size].reshape(threads * k, n_classes)


def _aligned_empty(size: int, dtype: np.dtype) -> np.ndarray:
    raw = np.empty(size * dtype.itemsize + _CACHE_LINE, np.uint8)
    offset = -raw.ctypes.data % _CACHE_LINE
    return raw[offset : offset + size * dtype.itemsize].view(dtype)


_NO_ROWDATA = np.empty((1, N_STATS), np.float64)


def _xent(kind, x, target, weight, params, mode, loss, grad, rowdata, small_ok):
    n_classes = x.shape[1]
    if x.shape[0] == 0:
        return
    x16, grad16 = _NO_WORDS_IN, _NO_WORDS_OUT
    if x.dtype == np.uint16:  # 16-bit storage: the float32 kernel, reading x16, writing grad16
        if grad is not None:
            grad16 = grad
            grad = None
            mode = IN_PLACE  # e in the scratch row, the gradient rounded from it into grad16
        x16 = _frozen(x)
        x = _NO_LOGITS
    dtype = x.dtype
    # the lanes layout of probability targets has none of the extensions (x', z-loss,
    # statistics): rows at a time; class indices have them in both layouts
    plain = not (params.transformed or params.row_outputs)
    small = small_ok and (plain or kind == "index") and mode in (LOSS, GRAD, IN_PLACE) and n_classes <= SMALL_C
    # 16-bit words are widened into the x' rows (step (0)) whether or not they are scaled;
    # the row layout writes a scaled or capped x' there too (the lanes transform it in the
    # scratch themselves)
    widened = x16 is not _NO_WORDS_IN or (params.transformed and not small)
    block_rows = rows_per_block(n_classes)
    # a row; or the lanes' rows transposed and their max (probability targets: twice; class
    # indices with a scale, a cap or statistics: and the kept x', see _index_lanes)
    width = n_classes
    if small:
        width = LANES * (n_classes + LANE_SCRATCH_ROWS)
        if kind == "probability":
            width *= 2
        elif params.transformed or params.stats:
            width += LANES * n_classes
    scratch, lanes = _scratch(dtype, width)
    # the x' rows, written under one name and read under another, read-only, so that a row
    # of x and a row of x' have one numba type (and the steps after (0) one specialisation)
    # (16-bit words in the lanes layout: LANES rows of x' per thread, see _index_block)
    rows_per_thread = LANES if small else 1
    xt_out = _transformed_rows(dtype, n_classes, scratch.shape[0], rows_per_thread) if widened else scratch
    if grad is None:
        grad = no_gradient(dtype)
    if grad is x:  # in place: the kernel reads a read-only view and writes the array itself
        x = _frozen(x)
        if mode == GRAD:
            mode = IN_PLACE
    if rowdata is None:
        rowdata = _NO_ROWDATA
    weight = weight if weight.shape[0] != 0 else kernel_weight(weight, np.empty((0, n_classes), dtype))
    arrays = (x, target, weight, loss, grad, rowdata, scratch, lanes, xt_out, _frozen(xt_out), x16, grad16)
    scalars = (params, np.int64(mode), small, np.int64(block_rows))
    if numba.config.DISABLE_JIT:
        _blocks_directly(_index_block if kind == "index" else _probability_block, *scalars, *arrays)
    else:  # the blocks by address (see _blocks_by_address)
        address = np.int64(block_function(kind, dtype).address)
        packed = np.empty(N_PACKED, np.int64)
        _pack_block_arguments(packed, *scalars, *arrays)
        n = x.shape[0] if params.storage == STORAGE_NATIVE else x16.shape[0]
        elements = n * n_classes
        _run(
            _blocks_by_address,
            block_rows * n_classes,
            address,
            packed,
            np.int64(n),
            np.int64(block_rows),
            elements=elements,
        )


#: the stand-ins of the arrays a call does not use: the 16-bit logits and gradient of native
#: storage, the float32 logits of 16-bit storage (never read: the kernel's branches)
_NO_WORDS_IN = np.zeros((1, 1), np.uint16)
_NO_WORDS_IN.flags.writeable = False
_NO_WORDS_OUT = np.zeros((1, 1), np.uint16)
_NO_LOGITS = np.zeros((1, 1), np.float32)
_NO_LOGITS.flags.writeable = False


def xent_index(x, y, weight, params, loss, grad=None, row_out=None):
    """Cross-entropy rows for class-index targets: per-row losses into ``loss`` (n,)
    float64, and the gradient (scaled by ``params.grad_scale``) into ``grad`` unless it is
    None. ``grad`` may be ``x`` itself (in place). x (n, C) float; y (n,) int64, every
    non-ignored value in [0, C) (checked by the caller); weight (C,) or length 0. With
    ``params.row_outputs``, ``row_out`` (n, N_OUTS) float64 gets the columns ``OUT_*``."""
    mode = GRAD if grad is not None else LOSS
    _xent("index", x, y, weight, params, mode, loss, grad, row_out, True)


def xent_probability(x, t, weight, params, loss, grad=None, row_out=None):
    """Cross-entropy rows for probability targets t (n, C) of x's dtype; as xent_index."""
    mode = GRAD if grad is not None else LOSS
    _xent("probability", x, t, weight, params, mode, loss, grad, row_out, True)


def row_stats(kind, x, target, weight, params, stats):
    """Steps (1)-(2) of a class shard (columns ``params.class_start..``): the statistics
    ``stats`` (n, N_STATS) float64. ``weight`` is the shard's slice; for index targets
    column STAT_A is left 0 (the caller knows the shard's weight sum)."""
    _xent(kind, x, target, weight, params, STATS, np.empty(0), None, stats, False)


def finish(kind, stats, target, weight, params, loss, coef):
    """Step (3) from (merged) statistics: per-row ``loss`` and the coefficients ``coef``
    (n, 3) that ``shard_grad`` reads. ``weight``: the FULL class weights (or length 0)."""
    stats = _frozen(np.ascontiguousarray(stats, np.float64))
    if kind == "index":
        full_weight = weight if weight.shape[0] != 0 else np.ones(1)
        full_weight = _frozen(np.ascontiguousarray(full_weight, np.float64))
        _finish_index_kernel(stats, _frozen(target), full_weight, params, loss, coef)
    else:
        _finish_probability_kernel(stats, params, loss, coef)


def _frozen(a):
    """A read-only view: inputs are always passed read-only, one specialisation per dtype."""
    view = a.view()
    view.flags.writeable = False
    return view


def shard_grad(kind, x, target, weight, params, coef, grad):
    """Step (4) of a class shard from the coefficients of ``finish``: ``grad`` (n, C_shard),
    which may be ``x`` itself."""
    _xent(kind, x, target, weight, params, SHARD_GRAD, np.empty(x.shape[0]), grad, coef, False)


def logsumexp_rows(x, out):
    """``out_i = m + log(sum_c exp(x_ic - m))``, steps (1)-(3); out (n,) of x's dtype."""
    _run(_logsumexp_kernel, x.shape[1], x, out)


def score_rows(x, y, out):
    """``out`` (n, 4) float64: per row the lse, the target logit, its rank, the max (every
    label valid: the caller drops ignored rows and checks the range). x and y are passed
    read-only (the one specialisation that precompile compiles), and the kernel's first call
    loads it from numba's cache, compiled in a child when missing (``compiled_through_the_cache``:
    float32 lse of 5000-class rows differed by 1 ulp between a compiling and a loading
    process)."""
    _run(_score_rows_kernel, x.shape[1], _frozen(x), _frozen(y), out)


def log_softmax_rows(x, out):
    """``out_ic = (x_ic - m) - log(s)``; out may be x itself."""
    _run(_log_softmax_kernel, x.shape[1], _frozen(x) if out is x else x, out, out is x)  # (x read-only)


def softmax_rows(x, out):
    """``out_ic = exp(x_ic - m) / s``; out may be x itself."""
    _run(_softmax_kernel, x.shape[1], _frozen(x) if out is x else x, out, out is x)  # (x read-only)


# --- what precompile() compiles: the dispatch table of this backend ------------------
#: backend function -> the numba dispatchers it runs (each compiled once per dtype: every
#: array is passed C-contiguous and read-only but the outputs, labels always int64)
COMPILED = {
    "xent_index": (_pack_block_arguments, _blocks_by_address, label_stats, _finish_index_kernel),
    "xent_probability": (_pack_block_arguments, _blocks_by_address, _finish_probability_kernel),
    "logsumexp_rows": (_logsumexp_kernel,),
    "log_softmax_rows": (_log_softmax_kernel,),
    "softmax_rows": (_softmax_kernel,),
    "score_rows": (_score_rows_kernel,),
}


def warm_up(function: str, dtype: np.dtype) -> None:
    """Compile (or load from the cache) every kernel that ``function`` runs for ``dtype``."""
    from ._spec import LossSpec, TargetKind

    if function == "distill":
        _warm_up_distill(dtype)
        return
    x = np.zeros((2, 3), dtype)
    x.flags.writeable = False
    loss = np.empty(2)
    if function in ("xent_index", "xent_probability"):
        kind: TargetKind = "index" if function == "xent_index" else "probability"
        params = LossSpec.create(kind).params(n_classes=3, weight_total=3.0, grad_scale=1.0, weighted=False)
        weight = np.empty(0, dtype)
        weight.flags.writeable = False
        target = np.zeros(2, np.int64) if kind == "index" else np.full((2, 3), 1 / 3, dtype)
        target.flags.writeable = False
        if kind == "index":
            label_stats(target, 3, -100, weight)
        fused = xent_index if kind == "index" else xent_probability
        fused(x, target, weight, params, loss, np.empty((2, 3), dtype))
        stats = np.zeros((2, N_STATS))
        row_stats(kind, x, target, weight, params, stats)
        finish(kind, stats, target, weight, params, loss, np.zeros((2, 3)))
    elif function == "logsumexp_rows":
        logsumexp_rows(x, np.empty(2, dtype))
    elif function == "score_rows":
        labels = np.zeros(2, np.int64)
        labels.flags.writeable = False
        score_rows(x, labels, np.empty((2, 4)))
    elif function in ("log_softmax_rows", "softmax_rows"):
        run = log_softmax_rows if function == "log_softmax_rows" else softmax_rows
        run(x, np.empty((2, 3), dtype))
        in_place = np.zeros((2, 3), dtype)
        run(in_place, in_place)
    else:
        raise ValueError(f"warm_up: unknown function {function!r} (expected one of {', '.join(COMPILED)})")


def compiled_kernels() -> set[str]:
    """The kernel specialisations numba holds (compiled or loaded) in this process, each
    named by its function and signature (so two processes' sets can be joined)."""
    dispatchers = {d for kernels in COMPILED.values() for d in kernels}
    named = {f"{d.py_func.__qualname__}{signature}" for d in dispatchers for signature in d.signatures}
    return named | {f"block {kind} {dtype}" for kind, dtype in _COMPILED_BLOCKS}


def compiled_count() -> int:
    """How many kernel specialisations numba holds (compiled or loaded) in this process."""
    return len(compiled_kernels())


# =====================================================================================
# --- distillation: the generalised JSD between two softmaxes, in one row visit -------
# =====================================================================================
# P = softmax(t / T) (teacher), Q = softmax(z / T) (student), M = beta P + (1-beta) Q.
# Per row, in the same words as the cross-entropy (docs/SEMANTICS.md "Distillation"):
#
#   (1) ``m_s = max_c z_c``, ``m_t = max_c t_c`` (T > 0: the max of z / T is m_s / T)
#   (2) ``eq_c = exp((z_c - m_s) / T)`` into the gradient row (in place, loss only: the
#       thread's scratch row ``e``), ``s_q = sum_c eq_c``; ``ep_c = exp((t_c - m_t) / T)``
#       into the thread's float64 row ``w``, ``s_p = sum_c ep_c``. So
#       ``Q_c = eq_c / s_q``, ``log Q_c = b_c - log s_q`` with ``b_c = (z_c - m_s) / T``,
#       and ``P_c``, ``log P_c = a_c - log s_p`` likewise.
#   (3) one pass for the loss ``T**2 J``, which leaves in ``w`` what (4) needs:
#       beta = 0:  J = S / s_p + log s_q - log s_p,  S = sum_c ep_c (a_c - b_c);  w = ep
#       beta = 1:  J = S / s_q + log s_p - log s_q,  S = sum_c eq_c (b_c - a_c);  w_c = b_c - a_c
#       else:      J = beta KL(P||M) + (1-beta) K,   K = KL(Q||M);                w_c = log Q_c - log M_c
#       (a term whose probability is 0 is 0: 0 log 0 = 0, so a -inf logit in both rows adds
#       nothing; ``w_c`` is 0 where ``eq_c`` is, so (4) never forms 0 * inf)
#   (4) ``g = T dJ/du`` (u = z / T), times grad_scale: from ``dJ/du_c = Q_c (dJ/dQ_c - sum_k
#       Q_k dJ/dQ_k)``:
#       beta = 0:  g_c = T (Q_c - P_c)                        = eq_c cq - ep_c cp
#       beta = 1:  g_c = T Q_c (log Q_c - log P_c - J)         = eq_c cq (w_c - S / s_q)
#       else:      g_c = T (1-beta) Q_c (log Q_c/M_c - K)      = eq_c cq (w_c - K)
#
# a_c, b_c, the sums, (3) and (4) are float64 (the near-cancelling differences of a student
# close to its teacher keep their digits); the exponentials of (2) are in the input dtype,
# as the cross-entropy's. log M_c is ``fast_log`` where P_c and Q_c are both > 0 (then M_c
# >= (1-beta) Q_c is a normal float64), else ``log beta + log P_c`` or ``log(1-beta) + log Q_c``
# exactly. One kernel per dtype for every beta, mode and reduction (run-time branches).


@helper
def row_sum_exp_scaled(row, m, k, e_out):
    """Step (2) at temperature ``1/k``: ``e_c = exp((row_c - m) k)`` into ``e_out`` (of any
    float dtype; the exponential is computed in the row's), ``s = sum_c e_c`` in float64.
    At k = 1 the same numbers as ``row_sum_exp``."""
    for c in range(row.shape[0]):
        e_out[c] = fast_exp((row[c] - m) * k)
    s = 0.0
    for c in range(row.shape[0]):
        s += np.float64(e_out[c])
    return s


@helper
def _forward_kl_sum(z, t, m_s, m_t, k, w):
    """Step (3), beta = 0: ``S = sum_c ep_c (a_c - b_c)`` (``ep`` in ``w``), 0 where ep_c = 0."""
    S = 0.0
    for c in range(z.shape[0]):
        d = (np.float64(t[c]) - m_t) * k - (np.float64(z[c]) - m_s) * k
        S += w[c] * d if w[c] != 0.0 else 0.0
    return S


@helper
def _reverse_kl_sum(z, t, m_s, m_t, k, e, w):
    """Step (3), beta = 1: ``S = sum_c eq_c (b_c - a_c)``, and ``w_c = b_c - a_c`` (0 where
    eq_c = 0)."""
    S = 0.0
    for c in range(z.shape[0]):
        d = (np.float64(z[c]) - m_s) * k - (np.float64(t[c]) - m_t) * k
        d = d if e[c] != 0 else 0.0
        w[c] = d
        S += np.float64(e[c]) * d
    return S


@helper
def _jsd_sums(z, t, m_s, m_t, k, log_s_q, log_s_p, inv_s_q, inv_s_p, e, w, p):
    """Step (3), 0 < beta < 1: ``(KL(P||M), KL(Q||M))``, and ``w_c = log Q_c - log M_c``
    (0 where Q_c = 0). ``w`` holds ep on entry (read before it is written, one name)."""
    kl_p = 0.0
    kl_q = 0.0
    for c in range(z.shape[0]):
        log_p = (np.float64(t[c]) - m_t) * k - log_s_p
        log_q = (np.float64(z[c]) - m_s) * k - log_s_q
        pc = w[c] * inv_s_p
        qc = np.float64(e[c]) * inv_s_q
        both = pc > 0.0 and qc > 0.0
        log_m = fast_log(p.beta * pc + (1.0 - p.beta) * qc)
        if not both:
            log_m = p.log_beta + log_p if pc > 0.0 else p.log_one_minus_beta + log_q
        kl_p += pc * (log_p - log_m) if pc > 0.0 else 0.0
        r = log_q - log_m if qc > 0.0 else 0.0
        w[c] = r
        kl_q += qc * r
    return kl_p, kl_q


@helper
def _distill_grad_row(g, e, w, cq, cp, h, kind):
    """Step (4): ``g_c = eq_c cq - w_c cp`` (beta = 0) or ``eq_c cq (w_c - h)``, in float64,
    rounded once. ``e`` may be ``g`` itself (GRAD: one name of the row)."""
    if kind == FORWARD_KL:
        for c in range(g.shape[0]):
            g[c] = np.float64(e[c]) * cq - w[c] * cp
    else:
        for c in range(g.shape[0]):
            g[c] = np.float64(e[c]) * cq * (w[c] - h)


@outlined_helper
def _distill_rows(r0, r1, z, t, y, p, mode, loss, grad, scratch, w):
    """Steps (1)-(4) of each distillation row i of r0..r1-1 (see above); ``scratch`` (``e``
    in a row) and ``w`` the thread's scratch rows.

    The row's code is the loop's body, as in _index_rows."""
    wide_vectors()
    for i in range(r0, r1):
        e = scratch  # (a row may put another name on it)
        if p.masked and y[i] == p.ignore_index:  # ignored rows: loss 0, gradient 0
            loss[i] = 0.0
            if mode != LOSS:
                grad[i, :] = 0
            continue
        zi = z[i]
        ti = t[i]
        if mode == GRAD:  # the student's exponentials go straight into the gradient row
            e = grad[i]
        k_t = zi.dtype.type(p.inv_temperature)
        k = p.inv_temperature
        m_s = row_max(zi)  # (1)
        m_t = row_max(ti)
        s_q = row_sum_exp_scaled(zi, m_s, k_t, e)  # (2)
        s_p = row_sum_exp_scaled(ti, m_t, k_t, w)
        log_s_q = fast_log(s_q)
        log_s_p = fast_log(s_p)
        scale = p.temperature * p.grad_scale
        cp = 0.0
        if p.kind == FORWARD_KL:  # (3)
            S = _forward_kl_sum(zi, ti, np.float64(m_s), np.float64(m_t), k, w)
            j = S / s_p + (log_s_q - log_s_p)
            cq = scale / s_q
            cp = scale / s_p
            h = 0.0
        elif p.kind == REVERSE_KL:
            S = _reverse_kl_sum(zi, ti, np.float64(m_s), np.float64(m_t), k, e, w)
            h = S / s_q
            j = h + (log_s_p - log_s_q)
            cq = scale / s_q
        else:
            kl_p, h = _jsd_sums(
                zi, ti, np.float64(m_s), np.float64(m_t), k, log_s_q, log_s_p, 1.0 / s_q, 1.0 / s_p, e, w, p
            )
            j = p.beta * kl_p + (1.0 - p.beta) * h
            cq = scale * (1.0 - p.beta) / s_q
        loss[i] = p.temperature * p.temperature * j
        if mode == GRAD:  # (4), one name of the row: e is grad[i]
            g = grad[i]
            _distill_grad_row(g, g, w, cq, cp, h, p.kind)
        elif mode == IN_PLACE:  # the row is the student's own; e and w are scratch
            _distill_grad_row(grad[i], e, w, cq, cp, h, p.kind)


@compiled_through_the_cache("distill")
@kernel
def _distill_kernel(z, t, y, p, mode, block_rows, loss, grad, scratch, wide):
    n = z.shape[0]
    for b in prange((n + block_rows - 1) // block_rows):
        wide_vectors()
        thread = numba.get_thread_id()
        r0 = b * block_rows
        _distill_rows(r0, min(n, r0 + block_rows), z, t, y, p, mode, loss, grad, scratch[thread], wide[thread])


_DISTILL_SCRATCH = threading.local()


def _wide_scratch(width: int) -> np.ndarray:
    """The distillation's float64 row per kernel thread (``w``), kept per Python thread as
    ``_scratch``'s rows; a separate array from those even for float64 logits."""
    threads = max(1, int(numba.config.NUMBA_NUM_THREADS))
    per_line = _CACHE_LINE // 8
    padded = (width + 2 * per_line - 1) // per_line * per_line
    flat = getattr(_DISTILL_SCRATCH, "flat", None)
    if flat is None or flat.shape[0] < threads * padded:
        flat = _aligned_empty(max(threads * padded, 1 << 12), np.dtype(np.float64))
        _DISTILL_SCRATCH.flat = flat
    return flat[: threads * padded].reshape(threads, padded)


_NO_LABELS = np.zeros(1, np.int64)
_NO_LABELS.flags.writeable = False


def distill(z, t, labels, params, loss, grad=None):
    """Distillation rows: per-row losses ``T**2 J`` into ``loss`` (n,) float64, and the
    gradient with respect to ``z`` (scaled by ``params.grad_scale``) into ``grad`` unless it
    is None; ``grad`` may be ``z`` itself (in place). z, t (n, C) of one float dtype;
    ``labels`` (n,) int64 when ``params.masked`` (else None), every non-ignored one checked
    by the caller."""
    n, n_classes = z.shape
    if n == 0:
        return
    mode = GRAD if grad is not None else LOSS
    if grad is None:
        grad = no_gradient(z.dtype)
    if grad is z:  # in place: the kernel reads a read-only view and writes the array itself
        z = _frozen(z)
        mode = IN_PLACE
    block_rows = max(1, BLOCK_ELEMENTS // max(n_classes, 1))
    scratch, _ = _scratch(z.dtype, n_classes)
    _run(
        _distill_kernel,
        block_rows * n_classes,
        z,
        t,
        labels if labels is not None else _NO_LABELS,
        params,
        np.int64(mode),
        np.int64(block_rows),
        loss,
        grad,
        scratch,
        _wide_scratch(n_classes),
    )


def _warm_up_distill(dtype: np.dtype) -> None:
    from ._spec import distill_params

    x = np.zeros((2, 3), dtype)
    x.flags.writeable = False
    labels = np.zeros(2, np.int64)
    labels.flags.writeable = False
    weight = np.empty(0, dtype)
    weight.flags.writeable = False
    label_stats(labels, 3, -100, weight)
    loss = np.empty(2)
    distill(x, x, labels, distill_params(0.5, 2.0, 1.0, -100, True), loss, np.empty((2, 3), dtype))
    in_place = np.zeros((2, 3), dtype)
    distill(in_place, x, None, distill_params(0.0, 1.0, 1.0, -100, False), loss, in_place)
    distill(x, x, None, distill_params(1.0, 1.0, 1.0, -100, False), loss)


COMPILED["distill"] = (_distill_kernel, label_stats)
