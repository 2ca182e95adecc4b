"""The "cython" backend: the compiled extension ``fastxent._cy_xent`` (kernels/_cy_xent.pyx)
behind the kernels' interface, the same functions as ``_numba_kernels.py`` taking the same
``Params`` record: the fused ``xent_index`` / ``xent_probability``, the class-shard phases
``row_stats``, ``finish`` and ``shard_grad`` (which ``_shards.py`` runs on either backend),
``logsumexp_rows``, ``log_softmax_rows``, ``softmax_rows`` and ``label_stats``.

As in the numba module, this Python layer decides the MODE (loss only, loss+grad, in place,
statistics, shard gradient) and the LAYOUT (LANES rows across the SIMD lanes for
``C <= SMALL_C``, else one row at a time) and hands the extension plain C-contiguous
arrays; the extension copies the record into its C struct once per call and runs its one
parallel loop. Nothing here imports numba.
"""

from __future__ import annotations

import contextlib

import numpy as np

from . import _cy_xent  # type: ignore[attr-defined]  # the compiled extension: no stub
from ._spec import N_OUTS, SMALL_CALL_ELEMENTS, kernel_weight, no_gradient

LOSS, GRAD, IN_PLACE, STATS, SHARD_GRAD = _cy_xent.MODES
STAT_M, STAT_S, STAT_TARGET, STAT_A, STAT_B = _cy_xent.STAT_COLUMNS
N_STATS = len(_cy_xent.STAT_COLUMNS)
COEF_M, COEF_A, COEF_Y = _cy_xent.COEF_COLUMNS
OUT_LSE, OUT_Z, OUT_ENTROPY, OUT_CORRECT = _cy_xent.OUT_COLUMNS
LANES = _cy_xent.LAYOUT["LANES"]
SMALL_C = _cy_xent.LAYOUT["SMALL_C"]
BLOCK_ELEMENTS = _cy_xent.LAYOUT["BLOCK_ELEMENTS"]

#: the extension module itself (for tests and benchmarks)
extension = _cy_xent
label_stats = _cy_xent.label_stats
logsumexp_rows = _cy_xent.logsumexp_rows
log_softmax_rows = _cy_xent.log_softmax_rows
softmax_rows = _cy_xent.softmax_rows
openmp_enabled = _cy_xent.openmp_enabled
set_num_threads = _cy_xent.set_num_threads
get_num_threads = _cy_xent.get_num_threads
simd_level = _cy_xent.simd_level
#: the small-C layout transposes float32 lane groups in registers (AVX-512F, GCC)
VECTOR_TRANSPOSES = bool(_cy_xent.VECTOR_TRANSPOSES)
exp_array = _cy_xent.exp_array  # the exponential alone, for its accuracy tests
log_array = _cy_xent.log_array  # the logarithm alone, likewise
tanh_array = _cy_xent.tanh_array  # the soft cap's tanh alone, likewise


_NO_ROWDATA = np.empty((1, N_STATS), np.float64)
_NO_WORDS = np.empty((1, 1), np.uint16)  # the gradient argument of LOSS on 16-bit words: never written

#: xent_index reads bfloat16 / float16 logits as 16-bit words (``Params.storage``), no float32 copy
STORAGE_16BIT = _cy_xent.STORAGE_16BIT


def _xent(kernel_function, x, target, weight, params, mode, loss, grad, rowdata, small_ok):
    """Run ``kernel_function`` (the extension's xent_index or xent_probability) in ``mode``:
    the lanes layout when ``small_ok`` and the mode and class count allow it (for probability
    targets only without the options of the loss: their lanes layout has no code for them);
    ``grad is x`` turns GRAD into IN_PLACE; a missing ``grad`` or ``rowdata`` is a dummy
    never written."""
    n_classes = x.shape[1]
    if x.shape[0] == 0:
        return
    plain = not params.transformed and not params.row_outputs
    index = kernel_function is _cy_xent.xent_index  # whose lanes layout has the options too
    lanes = small_ok and (plain or index) and mode in (LOSS, GRAD, IN_PLACE) and n_classes <= SMALL_C
    if x.dtype == np.uint16:  # 16-bit words (params.storage), computed in float32
        if kernel_function is not _cy_xent.xent_index:
            raise ValueError("16-bit words are read for class-index targets only")
        kernel_function = _cy_xent.xent_index_words
        weight = kernel_weight(weight, np.empty((0, n_classes), np.float32))  # float32 ones for none
    if grad is None:
        grad = _NO_WORDS if x.dtype == np.uint16 else no_gradient(x.dtype)
    elif grad is x and mode == GRAD:
        mode = IN_PLACE
    if rowdata is None:
        rowdata = _NO_ROWDATA
    with _one_thread_if_small(x.size):
        kernel_function(x, target, kernel_weight(weight, x), params, mode, lanes, loss, grad, rowdata)


