"""The hot row-parallel fused kernels (Numba). The same steps, in the same words, as
``_reference.py`` and ``kernels/_cy_xent.pyx``.

Every kernel takes a C-contiguous 2-D ``x`` of shape ``(n, C)`` and runs one ``prange``
iteration per row. Each row is read from memory once: a row of up to ~128k float32 fits
in L2, so the later steps re-read it from cache. Per row:

  (1) ``m = max_c x_c``                                 (16 independent lanes, vectorised)
  (2) ``e_c = exp(x_c - m)`` written into the gradient row as scratch, ``s = sum_c e_c``;
      the smoothing sum ``sw = sum_c w_c (m - x_c)`` (index targets) or the target sums
      ``A = sum_c w_c t'_c``, ``B = sum_c w_c t'_c (m - x_c)`` (probability targets) in
      the same loop
  (3) ``lse = m + log(s)``; index targets: ``loss = (1-eps) w_y (lse - x_y)
      + eps/C (sw + W log s)``; probability targets: ``loss = B + A log s``
  (4) ``grad_c = e_c / s * a - b_c``, scaled by ``grad_scale`` (1/D for "mean"):
      index targets ``a = (1-eps) w_y + eps W / C``, ``b_c = eps/C w_c``, then
      ``grad_y -= (1-eps) w_y``; probability targets ``a = A``, ``b_c = w_c t'_c``.

For few classes (C <= SMALL_C) the class-index kernels run the same steps on blocks of
rows, with one flat exp loop per block (``_index_block``).

``sum_c w_c (lse - x_c)`` is written ``sw + W log s`` so that it is a sum of
non-negative terms, without the cancellation of ``W lse - sum_c w_c x_c``.

Accumulators (``s``, ``sw``, ``A``, ``B``) and the per-row loss are float64 for both
dtypes, as in scikit-learn's ``_loss``; the exponentials and the gradient are computed
in the input dtype. Kernels never allocate (beyond numba's parallel scheduling) and never
validate: ``_api.py`` checks the inputs, casts them, allocates every output, and hands
the kernel plain arrays. Labels are checked by ``label_stats`` before any kernel writes,
so a bad label never leaves ``out=`` half written.

Where there is no gradient to write (loss only), pass ``write_grad=False`` and a
``(1, C)`` array of the right dtype as ``grad`` (it is not touched).
"""

from __future__ import annotations

import functools
import math
import os
import threading

import numba
import numpy as np
from numba import prange, types
from numba.extending import overload

from ._jit import EXP_FASTMATH, FASTMATH, exact_helper, helper, kernel, two_to_the_rounded

# --- the vectorisable exponential ---------------------------------------------------
# exp(t) for t <= 0 (and -inf, NaN), as 2**k * exp(r): k = rint(t / ln 2), r = t - k ln 2
# in two parts (Cody-Waite, so r is exact to the last bit), exp(r) by its Taylor
# polynomial on |r| <= ln2 / 2 (truncation < 0.1 ulp), 2**k built in the exponent field.
# Below the smallest normal (t < LO) the result is 0: against s >= 1 such terms do not
# count, and exp(-inf) = 0 exactly. NaN propagates through r. Max error: < 1 ulp
# (tests/test_exp.py).

_F32 = np.float32
_EXP32_LOG2E = _F32(1.4426950408889634)
_EXP32_LN2_HI = _F32(0.693359375)
_EXP32_LN2_LO = _F32(-2.12194440e-4)
_EXP32_ROUND = _F32(12582912.0)  # 1.5 * 2**23: v + this rounds v to an integer
_EXP32_LO = _F32(-87.0)  # 2**-126 is the smallest normal float32
_EXP32_TAYLOR = tuple(_F32(1.0 / math.factorial(j)) for j in range(7, -1, -1))

_EXP64_LOG2E = 1.4426950408889634
_EXP64_LN2_HI = 6.93145751953125e-1
_EXP64_LN2_LO = 1.42860682030941723212e-6
_EXP64_ROUND = 6755399441055744.0  # 1.5 * 2**52
_EXP64_LO = -708.0  # 2**-1022 is the smallest normal float64
_EXP64_TAYLOR = tuple(1.0 / math.factorial(j) for j in range(13, -1, -1))


