"""Options as data: one validated, frozen spec per call, and the record the kernels read.

A call's options are checked ONCE, here, into a :class:`LossSpec`. The kernels never see
the spec; they get a :class:`Params` record of the per-call scalars (``spec.params(...)``)
and a few arguments that change the loop itself (the target kind picks the kernel, the
mode and the layout are run-time branches taken once per block of rows). Adding an option
means a field here, a field in ``Params`` when the kernels need it, and the lines that
read it: no positional lists to thread through every backend.

What is decided at compile time and what at run time (see docs/DESIGN.md for the numbers):

- compile time, one kernel each: the target kind (class indices / probabilities) and the
  storage dtype (float32 / float64);
- run time, per block of rows: the mode (loss only, loss and gradient, in place, the row
  statistics of a class shard, the gradient of a class shard) and the layout (rows one at
  a time, or for few classes 64 rows across the SIMD lanes);
- run time, per call: every scalar in ``Params``.
"""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np

Reduction = Literal["mean", "sum", "none"]
TargetKind = Literal["index", "probability"]
REDUCTIONS: tuple[str, ...] = ("mean", "sum", "none")
#: the columns of the per-row outputs that the fused modes write when ``Params.row_outputs``
#: (``rowdata`` (n, N_OUTS) float64): ``lse = m' + log s'`` of the transformed logits; the
#: z-loss term ``s lse**2`` (0 on ignored rows); the entropy of ``softmax(x')``; 1.0 when the
#: first index of ``max x'`` is the target (class indices, else 0)
OUT_LSE, OUT_Z, OUT_ENTROPY, OUT_CORRECT = 0, 1, 2, 3
N_OUTS = 4
#: ``Params.storage``: the logits in the compute dtype, or as bfloat16 / float16 bits
STORAGE_NATIVE, STORAGE_BF16, STORAGE_F16 = 0, 1, 2

#: calls over fewer logits than this run on ONE thread, whatever fx.set_num_threads says.
#: Measured (float32 out=, C = 1000 / 256, median of 7): quiet, 2 threads are 1.5-1.7x
#: faster than 1 from 128k logits; but with the other core busy (another process), 2
#: threads took 5.8-7x longer than 1 at 256k-1M logits (1024 x 1000: 7.0 ms against 1.0:
#: the call waits for a thread the OS has not scheduled yet), and 2.3-4.5x at 80-6400; from
#: 4M logits 2 threads were faster again even busy (0.68-0.87x). So up to 2M logits a call
#: never takes longer with 2 threads than with 1: it uses 1.
SMALL_CALL_ELEMENTS = 1 << 21
DEFAULT_IGNORE_INDEX = -100
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class Params(NamedTuple):
    """The per-call scalars of a cross-entropy kernel: one typed record.

    numba types a NamedTuple by its field types, which are fixed here (int64, float64,
    bool), so every call shares one compiled kernel whatever the values. The Cython
    backend receives the same fields as a C struct.
    """

    #: rows whose class index equals it are skipped (class-index targets only)
    ignore_index: int
    #: column of this array's first class in the full class axis: 0, except for a class shard
    class_start: int
    #: ``eps``, the label smoothing itself (the reference backend's formulas take it)
    eps: float
    #: ``1 - eps``: the weight of the target class
    keep: float
    #: ``eps / C`` with C the FULL class count (a shard's width does not change it)
    spread: float
    #: whether the smoothing terms are computed at all (``eps > 0``; eps/C may underflow to 0
    #: and must still turn a -inf logit into a NaN term, as PyTorch does)
    smoothing: bool
    #: ``W = sum_c w_c`` over every class (C without weights)
    weight_total: float
    #: the gradient's factor: ``1/D`` for "mean", 1 otherwise
    grad_scale: float
    #: whether ``weight`` holds class weights (else it is ones that are never read)
    weighted: bool
    #: ``s``, the z-loss coefficient: ``s lse**2`` per kept row (0: none)
    z_loss: float
    #: the z-loss gradient's factor: ``1/K`` for "mean" (K = the rows not ignored), 1 otherwise
    z_grad_scale: float
    #: ``a``, the logit scale: the loss sees ``a x`` (1: none)
    logit_scale: float
    #: ``c``, the tanh soft cap: the loss sees ``c tanh(a x / c)`` (0: none)
    softcap: float
    #: whether the loss sees transformed logits ``x'`` (``a != 1`` or a cap)
    transformed: bool
    #: whether the fused modes write the per-row outputs ``rowdata[:, OUT_*]`` (lse, the
    #: z-loss term, entropy, whether the argmax is the target): z-loss or statistics wanted
    row_outputs: bool
    #: whether the entropy and the argmax test are computed (``return_stats``); also makes
    #: ignored rows compute their lse and entropy
    stats: bool
    #: how the logits and the gradient are stored: ``STORAGE_NATIVE`` (the compute dtype
    #: itself), ``STORAGE_BF16`` or ``STORAGE_F16`` (16-bit words, widened to float32 in
    #: registers and the gradient rounded back; kernels with ``STORAGE_16BIT`` only)
    storage: int


