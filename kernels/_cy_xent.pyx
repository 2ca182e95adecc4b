# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
# cython: cdivision=True
"""The Cython + OpenMP backend: the same steps, in the same words, as
``fastxent/_numba_kernels.py`` and ``fastxent/_reference.py``.

Every kernel takes a C-contiguous 2-D ``x`` of shape ``(n, C)``; OpenMP ``prange`` hands
out blocks of rows (``_rows_per_block``: about 32k logits each) dynamically, one block
at a time, so long and short rows balance across threads. Per row:

  (1) ``m = max_c x_c``                                 (32 independent lanes, vectorised)
  (2) ``e_c = exp(x_c - m)`` written into the gradient row as scratch, ``s = sum_c e_c``;
      the smoothing sum ``sw = sum_c w_c (m - x_c)`` (index targets) or the target sums
      ``A = sum_c w_c t'_c``, ``B = sum_c w_c t'_c (m - x_c)`` (probability targets) in
      the same loop
  (3) ``lse = m + log(s)``; index targets: ``loss = (1-eps) w_y (lse - x_y)
      + eps/C (sw + W log s)``; probability targets: ``loss = B + A log s``
  (4) ``grad_c = e_c / s * a - b_c``, scaled by ``grad_scale`` (1/D for "mean"):
      index targets ``a = (1-eps) w_y + eps W / C``, ``b_c = eps/C w_c``, then
      ``grad_y -= (1-eps) w_y``; probability targets ``a = A``, ``b_c = w_c t'_c``.

``sum_c w_c (lse - x_c)`` is written ``sw + W log s`` so that it is a sum of
non-negative terms, without the cancellation of ``W lse - sum_c w_c x_c``.

Accumulators (``s``, ``sw``, ``A``, ``B``) and the per-row loss are float64 for both
dtypes; the exponentials and the gradient are computed in the input dtype, as in the
numba kernels. The row sums of step (2) are kept in 16 float64 lanes (element ``c`` goes
to lane ``c % 16``) that are added in a fixed pairwise order at the end: gcc may not
reassociate a float sum (no ``-ffast-math`` here: it would also fold the exponential's
rounding trick and drop inf/NaN semantics), but it vectorises these explicit lanes, and
the result is the same on every ISA and for every thread count. The numba kernels let
LLVM reassociate instead, so the two backends' sums differ in their last float64 bits
(see tests/test_cython.py for the bound this leaves on the results).

Kernels never allocate and never validate: ``_api.py`` checks the inputs, allocates the
outputs and passes plain C-contiguous arrays (inputs read-only, hence the ``const``
memoryviews). ``grad`` (or ``out``) may be ``x`` itself: every element is read before
it is written. Without a gradient (``write_grad=False``), ``grad`` is a ``(1, C)``
dummy that is never written.

The exponential
---------------
``exp(t)`` for ``t <= 0`` (and -inf, NaN), as ``2**k * exp(r)``: ``k = rint(t / ln 2)``
by the ``(v + 1.5 * 2**p) - 1.5 * 2**p`` rounding trick, ``r = t - k ln 2`` in two parts
(Cody-Waite), ``exp(r)`` by its Taylor polynomial (degree 7 float32, 13 float64), and
``2**k`` built in the exponent bits of ``v`` (a ``memcpy`` bit cast, which gcc turns into
a register move). Below the smallest normal (``t < LO``) the result is 0; NaN propagates
through ``r``. Plain arithmetic and selects only, no libm call, so gcc vectorises it.
Checked with ``-fopt-info-vec-optimized`` (gcc 12, ``-O3 -fno-trapping-math``): every
step-(2) lane loop (the loops that call it), the row-max lanes and the step-(4) loops
are "vectorized using 64 byte vectors" in the x86-64-v4 clone, 32 in x86-64-v3 and 16
in the baseline; without ``-fno-trapping-math`` gcc will not if-convert the selects and
vectorises none of them. In the v3/v4 clones gcc fuses the same multiply-adds as LLVM
does in the numba version, and the two exponentials agree bit for bit
(tests/test_cython.py). Measured (4 shapes, float32 loss+grad): the multiversioned build
runs at 0.9-1.1x the numba kernels' time, the baseline SSE2 code alone at 2.1-3.2x.
"""

from cython.parallel cimport prange
from libc.math cimport INFINITY, exp, isinf, log
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset


