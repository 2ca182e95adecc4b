# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
# cython: cdivision=True
"""The Cython + OpenMP backend: the same steps, in the same words, as
``fastxent/_numba_kernels.py`` and ``fastxent/_reference.py``.

Row statistics are the primitive. Per row, in three phases:

  stats   (1) ``m = max_c x_c``                          (vectorised across classes or rows)
          (2) ``e_c = exp(x_c - m)``, ``s = sum_c e_c``; the target logit ``x_y``; the
              smoothing sum ``sw = sum_c w_c (m - x_c)`` (index targets) or the target sums
              ``A = sum_c w_c t'_c``, ``B = sum_c w_c t'_c (m - x_c)`` (probability targets)
  finish  (3) ``lse = m + log s``; index targets ``loss = (1-eps) w_y ((m - x_y) + log s)
              + eps/C (sw + W log s)``; probability targets ``loss = B + A log s``; the
              gradient coefficients ``a`` (index: ``(1-eps) w_y + eps W / C``; probability:
              ``A``), scaled by ``grad_scale / s``
  grad    (4) ``g_c = e_c a - b_c`` (index: ``b_c = grad_scale eps/C w_c``, then
              ``g_y -= grad_scale (1-eps) w_y``; probability: ``b_c = grad_scale w_c t'_c``)

How the module is organised
---------------------------
- **The options** arrive as ``_spec.Params`` (a NamedTuple) and are copied ONCE per call,
  by ``_unpack_params``, into the C struct ``Params`` (the same fields, in the same order:
  ``PARAMS_FIELDS``). Every phase takes ``const Params *``; the block functions take the
  Task and the Params by value (copies that nothing else writes, so gcc hoists their
  fields out of the loops).
- **The call** is described by one ``Task`` (the operation, the MODE, the LAYOUT, the shape,
  the arrays as untyped pointers); the ``def`` functions of the interface only fill a Task
  (``_xent_task``, ``_rows_task``) and hand it to ``_run_blocks``.
- **The parallel loop is written once**, in ``_run_blocks``: an OpenMP ``prange`` over
  blocks of whole rows (``_rows_per_block``: about BLOCK_ELEMENTS = 32k logits, a multiple
  of LANES), handed out dynamically one block at a time, inside a ``parallel()`` region in
  which each thread allocates its own scratch (cache-line aligned, a line of padding after
  it, so no two threads write one line). Per block, ``_block`` picks the dtype (the one
  place the untyped pointers become ``float`` or ``double``, through the fused type of the
  scratch pointer) and the block function of the operation and layout.
- **The block functions** (``_index_rows``, ``_index_rows_with_options``,
  ``_index_lane_groups``, ``_probability_rows``, ``_probability_rows_with_options``,
  ``_probability_lane_groups``, the softmax family) are the multiversioned ones (``FX_HOT``,
  see below); each inlines its per-row or per-lane-group phases, which are small
  ``cdef inline`` functions with the numba helpers' names: ``_row_max``, ``_row_sum_exp``,
  ``_row_smoothing_sum``, ``_row_sum_exp_target_sums`` (steps 1-2), ``_index_row_loss``,
  ``_index_finish``, ``_probability_finish`` (step 3), ``_index_grad_row``,
  ``_probability_grad_row`` (step 4), and ``_index_row`` / ``_probability_row`` /
  ``_index_lanes`` / ``_probability_lanes`` that run them for one row or one lane group.

The MODE (a run-time value; the same numbers as the numba module) says which phases run;
the row layout branches on it once per block, GRAD and LOSS each getting a copy of the row
with the mode a constant (the other modes share one):

- ``LOSS``: (1)-(3), per-row loss; nothing N x C is written;
- ``GRAD``: (1)-(4), per-row loss and the gradient into ``grad``: step (2) writes the
  exponentials into the gradient row itself, which step (4) rescales;
- ``IN_PLACE``: the same with ``grad`` the logits themselves. In the row layout it is
  GRAD's very code: step (2) reads each logit and writes its exponential at the same
  index, which gcc's run-time alias check accepts (a dependence distance of 0), so no
  scratch row is needed (numba's kernels need one: LLVM's check fails for two names of one
  array); in place and out of place give the same bits by construction;
- ``STATS``: (1)-(2) on a class shard (columns ``class_start..`` of the full class axis),
  the statistics into ``rowdata`` (columns ``STAT_*``);
- ``SHARD_GRAD``: (4) on a class shard, from the merged ``m`` and the coefficients that
  ``finish`` computed from the merged statistics (``rowdata`` columns ``COEF_*``).

The LAYOUT: for few classes (``C <= SMALL_C``, modes LOSS, GRAD and IN_PLACE) LANES = 32
rows are transposed into the thread's scratch (``buf[c * LANES + r] = x[r0 + r, c]``) so
that the SIMD lanes run over ROWS: the max, exp, the float64 sums, ``log``, the loss, the
coefficients and the gradient of 32 rows are each one loop over the classes of a 32-wide
loop over the rows, which gcc vectorises; so are the target's logit and weight and the
gradient's target term (selects over the classes: ``target[r] == c``). The transposes are
register shuffles for float32 on AVX-512 (``fx_rows_to_lanes16`` / ``fx_lanes_to_rows16``,
kernels/_cy_xent_simd.h), else scalar loops. Otherwise one row at a time, the lanes over
the classes. (numba takes 64
rows; with gcc 32 measured faster: float32 loss+grad 262144 x 10 4.1 -> 3.5 ms, 65536 x 32
3.3 -> 2.5 ms, one thread; with 16, gcc unrolls the small lane loops completely and leaves
them scalar, 1.7x slower than 64.)

The OPTIONS of the loss (``Params``; in LOSS, GRAD and IN_PLACE, in the row layout and, for
class-index targets, in the lanes layout too):

- **transformed logits** (``transformed``): the loss sees ``x' = c tanh(x a/c)`` (``a x``
  without a cap), written into the thread's scratch row, on which steps (1)-(3) run as if
  it were the row; step (4) then multiplies each gradient element by ``dx'/dx``
  (``a (1 - (x'/c)**2)``, or ``a``), reading x' from the scratch row (in place, x is gone);
- **z-loss** (``z_loss = z``): ``lse = m + log s``; the row's ``z lse**2`` goes to
  ``rowdata[i, OUT_Z]`` (not into the loss: the caller divides it by its own count), and
  the gradient coefficient gains ``z_grad_scale 2 z lse / s``;
- **row outputs** (``row_outputs``; ``rowdata`` is then (n, N_OUTS)): ``OUT_LSE``, ``OUT_Z``
  and, with ``stats``, the entropy of ``softmax(x')`` (``log s + H / s``, ``H = sum_c e_c
  (m - x'_c)``) and whether the first index of ``max x'`` is the target (``OUT_ENTROPY``,
  ``OUT_CORRECT``), both computed before step (2) overwrites an in-place row. With
  ``stats`` ignored rows compute their lse and entropy too (loss, gradient, ``OUT_Z`` and
  ``OUT_CORRECT`` 0); without it they write ``OUT_LSE = OUT_Z = 0``.

With any of them on, ``_block`` runs the block functions ``_index_rows_with_options`` /
``_probability_rows_with_options`` / ``_index_lane_groups_with_options``, whose copies of the
row (or lane-group) code have ``options`` a constant True (as the mode is a constant); the
plain block functions have it a constant False, and are the code of before, bit for bit and
as fast. In the lanes layout x' is transformed over the transposed lanes and kept in the
second half of the thread's scratch for step (4); the entropy's sum and the first indices
of the max and of a NaN are selects over the classes, before step (2).

16-bit LOGITS (``Params.storage`` bfloat16 or float16, class-index targets, LOSS, GRAD and
IN_PLACE: ``xent_index_words``): per block, ``_words_block`` widens the block's words into
the thread's float32 rows (~128 KB, in L2), runs the float32 block function there as
IN_PLACE, and rounds the gradient back into the words (to nearest even; a bfloat16 NaN is
0x7FC0, as torch's). So the numbers are the float32 kernel's on ``x.astype(float32)``,
rounded once, in every layout and with every option, and only 16-bit words cross memory.
(The numba kernels widen in registers instead; their sums may differ in the last float32
bits, their words then by one.)

Accumulators (``s``, ``sw``, ``A``, ``B``) and the per-row loss are float64 for both
dtypes; the exponentials and the gradient are computed in the input dtype.
``sum_c w_c (lse - x_c)`` is written ``sw + W log s`` so that it is a sum of non-negative
terms, without the cancellation of ``W lse - sum_c w_c x_c``.

Order of the sums (thread-count invariance)
-------------------------------------------
Every row is computed by one thread, and no sum's order depends on the thread or on the
rows around it, so every result is the same bits for any thread count. In the row layout
the sums of step (2) are kept in SUM_LANES = 16 float64 lanes (element ``c`` in lane
``c % 16``; the smoothing sum in 32) added in a fixed pairwise order at the end: gcc may
not reassociate a float sum (no ``-ffast-math``: it would also fold the exponential's
rounding trick and drop inf/NaN semantics), but it vectorises these explicit lanes. The
last partial group of a row is one masked vector whose loads are selected (to -inf, m or
0) before any arithmetic, so the masked-off lanes add exact zeros (arithmetic on them
first met subnormal garbage: a microcode assist per row). In the lanes layout each row's
sums run over its classes in order. The numba kernels let LLVM reassociate the row
layout's sums, so the two backends differ there in the last float64 bits
(tests/test_cython.py states the bound).

Loss only, loss+grad and in place give the same bits: steps (1)-(3) are one piece of code
per layout, and the gradient's target term passes through ``_opaque`` before it is
subtracted (else gcc fused its product into the subtraction in one copy and not another).

Kernels never allocate arrays visible to Python and never validate: ``_cy_backend.py``
(as ``_numba_kernels.py``) picks the mode and layout and passes plain C-contiguous
arrays; ``_api.py`` checks the inputs and allocates the outputs.

The exponential and the logarithm
---------------------------------
``exp(t)`` for ``t <= 0`` (and -inf, NaN), as ``2**k * exp(r)``: ``k = rint(t / ln 2)``
by the ``(v + 1.5 * 2**p) - 1.5 * 2**p`` rounding trick, ``r = t - k ln 2`` in two parts
(Cody-Waite), ``exp(r)`` by a polynomial fitted for the least maximum relative error on
``|r| <= ln2 / 2`` (degree 6 float32, 11 float64; docs/DESIGN.md), and
``2**k`` built in the exponent bits of ``v`` (a ``memcpy`` bit cast, which gcc turns into
a register move). Below the smallest normal (``t < LO``) the result is 0; NaN propagates
through ``r``. ``log(s)`` of step (3) is fdlibm's e_log.c made branch-free, as numba's
``fast_log`` (< 1 ulp). Plain arithmetic and selects only, no libm call, so gcc vectorises
both. The rows of ``logsumexp`` and ``log_softmax`` take libm's ``log``, as numba's
``math.log``.

Vectorisation and multiversioning
---------------------------------
Checked with ``-fopt-info-vec-optimized`` (gcc 12, ``-O3 -fno-trapping-math``): the loops
of steps (1), (2) and (4) of the row layout, and every loop over the lanes (max, exp, the
sums, log and the coefficients, the gradient), are vectorised in the x86-64-v4 clone;
without ``-fno-trapping-math`` gcc will not if-convert the selects and vectorises none of
them. ``FX_HOT`` (kernels/_cy_xent_simd.h) compiles each block function for x86-64-v4,
x86-64-v3 and the baseline with ``target_clones``, and ``flatten`` inlines the phases into
each clone. In the v3/v4 clones gcc fuses the same multiply-adds as LLVM does in the numba
version, and the two exponentials agree bit for bit (tests/test_cython.py).
"""

from cython.parallel cimport parallel, prange
from libc.math cimport INFINITY, copysign, copysignf, exp, fabs, fabsf, isinf, log
from libc.stdint cimport int32_t, int64_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset


cdef extern from "_cy_xent_simd.h" nogil:
    # "FX_HOT void": the return type that carries __attribute__((target_clones(...)))
    ctypedef void fx_hot_void "FX_HOT void"
    bint FX_OPENMP
    bint FX_MULTIVERSIONED
    int fx_get_max_threads()
    void fx_set_num_threads(int n)
    const char *fx_simd_level()
    void *fx_aligned_alloc(size_t size)
    void fx_aligned_free(void *pointer)
    bint FX_FLOAT16
    void fx_widen_words(const uint16_t *words, float *out, Py_ssize_t count, int storage)
    void fx_narrow_words(const float *values, uint16_t *out, Py_ssize_t count, int storage)
    void fx_prefetch_for_write(const void *address)
    void fx_launder_lanes(const void *lanes)
    float fx_opaque_float "fx_opaque"(float x)
    double fx_opaque_double "fx_opaque"(double x)
    bint fx_vector_lanes()
    void fx_rows_to_lanes16(const float *x, Py_ssize_t n_classes, float *buf, Py_ssize_t lanes)
    void fx_lanes_to_rows16(const float *buf, Py_ssize_t lanes, Py_ssize_t n_classes, float *g)


ctypedef fused floating:
    float
    double

ctypedef fused label_t:
    int32_t
    int64_t


# --- modes, layouts and the row-data columns (the numbers of _numba_kernels.py) ------
#: Params.storage (the numbers of _spec.STORAGE_*)
cdef enum:
    STORAGE_NATIVE = 0
    STORAGE_BF16 = 1
    STORAGE_F16 = 2

cdef enum:
    LOSS = 0
    GRAD = 1
    IN_PLACE = 2
    STATS = 3
    SHARD_GRAD = 4

#: STATS writes, per row: the max m, s = sum exp(x - m), the target logit (0 when the target
#: is not in this shard), and A, B (for index targets A is left 0 for the caller, B is sw)
cdef enum:
    STAT_M = 0
    STAT_S = 1
    STAT_TARGET = 2
    STAT_A = 3
    STAT_B = 4
    N_STATS = 5

#: SHARD_GRAD reads, per row: the merged max, the gradient coefficient a * grad_scale / s,
#: and (index targets) the target term grad_scale (1-eps) w_y
cdef enum:
    COEF_M = 0
    COEF_A = 1
    COEF_Y = 2
    N_COEFS = 3

#: the per-row outputs of the fused modes when Params.row_outputs (``rowdata`` (n, N_OUTS)):
#: lse of the transformed logits, the z-loss term, the entropy of softmax(x'), and 1.0 when
#: the first index of max x' is the target (the numbers of _spec.OUT_*)
cdef enum:
    OUT_LSE = 0
    OUT_Z = 1
    OUT_ENTROPY = 2
    OUT_CORRECT = 3
    N_OUTS = 4

