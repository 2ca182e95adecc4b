"""The row phases called apart: statistics of class shards, their merge, finish, and the
gradient of each shard, on the numba or the cython kernels (the fused kernel in its STATS
and SHARD_GRAD modes, and ``finish``; ``backend=None`` takes numba when it loaded, else
cython, as the dispatch does).

A class shard is the columns ``class_start .. class_start + C_k`` of the full class axis of
``num_classes`` classes. Per row and shard the kernel computes ``m_k``, ``s_k = sum exp(x -
m_k)``, the target logit when the target lies in the shard (else 0), and ``A_k``, ``B_k``
(index targets: the shard's weight sum and ``sum_c w_c (m_k - x_c)``; probability targets:
``sum_c w_c t'_c`` and ``sum_c w_c t'_c (m_k - x_c)``). Two shards merge exactly (to the
rounding of the float64 arithmetic) with ``m = max(m_1, m_2)``::

    s = s_1 exp(m_1 - m) + s_2 exp(m_2 - m)      target = target_1 + target_2
    A = A_1 + A_2                                 B = B_1 + A_1 (m - m_1) + B_2 + A_2 (m - m_2)

``finish`` turns merged statistics into per-row losses and the coefficients of step (4),
which ``shard_grad`` applies to each shard with no further communication. This is the
core that the public partial API, Dask and vocab-parallel torch build on.
"""

from __future__ import annotations

import numpy as np

from . import _dispatch
from ._spec import LossSpec

_M, _S, _TARGET, _A, _B = 0, 1, 2, 3, 4

#: the backends whose kernels have the class-shard phases, in order of preference
SHARD_BACKENDS = ("numba", "cython")


def _kernels(backend: str | None):
    """The kernel module that runs the phases: ``backend`` (numba or cython), or for None the
    dispatch's default (``$FASTXENT_BACKEND``, else the fastest) when it has them, else the
    first of SHARD_BACKENDS that loaded."""
    if backend is not None and backend in _dispatch.PREFERENCE and backend not in SHARD_BACKENDS:
        raise ValueError(f"backend={backend!r} has no class-shard phases: use one of {', '.join(SHARD_BACKENDS)}")
    if backend is None:
        module = _dispatch.kernels_for(None)
        if hasattr(module, "row_stats"):
            return module
        available = [name for name in SHARD_BACKENDS if name in _dispatch.KERNELS]
        if not available:
            why = "; ".join(f"{name}: {_dispatch.UNAVAILABLE.get(name, 'not loaded')}" for name in SHARD_BACKENDS)
            raise RuntimeError(
                f"the class-shard phases need the numba or the cython backend, and neither loaded ({why})"
            )
        backend = available[0]
    module = _dispatch.kernels_for(backend)  # ValueError / RuntimeError when unknown or not loaded
    if not hasattr(module, "row_stats"):  # the numpy stand-in of a child forked after OpenMP ran
        raise RuntimeError(
            f"backend={backend!r} cannot run in this process (forked after OpenMP threads ran); "
            "the class-shard phases have no numpy fallback"
        )
    return module


def _frozen(a: np.ndarray) -> np.ndarray:
    view = a.view()
    view.flags.writeable = False
    return view


def _inputs(x, target, weight, class_start):
    x = np.ascontiguousarray(x)
    if x.dtype not in _dispatch.NATIVE_DTYPES or x.ndim != 2:
        raise TypeError(f"a shard must be a 2-D float32 or float64 array, got {x.dtype} {x.shape}")
    target = np.asarray(target)
    kind = "probability" if target.dtype.kind == "f" else "index"
    if kind == "index":
        target = np.ascontiguousarray(target, np.int64)
    else:
        target = np.ascontiguousarray(target, x.dtype)
    shard_weight = np.empty(0, x.dtype)
    if weight is not None:
        shard_weight = np.ascontiguousarray(np.asarray(weight)[class_start : class_start + x.shape[1]], x.dtype)
    return _frozen(x), _frozen(target), _frozen(shard_weight), kind


def _params(spec, num_classes, weight, grad_scale, class_start):
    weight_total = float(num_classes) if weight is None else float(np.sum(weight, dtype=np.float64))
    return spec.params(
        n_classes=num_classes,
        weight_total=weight_total,
        grad_scale=grad_scale,
        weighted=weight is not None,
        class_start=class_start,
    )


