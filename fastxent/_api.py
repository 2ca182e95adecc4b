"""The public functions: validate, allocate outputs, dispatch, reduce.

Nothing here loops over elements: the work is done by the kernels that ``_dispatch``
picks. Exact semantics (PyTorch's ``cross_entropy`` with the class axis last) are
written out in the README and in ``_reference.py``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray

from . import _alloc, _dispatch
from ._spec import (
    N_OUTS,
    OUT_CORRECT,
    OUT_ENTROPY,
    OUT_LSE,
    OUT_Z,
    STORAGE_NATIVE,
    LossSpec,
    Reduction,
    TargetKind,
    check_ignore_index,
    check_label_smoothing,
    check_logit_scale,
    check_reduction,
    check_softcap,
    check_z_loss,
)

_INT64 = np.iinfo(np.int64)


class TargetOutOfRangeError(IndexError, ValueError):
    """A class-index target outside ``[0, C)`` that is not ``ignore_index``."""


class CrossEntropyStats(NamedTuple):
    """Row statistics of a cross-entropy call (``return_stats=True``), from the same pass.

    All of them are of the logits the loss sees, ``x' = c tanh(a x / c)`` (``a x`` without a
    cap; ``x`` itself by default).
    """

    #: ``lse_i = m_i + log sum_c exp(x'_ic - m_i)`` per row, float64, shape ``logits.shape[:-1]``
    #: (ignored rows too; NaN for a row whose max is infinite, whose loss is NaN as well)
    lse: NDArray[np.float64]
    #: the z-loss part of the returned loss, reduced as the loss (a scalar of the logits'
    #: dtype, or per row for "none"); 0 without ``z_loss``
    z_loss: Any
    #: the fraction of the rows not ignored whose first ``argmax_c x'_c`` is the target (ties
    #: go to the first index, a NaN is the max, as ``torch.argmax``); NaN when every row is
    #: ignored; None for probability targets
    accuracy: float | None
    #: ``-sum_c p_c log p_c`` of ``p = softmax(x')`` per row (``0 log 0 = 0``), float64
    entropy: NDArray[np.float64]


# --- validation ----------------------------------------------------------------------


def _as_logits(logits: ArrayLike) -> np.ndarray:
    x = np.asarray(logits)
    if not _dispatch.is_floating(x.dtype):
        raise TypeError(f"logits must be a floating array (float16, bfloat16, float32 or float64), got dtype {x.dtype}")
    if x.ndim == 0:
        raise ValueError("logits must have at least one dimension (the class axis, last)")
    return x


def _rows(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``x`` as a C-contiguous ``(n, C)`` array of ``dtype``; a view when it already is one."""
    return np.ascontiguousarray(x.reshape(-1, x.shape[-1]), dtype=dtype)


def _read_only(a: np.ndarray) -> np.ndarray:
    """A read-only view of ``a``. Kernel inputs are always passed read-only, so that numba
    compiles one specialisation per dtype, not one more for every writable/read-only mix."""
    view = a.view()
    view.flags.writeable = False
    return view


def _check_out(out: Any, x: np.ndarray, name: str = "out") -> np.ndarray:
    if not isinstance(out, np.ndarray):
        raise ValueError(f"{name} must be a NumPy array, got {type(out).__name__}")
    if out.shape != x.shape or out.dtype != x.dtype:
        raise ValueError(
            f"{name} must have the logits' shape {x.shape} and dtype {x.dtype}, got {out.shape} {out.dtype}"
        )
    if not out.flags.writeable:
        raise ValueError(f"{name} is read-only")
    if np.may_share_memory(out, x) and not _same_view(out, x):
        raise ValueError(f"{name} overlaps the logits without being the same array; pass out=logits for in place")
    return out


def _same_view(a: np.ndarray, b: np.ndarray) -> bool:
    return (
        a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
        and a.strides == b.strides
        and a.shape == b.shape
        and a.dtype == b.dtype
    )