cdef enum:
    LANES = 32  # rows at a time in the small-C layout, one per SIMD lane (see the module docstring)
    SMALL_C = 32  # classes up to which LOSS, GRAD and IN_PLACE run LANES rows across the lanes
    BLOCK_ELEMENTS = 32768  # logits per prange iteration (a block of whole rows)
    SUM_LANES = 16  # partial sums per row in step (2) of the row layout (one AVX-512 float32 vector)
    SMOOTHING_LANES = 32  # partial sums of the smoothing sum (see _smoothing_lanes)
    MAX_LANES = 32  # partial maxima per row in step (1) of the row layout (see _row_max)
    CACHE_LINE = 64
    ROW_GROUP = 8  # rows whose step (3) runs together in the row layout, LOSS (see _index_loss_row_group)

#: the same names and values as _numba_kernels.py, for _cy_backend.py and the tests
MODES = (LOSS, GRAD, IN_PLACE, STATS, SHARD_GRAD)
STAT_COLUMNS = (STAT_M, STAT_S, STAT_TARGET, STAT_A, STAT_B)
COEF_COLUMNS = (COEF_M, COEF_A, COEF_Y)
OUT_COLUMNS = (OUT_LSE, OUT_Z, OUT_ENTROPY, OUT_CORRECT)
LAYOUT = {"LANES": LANES, "SMALL_C": SMALL_C, "BLOCK_ELEMENTS": BLOCK_ELEMENTS}
#: the float32 lane groups are transposed in registers (fx_rows_to_lanes16 / fx_lanes_to_rows16,
#: kernels/_cy_xent_simd.h) on CPUs with AVX-512F and with GCC; elsewhere by the scalar loops
cdef bint _vector_lanes = fx_vector_lanes()
VECTOR_TRANSPOSES = bool(_vector_lanes)
#: xent_index_words reads bfloat16 and float16 words (float16 needs the compiler's _Float16)
STORAGE_16BIT = bool(FX_FLOAT16)
STORAGES = (STORAGE_NATIVE, STORAGE_BF16, STORAGE_F16)


# --- the options, as one record --------------------------------------------------------


ctypedef struct Params:
    # the fields of fastxent._spec.Params, in its order (see there for what each means)
    int64_t ignore_index
    int64_t class_start
    double eps
    double keep
    double spread
    bint smoothing
    double weight_total
    double grad_scale
    bint weighted
    double z_loss
    double z_grad_scale
    double logit_scale
    double softcap
    bint transformed
    bint row_outputs
    bint stats
    int64_t storage  # STORAGE_NATIVE, or 16-bit words (xent_index_words: see _words_block)


cdef Params _unpack_params(object record) except *:
    """The one place the ``_spec.Params`` record becomes the C struct."""
    cdef Params p
    p.ignore_index = record.ignore_index
    p.class_start = record.class_start
    p.eps = record.eps
    p.keep = record.keep
    p.spread = record.spread
    p.smoothing = record.smoothing
    p.weight_total = record.weight_total
    p.grad_scale = record.grad_scale
    p.weighted = record.weighted
    p.z_loss = record.z_loss
    p.z_grad_scale = record.z_grad_scale
    p.logit_scale = record.logit_scale
    p.softcap = record.softcap
    p.transformed = record.transformed
    p.row_outputs = record.row_outputs
    p.stats = record.stats
    p.storage = record.storage
    if p.storage not in (STORAGE_NATIVE, STORAGE_BF16, STORAGE_F16):
        raise ValueError(f"unknown Params.storage {p.storage}")
    if p.storage == STORAGE_F16 and not FX_FLOAT16:
        raise ValueError("this build of the extension has no float16 conversions (no _Float16 in its compiler)")
    return p


cdef Params _zero_params():
    cdef Params p
    memset(&p, 0, sizeof(Params))
    return p


#: the struct's field names in order (Cython converts a struct to a dict): must equal
#: ``_spec.Params._fields`` (tests/test_cython.py)
PARAMS_FIELDS = tuple(_zero_params())


# --- the vectorisable exponential ---------------------------------------------------


cdef inline float _exp32(float t) noexcept nogil:
    """``exp(t)`` for float32 ``t <= 0``; see the module docstring."""
    # no clamp of t to [LO, 0] as in the numba version: below LO the select at the end
    # returns 0 anyway, and given a clamp gcc specialises the reduction on the constant and
    # then cannot fuse it into FMAs as LLVM does (so the two would round differently)
    cdef float v = t * <float>1.4426950408889634 + <float>12582912.0  # 1.5 * 2**23
    cdef float k = v - <float>12582912.0
    cdef float r = (t - k * <float>0.693359375) - k * <float>-2.12194440e-4
    # the polynomial (c6 ... c0) and its fit: the module docstring; numba's _EXP32_POLY
    cdef float p = <float>0.001381461275741458
    cdef uint32_t bits
    cdef float two_k, result
    p = p * r + <float>0.008368710055947304
    p = p * r + <float>0.04166838899254799
    p = p * r + <float>0.1666652113199234
    p = p * r + <float>0.4999999403953552
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
    cdef double p = 2.5100375832561234e-08  # c11 ... c0: numba's _EXP64_POLY
    cdef uint64_t bits
    cdef double two_k, result
    p = p * r + 2.7620075879983367e-07
    p = p * r + 2.7557268480310024e-06
    p = p * r + 2.4801521322368692e-05
    p = p * r + 0.00019841269863040545
    p = p * r + 0.0013888888917196719
    p = p * r + 0.008333333333330065
    p = p * r + 0.041666666666624164
    p = p * r + 0.16666666666666669
    p = p * r + 0.5000000000000001
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


# --- the vectorisable logarithm ------------------------------------------------------
# log(s) for the row sums s >= 1 (float64), fdlibm's e_log.c made branch-free, as numba's
# fast_log: s = 2**k f with f in [sqrt(2)/2, sqrt(2)) (exponent and mantissa from the bits,
# musl's split), then with the exact t = f - 1, u = t / (2 + t):
#     log f = t - (t*t/2 - u (t*t/2 + R(u*u))),  R a degree-7 minimax fit (fdlibm's Lg1..Lg7)
# and ln2 in two parts. < 1 ulp (tests/test_log.py, against mpmath). NaN in, NaN out.

cdef enum:
    _LOG_EXPONENT_BIAS = 1023


cdef inline double _fast_log(double s) noexcept nogil:
    """``log(s)`` for float64 ``s > 0`` (normal), vectorisable; NaN propagates."""
    cdef uint64_t bits, mantissa_bits
    cdef double k, f, t, half_t2, u, z, w, r, result
    memcpy(&bits, &s, 8)
    bits = bits + <uint64_t>(0x3FF0000000000000u - 0x3FE6A09E667F3BCDu)  # 1.0 - sqrt(2)/2, in bits
    # the exponent: at most 2047, so through int32 (a vector int64 -> double conversion
    # needs AVX-512DQ; int32 -> double is in every ISA)
    k = <double>(<int32_t>(bits >> 52) - _LOG_EXPONENT_BIAS)
    mantissa_bits = (bits & <uint64_t>0x000FFFFFFFFFFFFFu) + <uint64_t>0x3FE6A09E667F3BCDu
    memcpy(&f, &mantissa_bits, 8)
    t = f - 1.0  # exact
    half_t2 = 0.5 * t * t
    u = t / (2.0 + t)
    z = u * u
    w = z * z
    r = (z * (6.666666666666735130e-01 + w * (2.857142874366239149e-01 + w * (1.818357216161805012e-01
         + w * 1.479819860511658591e-01)))
         + w * (3.999999999940941908e-01 + w * (2.222219843214978396e-01 + w * 1.531383769920937332e-01)))
    result = (k * 6.93147180369123816490e-01
              - ((half_t2 - (u * (half_t2 + r) + k * 1.90821492927058770002e-10)) - t))
    return result if s == s else s


# --- the vectorisable tanh (the soft cap) --------------------------------------------
# tanh(u) in the compute dtype, branch-free: with t = |u|, z = u*u,
#     |u| <  0.625:  u + u z P(z)                     (P a minimax fit, Horner)
#     |u| >= 0.625:  copysign((1 - E) / (1 + E), u),  E = fast_exp(-2 t)
# both computed and one selected, so the loops that call it vectorise. t = inf gives E = 0,
# tanh = +-1 (a -inf logit becomes -c); NaN gives NaN through E. float32 P: degree 4 in z,
# 0.65 ulp on |u| < 0.625; float64: degree 10, 1 ulp (tests/test_cython_options.py).


cdef inline float _tanh32(float u) noexcept nogil:
    cdef float t = fabsf(u)
    cdef float z = u * u
    cdef float q = <float>-0.005704042524499357
    cdef float e, big
    q = q * z + <float>0.02063786148878682
    q = q * z + <float>-0.05373915650349337
    q = q * z + <float>0.13331431753507272
    q = q * z + <float>-0.3333328128411301
    e = _exp32(<float>-2.0 * t)
    big = copysignf((<float>1.0 - e) / (<float>1.0 + e), u)
    return (u + u * z * q) if t < <float>0.625 else big


cdef inline double _tanh64(double u) noexcept nogil:
    cdef double t = fabs(u)
    cdef double z = u * u
    cdef double q = -1.6074411107765176e-05
    cdef double e, big
    q = q * z + 7.714872124279487e-05
    q = q * z + -0.00022856857843357728
    q = q * z + 0.0005863189498796016
    q = q * z + -0.0014549596701377823
    q = q * z + 0.003591989330005907
    q = q * z + -0.008863221019915003
    q = q * z + 0.02186948757690888
    q = q * z + -0.05396825393125143
    q = q * z + 0.1333333333326181
    q = q * z + -0.3333333333333285
    e = _exp64(-2.0 * t)
    big = copysign((1.0 - e) / (1.0 + e), u)
    return (u + u * z * q) if t < 0.625 else big


cdef inline floating _fast_tanh(floating u) noexcept nogil:
    if floating is float:
        return _tanh32(u)
    else:
        return _tanh64(u)


# --- per-row steps -------------------------------------------------------------------


cdef inline floating _opaque(floating x) noexcept nogil:
    """``x``, which gcc may no longer contract with the arithmetic that produced it (see
    fx_opaque in _cy_xent_simd.h)."""
    if floating is float:
        return fx_opaque_float(x)
    else:
        return fx_opaque_double(x)


cdef inline floating _greater(floating a, floating b) noexcept nogil:
    return b if b > a else a


cdef inline floating _row_max(const floating *row, Py_ssize_t n_classes) noexcept nogil:
    """Step (1): ``m = max_c row_c``. NaN is ignored here; it reaches the result through
    ``exp`` in step (2). Rows shorter than MAX_LANES take a plain loop; longer rows 32
    independent lanes (element c in lane c % 32, the tail through a -inf select) combined
    pairwise at the end: gcc cannot vectorise a float max reduction without
    -ffinite-math-only, but it vectorises these lanes into vmaxps (a 16-iteration inner
    loop it would unroll completely and then leave scalar), and the plain loop is a chain
    of dependent maxss, 4 cycles each (at C = 40 it was a fifth of loss only). The max is
    exact, so the layout cannot change ``m``; it can only change which of two equal zeros
    (+0, -0) or which NaN is kept, and neither reaches a result: exp(z - m) and the sums
    are the same for either zero, and a NaN anywhere makes the row NaN."""
    cdef floating m = row[0]
    cdef floating lanes[MAX_LANES]
    cdef floating z
    cdef Py_ssize_t c, j
    cdef Py_ssize_t blocked = n_classes - n_classes % MAX_LANES
    cdef Py_ssize_t count = n_classes - blocked
    if n_classes < MAX_LANES:
        for c in range(1, n_classes):
            m = _greater(m, row[c])
        return m
    for j in range(MAX_LANES):
        lanes[j] = row[j]
    for c in range(MAX_LANES, blocked, 32):  # MAX_LANES
        for j in range(MAX_LANES):
            lanes[j] = _greater(lanes[j], row[c + j])
    if count != 0:
        for j in range(MAX_LANES):  # the tail: past it -inf, which changes no lane
            z = row[blocked + j] if j < count else <floating>-INFINITY
            lanes[j] = _greater(lanes[j], z)
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
    for j in range(SUM_LANES):
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
                            bint write_e, double *s_lanes, double *h_lanes) noexcept nogil:
    """Step (2) on ``count <= SUM_LANES`` elements: ``e_j = exp(row_j - m)``,
    ``s_lanes[j] += e_j``, and unless ``h_lanes`` is NULL (a constant at every call) the
    entropy's ``h_lanes[j] += e_j (m - row_j)`` (a term 0 where ``e_j = 0``: ``0 log 0 = 0``,
    and no ``0 * inf`` for a -inf logit). Inlined with ``count = SUM_LANES`` for whole blocks
    of the row and with the tail length for the rest, so element c goes to lane c % 16. The
    loop always runs SUM_LANES iterations (one vector): past ``count`` the row reads as -inf,
    whose exp adds an exact 0 to its lane. So the tail is one masked load and store, and the
    lanes see only full-width unmasked adds; a scalar or masked store to a lane that the lane
    sum reloads at once stalls store forwarding (it made rows of 10 classes 1.7x slower)."""
    cdef Py_ssize_t j
    cdef floating z, e
    for j in range(SUM_LANES):
        z = row[j] if j < count else <floating>-INFINITY
        e = _fast_exp(z - m)
        if write_e and j < count:
            e_out[j] = e
        s_lanes[j] += e
        if h_lanes != NULL:
            h_lanes[j] += (<double>e * (<double>m - <double>z)) if e != 0 else 0.0


cdef inline double _row_sum_exp_entropy(const floating *row, floating m, floating *e_out, Py_ssize_t n_classes,
                                        bint write_e, double *h) noexcept nogil:
    """Step (2): ``e_c = exp(row_c - m)`` into ``e_out`` (the gradient or softmax row) when
    ``write_e``, and ``s = sum_c e_c`` in float64 (returned); unless ``h`` is NULL, in the same
    pass the entropy's ``H = sum_c e_c (m - row_c)`` into ``h`` (the entropy of the row's
    softmax is ``log s + H / s``; NaN exactly when ``s`` is). ``write_e`` and whether ``h`` is
    NULL are constants at every call, so each inlined copy has one loop without the
    branches; loss only stores nothing, and sums in the same order as loss+grad."""
    cdef double s_lanes[SUM_LANES]
    cdef double h_lanes[SUM_LANES]
    cdef double *h_or_null = h_lanes if h != NULL else NULL
    cdef Py_ssize_t c
    cdef Py_ssize_t blocked = n_classes - n_classes % SUM_LANES
    _zero_lanes(s_lanes)
    if h != NULL:
        _zero_lanes(h_lanes)
    for c in range(0, blocked, 16):  # SUM_LANES
        _exp_lanes(row + c, m, e_out + c, SUM_LANES, write_e, s_lanes, h_or_null)
    if blocked < n_classes:  # (an empty tail would cost a whole vector of exponentials)
        _exp_lanes(row + blocked, m, e_out + blocked, n_classes - blocked, write_e, s_lanes, h_or_null)
    if h != NULL:
        h[0] = _lane_sum(h_lanes)
    return _lane_sum(s_lanes)