cdef extern from "_cy_xent_simd.h" nogil:
    # "FX_HOT void": the return type that carries __attribute__((target_clones(...)))
    ctypedef void fx_hot_void "FX_HOT void"
    bint FX_OPENMP
    bint FX_MULTIVERSIONED
    int fx_get_max_threads()
    void fx_set_num_threads(int n)
    const char *fx_simd_level()


ctypedef fused floating:
    float
    double

ctypedef fused label_t:
    int32_t
    int64_t

cdef enum:
    LANES = 16  # independent partial sums per row in step (2) (one AVX-512 float32 vector)
    MAX_LANES = 32  # independent partial maxima per row in step (1) (see _row_max)
    BLOCK_ELEMENTS = 32768  # work per OpenMP chunk: whole rows, about this many logits (as numba)


# --- the vectorisable exponential ---------------------------------------------------


cdef inline float _exp32(float t) noexcept nogil:
    """``exp(t)`` for float32 ``t <= 0``; see the module docstring."""
    # no clamp of t to [LO, 0] as in the numba version: below LO the select at the end
    # returns 0 anyway, and given a clamp gcc specialises the reduction on the constant and
    # then cannot fuse it into FMAs as LLVM does (so the two would round differently)
    cdef float v = t * <float>1.4426950408889634 + <float>12582912.0  # 1.5 * 2**23
    cdef float k = v - <float>12582912.0
    cdef float r = (t - k * <float>0.693359375) - k * <float>-2.12194440e-4
    cdef float p = <float>(1.0 / 5040.0)
    cdef uint32_t bits
    cdef float two_k, result
    p = p * r + <float>(1.0 / 720.0)
    p = p * r + <float>(1.0 / 120.0)
    p = p * r + <float>(1.0 / 24.0)
    p = p * r + <float>(1.0 / 6.0)
    p = p * r + <float>(1.0 / 2.0)
    p = p * r + <float>1.0
    p = p * r + <float>1.0
    memcpy(&bits, &v, 4)  # v = k + 1.5 * 2**23: k sits in the low mantissa bits
    bits = (bits - <uint32_t>0x4B400000u + <uint32_t>127u) << 23
    memcpy(&two_k, &bits, 4)
    result = p * two_k  # computed unconditionally so that the return is a select
    return <float>0.0 if t < <float>-87.0 else result  # 2**-126 is the smallest normal


cdef inline double _exp64(double t) noexcept nogil:
    """``exp(t)`` for float64 ``t <= 0``; see the module docstring."""
    cdef double v = t * 1.4426950408889634 + 6755399441055744.0  # 1.5 * 2**52 (no clamp: see _exp32)
    cdef double k = v - 6755399441055744.0
    cdef double r = (t - k * 6.93145751953125e-1) - k * 1.42860682030941723212e-6
    cdef double p = 1.0 / 6227020800.0  # 1 / 13!
    cdef uint64_t bits
    cdef double two_k, result
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 1.0 / 2.0
    p = p * r + 1.0
    p = p * r + 1.0
    memcpy(&bits, &v, 8)
    bits = (bits - <uint64_t>0x4338000000000000u + <uint64_t>1023u) << 52
    memcpy(&two_k, &bits, 8)
    result = p * two_k
    return 0.0 if t < -708.0 else result  # 2**-1022 is the smallest normal


cdef inline floating _fast_exp(floating t) noexcept nogil:
    if floating is float:
        return _exp32(t)
    else:
        return _exp64(t)


# --- per-row steps -------------------------------------------------------------------


cdef inline floating _greater(floating a, floating b) noexcept nogil:
    return b if b > a else a