def check_reduction(reduction: Any) -> Reduction:
    # isinstance first: ``in`` would compare an array elementwise ("truth value ... ambiguous")
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction  # type: ignore[return-value]


def check_label_smoothing(label_smoothing: Any) -> float:
    try:
        if isinstance(label_smoothing, str | bytes):  # float("0.1") would accept text
            raise TypeError
        eps = float(label_smoothing)
    except (TypeError, ValueError):
        raise ValueError(f"label_smoothing must be a number in [0, 1], got {label_smoothing!r}") from None
    if not 0.0 <= eps <= 1.0:  # also rejects NaN; PyTorch silently treats eps < 0 as 0
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    return eps


def _finite_float(value: Any, name: str) -> float:
    try:
        if isinstance(value, str | bytes):
            raise TypeError
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return number


def check_z_loss(z_loss: Any) -> float:
    value = _finite_float(z_loss, "z_loss")
    if value < 0:  # s lse**2 with s < 0 rewards large normalisers without bound
        raise ValueError(f"z_loss must be >= 0, got {z_loss!r}")
    return value


def check_logit_scale(logit_scale: Any) -> float:
    return _finite_float(logit_scale, "logit_scale")


def check_softcap(softcap: Any) -> float | None:
    if softcap is None:
        return None
    value = _finite_float(softcap, "softcap")
    if value <= 0:  # c tanh(x / c) needs c > 0 (Gemma 2 uses 30)
        raise ValueError(f"softcap must be None or > 0, got {softcap!r}")
    return value


def check_ignore_index(ignore_index: Any) -> int:
    try:
        value = operator.index(ignore_index)
    except TypeError:
        raise TypeError(f"ignore_index must be an integer, got {ignore_index!r}") from None
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise ValueError(f"ignore_index must fit in int64, got {value}")
    return value


