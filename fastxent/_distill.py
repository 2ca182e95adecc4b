"""Knowledge distillation from logits: the public functions (validate, allocate, dispatch,
reduce), as ``_api.py`` for the cross-entropy. The kernels are the "distillation" sections of
``_numba_kernels.py`` and ``kernels/_cy_xent.pyx``; the formulas are in docs/SEMANTICS.md
("Distillation") and ``_reference.distillation_rows``.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike, NDArray

from . import _dispatch
from ._api import _as_logits, _check_out, _gradient_rows, _index_labels, _raise_out_of_range, _read_only, _rows
from ._spec import DistillReduction, check_distill_options, check_ignore_index, distill_params


def _distillation(student, teacher, beta, temperature, target, ignore_index, reduction, backend, want_grad, out):
    """Validate, run one fused kernel, reduce. Returns ``(loss, grad or None)``."""
    z = _as_logits(student)
    t = np.asarray(teacher)
    if t.dtype.kind != "f":
        raise TypeError(f"teacher logits must be a floating array, got dtype {t.dtype}")
    if t.shape != z.shape:
        raise ValueError(f"teacher logits must have the student's shape {z.shape}, got {t.shape}")
    # the wider of the two: a float64 teacher is not rounded to a float32 student's precision
    dtype = _dispatch.compute_dtype(np.result_type(z.dtype, t.dtype))
    kernels = _dispatch.kernels_for(backend)
    beta, temperature, reduction = check_distill_options(beta, temperature, reduction)
    ignore_index = check_ignore_index(ignore_index)
    batch_shape, n_classes = z.shape[:-1], z.shape[-1]
    if n_classes == 0:
        raise ValueError(f"logits must have at least one class (last axis), got shape {z.shape}")
    if want_grad and out is not None:
        _check_out(out, z)
        if np.may_share_memory(out, t):
            raise ValueError("out must not share memory with the teacher logits")

    n = math.prod(batch_shape)
    labels = None
    denominator = float(n)
    if target is not None:
        y = np.asarray(target)
        if y.dtype.kind not in "iu":
            raise TypeError(
                f"target must be an integer array of class indices (a mask: rows equal to ignore_index are "
                f"skipped), got dtype {y.dtype}"
            )
        if want_grad and out is not None and np.may_share_memory(out, y):
            raise ValueError("out must not share memory with the target")
        labels = _read_only(_index_labels(y, batch_shape, ignore_index))
        # the same check as the cross-entropy's: a value that is neither a class nor ignore_index
        # (say -1 padding with ignore_index=-100) is an error, not a silently kept row
        first_bad, denominator = kernels.label_stats(labels, n_classes, ignore_index, _read_only(np.empty(0, dtype)))
        if first_bad >= 0:
            _raise_out_of_range(labels, first_bad, batch_shape, n_classes, ignore_index)

    z2 = _rows(z, dtype)
    t2 = _read_only(_rows(t, dtype))
    grad2 = _gradient_rows(z, z2, out) if want_grad else None
    row_loss = np.empty(z2.shape[0], np.float64)
    batchmean = reduction == "batchmean"
    if batchmean and denominator == 0:  # N = 0 or every row ignored
        loss_value = math.nan
        if grad2 is not None:
            grad2.fill(0)
    else:
        params = distill_params(
            beta, temperature, 1.0 / denominator if batchmean else 1.0, ignore_index, labels is not None
        )
        z_in = z2 if grad2 is z2 else _read_only(z2)  # in place: the kernel writes over z2
        kernels.distill(z_in, t2, labels, params, row_loss, grad2)
        loss_value = float(np.sum(row_loss))  # pairwise in float64: the same for any thread count
        if batchmean:
            loss_value /= denominator

    loss = row_loss.astype(z.dtype).reshape(batch_shape) if reduction == "none" else z.dtype.type(loss_value)
    if grad2 is None:
        return loss, None
    grad = out
    if grad is None:
        grad = grad2.reshape(z.shape) if grad2.dtype == z.dtype else grad2.reshape(z.shape).astype(z.dtype)
    elif not np.shares_memory(grad, grad2):
        grad[...] = grad2.reshape(z.shape)
    return loss, grad


_DOC = """
    ``P = softmax(teacher / T)``, ``Q = softmax(student / T)``, ``M = beta P + (1-beta) Q``; per
    row the loss is ``T**2 J`` with

    - ``beta = 0``: ``J = KL(P || Q)`` (forward KL; ``T**2 * F.kl_div(log Q, log P,
      log_target=True)`` summed over the classes);
    - ``beta = 1``: ``J = KL(Q || P)`` (reverse KL);
    - ``0 < beta < 1``: ``J = beta KL(P || M) + (1-beta) KL(Q || M)``, Liger-Kernel's
      generalised JSD (it tends to 0 as beta -> 0 or 1: the two ends are the KLs above, as in
      Liger-Kernel, not the limits).

    A class of probability 0 adds nothing (``0 log 0 = 0``): a -inf logit in both rows is a
    masked class. The gradient is with respect to the student only (the teacher is a constant).

    Parameters
    ----------
    student_logits, teacher_logits : array_like, shape (..., C)
        Unnormalised scores of the same shape, class axis LAST; float16 (computed in float32),
        float32 or float64 (computed in the wider of the two dtypes).
    beta : float in [0, 1], default 0.0
    temperature : float, finite > 0, default 1.0
    target : array_like of integers, shape ``logits.shape[:-1]``, optional
        A row mask: rows whose target equals ``ignore_index`` get loss 0 and gradient 0 and do
        not count in "batchmean". Every other value must be a class index in ``[0, C)`` (as for
        the cross-entropy; it is not otherwise used).
    ignore_index : int, default -100
    reduction : {"batchmean", "sum", "none"}, default "batchmean"
        "batchmean" divides the sum by the rows not ignored (NaN, with a zero gradient, when
        there are none); "none" returns one loss per row, and the gradient of their sum.
        torch's kl_div "mean" (a division by N*C) is refused.
    backend : {"numba", "cython", "numpy"}, optional