cdef inline floating _row_max(const floating *row, Py_ssize_t n_classes) noexcept nogil:
    """Step (1): ``m = max_c row_c``. NaN is ignored here; it reaches the result through
    ``exp`` in step (2). Short rows take a plain loop, as in the numba kernel; long rows
    32 independent lanes (element c in lane c % 32) combined pairwise at the end. The
    numba kernel uses 16 lanes, but gcc completely unrolls a 16-iteration inner loop and
    then leaves it scalar (it cannot vectorise a float max reduction without
    -ffinite-math-only); 32 iterations are not unrolled and vectorise into vmaxps. The
    max is exact, so the layout cannot change ``m``; it can only change which of two
    equal zeros (+0, -0) or which NaN is kept, and neither reaches a result: exp(z - m)
    and the sums are the same for either zero, and a NaN anywhere makes the row NaN."""
    cdef floating m = row[0]
    cdef floating lanes[MAX_LANES]
    cdef Py_ssize_t c, j
    cdef Py_ssize_t blocked = n_classes - n_classes % MAX_LANES
    if n_classes < 64:
        for c in range(1, n_classes):
            m = _greater(m, row[c])
        return m
    for j in range(MAX_LANES):
        lanes[j] = m
    for c in range(0, blocked, 32):  # MAX_LANES
        for j in range(MAX_LANES):
            lanes[j] = _greater(lanes[j], row[c + j])
    for c in range(blocked, n_classes):
        lanes[0] = _greater(lanes[0], row[c])
    for j in range(16):  # lane j + 16 onto lane j, then j + 8, j + 4, j + 2, j + 1
        lanes[j] = _greater(lanes[j], lanes[j + 16])
    for j in range(8):
        lanes[j] = _greater(lanes[j], lanes[j + 8])
    for j in range(4):
        lanes[j] = _greater(lanes[j], lanes[j + 4])
    for j in range(2):
        lanes[j] = _greater(lanes[j], lanes[j + 2])
    return _greater(lanes[0], lanes[1])


cdef inline void _zero_lanes(double *lanes) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(LANES):
        lanes[j] = 0.0


cdef inline double _lane_sum(double *lanes) noexcept nogil:
    """``sum_j lanes[j]`` in a fixed pairwise order: lane j + 8 onto lane j, then j + 4,
    j + 2, j + 1 (overwrites the lanes). Constant trip counts: gcc unrolls these into
    straight-line register code (a loop over a variable width stalled on store forwarding)."""
    cdef Py_ssize_t j
    for j in range(8):
        lanes[j] = lanes[j] + lanes[j + 8]
    for j in range(4):
        lanes[j] = lanes[j] + lanes[j + 4]
    for j in range(2):
        lanes[j] = lanes[j] + lanes[j + 2]
    return lanes[0] + lanes[1]


cdef inline void _exp_lanes(const floating *row, floating m, floating *e_out, Py_ssize_t count,
                            bint write_e, double *s_lanes) noexcept nogil:
    """Step (2) on ``count <= LANES`` elements: ``e_j = exp(row_j - m)``, ``s_lanes[j] += e_j``.
    Inlined with ``count = LANES`` for whole blocks of the row and with the tail length for
    the rest, so element c goes to lane c % 16. The loop always runs LANES iterations
    (one vector): past ``count`` the row reads as -inf, whose exp adds an exact 0 to its
    lane. So the tail is one masked load and store, and the lanes see only full-width
    unmasked adds; a scalar or masked store to a lane that the lane sum reloads at once
    stalls store forwarding (it made rows of 10 classes 1.7x slower)."""
    cdef Py_ssize_t j
    cdef floating z, e
    for j in range(LANES):
        z = row[j] if j < count else <floating>-INFINITY
        e = _fast_exp(z - m)
        if write_e and j < count:
            e_out[j] = e
        s_lanes[j] += e


cdef inline double _row_sum_exp(const floating *row, floating m, floating *e_out,
                                Py_ssize_t n_classes, bint write_e) noexcept nogil:
    """Step (2): ``s = sum_c exp(row_c - m)``; the terms go to ``e_out`` when ``write_e``
    (a constant at every call, so each inlined copy has one loop without the branch)."""
    cdef double s_lanes[LANES]
    cdef Py_ssize_t c
    cdef Py_ssize_t blocked = n_classes - n_classes % LANES
    _zero_lanes(s_lanes)
    for c in range(0, blocked, 16):  # LANES
        _exp_lanes(row + c, m, e_out + c, LANES, write_e, s_lanes)
    _exp_lanes(row + blocked, m, e_out + blocked, n_classes - blocked, write_e, s_lanes)
    return _lane_sum(s_lanes)