@dataclass(frozen=True)
class LossSpec:
    """The validated options of one cross-entropy call (not the arrays).

    Build it with :meth:`create`, which checks every field; a ``LossSpec`` that exists is
    valid. ``params`` turns it, with the facts of the arrays, into the kernels' record.
    """

    target_kind: TargetKind
    reduction: Reduction = "mean"
    label_smoothing: float = 0.0
    ignore_index: int = DEFAULT_IGNORE_INDEX
    z_loss: float = 0.0
    logit_scale: float = 1.0
    softcap: float | None = None
    return_stats: bool = False

    @classmethod
    def create(
        cls,
        target_kind: TargetKind,
        *,
        reduction: Any = "mean",
        label_smoothing: Any = 0.0,
        ignore_index: Any = DEFAULT_IGNORE_INDEX,
        z_loss: Any = 0.0,
        logit_scale: Any = 1.0,
        softcap: Any = None,
        return_stats: bool = False,
    ) -> LossSpec:
        reduction = check_reduction(reduction)
        eps = check_label_smoothing(label_smoothing)
        ignore_index = check_ignore_index(ignore_index)
        z = check_z_loss(z_loss)
        scale = check_logit_scale(logit_scale)
        cap = check_softcap(softcap)
        if target_kind == "probability" and ignore_index >= 0:
            # as torch, which raises "ignore_index is not supported for floating point target"
            # for any ignore_index >= 0 (a negative one can name no class, and is accepted)
            raise ValueError(
                f"ignore_index={ignore_index} is not supported for probability (floating) targets: "
                "it applies to class indices only (leave it at its default, -100)"
            )
        return cls(target_kind, reduction, eps, ignore_index, z, scale, cap, bool(return_stats))

    @property
    def transformed(self) -> bool:
        """Whether the loss sees ``x' = a x`` or ``c tanh(a x / c)`` rather than ``x``."""
        return self.logit_scale != 1.0 or self.softcap is not None

    @property
    def row_outputs(self) -> bool:
        """Whether the kernels write the per-row outputs (``OUT_*``)."""
        return self.z_loss != 0.0 or self.return_stats

    def params(
        self,
        *,
        n_classes: int,
        weight_total: float,
        grad_scale: float,
        weighted: bool,
        class_start: int = 0,
        z_grad_scale: float = 1.0,
        storage: int = STORAGE_NATIVE,
    ) -> Params:
        """The kernels' record for ``n_classes`` classes in all (the full class axis)."""
        eps = self.label_smoothing
        return Params(
            ignore_index=int(self.ignore_index),
            class_start=int(class_start),
            eps=float(eps),
            keep=float(1.0 - eps),
            spread=float(eps / n_classes) if n_classes else 0.0,
            smoothing=bool(eps > 0),
            weight_total=float(weight_total),
            grad_scale=float(grad_scale),
            weighted=bool(weighted),
            z_loss=float(self.z_loss),
            z_grad_scale=float(z_grad_scale),
            logit_scale=float(self.logit_scale),
            softcap=float(self.softcap) if self.softcap is not None else 0.0,
            transformed=self.transformed,  # (16-bit words: each backend widens them its own way)
            row_outputs=self.row_outputs,
            stats=bool(self.return_stats),
            storage=int(storage),
        )

    def denominator_is_rows(self) -> bool:
        """Whether "mean" divides by the row count N (probability targets) rather than by
        ``D = sum_i k_i w[y_i]`` (class indices)."""
        return self.target_kind == "probability"


# The compiled kernels (numba and Cython) take ``weight`` as a real (C,) array and
# ``Params.weighted`` saying whether to use it, never a length-0 stand-in. A loop that
# writes the gradient row while it reads ``weight[c]`` (in the branch it may take) is
# vectorised behind a run-time check that the arrays do not overlap. For a length-0 array
# that check depends on where malloc happened to put it: when it failed, the row ran the
# scalar loop, which sums in another order, and the gradient changed in its last bits from
# call to call. A real (C,) array never overlaps the gradient, so every row takes the vector
# loop; in the Cython kernels every pointer formed then points into a real array.
@functools.lru_cache(maxsize=16)
def _unit_weight(n_classes: int, dtype: np.dtype) -> np.ndarray:
    ones = np.ones(n_classes, dtype)
    ones.flags.writeable = False
    return ones


