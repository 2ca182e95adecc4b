"""The plain NumPy reference: the oracle every kernel is tested against, and the last fallback.

Everything here is computed in float64 straight from the formulas of docs/SEMANTICS.md, with no
attempt at speed. Shapes are 2-D: logits ``x`` is ``(n, C)``; index targets ``y`` are ``(n,)``;
probability targets ``t`` are ``(n, C)``.

Per row ``i`` (``lse_i = m_i + log sum_c exp(x_ic - m_i)``, ``p_ic = exp(x_ic - lse_i)``):

- index targets, ``k_i = [y_i != ignore_index]``::

      l_i = k_i [(1-eps) w[y_i] (lse_i - x_i,y_i) + eps/C sum_c w_c (lse_i - x_ic)]
      dl_i/dx_ic = k_i [(1-eps) w[y_i] (p_ic - [c == y_i]) + eps/C (W p_ic - w_c)]

- probability targets, ``t'_ic = (1-eps) t_ic + eps/C``::

      l_i = -sum_c w_c t'_ic (x_ic - lse_i)
      dl_i/dx_ic = p_ic sum_k w_k t'_ik - w_c t'_ic
"""

from __future__ import annotations

import numpy as np


def log_softmax(x: np.ndarray) -> np.ndarray:
    """``x - lse(x)`` along the last axis, in float64, stable: ``(x - m) - log sum exp(x - m)``."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        m = np.max(x, axis=-1, keepdims=True)
        shifted = x - m
        return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def logsumexp(x: np.ndarray) -> np.ndarray:
    """``m + log sum exp(x - m)`` along the last axis, in float64.

    As ``torch.logsumexp``, an infinite max is replaced by 0, so a row of all -inf gives
    ``log 0 = -inf`` and a row holding +inf gives +inf (not ``inf - inf = NaN``)."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        m = np.max(x, axis=-1, keepdims=True)
        m = np.where(np.isinf(m), 0.0, m)
        return (m + np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True)))[..., 0]


def index_rows(x, y, weight, ignore_index, eps):
    """Per-row losses and the gradient of their sum, for class-index targets (float64)."""
    x = np.asarray(x, dtype=np.float64)
    n, C = x.shape
    w = np.ones(C) if weight is None else np.asarray(weight, dtype=np.float64)
    kept = y != ignore_index
    y_safe = np.where(kept, y, 0).astype(np.intp)  # ignored rows never read y_i
    rows = np.arange(n)
    lsm = log_softmax(x)
    p = np.exp(lsm)
    onehot = np.zeros_like(x)
    onehot[rows, y_safe] = 1.0
    w_y = w[y_safe]
    with np.errstate(invalid="ignore", over="ignore"):
        loss = (1 - eps) * w_y * -lsm[rows, y_safe]
        grad = ((1 - eps) * w_y)[:, None] * (p - onehot)
        if eps > 0:  # PyTorch skips the smoothing term at eps == 0 (so 0 * inf never appears)
            loss = loss + eps / C * -np.sum(w * lsm, axis=-1)
            grad = grad + eps / C * (w.sum() * p - w)
    loss = np.where(kept, loss, 0.0)
    grad = np.where(kept[:, None], grad, 0.0)
    return loss, grad


def probability_rows(x, t, weight, eps):
    """Per-row losses and the gradient of their sum, for probability targets (float64)."""
    x = np.asarray(x, dtype=np.float64)
    C = x.shape[-1]
    w = np.ones(C) if weight is None else np.asarray(weight, dtype=np.float64)
    t = (1 - eps) * np.asarray(t, dtype=np.float64) + eps / C
    lsm = log_softmax(x)
    with np.errstate(invalid="ignore", over="ignore"):
        loss = -np.sum(w * t * lsm, axis=-1)
        grad = np.exp(lsm) * np.sum(w * t, axis=-1, keepdims=True) - w * t
    return loss, grad


def transform(x, logit_scale=1.0, softcap=None):
    """``(x', dx'/dx)``: the logits the loss sees, ``c tanh(a x / c)`` (``a x`` without a cap)."""
    x = np.asarray(x, dtype=np.float64)
    if softcap is None:
        return logit_scale * x, np.full_like(x, logit_scale)
    th = np.tanh(logit_scale * x / softcap)
    return softcap * th, logit_scale * (1.0 - th * th)


def entropy(x):
    """``-sum_c p_c log p_c`` of ``p = softmax(x)`` per row, with ``0 log 0 = 0``."""
    lsm = log_softmax(x)
    with np.errstate(invalid="ignore"):
        return -np.sum(np.where(lsm == -np.inf, 0.0, np.exp(lsm) * lsm), axis=-1)