cdef inline void _exp_smooth_lanes(const floating *row, floating m, const floating *weight,
                                   floating *e_out, Py_ssize_t count, bint write_e,
                                   double *s_lanes, double *sw_lanes) noexcept nogil:
    """``_exp_lanes`` plus ``sw_lanes[j] += w_j (m - row_j)`` (``weight`` NULL: no weights).
    Past ``count`` both factors are selected to 0 ((m - -inf) * w would be inf or NaN), so
    the term is an exact 0 and the product still feeds the add directly: gcc contracts it
    into the same FMA in the tail as in whole blocks (and as LLVM does in float64)."""
    cdef Py_ssize_t j
    cdef floating z, e
    if weight != NULL:
        for j in range(LANES):
            z = row[j] if j < count else <floating>-INFINITY
            e = _fast_exp(z - m)
            if write_e and j < count:
                e_out[j] = e
            s_lanes[j] += e
            sw_lanes[j] += (weight[j] if j < count else <floating>0) * ((m - z) if j < count else <floating>0)
    else:
        for j in range(LANES):
            z = row[j] if j < count else <floating>-INFINITY
            e = _fast_exp(z - m)
            if write_e and j < count:
                e_out[j] = e
            s_lanes[j] += e
            sw_lanes[j] += (m - z) if j < count else <floating>0


cdef inline double _row_sum_exp_smooth(const floating *row, floating m, const floating *weight,
                                       floating *e_out, Py_ssize_t n_classes, bint write_e,
                                       double *sw) noexcept nogil:
    """Step (2) with label smoothing: returns ``s``, sets ``sw = sum_c w_c (m - row_c)``
    (``weight`` NULL: no weights)."""
    cdef double s_lanes[LANES]
    cdef double sw_lanes[LANES]
    cdef Py_ssize_t c
    cdef Py_ssize_t blocked = n_classes - n_classes % LANES
    cdef const floating *w_tail = weight + blocked if weight != NULL else NULL
    _zero_lanes(s_lanes)
    _zero_lanes(sw_lanes)
    for c in range(0, blocked, 16):  # LANES
        _exp_smooth_lanes(row + c, m, weight + c if weight != NULL else NULL, e_out + c, LANES, write_e,
                          s_lanes, sw_lanes)
    _exp_smooth_lanes(row + blocked, m, w_tail, e_out + blocked, n_classes - blocked, write_e, s_lanes, sw_lanes)
    sw[0] = _lane_sum(sw_lanes)
    return _lane_sum(s_lanes)


cdef inline void _exp_target_lanes(const floating *row, floating m, const floating *t, const floating *weight,
                                   double keep, double spread, floating *e_out, Py_ssize_t count,
                                   bint write_e, double *s_lanes, double *a_lanes,
                                   double *b_lanes) noexcept nogil:
    """``_exp_lanes`` plus ``a_lanes[j] += w_j t'_j``, ``b_lanes[j] += w_j t'_j (m - row_j)``;
    past ``count`` both terms are an exact 0 (factors selected to 0, see _exp_smooth_lanes).
    ``t'`` is formed in float64, as in step (4), so that A and the gradient use the same t'."""
    cdef Py_ssize_t j
    cdef floating z, e
    cdef double wt
    if weight != NULL:
        for j in range(LANES):
            z = row[j] if j < count else <floating>-INFINITY
            e = _fast_exp(z - m)
            if write_e and j < count:
                e_out[j] = e
            s_lanes[j] += e
            wt = (<double>weight[j] * (keep * <double>t[j] + spread)) if j < count else 0.0
            a_lanes[j] += wt
            b_lanes[j] += wt * ((m - z) if j < count else <floating>0)
    else:
        for j in range(LANES):
            z = row[j] if j < count else <floating>-INFINITY
            e = _fast_exp(z - m)
            if write_e and j < count:
                e_out[j] = e
            s_lanes[j] += e
            wt = (keep * <double>t[j] + spread) if j < count else 0.0
            a_lanes[j] += wt
            b_lanes[j] += wt * ((m - z) if j < count else <floating>0)