def _check_weight(weight: ArrayLike | None, n_classes: int, dtype: np.dtype) -> tuple[np.ndarray, float]:
    """The class weights as a contiguous array of ``dtype`` (length 0 for none) and their sum."""
    if weight is None:
        return np.empty(0, dtype), float(n_classes)
    w = np.asarray(weight)
    if w.dtype.kind not in "fiu":
        raise TypeError(f"weight must be a real numeric array, got dtype {w.dtype}")
    if w.shape != (n_classes,):
        raise ValueError(f"weight must have shape ({n_classes},) (one per class), got {w.shape}")
    w = np.ascontiguousarray(w, dtype=dtype)
    return w, float(np.sum(w, dtype=np.float64))


def _index_labels(target: np.ndarray, batch_shape: tuple[int, ...], ignore_index: int) -> np.ndarray:
    """Class-index targets as a contiguous 1-D int64 array: the one label dtype the kernels
    are compiled for (an int32 target costs a copy of N labels, not a second kernel)."""
    if target.shape != batch_shape:
        raise ValueError(
            f"class-index target must have shape {batch_shape} (the logits' shape without the class axis), "
            f"got {target.shape}"
        )
    if np.dtype(target.dtype.type) == np.dtype(np.uint64) and target.size and target.max() > _INT64.max:
        # would wrap to a negative int64 (possibly ignore_index): report it here
        _raise_out_of_range(
            target.reshape(-1), int(np.argmax(target.reshape(-1) > _INT64.max)), batch_shape, -1, ignore_index
        )
    return np.ascontiguousarray(target.reshape(-1), dtype=np.int64)


def _raise_out_of_range(labels, row: int, batch_shape, n_classes: int, ignore_index: int):
    if batch_shape:  # name the element by its full index, e.g. target[1, 4]
        position = "[" + ", ".join(str(int(j)) for j in np.unravel_index(row, batch_shape)) + "]"
    else:  # a 0-d target (1-D logits)
        position = ""
    expected = f"0 <= target < {n_classes}" if n_classes >= 0 else "a valid class index"
    raise TargetOutOfRangeError(
        f"target{position} = {labels[row]} is out of range: expected {expected} or ignore_index={ignore_index}"
    )


