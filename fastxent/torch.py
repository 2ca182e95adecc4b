"""PyTorch autograd adapter: fastxent's fused kernel behind ``torch.nn.functional.cross_entropy``.

Swap one line::

    loss_fn = torch.nn.CrossEntropyLoss(...)          # before
    loss_fn = fastxent.torch.CrossEntropyLoss(...)    # after: same arguments, same numbers

``cross_entropy`` has the signature of ``torch.nn.functional.cross_entropy`` (positional order
included, deprecated ``size_average``/``reduce`` handled as torch does) and PyTorch's
conventions: class dim 1 for ``(N, C, d1, ..., dk)``, ``(C,)`` unbatched, class-index (integer)
or probability (floating) targets, ``weight``, ``ignore_index``, ``reduction``,
``label_smoothing``. ``import fastxent`` does not import torch; ``import fastxent.torch`` does.

How it works
------------
The forward runs fastxent's fused loss+gradient kernel ONCE on zero-copy NumPy views of the
CPU tensors and keeps only the gradient (saved with ``save_for_backward``, so autograd frees
it after a backward that does not retain the graph). The backward multiplies it by
``grad_output`` (a scalar for "mean"/"sum", skipped when it is exactly 1; per row for "none")
and moves the class dim back. Copies:

- ``(N, C)`` or ``(C,)`` contiguous float32/float64: none. The kernel reads the logits'
  storage and writes a new gradient buffer, which is what backward returns.
- ``(N, C, d1, ..., dk)``: the kernel needs the class dim last and contiguous. A standard
  (channels-first) tensor is copied ONCE to class-last order, and the kernel then writes the
  gradient over that copy (no second N x C buffer); backward returns it as a class-dim-1 view
  with channels-last strides (a leaf input's ``.grad`` is then laid out like the leaf by
  autograd, which costs autograd one copy). An input that is already class-last in memory
  (``input.movedim(1, -1).is_contiguous()``, e.g. ``torch.channels_last``) is not copied.
- other strides: one contiguous copy, gradient written over it.
- float16 / bfloat16 with class indices: no copy; fastxent reads the 16-bit words (bfloat16
  through an ``ml_dtypes`` view of its bits; without ml_dtypes, one float32 copy) and writes the
  gradient in the input dtype. With probability targets: one copy to float32, computed there,
  and loss and gradient converted back to the input dtype.

Without a gradient to compute (under ``torch.no_grad()``/``inference_mode()``, or when
``input`` does not require grad), only the loss is computed: no N x C array is written.

``inplace_backward=True`` (opt in)
-------------------------------------
The gradient is written over the logits' own storage (fastxent's ``out=logits``): no N x C
buffer at all. After the call ``input`` holds the gradient of the (unscaled) loss, and
backward scales it in place and hands it on. What is checked:

- at forward time, refused with :class:`InplaceBackwardError`: ``input`` is a leaf or a view
  of a leaf (its storage is user-visible, e.g. a Parameter); ``input`` is neither float32/float64
  nor float16/bfloat16 with class-index targets (those are read and written as 16-bit words);
  ``input`` is not contiguous with its class dim last (``(N, C)``/``(C,)`` contiguous, or
  ``input.movedim(1, -1).is_contiguous()`` for ``(N, C, d1, ...)``).
- the forward bumps ``input``'s version counter (as any in-place op does), so autograd itself
  raises in the backward of any other node that saved those logits (e.g. a ``tanh`` that
  produced them, or another op that consumed them), instead of computing a wrong gradient.
- backward compares ``input._version`` with the value recorded after the forward and raises
  :class:`InplaceBackwardError` if the logits were modified in place in between.
- a second backward through the same graph (``retain_graph=True``) must use the same
  ``grad_output`` as the first (the buffer was scaled in place), else it raises;
  ``create_graph=True`` (double backward) raises: the logits it needs are gone.

Not detectable: writes that bypass the version counter (``tensor.data``, NumPy views, raw
pointers). Under no_grad, or when ``input`` does not require grad, the flag is ignored and
the logits are left untouched.

Fallback to PyTorch (never a wrong answer)
------------------------------------------
``torch.nn.functional.cross_entropy`` itself is used for: non-CPU tensors (CUDA, MPS, meta),
non-strided layouts, non-floating or complex logits (torch raises its own error), a floating
target or a weight that requires grad (torch differentiates soft targets), ``label_smoothing``
outside [0, 1] (torch treats a negative value as 0 and raises above 1), ``torch.compile``
tracing, tensor subclasses with ``__torch_function__``, functorch transforms (``vmap``,
``grad``) and forward-mode AD dual tensors.

Double backward (``create_graph=True``, ``gradgradcheck``): backward detects that grad mode is
on and recomputes the loss with PyTorch's own ops on the original logits, returning a
differentiable gradient. For this the forward keeps a reference (no copy) to the logits
until the first backward; a first-order backward drops it, so ``create_graph=True`` after a
``retain_graph=True`` first-order backward of the same graph raises a clear error.

Known differences from PyTorch: see fastxent's README (class indices of any integer dtype are
accepted; when the "mean" denominator is 0 because every kept row's class has weight 0 the
gradient is zeros where PyTorch gives NaN; out-of-range targets raise
``fastxent.TargetOutOfRangeError``, an IndexError). Kernel threads are fastxent's
(``fastxent.set_num_threads``), not ``torch.set_num_threads``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

try:
    import torch
except ModuleNotFoundError as _missing:
    if _missing.name != "torch":
        raise
    raise ImportError(
        "fastxent.torch needs PyTorch, which is not installed: pip install 'fastxent[torch]' torch==2.13.0 "
        "(or any torch >= 2.1; name a CPU build: an unpinned torch pulls a multi-GB CUDA one)"
    ) from None
import torch.nn.functional as F
from torch import Tensor
from torch.nn import _reduction as _Reduction

import fastxent as _fx
from fastxent import _shards
from fastxent._spec import check_distill_options as _check_distill_options

__all__ = [
    "CrossEntropyLoss",
    "InplaceBackwardError",
    "LinearCrossEntropyLoss",
    "cross_entropy",
    "distillation_loss",
    "linear_cross_entropy",
    "vocab_parallel_cross_entropy",
]

_NATIVE = (torch.float32, torch.float64)  # dtypes the kernels run on directly
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_NO_GRADS = (None,) * 7  # target, weight, ignore_index, reduction, label_smoothing, inplace, extensions
#: the extensions' defaults: (z_loss, logit_scale, softcap)
_PLAIN = (0.0, 1.0, None)


class InplaceBackwardError(RuntimeError):
    """``inplace_backward=True`` was asked where overwriting the logits would be unsafe."""


# --- layout and dtype helpers --------------------------------------------------------


def _class_last(t: Tensor) -> Tensor:
    """``(N, C, d1, ..., dk)`` as the view ``(N, d1, ..., dk, C)``; ``(N, C)``, ``(C,)`` as is."""
    return t.movedim(1, -1) if t.dim() > 2 else t


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in _NATIVE else torch.float32


def _words_dtype(input: Tensor, target: Tensor) -> torch.dtype:
    """The dtype the kernels get the logits in: float16/bfloat16 logits with class indices go
    as they are (fastxent reads them as 16-bit words, no float32 copy; bfloat16 needs
    ml_dtypes for its NumPy view), everything else as ``_compute_dtype``."""
    if input.dtype in (torch.float16, torch.bfloat16) and not target.is_floating_point():
        if input.dtype == torch.float16 or _ml_bfloat16() is not None:
            return input.dtype
    return _compute_dtype(input.dtype)


def _ml_bfloat16():
    try:
        import ml_dtypes
    except ImportError:
        return None
    return np.dtype(ml_dtypes.bfloat16)


def _as_numpy(t: Tensor) -> np.ndarray:
    """A zero-copy NumPy view (bfloat16 through its 16-bit words and ml_dtypes)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(_ml_bfloat16())
    return t.numpy()