cdef inline double _row_sum_exp_target(const floating *row, floating m, const floating *t,
                                       const floating *weight, double eps, floating *e_out,
                                       Py_ssize_t n_classes, bint write_e,
                                       double *a, double *b) noexcept nogil:
    """Step (2) for probability targets: returns ``s``, sets ``A = sum_c w_c t'_c`` and
    ``B = sum_c w_c t'_c (m - row_c)`` with ``t'_c = (1-eps) t_c + eps/C``."""
    cdef double s_lanes[LANES]
    cdef double a_lanes[LANES]
    cdef double b_lanes[LANES]
    cdef double keep = 1.0 - eps
    cdef double spread = eps / n_classes
    cdef Py_ssize_t c
    cdef Py_ssize_t blocked = n_classes - n_classes % LANES
    cdef const floating *w_tail = weight + blocked if weight != NULL else NULL
    _zero_lanes(s_lanes)
    _zero_lanes(a_lanes)
    _zero_lanes(b_lanes)
    for c in range(0, blocked, 16):  # LANES
        _exp_target_lanes(row + c, m, t + c, weight + c if weight != NULL else NULL, keep, spread, e_out + c,
                          LANES, write_e, s_lanes, a_lanes, b_lanes)
    _exp_target_lanes(row + blocked, m, t + blocked, w_tail, keep, spread, e_out + blocked,
                      n_classes - blocked, write_e, s_lanes, a_lanes, b_lanes)
    a[0] = _lane_sum(a_lanes)
    b[0] = _lane_sum(b_lanes)
    return _lane_sum(s_lanes)


# --- the rows of one block -------------------------------------------------------------


cdef inline void _index_row(Py_ssize_t i, const floating *x, const label_t *y, const floating *weight,
                            double weight_total, int64_t ignore_index, double eps, double grad_scale,
                            double *loss, floating *grad, Py_ssize_t n_classes,
                            bint write_grad) noexcept nogil:
    """Steps (1)-(4) for row i with a class-index target (``write_grad`` a constant)."""
    cdef double keep = 1.0 - eps
    cdef double spread = eps / n_classes
    cdef int64_t yi = y[i]
    cdef const floating *row = x + i * n_classes
    cdef floating *g
    cdef floating m, x_y, a, b
    cdef double w_y, s, sw, log_s, row_loss, smoothing
    cdef Py_ssize_t c
    if yi == ignore_index:  # ignored rows: loss 0, gradient 0, y_i never read
        loss[i] = 0.0
        if write_grad:
            memset(grad + i * n_classes, 0, n_classes * sizeof(floating))
        return
    g = grad + i * n_classes if write_grad else grad  # loss only: a dummy, never written
    w_y = weight[yi] if weight != NULL else 1.0
    m = _row_max(row, n_classes)  # (1)
    x_y = row[yi]  # read before step (2) may overwrite the row (grad is x)
    if eps > 0:  # (2)
        s = _row_sum_exp_smooth(row, m, weight, g, n_classes, write_grad, &sw)
    else:
        s = _row_sum_exp(row, m, g, n_classes, write_grad)
        sw = 0.0
    log_s = log(s)  # (3)
    # lse - x_y, summed as (m - x_y) + log s: exact in float64, and no rounding of m + log s
    # (which would cost the small losses of confident rows their digits)
    row_loss = keep * w_y * ((<double>m - <double>x_y) + log_s)
    if eps > 0:
        row_loss += spread * (sw + weight_total * log_s)
    loss[i] = row_loss
    if write_grad:  # (4)
        # without smoothing W must not enter at all: 0 * W is NaN when a weight of a class
        # no row uses is inf or NaN (PyTorch never reads such weights either)
        smoothing = spread * weight_total if eps > 0 else 0.0
        a = <floating>(grad_scale * (keep * w_y + smoothing) / s)
        if eps > 0:
            b = <floating>(grad_scale * spread)
            if weight != NULL:
                for c in range(n_classes):
                    g[c] = g[c] * a - b * weight[c]
            else:
                for c in range(n_classes):
                    g[c] = g[c] * a - b
        else:
            for c in range(n_classes):
                g[c] = g[c] * a
        g[yi] -= <floating>(grad_scale * keep * w_y)


cdef fx_hot_void _index_block(Py_ssize_t start, Py_ssize_t stop, const floating *x, const label_t *y,
                             const floating *weight, double weight_total, int64_t ignore_index,
                             double eps, double grad_scale, double *loss, floating *grad,
                             Py_ssize_t n_classes, bint write_grad) noexcept nogil:
    """Rows [start, stop) of ``xent_index``: one call per OpenMP chunk (multiversioned)."""
    cdef Py_ssize_t i
    if write_grad:
        for i in range(start, stop):
            _index_row(i, x, y, weight, weight_total, ignore_index, eps, grad_scale, loss, grad, n_classes, True)
    else:
        for i in range(start, stop):
            _index_row(i, x, y, weight, weight_total, ignore_index, eps, grad_scale, loss, grad, n_classes, False)