def _gradient_rows(x: np.ndarray, x2: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """Where the kernel writes its ``(n, C)`` result, in the compute dtype.

    ``x2`` itself when the result replaces the logits (``out=logits``: the kernel then
    sees one array, see _numba_kernels) or when ``x2`` is already our own copy; ``out``
    when the kernel can write it directly; else a new array. The caller copies the
    result into ``out`` when they differ.
    """
    if out is not None and np.may_share_memory(out, x):
        return x2  # in place: a view of out, or our copy that is copied back
    if out is not None and out.dtype == x2.dtype and out.flags.c_contiguous:
        return out.reshape(x2.shape)
    if x2.flags.owndata:
        return x2  # the cast or contiguous copy is ours to overwrite (a view of x never owns)
    return _alloc.empty(x2.shape, x2.dtype)  # large ones: pages already mapped, see _alloc


# --- the cross-entropy driver --------------------------------------------------------


def _cross_entropy(
    logits,
    target,
    weight,
    ignore_index,
    reduction,
    label_smoothing,
    backend,
    want_grad,
    out,
    z_loss=0.0,
    logit_scale=1.0,
    softcap=None,
    return_stats=False,
    denominators=None,
):
    """Validate, run one fused kernel, reduce. Returns ``(loss, grad or None, stats or None)``.

    ``denominators=(D, K)`` (index targets; fastxent's own row-chunked callers, e.g. the
    fused linear loss): "mean" divides by these global totals instead of this call's, and
    the loss comes back unrounded in float64 (a Python float, or float64 rows for "none"),
    so that the chunks' losses add up to the whole batch's."""
    x = _as_logits(logits)
    dtype = _dispatch.compute_dtype(x.dtype)
    kernels = _dispatch.kernels_for(backend, n_classes=x.shape[-1])  # the fastest for this C
    # the options first, in this order, whatever the target (the errors a user sees first)
    check_reduction(reduction)
    check_label_smoothing(label_smoothing)
    check_ignore_index(ignore_index)
    check_z_loss(z_loss)
    check_logit_scale(logit_scale)
    check_softcap(softcap)
    t = np.asarray(target)
    if t.dtype.kind not in "iuf":
        raise TypeError(
            "target must be an integer array of class indices or a floating array of probabilities, "
            f"got dtype {t.dtype}"
        )
    kind: TargetKind = "probability" if t.dtype.kind == "f" else "index"
    spec = LossSpec.create(
        kind,
        reduction=reduction,
        label_smoothing=label_smoothing,
        ignore_index=ignore_index,
        z_loss=z_loss,
        logit_scale=logit_scale,
        softcap=softcap,
        return_stats=bool(return_stats),
    )
    batch_shape, n_classes = x.shape[:-1], x.shape[-1]
    if n_classes == 0:
        raise ValueError(f"logits must have at least one class (last axis), got shape {x.shape}")
    w, weight_total = _check_weight(weight, n_classes, dtype)
    w = _read_only(w)
    if want_grad and out is not None:
        _check_out(out, x)

    if kind == "index":
        if t.shape == x.shape:
            raise TypeError(
                f"target has the logits' shape {x.shape}, so it would be probabilities, but its dtype is {t.dtype}: "
                "probability targets must be floating (class indices have shape logits.shape[:-1])"
            )
        labels = _read_only(_index_labels(t, batch_shape, spec.ignore_index))
        first_bad, denominator = kernels.label_stats(labels, n_classes, spec.ignore_index, w)
        if first_bad >= 0:
            _raise_out_of_range(labels, first_bad, batch_shape, n_classes, spec.ignore_index)
        # K, the rows not ignored: the z-loss's and the accuracy's denominator (D without weights)
        n_kept = float(np.count_nonzero(labels != spec.ignore_index)) if spec.row_outputs else denominator
        if denominators is not None:
            denominator, n_kept = (float(v) for v in denominators)
    else:
        if t.shape != x.shape:
            raise ValueError(
                f"probability target must have the logits' shape {x.shape}, got {t.shape}; "
                "class indices must be an integer array"
            )
        labels = None
        denominator = n_kept = float(math.prod(batch_shape))
    if want_grad and out is not None and (np.may_share_memory(out, t) or np.may_share_memory(out, w)):
        raise ValueError("out must not share memory with the target or the weight")

    # 16-bit logits on a kernel that reads them natively (class indices): every N x C array
    # is handled as its 16-bit words (uint16 views), never widened to a float32 copy
    storage = _dispatch.storage_of(x.dtype, kernels) if kind == "index" else STORAGE_NATIVE
    words = storage != STORAGE_NATIVE
    x_in, out_in = (x.view(np.uint16), None if out is None else out.view(np.uint16)) if words else (x, out)
    x2 = _rows(x_in, x_in.dtype if words else dtype)
    n = x2.shape[0]
    grad2 = _gradient_rows(x_in, x2, out_in) if want_grad else None

    row_loss = np.empty(n, np.float64)
    # the per-row outputs (lse, z-loss term, entropy, argmax test): NaN until written
    row_out = np.full((n, N_OUTS), np.nan) if spec.row_outputs else None
    reduce_mean = spec.reduction == "mean"

    def run_rows(grad_scale: float, z_grad_scale: float, grad: np.ndarray | None) -> None:
        """One fused kernel call over every row."""
        params = spec.params(
            n_classes=n_classes,
            weight_total=weight_total,
            grad_scale=grad_scale,
            weighted=w.shape[0] != 0,
            z_grad_scale=z_grad_scale,
            storage=storage,
        )
        x_rows = x2 if grad is x2 else _read_only(x2)  # in place: the kernel writes over x2
        if labels is not None:
            kernels.xent_index(x_rows, labels, w, params, row_loss, grad, row_out)
        else:
            kernels.xent_probability(x_rows, _read_only(_rows(t, dtype)), w, params, row_loss, grad, row_out)

    if reduce_mean and denominator == 0:  # all rows ignored, N = 0, or zero weights
        loss_value = z_value = math.nan
        if grad2 is not None:
            grad2.fill(0)
        if row_out is not None:
            row_out[:, OUT_Z] = 0.0
            if spec.return_stats and n:  # the statistics do not depend on the denominator
                run_rows(1.0, 1.0, None)
                z_value = float(np.sum(row_out[:, OUT_Z])) / n_kept if n_kept else math.nan
        row_loss.fill(0.0)
    else:
        z_grad_scale = 1.0 / n_kept if reduce_mean and n_kept else 1.0
        grad_scale = 1.0 / denominator if reduce_mean else 1.0
        run_rows(grad_scale, z_grad_scale, grad2)
        loss_value = float(np.sum(row_loss))  # pairwise in float64: the same for any thread count
        z_value = float(np.sum(row_out[:, OUT_Z])) if row_out is not None else 0.0
        if reduce_mean:
            loss_value /= denominator
            z_value = z_value / n_kept if n_kept else math.nan
        loss_value += z_value  # the z-loss has its own denominator K: added after the division

    if spec.reduction == "none":
        if row_out is not None:
            row_loss += row_out[:, OUT_Z]
        loss = (row_loss if denominators is not None else row_loss.astype(x.dtype)).reshape(batch_shape)
    else:
        loss = loss_value if denominators is not None else x.dtype.type(loss_value)
    stats = _stats(spec, row_out, labels, n_kept, z_value, x.dtype, batch_shape) if spec.return_stats else None
    if grad2 is None:
        return loss, None, stats
    if words:  # the 16-bit words are the gradient's own bits
        grad2 = grad2.view(x.dtype)
    grad = out if out is not None else None
    if grad is None:
        grad = grad2.reshape(x.shape) if grad2.dtype == x.dtype else grad2.reshape(x.shape).astype(x.dtype)
    elif not np.shares_memory(grad, grad2):
        grad[...] = grad2.reshape(x.shape)
    return loss, grad, stats


def _stats(spec, row_out, labels, n_kept, z_value, dtype, batch_shape) -> CrossEntropyStats:
    if spec.reduction == "none":
        z_part = row_out[:, OUT_Z].astype(dtype).reshape(batch_shape)
    else:
        z_part = dtype.type(z_value)
    accuracy = None
    if labels is not None:
        correct = float(np.sum(row_out[:, OUT_CORRECT]))
        accuracy = correct / n_kept if n_kept else math.nan
    return CrossEntropyStats(
        lse=row_out[:, OUT_LSE].reshape(batch_shape),
        z_loss=z_part,
        accuracy=accuracy,
        entropy=row_out[:, OUT_ENTROPY].reshape(batch_shape),
    )


_SHARED_DOC = """
    Parameters
    ----------
    logits : array_like, shape (..., C)
        Unnormalised scores; the class axis is the LAST axis. float16, float32 or float64
        (float16 is computed in float32). Any layout: non-contiguous input is copied once.
    target : array_like
        Either class indices, an integer array of shape ``logits.shape[:-1]`` (any integer
        dtype), or probabilities, a floating array of shape ``logits.shape`` (soft or one-hot
        labels; not normalised).
    weight : array_like of shape (C,), optional
        Per-class weights ``w_c``.
    ignore_index : int, default -100
        Rows whose class index equals it contribute nothing (class-index targets only).
    reduction : {"mean", "sum", "none"}, default "mean"
        "mean" divides by ``D = sum_i [y_i != ignore_index] w[y_i]`` for class indices and by
        the number of rows N for probabilities; "none" returns one loss per row.
    label_smoothing : float in [0, 1], default 0.0
        ``eps``: the target becomes ``(1-eps) * onehot + eps/C``.
    z_loss : float >= 0, default 0.0
        ``s``: each row not ignored adds ``s * lse_i**2`` (PaLM's z-loss; Liger-Kernel's
        ``lse_square_scale``), ``lse_i`` the log-sum-exp of ``x'``. Under "mean" the z-loss
        sum is divided by the number K of rows not ignored, even with class weights (as
        Liger-Kernel and flash-attention). Gradient: ``2 s lse_i softmax(x')_ic``.
    logit_scale : float, default 1.0
        ``a``: the loss sees ``a * x`` (flash-attention's ``logit_scale``).
    softcap : float > 0, optional
        ``c``: the loss sees ``x' = c * tanh(a * x / c)`` (Gemma 2's final-logit soft-capping).
        The gradient is with respect to ``x``: the one of ``x'`` times ``a (1 - tanh(a x / c)**2)``.
    backend : {"numba", "cython", "numpy"}, optional
        Default: ``$FASTXENT_BACKEND``, else the fastest available.
"""

_SHARED_RAISES = """
    Raises
    ------
    IndexError
        (``fastxent.TargetOutOfRangeError``, also a ValueError) a class index outside
        ``[0, C)`` that is not ``ignore_index``; the message names the row and the value.
    TypeError
        Non-floating logits, or a target that is neither integer nor floating.
    ValueError
        Shapes that do not match, 0-d logits, no classes, unknown reduction,
        label_smoothing outside [0, 1], ``out`` of the wrong shape or dtype.
"""


def cross_entropy(
    logits: ArrayLike,
    target: ArrayLike,
    *,
    weight: ArrayLike | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    return_stats: bool = False,
    backend: str | None = None,
) -> Any:
    loss, _, stats = _cross_entropy(
        logits, target, weight, ignore_index, reduction, label_smoothing, backend, False, None,
        z_loss, logit_scale, softcap, return_stats,
    )  # fmt: skip
    return (loss, stats) if return_stats else loss


def cross_entropy_grad(
    logits: ArrayLike,
    target: ArrayLike,
    *,
    weight: ArrayLike | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    backend: str | None = None,
    out: np.ndarray | None = None,
) -> NDArray[np.floating]:
    _, grad, _ = _cross_entropy(
        logits, target, weight, ignore_index, reduction, label_smoothing, backend, True, out,
        z_loss, logit_scale, softcap, False,
    )  # fmt: skip
    return grad


def cross_entropy_with_grad(
    logits: ArrayLike,
    target: ArrayLike,
    *,
    weight: ArrayLike | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    return_stats: bool = False,
    backend: str | None = None,
    out: np.ndarray | None = None,
) -> Any:
    loss, grad, stats = _cross_entropy(
        logits, target, weight, ignore_index, reduction, label_smoothing, backend, True, out,
        z_loss, logit_scale, softcap, return_stats,
    )  # fmt: skip
    return (loss, grad, stats) if return_stats else (loss, grad)


cross_entropy.__doc__ = (
    """Softmax cross-entropy, exactly ``torch.nn.functional.cross_entropy`` with the class axis last.

    Per row ``i``, with ``lse_i = m_i + log sum_c exp(x_ic - m_i)``, ``m_i = max_c x_ic``:

    - class indices: ``l_i = k_i [(1-eps) w[y_i] (lse_i - x_i,y_i) + eps/C sum_c w_c (lse_i - x_ic)]``
      with ``k_i = [y_i != ignore_index]``;
    - probabilities: ``l_i = -sum_c w_c t'_ic (x_ic - lse_i)`` with ``t' = (1-eps) t + eps/C``.
    """
    + _SHARED_DOC
    + """    return_stats : bool, default False
        Return ``(loss, stats)``: see below.

    Returns
    -------
    loss : NumPy scalar of the logits' dtype ("mean", "sum"), or ndarray of shape
        ``logits.shape[:-1]`` ("none"). Row sums accumulate in float64 in a fixed order.
    stats : CrossEntropyStats, with ``return_stats=True`` only: then ``(loss, stats)``.
        Per-row ``lse`` and ``entropy`` of ``x'``, the reduced ``z_loss`` part of the loss,
        and the token ``accuracy`` (class indices), all from the same pass.
    """
    + _SHARED_RAISES
)

cross_entropy_grad.__doc__ = (
    """Gradient of :func:`cross_entropy` with respect to the logits (one fused pass).

    ``dl_i/dx_ic = k_i [(1-eps) w[y_i] (p_ic - [c == y_i]) + eps/C (W p_ic - w_c)]`` for class
    indices and ``p_ic sum_k w_k t'_ik - w_c t'_ic`` for probabilities (``p = softmax(x)``,
    ``W = sum_c w_c``), divided by the "mean" denominator; for "none" it is the gradient of
    the sum of the rows. With one-hot targets and no options: ``softmax(x) - Y``.
    """
    + _SHARED_DOC
    + """    out : ndarray, optional
        Where to write the gradient: the logits' shape and dtype. ``out=logits`` overwrites
        the logits in place (no second N x C buffer).

    Returns
    -------
    grad : ndarray like ``logits`` (``out`` when given).
    """
    + _SHARED_RAISES
)

cross_entropy_with_grad.__doc__ = (
    """Loss and gradient of :func:`cross_entropy` in ONE fused pass over the logits.

    Same as ``(cross_entropy(...), cross_entropy_grad(...))`` at the cost of one call.
    """
    + _SHARED_DOC
    + """    out : ndarray, optional
        As in :func:`cross_entropy_grad`; ``out=logits`` computes the gradient in place.

    return_stats : bool, default False
        Also return a :class:`CrossEntropyStats` (see :func:`cross_entropy`).

    Returns
    -------
    (loss, grad), or (loss, grad, stats) with ``return_stats=True``.
    """
    + _SHARED_RAISES
)


# --- softmax family ------------------------------------------------------------------


def _row_transform(logits, out, backend, kernel_name):
    x = _as_logits(logits)
    dtype = _dispatch.compute_dtype(x.dtype)
    kernels = _dispatch.kernels_for(backend)
    if out is not None:
        _check_out(out, x)
    result = out if out is not None else np.empty(x.shape, x.dtype)
    if x.size == 0:
        return result
    x2 = _rows(x, dtype)
    target_rows = _gradient_rows(x, x2, result)
    getattr(kernels, kernel_name)(x2 if target_rows is x2 else _read_only(x2), target_rows)
    if not np.shares_memory(result, target_rows):
        result[...] = target_rows.reshape(x.shape)
    return result


def log_softmax(
    logits: ArrayLike, *, out: np.ndarray | None = None, backend: str | None = None
) -> NDArray[np.floating]:
    """``x - logsumexp(x)`` along the last axis, computed as ``(x - m) - log sum exp(x - m)``.

    Returns an array of the logits' shape and dtype (``out`` when given; ``out=logits`` is
    in place). float16 is computed in float32.
    """
    return _row_transform(logits, out, backend, "log_softmax_rows")


def softmax(logits: ArrayLike, *, out: np.ndarray | None = None, backend: str | None = None) -> NDArray[np.floating]:
    """``exp(x - m) / sum exp(x - m)`` along the last axis (``m`` the row max).

    Returns an array of the logits' shape and dtype (``out`` when given; ``out=logits`` is
    in place). float16 is computed in float32.
    """
    return _row_transform(logits, out, backend, "softmax_rows")


def logsumexp(logits: ArrayLike, *, backend: str | None = None) -> NDArray[np.floating]:
    """``m + log sum_c exp(x_c - m)`` along the last axis; shape ``logits.shape[:-1]``.

    An empty class axis gives ``-inf`` (the log of an empty sum). The result has the
    logits' dtype.
    """
    x = _as_logits(logits)
    dtype = _dispatch.compute_dtype(x.dtype)
    kernels = _dispatch.kernels_for(backend)
    if x.shape[-1] == 0:
        return np.full(x.shape[:-1], -np.inf, x.dtype)
    x2 = _read_only(_rows(x, dtype))
    result = np.empty(x2.shape[0], dtype)
    kernels.logsumexp_rows(x2, result)
    return result.astype(x.dtype, copy=False).reshape(x.shape[:-1])