def kernel_weight(weight: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The caller's weight, or for none (length 0) ones that are never read (see above)."""
    return weight if weight.shape[0] != 0 else _unit_weight(x.shape[1], x.dtype)


#: the gradient argument of the modes that write none, per dtype: the kernels take a writable
#: (n, C) array (numba) or a pointer (Cython), and this one is never read or written. One per
#: process: a fresh (1, C) array per call cost up to 0.2 ms at C = 32000 with 2 threads
#: (malloc/free at the mmap threshold, and munmap's TLB shootdown of the other thread)
_NO_GRADIENT: dict[np.dtype, np.ndarray] = {
    np.dtype(np.float32): np.empty((1, 1), np.float32),
    np.dtype(np.float64): np.empty((1, 1), np.float64),
}


def no_gradient(dtype: np.dtype) -> np.ndarray:
    """The never-written gradient argument of loss only and the statistics modes."""
    return _NO_GRADIENT[dtype]


# --- distillation ------------------------------------------------------------------------
#: what a distillation row computes (``DistillParams.kind``): the forward KL(P || Q) at
#: beta = 0, the reverse KL(Q || P) at beta = 1, the generalised JSD in between
FORWARD_KL, REVERSE_KL, JSD = 0, 1, 2
DistillReduction = Literal["batchmean", "sum", "none"]
DISTILL_REDUCTIONS: tuple[str, ...] = ("batchmean", "sum", "none")


class DistillParams(NamedTuple):
    """The per-call scalars of a distillation kernel (``fastxent.distillation_loss``), one
    typed record as :class:`Params` (the Cython backend copies it into a struct of the same
    fields, in this order)."""

    #: FORWARD_KL, REVERSE_KL or JSD (from beta)
    kind: int
    #: ``beta``, the teacher's weight in the mixture ``M = beta P + (1-beta) Q``
    beta: float
    #: ``log(beta)`` and ``log(1 - beta)`` (JSD only: log M where one of P, Q is 0)
    log_beta: float
    log_one_minus_beta: float
    #: ``T`` and ``1/T``: the logits are divided by T; the loss is multiplied by T**2
    temperature: float
    inv_temperature: float
    #: the gradient's factor: ``1/D`` for "batchmean" (D the rows not ignored), 1 otherwise
    grad_scale: float
    #: rows whose target equals it are skipped (when ``masked``)
    ignore_index: int
    #: whether a target was given (else every row counts and the labels are never read)
    masked: bool


def check_distill_options(beta: Any, temperature: Any, reduction: Any) -> tuple[float, float, DistillReduction]:
    """``(beta, temperature, reduction)`` validated: beta in [0, 1], T finite and > 0,
    reduction one of DISTILL_REDUCTIONS ("mean" is refused with the reason)."""
    values = []
    for name, value in (("beta", beta), ("temperature", temperature)):
        try:
            if isinstance(value, str | bytes):
                raise TypeError
            values.append(float(value))
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a real number, got {value!r}") from None
    b, t = values
    if not 0.0 <= b <= 1.0:  # also NaN
        raise ValueError(f"beta must be in [0, 1], got {beta!r}")
    if not (t > 0.0 and t < float("inf")):  # also NaN
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
    if isinstance(reduction, str) and reduction == "mean":
        raise ValueError(
            "reduction='mean' is not supported: torch's kl_div 'mean' divides by the number of ELEMENTS (N*C), "
            "which torch itself warns about; use 'batchmean' (divides by the rows not ignored), 'sum' or 'none'"
        )
    if not isinstance(reduction, str) or reduction not in DISTILL_REDUCTIONS:
        raise ValueError(f"reduction must be one of {DISTILL_REDUCTIONS}, got {reduction!r}")
    return b, t, reduction  # type: ignore[return-value]


def distill_params(
    beta: float, temperature: float, grad_scale: float, ignore_index: int, masked: bool
) -> DistillParams:
    """The kernels' record for validated options."""
    import math

    kind = FORWARD_KL if beta == 0.0 else REVERSE_KL if beta == 1.0 else JSD
    return DistillParams(
        kind=int(kind),
        beta=float(beta),
        log_beta=math.log(beta) if beta > 0 else -math.inf,
        log_one_minus_beta=math.log1p(-beta) if beta < 1 else -math.inf,
        temperature=float(temperature),
        inv_temperature=1.0 / float(temperature),
        grad_scale=float(grad_scale),
        ignore_index=int(ignore_index),
        masked=bool(masked),
    )