def row_stats(
    x, target, *, class_start=0, num_classes=None, weight=None, label_smoothing=0.0, ignore_index=-100, backend=None
):
    """Statistics ``(n, 5)`` float64 of the shard ``x`` (columns ``class_start..``)."""
    kernels = _kernels(backend)
    num_classes = x.shape[1] if num_classes is None else num_classes
    x, target, shard_weight, kind = _inputs(x, target, weight, class_start)
    spec = LossSpec.create(kind, label_smoothing=label_smoothing, ignore_index=ignore_index)
    stats = np.empty((x.shape[0], 5))
    params = _params(spec, num_classes, weight, 1.0, class_start)
    kernels.row_stats(kind, x, target, shard_weight, params, stats)
    if kind == "index":  # A: the shard's weight sum, for the rebase of B in the merge
        stats[:, _A] = float(np.sum(shard_weight, dtype=np.float64)) if weight is not None else float(x.shape[1])
    empty = np.isneginf(stats[:, _M])  # every logit -inf in this shard: an empty sum, not NaN
    stats[empty, _S] = 0.0
    return stats


def rebase(stats: np.ndarray, m: np.ndarray) -> np.ndarray:
    """One part's statistics rebased to the max ``m`` of all parts, as the terms of a SUM
    (columns ``S, TARGET, A, B``): ``s e^(m_k - m)``, the target logit, ``A`` and
    ``B + A (m - m_k)``. A part that holds the max has shift 0 (also where both are -inf).
    The merge of two parts is their sum; vocab-parallel torch all-reduces these terms."""
    parts = np.empty((stats.shape[0], 4))
    with np.errstate(invalid="ignore", over="ignore"):
        shift = np.where(stats[:, _M] == m, 0.0, m - stats[:, _M])  # >= 0
        parts[:, 0] = stats[:, _S] * np.exp(-shift)
        parts[:, 1] = stats[:, _TARGET]
        parts[:, 2] = stats[:, _A]
        parts[:, 3] = stats[:, _B] + np.where(stats[:, _A] != 0, stats[:, _A] * shift, 0.0)
    return parts


def merge_row_stats(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """The statistics of two shards of the same rows, as if computed on both at once."""
    m = np.maximum(first[:, _M], second[:, _M])
    merged = np.empty_like(first)
    merged[:, _M] = m
    merged[:, _S:] = rebase(first, m) + rebase(second, m)
    return merged


def finish(
    stats,
    target,
    *,
    num_classes,
    weight=None,
    reduction="mean",
    label_smoothing=0.0,
    ignore_index=-100,
    dtype=None,
    backend=None,
):
    """Losses from merged statistics: ``(loss, coef, grad_scale)``; ``loss`` reduced as
    asked, ``coef`` the per-row coefficients and ``grad_scale`` the factor (1/D for "mean")
    that ``shard_grad`` applies."""
    kernels = _kernels(backend)
    target = np.asarray(target)
    kind = "probability" if target.dtype.kind == "f" else "index"
    spec = LossSpec.create(kind, reduction=reduction, label_smoothing=label_smoothing, ignore_index=ignore_index)
    n = stats.shape[0]
    if kind == "index":
        target = _frozen(np.ascontiguousarray(target, np.int64))
        kept = target != spec.ignore_index
        w = np.ones(num_classes) if weight is None else np.asarray(weight, np.float64)
        denominator = float(np.sum(w[target[kept]], dtype=np.float64))
    else:
        target = _frozen(np.ascontiguousarray(target))
        denominator = float(n)
    grad_scale = 1.0 / denominator if spec.reduction == "mean" and denominator else 1.0
    params = _params(spec, num_classes, weight, grad_scale, 0)
    loss = np.empty(n)
    coef = np.empty((n, 3))
    full_weight = np.empty(0) if weight is None else np.asarray(weight, np.float64)
    kernels.finish(kind, stats, target, full_weight, params, loss, coef)
    if spec.reduction == "none":
        return loss, coef, grad_scale
    total = float(np.sum(loss))
    if spec.reduction == "sum":
        return total, coef, grad_scale
    return (total / denominator if denominator else float("nan")), coef, grad_scale


def shard_grad(
    x,
    target,
    coef,
    grad_scale,
    *,
    class_start=0,
    num_classes=None,
    weight=None,
    label_smoothing=0.0,
    out=None,
    backend=None,
):
    """The gradient of the shard ``x`` from the coefficients and scale of :func:`finish`."""
    kernels = _kernels(backend)
    num_classes = x.shape[1] if num_classes is None else num_classes
    x, target, shard_weight, kind = _inputs(x, target, weight, class_start)
    spec = LossSpec.create(kind, label_smoothing=label_smoothing)
    grad = np.empty(x.shape, x.dtype) if out is None else out
    params = _params(spec, num_classes, weight, grad_scale, class_start)
    kernels.shard_grad(kind, x, target, shard_weight, params, np.ascontiguousarray(coef), grad)
    return grad