def _from_numpy(a: np.ndarray) -> Tensor:
    """The inverse of ``_as_numpy``."""
    if a.dtype == _ml_bfloat16():
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _kernel_ready(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` contiguous and of ``dtype``: itself when it already is, else one (parallel) copy."""
    if t.dtype == dtype and t.is_contiguous():
        return t
    return t.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)


def _target_array(target: Tensor, dtype: torch.dtype) -> np.ndarray:
    t = target.detach()
    if t.is_floating_point():  # probabilities: same layout as the logits
        return _kernel_ready(_class_last(t), dtype).numpy()
    return t.numpy()  # class indices: shape (N, d1, ..., dk), any integer dtype


def _weight_array(weight: Tensor | None, dtype: torch.dtype) -> np.ndarray | None:
    if weight is None:
        return None
    w = weight.detach()
    return (w if w.dtype in _NATIVE else w.to(dtype)).numpy()


def _loss_tensor(loss, dtype: torch.dtype) -> Tensor:
    t = _from_numpy(np.asarray(loss))  # 0-d ("mean", "sum") or batch-shaped ("none")
    return t if t.dtype == dtype else t.to(dtype)


def _use_torch(input, target, weight, label_smoothing) -> bool:
    """True where fastxent cannot (or must not) run, and PyTorch's own op is used."""
    if not (isinstance(input, Tensor) and isinstance(target, Tensor)):
        return True
    if torch.overrides.has_torch_function_variadic(input, target, weight):
        return True
    if not (input.is_cpu and target.is_cpu and input.layout == torch.strided and target.layout == torch.strided):
        return True
    if weight is not None and not (
        isinstance(weight, Tensor) and weight.is_cpu and weight.layout == torch.strided and not weight.requires_grad
    ):
        return True
    if input.dtype not in _FLOATS or input.dim() == 0:
        return True
    if target.requires_grad and target.is_floating_point():
        return True
    if not 0.0 <= label_smoothing <= 1.0:  # also NaN
        return True
    if _is_compiling() or _is_functorch_wrapped(input):
        return True
    return torch.autograd.forward_ad.unpack_dual(input).tangent is not None


def _is_compiling() -> bool:
    """``torch.compiler.is_compiling()`` (torch >= 2.3), else ``torch._dynamo.is_compiling()``."""
    check = getattr(torch.compiler, "is_compiling", None)
    if check is not None:
        return bool(check())
    from torch._dynamo import is_compiling  # torch 2.1, 2.2

    return bool(is_compiling())


def _is_functorch_wrapped(t: Tensor) -> bool:
    check = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)
    return bool(check(t)) if check is not None else False


def _check_inplace(input: Tensor, target: Tensor) -> None:
    """Refuse ``inplace_backward=True`` where the logits' storage is visible or unusable."""
    if input.is_leaf or (input._base is not None and input._base.is_leaf):
        raise InplaceBackwardError(
            "inplace_backward=True would overwrite a leaf tensor (or a view of one) that requires grad, "
            "whose values are user-visible (e.g. a Parameter): pass the output of an operation (e.g. a Linear "
            "layer's logits), or use the default inplace_backward=False"
        )
    if _words_dtype(input, target) != input.dtype:
        raise InplaceBackwardError(
            "inplace_backward=True needs float32 or float64 logits, or float16/bfloat16 logits with class-index "
            f"targets (read as 16-bit words; bfloat16 needs ml_dtypes); got {input.dtype} logits with "
            f"{'probability' if target.is_floating_point() else 'class-index'} targets, which are computed in a "
            "float32 copy: use the default inplace_backward=False"
        )
    if not _class_last(input).is_contiguous():
        raise InplaceBackwardError(
            "inplace_backward=True needs logits that are contiguous with the class dim last in memory "
            f"((N, C) contiguous, or input.movedim(1, -1).is_contiguous()); got shape {tuple(input.shape)} with "
            f"strides {input.stride()}: use the default inplace_backward=False (one copy)"
        )


_MODIFIED = (
    "inplace_backward=True: the logits (which hold the gradient since the forward) were modified in place "
    "between forward and backward"
)


# --- the autograd Function -----------------------------------------------------------


class _FusedCrossEntropy(torch.autograd.Function):
    """Loss in forward, its gradient kept from the same fused pass; backward only scales it."""

    @staticmethod
    def forward(ctx, input, target, weight, ignore_index, reduction, label_smoothing, inplace, extensions):
        dtype = _words_dtype(input, target)
        x = _class_last(input.detach())
        if inplace:  # checked by the caller: class-last contiguous, a dtype the kernels read as it is
            buf, own = x, True
        elif x.dtype == dtype and x.is_contiguous():
            buf, own = x, False  # zero copy: the kernel reads the input's storage
        else:
            buf, own = _kernel_ready(x, dtype), True  # our copy: the gradient overwrites it
        arr = _as_numpy(buf)
        loss, grad = _fx.cross_entropy_with_grad(
            arr,
            _target_array(target, dtype),
            weight=_weight_array(weight, _compute_dtype(dtype)),
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
            z_loss=extensions[0],
            logit_scale=extensions[1],
            softcap=extensions[2],
            out=arr if own else None,
        )
        g = buf if own else _from_numpy(grad)
        if g.dtype != input.dtype:
            g = g.to(input.dtype)
        ctx.reduction = reduction
        ctx.moved = input.dim() > 2
        ctx.inplace = inplace
        if inplace:
            torch.autograd.graph.increment_version(input)  # the logits were overwritten
            ctx.version = input._version  # g shares input's version counter (detach, movedim)
            ctx.applied = None  # the grad_output of the first backward (the buffer's scale)
            ctx.fallback = None
        else:  # only for a create_graph=True backward; dropped by a first-order backward
            ctx.fallback = (input, target, weight, ignore_index, label_smoothing, extensions)
            ctx.input_version = input._version
        ctx.save_for_backward(g)
        return _loss_tensor(loss, input.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():  # create_graph=True: a differentiable gradient, from PyTorch
            return (_torch_backward(ctx, grad_output),) + _NO_GRADS
        ctx.fallback = None
        try:
            (g,) = ctx.saved_tensors
        except RuntimeError as error:
            if ctx.inplace and "inplace operation" in str(error):
                raise InplaceBackwardError(f"{_MODIFIED} ({error})") from error
            raise
        if ctx.inplace:
            if g._version != ctx.version:
                raise InplaceBackwardError(f"{_MODIFIED} (version {g._version}, expected {ctx.version})")
            grad = _scale_in_place(ctx, g, grad_output)
        elif ctx.reduction == "none":
            grad = g * grad_output.unsqueeze(-1)
        elif grad_output.item() == 1.0:
            grad = g  # loss.backward(): no pass over the gradient at all
        else:
            grad = g * grad_output
        return (grad.movedim(-1, 1) if ctx.moved else grad,) + _NO_GRADS


def _scale_in_place(ctx, g: Tensor, grad_output: Tensor) -> Tensor:
    """Scale the gradient (the logits' storage) by ``grad_output``, once per graph."""
    if ctx.applied is not None:  # a retain_graph=True backward again: the buffer is already handed out
        if not torch.equal(ctx.applied, grad_output):
            raise InplaceBackwardError(
                "inplace_backward=True: a second backward through the same graph with a different grad_output "
                "(the gradient buffer was handed out and scaled in place by the first one); use "
                "inplace_backward=False"
            )
        return g
    if ctx.reduction == "none" or grad_output.item() != 1.0:
        scale = grad_output.unsqueeze(-1) if ctx.reduction == "none" else grad_output
        # through an alias with its own version counter: scaling must not look like a user write
        if g.dtype == torch.bfloat16:  # (NumPy has no bfloat16: the alias goes through the words)
            torch.from_numpy(g.view(torch.int16).numpy()).view(torch.bfloat16).mul_(scale)
        else:
            torch.from_numpy(g.numpy()).mul_(scale)
    ctx.applied = grad_output.clone()
    return g


def _torch_backward(ctx, grad_output: Tensor) -> Tensor:
    """The gradient as a differentiable function of the logits and ``grad_output``, via PyTorch."""
    if ctx.inplace:
        raise InplaceBackwardError(
            "double backward (create_graph=True) is not supported with inplace_backward=True: "
            "the logits it needs were overwritten by the gradient"
        )
    if ctx.fallback is None:
        raise RuntimeError(
            "fastxent.torch.cross_entropy: a create_graph=True backward after a first-order backward of the same "
            "graph is not supported (the reference to the logits was released); call the create_graph=True "
            "backward first, or recompute the loss"
        )
    input, target, weight, ignore_index, label_smoothing, extensions = ctx.fallback
    if input._version != ctx.input_version:
        raise RuntimeError(
            "fastxent.torch.cross_entropy: the logits were modified in place after the forward "
            f"(version {input._version}, expected {ctx.input_version}); a create_graph=True backward needs them"
        )
    loss = _torch_cross_entropy(input, target, weight, ignore_index, ctx.reduction, label_smoothing, extensions)
    (grad,) = torch.autograd.grad(loss, input, grad_output, create_graph=True)
    return grad


# --- the public functions ------------------------------------------------------------


def _torch_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, extensions) -> Tensor:
    """The loss with PyTorch's own (differentiable) ops: ``F.cross_entropy`` when no extension
    is set, else the same on ``x' = c tanh(a x / c)`` plus the z-loss ``s lse**2`` per kept
    row, "mean" dividing it by the kept rows (Liger-Kernel's and flash-attention's forward)."""
    z_loss, logit_scale, softcap = extensions
    options = {"ignore_index": ignore_index, "label_smoothing": label_smoothing}
    if extensions == _PLAIN:
        return F.cross_entropy(input, target, weight, reduction=reduction, **options)
    class_dim = 0 if input.dim() == 1 else 1
    x = input * logit_scale if logit_scale != 1.0 else input
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    if z_loss == 0.0:
        return F.cross_entropy(x, target, weight, reduction=reduction, **options)
    ce = F.cross_entropy(x, target, weight, reduction="none", **options)
    lse = torch.logsumexp(x, dim=class_dim)
    kept = torch.ones_like(lse, dtype=torch.bool) if target.is_floating_point() else target != ignore_index
    z = torch.where(kept, z_loss * lse * lse, torch.zeros_like(lse))
    if reduction == "none":
        return ce + z
    if reduction == "sum":
        return ce.sum() + z.sum()
    if target.is_floating_point() or weight is None:
        ce_denominator = kept.sum()
    else:
        ce_denominator = (weight[torch.where(kept, target, 0)] * kept).sum()
    return ce.sum() / ce_denominator + z.sum() / kept.sum()


def _loss_only(input, target, weight, ignore_index, reduction, label_smoothing, extensions) -> Tensor:
    dtype = _words_dtype(input, target)
    x = _kernel_ready(_class_last(input.detach()), dtype)
    loss = _fx.cross_entropy(
        _as_numpy(x),
        _target_array(target, dtype),
        weight=_weight_array(weight, _compute_dtype(dtype)),
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=extensions[0],
        logit_scale=extensions[1],
        softcap=extensions[2],
    )
    return _loss_tensor(loss, input.dtype)


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    inplace_backward: bool = False,
    z_loss: float = 0.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> Tensor:
    """``torch.nn.functional.cross_entropy`` computed by fastxent's fused CPU kernel.

    Same signature, conventions and numbers as PyTorch's: ``input`` of shape ``(C,)``,
    ``(N, C)`` or ``(N, C, d1, ..., dk)`` (class dim 1); ``target`` class indices of shape
    ``(N, d1, ..., dk)`` or probabilities of ``input``'s shape. Per row, with
    ``lse = logsumexp(x)``, ``k = [y != ignore_index]`` and ``t' = (1-eps) t + eps/C``:

    - class indices: ``l = k [(1-eps) w[y] (lse - x_y) + eps/C sum_c w_c (lse - x_c)]``;
      "mean" divides by ``sum k w[y]``;
    - probabilities: ``l = -sum_c w_c t'_c (x_c - lse)``; "mean" divides by the number of rows.

    Parameters
    ----------
    input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing
        As in ``torch.nn.functional.cross_entropy`` (``size_average``/``reduce`` are
        deprecated and mapped to ``reduction`` exactly as torch does).
    inplace_backward : bool, default False
        Write the gradient over the logits' storage (no N x C buffer). Refused, with
        :class:`InplaceBackwardError`, for leaf inputs, views of leaves, float16/bfloat16 with
        probability targets and layouts that are not class-last contiguous; see the module
        docstring for all checks.
    z_loss, logit_scale, softcap
        fastxent's extensions (keyword only; see ``fastxent.cross_entropy``): the loss sees
        ``x' = c tanh(a x / c)`` (``a x`` without a cap) and each kept row adds
        ``z_loss * logsumexp(x')**2``, which "mean" divides by the number of kept rows
        (Liger-Kernel's ``lse_square_scale`` and ``softcap``, flash-attention's ``logit_scale``).
        Where PyTorch's own op is used (see the module docstring) the same formula is computed
        with PyTorch's ops.

    Returns
    -------
    Tensor
        0-d for "mean"/"sum", shape ``(N, d1, ..., dk)`` (or ``()`` unbatched) for "none", in
        ``input``'s dtype; differentiable with respect to ``input``.
    """
    if size_average is not None or reduce is not None:
        reduction = _Reduction.legacy_get_string(size_average, reduce)
    extensions = _extensions(z_loss, logit_scale, softcap)
    if _use_torch(input, target, weight, label_smoothing):
        return _torch_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, extensions)
    if ignore_index >= 0 and target.is_floating_point():
        # torch's own check and words (the NumPy API raises a ValueError for the same call)
        raise RuntimeError("ignore_index is not supported for floating point target")
    if torch.is_grad_enabled() and input.requires_grad:
        if inplace_backward:
            _check_inplace(input, target)
        return _FusedCrossEntropy.apply(
            input, target, weight, ignore_index, reduction, float(label_smoothing), bool(inplace_backward), extensions
        )
    return _loss_only(input, target, weight, ignore_index, reduction, label_smoothing, extensions)


def _extensions(z_loss, logit_scale, softcap) -> tuple[float, float, float | None]:
    """The extensions, checked (ValueError, as the NumPy API) before any path runs."""
    from fastxent._spec import check_logit_scale, check_softcap, check_z_loss

    return check_z_loss(z_loss), check_logit_scale(logit_scale), check_softcap(softcap)


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss`` computed by :func:`cross_entropy` (fastxent's fused kernel).

    A subclass of ``torch.nn.CrossEntropyLoss`` with the same constructor (``weight`` is a
    buffer, ``size_average``/``reduce`` handled by torch's own code) plus the keyword
    ``inplace_backward`` (see :func:`cross_entropy`).
    """

    def __init__(
        self,
        weight: Tensor | None = None,
        size_average: bool | None = None,
        ignore_index: int = -100,
        reduce: bool | None = None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        inplace_backward: bool = False,
        z_loss: float = 0.0,
        logit_scale: float = 1.0,
        softcap: float | None = None,
    ) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.inplace_backward = inplace_backward
        self.z_loss, self.logit_scale, self.softcap = _extensions(z_loss, logit_scale, softcap)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            inplace_backward=self.inplace_backward,
            z_loss=self.z_loss,
            logit_scale=self.logit_scale,
            softcap=self.softcap,
        )

    def extra_repr(self) -> str:
        parts = [f"inplace_backward={self.inplace_backward}"] if self.inplace_backward else []
        parts += [f"{name}={value}" for name, value, default in self._extension_items() if value != default]
        return ", ".join(parts)

    def _extension_items(self):
        values = (self.z_loss, self.logit_scale, self.softcap)
        return zip(("z_loss", "logit_scale", "softcap"), values, _PLAIN, strict=True)


# --- distillation ----------------------------------------------------------------------
# fastxent.distillation_loss behind autograd. The class dim is LAST (``(..., V)``), as in
# Liger-Kernel's JSD and as the ``log_softmax(dim=-1)`` + ``F.kl_div`` pair it replaces; the
# teacher is a constant (detached: no gradient flows to it, as in Liger-Kernel).


def _use_torch_for_distillation(student, teacher, target) -> bool:
    """True where fastxent cannot run and the same formula in torch ops is used."""
    tensors = (student, teacher) if target is None else (student, teacher, target)
    if not all(isinstance(t, Tensor) for t in tensors):
        return True
    if torch.overrides.has_torch_function(tensors):
        return True
    if not all(t.is_cpu and t.layout == torch.strided for t in tensors):
        return True
    if student.dtype not in _FLOATS or teacher.dtype not in _FLOATS or student.dim() == 0:
        return True
    if _is_compiling() or _is_functorch_wrapped(student):
        return True
    return torch.autograd.forward_ad.unpack_dual(student).tangent is not None


def _distill_dtype(student: Tensor, teacher: Tensor) -> torch.dtype:
    return _compute_dtype(torch.promote_types(student.dtype, teacher.dtype))


def _torch_distillation(student, teacher, beta, temperature, target, ignore_index, reduction) -> Tensor:
    """The loss in torch ops (docs/SEMANTICS.md "Distillation"): the fallback for what fastxent
    cannot run (other devices, torch.compile, functorch) and the differentiable recomputation
    of a create_graph=True backward. ``0 log 0 = 0`` by ``torch.where``."""
    if student.shape != teacher.shape:
        raise ValueError(
            f"teacher logits must have the student's shape {tuple(student.shape)}, got {tuple(teacher.shape)}"
        )
    dtype = _distill_dtype(student, teacher)
    lq = F.log_softmax(student.to(dtype) / temperature, dim=-1)
    lp = F.log_softmax(teacher.detach().to(dtype) / temperature, dim=-1)
    q, p = lq.exp(), lp.exp()
    zero = lq.new_zeros(())
    if beta == 0.0:
        rows = torch.where(p > 0, p * (lp - lq), zero).sum(-1)
    elif beta == 1.0:
        rows = (q * torch.where(q > 0, lq - lp, zero)).sum(-1)
    else:
        m = beta * p + (1 - beta) * q
        lm = torch.log(torch.where(m > 0, m, torch.ones_like(m)))
        kl_p = torch.where(p > 0, p * (lp - lm), zero).sum(-1)
        kl_q = torch.where(q > 0, q * (lq - lm), zero).sum(-1)
        rows = beta * kl_p + (1 - beta) * kl_q
    rows = rows * (temperature * temperature)
    count = rows.numel()
    if target is not None:
        kept = target != ignore_index
        rows = torch.where(kept, rows, zero)
        count = int(kept.sum())
    if reduction == "none":
        loss = rows
    elif reduction == "sum":
        loss = rows.sum()
    else:
        loss = rows.sum() / count if count else rows.sum() * float("nan")
    return loss.to(student.dtype)


class _FusedDistillation(torch.autograd.Function):
    """Loss in forward, its gradient with respect to the student kept from the same fused
    pass; backward only scales it (as _FusedCrossEntropy)."""

    @staticmethod
    def forward(ctx, student, teacher, beta, temperature, target, ignore_index, reduction):
        dtype = _distill_dtype(student, teacher)
        x = student.detach()
        if x.dtype == dtype and x.is_contiguous():
            buf, own = x, False  # zero copy: the kernel reads the input's storage
        else:
            buf, own = _kernel_ready(x, dtype), True  # our copy: the gradient overwrites it
        arr = buf.numpy()
        loss, grad = _fx.distillation_loss_with_grad(
            arr,
            _kernel_ready(teacher.detach(), dtype).numpy(),
            beta=beta,
            temperature=temperature,
            target=None if target is None else target.detach().numpy(),
            ignore_index=ignore_index,
            reduction=reduction,
            out=arr if own else None,
        )
        g = buf if own else torch.from_numpy(grad)
        if g.dtype != student.dtype:
            g = g.to(student.dtype)
        ctx.reduction = reduction
        ctx.fallback = (student, teacher, beta, temperature, target, ignore_index)
        ctx.save_for_backward(g)
        return _loss_tensor(loss, student.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        nothing = (None,) * 6
        if torch.is_grad_enabled():  # create_graph=True: a differentiable gradient, from torch ops
            if ctx.fallback is None:
                raise RuntimeError(
                    "fastxent.torch.distillation_loss: a create_graph=True backward after a first-order backward "
                    "of the same graph is not supported (the reference to the logits was released)"
                )
            student, teacher, beta, temperature, target, ignore_index = ctx.fallback
            loss = _torch_distillation(student, teacher, beta, temperature, target, ignore_index, ctx.reduction)
            (grad,) = torch.autograd.grad(loss, student, grad_output, create_graph=True)
            return (grad,) + nothing
        ctx.fallback = None
        (g,) = ctx.saved_tensors
        if ctx.reduction == "none":
            return (g * grad_output.unsqueeze(-1),) + nothing
        if grad_output.item() == 1.0:
            return (g,) + nothing
        return (g * grad_output,) + nothing


def distillation_loss(
    student: Tensor,
    teacher: Tensor,
    *,
    beta: float = 0.0,
    temperature: float = 1.0,
    target: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "batchmean",
) -> Tensor:
    """Knowledge-distillation loss from logits, fastxent's fused kernel behind autograd.

    ``P = softmax(teacher / T)``, ``Q = softmax(student / T)``, ``M = beta P + (1-beta) Q``;
    per row ``T**2 J`` with ``J = KL(P || Q)`` at beta = 0 (``T**2 * F.kl_div(log Q, log P,
    log_target=True)``), ``KL(Q || P)`` at beta = 1, and Liger-Kernel's generalised JSD
    ``beta KL(P || M) + (1-beta) KL(Q || M)`` in between. See ``fastxent.distillation_loss``
    and docs/SEMANTICS.md for every edge case.

    The class dim is LAST: ``student`` and ``teacher`` of one shape ``(..., V)`` (as
    Liger-Kernel's JSD, and as ``log_softmax(dim=-1)`` with ``F.kl_div``). The gradient flows
    to ``student`` only; ``teacher`` is treated as a constant (detached). ``target`` (integer,
    shape ``(...)``) masks rows equal to ``ignore_index``; ``reduction`` is "batchmean" (by the
    rows not ignored), "sum" or "none" (shape ``(...)``).

    CPU strided float tensors run the fused kernel (float16/bfloat16 in float32); other
    devices, ``torch.compile`` tracing and functorch transforms run the same formula in torch
    ops. ``create_graph=True`` recomputes the loss with torch ops for the second order.
    """
    beta, temperature, reduction = _check_distill_options(beta, temperature, reduction)
    if _use_torch_for_distillation(student, teacher, target):
        return _torch_distillation(student, teacher, beta, temperature, target, ignore_index, reduction)
    if torch.is_grad_enabled() and student.requires_grad:
        return _FusedDistillation.apply(student, teacher, beta, temperature, target, ignore_index, reduction)
    dtype = _distill_dtype(student, teacher)
    loss = _fx.distillation_loss(
        _kernel_ready(student.detach(), dtype).numpy(),
        _kernel_ready(teacher.detach(), dtype).numpy(),
        beta=beta,
        temperature=temperature,
        target=None if target is None else target.detach().numpy(),
        ignore_index=ignore_index,
        reduction=reduction,
    )
    return _loss_tensor(loss, student.dtype)


# --- vocab-parallel: each rank holds a slice of the classes ---------------------------


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Forward: local row statistics, two all-reduces (MAX of the row max, SUM of the
    rebased sums), the loss; backward: this shard's gradient from the merged statistics,
    with no communication."""

    @staticmethod
    def forward(ctx, shard, target, weight, group, class_start, num_classes, options):
        x = _as_numpy(_kernel_ready(shard.detach(), _compute_dtype(shard.dtype)))
        y = target.detach().cpu().numpy()
        w = None if weight is None else weight.detach().to(torch.float64).cpu().numpy()
        ignore_index, reduction, label_smoothing, z_loss, logit_scale, softcap = options
        local = _fx.row_stats(
            x,
            y,
            class_start=class_start,
            num_classes=num_classes,
            weight=w,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            logit_scale=logit_scale,
            softcap=softcap,
        )
        data = local.data.copy()
        m = torch.from_numpy(data[:, 0].copy())
        torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX, group=group)
        sums = torch.from_numpy(_shards.rebase(data, m.numpy()))  # the merge's terms, summed over ranks
        torch.distributed.all_reduce(sums, op=torch.distributed.ReduceOp.SUM, group=group)
        merged_data = np.column_stack([m.numpy(), sums.numpy()])
        merged = _fx.RowStats.from_array(merged_data, num_classes, "index", local.batch_shape)
        loss = _fx.loss_from_stats(
            merged,
            y,
            weight=w,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            reduction=reduction,
        )
        ctx.saved = (x, y, w, merged, class_start, options)
        ctx.shard_dtype = shard.dtype
        ctx.moved = shard.dim() > 2
        return _loss_tensor(loss, shard.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        x, y, w, merged, class_start, options = ctx.saved
        ignore_index, reduction, label_smoothing, z_loss, logit_scale, softcap = options
        grad = _fx.shard_grad(
            x,
            y,
            merged,
            class_start=class_start,
            weight=w,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            logit_scale=logit_scale,
            softcap=softcap,
            reduction=reduction,
        )
        g = torch.from_numpy(grad).to(ctx.shard_dtype)
        g = g * (grad_output.unsqueeze(-1) if reduction == "none" else grad_output)
        return (g.movedim(-1, 1) if ctx.moved else g,) + (None,) * 6


def vocab_parallel_cross_entropy(
    shard_logits: Tensor,
    target: Tensor,
    *,
    group: Any = None,
    class_start: int | None = None,
    num_classes: int | None = None,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> Tensor:
    """Cross-entropy when each rank of ``group`` (torch.distributed, e.g. gloo on CPU) holds
    a slice of the classes, as Megatron's vocab-parallel layout.

    ``shard_logits``: this rank's ``(N, C_k)`` (or ``(N, C_k, d1, ...)``) logits; the shards
    are contiguous and of equal width in rank order (rank r holds ``r C_k .. (r+1) C_k``)
    unless ``class_start`` (and ``num_classes``, the full count) say otherwise. ``target``:
    the full class indices, the same on every rank; ``weight``: the full ``(num_classes,)``.
    The logits never travel: forward all-reduces a few float64 per row (the MAX of the row
    max, then one SUM of the rebased sum-exp, target, weight and smoothing terms), and
    backward computes this shard's gradient from the merged statistics with no
    communication. Returns the loss (the same on every rank), differentiable with respect
    to ``shard_logits``; equal to ``F.cross_entropy`` on the concatenated logits.
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("vocab_parallel_cross_entropy needs torch.distributed initialised (init_process_group)")
    if target.is_floating_point():
        raise TypeError("vocab_parallel_cross_entropy takes class-index targets")
    shard = shard_logits.movedim(1, -1) if shard_logits.dim() > 2 else shard_logits
    width = shard.shape[-1]
    if class_start is None:
        class_start = dist.get_rank(group) * width
        if num_classes is None:
            num_classes = dist.get_world_size(group) * width
    elif num_classes is None:
        total = torch.tensor([width], dtype=torch.int64)
        dist.all_reduce(total, group=group)
        num_classes = int(total.item())
    options = (
        int(ignore_index),
        reduction,
        float(label_smoothing),
        float(z_loss),
        float(logit_scale),
        None if softcap is None else float(softcap),
    )
    return _VocabParallelCrossEntropy.apply(shard, target, weight, group, int(class_start), int(num_classes), options)


# --- the fused linear cross-entropy: the N x V logits never exist ----------------------


class _TorchGemms:
    """The chunk loop's three GEMMs on torch's matmul (its BLAS and its intra-op threads,
    as the rest of a torch program), over tensors that share the NumPy arrays' memory
    (``torch.from_numpy``: no copies); the interface of ``fastxent._linear.NumpyGemms``.
    Threads: torch's (``torch.set_num_threads``) for the GEMMs, fastxent's for the kernel."""

    @staticmethod
    def threads() -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    @staticmethod
    def logits(hidden: np.ndarray, weight: np.ndarray, out: np.ndarray) -> None:
        torch.mm(torch.from_numpy(hidden), torch.from_numpy(weight).T, out=torch.from_numpy(out))

    @staticmethod
    def d_hidden(grad: np.ndarray, weight: np.ndarray, out: np.ndarray) -> None:
        torch.mm(torch.from_numpy(grad), torch.from_numpy(weight), out=torch.from_numpy(out))

    @staticmethod
    def accumulate(d_weight: np.ndarray, grad: np.ndarray, hidden: np.ndarray) -> None:
        torch.from_numpy(d_weight).addmm_(torch.from_numpy(grad).T, torch.from_numpy(hidden))


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Forward: loss and the three gradients, a chunk of rows at a time (fastxent's
    linear_cross_entropy_with_grad on the tensors' storage); backward scales them by
    grad_output ("none": recomputes with each row's grad_output)."""

    @staticmethod
    def forward(ctx, input, linear_weight, linear_bias, target, weight, options, chunk_rows):
        from . import _linear

        dtype = _compute_dtype(torch.promote_types(input.dtype, linear_weight.dtype))
        h = _as_numpy(_kernel_ready(input.detach(), dtype))
        w = _as_numpy(_kernel_ready(linear_weight.detach(), dtype))
        b = None if linear_bias is None else _as_numpy(_kernel_ready(linear_bias.detach(), dtype))
        y = target.detach().cpu().numpy()
        cw = None if weight is None else _weight_array(weight, dtype)
        wants = ctx.needs_input_grad[0] or ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        loss, grads = _linear._run(
            h,
            w,
            y,
            b,
            {**options, "weight": cw},
            chunk_rows,
            wants and options["reduction"] != "none",
            None,
            gemms=_TorchGemms,
        )
        ctx.reduction = options["reduction"]
        ctx.dtypes = (input.dtype, linear_weight.dtype, None if linear_bias is None else linear_bias.dtype)
        if ctx.reduction == "none" and wants:  # recomputed in backward with the row weights
            ctx.recompute = (h, w, y, b, {**options, "weight": cw}, chunk_rows)
            ctx.grads = None
        else:
            ctx.recompute = None
            ctx.grads = grads
        return _loss_tensor(loss, input.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        from . import _linear

        if ctx.recompute is not None:
            h, w, y, b, options, chunk_rows = ctx.recompute
            scale = grad_output.detach().to(torch.float64).reshape(-1).numpy()
            _, grads = _linear._run(h, w, y, b, options, chunk_rows, True, None, row_scale=scale, gemms=_TorchGemms)
            scale_by = None
        else:
            grads = ctx.grads
            scale_by = None if grad_output.item() == 1.0 else grad_output
        out = []
        for grad, dtype in zip(grads, ctx.dtypes, strict=False):
            g = torch.from_numpy(np.ascontiguousarray(grad))
            if scale_by is not None:
                g = g * scale_by.to(g.dtype)
            out.append(g.to(dtype))
        d_input, d_weight = out[0], out[1]
        d_bias = out[2] if len(out) > 2 else None
        ctx.grads = ctx.recompute = None
        return d_input, d_weight, d_bias, None, None, None, None


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    weight: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    chunk_rows: int | None = None,
) -> Tensor:
    """``F.cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)`` without
    the logits: torch.nn.functional.linear_cross_entropy's call shape (``input`` (..., H),
    ``linear_weight`` (V, H), class indices ``target``; ``weight`` the class weights), with
    autograd to ``input``, ``linear_weight`` and ``linear_bias``. The chunks run on torch's
    matmul (``torch.mm``, ``addmm_`` into ``d_weight``: torch's BLAS and intra-op threads)
    and fastxent's in-place kernel; see ``fastxent.linear_cross_entropy_with_grad``. CPU
    tensors only."""
    if target.is_floating_point():
        raise TypeError("linear_cross_entropy takes class-index targets")
    for name, t in (("input", input), ("linear_weight", linear_weight), ("target", target)):
        if not t.is_cpu:
            raise ValueError(f"fastxent.torch.linear_cross_entropy runs on CPU tensors ({name} is on {t.device})")
    options = {
        "ignore_index": int(ignore_index),
        "reduction": reduction,
        "label_smoothing": float(label_smoothing),
        "z_loss": float(z_loss),
        "logit_scale": float(logit_scale),
        "softcap": None if softcap is None else float(softcap),
    }
    return _FusedLinearCrossEntropy.apply(input, linear_weight, linear_bias, target, weight, options, chunk_rows)


class LinearCrossEntropyLoss(torch.nn.Module):
    """A module for :func:`linear_cross_entropy`: holds the cross-entropy options (class
    ``weight`` as a buffer); called as ``loss(input, linear_weight, target, linear_bias)``."""

    def __init__(
        self,
        weight: Tensor | None = None,
        *,
        reduction: str = "mean",
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        logit_scale: float = 1.0,
        softcap: float | None = None,
        chunk_rows: int | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.logit_scale = logit_scale
        self.softcap = softcap
        self.chunk_rows = chunk_rows

    weight: Tensor | None

    def forward(
        self, input: Tensor, linear_weight: Tensor, target: Tensor, linear_bias: Tensor | None = None
    ) -> Tensor:
        return linear_cross_entropy(
            input,
            linear_weight,
            target,
            linear_bias=linear_bias,
            weight=self.weight,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            logit_scale=self.logit_scale,
            softcap=self.softcap,
            chunk_rows=self.chunk_rows,
        )
