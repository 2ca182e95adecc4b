"""Cross-entropy in parts: row statistics of class shards, merged exactly, then the loss and
each shard's gradient, for logits too wide for one array or one machine (vocab-parallel
training, scoring data larger than memory).

For logits whose classes are split into shards (columns ``class_start .. class_start +
C_k`` of ``num_classes``), each shard yields a few float64 per row (:class:`RowStats`):
the max ``m_k``, ``s_k = sum_c exp(x'_c - m_k)``, the target logit when the target lies in
the shard (else 0), and the weight / smoothing sums ``A_k``, ``B_k``. Two shards merge
exactly (to float64 rounding) with ``m = max(m_1, m_2)``::

    s = s_1 exp(m_1 - m) + s_2 exp(m_2 - m)      target = target_1 + target_2
    A = A_1 + A_2                                 B = B_1 + A_1 (m - m_1) + B_2 + A_2 (m - m_2)

From the merged statistics :func:`loss_from_stats` gives the loss (every reduction, the
z-loss included) and :func:`shard_grad` each shard's gradient, with no further exchange::

    import numpy as np, fastxent as fx
    from fastxent import partial

    x = np.random.randn(8, 1000); y = np.random.randint(0, 1000, 8)
    left = partial.row_stats(x[:, :600], y, class_start=0, num_classes=1000)
    right = partial.row_stats(x[:, 600:], y, class_start=600, num_classes=1000)
    stats = partial.merge_row_stats(left, right)        # 5 float64 per row crossed over
    loss = partial.loss_from_stats(stats, y)            # == fx.cross_entropy(x, y)
    grad_left = partial.shard_grad(x[:, :600], y, stats, class_start=0)
    grad_right = partial.shard_grad(x[:, 600:], y, stats, class_start=600)

Rows split as well: statistics are per row, and a "mean" over row chunks needs the global
denominators, which :func:`denominators` computes (they add across row chunks) and which
``loss_from_stats`` and ``shard_grad`` take as ``denominators=``.

The options are those of :func:`fastxent.cross_entropy`: ``weight``, ``ignore_index``,
``label_smoothing``, probability targets, ``z_loss``, ``logit_scale`` and ``softcap`` (the
cap is elementwise, so each shard applies it to its own columns). Pass the same options
to every call of one computation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from . import _api, _shards
from ._spec import (
    check_ignore_index,
    check_label_smoothing,
    check_logit_scale,
    check_reduction,
    check_softcap,
    check_z_loss,
)

__all__ = ["RowStats", "denominators", "loss_from_stats", "merge_row_stats", "row_stats", "shard_grad"]

_M, _S, _TARGET, _A, _B = 0, 1, 2, 3, 4
COLUMNS = ("max", "sum_exp", "target_logit", "weight_sum", "smoothing_sum")


@dataclass(frozen=True)
class RowStats:
    """The statistics of some classes (one shard, or shards merged) of a batch of rows.

    ``data`` is a read-only ``(rows, 5)`` float64 array, the columns :data:`COLUMNS` (what is
    sent between processes: ``RowStats.from_array(data, ...)`` rebuilds it). ``batch_shape``
    is the logits' shape without the class axis; ``num_classes`` the full class count."""

    data: NDArray[np.float64]
    num_classes: int
    target_kind: Literal["index", "probability"]
    batch_shape: tuple[int, ...]

    @classmethod
    def from_array(
        cls,
        data: ArrayLike,
        num_classes: int,
        target_kind: Literal["index", "probability"] = "index",
        batch_shape: tuple[int, ...] | None = None,
    ) -> RowStats:
        array = np.array(data, dtype=np.float64, copy=True)
        if array.ndim != 2 or array.shape[1] != len(COLUMNS):
            raise ValueError(f"row statistics are a (rows, {len(COLUMNS)}) array, got shape {array.shape}")
        if target_kind not in ("index", "probability"):
            raise ValueError(f"target_kind must be 'index' or 'probability', got {target_kind!r}")
        array.flags.writeable = False
        shape = (array.shape[0],) if batch_shape is None else tuple(batch_shape)
        if math.prod(shape) != array.shape[0]:
            raise ValueError(f"batch_shape {shape} does not hold {array.shape[0]} rows")
        return cls(array, int(num_classes), target_kind, shape)

    @property
    def max(self) -> NDArray[np.float64]:
        """Per row, the max of the (transformed) logits seen."""
        return self.data[:, _M]

    @property
    def sum_exp(self) -> NDArray[np.float64]:
        """Per row, ``sum_c exp(x'_c - max)`` over the classes seen."""
        return self.data[:, _S]

    @property
    def lse(self) -> NDArray[np.float64]:
        """Per row, the log-sum-exp of the classes seen (of all of them once merged)."""
        with np.errstate(divide="ignore"):
            return self.data[:, _M] + np.log(self.data[:, _S])

    def merge(self, other: RowStats) -> RowStats:
        """The statistics of both sets of classes (see :func:`merge_row_stats`)."""
        return merge_row_stats(self, other)