def fast_exp(t):
    """``exp(t)`` for ``t <= 0``, vectorisable; typed by ``t`` (float32 or float64)."""
    return math.exp(t)


@overload(fast_exp, jit_options={"fastmath": set(EXP_FASTMATH)})
def _fast_exp_overload(t):
    if t == types.float32:
        c7, c6, c5, c4, c3, c2, c1, c0 = _EXP32_TAYLOR

        def exp32(t):
            tc = t if t >= _EXP32_LO else _EXP32_LO  # NaN -> LO here; t carries the NaN on
            v = tc * _EXP32_LOG2E + _EXP32_ROUND
            k = v - _EXP32_ROUND
            r = (t - k * _EXP32_LN2_HI) - k * _EXP32_LN2_LO
            p = c7
            p = p * r + c6
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
        (c13, c12, c11, c10, c9, c8, c7, c6, c5, c4, c3, c2, c1, c0) = _EXP64_TAYLOR

        def exp64(t):
            tc = t if t >= _EXP64_LO else _EXP64_LO
            v = tc * _EXP64_LOG2E + _EXP64_ROUND
            k = v - _EXP64_ROUND
            r = (t - k * _EXP64_LN2_HI) - k * _EXP64_LN2_LO
            p = c13
            p = p * r + c12
            p = p * r + c11
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


@numba.njit(cache=True)
def exp_array(t, out):
    """``out[j] = fast_exp(t[j])``: the exponential alone, for its accuracy test."""
    for j in range(t.shape[0]):
        out[j] = fast_exp(t[j])


# --- per-row steps -------------------------------------------------------------------


@helper
def _greater(a, b):
    return b if b > a else a


@helper
def row_max(row):
    """Step (1): ``max_c row_c``. NaN is ignored here; it reaches the result through
    ``exp`` in step (2). Short rows take a plain loop; long rows the 16-lane version."""
    if row.shape[0] >= 64:
        return _row_max_16_lanes(row)
    return _row_max_short(row)


@helper
def _row_max_short(row):
    """``max_c row_c`` by a plain loop, for short rows."""
    m = row[0]
    for c in range(1, row.shape[0]):
        m = _greater(m, row[c])
    return m


@numba.njit(cache=True, nogil=True, fastmath=set(FASTMATH))
def _row_max_16_lanes(row):
    """``max_c row_c`` for long rows. A plain ``if v > m`` loop is a serial dependency
    chain that LLVM will not vectorise without ``nnan``; 16 independent lanes, combined at
    the end, vectorise into one AVX-512 compare-and-blend per 16 floats. Not inlined by
    numba (LLVM still may): it is a large body, and inlining it into every kernel tripled
    their compile time for no measurable gain."""
    n_classes = row.shape[0]
    m = row[0]
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = m
    m8 = m9 = m10 = m11 = m12 = m13 = m14 = m15 = m
    blocked = n_classes - n_classes % 16
    for c in range(0, blocked, 16):
        m0 = _greater(m0, row[c])
        m1 = _greater(m1, row[c + 1])
        m2 = _greater(m2, row[c + 2])
        m3 = _greater(m3, row[c + 3])
        m4 = _greater(m4, row[c + 4])
        m5 = _greater(m5, row[c + 5])
        m6 = _greater(m6, row[c + 6])
        m7 = _greater(m7, row[c + 7])
        m8 = _greater(m8, row[c + 8])
        m9 = _greater(m9, row[c + 9])
        m10 = _greater(m10, row[c + 10])
        m11 = _greater(m11, row[c + 11])
        m12 = _greater(m12, row[c + 12])
        m13 = _greater(m13, row[c + 13])
        m14 = _greater(m14, row[c + 14])
        m15 = _greater(m15, row[c + 15])
    for c in range(blocked, n_classes):
        m0 = _greater(m0, row[c])
    m0 = _greater(_greater(_greater(m0, m1), _greater(m2, m3)), _greater(_greater(m4, m5), _greater(m6, m7)))
    m8 = _greater(_greater(_greater(m8, m9), _greater(m10, m11)), _greater(_greater(m12, m13), _greater(m14, m15)))
    return _greater(m0, m8)


@helper
def row_sum_exp(row, m, e_out, write_e):
    """Step (2): ``s = sum_c exp(row_c - m)``; the terms go to ``e_out`` when ``write_e``."""
    s = 0.0
    if write_e:
        for c in range(row.shape[0]):
            e = fast_exp(row[c] - m)
            e_out[c] = e
            s += e
    else:
        for c in range(row.shape[0]):
            s += fast_exp(row[c] - m)
    return s


