"""The fused linear cross-entropy: ``loss(hidden @ weight.T + bias, target)`` and its three
gradients, with the ``N x V`` logits never held at once.

Per chunk of rows (``chunk_rows``; by default the larger of ~64 MB of float32 logits and a
quarter of ``d_weight``'s size, see ``_chunk_rows``):

1. one GEMM writes the chunk's logits into a reused buffer: ``Z = H_c W^T (+ b)``;
2. the fused kernel runs IN PLACE on it (``out=Z``), with the GLOBAL "mean" denominators
   (``D``: the weights of the kept targets, ``K``: the kept rows, counted over all rows
   before the chunks), so ``Z`` becomes ``dJ/dZ`` of the whole batch's loss;
3. two GEMMs: ``d_hidden[c] = G W`` and ``d_weight += G^T H_c`` (BLAS ``gemm`` with
   ``beta = 1`` straight into ``d_weight``: no ``V x H`` temporary; through SciPy's BLAS
   when it is installed, else one ``V x H`` buffer), and ``d_bias += sum_rows G``.

The GEMMs are NumPy's (``NumpyGemms``) for the NumPy API; fastxent.torch runs the same
loop with torch's matmul (``torch.mm`` / ``addmm_`` on tensors sharing the arrays' memory).

Memory beyond the inputs and the gradients: the chunk's logits (and with SciPy nothing
else of size ``V x H``). Any chunk size gives the same loss and gradients up to the
rounding of the GEMMs' sums. 16-bit inputs (float16, bfloat16) are computed in float32
and ``d_weight`` / ``d_bias`` accumulate in float32 (bfloat16 accumulation diverges,
Liger-Kernel's issues #512 and #827); the gradients are returned in the inputs' dtype.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from . import _api, _dispatch
from ._spec import check_ignore_index, check_reduction
from .partial import _labels, denominators

#: the default chunk: about this many bytes of float32 logits at least ...
DEFAULT_CHUNK_BYTES = 64 << 20
#: ... or this fraction of ``d_weight``'s bytes, if more (see ``_chunk_rows``)
CHUNK_FRACTION_OF_WEIGHT = 0.25


class NumpyGemms:
    """The three GEMMs of a chunk on NumPy's BLAS (``np.matmul``), the ``d_weight``
    accumulation through SciPy's ``gemm`` with ``beta = 1`` when SciPy is installed (no
    ``V x H`` temporary), else through one ``V x H`` scratch buffer.

    ``threads()`` holds the BLAS libraries to fastxent's thread count
    (``fx.set_num_threads``) for the chunk loop, through threadpoolctl when it is installed
    (the ``linear`` extra), so the GEMMs and the kernels use the same cores; they run one
    after the other, never at once."""

    def __init__(self) -> None:
        try:
            from scipy.linalg import blas
        except ImportError:
            blas = None
        self._blas = blas
        self._scratch: np.ndarray | None = None

    @staticmethod
    def threads() -> contextlib.AbstractContextManager[Any]:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            return contextlib.nullcontext()
        from ._threads import get_num_threads

        return threadpool_limits(limits=get_num_threads(), user_api="blas")

    def logits(self, hidden: np.ndarray, weight: np.ndarray, out: np.ndarray) -> None:
        """``out = hidden @ weight.T``."""
        np.matmul(hidden, weight.T, out=out)

    def d_hidden(self, grad: np.ndarray, weight: np.ndarray, out: np.ndarray) -> None:
        """``out = grad @ weight``."""
        np.matmul(grad, weight, out=out)

    def accumulate(self, d_weight: np.ndarray, grad: np.ndarray, hidden: np.ndarray) -> None:
        """``d_weight += grad.T @ hidden``, in place."""
        if self._blas is None:
            if self._scratch is None:
                self._scratch = np.empty_like(d_weight)
            np.matmul(grad.T, hidden, out=self._scratch)
            d_weight += self._scratch
            return
        gemm = self._blas.sgemm if d_weight.dtype == np.float32 else self._blas.dgemm
        # every operand a Fortran-ordered view of a C-ordered array, so SciPy copies none:
        # dW^T (H x V) += Hc^T (H x rows, as hidden.T) @ G (rows x V, as the transpose of G.T)
        result = gemm(1.0, hidden.T, grad.T, beta=1.0, c=d_weight.T, trans_b=1, overwrite_c=1)
        if not np.shares_memory(result, d_weight):  # (never seen: a copy would be silently lost)
            d_weight += result.T


def _chunk_rows(chunk_rows: Any, n: int, n_classes: int, hidden: int) -> int:
    """Rows per chunk: ``chunk_rows``, or by default as many as fit in the larger of 64 MB
    and a quarter of ``d_weight``'s bytes (``V x H`` float32). ``d_weight`` is a result the
    caller holds anyway, so the chunk adds at most a quarter to it; and wide heads get
    chunks long enough for the GEMMs to run at full speed (the ``d_weight += G^T H_c``
    update is a rank-``rows`` update of all of ``d_weight``). At 8192 x 2048 x 128256:
    512 rows, the cross-entropy +3.5% over the three GEMMs alone; 64 MB (130 rows) was
    +45% (docs/DESIGN.md "Fused linear cross-entropy")."""
    if chunk_rows is None:
        budget = max(DEFAULT_CHUNK_BYTES, int(CHUNK_FRACTION_OF_WEIGHT * 4 * n_classes * hidden))
        return max(1, min(n, budget // (4 * max(n_classes, 1))))
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, (int, np.integer)) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    return int(chunk_rows)


def _inputs(hidden, weight, target, bias):
    h = np.asarray(hidden)
    w = np.asarray(weight)
    if not _dispatch.is_floating(h.dtype) or not _dispatch.is_floating(w.dtype):
        raise TypeError(f"hidden and weight must be floating arrays, got {h.dtype} and {w.dtype}")
    if w.ndim != 2:
        raise ValueError(f"weight must be (V, H) (one row per class), got shape {w.shape}")
    if h.ndim < 1 or h.shape[-1] != w.shape[1]:
        raise ValueError(f"hidden must be (..., H) with H = weight.shape[1] = {w.shape[1]}, got shape {h.shape}")
    compute = np.result_type(_dispatch.compute_dtype(h.dtype), _dispatch.compute_dtype(w.dtype))
    b = None
    if bias is not None:
        b = np.asarray(bias)
        if b.shape != (w.shape[0],):
            raise ValueError(f"bias must have shape ({w.shape[0]},), got {b.shape}")
        b = np.ascontiguousarray(b, compute)
    t = np.asarray(target)
    if t.dtype.kind not in "iu":
        raise TypeError(f"target must be integer class indices, got dtype {t.dtype}")
    if t.shape != h.shape[:-1]:
        raise ValueError(f"target must have shape {h.shape[:-1]} (hidden's without H), got {t.shape}")
    h2 = np.ascontiguousarray(h.reshape(-1, h.shape[-1]), compute)
    w2 = np.ascontiguousarray(w, compute)
    return h, w, h2, w2, b, t, compute


def _options(class_weight, ignore_index, reduction, label_smoothing, z_loss, logit_scale, softcap) -> dict:
    """The cross-entropy keywords of one call, as ``_run`` takes them."""
    return {
        "weight": class_weight,
        "ignore_index": ignore_index,
        "reduction": reduction,
        "label_smoothing": label_smoothing,
        "z_loss": z_loss,
        "logit_scale": logit_scale,
        "softcap": softcap,
    }


def _run(hidden, weight, target, bias, options, chunk_rows, want_grad, backend, row_scale=None, gemms=None):
    """The chunk loop. ``row_scale`` (n,): the gradient of ``sum_i row_scale_i l_i`` (the
    backward of "none" with a grad_output), each chunk's gradient rows scaled before the
    GEMMs. ``gemms``: who multiplies (``NumpyGemms()`` by default; fastxent.torch passes
    one on torch's matmul, over the same arrays)."""
    h, w, h2, w2, b, t, compute = _inputs(hidden, weight, target, bias)
    n, n_classes = h2.shape[0], w2.shape[0]
    reduction = check_reduction(options["reduction"])
    ignore_index = check_ignore_index(options["ignore_index"])
    class_weight = options["weight"]
    # the global denominators, before any chunk (the kernels' own label check and sums)
    cw = None if class_weight is None else np.ascontiguousarray(class_weight, compute)
    if cw is not None and cw.shape != (n_classes,):
        raise ValueError(f"weight (class weights) must have shape ({n_classes},), got {cw.shape}")
    labels64 = _labels(t, h.shape[:-1], n_classes, ignore_index)  # int64 (n,), range checked
    d, k = denominators(labels64, num_classes=n_classes, weight=cw, ignore_index=ignore_index)
    rows = _chunk_rows(chunk_rows, n, n_classes, h2.shape[1])
    buffer = np.empty((min(rows, max(n, 1)), n_classes), compute)
    d_hidden = np.empty_like(h2) if want_grad else None
    d_weight = np.zeros_like(w2) if want_grad else None
    d_bias = np.zeros(n_classes, compute) if want_grad and b is not None else None
    if gemms is None:
        gemms = NumpyGemms()
    total = 0.0
    row_losses = np.empty(n) if reduction == "none" else None
    with gemms.threads():  # the BLAS on fastxent's thread count (NumpyGemms.threads)
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            logits = buffer[: r1 - r0]
            gemms.logits(h2[r0:r1], w2, logits)  # (1) the chunk's logits
            if b is not None:
                logits += b
            loss, grad, _ = _api._cross_entropy(  # (2) in place, with the global denominators
                logits,
                labels64[r0:r1],
                cw,
                ignore_index,
                reduction,
                options["label_smoothing"],
                backend,
                want_grad,
                logits if want_grad else None,
                options["z_loss"],
                options["logit_scale"],
                options["softcap"],
                False,
                denominators=(d, k),
            )
            if row_losses is not None:
                row_losses[r0:r1] = loss
            else:
                total += float(loss)
            if want_grad:  # (3) the two GEMMs, and the bias
                if row_scale is not None:
                    logits *= row_scale[r0:r1, None].astype(logits.dtype)
                gemms.d_hidden(logits, w2, d_hidden[r0:r1])
                gemms.accumulate(d_weight, logits, h2[r0:r1])
                if d_bias is not None:
                    d_bias += logits.sum(axis=0)
    if reduction == "none":
        loss_out: Any = row_losses.astype(h.dtype).reshape(h.shape[:-1])
    elif reduction == "mean" and d == 0:
        loss_out = h.dtype.type(math.nan)
    else:
        loss_out = h.dtype.type(total)
    if not want_grad:
        return loss_out, None
    grads = [d_hidden.reshape(h.shape).astype(h.dtype, copy=False), d_weight.astype(w.dtype, copy=False)]
    if d_bias is not None:
        grads.append(d_bias.astype(np.asarray(bias).dtype, copy=False))
    return loss_out, grads


def linear_cross_entropy_with_grad(
    hidden: ArrayLike,
    weight: ArrayLike,
    target: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    class_weight: ArrayLike | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    chunk_rows: int | None = None,
    backend: str | None = None,
) -> tuple[Any, ...]:
    """``cross_entropy(hidden @ weight.T + bias, target, ...)`` and its gradients, a chunk of
    rows at a time (the ``N x V`` logits never exist): returns ``(loss, d_hidden, d_weight)``,
    plus ``d_bias`` when ``bias`` is given.

    ``hidden`` (..., H), ``weight`` (V, H) (a Linear layer's), ``bias`` (V,), ``target``
    class indices of shape ``hidden.shape[:-1]``. ``class_weight`` is cross-entropy's
    per-class ``weight``; the other keywords are :func:`fastxent.cross_entropy`'s.
    ``chunk_rows``: rows per chunk (default: the larger of ~64 MB of float32 logits and a
    quarter of ``d_weight``'s size); any value gives the same results up to the GEMMs'
    rounding. "none" gives per-row losses and the gradients of their sum."""
    options = _options(class_weight, ignore_index, reduction, label_smoothing, z_loss, logit_scale, softcap)
    loss, grads = _run(hidden, weight, target, bias, options, chunk_rows, True, backend)
    return (loss, *grads)


def linear_cross_entropy(
    hidden: ArrayLike,
    weight: ArrayLike,
    target: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    class_weight: ArrayLike | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    chunk_rows: int | None = None,
    backend: str | None = None,
) -> Any:
    """The loss of :func:`linear_cross_entropy_with_grad` alone (evaluation): one GEMM and
    the loss-only kernel per chunk, no gradient work."""
    options = _options(class_weight, ignore_index, reduction, label_smoothing, z_loss, logit_scale, softcap)
    loss, _ = _run(hidden, weight, target, bias, options, chunk_rows, False, backend)
    return loss