def _logits(logits: ArrayLike) -> np.ndarray:
    x = _api._as_logits(logits)
    if x.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"shard logits must be float32 or float64, got {x.dtype}")
    return x


def _kind(target: np.ndarray) -> Literal["index", "probability"]:
    if target.dtype.kind not in "iuf":
        raise TypeError(
            "target must be an integer array of class indices or a floating array of probabilities, "
            f"got dtype {target.dtype}"
        )
    return "probability" if target.dtype.kind == "f" else "index"


def _check_shard(class_start: Any, width: int, num_classes: int) -> int:
    if isinstance(class_start, bool) or not isinstance(class_start, (int, np.integer)) or class_start < 0:
        raise ValueError(f"class_start must be a non-negative integer, got {class_start!r}")
    if class_start + width > num_classes:
        raise ValueError(
            f"the shard's columns {class_start}..{class_start + width - 1} exceed num_classes={num_classes}"
        )
    return int(class_start)


def _check_weight(weight: ArrayLike | None, num_classes: int) -> np.ndarray | None:
    if weight is None:
        return None
    w = np.asarray(weight, dtype=np.float64)
    if w.shape != (num_classes,):
        raise ValueError(f"weight must have shape ({num_classes},) (one per class of all shards), got {w.shape}")
    return w


def _labels(target: np.ndarray, batch_shape: tuple[int, ...], num_classes: int, ignore_index: int) -> np.ndarray:
    labels = _api._index_labels(target, batch_shape, ignore_index)
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bad.any():
        _api._raise_out_of_range(labels, int(np.argmax(bad)), batch_shape, num_classes, ignore_index)
    return labels


def _transformed(x: np.ndarray, logit_scale: float, softcap: float | None) -> np.ndarray:
    """``x' = c tanh(a x / c)``, or ``a x`` without a cap: what the loss sees."""
    if softcap is not None:
        return (softcap * np.tanh(x * (logit_scale / softcap))).astype(x.dtype, copy=False)
    return x * x.dtype.type(logit_scale) if logit_scale != 1.0 else x


def row_stats(
    logits_shard: ArrayLike,
    target: ArrayLike,
    *,
    class_start: int = 0,
    num_classes: int | None = None,
    weight: ArrayLike | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    backend: str | None = None,
) -> RowStats:
    """The statistics of one class shard: the columns ``class_start .. class_start + C_k`` of
    ``num_classes`` classes (default: this shard is all of them).

    ``logits_shard`` is ``(..., C_k)`` float32/float64. ``target`` is the full target: class
    indices of shape ``logits.shape[:-1]`` (the same array for every shard; a target outside
    this shard adds nothing here), or this shard's columns of probability targets.
    ``weight`` is the full ``(num_classes,)`` class weight. One pass over the shard in the
    numba or cython kernel (with a scale or cap, over ``x'`` computed first)."""
    x = _logits(logits_shard)
    width = x.shape[-1]
    num_classes = width if num_classes is None else int(num_classes)
    class_start = _check_shard(class_start, width, num_classes)
    label_smoothing = check_label_smoothing(label_smoothing)
    ignore_index = check_ignore_index(ignore_index)
    logit_scale = check_logit_scale(logit_scale)
    softcap = check_softcap(softcap)
    w = _check_weight(weight, num_classes)
    t = np.asarray(target)
    kind = _kind(t)
    batch_shape = x.shape[:-1]
    rows = x.reshape(-1, width)
    if kind == "index":
        shard_target: np.ndarray = _labels(t, batch_shape, num_classes, ignore_index)
    else:
        if t.shape != x.shape:
            raise ValueError(f"probability target must have the shard's shape {x.shape}, got {t.shape}")
        shard_target = t.reshape(-1, width)
    data = _shards.row_stats(
        _transformed(rows, logit_scale, softcap),
        shard_target,
        class_start=class_start,
        num_classes=num_classes,
        weight=w,
        label_smoothing=label_smoothing,
        ignore_index=ignore_index,
        backend=backend,
    )
    data.flags.writeable = False
    return RowStats(data, num_classes, kind, batch_shape)


