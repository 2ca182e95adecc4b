"""The "cython" backend: the compiled extension ``fastxent._cy_xent`` behind the kernels'
interface (the same functions as ``_numba_kernels.py``), unpacking the ``Params`` record
into the extension's scalar arguments.

The extension keeps its own per-row loop (kernels/_cy_xent.pyx), step for step the numba
kernels' row layout; it has no small-C layout and no class-shard phases yet.
"""

from __future__ import annotations

import numpy as np

from . import _cy_xent  # type: ignore[attr-defined]  # the compiled extension: no stub

#: the extension module itself (its positional interface, for tests and benchmarks)
extension = _cy_xent
label_stats = _cy_xent.label_stats
logsumexp_rows = _cy_xent.logsumexp_rows
log_softmax_rows = _cy_xent.log_softmax_rows
softmax_rows = _cy_xent.softmax_rows
openmp_enabled = _cy_xent.openmp_enabled
set_num_threads = _cy_xent.set_num_threads
get_num_threads = _cy_xent.get_num_threads
simd_level = _cy_xent.simd_level
exp_array = _cy_xent.exp_array  # the exponential alone, for its accuracy tests


def _grad_argument(x, grad):
    return (np.empty((1, x.shape[1]), x.dtype), False) if grad is None else (grad, True)


def xent_index(x, y, weight, params, loss, grad=None):
    grad, write_grad = _grad_argument(x, grad)
    _cy_xent.xent_index(
        x, y, weight, params.weight_total, params.ignore_index, params.eps, params.grad_scale, loss, grad, write_grad
    )


def xent_probability(x, t, weight, params, loss, grad=None):
    grad, write_grad = _grad_argument(x, grad)
    _cy_xent.xent_probability(x, t, weight, params.eps, params.grad_scale, loss, grad, write_grad)
