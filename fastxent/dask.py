"""Cross-entropy and scoring metrics of Dask arrays, lazily, on any Dask scheduler (threads,
processes, a ``distributed`` cluster): the ``dask`` extra.

The logits are a ``(N, C)`` Dask array chunked by rows, by classes, or both; the targets a
``(N,)`` array of class indices (NumPy or Dask). Each block computes the row statistics of
its classes (:func:`fastxent.row_stats`, one kernel pass); the class chunks of each row
chunk then merge in a tree (``dask.array.reduction`` with ``split_every``), exactly as two
class shards merge (:mod:`fastxent.partial`); the loss of each row comes from the merged
statistics, and "mean" / "sum" reduce those rows with Dask's sum. Only the statistics (five
float64 per row and class chunk) move between workers, never the logits.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

try:
    import dask.array as da
except ImportError:
    raise ImportError("fastxent.dask needs Dask: pip install 'fastxent[dask]' (dask[array] and distributed)") from None

from . import _score, _threads
from ._spec import check_reduction
from .partial import COLUMNS, RowStats, loss_from_stats, merge_row_stats, row_stats

__all__ = ["cross_entropy", "row_statistics", "score"]

N_STATS = len(COLUMNS)


def _as_dask(x: Any, chunks: Any = "auto") -> da.Array:
    return x if isinstance(x, da.Array) else da.from_array(np.asarray(x), chunks=chunks)


def _targets(target: Any, x: da.Array) -> da.Array:
    shape = getattr(target, "shape", np.shape(target))
    if len(shape) != 1 or shape[0] != x.shape[0]:
        raise ValueError(f"target must have shape ({x.shape[0]},) (one class index per row), got {tuple(shape)}")
    y = _as_dask(target, chunks=(x.chunks[0],))
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"target must have shape ({x.shape[0]},) (one class index per row), got {y.shape}")
    if np.dtype(y.dtype).kind not in "iu":
        raise TypeError(f"target must be integer class indices, got dtype {y.dtype}")
    return y.rechunk((x.chunks[0],))


@contextlib.contextmanager
def _one_thread_per_task() -> Iterator[None]:
    """A block's kernel on one thread when Dask runs blocks side by side: on a worker
    thread (the threaded scheduler, a ``distributed`` worker) or in a worker process (the
    processes scheduler, a LocalCluster). Dask's parallelism is over blocks; a kernel that
    also used every core would oversubscribe them (2 workers x 2 numba threads on 2 cores:
    ``bench/score.py``, 16384 x 32000 float32 in 16 chunks, 0.49 s without this rule and
    0.35 s with it, medians of 5 in two runs). The thread count is per calling thread
    (numba's and OpenMP's), so nothing outside the task changes. On the main thread of the
    main process (the synchronous scheduler) the kernels keep every thread."""
    in_a_worker = (
        threading.current_thread() is not threading.main_thread() or multiprocessing.parent_process() is not None
    )
    with _threads.limited(1) if in_a_worker else contextlib.nullcontext():
        yield


def _block_stats(x_block, y_block, *, starts, num_classes, options, block_id=None):
    """Statistics (rows, 5) of the block ``block_id``: its classes start at ``starts[j]``."""
    class_start = starts[block_id[1]]
    with _one_thread_per_task():
        stats = row_stats(x_block, y_block[:, 0], class_start=class_start, num_classes=num_classes, **options)
    return np.array(stats.data)


def _merge_columns(block, axis=None, keepdims=None, num_classes=0):
    """Merge the (rows, 5 k) statistics of k class chunks, side by side, into (rows, 5)."""
    k = block.shape[1] // N_STATS
    parts = [RowStats.from_array(block[:, N_STATS * j : N_STATS * (j + 1)], num_classes) for j in range(k)]
    return np.array(merge_row_stats(*parts).data)


def _keep_columns(block, axis=None, keepdims=None):
    return block


def row_statistics(
    x: Any,
    target: Any,
    *,
    weight: Any = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    split_every: int | None = None,
) -> da.Array:
    """The merged row statistics ``(N, 5)`` (columns ``fastxent.partial.COLUMNS``), lazily:
    per block ``row_stats``, then a tree merge over the class chunks."""
    x = _as_dask(x)
    if x.ndim != 2:
        raise ValueError(f"logits must be a 2-D (N, C) array, got shape {x.shape}")
    y = _targets(target, x)
    num_classes = int(x.shape[1])
    starts = tuple(int(v) for v in np.cumsum((0,) + x.chunks[1][:-1]))
    options = {
        "weight": None if weight is None else np.asarray(weight, np.float64),
        "ignore_index": ignore_index,
        "label_smoothing": label_smoothing,
        "logit_scale": logit_scale,
        "softcap": softcap,
    }
    blocks = da.map_blocks(
        _block_stats,
        x,
        y[:, None],  # (N, 1): the same row chunk's targets for every class chunk
        chunks=(x.chunks[0], (N_STATS,) * len(x.chunks[1])),
        dtype=np.float64,
        meta=np.empty((0, 0)),
        starts=starts,
        num_classes=num_classes,
        options=options,
    )
    if len(x.chunks[1]) == 1:
        return blocks
    return da.reduction(
        blocks,
        chunk=_keep_columns,
        combine=lambda block, axis=None, keepdims=None: _merge_columns(block, num_classes=num_classes),
        aggregate=lambda block, axis=None, keepdims=None: _merge_columns(block, num_classes=num_classes),
        axis=1,
        keepdims=True,
        output_size=N_STATS,
        dtype=np.float64,
        split_every=split_every,
        concatenate=True,
        meta=np.empty((0, 0)),
    )


def _row_losses(stats_block, y_block, *, num_classes, options, z_loss):
    """Per row: the cross-entropy term, the z-loss term, the mean's weight, kept (rows, 4)."""
    stats = RowStats.from_array(stats_block, num_classes)
    ce = loss_from_stats(stats, y_block, reduction="none", **options)
    kept = y_block != options["ignore_index"]
    z = np.zeros(len(y_block))
    z[kept] = z_loss * stats.lse[kept] ** 2
    weight = options["weight"]
    if weight is None:
        d = kept.astype(np.float64)
    else:
        d = np.zeros(len(y_block))
        d[kept] = np.asarray(weight, np.float64)[y_block[kept]]
    return np.column_stack([ce, z, d, kept.astype(np.float64)])


