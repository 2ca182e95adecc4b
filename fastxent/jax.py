"""fastxent inside JAX: ``cross_entropy`` usable under ``jax.jit``, ``jax.grad`` and
``jax.vmap``, through ``jax.pure_callback`` (the kernels run on the host's NumPy arrays)
and a ``jax.custom_vjp`` whose forward keeps the gradient of the same fused pass.

    import jax, jax.numpy as jnp, fastxent.jax as fxj
    loss = jax.jit(fxj.cross_entropy)(logits, labels)          # = optax's ...with_integer_labels(...).mean()
    grads = jax.grad(fxj.cross_entropy)(logits, labels)

Cost: ``jax.pure_callback`` copies the operands to the host and the results back (for
4096 x 32000 float32 the operand copy alone took 320 ms, more than the kernel), so under
``jax.jit`` this is slower than XLA's own cross-entropy at large sizes for now (README).

CPU only (the callback hands device buffers to NumPy); float32 / float64 logits ``(..., C)``
and integer labels ``logits.shape[:-1]``; the keywords are :func:`fastxent.cross_entropy`'s
(``reduction`` "mean", "sum" or "none"; "none" differentiates through ``jax.vjp`` with any
cotangent). The ``jax`` extra installs JAX.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

try:
    import jax
    import jax.numpy as jnp
except ImportError:
    raise ImportError("fastxent.jax needs JAX: pip install 'fastxent[jax]'") from None

import fastxent as _fx

__all__ = ["cross_entropy"]


def _host_loss_and_grad(logits, labels, options):
    """The fused pass on the host: (loss, gradient) in the logits' dtype."""
    x = np.asarray(logits)
    loss, grad = _fx.cross_entropy_with_grad(x, np.asarray(labels), **dict(options))
    return np.asarray(loss, dtype=x.dtype), grad.astype(x.dtype, copy=False)


def _host_loss(logits, labels, options):
    x = np.asarray(logits)
    return np.asarray(_fx.cross_entropy(x, np.asarray(labels), **dict(options)), dtype=x.dtype)


def _shapes(logits, options):
    reduction = dict(options)["reduction"]
    loss_shape = logits.shape[:-1] if reduction == "none" else ()
    return jax.ShapeDtypeStruct(loss_shape, logits.dtype), jax.ShapeDtypeStruct(logits.shape, logits.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _cross_entropy(logits, labels, options):
    loss_shape, _ = _shapes(logits, options)
    return jax.pure_callback(
        functools.partial(_host_loss, options=options), loss_shape, logits, labels, vmap_method="sequential"
    )


def _forward(logits, labels, options):
    loss_shape, grad_shape = _shapes(logits, options)
    loss, grad = jax.pure_callback(
        functools.partial(_host_loss_and_grad, options=options),
        (loss_shape, grad_shape),
        logits,
        labels,
        vmap_method="sequential",
    )
    return loss, (grad, labels)


def _backward(options, residuals, cotangent):
    grad, labels = residuals
    if dict(options)["reduction"] == "none":
        scaled = grad * cotangent[..., None]
    else:
        scaled = grad * cotangent
    labels_cotangent = np.zeros(labels.shape, dtype=jax.dtypes.float0)
    return scaled, labels_cotangent


_cross_entropy.defvjp(_forward, _backward)


def cross_entropy(
    logits: Any,
    labels: Any,
    *,
    weight: Any = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> Any:
    """:func:`fastxent.cross_entropy` as a JAX function (jit, grad, vmap). ``weight`` must be
    a concrete array (not traced); the options are static."""
    options = (
        ("weight", None if weight is None else np.asarray(weight, np.float64)),
        ("ignore_index", int(ignore_index)),
        ("reduction", reduction),
        ("label_smoothing", float(label_smoothing)),
        ("z_loss", float(z_loss)),
        ("logit_scale", float(logit_scale)),
        ("softcap", None if softcap is None else float(softcap)),
    )
    return _cross_entropy(logits, jnp.asarray(labels), _Static(options))


class _Static(tuple):
    """The options as a hashable static argument (the weight compared by its values)."""

    def __new__(cls, items):
        return super().__new__(cls, items)

    def _key(self):
        return tuple((k, tuple(v.tolist()) if isinstance(v, np.ndarray) else v) for k, v in self)

    def __hash__(self):
        return hash(self._key())

    def __eq__(self, other):
        return isinstance(other, _Static) and self._key() == other._key()
