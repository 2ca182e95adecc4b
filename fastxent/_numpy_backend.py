"""The "numpy" backend: the reference (``_reference.py``) behind the kernels' interface.

Each function has the signature of its namesake in ``_numba_kernels.py`` and fills the
same outputs, so ``_api.py`` treats every backend alike. It is slow (float64 temporaries
of size N x C) and exists as the oracle's twin and the last fallback.
"""

from __future__ import annotations

import numpy as np

from . import _reference
from ._spec import OUT_CORRECT, OUT_ENTROPY, OUT_LSE, OUT_Z


def _weight_or_none(weight):
    return weight if weight.shape[0] != 0 else None


def _rows(x, target, weight, params, loss, grad, row_out, index):
    """Both target kinds, through the reference's ``cross_entropy`` on the rows: reduction
    "none" gives per-row losses and the gradient of their sum, which the kernels' scales
    (``grad_scale``, ``z_grad_scale``) turn into the caller's."""
    options = dict(
        weight=_weight_or_none(weight),
        label_smoothing=params.eps,
        logit_scale=params.logit_scale,
        softcap=params.softcap if params.softcap > 0 else None,
    )
    if index:
        options["ignore_index"] = params.ignore_index
    row_loss, row_grad, stats = _reference.cross_entropy(x, target, reduction="none", return_stats=True, **options)
    if params.z_loss != 0:  # the z-loss's gradient alone, to scale it by its own factor
        _, z_grad = _reference.cross_entropy(x, target, reduction="none", z_loss=params.z_loss, **options)
        z_grad = z_grad - row_grad
    loss[:] = row_loss
    if grad is not None:
        scaled = row_grad * params.grad_scale
        if params.z_loss != 0:
            scaled += z_grad * params.z_grad_scale
        grad[...] = scaled
    if row_out is not None and params.row_outputs:
        kept = target != params.ignore_index if index else np.ones(x.shape[0], bool)
        row_out[:, OUT_LSE] = stats["lse"]
        row_out[:, OUT_Z] = np.where(kept, params.z_loss * stats["lse"] ** 2, 0.0)
        row_out[:, OUT_ENTROPY] = stats["entropy"]
        if index:
            transformed, _ = _reference.transform(x, params.logit_scale, options["softcap"])
            row_out[:, OUT_CORRECT] = kept & (np.argmax(transformed, axis=-1) == target)
        else:
            row_out[:, OUT_CORRECT] = 0.0


def xent_index(x, y, weight, params, loss, grad=None, row_out=None):
    _rows(x, y, weight, params, loss, grad, row_out, True)


def xent_probability(x, t, weight, params, loss, grad=None, row_out=None):
    _rows(x, t, weight, params, loss, grad, row_out, False)


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