cdef inline double _row_sum_exp(const floating *row, floating m, floating *e_out,
                                Py_ssize_t n_classes, bint write_e) noexcept nogil:
    """Step (2) without the entropy (_row_sum_exp_entropy): returns ``s``."""
    return _row_sum_exp_entropy(row, m, e_out, n_classes, write_e, NULL)


cdef inline void _smoothing_lanes(const floating *row, floating m, const floating *weight, Py_ssize_t count,
                                  bint weighted, double *sw_lanes) noexcept nogil:
    """``sw_lanes[j] += w_j (m - row_j)`` for ``count <= SMOOTHING_LANES`` elements. Past
    ``count`` the loads are selected, before any arithmetic, to ``row_j = m`` and ``w_j = 0``,
    so the term is an exact 0 (a select after the arithmetic left gcc computing on whatever
    the masked-off lanes of its masked loads held: subnormal garbage, and a microcode assist
    per row, 1.8 -> 3.6 ms at 16384 x 128 float32). 32 lanes, not 16: a 16-iteration loop
    this small gcc unrolls completely before it vectorises, and then leaves it scalar."""
    cdef Py_ssize_t j
    cdef floating z, w
    if weighted:
        for j in range(SMOOTHING_LANES):
            z = row[j] if j < count else m
            w = weight[j] if j < count else <floating>0
            sw_lanes[j] += w * (m - z)
    else:
        for j in range(SMOOTHING_LANES):
            z = row[j] if j < count else m
            sw_lanes[j] += m - z


cdef inline double _row_smoothing_sum(const floating *row, floating m, const floating *weight,
                                      Py_ssize_t n_classes, bint weighted) noexcept nogil:
    """Step (2), label smoothing: ``sw = sum_c w_c (m - row_c)``. A loop of its own, without
    a store, so that it sums in the same order in every mode (element c in lane c % 32, the
    lanes added pairwise at the end)."""
    cdef double sw_lanes[SMOOTHING_LANES]
    cdef Py_ssize_t c
    cdef Py_ssize_t blocked = n_classes - n_classes % SMOOTHING_LANES
    for c in range(SMOOTHING_LANES):
        sw_lanes[c] = 0.0
    for c in range(0, blocked, 32):  # SMOOTHING_LANES
        _smoothing_lanes(row + c, m, weight + c, SMOOTHING_LANES, weighted, sw_lanes)
    if blocked < n_classes:
        _smoothing_lanes(row + blocked, m, weight + blocked, n_classes - blocked, weighted, sw_lanes)
    for c in range(16):  # lane c + 16 onto lane c, then as _lane_sum
        sw_lanes[c] = sw_lanes[c] + sw_lanes[c + 16]
    return _lane_sum(sw_lanes)


cdef inline void _exp_target_lanes(const floating *row, floating m, const floating *t, const floating *weight,
                                   floating *e_out, Py_ssize_t count, bint write_e, const Params *p,
                                   double *s_lanes, double *a_lanes, double *b_lanes) noexcept nogil:
    """``_exp_lanes`` and, in the same loop, ``a_lanes[j] += w_j t'_j``, ``b_lanes[j] +=
    w_j t'_j (m - row_j)`` for ``count <= SUM_LANES`` elements; past ``count`` the loads are
    selected to ``row_j = -inf`` (exp 0), ``t_j = 0`` and ``w_j = 0`` before any arithmetic
    (see _smoothing_lanes), so every term is an exact 0 (unweighted: ``t'_j`` itself is
    selected to 0). Writes all SUM_LANES exponentials to ``e_out`` (when ``write_e``): a
    conditional store made this bigger loop too much for gcc's if-conversion in some
    copies, which then ran scalar (float64 65536 x 40 loss+grad 6.1 -> 9.8 ms)."""
    cdef Py_ssize_t j
    cdef floating z, e, tj, wj
    cdef double wt
    cdef double keep = p.keep, spread = p.spread
    if p.weighted:
        for j in range(SUM_LANES):
            z = row[j] if j < count else <floating>-INFINITY
            tj = t[j] if j < count else <floating>0
            wj = weight[j] if j < count else <floating>0
            e = _fast_exp(z - m)
            if write_e:
                e_out[j] = e
            s_lanes[j] += e
            wt = <double>wj * (keep * <double>tj + spread)
            a_lanes[j] += wt
            b_lanes[j] += wt * ((m - z) if j < count else <floating>0)
    else:
        for j in range(SUM_LANES):
            z = row[j] if j < count else <floating>-INFINITY
            tj = t[j] if j < count else <floating>0
            e = _fast_exp(z - m)
            if write_e:
                e_out[j] = e
            s_lanes[j] += e
            wt = (keep * <double>tj + spread) if j < count else 0.0
            a_lanes[j] += wt
            b_lanes[j] += wt * ((m - z) if j < count else <floating>0)


cdef inline double _row_sum_exp_target_sums(const floating *row, floating m, const floating *t,
                                            const floating *weight, floating *e_out, Py_ssize_t n_classes,
                                            bint write_e, const Params *p, double *a_sum,
                                            double *b_sum) noexcept nogil:
    """Step (2), probability targets: ``_row_sum_exp`` (returns ``s``) and, in the same pass,
    the target sums ``A = sum_c w_c t'_c``, ``B = sum_c w_c t'_c (m - row_c)`` with
    ``t'_c = (1-eps) t_c + eps/C``, formed in float64 as in step (4), so that A and the
    gradient use the same t'. (numba's row_sum_exp and row_target_sums, fused: as two loops
    the float64 accumulators of the second, kept in memory by gcc, were a store-forwarding
    chain, float64 4096 x 1000 loss+grad 7.2 -> 8.4 ms.)"""
    cdef double s_lanes[SUM_LANES]
    cdef double a_lanes[SUM_LANES]
    cdef double b_lanes[SUM_LANES]
    cdef floating tail_e[SUM_LANES]  # the tail's exponentials, copied into e_out after
    cdef Py_ssize_t c
    cdef Py_ssize_t blocked = n_classes - n_classes % SUM_LANES
    _zero_lanes(s_lanes)
    _zero_lanes(a_lanes)
    _zero_lanes(b_lanes)
    for c in range(0, blocked, 16):  # SUM_LANES
        _exp_target_lanes(row + c, m, t + c, weight + c, e_out + c, SUM_LANES, write_e, p, s_lanes, a_lanes,
                          b_lanes)
    if blocked < n_classes:
        _exp_target_lanes(row + blocked, m, t + blocked, weight + blocked, tail_e, n_classes - blocked, write_e,
                          p, s_lanes, a_lanes, b_lanes)
        if write_e:
            memcpy(e_out + blocked, tail_e, (n_classes - blocked) * sizeof(floating))
    a_sum[0] = _lane_sum(a_lanes)
    b_sum[0] = _lane_sum(b_lanes)
    return _lane_sum(s_lanes)


cdef inline double _index_row_loss(double m_minus_x_y, double log_s, double sw, double w_y,
                                   const Params *p) noexcept nogil:
    """Step (3): ``(1-eps) w_y (lse - x_y) + eps/C (sw + W log s)``, one expression for every
    layout and mode. ``lse - x_y`` is summed as ``(m - x_y) + log s``: no rounding of
    ``m + log s`` (which would cost the small losses of confident rows their digits)."""
    cdef double row_loss = p.keep * w_y * (m_minus_x_y + log_s)
    if p.smoothing:
        row_loss += p.spread * (sw + p.weight_total * log_s)
    return row_loss


cdef inline double _index_finish(double m_minus_x_y, double s, double log_s, double sw, double w_y,
                                 const Params *p, double *a, double *y_term) noexcept nogil:
    """Step (3), class-index targets, given ``log_s = _fast_log(s)``: returns the loss; sets
    the gradient coefficient ``a = grad_scale ((1-eps) w_y + eps W / C) / s`` and the target's
    term ``y_term = grad_scale (1-eps) w_y``. Without smoothing W must not enter at all: 0 * W
    is NaN when a weight of a class no row uses is inf or NaN (PyTorch never reads it)."""
    cdef double smoothing = p.spread * p.weight_total if p.smoothing else 0.0
    a[0] = p.grad_scale * (p.keep * w_y + smoothing) / s
    y_term[0] = p.grad_scale * p.keep * w_y
    return _index_row_loss(m_minus_x_y, log_s, sw, w_y, p)


cdef inline double _probability_finish(double s, double a_sum, double b_sum, const Params *p,
                                       double *a) noexcept nogil:
    """Step (3), probability targets: returns ``B + A log s``; sets ``a = grad_scale A / s``."""
    a[0] = p.grad_scale * a_sum / s
    return b_sum + a_sum * _fast_log(s)


cdef inline void _index_grad_row(floating *g, const floating *e, Py_ssize_t y_local, double a, double y_term,
                                 const floating *weight, Py_ssize_t n_classes, const Params *p) noexcept nogil:
    """Step (4), class-index targets: ``g_c = e_c a - b w_c``, then ``g_y -= y_term`` when the
    target is in this row's columns (``y_local >= 0``). ``e`` may be ``g`` itself."""
    cdef floating a_t = <floating>a
    cdef floating b
    cdef Py_ssize_t c
    if p.smoothing:
        b = <floating>(p.grad_scale * p.spread)
        if p.weighted:
            for c in range(n_classes):
                g[c] = e[c] * a_t - b * weight[c]
        else:
            for c in range(n_classes):
                g[c] = e[c] * a_t - b
    else:
        for c in range(n_classes):
            g[c] = e[c] * a_t
    if y_local >= 0:  # y_term rounded, then subtracted: never one FMA with its product
        g[y_local] -= _opaque(<floating>y_term)


cdef inline void _probability_grad_row(floating *g, const floating *e, const floating *t, double a,
                                       const floating *weight, Py_ssize_t n_classes,
                                       const Params *p) noexcept nogil:
    """Step (4), probability targets, in float64: unnormalised targets make ``p_c A`` and
    ``w_c t'_c`` large and nearly equal, and their difference would keep only float32's
    absolute error. ``e`` may be ``g`` itself."""
    cdef Py_ssize_t c
    if p.weighted:
        for c in range(n_classes):
            g[c] = <floating>(<double>e[c] * a - p.grad_scale * (<double>weight[c] * (p.keep * <double>t[c] + p.spread)))
    else:
        for c in range(n_classes):
            g[c] = <floating>(<double>e[c] * a - p.grad_scale * (p.keep * <double>t[c] + p.spread))


# --- the options of the loss: transformed logits, z-loss, row outputs ----------------
# Run only in the row layout, by the copies of the row code that the block functions
# select once per block when ``Params.transformed`` or ``Params.row_outputs`` (the copies
# of the plain loss have none of this code).


cdef inline void _transform_row(const floating *x, floating *xs, Py_ssize_t n_classes,
                                const Params *p) noexcept nogil:
    """The logits the loss sees, into the thread's scratch row ``xs``: ``x'_c = c tanh(u_c)``,
    ``u_c = x_c (a/c)`` (``a/c`` formed in float64, then rounded to the dtype), or
    ``x'_c = a x_c`` without a cap. Steps (1)-(3) then run on ``xs`` as if it were the row."""
    cdef floating scale, cap
    cdef Py_ssize_t c
    if p.softcap > 0:
        scale = <floating>(p.logit_scale / p.softcap)
        cap = <floating>p.softcap
        for c in range(n_classes):
            xs[c] = cap * _fast_tanh(x[c] * scale)
    else:
        scale = <floating>p.logit_scale
        for c in range(n_classes):
            xs[c] = scale * x[c]


cdef inline void _transform_grad_row(floating *g, const floating *xs, Py_ssize_t n_classes,
                                     const Params *p) noexcept nogil:
    """Step (4) of transformed logits, after the target's term: ``g_c *= dx'_c/dx_c``, that is
    ``a (1 - th_c**2)`` with ``th_c = x'_c (1/c)`` re-read from the scratch row (in place the
    row itself is gone), or ``a`` without a cap."""
    cdef floating a = <floating>p.logit_scale
    cdef floating inv_cap, th
    cdef Py_ssize_t c
    if p.softcap > 0:
        inv_cap = <floating>(1.0 / p.softcap)
        for c in range(n_classes):
            th = xs[c] * inv_cap
            g[c] = g[c] * (a * (<floating>1 - th * th))
    else:
        for c in range(n_classes):
            g[c] = g[c] * a


cdef inline bint _argmax_is(const floating *row, floating m, bint no_nan, int64_t y_local,
                            Py_ssize_t n_classes) noexcept nogil:
    """Whether the first index of the row's max is ``y_local`` (``torch.argmax``: ties go to
    the first index, a NaN is the max and the first NaN decides). ``no_nan``: the row's sum
    of exponentials is not NaN, so it holds no NaN and ``m`` is its finite max; then the test
    is ``row_y == m`` and no earlier ``row_c == m`` (a count, which vectorises). Otherwise
    (a NaN, or an infinite max) a scalar search."""
    cdef Py_ssize_t c, ties = 0
    if y_local < 0:
        return False
    if no_nan:
        if row[y_local] != m:
            return False
        for c in range(y_local):
            ties += <Py_ssize_t>(row[c] == m)
        return ties == 0
    for c in range(n_classes):
        if row[c] != row[c]:
            return c == y_local
    for c in range(n_classes):
        if row[c] == m:
            return c == y_local
    return False


cdef inline void _write_row_outputs(double *out, double lse, double log_s, double s, double h, bint kept,
                                    bint correct, const Params *p) noexcept nogil:
    """The row's ``OUT_*`` columns (when ``Params.row_outputs``): lse; the z-loss term
    ``z lse**2`` (0 for an ignored row); with ``Params.stats`` the entropy ``log s + H / s``
    and whether the argmax is the target."""
    out[OUT_LSE] = lse
    out[OUT_Z] = p.z_loss * lse * lse if kept else 0.0
    if p.stats:
        out[OUT_ENTROPY] = log_s + h / s
        out[OUT_CORRECT] = 1.0 if correct else 0.0


# --- the call: one Task ---------------------------------------------------------------


cdef enum Operation:
    XENT_INDEX
    XENT_PROBABILITY
    LOGSUMEXP
    LOG_SOFTMAX
    SOFTMAX