def _one_thread_if_small(elements: int):
    """A call over fewer than SMALL_CALL_ELEMENTS logits runs on one OpenMP thread (see
    _spec.SMALL_CALL_ELEMENTS; omp_set_num_threads applies to this Python thread only)."""
    from ._threads import limited  # (here: _threads imports the dispatch table, which loads this module)

    if elements >= SMALL_CALL_ELEMENTS:
        return contextlib.nullcontext()
    return limited(1, [(_cy_xent.get_num_threads, _cy_xent.set_num_threads)])


def _row_outputs(x, params, row_out):
    """``row_out`` for the kernel when ``params.row_outputs`` (then it must be an (n, N_OUTS)
    array: the kernel writes every row of it), else None."""
    if not params.row_outputs:
        return None
    if row_out is None or row_out.shape != (x.shape[0], N_OUTS):
        shape = None if row_out is None else row_out.shape
        raise ValueError(f"params.row_outputs needs row_out of shape {(x.shape[0], N_OUTS)}, got {shape}")
    return row_out


def xent_index(x, y, weight, params, loss, grad=None, row_out=None):
    """Cross-entropy rows for class-index targets: per-row losses into ``loss`` (n,)
    float64 (the cross-entropy part: the z-loss term goes to ``row_out``), and the gradient
    (scaled by ``params.grad_scale``, its z-loss part by ``params.z_grad_scale``) into
    ``grad`` unless it is None. ``grad`` may be ``x`` itself (in place). x (n, C) float; y
    (n,) int64, every non-ignored value in [0, C) (checked by the caller); weight (C,) or
    length 0; ``row_out`` (n, N_OUTS) float64 C-contiguous, written when
    ``params.row_outputs`` (columns ``OUT_ENTROPY``, ``OUT_CORRECT`` only with
    ``params.stats``)."""
    mode = GRAD if grad is not None else LOSS
    rowdata = _row_outputs(x, params, row_out)
    _xent(_cy_xent.xent_index, x, y, weight, params, mode, loss, grad, rowdata, True)


def xent_probability(x, t, weight, params, loss, grad=None, row_out=None):
    """Cross-entropy rows for probability targets t (n, C) of x's dtype; as xent_index."""
    mode = GRAD if grad is not None else LOSS
    rowdata = _row_outputs(x, params, row_out)
    _xent(_cy_xent.xent_probability, x, t, weight, params, mode, loss, grad, rowdata, True)


def _kernel(kind):
    return _cy_xent.xent_index if kind == "index" else _cy_xent.xent_probability


def row_stats(kind, x, target, weight, params, stats):
    """Steps (1)-(2) of a class shard (columns ``params.class_start..``): the statistics
    ``stats`` (n, N_STATS) float64. ``weight`` is the shard's slice; for index targets
    column STAT_A is left 0 (the caller knows the shard's weight sum)."""
    _xent(_kernel(kind), x, target, weight, params, STATS, np.empty(0), None, stats, False)


def finish(kind, stats, target, weight, params, loss, coef):
    """Step (3) from (merged) statistics: per-row ``loss`` and the coefficients ``coef``
    (n, 3) that ``shard_grad`` reads. ``weight``: the FULL class weights (or length 0)."""
    stats = np.ascontiguousarray(stats, np.float64)
    if kind == "index":
        full_weight = weight if weight.shape[0] != 0 else np.ones(1)
        full_weight = np.ascontiguousarray(full_weight, np.float64)
        _cy_xent.finish_index(stats, np.ascontiguousarray(target, np.int64), full_weight, params, loss, coef)
    else:
        _cy_xent.finish_probability(stats, params, loss, coef)


def shard_grad(kind, x, target, weight, params, coef, grad):
    """Step (4) of a class shard from the coefficients of ``finish``: ``grad`` (n, C_shard),
    which may be ``x`` itself."""
    coef = np.require(coef, np.float64, ["C_CONTIGUOUS", "WRITEABLE"])  # read only, but typed as the STATS output
    _xent(_kernel(kind), x, target, weight, params, SHARD_GRAD, np.empty(x.shape[0]), grad, coef, False)


_NO_LABELS = np.zeros(1, np.int64)


def distill(z, t, labels, params, loss, grad=None):
    """Distillation rows: per-row losses ``T**2 J`` into ``loss`` (n,) float64, and the gradient
    with respect to ``z`` (scaled by ``params.grad_scale``) into ``grad`` unless it is None;
    ``grad`` may be ``z`` itself (in place). As ``_numba_kernels.distill``."""
    if z.shape[0] == 0:
        return
    mode = LOSS if grad is None else IN_PLACE if grad is z else GRAD
    if grad is None:
        grad = no_gradient(z.dtype)
    with _one_thread_if_small(z.size):
        _cy_xent.distill(z, t, labels if labels is not None else _NO_LABELS, params, mode, loss, grad)