cdef inline void _probability_row(Py_ssize_t i, const floating *x, const floating *t, const floating *weight,
                                  double eps, double grad_scale, double *loss, floating *grad,
                                  Py_ssize_t n_classes, bint write_grad) noexcept nogil:
    """Steps (1)-(4) for row i with a probability target (``write_grad`` a constant)."""
    cdef const floating *row = x + i * n_classes
    cdef const floating *ti = t + i * n_classes
    cdef floating *g = grad + i * n_classes if write_grad else grad
    cdef floating m
    cdef double s, a, b, scale_a, keep, spread
    cdef Py_ssize_t c
    m = _row_max(row, n_classes)  # (1)
    s = _row_sum_exp_target(row, m, ti, weight, eps, g, n_classes, write_grad, &a, &b)  # (2)
    loss[i] = b + a * log(s)  # (3)
    if write_grad:  # (4), in float64: unnormalised targets make p_c A and w_c t'_c large
        # and nearly equal, and their difference would keep only float32's absolute error
        scale_a = grad_scale * a / s
        keep = 1.0 - eps
        spread = eps / n_classes
        if weight != NULL:
            for c in range(n_classes):
                g[c] = <floating>(<double>g[c] * scale_a - grad_scale * (<double>weight[c] * (keep * <double>ti[c] + spread)))
        else:
            for c in range(n_classes):
                g[c] = <floating>(<double>g[c] * scale_a - grad_scale * (keep * <double>ti[c] + spread))


cdef fx_hot_void _probability_block(Py_ssize_t start, Py_ssize_t stop, const floating *x, const floating *t,
                                   const floating *weight, double eps, double grad_scale, double *loss,
                                   floating *grad, Py_ssize_t n_classes, bint write_grad) noexcept nogil:
    """Rows [start, stop) of ``xent_probability``: one call per OpenMP chunk (multiversioned)."""
    cdef Py_ssize_t i
    if write_grad:
        for i in range(start, stop):
            _probability_row(i, x, t, weight, eps, grad_scale, loss, grad, n_classes, True)
    else:
        for i in range(start, stop):
            _probability_row(i, x, t, weight, eps, grad_scale, loss, grad, n_classes, False)


cdef double _sum_exp_unshifted(const floating *row, Py_ssize_t n_classes) noexcept nogil:
    """``sum_c exp(row_c)`` with libm's exp, in order: the rare rows whose max is infinite
    (where the result is -inf, +inf or NaN whatever the rounding)."""
    cdef double s = 0.0
    cdef Py_ssize_t c
    for c in range(n_classes):
        s += exp(row[c])
    return s


cdef fx_hot_void _logsumexp_block(Py_ssize_t start, Py_ssize_t stop, const floating *x, floating *out,
                                 Py_ssize_t n_classes) noexcept nogil:
    """``out_i = m + log(sum_c exp(x_ic - m))``, steps (1)-(3)."""
    cdef Py_ssize_t i
    cdef const floating *row
    cdef floating m
    for i in range(start, stop):
        row = x + i * n_classes
        m = _row_max(row, n_classes)
        if isinf(m):  # as torch: all -inf -> log 0 = -inf; a +inf -> +inf (not inf - inf)
            out[i] = <floating>log(_sum_exp_unshifted(row, n_classes))
        else:  # e_out = row is never written (write_e is False), as in the numba kernel
            out[i] = <floating>(m + log(_row_sum_exp(row, m, <floating *>row, n_classes, False)))


cdef fx_hot_void _log_softmax_block(Py_ssize_t start, Py_ssize_t stop, const floating *x, floating *out,
                                   Py_ssize_t n_classes) noexcept nogil:
    """``o_c = (row_c - m) - log(s)``: steps (1)-(3), then one write per element."""
    cdef Py_ssize_t i, c
    cdef const floating *row
    cdef floating *o
    cdef floating m, log_s
    for i in range(start, stop):
        row = x + i * n_classes
        o = out + i * n_classes
        m = _row_max(row, n_classes)
        log_s = <floating>log(_row_sum_exp(row, m, <floating *>row, n_classes, False))  # row: not written
        for c in range(n_classes):
            o[c] = (row[c] - m) - log_s