ctypedef struct Task:
    Operation operation
    int mode  # LOSS, GRAD, IN_PLACE, STATS or SHARD_GRAD (cross-entropy only)
    bint lanes  # the small-C layout: LANES rows across the SIMD lanes
    bint double_precision  # the dtype of x, weight, probabilities, out and the scratch
    Py_ssize_t n
    Py_ssize_t n_classes
    Py_ssize_t block_rows  # rows per prange iteration
    Py_ssize_t scratch_elements  # per thread, of the dtype (0: none)
    const void *x  # (n, C) logits
    const int64_t *labels  # (n,) class indices (XENT_INDEX)
    const void *probabilities  # (n, C) targets (XENT_PROBABILITY)
    const void *weight  # (C,) class weights, read when Params.weighted
    double *loss  # (n,) per-row losses
    void *out  # (n, C) gradient / softmax rows, or (n,) logsumexp
    double *rowdata  # (n, rowdata_stride): STATS writes, SHARD_GRAD reads
    Py_ssize_t rowdata_stride
    int storage  # Params.storage: x and out hold 16-bit words (LOSS, GRAD, IN_PLACE, float32)
    Py_ssize_t wide_elements  # per thread, float32: a block's rows widened from the words


cdef inline Py_ssize_t _rows_per_block(Py_ssize_t n_classes) noexcept nogil:
    """Whole rows per prange iteration: about BLOCK_ELEMENTS logits, a multiple of LANES."""
    cdef Py_ssize_t rows = BLOCK_ELEMENTS // n_classes if n_classes > 0 else BLOCK_ELEMENTS
    if rows < 1:
        return 1
    return rows - rows % LANES if rows >= LANES else rows


# --- one row at a time (lanes across the classes) ------------------------------------


cdef inline void _index_row(Py_ssize_t i, const Task *task, const Params *p, const floating *x,
                            const floating *weight, floating *grad, floating *xs, int mode,
                            bint options) noexcept nogil:
    """Steps (1)-(4) of ``mode`` for row i with a class-index target. Step (2) writes the
    exponentials straight into the gradient row, which step (4) rescales; in place that row
    is the logits' own, every element read before it is written, at the same index (see
    IN_PLACE in the module docstring). ``options`` (a constant at every call: the block
    functions pick the copy) adds the options of ``Params``: the transformed logits in the
    thread's scratch row ``xs``, the z-loss and the row outputs ``rowdata[i, OUT_*]``."""
    cdef Py_ssize_t n_classes = task.n_classes
    cdef const floating *row = x + i * n_classes
    cdef int64_t label = task.labels[i]
    cdef bint ignored = label == p.ignore_index
    cdef int64_t y_local = label - p.class_start
    cdef floating *g = grad + i * n_classes if mode != LOSS and mode != STATS else NULL
    cdef double *rowdata
    cdef floating m
    cdef double x_y, s, sw, w_y, a, y_term
    cdef double log_s = 0.0, lse = 0.0, h = 0.0
    cdef bint correct = False
    if ignored and mode != STATS and not (options and p.stats):  # loss 0, gradient 0, y_i never read
        task.loss[i] = 0.0
        if mode != LOSS:
            memset(g, 0, n_classes * sizeof(floating))
        if options and p.row_outputs:
            rowdata = task.rowdata + i * task.rowdata_stride
            rowdata[OUT_LSE] = 0.0
            rowdata[OUT_Z] = 0.0
        return
    if ignored or y_local < 0 or y_local >= n_classes:
        y_local = -1  # the target is not among these columns (a class shard), or ignored
    if mode == SHARD_GRAD:  # (4) from the merged statistics
        rowdata = task.rowdata + i * task.rowdata_stride
        m = <floating>rowdata[COEF_M]
        _row_sum_exp(row, m, g, n_classes, True)
        _index_grad_row(g, g, y_local, rowdata[COEF_A], rowdata[COEF_Y], weight, n_classes, p)
        return
    if options and p.transformed:  # steps (1)-(3) see x', in the scratch row
        _transform_row(row, xs, n_classes, p)
        row = xs
    m = _row_max(row, n_classes)  # (1)
    x_y = <double>row[y_local] if y_local >= 0 else 0.0  # m - x_y is exact in float64
    # (2), the smoothing sum first: in place, the exponentials then overwrite the row
    sw = _row_smoothing_sum(row, m, weight, n_classes, p.weighted) if p.smoothing else 0.0
    if options and p.stats and mode != LOSS and <const void *>g == <const void *>row:
        # in place: the entropy's sum and the argmax test before step (2) overwrites the row
        _row_sum_exp_entropy(row, m, NULL, n_classes, False, &h)
        correct = _argmax_is(row, m, h == h, y_local, n_classes)
        s = _row_sum_exp(row, m, g, n_classes, True)
    elif options and p.stats:  # the row stays: the entropy's sum in step (2)'s pass (same lanes)
        if mode == GRAD or mode == IN_PLACE:
            s = _row_sum_exp_entropy(row, m, g, n_classes, True, &h)
        else:
            s = _row_sum_exp_entropy(row, m, g, n_classes, False, &h)
        correct = _argmax_is(row, m, h == h, y_local, n_classes)
    elif mode == GRAD or mode == IN_PLACE:
        s = _row_sum_exp(row, m, g, n_classes, True)
    else:  # LOSS, STATS: the sum alone
        s = _row_sum_exp(row, m, g, n_classes, False)
    if mode == STATS:
        rowdata = task.rowdata + i * task.rowdata_stride
        rowdata[STAT_M] = m
        rowdata[STAT_S] = s
        rowdata[STAT_TARGET] = x_y
        rowdata[STAT_A] = 0.0
        rowdata[STAT_B] = sw
        return
    if options:
        log_s = _fast_log(s)
        lse = <double>m + log_s
        if p.row_outputs:
            _write_row_outputs(task.rowdata + i * task.rowdata_stride, lse, log_s, s, h, not ignored, correct, p)
        if ignored:  # (with Params.stats only) the statistics above, and loss 0, gradient 0
            task.loss[i] = 0.0
            if mode != LOSS:
                memset(g, 0, n_classes * sizeof(floating))
            return
    w_y = <double>weight[y_local] if p.weighted else 1.0
    if not options:
        log_s = _fast_log(s)
    task.loss[i] = _index_finish(<double>m - x_y, s, log_s, sw, w_y, p, &a, &y_term)  # (3)
    if options and p.z_loss != 0:  # the z-loss's gradient: z_grad_scale 2 z lse e_c / s
        a = a + p.z_grad_scale * 2.0 * p.z_loss * lse / s
    if mode == GRAD or mode == IN_PLACE:  # (4), one name of the row: e is g
        _index_grad_row(g, g, y_local, a, y_term, weight, n_classes, p)
        if options and p.transformed:
            _transform_grad_row(g, xs, n_classes, p)


cdef inline void _probability_row(Py_ssize_t i, const Task *task, const Params *p, const floating *x,
                                  const floating *probabilities, const floating *weight, floating *grad,
                                  floating *xs, int mode, bint options) noexcept nogil:
    """Steps (1)-(4) of ``mode`` for row i with a probability target (the exponentials in
    the gradient row, and the options, as _index_row; every row is kept)."""
    cdef Py_ssize_t n_classes = task.n_classes
    cdef const floating *row = x + i * n_classes
    cdef const floating *t = probabilities + i * n_classes
    cdef floating *g = grad + i * n_classes if mode != LOSS and mode != STATS else NULL
    cdef double *rowdata
    cdef floating m
    cdef double s, a_sum, b_sum, a
    cdef double log_s = 0.0, lse = 0.0, h = 0.0
    if mode == SHARD_GRAD:
        rowdata = task.rowdata + i * task.rowdata_stride
        m = <floating>rowdata[COEF_M]
        _row_sum_exp(row, m, g, n_classes, True)
        _probability_grad_row(g, g, t, rowdata[COEF_A], weight, n_classes, p)
        return
    if options and p.transformed:  # steps (1)-(3) see x', in the scratch row
        _transform_row(row, xs, n_classes, p)
        row = xs
    m = _row_max(row, n_classes)  # (1)
    if options and p.stats:  # before step (2), which in place overwrites the row
        _row_sum_exp_entropy(row, m, NULL, n_classes, False, &h)
    if mode == GRAD or mode == IN_PLACE:  # (2), each element of the row read before it is written
        s = _row_sum_exp_target_sums(row, m, t, weight, g, n_classes, True, p, &a_sum, &b_sum)
    else:
        s = _row_sum_exp_target_sums(row, m, t, weight, g, n_classes, False, p, &a_sum, &b_sum)
    if mode == STATS:
        rowdata = task.rowdata + i * task.rowdata_stride
        rowdata[STAT_M] = m
        rowdata[STAT_S] = s
        rowdata[STAT_TARGET] = 0.0
        rowdata[STAT_A] = a_sum
        rowdata[STAT_B] = b_sum
        return
    task.loss[i] = _probability_finish(s, a_sum, b_sum, p, &a)  # (3)
    if options:
        log_s = _fast_log(s)
        lse = <double>m + log_s
        if p.row_outputs:
            _write_row_outputs(task.rowdata + i * task.rowdata_stride, lse, log_s, s, h, True, False, p)
        if p.z_loss != 0:
            a = a + p.z_grad_scale * 2.0 * p.z_loss * lse / s
    if mode == GRAD or mode == IN_PLACE:  # (4), one name of the row: e is g
        _probability_grad_row(g, g, t, a, weight, n_classes, p)
        if options and p.transformed:
            _transform_grad_row(g, xs, n_classes, p)


# --- few classes: LANES rows across the SIMD lanes --------------------------------------
# For C <= SMALL_C a row's loop over its classes is too short to fill a vector, and the
# per-row steps (the max's dependency chain, a log, a divide, the loss) would each cost a
# scalar operation per row. So LANES rows are transposed into the thread's scratch
# (``buf[c * LANES + r] = x[r0 + r, c]``) and every step becomes a loop over the classes of
# a LANES-wide loop over the rows, which gcc turns into whole vectors. The lane state (the
# max, the sums, the loss, the coefficients) lives in arrays on the stack, which gcc knows
# alias nothing. The lanes past ``k`` (the last group of a block) hold 0 and are computed
# but never stored.


cdef inline void _transpose_in(const floating *x, Py_ssize_t r0, Py_ssize_t k, Py_ssize_t n_classes,
                               floating *buf) noexcept nogil:
    """Rows r0..r0+k-1 of x into ``buf[c * LANES + r]``; the lanes past k hold 0. A whole
    float32 group in registers, 16 rows at a time, where ``_vector_lanes``; else one logit
    at a time."""
    cdef Py_ssize_t r, c
    cdef const floating *row
    if floating is float:
        if _vector_lanes and k == LANES:
            fx_rows_to_lanes16(x + r0 * n_classes, n_classes, buf, LANES)
            fx_rows_to_lanes16(x + (r0 + 16) * n_classes, n_classes, buf + 16, LANES)
            return
    for r in range(k):
        row = x + (r0 + r) * n_classes
        for c in range(n_classes):
            buf[c * LANES + r] = row[c]
    for c in range(n_classes):
        for r in range(k, LANES):
            buf[c * LANES + r] = 0


cdef inline void _transpose_out(const floating *buf, Py_ssize_t r0, Py_ssize_t k, Py_ssize_t n_classes,
                                floating *grad) noexcept nogil:
    """``buf[c * LANES + r]`` into rows r0..r0+k-1 of grad: ``_transpose_in`` backwards. The
    register transposes store whole 16-float windows, which pays from about 8 classes (C = 3:
    a 16-float store for every 3 logits measured slower than the scalar stores)."""
    cdef Py_ssize_t r, c
    cdef floating *g
    if floating is float:
        if _vector_lanes and k == LANES and n_classes >= 8:
            fx_lanes_to_rows16(buf, LANES, n_classes, grad + r0 * n_classes)
            fx_lanes_to_rows16(buf + 16, LANES, n_classes, grad + (r0 + 16) * n_classes)
            return
    for r in range(k):
        g = grad + (r0 + r) * n_classes
        for c in range(n_classes):
            g[c] = buf[c * LANES + r]


cdef inline void _lanes_max(const floating *buf, Py_ssize_t n_classes, floating *m) noexcept nogil:
    """Step (1) on the lanes' rows: ``m[r] = max_c buf[c, r]``, in the logits' dtype (exact:
    any order)."""
    cdef Py_ssize_t c, r
    for r in range(LANES):
        m[r] = buf[r]
    for c in range(1, n_classes):
        for r in range(LANES):
            m[r] = _greater(m[r], buf[c * LANES + r])


cdef inline void _lanes_sum_exp(floating *buf, Py_ssize_t n_classes, const floating *m, double *s,
                                double *h) noexcept nogil:
    """Step (2) on the lanes' rows: ``buf <- exp(buf - m)``, ``s[r] = sum_c buf[c, r]`` in
    float64, the classes in order; unless ``h`` is NULL (a constant at every call), in the
    same pass the entropy's ``h[r] = sum_c e_c (m - x_c)`` (a term 0 where ``e_c = 0``, as in
    _exp_lanes)."""
    cdef Py_ssize_t c, r
    cdef floating z, e
    for r in range(LANES):
        s[r] = 0.0
        if h != NULL:
            h[r] = 0.0
    for c in range(n_classes):
        for r in range(LANES):
            z = buf[c * LANES + r]
            e = _fast_exp(z - m[r])
            buf[c * LANES + r] = e
            s[r] += e
            if h != NULL:
                h[r] += (<double>e * (<double>m[r] - <double>z)) if e != 0 else 0.0


cdef inline void _prefetch_rows_for_write(floating *grad, Py_ssize_t start, Py_ssize_t stop) noexcept nogil:
    """A write hint for ``grad[start:stop]`` (flat), one per cache line: the scalar stores of the
    transposed-out rows otherwise each wait on their line's write-allocate miss."""
    cdef Py_ssize_t per_line = CACHE_LINE // sizeof(floating)
    cdef Py_ssize_t j = start
    while j < stop:
        fx_prefetch_for_write(grad + j)
        j += per_line


