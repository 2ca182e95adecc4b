"""The "numpy" backend: the reference (``_reference.py``) behind the kernels' interface.

Each function has the signature of its namesake in ``_numba_kernels.py`` and fills the
same outputs, so ``_api.py`` treats every backend alike. It is slow (float64 temporaries
of size N x C) and exists as the oracle's twin and the last fallback.
"""

from __future__ import annotations

import numpy as np

from . import _reference


def _weight_or_none(weight):
    return weight if weight.shape[0] != 0 else None


def xent_index(x, y, weight, params, loss, grad=None):
    row_loss, row_grad = _reference.index_rows(x, y, _weight_or_none(weight), params.ignore_index, params.eps)
    loss[:] = row_loss
    if grad is not None:
        grad[...] = row_grad * params.grad_scale


def xent_probability(x, t, weight, params, loss, grad=None):
    row_loss, row_grad = _reference.probability_rows(x, t, _weight_or_none(weight), params.eps)
    loss[:] = row_loss
    if grad is not None:
        grad[...] = row_grad * params.grad_scale


def logsumexp_rows(x, out):
    out[:] = _reference.logsumexp(x)


def log_softmax_rows(x, out):
    out[...] = _reference.log_softmax(x)


def softmax_rows(x, out):
    out[...] = np.exp(_reference.log_softmax(x))


def label_stats(y, n_classes, ignore_index, weight):
    kept = y != ignore_index
    bad = kept & ((y < 0) | (y >= n_classes))
    if bad.any():
        return int(np.argmax(bad)), 0.0
    if weight.shape[0] == 0:
        return -1, float(np.count_nonzero(kept))
    return -1, float(np.sum(weight[y[kept]], dtype=np.float64))


def distill(z, t, labels, params, loss, grad=None):
    """Distillation rows (``_reference.distillation_rows``): per-row losses into ``loss``, the
    gradient (scaled by ``params.grad_scale``) into ``grad`` unless None; rows whose label is
    ``params.ignore_index`` (when ``params.masked``) get 0 and 0."""
    row_loss, row_grad = _reference.distillation_rows(z, t, params.beta, params.temperature)
    if params.masked:
        kept = labels != params.ignore_index
        row_loss = np.where(kept, row_loss, 0.0)
        row_grad = np.where(kept[:, None], row_grad, 0.0)
    loss[:] = row_loss
    if grad is not None:
        grad[...] = row_grad * params.grad_scale