cdef fx_hot_void _softmax_block(Py_ssize_t start, Py_ssize_t stop, const floating *x, floating *out,
                               Py_ssize_t n_classes) noexcept nogil:
    """``o_c = exp(row_c - m) / s``: steps (1)-(2) write e into o, then scale by 1/s."""
    cdef Py_ssize_t i, c
    cdef const floating *row
    cdef floating *o
    cdef floating m, inv_s
    cdef double s
    for i in range(start, stop):
        row = x + i * n_classes
        o = out + i * n_classes
        m = _row_max(row, n_classes)
        s = _row_sum_exp(row, m, o, n_classes, True)
        inv_s = <floating>(1.0 / s)
        for c in range(n_classes):
            o[c] = o[c] * inv_s


cdef fx_hot_void _exp_block(const floating *t, floating *out, Py_ssize_t n) noexcept nogil:
    """``out_j = exp(t_j)`` with the kernels' exponential, in the clone they use (for tests)."""
    cdef Py_ssize_t j
    for j in range(n):
        out[j] = _fast_exp(t[j])


cdef inline Py_ssize_t _rows_per_block(Py_ssize_t n_classes) noexcept nogil:
    """Whole rows per OpenMP chunk, about BLOCK_ELEMENTS elements (at least one row)."""
    if n_classes >= BLOCK_ELEMENTS or n_classes <= 0:
        return 1
    return BLOCK_ELEMENTS // n_classes


# --- the backend interface (see _numpy_backend.py) -----------------------------------
# Blocks of rows go to the threads one at a time (schedule dynamic, chunk 1 block); each
# row is written by exactly one thread, so every result is the same for any thread count.


def xent_index(const floating[:, ::1] x, const label_t[::1] y, const floating[::1] weight,
               double weight_total, int64_t ignore_index, double eps, double grad_scale,
               double[::1] loss, floating[:, ::1] grad, bint write_grad):
    """Cross-entropy rows for class-index targets (see the module docstring).

    x (n, C) float; y (n,) int, every non-ignored value in [0, C) (checked by the caller);
    weight (C,) of x's dtype or length 0 for none; weight_total = sum(weight) (C without);
    loss (n,) float64 out: per-row losses; grad (n, C) out, scaled by grad_scale, or a
    (1, C) dummy when not write_grad; grad may be x itself (the gradient overwrites it).
    """
    cdef Py_ssize_t n = x.shape[0], n_classes = x.shape[1]
    cdef Py_ssize_t per_block = _rows_per_block(n_classes)
    cdef Py_ssize_t n_blocks = (n + per_block - 1) // per_block
    cdef Py_ssize_t block, start
    cdef const floating *w = &weight[0] if weight.shape[0] != 0 else NULL
    if n == 0 or n_classes == 0:  # nothing to do (the API never passes C = 0)
        return
    with nogil:
        for block in prange(n_blocks, schedule="dynamic", chunksize=1):
            start = block * per_block
            _index_block(start, min(start + per_block, n), &x[0, 0], &y[0], w, weight_total, ignore_index,
                         eps, grad_scale, &loss[0], &grad[0, 0], n_classes, write_grad)


def xent_probability(const floating[:, ::1] x, const floating[:, ::1] t, const floating[::1] weight,
                     double eps, double grad_scale, double[::1] loss, floating[:, ::1] grad, bint write_grad):
    """Cross-entropy rows for probability targets t (n, C) of x's dtype (see the module
    docstring). weight (C,) or length 0; loss (n,) float64 out; grad (n, C) out or x."""
    cdef Py_ssize_t n = x.shape[0], n_classes = x.shape[1]
    cdef Py_ssize_t per_block = _rows_per_block(n_classes)
    cdef Py_ssize_t n_blocks = (n + per_block - 1) // per_block
    cdef Py_ssize_t block, start
    cdef const floating *w = &weight[0] if weight.shape[0] != 0 else NULL
    if n == 0 or n_classes == 0:  # nothing to do (the API never passes C = 0)
        return
    with nogil:
        for block in prange(n_blocks, schedule="dynamic", chunksize=1):
            start = block * per_block
            _probability_block(start, min(start + per_block, n), &x[0, 0], &t[0, 0], w, eps, grad_scale,
                               &loss[0], &grad[0, 0], n_classes, write_grad)