cdef inline void _index_lanes(Py_ssize_t r0, Py_ssize_t k, const Task *task, const Params *p, const floating *x,
                              const floating *weight, floating *grad, floating *buf, bint options) noexcept nogil:
    """Steps (1)-(4) for rows r0..r0+k-1 (k <= LANES) with class-index targets. ``options``
    (a constant at each call, as in the row layout) adds those of ``Params``, with
    ``_index_row``'s arithmetic across the lanes: the transformed logits x' in ``buf`` (and a
    copy in the second half of the scratch, ``xs``, for step (4)), the z-loss's gradient
    term, and the row outputs (lse, z-loss term, entropy and whether the first argmax of x'
    is the target)."""
    cdef Py_ssize_t n_classes = task.n_classes
    cdef const int64_t *labels = task.labels
    cdef floating m[LANES]
    cdef floating a_t[LANES]
    cdef double s[LANES]
    cdef double sw[LANES]
    cdef double m_minus_x_y[LANES]
    cdef double w_y[LANES]
    cdef double a[LANES]
    cdef double row_loss[LANES]
    cdef double smoothing = p.spread * p.weight_total if p.smoothing else 0.0
    cdef int32_t target[LANES]
    cdef int32_t class_index
    cdef floating x_y[LANES]
    cdef floating y_term[LANES]
    cdef floating w, b, b_c, g_c
    cdef int64_t label
    cdef Py_ssize_t c, r
    # the options' lane state (unused without them)
    cdef floating *xs = buf + LANES * n_classes
    cdef floating z, e
    cdef double log_s[LANES]
    cdef double lse[LANES]
    cdef double h[LANES]
    cdef int32_t first_max[LANES]
    cdef int32_t first_nan[LANES]
    cdef double *out
    if task.mode != LOSS:  # the NEXT group's gradient rows (see _prefetch_rows_for_write)
        _prefetch_rows_for_write(grad, (r0 + k) * n_classes, min(task.n, r0 + 2 * k) * n_classes)
    _transpose_in(x, r0, k, n_classes, buf)
    if options and p.transformed:  # x' = c tanh(x a/c) or a x, elementwise over the lanes
        _transform_row(buf, buf, LANES * n_classes, p)
        if task.mode != LOSS:
            memcpy(xs, buf, LANES * n_classes * sizeof(floating))
    _lanes_max(buf, n_classes, m)  # (1)
    if options and p.stats:  # before step (2) overwrites buf, as _argmax_is (the entropy's sum: in (2))
        for r in range(LANES):
            first_max[r] = -1
            first_nan[r] = -1
        for c in range(n_classes - 1, -1, -1):  # the first index of the max, and of a NaN
            class_index = <int32_t>c
            for r in range(LANES):
                z = buf[c * LANES + r]
                first_max[r] = class_index if z == m[r] else first_max[r]
                first_nan[r] = class_index if z != z else first_nan[r]
    # the smoothing sums need x, before step (2) overwrites buf
    for r in range(LANES):
        sw[r] = 0.0
    if p.smoothing:
        for c in range(n_classes):
            if p.weighted:
                w = weight[c]
                for r in range(LANES):
                    sw[r] += w * (m[r] - buf[c * LANES + r])
            else:
                for r in range(LANES):
                    sw[r] += m[r] - buf[c * LANES + r]
    # the target's logit and weight, per row, as selects over the classes (vectorised like
    # everything else here; a per-row gather measured 6% of the C = 10 kernel, and so did the
    # per-row target term of step (4)). target[r]: the row's class, -1 for ignored rows and
    # the pad lanes, whose m - x_y and w_y are then 0 (and never stored).
    for r in range(LANES):
        target[r] = -1
    for r in range(k):
        label = labels[r0 + r]
        target[r] = -1 if label == p.ignore_index else <int32_t>label
    for r in range(LANES):
        x_y[r] = 0
        w_y[r] = 0.0
    for c in range(n_classes):
        class_index = <int32_t>c
        for r in range(LANES):
            x_y[r] = buf[c * LANES + r] if target[r] == class_index else x_y[r]
        if p.weighted:
            w = weight[c]
            for r in range(LANES):
                w_y[r] = <double>w if target[r] == class_index else w_y[r]
    for r in range(LANES):
        m_minus_x_y[r] = <double>m[r] - <double>x_y[r] if target[r] >= 0 else 0.0
        if not p.weighted:
            w_y[r] = 1.0 if target[r] >= 0 else 0.0
    if options and p.stats:  # (2) and the entropy's sum H = sum_c e_c (m - x'_c), in one pass
        _lanes_sum_exp(buf, n_classes, m, s, h)
    else:
        _lanes_sum_exp(buf, n_classes, m, s, NULL)  # (2)
    for r in range(LANES):  # (3), the arithmetic of _index_finish, LANES rows at once
        log_s[r] = _fast_log(s[r])
        row_loss[r] = _index_row_loss(m_minus_x_y[r], log_s[r], sw[r], w_y[r], p)
        a[r] = p.grad_scale * (p.keep * w_y[r] + smoothing) / s[r]
    if options:
        for r in range(LANES):
            lse[r] = <double>m[r] + log_s[r]
        if p.z_loss != 0:  # the z-loss's gradient: z_grad_scale 2 z lse e_c / s (as _index_row)
            for r in range(LANES):
                a[r] = a[r] + p.z_grad_scale * 2.0 * p.z_loss * lse[r] / s[r]
        if p.row_outputs:
            for r in range(k):
                out = task.rowdata + (r0 + r) * task.rowdata_stride
                if target[r] < 0 and not p.stats:  # as _index_row's early return
                    out[OUT_LSE] = 0.0
                    out[OUT_Z] = 0.0
                else:
                    _write_row_outputs(out, lse[r], log_s[r], s[r], h[r] if p.stats else 0.0,
                                       target[r] >= 0,
                                       p.stats and target[r] >= 0 and (
                                           first_nan[r] == target[r] if first_nan[r] >= 0
                                           else first_max[r] == target[r]), p)
    for r in range(k):
        task.loss[r0 + r] = row_loss[r] if target[r] >= 0 else 0.0
    if task.mode == LOSS:
        return
    for r in range(LANES):
        a_t[r] = <floating>a[r]
        y_term[r] = <floating>(p.grad_scale * p.keep * w_y[r])
    # as fx_opaque in _index_grad_row: y_term may no longer be seen as the product that made
    # it, so that g_y - y_term below is not contracted into one fused multiply-add
    fx_launder_lanes(y_term)
    b = <floating>(p.grad_scale * p.spread)
    for c in range(n_classes):  # (4): g = e a - b w_c, minus the target's term; ignored rows 0
        if p.smoothing:
            b_c = b * weight[c] if p.weighted else b
        else:
            b_c = 0
        class_index = <int32_t>c
        for r in range(LANES):
            g_c = buf[c * LANES + r] * a_t[r] - b_c
            g_c = g_c - y_term[r] if target[r] == class_index else g_c
            buf[c * LANES + r] = g_c if target[r] >= 0 else 0
    if options and p.transformed:  # g *= dx'/dx after the target's term, elementwise
        _transform_grad_row(buf, xs, LANES * n_classes, p)
        for c in range(n_classes):  # ignored rows: 0 whatever the factor (as the row layout's memset)
            for r in range(LANES):
                buf[c * LANES + r] = buf[c * LANES + r] if target[r] >= 0 else 0
    _transpose_out(buf, r0, k, n_classes, grad)


cdef inline void _probability_lanes(Py_ssize_t r0, Py_ssize_t k, const Task *task, const Params *p,
                                    const floating *x, const floating *probabilities, const floating *weight,
                                    floating *grad, floating *buf) noexcept nogil:
    """Steps (1)-(4) for rows r0..r0+k-1 (k <= LANES) with probability targets; the targets
    are transposed into the second half of ``buf``."""
    cdef Py_ssize_t n_classes = task.n_classes
    cdef floating *tbuf = buf + LANES * n_classes
    cdef floating m[LANES]
    cdef double s[LANES]
    cdef double a_sum[LANES]
    cdef double b_sum[LANES]
    cdef double a[LANES]
    cdef double row_loss[LANES]
    cdef double w, wt
    cdef Py_ssize_t c, r
    if task.mode != LOSS:
        _prefetch_rows_for_write(grad, (r0 + k) * n_classes, min(task.n, r0 + 2 * k) * n_classes)
    _transpose_in(x, r0, k, n_classes, buf)
    _transpose_in(probabilities, r0, k, n_classes, tbuf)
    _lanes_max(buf, n_classes, m)  # (1)
    for r in range(LANES):
        a_sum[r] = 0.0
        b_sum[r] = 0.0
    for c in range(n_classes):  # (2) the target sums, in float64 (see _row_sum_exp_target_sums)
        w = <double>weight[c] if p.weighted else 1.0
        for r in range(LANES):
            wt = p.keep * <double>tbuf[c * LANES + r] + p.spread
            if p.weighted:
                wt = w * wt
            a_sum[r] += wt
            b_sum[r] += wt * (m[r] - buf[c * LANES + r])
    _lanes_sum_exp(buf, n_classes, m, s, NULL)  # (2)
    for r in range(LANES):  # (3), the arithmetic of _probability_finish, LANES rows at once
        row_loss[r] = b_sum[r] + a_sum[r] * _fast_log(s[r])
        a[r] = p.grad_scale * a_sum[r] / s[r]
    for r in range(k):
        task.loss[r0 + r] = row_loss[r]
    if task.mode == LOSS:
        return
    for c in range(n_classes):  # (4) in float64, as _probability_grad_row
        w = <double>weight[c] if p.weighted else 1.0
        for r in range(LANES):
            wt = p.keep * <double>tbuf[c * LANES + r] + p.spread
            if p.weighted:
                wt = w * wt
            buf[c * LANES + r] = <floating>(<double>buf[c * LANES + r] * a[r] - p.grad_scale * wt)
    _transpose_out(buf, r0, k, n_classes, grad)


# --- the block functions: one per operation and layout, multiversioned ---------------


cdef inline void _index_loss_row_group(Py_ssize_t i0, Py_ssize_t count, const Task *task, const Params *p,
                                       const floating *x, const floating *weight) noexcept nogil:
    """``_index_row`` in LOSS without the options, for rows i0..i0+count-1 (count <=
    ROW_GROUP), in two phases with the same arithmetic: steps (1)-(2) row by row, then step
    (3) for the whole group as one loop over its rows (gcc vectorises the log and the divide
    across them). One row at a time, each row's step (3) (lane sum, log, loss) is a chain of
    ~100 cycles behind its sum; in a group the chains run side by side (float32 65536 x 128
    loss only, 2 threads, 2.70 -> 2.30 ms). Not for GRAD: there the gradient rows wait in
    L1 for their step (4) and the group measured ~4% slower."""
    cdef Py_ssize_t n_classes = task.n_classes
    cdef const floating *row
    cdef floating m
    cdef int64_t label
    cdef Py_ssize_t r, i, y_local
    cdef bint ignored[ROW_GROUP]
    cdef double s[ROW_GROUP]
    cdef double sw[ROW_GROUP]
    cdef double m_minus_x_y[ROW_GROUP]
    cdef double w_y[ROW_GROUP]
    cdef double row_loss[ROW_GROUP]
    for r in range(ROW_GROUP):  # the lanes past count and the ignored rows: s = 1, every term 0
        ignored[r] = True
        s[r] = 1.0
        sw[r] = 0.0
        m_minus_x_y[r] = 0.0
        w_y[r] = 0.0
    for r in range(count):  # (1), (2)
        i = i0 + r
        label = task.labels[i]
        if label == p.ignore_index:  # loss 0, y_i never read
            continue
        ignored[r] = False
        row = x + i * n_classes
        y_local = label - p.class_start
        if y_local < 0 or y_local >= n_classes:
            y_local = -1  # the target is not among these columns
        m = _row_max(row, n_classes)
        m_minus_x_y[r] = <double>m - (<double>row[y_local] if y_local >= 0 else 0.0)
        if p.smoothing:
            sw[r] = _row_smoothing_sum(row, m, weight, n_classes, p.weighted)
        w_y[r] = <double>weight[y_local] if p.weighted else 1.0
        s[r] = _row_sum_exp(row, m, NULL, n_classes, False)
    for r in range(ROW_GROUP):  # (3), the loss of _index_finish across the group
        row_loss[r] = _index_row_loss(m_minus_x_y[r], _fast_log(s[r]), sw[r], w_y[r], p)
    for r in range(count):
        task.loss[i0 + r] = 0.0 if ignored[r] else row_loss[r]