def cross_entropy(
    x: Any,
    target: Any,
    *,
    weight: Any = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    split_every: int | None = None,
) -> da.Array:
    """:func:`fastxent.cross_entropy` of a Dask array of logits, as a lazy Dask result: a
    0-d array for "mean" / "sum", the per-row losses ``(N,)`` for "none" (float64).
    Call ``.compute()`` on it (on a ``distributed`` cluster with a ``Client``)."""
    reduction = check_reduction(reduction)
    x = _as_dask(x)
    stats = row_statistics(
        x,
        target,
        weight=weight,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        logit_scale=logit_scale,
        softcap=softcap,
        split_every=split_every,
    )
    y = _targets(target, x)
    options = {
        "weight": None if weight is None else np.asarray(weight, np.float64),
        "ignore_index": ignore_index,
        "label_smoothing": label_smoothing,
    }
    rows = da.blockwise(
        _row_losses,
        "ij",
        stats,
        "ij",
        y,
        "i",
        adjust_chunks={"j": 4},
        dtype=np.float64,
        meta=np.empty((0, 0)),
        num_classes=int(x.shape[1]),
        options=options,
        z_loss=float(z_loss),
    )
    if reduction == "none":
        return rows[:, 0] + rows[:, 1]
    sums = rows.sum(axis=0)
    if reduction == "sum":
        return sums[0] + sums[1]
    return da.map_blocks(_mean, sums, dtype=np.float64, drop_axis=0, meta=np.float64(0))


def _mean(sums):
    ce, z, d, k = (float(v) for v in sums)
    if d == 0:
        return np.float64(math.nan)
    return np.float64(ce / d + (z / k if k else math.nan))


def _score_block(x_block, y_block, *, ignore_index):
    """The partial sums of the metrics of one row chunk (``_score.partial_sums``)."""
    with _one_thread_per_task():
        return _score.partial_sums(np.asarray(x_block), np.asarray(y_block), ignore_index)[None, :]


def score(x: Any, target: Any, *, ignore_index: int = -100) -> dict[str, float]:
    """The metrics of ``fastxent score`` (cross_entropy, perplexity, accuracy, top5_accuracy,
    ece, rows) of a Dask array of logits, computed now (on the current scheduler). Needs
    whole rows: class chunks are merged into one first."""
    x = _as_dask(x)
    if x.ndim != 2:
        raise ValueError(f"logits must be a 2-D (N, C) array, got shape {x.shape}")
    x = x.rechunk({1: -1})
    y = _targets(target, x)
    n_blocks = len(x.chunks[0])
    partial = da.blockwise(
        _score_block,
        "ij",
        x,
        "ij",
        y,
        "i",
        adjust_chunks={"i": [1] * n_blocks, "j": _score.PARTIAL_WIDTH},
        dtype=np.float64,
        meta=np.empty((0, 0)),
        ignore_index=ignore_index,
    )
    sums = partial.sum(axis=0).compute()
    return _score.metrics_from_sums(sums)