def logsumexp_rows(const floating[:, ::1] x, floating[::1] out):
    """``out_i = m + log(sum_c exp(x_ic - m))``, steps (1)-(3); out (n,) of x's dtype."""
    cdef Py_ssize_t n = x.shape[0], n_classes = x.shape[1]
    cdef Py_ssize_t per_block = _rows_per_block(n_classes)
    cdef Py_ssize_t n_blocks = (n + per_block - 1) // per_block
    cdef Py_ssize_t block, start
    if n == 0 or n_classes == 0:  # nothing to do (the API never passes C = 0)
        return
    with nogil:
        for block in prange(n_blocks, schedule="dynamic", chunksize=1):
            start = block * per_block
            _logsumexp_block(start, min(start + per_block, n), &x[0, 0], &out[0], n_classes)


def log_softmax_rows(const floating[:, ::1] x, floating[:, ::1] out):
    """``out_ic = (x_ic - m) - log(s)``; out may be x itself."""
    cdef Py_ssize_t n = x.shape[0], n_classes = x.shape[1]
    cdef Py_ssize_t per_block = _rows_per_block(n_classes)
    cdef Py_ssize_t n_blocks = (n + per_block - 1) // per_block
    cdef Py_ssize_t block, start
    if n == 0 or n_classes == 0:  # nothing to do (the API never passes C = 0)
        return
    with nogil:
        for block in prange(n_blocks, schedule="dynamic", chunksize=1):
            start = block * per_block
            _log_softmax_block(start, min(start + per_block, n), &x[0, 0], &out[0, 0], n_classes)


def softmax_rows(const floating[:, ::1] x, floating[:, ::1] out):
    """``out_ic = exp(x_ic - m) / s``; out may be x itself."""
    cdef Py_ssize_t n = x.shape[0], n_classes = x.shape[1]
    cdef Py_ssize_t per_block = _rows_per_block(n_classes)
    cdef Py_ssize_t n_blocks = (n + per_block - 1) // per_block
    cdef Py_ssize_t block, start
    if n == 0 or n_classes == 0:  # nothing to do (the API never passes C = 0)
        return
    with nogil:
        for block in prange(n_blocks, schedule="dynamic", chunksize=1):
            start = block * per_block
            _softmax_block(start, min(start + per_block, n), &x[0, 0], &out[0, 0], n_classes)


def label_stats(const label_t[::1] y, Py_ssize_t n_classes, int64_t ignore_index, const floating[::1] weight):
    """Checks labels before any kernel runs and sums the "mean" denominator.

    Returns ``(first_bad, total)``: the first row whose label is neither ignore_index nor
    in [0, n_classes) (-1 if none), and ``D = sum_i [y_i != ignore_index] w[y_i]`` in
    float64 (the count of kept rows when weight has length 0), summed in row order.
    """
    cdef bint has_weight = weight.shape[0] != 0
    cdef double total = 0.0
    cdef Py_ssize_t i, first_bad = -1
    cdef int64_t yi
    with nogil:
        for i in range(y.shape[0]):
            yi = y[i]
            if yi == ignore_index:
                continue
            if yi < 0 or yi >= n_classes:
                first_bad = i
                break
            total += weight[yi] if has_weight else 1.0
    return first_bad, total


def exp_array(const floating[::1] t, floating[::1] out):
    """``out[j] = fast_exp(t[j])``: the exponential alone (in the clone the kernels use),
    for its accuracy test and the comparison with the numba one."""
    if t.shape[0] != 0:
        _exp_block(&t[0], &out[0], t.shape[0])


# --- threads and build facts ---------------------------------------------------------


def openmp_enabled():
    """Whether this extension was compiled with OpenMP (else its kernels run on one thread)."""
    return bool(FX_OPENMP)


def set_num_threads(int n):
    """``omp_set_num_threads(n)``: the OpenMP threads for later calls from this thread
    (no-op without OpenMP)."""
    fx_set_num_threads(n)


def get_num_threads():
    """``omp_get_max_threads()``: the threads the next call from this thread uses (1
    without OpenMP)."""
    return fx_get_max_threads()


def simd_level():
    """The ISA of the kernel clones in use: "x86-64-v4" (AVX-512), "x86-64-v3" (AVX2)
    when the build multiversioned them (``FX_MULTIVERSIONED``), else "baseline"."""
    return fx_simd_level().decode()
