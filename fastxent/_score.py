"""``fastxent score LOGITS LABELS``: the metrics of saved logits over a dataset larger than
memory, streamed in row chunks.

LOGITS is a ``.npy`` file, opened with ``mmap_mode="r"`` (never loaded whole), or a Zarr
array (the ``zarr`` package); LABELS a ``.npy`` / Zarr array of class indices of shape
``LOGITS.shape[:-1]`` (``ignore_index`` -100 marks rows left out). Per chunk, one fused
kernel call gives each row's log-sum-exp in float64 (``return_stats``), and NumPy the row
max and the target's rank. Reported (stdout; ``--json PATH`` writes exactly these keys):

- ``cross_entropy``: the mean of ``lse_i - x_{i,y_i}`` over the kept rows. The per-row
  values are summed in blocks of ``BLOCK_ROWS`` consecutive rows of the whole file, and the
  block sums in order, so the result does not depend on ``--chunk-rows``;
- ``perplexity``: ``exp(cross_entropy)``;
- ``accuracy`` / ``top5_accuracy``: the target's rank ``#{c: x_c > x_y} + #{c < y: x_c =
  x_y}`` (ties go to the first index, as ``torch.argmax`` / ``torch.topk``) is 0 / below 5;
- ``ece``: the expected calibration error over 15 equal-width bins of the confidence
  ``max_c softmax(x)_c = exp(max_c x_c - lse)``: ``sum_b (n_b / n) |acc_b - conf_b|``;
- ``rows``: the kept rows.

Errors (a missing file, a shape mismatch, a label out of range, logits that are not
floating) are one line on stderr and exit status 1 (2 for a usage error), no traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any

import numpy as np

BLOCK_ROWS = 1 << 16  # the fixed summation blocks of the per-row losses and confidences
ECE_BINS = 15
DEFAULT_CHUNK_BYTES = 32 << 20  # logits per chunk: ~32 MB
KEYS = ("cross_entropy", "perplexity", "accuracy", "top5_accuracy", "ece", "rows")


class ScoreError(Exception):
    """Bad input: reported as one line, exit status 1."""


class FixedOrderSum:
    """A float64 sum of a stream of values whose result does not depend on how the stream
    is cut: values are summed in blocks of ``BLOCK_ROWS`` consecutive positions (NumPy's
    pairwise sum), and the block sums added in order."""

    def __init__(self, width: int = 1) -> None:
        self.total = np.zeros(width)
        self.pending: list[np.ndarray] = []
        self.pending_rows = 0

    def add(self, values: np.ndarray) -> None:
        values = values.reshape(len(values), -1)
        while len(values):
            take = min(BLOCK_ROWS - self.pending_rows, len(values))
            self.pending.append(values[:take])
            self.pending_rows += take
            values = values[take:]
            if self.pending_rows == BLOCK_ROWS:
                self._flush()

    def _flush(self) -> None:
        if self.pending:
            self.total += np.sum(np.concatenate(self.pending), axis=0)
        self.pending, self.pending_rows = [], 0

    def result(self) -> np.ndarray:
        self._flush()
        return self.total


def open_array(path: str, what: str) -> Any:
    """A ``.npy`` file as a read-only memory map, or a Zarr array (lazy)."""
    if not os.path.exists(path):
        raise ScoreError(f"{what} file not found: {path}")
    if path.endswith(".npy") or os.path.isfile(path):
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as error:
            raise ScoreError(f"{what} {path} is not a .npy array file ({error})") from None
    try:
        import zarr  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        raise ScoreError(f"{what} {path} is a directory: reading Zarr arrays needs the zarr package") from None
    try:
        return zarr.open(path, mode="r")
    except Exception as error:  # noqa: BLE001 - any failure to open is the user's file
        raise ScoreError(f"{what} {path} could not be opened as a Zarr array ({error})") from None


def _check_inputs(logits: Any, labels: Any, ignore_index: int) -> tuple[int, int]:
    """Shapes and dtypes, and every label in range (streamed): ``(rows, classes)``."""
    from ._dispatch import is_floating

    if len(logits.shape) < 2 or logits.shape[-1] < 1:
        raise ScoreError(f"logits must have shape (rows, classes), got {tuple(logits.shape)}")
    if not is_floating(np.dtype(logits.dtype)):
        raise ScoreError(f"logits must be floating (float16, bfloat16, float32, float64), got dtype {logits.dtype}")
    if np.dtype(labels.dtype).kind not in "iu":
        raise ScoreError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ScoreError(
            f"labels have shape {tuple(labels.shape)} but the logits {tuple(logits.shape)} need "
            f"{tuple(logits.shape[:-1])} (one label per row)"
        )
    n_classes = int(logits.shape[-1])
    rows = math.prod(logits.shape[:-1])
    step = 1 << 22
    for r0 in range(0, rows, step):
        chunk = _rows(labels, r0, r0 + step, 0)
        bad = (chunk != ignore_index) & ((chunk < 0) | (chunk >= n_classes))
        if bad.any():
            j = int(np.argmax(bad))
            raise ScoreError(
                f"label out of range at row {r0 + j}: {int(chunk[j])} (expected 0 <= label < {n_classes} "
                f"or ignore_index={ignore_index})"
            )
    return rows, n_classes


def _rows(array: Any, r0: int, r1: int, trailing: int) -> np.ndarray:
    """Rows ``r0:r1`` of ``array`` with its leading dims flattened (``trailing`` dims kept)."""
    lead = array.shape[: len(array.shape) - trailing]
    if len(lead) == 1:
        return np.asarray(array[r0:r1])
    index = np.unravel_index(np.arange(r0, min(r1, math.prod(lead))), lead)
    return np.asarray(array[index] if isinstance(array, np.ndarray) else array.vindex[index])


def score(
    logits: Any,
    labels: Any,
    *,
    chunk_rows: int | None = None,
    ignore_index: int = -100,
    progress: bool = True,
) -> dict[str, float]:
    """The metrics of ``logits`` (an array or memory map, ``(..., C)``) and ``labels``."""
    import fastxent as fx

    from ._progress import Progress

    rows, n_classes = _check_inputs(logits, labels, ignore_index)
    if chunk_rows is None:
        itemsize = np.dtype(logits.dtype).itemsize
        chunk_rows = max(1, DEFAULT_CHUNK_BYTES // (itemsize * n_classes))
    losses = FixedOrderSum()
    calibration = FixedOrderSum(2 * ECE_BINS)  # per bin: confidence sum, correct count
    kept = correct = top5 = 0
    bin_counts = np.zeros(ECE_BINS, np.int64)
    bar = Progress(rows, "score", unit="row") if progress else None
    try:
        for r0 in range(0, rows, chunk_rows):
            r1 = min(rows, r0 + chunk_rows)
            x = _rows(logits, r0, r1, 1)
            y = _rows(labels, r0, r1, 0).astype(np.int64)
            keep = y != ignore_index
            x, y = x[keep], y[keep]
            if len(y):
                _, stats = fx.cross_entropy(x, y, reduction="none", return_stats=True)
                rows_idx = np.arange(len(y))
                x_y = x[rows_idx, y].astype(np.float64)
                losses.add(stats.lse - x_y)
                x_y_native = x[rows_idx, y][:, None]
                ahead = np.count_nonzero(x > x_y_native, axis=1)
                tied_before = np.count_nonzero((x == x_y_native) & (np.arange(n_classes) < y[:, None]), axis=1)
                rank = ahead + tied_before
                is_correct = rank == 0
                correct += int(np.count_nonzero(is_correct))
                top5 += int(np.count_nonzero(rank < 5))
                confidence = np.exp(np.max(x, axis=1).astype(np.float64) - stats.lse)
                bins = np.minimum((confidence * ECE_BINS).astype(np.int64), ECE_BINS - 1)
                per_bin = np.zeros((len(y), 2 * ECE_BINS))
                per_bin[rows_idx, bins] = confidence
                per_bin[rows_idx, ECE_BINS + bins] = is_correct
                calibration.add(per_bin)
                bin_counts += np.bincount(bins, minlength=ECE_BINS)
                kept += len(y)
            if bar is not None:
                bar.step(count=r1 - r0)
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
    if kept == 0:
        nan = float("nan")
        return {"cross_entropy": nan, "perplexity": nan, "accuracy": nan, "top5_accuracy": nan, "ece": nan, "rows": 0}
    cross_entropy = float(losses.result()[0]) / kept
    sums = calibration.result()
    with np.errstate(invalid="ignore", divide="ignore"):
        gaps = np.abs(sums[ECE_BINS:] - sums[:ECE_BINS])  # |correct_b - confidence_b| (sums)
    ece = float(np.sum(gaps[bin_counts > 0])) / kept
    return {
        "cross_entropy": cross_entropy,
        "perplexity": math.exp(cross_entropy) if cross_entropy < 709 else float("inf"),
        "accuracy": correct / kept,
        "top5_accuracy": top5 / kept,
        "ece": ece,
        "rows": kept,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("logits", metavar="LOGITS", help="a .npy file (memory-mapped) or a Zarr array, (rows, C)")
    parser.add_argument("labels", metavar="LABELS", help="a .npy file or Zarr array of class indices, (rows,)")
    parser.add_argument("--chunk-rows", type=int, default=None, help="rows per chunk (default: ~32 MB of logits)")
    parser.add_argument("--json", metavar="PATH", help="write the metrics as JSON (exactly the keys printed)")
    parser.add_argument("--ignore-index", type=int, default=-100, help="label of rows left out (default: -100)")


def main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from .__main__ import _writable_file

    if args.chunk_rows is not None and args.chunk_rows < 1:
        parser.error(f"--chunk-rows {args.chunk_rows}: at least 1")
    if args.json is not None:
        _writable_file(parser, "--json", args.json)
    try:
        logits = open_array(args.logits, "logits")
        labels = open_array(args.labels, "labels")
        metrics = score(logits, labels, chunk_rows=args.chunk_rows, ignore_index=args.ignore_index)
    except ScoreError as error:
        print(f"fastxent score: error: {error}", file=sys.stderr)
        return 1
    width = max(len(key) for key in KEYS)
    for key in KEYS:
        value = metrics[key]
        print(f"{key:<{width}}  {value:.10g}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    if args.json is not None:
        with open(args.json, "w") as f:
            json.dump({key: metrics[key] for key in KEYS}, f, indent=1)
    return 0