def cross_entropy(
    x,
    target,
    weight=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    z_loss=0.0,
    logit_scale=1.0,
    softcap=None,
    return_stats=False,
):
    """Loss and gradient of ``torch.nn.functional.cross_entropy`` for 2-D logits, in float64,
    with the extensions (docs/SEMANTICS.md): the loss sees ``x' = c tanh(a x / c)``, and each
    kept row adds ``z_loss * lse_i**2`` (under "mean" divided by the kept rows K, not by D).

    Returns ``(loss, grad)``, or ``(loss, grad, stats)`` with ``return_stats``: ``loss`` is a
    float ("mean", "sum") or an ``(n,)`` array ("none"); ``grad`` is the gradient of the
    returned loss (of the sum of rows for "none") with respect to ``x``; ``stats`` a dict of
    ``lse``, ``z_loss`` (reduced as the loss), ``accuracy`` (None for probabilities), ``entropy``.
    """
    xt, dxt = transform(x, logit_scale, softcap)
    target = np.asarray(target)
    n = xt.shape[0]
    if np.issubdtype(target.dtype, np.floating):
        loss, grad = probability_rows(xt, target, weight, label_smoothing)
        kept = np.ones(n, bool)
        denominator = float(n)
    else:
        loss, grad = index_rows(xt, target, weight, ignore_index, label_smoothing)
        kept = target != ignore_index
        w_y = 1.0 if weight is None else np.asarray(weight, np.float64)[np.where(kept, target, 0)]
        denominator = float(np.sum(kept * w_y))
    with np.errstate(invalid="ignore", over="ignore"):
        m = np.max(xt, axis=-1)
        lse = m + np.log(np.sum(np.exp(xt - m[:, None]), axis=-1))  # NaN where m is infinite
        z = np.where(kept, z_loss * lse * lse, 0.0)
        # (an ignored row's gradient is 0 even where its softmax is NaN: a +inf or NaN logit)
        z_grad = np.where(kept[:, None], (2.0 * z_loss * lse)[:, None] * np.exp(log_softmax(xt)), 0.0)
    if z_loss == 0:
        z_grad = np.zeros_like(grad)
    n_kept = float(np.count_nonzero(kept))
    if reduction == "none":
        total, grad, z_part = loss + z, grad + z_grad, z
    elif reduction == "sum":
        total, grad, z_part = float(np.sum(loss) + np.sum(z)), grad + z_grad, float(np.sum(z))
    elif denominator == 0:  # N = 0, every row ignored, or zero weights: NaN loss, zero gradient
        total, grad, z_part = float("nan"), np.zeros_like(grad), float(np.sum(z)) / n_kept if n_kept else float("nan")
    else:
        total = float(np.sum(loss)) / denominator + float(np.sum(z)) / n_kept
        grad, z_part = grad / denominator + z_grad / n_kept, float(np.sum(z)) / n_kept
    grad = grad * dxt
    if not return_stats:
        return total, grad
    accuracy = None
    if not np.issubdtype(target.dtype, np.floating):
        correct = kept & (np.argmax(xt, axis=-1) == target)  # first index of the max, NaN first
        accuracy = float(np.count_nonzero(correct)) / n_kept if n_kept else float("nan")
    stats = {"lse": lse, "z_loss": z_part, "accuracy": accuracy, "entropy": entropy(xt)}
    return total, grad, stats


# --- distillation ------------------------------------------------------------------------
# P = softmax(teacher / T), Q = softmax(student / T), M = beta P + (1-beta) Q; per row
#     beta = 0:      J = KL(P || Q) = sum_c P_c (log P_c - log Q_c)
#     beta = 1:      J = KL(Q || P) = sum_c Q_c (log Q_c - log P_c)
#     0 < beta < 1:  J = beta KL(P || M) + (1-beta) KL(Q || M)
# with 0 log 0 = 0 (a class of probability 0 adds nothing), and loss = T**2 J. With
# u = student / T, dJ/du_c = Q_c (g_c - sum_k Q_k g_k), g_c = dJ/dQ_c, which gives
#     beta = 0:  Q - P;   beta = 1:  Q_c (r_c - J), r = log Q - log P;
#     else:      (1-beta) Q_c (r_c - KL(Q || M)), r = log Q - log M,
# and the gradient of the loss with respect to the student's logits is T dJ/du.


def distillation_rows(student, teacher, beta, temperature):
    """Per-row losses ``T**2 J`` and the gradient of their sum with respect to ``student``
    (2-D, float64)."""
    T = float(temperature)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        lq = log_softmax(np.asarray(student, np.float64) / T)
        lp = log_softmax(np.asarray(teacher, np.float64) / T)
        q, p = np.exp(lq), np.exp(lp)
        if beta == 0:
            j = np.sum(np.where(p > 0, p * (lp - lq), 0.0), axis=-1)
            dj = q - p
        elif beta == 1:
            r = np.where(q > 0, lq - lp, 0.0)
            j = np.sum(q * r, axis=-1)
            dj = q * (r - j[:, None])
        else:
            lm = np.log(beta * p + (1 - beta) * q)
            kl_p = np.sum(np.where(p > 0, p * (lp - lm), 0.0), axis=-1)
            r = np.where(q > 0, lq - lm, 0.0)
            kl_q = np.sum(q * r, axis=-1)
            j = beta * kl_p + (1 - beta) * kl_q
            dj = (1 - beta) * q * (r - kl_q[:, None])
    return T * T * j, T * dj


def distillation(student, teacher, beta=0.0, temperature=1.0, target=None, ignore_index=-100, reduction="batchmean"):
    """Loss and gradient of ``fastxent.distillation_loss`` for 2-D logits, in float64:
    ``(loss, grad)``, ``loss`` a float or an ``(n,)`` array ("none"), ``grad`` the gradient
    of the returned loss with respect to the student (of the sum of the rows for "none")."""
    loss, grad = distillation_rows(student, teacher, beta, temperature)
    kept = np.ones(loss.shape, bool) if target is None else np.asarray(target) != ignore_index
    loss = np.where(kept, loss, 0.0)
    grad = np.where(kept[:, None], grad, 0.0)
    if reduction == "none":
        return loss, grad
    if reduction == "sum":
        return float(np.sum(loss)), grad
    denominator = float(np.count_nonzero(kept))
    if denominator == 0:  # N = 0 or every row ignored: NaN loss, zero gradient
        return float("nan"), np.zeros_like(grad)
    return float(np.sum(loss)) / denominator, grad / denominator