cdef fx_hot_void _index_rows(Task task, Params p, Py_ssize_t start, Py_ssize_t stop,
                             floating *scratch) noexcept nogil:
    """Rows [start, stop) with class-index targets, one at a time, without the options
    (``scratch`` is NULL: the plain row layout needs none; its type picks the
    specialisation)."""
    cdef const floating *x = <const floating *>task.x
    cdef const floating *weight = <const floating *>task.weight
    cdef floating *grad = <floating *>task.out
    cdef Py_ssize_t i
    # the mode's branch out of the row loop: in the loops of the hot modes it is a constant,
    # and gcc drops the other modes' code from the row (one loop for every mode measured 3%
    # slower at 4096 x 1000, float32 loss+grad). IN_PLACE runs GRAD's very code.
    if task.mode == GRAD or task.mode == IN_PLACE:
        for i in range(start, stop):
            _index_row(i, &task, &p, x, weight, grad, scratch, GRAD, False)
    elif task.mode == LOSS:  # ROW_GROUP rows at a time (a counted loop: see _index_lane_groups)
        for i in range((stop - start + ROW_GROUP - 1) // ROW_GROUP):
            _index_loss_row_group(start + i * ROW_GROUP, min(<Py_ssize_t>ROW_GROUP, stop - start - i * ROW_GROUP),
                                  &task, &p, x, weight)
    else:
        for i in range(start, stop):
            _index_row(i, &task, &p, x, weight, grad, scratch, task.mode, False)


cdef fx_hot_void _index_rows_with_options(Task task, Params p, Py_ssize_t start, Py_ssize_t stop,
                                          floating *scratch) noexcept nogil:
    """Rows [start, stop) with class-index targets and the options of ``Params`` (transformed
    logits, row outputs), one at a time, in LOSS, GRAD or IN_PLACE. ``scratch``: a row for
    the transformed logits x' when ``Params.transformed``, else NULL. A block function of its
    own, so that the plain one's code is what it was."""
    cdef const floating *x = <const floating *>task.x
    cdef const floating *weight = <const floating *>task.weight
    cdef floating *grad = <floating *>task.out
    cdef Py_ssize_t i
    if task.mode == LOSS:
        for i in range(start, stop):
            _index_row(i, &task, &p, x, weight, grad, scratch, LOSS, True)
    else:
        for i in range(start, stop):
            _index_row(i, &task, &p, x, weight, grad, scratch, GRAD, True)


cdef fx_hot_void _index_lane_groups(Task task, Params p, Py_ssize_t start, Py_ssize_t stop,
                                    floating *scratch) noexcept nogil:
    """Rows [start, stop) with class-index targets, LANES at a time across the lanes."""
    cdef const floating *x = <const floating *>task.x
    cdef const floating *weight = <const floating *>task.weight
    cdef floating *grad = <floating *>task.out
    cdef Py_ssize_t group, r0
    for group in range((stop - start + LANES - 1) // LANES):  # a counted loop (a while loop measured slower)
        r0 = start + group * LANES
        _index_lanes(r0, min(<Py_ssize_t>LANES, stop - r0), &task, &p, x, weight, grad, scratch, False)


cdef fx_hot_void _index_lane_groups_with_options(Task task, Params p, Py_ssize_t start, Py_ssize_t stop,
                                                 floating *scratch) noexcept nogil:
    """_index_lane_groups with the options of ``Params`` (a block function of its own, so
    that the plain one's code is what it was)."""
    cdef const floating *x = <const floating *>task.x
    cdef const floating *weight = <const floating *>task.weight
    cdef floating *grad = <floating *>task.out
    cdef Py_ssize_t group, r0
    for group in range((stop - start + LANES - 1) // LANES):
        r0 = start + group * LANES
        _index_lanes(r0, min(<Py_ssize_t>LANES, stop - r0), &task, &p, x, weight, grad, scratch, True)


cdef fx_hot_void _probability_rows(Task task, Params p, Py_ssize_t start, Py_ssize_t stop,
                                   floating *scratch) noexcept nogil:
    """Rows [start, stop) with probability targets, one at a time, without the options
    (``scratch`` is NULL)."""
    cdef const floating *x = <const floating *>task.x
    cdef const floating *probabilities = <const floating *>task.probabilities
    cdef const floating *weight = <const floating *>task.weight
    cdef floating *grad = <floating *>task.out
    cdef Py_ssize_t i
    if task.mode == GRAD or task.mode == IN_PLACE:  # (see _index_rows)
        for i in range(start, stop):
            _probability_row(i, &task, &p, x, probabilities, weight, grad, scratch, GRAD, False)
    elif task.mode == LOSS:
        for i in range(start, stop):
            _probability_row(i, &task, &p, x, probabilities, weight, grad, scratch, LOSS, False)
    else:
        for i in range(start, stop):
            _probability_row(i, &task, &p, x, probabilities, weight, grad, scratch, task.mode, False)


cdef fx_hot_void _probability_rows_with_options(Task task, Params p, Py_ssize_t start, Py_ssize_t stop,
                                                floating *scratch) noexcept nogil:
    """Rows [start, stop) with probability targets and the options (as
    _index_rows_with_options)."""
    cdef const floating *x = <const floating *>task.x
    cdef const floating *probabilities = <const floating *>task.probabilities
    cdef const floating *weight = <const floating *>task.weight
    cdef floating *grad = <floating *>task.out
    cdef Py_ssize_t i
    if task.mode == LOSS:
        for i in range(start, stop):
            _probability_row(i, &task, &p, x, probabilities, weight, grad, scratch, LOSS, True)
    else:
        for i in range(start, stop):
            _probability_row(i, &task, &p, x, probabilities, weight, grad, scratch, GRAD, True)


cdef fx_hot_void _probability_lane_groups(Task task, Params p, Py_ssize_t start,
                                          Py_ssize_t stop, floating *scratch) noexcept nogil:
    """Rows [start, stop) with probability targets, LANES at a time across the lanes."""
    cdef const floating *x = <const floating *>task.x
    cdef const floating *probabilities = <const floating *>task.probabilities
    cdef const floating *weight = <const floating *>task.weight
    cdef floating *grad = <floating *>task.out
    cdef Py_ssize_t group, r0
    for group in range((stop - start + LANES - 1) // LANES):
        r0 = start + group * LANES
        _probability_lanes(r0, min(<Py_ssize_t>LANES, stop - r0), &task, &p, x, probabilities, weight, grad,
                           scratch)


cdef double _sum_exp_unshifted(const floating *row, Py_ssize_t n_classes) noexcept nogil:
    """``sum_c exp(row_c)`` with libm's exp, in order: the rare rows whose max is infinite
    (where the result is -inf, +inf or NaN whatever the rounding)."""
    cdef double s = 0.0
    cdef Py_ssize_t c
    for c in range(n_classes):
        s += exp(row[c])
    return s


cdef fx_hot_void _logsumexp_rows(Task task, Py_ssize_t start, Py_ssize_t stop,
                                 floating *scratch) noexcept nogil:
    """``out_i = m + log(sum_c exp(x_ic - m))``, steps (1)-(3)."""
    cdef Py_ssize_t n_classes = task.n_classes
    cdef const floating *x = <const floating *>task.x
    cdef floating *out = <floating *>task.out
    cdef const floating *row
    cdef floating m
    cdef Py_ssize_t i
    for i in range(start, stop):
        row = x + i * n_classes
        m = _row_max(row, n_classes)
        if isinf(m):  # as torch: all -inf -> log 0 = -inf; a +inf -> +inf (not inf - inf)
            out[i] = <floating>log(_sum_exp_unshifted(row, n_classes))
        else:  # the terms are not kept (scratch is NULL and never written)
            out[i] = <floating>(m + log(_row_sum_exp(row, m, scratch, n_classes, False)))


cdef fx_hot_void _log_softmax_rows(Task task, Py_ssize_t start, Py_ssize_t stop,
                                   floating *scratch) noexcept nogil:
    """``o_c = (row_c - m) - log(s)``: steps (1)-(3), then one write per element."""
    cdef Py_ssize_t n_classes = task.n_classes
    cdef const floating *x = <const floating *>task.x
    cdef floating *out = <floating *>task.out
    cdef const floating *row
    cdef floating *o
    cdef floating m, log_s
    cdef Py_ssize_t i, c
    for i in range(start, stop):
        row = x + i * n_classes
        o = out + i * n_classes
        m = _row_max(row, n_classes)
        log_s = <floating>log(_row_sum_exp(row, m, scratch, n_classes, False))
        for c in range(n_classes):
            o[c] = (row[c] - m) - log_s


cdef fx_hot_void _softmax_rows(Task task, Py_ssize_t start, Py_ssize_t stop,
                               floating *scratch) noexcept nogil:
    """``o_c = exp(row_c - m) / s``: steps (1)-(2) write e into o, then scale by 1/s."""
    cdef Py_ssize_t n_classes = task.n_classes
    cdef const floating *x = <const floating *>task.x
    cdef floating *out = <floating *>task.out
    cdef const floating *row
    cdef floating *o
    cdef floating m, inv_s
    cdef Py_ssize_t i, c
    for i in range(start, stop):
        row = x + i * n_classes
        o = out + i * n_classes
        m = _row_max(row, n_classes)
        inv_s = <floating>(1.0 / _row_sum_exp(row, m, o, n_classes, True))
        for c in range(n_classes):
            o[c] = o[c] * inv_s


cdef inline void _block(const Task *task, const Params *p, Py_ssize_t start, Py_ssize_t stop,
                        floating *scratch) noexcept nogil:
    """Rows [start, stop) of the task: the block function of its operation and layout."""
    cdef bint options = p.transformed or p.row_outputs  # (the fused modes only: _check_options)
    if task.operation == XENT_INDEX:
        if task.lanes and options:
            _index_lane_groups_with_options(task[0], p[0], start, stop, scratch)
        elif task.lanes:
            _index_lane_groups(task[0], p[0], start, stop, scratch)
        elif options:
            _index_rows_with_options(task[0], p[0], start, stop, scratch)
        else:
            _index_rows(task[0], p[0], start, stop, scratch)
    elif task.operation == XENT_PROBABILITY:
        if task.lanes:
            _probability_lane_groups(task[0], p[0], start, stop, scratch)
        elif options:
            _probability_rows_with_options(task[0], p[0], start, stop, scratch)
        else:
            _probability_rows(task[0], p[0], start, stop, scratch)
    elif task.operation == LOGSUMEXP:
        _logsumexp_rows(task[0], start, stop, scratch)
    elif task.operation == LOG_SOFTMAX:
        _log_softmax_rows(task[0], start, stop, scratch)
    else:
        _softmax_rows(task[0], start, stop, scratch)


cdef inline void _words_block(const Task *task, const Params *p, Py_ssize_t start, Py_ssize_t stop,
                              float *scratch, float *wide) noexcept nogil:
    """Rows [start, stop) of a task on 16-bit words: widened into the thread's float32 rows
    ``wide`` (a block, ~128 KB: it stays in L2), run there by the float32 block function as
    IN_PLACE (GRAD too: the gradient of the widened rows is written over them, which gives
    the same bits as GRAD, see IN_PLACE in the module docstring), then rounded back into the
    gradient's words. So every number is the float32 kernel's on ``x.astype(float32)``,
    rounded once, and the logits and the gradient cross memory as 16-bit words only."""
    cdef Py_ssize_t n_classes = task.n_classes
    cdef Py_ssize_t count = (stop - start) * n_classes
    cdef Task rows = task[0]
    fx_widen_words(<const uint16_t *>task.x + start * n_classes, wide, count, task.storage)
    rows.storage = STORAGE_NATIVE
    rows.x = wide
    rows.out = wide
    rows.mode = IN_PLACE if task.mode == GRAD else task.mode
    rows.n = stop - start
    rows.labels = task.labels + start
    rows.loss = task.loss + start
    if p.row_outputs:
        rows.rowdata = task.rowdata + start * task.rowdata_stride
    _block(&rows, p, 0, stop - start, scratch)
    if task.mode == GRAD or task.mode == IN_PLACE:
        fx_narrow_words(wide, <uint16_t *>task.out + start * n_classes, count, task.storage)


# --- THE parallel loop -----------------------------------------------------------------


cdef int _run_blocks(const Task *task, const Params *p) noexcept nogil:
    """Every block of rows of the task, on the OpenMP threads; returns -1 (and leaves rows
    undone) if a thread could not allocate its scratch.

    Blocks (``task.block_rows`` whole rows, about BLOCK_ELEMENTS logits) go to the threads
    one at a time (schedule dynamic, chunk 1): a static split would make a thread whose core
    is busy with another process hold everyone up. Each row is computed by exactly one
    thread, in the same way whichever it is, so every result is the same for any thread
    count. Each thread allocates its scratch once per call, on its own cache lines with a
    line of padding after it (two threads writing the two ends of one line made 2 threads
    slower than 1 in the numba kernels' small-C layout)."""
    cdef Py_ssize_t n_blocks = (task.n + task.block_rows - 1) // task.block_rows
    cdef size_t itemsize = sizeof(double) if task.double_precision else sizeof(float)
    cdef size_t scratch_lines = (task.scratch_elements * itemsize + CACHE_LINE - 1) // CACHE_LINE
    cdef size_t scratch_bytes = (scratch_lines + 1) * CACHE_LINE if task.scratch_elements != 0 else 0
    cdef size_t wide_lines = (task.wide_elements * sizeof(float) + CACHE_LINE - 1) // CACHE_LINE
    cdef size_t wide_bytes = (wide_lines + 1) * CACHE_LINE if task.wide_elements != 0 else 0
    cdef int failed = 0
    cdef int *failed_flag = &failed  # written through, so not a thread-private copy
    cdef void *scratch = NULL  # each thread's own (Cython makes it firstprivate)
    cdef float *wide = NULL  # likewise: a block of widened 16-bit rows (task.storage)
    cdef Py_ssize_t block, start, stop
    if task.n == 0 or task.n_classes == 0:
        return 0
    with parallel():
        scratch = fx_aligned_alloc(scratch_bytes) if scratch_bytes != 0 else NULL
        wide = <float *>fx_aligned_alloc(wide_bytes) if wide_bytes != 0 else NULL
        if (scratch_bytes != 0 and scratch == NULL) or (wide_bytes != 0 and wide == NULL):
            failed_flag[0] = 1
        for block in prange(n_blocks, schedule="dynamic", chunksize=1):
            start = block * task.block_rows
            stop = min(start + task.block_rows, task.n)
            if (scratch_bytes == 0 or scratch != NULL) and (wide_bytes == 0 or wide != NULL):
                if task.storage != STORAGE_NATIVE:
                    _words_block(task, p, start, stop, <float *>scratch, wide)
                elif task.double_precision:
                    _block(task, p, start, stop, <double *>scratch)
                else:
                    _block(task, p, start, stop, <float *>scratch)
        fx_aligned_free(scratch)
        fx_aligned_free(wide)
    return -1 if failed else 0


cdef int _run(const Task *task, const Params *p) except -1:
    """``_run_blocks`` without the GIL; MemoryError if a thread's scratch failed."""
    cdef int status
    with nogil:
        status = _run_blocks(task, p)
    if status != 0:
        raise MemoryError("fastxent: could not allocate a thread's scratch")
    return 0


# --- the backend interface (called by fastxent/_cy_backend.py) -------------------------


cdef Task _rows_task(Operation operation, Py_ssize_t n, Py_ssize_t n_classes, bint double_precision) noexcept:
    """A Task of ``n`` rows of ``n_classes``: the row layout, no mode, no scratch, no arrays."""
    cdef Task task
    memset(&task, 0, sizeof(Task))
    task.operation = operation
    task.double_precision = double_precision
    task.n = n
    task.n_classes = n_classes
    task.block_rows = _rows_per_block(n_classes)
    return task


cdef Task _xent_task(Operation operation, int mode, bint lanes, Py_ssize_t n, Py_ssize_t n_classes,
                     bint double_precision, const Params *p) noexcept:
    """A cross-entropy Task, with the scratch its layout needs per thread: the lanes' rows
    transposed (and their targets); the row layout needs one row for the transformed logits
    when ``Params.transformed``, else none."""
    cdef Task task = _rows_task(operation, n, n_classes, double_precision)
    task.mode = mode
    task.lanes = lanes
    if lanes:
        # the probabilities' lanes, or x' kept for step (4) (transformed logits)
        task.scratch_elements = (2 if operation == XENT_PROBABILITY or p.transformed else 1) * LANES * n_classes
    elif p.transformed:
        task.scratch_elements = n_classes
    return task


cdef int _check_options(int mode, bint lanes, const Params *p, bint lanes_have_options) except -1:
    """The options run in the fused modes only, and in the lanes layout of class-index targets
    (``lanes_have_options``; the probability lanes and the class-shard modes have no code for
    them): a caller that asks for more is wrong."""
    if (p.transformed or p.row_outputs) and ((lanes and not lanes_have_options) or mode not in (LOSS, GRAD, IN_PLACE)):
        raise ValueError(
            "transformed logits and row outputs run in LOSS, GRAD and IN_PLACE only, "
            "and in the lanes layout for class-index targets only"
        )
    return 0


cdef void _set_arrays(Task *task, const void *x, const void *weight, double *loss, void *out,
                      double[:, ::1] rowdata) noexcept:
    """The arrays every fused call has (the target's own field is set by the caller)."""
    task.x = x
    task.weight = weight
    task.loss = loss
    task.out = out
    task.rowdata = &rowdata[0, 0]
    task.rowdata_stride = rowdata.shape[1]


def xent_index(const floating[:, ::1] x, const int64_t[::1] y, const floating[::1] weight, params, int mode,
               bint lanes, double[::1] loss, floating[:, ::1] grad, double[:, ::1] rowdata):
    """Steps (1)-(4) of ``mode`` for class-index targets, in the row layout or (``lanes``)
    the small-C one; see ``xent_index`` and ``_xent`` in _cy_backend.py for the arguments.
    ``rowdata``: the statistics (STATS writes them), the coefficients (SHARD_GRAD reads
    them), or in LOSS, GRAD and IN_PLACE with ``params.row_outputs`` the row outputs
    (n, N_OUTS). The options of ``params`` (transformed logits, row outputs) run in both
    layouts."""
    cdef Params p = _unpack_params(params)
    _check_options(mode, lanes, &p, True)
    cdef Task task = _xent_task(XENT_INDEX, mode, lanes, x.shape[0], x.shape[1], floating is double, &p)
    if task.n == 0:
        return
    task.labels = &y[0]
    _set_arrays(&task, &x[0, 0], &weight[0] if weight.shape[0] != 0 else NULL, &loss[0], &grad[0, 0], rowdata)
    _run(&task, &p)


def xent_index_words(const uint16_t[:, ::1] x, const int64_t[::1] y, const float[::1] weight, params, int mode,
                     bint lanes, double[::1] loss, uint16_t[:, ::1] grad, double[:, ::1] rowdata):
    """xent_index on logits and a gradient held as 16-bit words (``params.storage``:
    bfloat16 or float16), computed in float32 block by block (``_words_block``); LOSS, GRAD
    and IN_PLACE only. The arguments otherwise as xent_index's, ``weight`` float32."""
    cdef Params p = _unpack_params(params)
    if p.storage == STORAGE_NATIVE:
        raise ValueError("xent_index_words needs params.storage bfloat16 or float16")
    if mode not in (LOSS, GRAD, IN_PLACE):
        raise ValueError("16-bit words run in LOSS, GRAD and IN_PLACE only")
    _check_options(mode, lanes, &p, True)
    cdef Task task = _xent_task(XENT_INDEX, mode, lanes, x.shape[0], x.shape[1], False, &p)
    if task.n == 0:
        return
    task.storage = <int>p.storage
    task.wide_elements = task.block_rows * task.n_classes
    task.labels = &y[0]
    _set_arrays(&task, &x[0, 0], &weight[0] if weight.shape[0] != 0 else NULL, &loss[0], &grad[0, 0], rowdata)
    _run(&task, &p)


def xent_probability(const floating[:, ::1] x, const floating[:, ::1] t, const floating[::1] weight, params,
                     int mode, bint lanes, double[::1] loss, floating[:, ::1] grad, double[:, ::1] rowdata):
    """Steps (1)-(4) of ``mode`` for probability targets ``t`` (n, C) of x's dtype (the other
    arguments as xent_index)."""
    cdef Params p = _unpack_params(params)
    _check_options(mode, lanes, &p, False)
    cdef Task task = _xent_task(XENT_PROBABILITY, mode, lanes, x.shape[0], x.shape[1], floating is double, &p)
    if task.n == 0:
        return
    task.probabilities = &t[0, 0]
    _set_arrays(&task, &x[0, 0], &weight[0] if weight.shape[0] != 0 else NULL, &loss[0], &grad[0, 0], rowdata)
    _run(&task, &p)


def logsumexp_rows(const floating[:, ::1] x, floating[::1] out):
    """``out_i = m + log(sum_c exp(x_ic - m))``, steps (1)-(3); out (n,) of x's dtype."""
    cdef Params p = _zero_params()
    cdef Task task = _rows_task(LOGSUMEXP, x.shape[0], x.shape[1], floating is double)
    if task.n == 0:
        return
    task.x = &x[0, 0]
    task.out = &out[0]
    _run(&task, &p)


def log_softmax_rows(const floating[:, ::1] x, floating[:, ::1] out):
    """``out_ic = (x_ic - m) - log(s)``; out may be x itself."""
    cdef Params p = _zero_params()
    cdef Task task = _rows_task(LOG_SOFTMAX, x.shape[0], x.shape[1], floating is double)
    if task.n == 0:
        return
    task.x = &x[0, 0]
    task.out = &out[0, 0]
    _run(&task, &p)


def softmax_rows(const floating[:, ::1] x, floating[:, ::1] out):
    """``out_ic = exp(x_ic - m) / s``; out may be x itself."""
    cdef Params p = _zero_params()
    cdef Task task = _rows_task(SOFTMAX, x.shape[0], x.shape[1], floating is double)
    if task.n == 0:
        return
    task.x = &x[0, 0]
    task.out = &out[0, 0]
    _run(&task, &p)


# --- finish: step (3) from merged statistics (class shards) ------------------------------


cdef fx_hot_void _finish_index_rows(const double[:, ::1] stats, const int64_t[::1] y, const double[::1] weight,
                                    const Params *p, double[::1] loss, double[:, ::1] coef) noexcept nogil:
    """Step (3) from merged row statistics: loss and the coefficients of (4). One thread, in
    the same clone (so with the same fast_log) as the fused kernels."""
    cdef Py_ssize_t i
    cdef int64_t label
    cdef double w_y, a, y_term
    for i in range(stats.shape[0]):
        label = y[i]
        coef[i, COEF_M] = stats[i, STAT_M]
        if label == p.ignore_index:
            loss[i] = 0.0
            coef[i, COEF_A] = 0.0
            coef[i, COEF_Y] = 0.0
            continue
        w_y = weight[label] if p.weighted else 1.0
        loss[i] = _index_finish(stats[i, STAT_M] - stats[i, STAT_TARGET], stats[i, STAT_S],
                                _fast_log(stats[i, STAT_S]), stats[i, STAT_B], w_y, p, &a, &y_term)
        coef[i, COEF_A] = a
        coef[i, COEF_Y] = y_term


cdef fx_hot_void _finish_probability_rows(const double[:, ::1] stats, const Params *p, double[::1] loss,
                                          double[:, ::1] coef) noexcept nogil:
    cdef Py_ssize_t i
    cdef double a
    for i in range(stats.shape[0]):
        loss[i] = _probability_finish(stats[i, STAT_S], stats[i, STAT_A], stats[i, STAT_B], p, &a)
        coef[i, COEF_M] = stats[i, STAT_M]
        coef[i, COEF_A] = a
        coef[i, COEF_Y] = 0.0


def finish_index(const double[:, ::1] stats, const int64_t[::1] y, const double[::1] weight, params,
                 double[::1] loss, double[:, ::1] coef):
    """Step (3), class-index targets, from ``stats`` (n, N_STATS): ``loss`` (n,) and ``coef``
    (n, N_COEFS). ``weight``: the FULL class weights in float64 (read when params.weighted)."""
    cdef Params p = _unpack_params(params)
    with nogil:
        _finish_index_rows(stats, y, weight, &p, loss, coef)


def finish_probability(const double[:, ::1] stats, params, double[::1] loss, double[:, ::1] coef):
    """Step (3), probability targets, from ``stats``: ``loss`` and ``coef``."""
    cdef Params p = _unpack_params(params)
    with nogil:
        _finish_probability_rows(stats, &p, loss, coef)


cdef fx_hot_void _count_labels(const label_t *y, Py_ssize_t n, Py_ssize_t n_classes, int64_t ignore_index,
                               Py_ssize_t *kept, Py_ssize_t *bad) noexcept nogil:
    """``kept`` = the labels that are not ignore_index, ``bad`` = those of them outside
    [0, n_classes): one pass without branches (label_stats)."""
    cdef Py_ssize_t i, kept_count = 0, bad_count = 0
    cdef int64_t label
    cdef Py_ssize_t keep
    for i in range(n):
        label = y[i]
        keep = label != ignore_index
        kept_count += keep
        bad_count += keep & (<uint64_t>label >= <uint64_t>n_classes)
    kept[0] = kept_count
    bad[0] = bad_count


def label_stats(const label_t[::1] y, Py_ssize_t n_classes, int64_t ignore_index, const floating[::1] weight):
    """Checks labels before any kernel runs and sums the "mean" denominator.

    Returns ``(first_bad, total)``: the first row whose label is neither ignore_index nor
    in [0, n_classes) (-1 if none), and ``D = sum_i [y_i != ignore_index] w[y_i]`` in
    float64 (the count of kept rows when weight has length 0), summed in row order.

    Without weights, one branch-free pass counts the kept rows and the bad labels (integer
    counts, which gcc vectorises: the float64 ``total += 1.0`` in row order was a chain of
    dependent additions, 0.21 ms for 262144 labels, a tenth of the whole 262144 x 10 call on
    two threads); only when a label is bad does the row-order loop run, to find the first.
    ``double(count)`` is the row-order sum of ones exactly (below 2**53).
    """
    cdef bint has_weight = weight.shape[0] != 0
    cdef double total = 0.0
    cdef Py_ssize_t i, first_bad = -1
    cdef Py_ssize_t kept = 0, bad = 0
    cdef int64_t yi
    with nogil:
        if not has_weight:
            _count_labels(&y[0] if y.shape[0] else NULL, y.shape[0], n_classes, ignore_index, &kept, &bad)
            total = <double>kept
        if has_weight or bad != 0:
            total = 0.0
            for i in range(y.shape[0]):
                yi = y[i]
                if yi == ignore_index:
                    continue
                if yi < 0 or yi >= n_classes:
                    first_bad = i
                    break
                total += weight[yi] if has_weight else 1.0
    return first_bad, total


# --- the elementary functions alone, for their accuracy tests --------------------------


cdef fx_hot_void _exp_elements(const floating *t, floating *out, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(n):
        out[j] = _fast_exp(t[j])


cdef fx_hot_void _log_elements(const double *s, double *out, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(n):
        out[j] = _fast_log(s[j])


cdef fx_hot_void _tanh_elements(const floating *u, floating *out, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(n):
        out[j] = _fast_tanh(u[j])


def exp_array(const floating[::1] t, floating[::1] out):
    """``out[j] = fast_exp(t[j])``: the exponential alone (in the clone the kernels use),
    for its accuracy test and the comparison with the numba one."""
    if t.shape[0] != 0:
        _exp_elements(&t[0], &out[0], t.shape[0])


def widen_words_array(const uint16_t[::1] words, int storage, float[::1] out):
    """``out[j]``: the float32 value of the 16-bit word ``words[j]`` (STORAGE_BF16 or
    STORAGE_F16), by the conversion xent_index_words uses; for its test."""
    if storage not in (STORAGE_BF16, STORAGE_F16) or (storage == STORAGE_F16 and not FX_FLOAT16):
        raise ValueError(f"no 16-bit conversion for storage {storage}")
    if words.shape[0] != 0:
        fx_widen_words(&words[0], &out[0], words.shape[0], storage)


def narrow_words_array(const float[::1] values, int storage, uint16_t[::1] out):
    """``out[j]``: float32 ``values[j]`` rounded to the nearest even 16-bit word, as
    xent_index_words rounds the gradient; for its test."""
    if storage not in (STORAGE_BF16, STORAGE_F16) or (storage == STORAGE_F16 and not FX_FLOAT16):
        raise ValueError(f"no 16-bit conversion for storage {storage}")
    if values.shape[0] != 0:
        fx_narrow_words(&values[0], &out[0], values.shape[0], storage)


def log_array(const double[::1] s, double[::1] out):
    """``out[j] = fast_log(s[j])``: the logarithm alone (in the clone the kernels use)."""
    if s.shape[0] != 0:
        _log_elements(&s[0], &out[0], s.shape[0])


def tanh_array(const floating[::1] u, floating[::1] out):
    """``out[j] = fast_tanh(u[j])``: the soft cap's tanh alone (in the clone the kernels use),
    for its accuracy test."""
    if u.shape[0] != 0:
        _tanh_elements(&u[0], &out[0], u.shape[0])


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


# =====================================================================================
# --- distillation: the generalised JSD between two softmaxes, in one row visit -------
# =====================================================================================
# The same steps, in the same words, as the distillation section of _numba_kernels.py
# (see there and docs/SEMANTICS.md "Distillation" for the formulas). P = softmax(t / T)
# (teacher), Q = softmax(z / T) (student), M = beta P + (1-beta) Q; per row:
#
#   (1) ``m_s = max_c z_c``, ``m_t = max_c t_c``
#   (2) ``eq_c = exp((z_c - m_s) / T)`` into the gradient row (in place, loss only: the
#       thread's scratch row ``e``), ``s_q = sum_c eq_c``; ``ep_c = exp((t_c - m_t) / T)``
#       into the thread's float64 row ``w``, ``s_p = sum_c ep_c``
#   (3) the loss ``T**2 J``, leaving in ``w`` what (4) needs:
#       beta = 0:  J = S / s_p + log s_q - log s_p,  S = sum_c ep_c (a_c - b_c);  w = ep
#       beta = 1:  J = S / s_q + log s_p - log s_q,  S = sum_c eq_c (b_c - a_c);  w_c = b_c - a_c
#       else:      J = beta KL(P||M) + (1-beta) K,   K = KL(Q||M);                w_c = log Q_c - log M_c
#       (a_c = (t_c - m_t) / T, b_c = (z_c - m_s) / T in float64; a term whose probability is 0 is 0)
#   (4) beta = 0: g_c = eq_c cq - ep_c cp; else g_c = eq_c cq (w_c - h), in float64
#
# The sums of (2) and (3) are kept in SUM_LANES float64 lanes added pairwise at the end, as
# the cross-entropy's (gcc may not reassociate a float sum); the masked tail selects its
# loads (z = m_s, t = m_t, the exponentials 0) before any arithmetic, so it adds exact zeros.
# Its own parallel loop (``_run_distill``), the same pattern as ``_run_blocks``: written
# apart so that the cross-entropy's Task and _block stay untouched by this section.

ctypedef struct DistillParams:
    # the fields of fastxent._spec.DistillParams, in its order
    int64_t kind
    double beta
    double log_beta
    double log_one_minus_beta
    double temperature
    double inv_temperature
    double grad_scale
    int64_t ignore_index
    bint masked


cdef enum:
    FORWARD_KL = 0
    REVERSE_KL = 1
    JSD = 2

#: the same numbers as _spec.FORWARD_KL, REVERSE_KL, JSD (tests/test_distillation.py)
DISTILL_KINDS = (FORWARD_KL, REVERSE_KL, JSD)


cdef DistillParams _unpack_distill_params(object record) except *:
    cdef DistillParams p
    p.kind = record.kind
    p.beta = record.beta
    p.log_beta = record.log_beta
    p.log_one_minus_beta = record.log_one_minus_beta
    p.temperature = record.temperature
    p.inv_temperature = record.inv_temperature
    p.grad_scale = record.grad_scale
    p.ignore_index = record.ignore_index
    p.masked = record.masked
    return p


cdef DistillParams _zero_distill_params():
    cdef DistillParams p
    memset(&p, 0, sizeof(DistillParams))
    return p


#: must equal ``_spec.DistillParams._fields`` (tests/test_distillation.py)
DISTILL_PARAMS_FIELDS = tuple(_zero_distill_params())


ctypedef struct DistillTask:
    int mode  # LOSS, GRAD or IN_PLACE
    bint double_precision
    Py_ssize_t n
    Py_ssize_t n_classes
    Py_ssize_t block_rows
    const void *z  # (n, C) student logits
    const void *t  # (n, C) teacher logits, z's dtype
    const int64_t *labels  # (n,), read when DistillParams.masked
    double *loss  # (n,)
    void *grad  # (n, C), z's dtype (GRAD, IN_PLACE)


cdef inline void _exp_scaled_lanes(const floating *row, floating m, floating k, floating *e_out, double *w_out,
                                   Py_ssize_t count, bint to_w, double *s_lanes) noexcept nogil:
    """Step (2) on ``count <= SUM_LANES`` elements: ``e_j = exp((row_j - m) k)`` into ``w_out``
    (``to_w``) or ``e_out``, ``s_lanes[j] += e_j``; past ``count`` the row reads as -inf (as
    ``_exp_lanes``)."""
    cdef Py_ssize_t j
    cdef floating z, e
    for j in range(SUM_LANES):
        z = row[j] if j < count else <floating>-INFINITY
        e = _fast_exp((z - m) * k)
        if j < count:
            if to_w:
                w_out[j] = e
            else:
                e_out[j] = e
        s_lanes[j] += e


cdef inline double _row_sum_exp_scaled(const floating *row, floating m, floating k, floating *e_out, double *w_out,
                                       Py_ssize_t n_classes, bint to_w) noexcept nogil:
    """Step (2) at temperature ``1/k``: the exponentials into ``w_out`` (``to_w``, float64)
    or ``e_out``, and their sum in float64."""
    cdef double s_lanes[SUM_LANES]
    cdef Py_ssize_t c
    cdef Py_ssize_t blocked = n_classes - n_classes % SUM_LANES
    _zero_lanes(s_lanes)
    for c in range(0, blocked, 16):  # SUM_LANES
        _exp_scaled_lanes(row + c, m, k, e_out + c, w_out + c, SUM_LANES, to_w, s_lanes)
    if blocked < n_classes:
        _exp_scaled_lanes(row + blocked, m, k, e_out + blocked, w_out + blocked, n_classes - blocked, to_w,
                          s_lanes)
    return _lane_sum(s_lanes)


cdef inline void _forward_kl_lanes(const floating *z, const floating *t, const double *w, double m_s, double m_t,
                                   double k, Py_ssize_t count, double *lanes) noexcept nogil:
    cdef Py_ssize_t j
    cdef double zj, tj, ep, d
    for j in range(SUM_LANES):
        zj = <double>z[j] if j < count else m_s
        tj = <double>t[j] if j < count else m_t
        ep = w[j] if j < count else 0.0
        d = (tj - m_t) * k - (zj - m_s) * k
        lanes[j] += ep * d if ep != 0.0 else 0.0


cdef inline double _forward_kl_sum(const floating *z, const floating *t, const double *w, double m_s, double m_t,
                                   double k, Py_ssize_t n_classes) noexcept nogil:
    """Step (3), beta = 0: ``S = sum_c ep_c (a_c - b_c)`` (``ep`` in ``w``), 0 where ep_c = 0."""
    cdef double lanes[SUM_LANES]
    cdef Py_ssize_t c
    cdef Py_ssize_t blocked = n_classes - n_classes % SUM_LANES
    _zero_lanes(lanes)
    for c in range(0, blocked, 16):  # SUM_LANES
        _forward_kl_lanes(z + c, t + c, w + c, m_s, m_t, k, SUM_LANES, lanes)
    if blocked < n_classes:
        _forward_kl_lanes(z + blocked, t + blocked, w + blocked, m_s, m_t, k, n_classes - blocked, lanes)
    return _lane_sum(lanes)


cdef inline void _reverse_kl_lanes(const floating *z, const floating *t, const floating *e, double *w, double m_s,
                                   double m_t, double k, Py_ssize_t count, double *lanes) noexcept nogil:
    cdef Py_ssize_t j
    cdef double zj, tj, eq, d
    for j in range(SUM_LANES):
        zj = <double>z[j] if j < count else m_s
        tj = <double>t[j] if j < count else m_t
        eq = <double>e[j] if j < count else 0.0
        d = (zj - m_s) * k - (tj - m_t) * k
        d = d if eq != 0.0 else 0.0
        if j < count:
            w[j] = d
        lanes[j] += eq * d


cdef inline double _reverse_kl_sum(const floating *z, const floating *t, const floating *e, double *w, double m_s,
                                   double m_t, double k, Py_ssize_t n_classes) noexcept nogil:
    """Step (3), beta = 1: ``S = sum_c eq_c (b_c - a_c)``, and ``w_c = b_c - a_c`` (0 where
    eq_c = 0)."""
    cdef double lanes[SUM_LANES]
    cdef Py_ssize_t c
    cdef Py_ssize_t blocked = n_classes - n_classes % SUM_LANES
    _zero_lanes(lanes)
    for c in range(0, blocked, 16):  # SUM_LANES
        _reverse_kl_lanes(z + c, t + c, e + c, w + c, m_s, m_t, k, SUM_LANES, lanes)
    if blocked < n_classes:
        _reverse_kl_lanes(z + blocked, t + blocked, e + blocked, w + blocked, m_s, m_t, k, n_classes - blocked,
                          lanes)
    return _lane_sum(lanes)


cdef inline void _jsd_lanes(const floating *z, const floating *t, const floating *e, double *w, double m_s,
                            double m_t, double k, double log_s_q, double log_s_p, double inv_s_q, double inv_s_p,
                            const DistillParams *p, Py_ssize_t count, double *p_lanes,
                            double *q_lanes) noexcept nogil:
    cdef Py_ssize_t j
    cdef double zj, tj, log_p, log_q, pc, qc, log_m, r
    for j in range(SUM_LANES):
        zj = <double>z[j] if j < count else m_s
        tj = <double>t[j] if j < count else m_t
        pc = w[j] * inv_s_p if j < count else 0.0
        qc = <double>e[j] * inv_s_q if j < count else 0.0
        log_p = (tj - m_t) * k - log_s_p
        log_q = (zj - m_s) * k - log_s_q
        log_m = _fast_log(p.beta * pc + (1.0 - p.beta) * qc)
        if not (pc > 0.0 and qc > 0.0):  # log M exactly where one of P, Q is 0
            log_m = p.log_beta + log_p if pc > 0.0 else p.log_one_minus_beta + log_q
        p_lanes[j] += pc * (log_p - log_m) if pc > 0.0 else 0.0
        r = log_q - log_m if qc > 0.0 else 0.0
        if j < count:
            w[j] = r
        q_lanes[j] += qc * r


cdef inline double _jsd_sums(const floating *z, const floating *t, const floating *e, double *w, double m_s,
                             double m_t, double k, double log_s_q, double log_s_p, double inv_s_q, double inv_s_p,
                             const DistillParams *p, Py_ssize_t n_classes, double *kl_q) noexcept nogil:
    """Step (3), 0 < beta < 1: returns ``KL(P||M)``, sets ``kl_q = KL(Q||M)`` and
    ``w_c = log Q_c - log M_c`` (0 where Q_c = 0); ``w`` holds ep on entry."""
    cdef double p_lanes[SUM_LANES]
    cdef double q_lanes[SUM_LANES]
    cdef Py_ssize_t c
    cdef Py_ssize_t blocked = n_classes - n_classes % SUM_LANES
    _zero_lanes(p_lanes)
    _zero_lanes(q_lanes)
    for c in range(0, blocked, 16):  # SUM_LANES
        _jsd_lanes(z + c, t + c, e + c, w + c, m_s, m_t, k, log_s_q, log_s_p, inv_s_q, inv_s_p, p, SUM_LANES,
                   p_lanes, q_lanes)
    if blocked < n_classes:
        _jsd_lanes(z + blocked, t + blocked, e + blocked, w + blocked, m_s, m_t, k, log_s_q, log_s_p, inv_s_q,
                   inv_s_p, p, n_classes - blocked, p_lanes, q_lanes)
    kl_q[0] = _lane_sum(q_lanes)
    return _lane_sum(p_lanes)


cdef inline void _distill_grad_row(floating *g, const floating *e, const double *w, double cq, double cp, double h,
                                   int64_t kind, Py_ssize_t n_classes) noexcept nogil:
    """Step (4), in float64, rounded once; ``e`` may be ``g`` itself."""
    cdef Py_ssize_t c
    if kind == FORWARD_KL:
        for c in range(n_classes):
            g[c] = <floating>(<double>e[c] * cq - w[c] * cp)
    else:
        for c in range(n_classes):
            g[c] = <floating>(<double>e[c] * cq * (w[c] - h))


cdef inline void _distill_row(Py_ssize_t i, const DistillTask *task, const DistillParams *p, const floating *z,
                              const floating *t, floating *grad, floating *e, double *w) noexcept nogil:
    """Steps (1)-(4) of a distillation row; ``e`` and ``w`` are the thread's scratch rows."""
    cdef Py_ssize_t n_classes = task.n_classes
    cdef const floating *zi = z + i * n_classes
    cdef const floating *ti = t + i * n_classes
    cdef floating *g = grad + i * n_classes if task.mode != LOSS else NULL
    cdef floating m_s, m_t
    cdef floating k_t = <floating>p.inv_temperature
    cdef double k = p.inv_temperature
    cdef double s_q, s_p, log_s_q, log_s_p, scale, S, j, cq, cp = 0.0, h = 0.0, kl_p
    if p.masked and task.labels[i] == p.ignore_index:  # ignored rows: loss 0, gradient 0
        task.loss[i] = 0.0
        if task.mode != LOSS:
            memset(g, 0, n_classes * sizeof(floating))
        return
    if task.mode == GRAD:  # the student's exponentials go straight into the gradient row
        e = g
    m_s = _row_max(zi, n_classes)  # (1)
    m_t = _row_max(ti, n_classes)
    s_q = _row_sum_exp_scaled(zi, m_s, k_t, e, w, n_classes, False)  # (2)
    s_p = _row_sum_exp_scaled(ti, m_t, k_t, e, w, n_classes, True)
    log_s_q = _fast_log(s_q)
    log_s_p = _fast_log(s_p)
    scale = p.temperature * p.grad_scale
    if p.kind == FORWARD_KL:  # (3)
        S = _forward_kl_sum(zi, ti, w, <double>m_s, <double>m_t, k, n_classes)
        j = S / s_p + (log_s_q - log_s_p)
        cq = scale / s_q
        cp = scale / s_p
    elif p.kind == REVERSE_KL:
        S = _reverse_kl_sum(zi, ti, e, w, <double>m_s, <double>m_t, k, n_classes)
        h = S / s_q
        j = h + (log_s_p - log_s_q)
        cq = scale / s_q
    else:
        kl_p = _jsd_sums(zi, ti, e, w, <double>m_s, <double>m_t, k, log_s_q, log_s_p, 1.0 / s_q, 1.0 / s_p, p,
                         n_classes, &h)
        j = p.beta * kl_p + (1.0 - p.beta) * h
        cq = scale * (1.0 - p.beta) / s_q
    task.loss[i] = p.temperature * p.temperature * j
    if task.mode != LOSS:  # (4)
        _distill_grad_row(g, e, w, cq, cp, h, p.kind, n_classes)


cdef fx_hot_void _distill_rows(DistillTask task, DistillParams p, Py_ssize_t start, Py_ssize_t stop,
                               floating *e, double *w) noexcept nogil:
    cdef const floating *z = <const floating *>task.z
    cdef const floating *t = <const floating *>task.t
    cdef floating *grad = <floating *>task.grad
    cdef Py_ssize_t i
    for i in range(start, stop):
        _distill_row(i, &task, &p, z, t, grad, e, w)


cdef int _run_distill(const DistillTask *task, const DistillParams *p) noexcept nogil:
    """Every block of rows on the OpenMP threads (blocks of about BLOCK_ELEMENTS logits, handed
    out dynamically, as ``_run_blocks``); each thread allocates its two scratch rows (``e`` of
    the logits' dtype, ``w`` float64) once, on their own cache lines. -1 if an allocation failed."""
    cdef Py_ssize_t n_blocks = (task.n + task.block_rows - 1) // task.block_rows
    cdef size_t itemsize = sizeof(double) if task.double_precision else sizeof(float)
    cdef size_t e_bytes = (task.n_classes * itemsize + CACHE_LINE - 1) // CACHE_LINE * CACHE_LINE
    cdef size_t w_bytes = (task.n_classes * sizeof(double) + CACHE_LINE - 1) // CACHE_LINE * CACHE_LINE
    cdef int failed = 0
    cdef int *failed_flag = &failed
    cdef char *scratch = NULL
    cdef Py_ssize_t block, start, stop
    if task.n == 0 or task.n_classes == 0:
        return 0
    with parallel():
        scratch = <char *>fx_aligned_alloc(e_bytes + w_bytes + CACHE_LINE)
        if scratch == NULL:
            failed_flag[0] = 1
        for block in prange(n_blocks, schedule="dynamic", chunksize=1):
            start = block * task.block_rows
            stop = min(start + task.block_rows, task.n)
            if scratch != NULL:
                if task.double_precision:
                    _distill_rows(task[0], p[0], start, stop, <double *>scratch, <double *>(scratch + e_bytes))
                else:
                    _distill_rows(task[0], p[0], start, stop, <float *>scratch, <double *>(scratch + e_bytes))
        fx_aligned_free(scratch)
    return -1 if failed else 0


def distill(const floating[:, ::1] z, const floating[:, ::1] t, const int64_t[::1] labels, params, int mode,
            double[::1] loss, floating[:, ::1] grad):
    """Distillation rows in ``mode`` (LOSS, GRAD, IN_PLACE: ``grad`` is then z's own array);
    see ``distill`` in _cy_backend.py for the arguments."""
    cdef DistillParams p = _unpack_distill_params(params)
    cdef DistillTask task
    cdef int status
    memset(&task, 0, sizeof(DistillTask))
    task.mode = mode
    task.double_precision = floating is double
    task.n = z.shape[0]
    task.n_classes = z.shape[1]
    if task.n == 0 or task.n_classes == 0:
        return
    task.block_rows = max(1, BLOCK_ELEMENTS // task.n_classes)
    task.z = &z[0, 0]
    task.t = &t[0, 0]
    task.labels = &labels[0]
    task.loss = &loss[0]
    task.grad = &grad[0, 0]
    with nogil:
        status = _run_distill(&task, &p)
    if status != 0:
        raise MemoryError("fastxent: could not allocate a thread's scratch")