@helper
def row_sum_exp_smooth(row, m, weight, weighted, e_out, write_e):
    """Step (2) with label smoothing: ``s`` and ``sw = sum_c w_c (m - row_c)``."""
    s = 0.0
    sw = 0.0
    for c in range(row.shape[0]):
        z = row[c]
        e = fast_exp(z - m)
        if write_e:
            e_out[c] = e
        s += e
        if weighted:
            sw += weight[c] * (m - z)
        else:
            sw += m - z
    return s, sw


@helper
def row_sum_exp_target(row, m, t, weight, weighted, eps, e_out, write_e):
    """Step (2) for probability targets: ``s``, ``A = sum_c w_c t'_c`` and
    ``B = sum_c w_c t'_c (m - row_c)`` with ``t'_c = (1-eps) t_c + eps/C``. ``t'`` is
    formed in float64, as in step (4), so that A and the gradient use the same t'."""
    n_classes = row.shape[0]
    keep = 1.0 - eps
    spread = eps / n_classes
    s = 0.0
    a = 0.0
    b = 0.0
    for c in range(n_classes):
        z = row[c]
        e = fast_exp(z - m)
        if write_e:
            e_out[c] = e
        s += e
        wt = keep * np.float64(t[c]) + spread
        if weighted:
            wt = np.float64(weight[c]) * wt
        a += wt
        b += wt * (m - z)
    return s, a, b


# --- the kernels ---------------------------------------------------------------------


@helper
def _index_row(i, x, y, weight, weighted, weight_total, ignore_index, eps, grad_scale, loss, grad, write_grad):
    """Steps (1)-(4) for row i with a class-index target. The kernels pass ``write_grad``
    as a literal, so after inlining each copy of the loop is free of its branches."""
    yi = y[i]
    if yi == ignore_index:  # ignored rows: loss 0, gradient 0, y_i never read
        loss[i] = 0.0
        if write_grad:
            grad[i, :] = 0
        return
    row = x[i]
    g = grad[i] if write_grad else grad[0]  # loss only: grad is a (1, C) dummy, never written
    m = row_max(row)  # (1)
    # m - x_y is exact in float64; read x_y before step (2) may overwrite the row (out=x).
    # np.float64, not float(): numba's float() of a float32 stays float32.
    m_minus_x_y = np.float64(m) - np.float64(row[yi])
    if eps > 0:  # (2)
        s, sw = row_sum_exp_smooth(row, m, weight, weighted, g, write_grad)
    else:
        s = row_sum_exp(row, m, g, write_grad)
        sw = 0.0
    _index_loss_and_grad(
        i, yi, m_minus_x_y, s, sw, g, weight, weighted, weight_total, eps, grad_scale, loss, write_grad
    )


@exact_helper
def _index_row_loss(m_minus_x_y, log_s, sw, w_y, eps, n_classes, weight_total):
    """Step (3): ``(1-eps) w_y (lse - x_y) + eps/C (sw + W log s)``, rounded as written."""
    # lse - x_y summed as (m - x_y) + log s: no rounding of m + log s (which would cost the
    # small losses of confident rows their digits)
    row_loss = (1.0 - eps) * w_y * (m_minus_x_y + log_s)
    if eps > 0:
        row_loss += eps / n_classes * (sw + weight_total * log_s)
    return row_loss


@helper
def _index_loss_and_grad(
    i, yi, m_minus_x_y, s, sw, g, weight, weighted, weight_total, eps, grad_scale, loss, write_grad
):
    """Steps (3)-(4) for row i, whose ``g`` holds ``e_c = exp(x_c - m)`` (when write_grad)."""
    n_classes = g.shape[0]
    keep = 1.0 - eps
    spread = eps / n_classes
    w_y = weight[yi] if weighted else 1.0
    log_s = math.log(s)  # (3)
    loss[i] = _index_row_loss(m_minus_x_y, log_s, sw, np.float64(w_y), eps, n_classes, weight_total)
    if write_grad:  # (4)
        # without smoothing W must not enter at all: 0 * W is NaN when a weight of a class
        # no row uses is inf or NaN (PyTorch never reads such weights either)
        smoothing = spread * weight_total if eps > 0 else 0.0
        a = g.dtype.type(grad_scale * (keep * w_y + smoothing) / s)
        if eps > 0:
            b = g.dtype.type(grad_scale * spread)
            if weighted:
                for c in range(n_classes):
                    g[c] = g[c] * a - b * weight[c]
            else:
                for c in range(n_classes):
                    g[c] = g[c] * a - b
        else:
            for c in range(n_classes):
                g[c] = g[c] * a
        g[yi] -= g.dtype.type(grad_scale * keep * w_y)