def merge_row_stats(*parts: RowStats) -> RowStats:
    """The statistics of several shards of the same rows, as if computed on all their classes
    at once (exact to float64 rounding, in any order)."""
    if not parts:
        raise ValueError("merge_row_stats needs at least one RowStats")
    first = parts[0]
    data = first.data
    for part in parts[1:]:
        if not isinstance(part, RowStats):
            raise TypeError(f"merge_row_stats takes RowStats, got {type(part).__name__}")
        if (part.num_classes, part.target_kind, part.batch_shape) != (
            first.num_classes,
            first.target_kind,
            first.batch_shape,
        ):
            raise ValueError(
                "row statistics of different computations: "
                f"{(first.num_classes, first.target_kind, first.batch_shape)} vs "
                f"{(part.num_classes, part.target_kind, part.batch_shape)} (num_classes, target kind, batch shape)"
            )
        data = _shards.merge_row_stats(data, part.data)
    data = np.array(data, copy=True)
    data.flags.writeable = False
    return RowStats(data, first.num_classes, first.target_kind, first.batch_shape)


def denominators(
    target: ArrayLike,
    *,
    num_classes: int | None = None,
    weight: ArrayLike | None = None,
    ignore_index: int = -100,
) -> tuple[float, float]:
    """``(D, K)`` of these rows: "mean" divides the cross-entropy by D (the sum of the
    weights of the non-ignored targets; the row count for probability targets) and the
    z-loss by K (the non-ignored rows). Both add across row chunks: pass the totals as
    ``denominators=`` to average over all chunks."""
    t = np.asarray(target)
    kind = _kind(t)
    if kind == "probability":
        rows = float(math.prod(t.shape[:-1]))
        return rows, rows
    ignore_index = check_ignore_index(ignore_index)
    labels = t.reshape(-1).astype(np.int64)
    kept = labels != ignore_index
    if weight is None:
        count = float(np.count_nonzero(kept))
        return count, count
    w = np.asarray(weight, dtype=np.float64)
    if num_classes is not None and w.shape != (num_classes,):
        raise ValueError(f"weight must have shape ({num_classes},), got {w.shape}")
    return float(np.sum(w[labels[kept]], dtype=np.float64)), float(np.count_nonzero(kept))


def _finish(stats, target, weight, ignore_index, label_smoothing, z_loss, reduction, denominators_):
    """Per-row cross-entropy and z-loss terms, the coefficients of step (4), the scales."""
    if not isinstance(stats, RowStats):
        raise TypeError(f"stats must be RowStats (from row_stats / merge_row_stats), got {type(stats).__name__}")
    reduction = check_reduction(reduction)
    label_smoothing = check_label_smoothing(label_smoothing)
    ignore_index = check_ignore_index(ignore_index)
    z_loss = check_z_loss(z_loss)
    w = _check_weight(weight, stats.num_classes)
    t = np.asarray(target)
    if _kind(t) != stats.target_kind:
        raise TypeError(f"the statistics are of {stats.target_kind} targets, the target given is not")
    if stats.target_kind == "index":
        labels = _labels(t, stats.batch_shape, stats.num_classes, ignore_index)
        finish_target: np.ndarray = labels
        kept = labels != ignore_index
    else:
        if t.shape[:-1] != stats.batch_shape:
            raise ValueError(f"probability target rows {t.shape[:-1]} do not match the statistics' {stats.batch_shape}")
        finish_target = t.reshape(-1, t.shape[-1])
        kept = np.ones(stats.data.shape[0], bool)
    if denominators_ is None:
        denominators_ = denominators(t, num_classes=stats.num_classes, weight=w, ignore_index=ignore_index)
    d, k = (float(v) for v in denominators_)
    row_loss, coef, _ = _shards.finish(
        stats.data,
        finish_target,
        num_classes=stats.num_classes,
        weight=w,
        reduction="none",  # (grad_scale 1: scaled below)
        label_smoothing=label_smoothing,
        ignore_index=ignore_index,
    )
    mean = reduction == "mean"
    grad_scale = 1.0 / d if mean and d else 1.0
    z_grad_scale = 1.0 / k if mean and k else 1.0
    coef[:, 1:] *= grad_scale  # a / s and the target's term are linear in grad_scale
    z_rows = np.zeros_like(row_loss)
    if z_loss != 0.0:
        lse = stats.lse
        z_rows[kept] = z_loss * lse[kept] ** 2
        coef[kept, 1] += z_grad_scale * 2.0 * z_loss * lse[kept] / stats.sum_exp[kept]
    if mean and d == 0:  # every row ignored, or zero weights: NaN, and a zero gradient
        coef[:, 1:] = 0.0
    return row_loss, z_rows, coef, grad_scale, (d, k), reduction