"""

_RAISES = """
    Raises
    ------
    TypeError
        Non-floating logits, a non-integer target.
    ValueError
        Shapes that differ, no classes, beta outside [0, 1], temperature not finite and > 0,
        an unknown reduction or "mean", ``out`` of the wrong shape or dtype or sharing memory
        with the teacher or the target.
    IndexError
        (``fastxent.TargetOutOfRangeError``) a target that is neither ``ignore_index`` nor in
        ``[0, C)``.
"""


def distillation_loss(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    beta: float = 0.0,
    temperature: float = 1.0,
    target: ArrayLike | None = None,
    ignore_index: int = -100,
    reduction: DistillReduction = "batchmean",
    backend: str | None = None,
) -> np.floating | NDArray[np.floating]:
    loss, _ = _distillation(
        student_logits, teacher_logits, beta, temperature, target, ignore_index, reduction, backend, False, None
    )
    return loss


def distillation_loss_with_grad(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike,
    *,
    beta: float = 0.0,
    temperature: float = 1.0,
    target: ArrayLike | None = None,
    ignore_index: int = -100,
    reduction: DistillReduction = "batchmean",
    backend: str | None = None,
    out: np.ndarray | None = None,
) -> tuple[np.floating | NDArray[np.floating], NDArray[np.floating]]:
    return _distillation(
        student_logits, teacher_logits, beta, temperature, target, ignore_index, reduction, backend, True, out
    )


distillation_loss.__doc__ = (
    """Knowledge-distillation loss from logits (one fused pass over both rows).
"""
    + _DOC
    + """
    Returns
    -------
    loss : NumPy scalar of the student's dtype, or ndarray of shape ``logits.shape[:-1]`` ("none").
"""
    + _RAISES
)

distillation_loss_with_grad.__doc__ = (
    """Loss of :func:`distillation_loss` and its gradient with respect to the student, in one pass.

    ``dloss/dz_c = T dJ/du_c`` (``u = student / T``), per row: ``T (Q_c - P_c)`` at beta = 0,
    ``T Q_c (log Q_c - log P_c - J)`` at beta = 1, ``T (1-beta) Q_c (log Q_c - log M_c -
    KL(Q || M))`` in between; divided by the "batchmean" denominator.
"""
    + _DOC
    + """    out : ndarray, optional
        Where to write the gradient: the student's shape and dtype. ``out=student_logits``
        overwrites the student's logits in place.

    Returns
    -------
    (loss, grad) : grad like ``student_logits`` (``out`` when given).
"""
    + _RAISES
)