# Few classes (C <= SMALL_C): a row's loop of C exps is too short to fill a vector, and
# per-row costs dominate. The kernels then take BLOCK_ELEMENTS // C rows at a time:
# (1) per row, m = max_c x_c and the shifted logits x_c - m, written to the block's
# scratch (the gradient rows, or a small buffer for loss only); (2) ONE flat loop of exp
# over the whole block, which vectorises; (3)-(4) per row, as in the row kernel. Every
# term is rounded as in the row kernel: the gradient is bitwise the same, measured 1.4-1.9x
# faster at C = 10 (float32 and float64, 2 threads).
SMALL_C = 16
BLOCK_ELEMENTS = 4096


def rows_per_block(n_classes: int) -> int:
    return max(1, BLOCK_ELEMENTS // max(n_classes, 1))


@helper
def _index_block(r0, r1, x, y, weight, weighted, weight_total, ignore_index, eps, grad_scale, loss, block, write_grad):
    """Steps (1)-(4) for rows r0..r1-1 with class-index targets; ``block`` is their
    (r1 - r0) * C flat scratch: the gradient rows themselves when ``write_grad``."""
    n_classes = x.shape[1]
    rows = r1 - r0
    sw_rows = np.zeros(rows)  # the smoothing sums, from step (1) to step (3)
    for k in range(rows):  # (1), and the shift of step (2)
        i = r0 + k
        yi = y[i]
        e = block[k * n_classes : (k + 1) * n_classes]
        if yi == ignore_index:
            e[:] = -np.inf  # exp gives the ignored row's gradient: 0
            continue
        row = x[i]
        # not row_max: the mere presence of its (untaken) call to the 16-lane version made
        # this loop over the block's rows 1.7x slower (measured at C = 10)
        m = _row_max_short(row)
        loss[i] = np.float64(m) - np.float64(row[yi])  # m - x_y until step (3)
        if eps > 0:
            # a loop of its own, without a store: the same summation order in all three
            # modes (next to a store into the row itself, in place, LLVM picks another)
            sw = 0.0
            for c in range(n_classes):
                if weighted:
                    sw += weight[c] * (m - row[c])
                else:
                    sw += m - row[c]
            sw_rows[k] = sw
        for c in range(n_classes):
            e[c] = row[c] - m
    flat = block[: rows * n_classes]
    for j in range(flat.shape[0]):  # (2): e = exp(x - m), the block at once
        flat[j] = fast_exp(flat[j])
    for k in range(rows):  # (3)-(4)
        i = r0 + k
        yi = y[i]
        if yi == ignore_index:
            loss[i] = 0.0
            continue
        e = block[k * n_classes : (k + 1) * n_classes]
        s = 0.0
        for c in range(n_classes):
            s += e[c]
        _index_loss_and_grad(
            i, yi, loss[i], s, sw_rows[k], e, weight, weighted, weight_total, eps, grad_scale, loss, write_grad
        )


# Three kernels per target kind, loss only / loss+grad / in place, each with one prange
# loop: a call compiles only the one it needs (the first call of a fresh install pays
# one loop's compile, not three).


@kernel
def _xent_index_loss_kernel(x, y, weight, weighted, weight_total, ignore_index, eps, loss, dummy):
    for i in prange(x.shape[0]):
        _index_row(i, x, y, weight, weighted, weight_total, ignore_index, eps, 1.0, loss, dummy, False)


@kernel
def _xent_index_grad_kernel(x, y, weight, weighted, weight_total, ignore_index, eps, grad_scale, loss, grad):
    for i in prange(x.shape[0]):
        _index_row(i, x, y, weight, weighted, weight_total, ignore_index, eps, grad_scale, loss, grad, True)


@kernel
def _xent_index_in_place_kernel(x, y, weight, weighted, weight_total, ignore_index, eps, grad_scale, loss):
    for i in prange(x.shape[0]):
        _index_row(i, x, y, weight, weighted, weight_total, ignore_index, eps, grad_scale, loss, x, True)


@kernel
def _xent_index_small_loss_kernel(x, y, weight, weighted, weight_total, ignore_index, eps, loss, block_rows):
    n, n_classes = x.shape
    for b in prange((n + block_rows - 1) // block_rows):
        r0 = b * block_rows
        scratch = np.empty(block_rows * n_classes, x.dtype)
        r1 = min(n, r0 + block_rows)
        _index_block(r0, r1, x, y, weight, weighted, weight_total, ignore_index, eps, 1.0, loss, scratch, False)


@kernel
def _xent_index_small_grad_kernel(
    x, y, weight, weighted, weight_total, ignore_index, eps, grad_scale, loss, grad, block_rows
):
    n, n_classes = x.shape
    flat = grad.reshape(n * n_classes)
    for b in prange((n + block_rows - 1) // block_rows):
        r0 = b * block_rows
        r1 = min(n, r0 + block_rows)
        block = flat[r0 * n_classes : r1 * n_classes]
        _index_block(r0, r1, x, y, weight, weighted, weight_total, ignore_index, eps, grad_scale, loss, block, True)


@kernel
def _xent_index_small_in_place_kernel(
    x, y, weight, weighted, weight_total, ignore_index, eps, grad_scale, loss, block_rows
):
    n, n_classes = x.shape
    flat = x.reshape(n * n_classes)
    for b in prange((n + block_rows - 1) // block_rows):
        r0 = b * block_rows
        r1 = min(n, r0 + block_rows)
        block = flat[r0 * n_classes : r1 * n_classes]
        _index_block(r0, r1, x, y, weight, weighted, weight_total, ignore_index, eps, grad_scale, loss, block, True)


@helper
def _probability_row(i, x, t, weight, weighted, eps, grad_scale, loss, grad, write_grad):
    """Steps (1)-(4) for row i with a probability target (``write_grad`` a literal)."""
    n_classes = x.shape[1]
    row = x[i]
    ti = t[i]
    g = grad[i] if write_grad else grad[0]
    m = row_max(row)  # (1)
    s, a, b = row_sum_exp_target(row, m, ti, weight, weighted, eps, g, write_grad)  # (2)
    loss[i] = b + a * math.log(s)  # (3)
    if write_grad:  # (4), in float64: unnormalised targets make p_c A and w_c t'_c large
        # and nearly equal, and their difference would keep only float32's absolute error
        scale_a = grad_scale * a / s
        keep = 1.0 - eps
        spread = eps / n_classes
        if weighted:
            for c in range(n_classes):
                g[c] = np.float64(g[c]) * scale_a - grad_scale * (weight[c] * (keep * np.float64(ti[c]) + spread))
        else:
            for c in range(n_classes):
                g[c] = np.float64(g[c]) * scale_a - grad_scale * (keep * np.float64(ti[c]) + spread)


@kernel
def _xent_probability_loss_kernel(x, t, weight, weighted, eps, loss, dummy):
    for i in prange(x.shape[0]):
        _probability_row(i, x, t, weight, weighted, eps, 1.0, loss, dummy, False)


@kernel
def _xent_probability_grad_kernel(x, t, weight, weighted, eps, grad_scale, loss, grad):
    for i in prange(x.shape[0]):
        _probability_row(i, x, t, weight, weighted, eps, grad_scale, loss, grad, True)


@kernel
def _xent_probability_in_place_kernel(x, t, weight, weighted, eps, grad_scale, loss):
    for i in prange(x.shape[0]):
        _probability_row(i, x, t, weight, weighted, eps, grad_scale, loss, x, True)


@kernel
def _logsumexp_kernel(x, out):
    """``out_i = m + log(sum_c exp(x_ic - m))``, steps (1)-(3); out (n,) of x's dtype."""
    for i in prange(x.shape[0]):
        row = x[i]
        m = row_max(row)
        if math.isinf(m):  # as torch: all -inf -> log 0 = -inf; a +inf -> +inf (not inf - inf)
            out[i] = math.log(_sum_exp_unshifted(row))
        else:
            out[i] = m + math.log(row_sum_exp(row, m, row, False))


@numba.njit(cache=True, nogil=True)
def _sum_exp_unshifted(row):
    """``sum_c exp(row_c)`` with libm's exp: the rare rows whose max is infinite."""
    s = 0.0
    for c in range(row.shape[0]):
        s += math.exp(row[c])
    return s


@helper
def _log_softmax_row(row, o):
    """``o_c = (row_c - m) - log(s)``: steps (1)-(3), then one write per element."""
    m = row_max(row)
    log_s = o.dtype.type(math.log(row_sum_exp(row, m, row, False)))
    for c in range(row.shape[0]):
        o[c] = (row[c] - m) - log_s


@helper
def _softmax_row(row, o):
    """``o_c = exp(row_c - m) / s``: steps (1)-(2) write e into o, then scale by 1/s."""
    m = row_max(row)
    s = row_sum_exp(row, m, o, True)
    inv_s = o.dtype.type(1.0 / s)
    for c in range(row.shape[0]):
        o[c] = o[c] * inv_s


@kernel
def _log_softmax_kernel(x, out):
    for i in prange(x.shape[0]):
        _log_softmax_row(x[i], out[i])


@kernel
def _log_softmax_in_place_kernel(x):
    for i in prange(x.shape[0]):
        _log_softmax_row(x[i], x[i])


@kernel
def _softmax_kernel(x, out):
    for i in prange(x.shape[0]):
        _softmax_row(x[i], out[i])


@kernel
def _softmax_in_place_kernel(x):
    for i in prange(x.shape[0]):
        _softmax_row(x[i], x[i])


# --- the backend interface (see _numpy_backend.py) -----------------------------------
# In place (``grad is x``), the kernel must see ONE array: given two arguments that alias,
# LLVM's runtime overlap check fails and every row runs the scalar loop (4x slower).
#
# Rows are handed to the threads in chunks of about _CHUNK_ELEMENTS logits, dynamically:
# numba's default splits the rows into one static block per thread, so a thread whose
# core is busy with another process holds everyone up (2 threads slower than 1).
_CHUNK_ELEMENTS = 1 << 15

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


def _run(kernel_function, elements_per_iteration, *args):
    """Run a kernel whose prange iterations each cover ``elements_per_iteration`` logits
    (C for the row kernels), in chunks of about _CHUNK_ELEMENTS logits."""
    if _thread_safe():
        _run_chunked(kernel_function, elements_per_iteration, args)
    else:  # workqueue, or not launched yet: the chunk size too is set under the lock
        with _SERIAL_LOCK:
            _run_chunked(kernel_function, elements_per_iteration, args)


def _run_chunked(kernel_function, elements_per_iteration, args):
    previous = _set_chunksize(max(1, _CHUNK_ELEMENTS // max(elements_per_iteration, 1)))  # launches the layer
    try:
        kernel_function(*args)
    finally:
        _set_chunksize(previous)


# The kernels take ``weight`` as a real (C,) array and ``weighted`` saying whether to use
# it, never a length-0 stand-in. A loop that writes the gradient row while it reads
# ``weight[c]`` (in the branch it may take) is vectorised by LLVM behind a runtime check
# that the arrays do not overlap. For a length-0 array that check depends on where malloc
# happened to put it: when it failed, the row ran the scalar loop, which sums ``s`` in
# another order, and the gradient changed in its last bits from call to call (concurrent
# calls differed from serial ones by up to 178 ulp after cancellation). A real (C,) array
# never overlaps the gradient, so every row takes the vector loop.
@functools.lru_cache(maxsize=16)
def _unit_weight(n_classes: int, dtype: np.dtype) -> np.ndarray:
    ones = np.ones(n_classes, dtype)
    ones.flags.writeable = False
    return ones


def _kernel_weight(weight, x):
    """(weight, weighted): the caller's weight, or for none ones that are never read."""
    if weight.shape[0] != 0:
        return weight, True
    return _unit_weight(x.shape[1], x.dtype), False


def xent_index(x, y, weight, weight_total, ignore_index, eps, grad_scale, loss, grad, write_grad):
    """Cross-entropy rows for class-index targets (see the module docstring).

    x (n, C) float; y (n,) int, every non-ignored value in [0, C) (checked by the caller);
    weight (C,) of x's dtype or length 0 for none; weight_total = sum(weight) (C without);
    loss (n,) float64 out: per-row losses; grad (n, C) out, scaled by grad_scale; grad may
    be x itself (the gradient overwrites the logits).
    """
    n_classes = x.shape[1]
    weight, weighted = _kernel_weight(weight, x)
    rows = (x, y, weight, weighted, weight_total, ignore_index, eps)
    if n_classes <= SMALL_C:  # blocks of rows (see _index_block)
        block_rows = rows_per_block(n_classes)
        elements = block_rows * n_classes  # per prange iteration
        if not write_grad:
            _run(_xent_index_small_loss_kernel, elements, *rows, loss, block_rows)
        elif grad is x:
            _run(_xent_index_small_in_place_kernel, elements, *rows, grad_scale, loss, block_rows)
        else:
            _run(_xent_index_small_grad_kernel, elements, *rows, grad_scale, loss, grad, block_rows)
    elif not write_grad:  # grad is a (1, C) dummy
        _run(_xent_index_loss_kernel, n_classes, *rows, loss, grad)
    elif grad is x:
        _run(_xent_index_in_place_kernel, n_classes, *rows, grad_scale, loss)
    else:
        _run(_xent_index_grad_kernel, n_classes, *rows, grad_scale, loss, grad)


def xent_probability(x, t, weight, eps, grad_scale, loss, grad, write_grad):
    """Cross-entropy rows for probability targets t (n, C) of x's dtype (see the module
    docstring). weight (C,) or length 0; loss (n,) float64 out; grad (n, C) out or x."""
    weight, weighted = _kernel_weight(weight, x)
    if not write_grad:
        _run(_xent_probability_loss_kernel, x.shape[1], x, t, weight, weighted, eps, loss, grad)
    elif grad is x:
        _run(_xent_probability_in_place_kernel, x.shape[1], x, t, weight, weighted, eps, grad_scale, loss)
    else:
        _run(_xent_probability_grad_kernel, x.shape[1], x, t, weight, weighted, eps, grad_scale, loss, grad)


def logsumexp_rows(x, out):
    """``out_i = m + log(sum_c exp(x_ic - m))``, steps (1)-(3); out (n,) of x's dtype."""
    _run(_logsumexp_kernel, x.shape[1], x, out)


def log_softmax_rows(x, out):
    """``out_ic = (x_ic - m) - log(s)``; out may be x itself."""
    if out is x:
        _run(_log_softmax_in_place_kernel, x.shape[1], x)
    else:
        _run(_log_softmax_kernel, x.shape[1], x, out)


def softmax_rows(x, out):
    """``out_ic = exp(x_ic - m) / s``; out may be x itself."""
    if out is x:
        _run(_softmax_in_place_kernel, x.shape[1], x)
    else:
        _run(_softmax_kernel, x.shape[1], x, out)


@helper
def label_stats(y, n_classes, ignore_index, weight):
    """Checks labels before any kernel runs and sums the "mean" denominator.

    Returns ``(first_bad, total)``: the first row whose label is neither ignore_index nor
    in [0, n_classes) (-1 if none), and ``D = sum_i [y_i != ignore_index] w[y_i]`` in
    float64 (the count of kept rows when weight has length 0), summed in row order.
    """
    has_weight = weight.shape[0] != 0
    total = 0.0
    for i in range(y.shape[0]):
        yi = y[i]
        if yi == ignore_index:
            continue
        if yi < 0 or yi >= n_classes:
            return i, total
        total += weight[yi] if has_weight else 1.0
    return -1, total


if numba.config.DISABLE_JIT:  # NUMBA_DISABLE_JIT=1 (the coverage run): the kernels run as Python
    # Compiled, ``math.log(0.0)`` is -inf and ``math.exp(1000.0)`` is inf (C semantics);
    # Python's ``math`` raises instead. The kernels look ``math`` up at call time, so give
    # them a module with the compiled semantics, from NumPy.
    import types as _types

    def _ieee_log(v):
        with np.errstate(divide="ignore", invalid="ignore"):
            return float(np.log(np.float64(v)))

    def _ieee_exp(v):
        with np.errstate(over="ignore"):
            return float(np.exp(np.float64(v)))

    math = _types.SimpleNamespace(log=_ieee_log, exp=_ieee_exp, isinf=math.isinf, factorial=math.factorial)  # noqa: F811