def loss_from_stats(
    stats: RowStats,
    target: ArrayLike,
    *,
    weight: ArrayLike | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "mean",
    denominators: tuple[float, float] | None = None,
) -> float | NDArray[np.float64]:
    """The loss from merged statistics (all classes), as :func:`fastxent.cross_entropy`
    returns it, in float64: a float for "mean" / "sum", per-row losses of shape
    ``batch_shape`` for "none". ``denominators=(D, K)`` replaces these rows' own (see
    :func:`denominators`) for a mean over several row chunks."""
    row_loss, z_rows, _, _, (d, k), reduction = _finish(
        stats, target, weight, ignore_index, label_smoothing, z_loss, reduction, denominators
    )
    if reduction == "none":
        return (row_loss + z_rows).reshape(stats.batch_shape)
    total, z_total = float(np.sum(row_loss)), float(np.sum(z_rows))
    if reduction == "sum":
        return total + z_total
    if d == 0:
        return math.nan
    return total / d + (z_total / k if k else math.nan)


def shard_grad(
    logits_shard: ArrayLike,
    target: ArrayLike,
    stats: RowStats,
    *,
    class_start: int = 0,
    weight: ArrayLike | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    reduction: str = "mean",
    denominators: tuple[float, float] | None = None,
    out: np.ndarray | None = None,
    backend: str | None = None,
) -> np.ndarray:
    """The gradient of the loss with respect to this shard's logits, from the MERGED
    statistics (no exchange with other shards): ``(softmax(x') - Y)`` of these columns,
    scaled and chained through the scale / cap as :func:`fastxent.cross_entropy_grad`
    ("none": the gradient of the sum). ``target`` and the options as in :func:`row_stats`."""
    x = _logits(logits_shard)
    width = x.shape[-1]
    class_start = _check_shard(class_start, width, stats.num_classes)
    logit_scale = check_logit_scale(logit_scale)
    softcap = check_softcap(softcap)
    if x.shape[:-1] != stats.batch_shape:
        raise ValueError(f"the shard's rows {x.shape[:-1]} do not match the statistics' {stats.batch_shape}")
    t = np.asarray(target)  # (probability targets: this shard's columns; their sums are in the statistics)
    _, _, coef, grad_scale, _, _ = _finish(
        stats, t, weight, ignore_index, label_smoothing, z_loss, reduction, denominators
    )
    rows = x.reshape(-1, width)
    xt = _transformed(rows, logit_scale, softcap)
    w = _check_weight(weight, stats.num_classes)
    shard_target = (
        _labels(t, stats.batch_shape, stats.num_classes, check_ignore_index(ignore_index))
        if stats.target_kind == "index"
        else t.reshape(-1, width)
    )
    grad = _shards.shard_grad(
        xt,
        shard_target,
        coef,
        grad_scale,
        class_start=class_start,
        num_classes=stats.num_classes,
        weight=w,
        label_smoothing=check_label_smoothing(label_smoothing),
        backend=backend,
    )
    if logit_scale != 1.0 or softcap is not None:  # the chain rule: dx'/dx = a (1 - (x'/c)**2)
        chain = np.full_like(xt, logit_scale) if softcap is None else logit_scale * (1 - (xt / softcap) ** 2)
        grad *= chain.astype(grad.dtype, copy=False)
    grad = grad.reshape(x.shape)
    if out is not None:
        out[...] = grad
        return out
    return grad
